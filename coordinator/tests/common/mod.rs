//! Test fixtures: stores, simulated workers and trainers driving the real state store.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use flywheel_coordinator::batch::{self, GroupConfig, GroupOutcome, PlanConfig};
use flywheel_coordinator::{
    Coordinator, CoordinatorConfig, CoordinatorError, CrashPoint, ServiceConfig, TickOutcome,
};
use flywheel_storage::RunStores;
use flywheel_storage::blob::BlobStore;
use flywheel_storage::config::{RolloutMode, RunConfig};
use flywheel_storage::keys;
use flywheel_storage::ledger::{self, Ledger};
use flywheel_storage::state::{MemberRole, MemoryStateStore, StateStore};
use flywheel_storage::types::BatchManifest;
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

    /// [`World::memory`] with the rollouts in `mode`.
    pub async fn memory_in(mode: RolloutMode) -> World {
        let mut w = Self::memory().await;
        w.run.rollout.mode = mode;
        w
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
            self.stores(),
            ServiceConfig {
                run: self.run.clone(),
                coordinator: config,
            },
        )
    }

    /// Why the ledger dropped prompt `id`, if it did.
    pub async fn drop_reason(&self, id: &str) -> Option<ledger::DropReason> {
        let status = self
            .ledger
            .prompt_status(&self.run.storage.run_id, &PromptId(id.to_owned()))
            .await
            .unwrap();
        match status {
            Some(ledger::PromptStatus::Dropped { reason, .. }) => Some(reason),
            _ => None,
        }
    }

    /// The run's stores, as a service gets them.
    pub fn stores(&self) -> RunStores {
        RunStores {
            run_id: self.run.storage.run_id.clone(),
            state: self.state.clone(),
            ledger: self.ledger.clone(),
            blobs: self.blobs.clone(),
            queue: None,
        }
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

    /// Accepts prompt `id` with one sample, generates a 5-token segment of it and releases
    /// it: parked under the current version. Returns the trajectory.
    pub async fn park(&self, id: &str) -> TrajectoryId {
        let p = self.accept(id, 1).await;
        let tid = TrajectoryId {
            prompt: p.id,
            sample: 0,
        };
        let epoch = self.generate(&tid, 5).await;
        self.state.release(&tid, "w", epoch).await.unwrap();
        tid
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
        // The object's content does not matter to the coordinator: it only deletes it.
        self.blobs
            .put(&seg.key, bytes::Bytes::from_static(b"segment"))
            .await
            .unwrap();
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

pub fn pid(s: &str) -> PromptId {
    PromptId(s.to_owned())
}

/// Three complete groups of 60 tokens each (rewards differ, so none is filtered).
pub async fn three_groups(w: &World) {
    for p in ["a", "b", "c"] {
        w.finish_prompt(p, &[20, 40], &[1.0, 0.0]).await;
    }
}

pub async fn manifest(w: &World, step: u64) -> BatchManifest {
    let bytes = w
        .blobs
        .get(&keys::step_manifest(&w.run.storage.run_id, step))
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// What step 0 must be for [`three_groups`]: planned directly with the library.
pub async fn expected_step0(w: &World, world_size: u32) -> BatchManifest {
    let mut groups = Vec::new();
    for p in ["a", "b", "c"] {
        let mut members = Vec::new();
        for k in 0..2 {
            let id = TrajectoryId {
                prompt: pid(p),
                sample: k,
            };
            members.push(w.state.trajectory(&id).await.unwrap().unwrap());
        }
        match batch::form_group(&pid(p), 2, members, &GroupConfig::default()).unwrap() {
            GroupOutcome::Ready(g) => groups.push(g),
            other => panic!("{other:?}"),
        }
    }
    let config = PlanConfig {
        token_budget: 100,
        micro_batch_tokens: 64,
        partition: Default::default(),
    };
    batch::plan_step(0, world_size, groups, &config)
        .unwrap()
        .manifest
}

/// Crashes the leader at `point` of step 0's commit, lets a standby take over, and checks
/// that step 0 is the same step and that its groups are never committed again.
pub async fn crash_and_take_over(w: &World, point: CrashPoint) {
    w.trainers(2).await;
    let mut first = w.coordinator("first");
    tick_until_settled(&mut first).await;
    three_groups(w).await;
    first.crash_at(Some(point));
    let err = first.tick().await.unwrap_err();
    assert!(
        matches!(err, CoordinatorError::InjectedCrash(p) if p == point),
        "{err}"
    );
    drop(first); // the process dies holding the lock

    let mut standby = w.coordinator("standby");
    // It stands by until the dead leader's lock lapses, then recovers and settles.
    let outcomes = tick_until_settled(&mut standby).await;
    assert!(standby.lease().is_some(), "{outcomes:?}");
    let run_id = &w.run.storage.run_id;
    assert_eq!(
        w.ledger.last_step(run_id).await.unwrap(),
        Some(0),
        "{point:?}"
    );
    assert_eq!(
        manifest(w, 0).await,
        expected_step0(w, 2).await,
        "{point:?}"
    );
    let a = w.state.announced_step().await.unwrap().unwrap();
    assert_eq!(
        (a.step, a.manifest_key.as_str()),
        (0, keys::step_manifest(run_id, 0).as_str())
    );
    // More ticks never commit a second step while step 0 trains.
    for _ in 0..3 {
        assert_eq!(standby.tick().await.unwrap(), TickOutcome::Idle);
    }
    assert_eq!(w.ledger.last_step(run_id).await.unwrap(), Some(0));
    // After step 0, only c is left for step 1: a and b are never trained twice.
    w.train_announced().await;
    assert_eq!(standby.tick().await.unwrap(), TickOutcome::Committed(1));
    assert_eq!(manifest(w, 1).await.prompts, vec![pid("c")]);
    let counts = w.ledger.prompt_counts(run_id).await.unwrap();
    assert_eq!((counts.trained, counts.pending, counts.dropped), (3, 0, 0));
}
