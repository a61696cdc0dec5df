//! Test fixtures: stores, simulated workers and trainers driving the real state store.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use flywheel_coordinator::{Coordinator, CoordinatorConfig, TickOutcome};
use flywheel_storage::blob::BlobStore;
use flywheel_storage::config::{RolloutMode, RunConfig};
use flywheel_storage::ledger::{self, Ledger};
use flywheel_storage::state::{MemberRole, MemoryStateStore, StateStore};
use flywheel_storage::types::{
    Prompt, PromptId, PromptInput, SegmentRef, TrajectoryId, VerifierSpec,
};

pub const LONG: Duration = Duration::from_secs(60);

/// The stores of one run.
#[derive(Clone)]
pub struct World {
    pub run: RunConfig,
    pub state: Arc<dyn StateStore>,
    pub ledger: Arc<dyn Ledger>,
    pub blobs: BlobStore,
}

/// A run config with small numbers: Φ = 100, M = 64, Φ_r = 1000.
pub fn run_config(run_id: &str) -> RunConfig {
    let mut run = RunConfig::default();
    run.storage.run_id = run_id.to_owned();
    run.batch.token_budget = 100;
    run.batch.micro_batch_tokens = 64;
    run.rollout.mode = RolloutMode::Partial;
    run.rollout.version_budget_tokens = 1000;
    run.rollout.segment_tokens = 10;
    run
}

pub fn random_run() -> String {
    format!("t{:012x}", rand::random::<u64>() >> 16)
}

impl World {
    /// Memory state, in-memory SQLite ledger, memory blobs.
    pub async fn memory() -> World {
        let run = run_config(&random_run());
        let state: Arc<dyn StateStore> = Arc::new(MemoryStateStore::new(&run.storage.run_id));
        let ledger = ledger::open("sqlite::memory:").await.unwrap();
        Self::with(run, state, ledger).await
    }

    pub async fn with(
        run: RunConfig,
        state: Arc<dyn StateStore>,
        ledger: Arc<dyn Ledger>,
    ) -> World {
        ledger
            .create_run(&run.storage.run_id, &serde_json::json!({}))
            .await
            .unwrap();
        World {
            run,
            state,
            ledger,
            blobs: BlobStore::open("memory://").unwrap(),
        }
    }

    /// A coordinator candidate with a short leader lock.
    pub fn coordinator(&self, id: &str) -> Coordinator {
        let config = CoordinatorConfig {
            candidate_id: id.to_owned(),
            tick_ms: 50,
            leader_ttl_ms: 400,
            ..Default::default()
        };
        Coordinator::new(
            self.run.clone(),
            config,
            self.state.clone(),
            self.ledger.clone(),
            self.blobs.clone(),
        )
    }

    /// A worker's whole job for one prompt: accept, register, and finish each sample with
    /// `tokens[k]` tokens (one segment under the current version) and `rewards[k]`.
    pub async fn finish_prompt(&self, id: &str, tokens: &[u32], rewards: &[f32]) {
        let p = self.accept(id, tokens.len() as u32).await;
        for (k, (&n, &r)) in tokens.iter().zip(rewards).enumerate() {
            let tid = TrajectoryId {
                prompt: p.id.clone(),
                sample: k as u32,
            };
            let epoch = self.generate(&tid, n).await;
            self.state.finish(&tid, "w", epoch, r).await.unwrap();
        }
    }

    /// Accepts and registers a prompt with K samples.
    pub async fn accept(&self, id: &str, k: u32) -> Prompt {
        let p = Prompt {
            id: PromptId(id.to_owned()),
            input: PromptInput::Text(format!("question {id}")),
            verifier: VerifierSpec::ExactMatch { answer: "1".into() },
            group_size: k,
            metadata: Default::default(),
        };
        self.ledger
            .accept_prompt(&self.run.storage.run_id, &p)
            .await
            .unwrap();
        self.state.register_prompt(&p).await.unwrap();
        p
    }

    /// Claims `id` and commits one segment of `n` tokens under the current version; returns
    /// the lease epoch.
    pub async fn generate(&self, id: &TrajectoryId, n: u32) -> u64 {
        let claim = self.state.claim(id, "w", LONG).await.unwrap();
        let epoch = claim.lease().epoch;
        let version = self.state.current_version().await.unwrap().unwrap_or(0);
        let seq = claim.state.segments.len() as u32;
        let seg = SegmentRef {
            seq,
            key: format!(
                "{}/segments/{}/{}/{seq:08}-e{epoch}",
                self.run.storage.run_id, id.prompt, id.sample
            ),
            tokens: n,
            version,
        };
        self.state
            .commit_segment(id, "w", epoch, &seg, LONG)
            .await
            .unwrap();
        epoch
    }

    /// Trainers that heartbeat.
    pub async fn trainers(&self, n: usize) {
        for i in 0..n {
            self.state
                .heartbeat(MemberRole::Trainer, &format!("trainer-{i}"), LONG)
                .await
                .unwrap();
        }
    }

    /// Plays the trainers of the announced step: every rank claimed and completed, then the
    /// finisher finishes the step.
    pub async fn train_announced(&self) -> u64 {
        let a = self
            .state
            .announced_step()
            .await
            .unwrap()
            .expect("a step is announced");
        let mut finisher = false;
        while let Some(c) = self
            .state
            .claim_rank(a.step, "trainer-0", LONG)
            .await
            .unwrap()
        {
            finisher |= self
                .state
                .complete_rank(&c, "trainer-0")
                .await
                .unwrap()
                .all_done;
        }
        assert!(finisher, "someone finished step {}", a.step);
        self.state.finish_step(a.step, a.step + 1).await.unwrap();
        a.step
    }
}

/// Ticks `c` until it leads and has nothing left to do, or it commits a step; bounded.
pub async fn tick_until_settled(c: &mut Coordinator) -> Vec<TickOutcome> {
    let mut seen = Vec::new();
    for _ in 0..200 {
        let out = c.tick().await.unwrap();
        let done = matches!(out, TickOutcome::Idle | TickOutcome::Committed(_));
        seen.push(out);
        if done {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("coordinator {} never settled: {seen:?}", c.id());
}
