//! The worker in process against memory state, memory blobs, an in-memory SQLite ledger and
//! (for the intake) librdkafka's mock cluster, with the deterministic `sim` engine:
//!
//! - every trajectory is generated to its end in segments of at most S tokens, and its tokens
//!   equal what the engine gives for the whole trajectory in one go;
//! - `partial`: a spent budget parks trajectories; the next version resumes them first and
//!   they continue from their committed segments;
//! - `sync`: a started trajectory runs to its end past the budget, an unstarted one waits;
//! - `async`: nothing waits for the budget;
//! - a steal after lease expiry resumes from the last committed segment, and the old holder's
//!   late commit is fenced out;
//! - shutdown releases every lease (trajectories with segments are parked);
//! - the intake registers each prompt once even when Kafka redelivers it, and dead-letters
//!   malformed messages while it keeps going.
//!
//! Waits are bounded by a generous deadline (a hang fails, naming what it waited for); no
//! assertion is on durations.

use std::sync::Arc;
use std::time::Duration;

use flywheel_storage::RunStores;
use flywheel_storage::blob::BlobStore;
use flywheel_storage::codec;
use flywheel_storage::config::{RolloutConfig, RolloutMode, RunConfig};
use flywheel_storage::ledger::{self, Ledger};
use flywheel_storage::ledger::{DropReason, PromptStatus};
use flywheel_storage::queue::{
    EmbeddedKafka, KafkaConfig, PromptConsumer, PromptProducer, ensure_topics,
};
use flywheel_storage::state::{GiveUp, MemoryStateStore, StateStore, StreamCursor};
use flywheel_storage::testkit;
use flywheel_storage::{
    FinishReason, Prompt, PromptId, PromptInput, Segment, SegmentRef, TrajectoryId,
    TrajectoryStatus, VerifierSpec, keys,
};
use flywheel_worker::engine::sim::{LengthDistribution, SimConfig, SimEngine};
use flywheel_worker::engine::{
    Engine, EngineConfig, EngineError, SamplingConfig, SegmentOutput, SegmentRequest,
};
use flywheel_worker::intake::{Registered, register_prompt};
use flywheel_worker::metrics::WorkerMetrics;
use flywheel_worker::{ServiceConfig, Worker, WorkerConfig};

const DEADLINE: Duration = Duration::from_secs(120);

/// The stores of one test run.
struct Env {
    run: RunConfig,
    state: Arc<dyn StateStore>,
    blobs: BlobStore,
    ledger: Arc<dyn Ledger>,
    sim: SimConfig,
}

impl Env {
    async fn new(rollout: RolloutConfig, lengths: LengthDistribution) -> Env {
        let run_id = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let mut run = RunConfig::default();
        run.storage.run_id = run_id.clone();
        run.rollout = rollout;
        let ledger = ledger::open("sqlite::memory:")
            .await
            .expect("sqlite ledger");
        ledger
            .create_run(&run_id, &serde_json::json!({}))
            .await
            .unwrap();
        Env {
            state: Arc::new(MemoryStateStore::new(run_id)),
            blobs: BlobStore::open("memory://").unwrap(),
            ledger,
            sim: SimConfig {
                seed: 11,
                slots: 4,
                decode_tokens_per_s: 0.0,
                lengths,
                ..SimConfig::default()
            },
            run,
        }
    }

    /// Opens `version` as the coordinator would: a leader write, so the test takes (or reuses)
    /// the leader lock and presents its fencing token.
    async fn open_version(&self, version: u64, budget: u64, retention_limit: u32) {
        let ttl = Duration::from_secs(600);
        let token = match self.state.acquire_leader("test-leader", ttl).await.unwrap() {
            Some(lease) => lease.token,
            None => {
                self.state
                    .leader()
                    .await
                    .unwrap()
                    .expect("a live leader")
                    .token
            }
        };
        self.state
            .open_version(version, budget, retention_limit, token)
            .await
            .unwrap();
    }

    fn worker_config(&self, id: &str) -> WorkerConfig {
        WorkerConfig {
            id: id.into(),
            engine: EngineConfig::Sim(self.sim.clone()),
            grace_period_ms: 10_000,
            poll_interval_ms: 20,
            metrics_addr: "127.0.0.1:0".into(),
            ..WorkerConfig::default()
        }
    }

    async fn start(&self, id: &str, queue: Option<KafkaConfig>) -> Worker {
        self.start_with(self.worker_config(id), queue).await
    }

    /// A worker on the run's stores; with `queue` its intake consumes that topic.
    async fn start_with(&self, worker: WorkerConfig, queue: Option<KafkaConfig>) -> Worker {
        let engine = worker.engine.build().unwrap();
        let stores = RunStores {
            run_id: self.run.storage.run_id.clone(),
            state: self.state.clone(),
            ledger: self.ledger.clone(),
            blobs: self.blobs.clone(),
            queue,
        };
        let config = ServiceConfig {
            run: self.run.clone(),
            worker,
        };
        Worker::start(stores, config, engine)
            .await
            .expect("worker starts")
    }

    async fn register(&self, id: &str, k: u32) {
        let metrics = WorkerMetrics::new();
        let r = register_prompt(
            self.state.as_ref(),
            self.ledger.as_ref(),
            &metrics,
            &prompt(id, k),
        )
        .await
        .unwrap();
        assert_eq!(r, Registered::New);
    }

    /// Waits (bounded) until `check` holds of the run's state, naming `what` on a timeout.
    async fn wait_for<F, Fut>(&self, what: &str, check: F)
    where
        F: Fn(Arc<dyn StateStore>) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        testkit::wait_for(DEADLINE, what, || check(self.state.clone())).await
    }

    /// The trajectory's committed segments, decoded from the object store.
    async fn segments(&self, id: &TrajectoryId) -> Vec<Segment> {
        testkit::committed_segments(self.state.as_ref(), &self.blobs, id)
            .await
            .into_iter()
            .map(|(_, s)| s)
            .collect()
    }

    /// What the engine generates for the whole trajectory in one call.
    async fn expected(&self, id: &TrajectoryId) -> Vec<u32> {
        let engine = SimEngine::new(self.sim.clone()).unwrap();
        let target = engine.target_length(id);
        let out = engine
            .generate(SegmentRequest {
                trajectory: id.clone(),
                prompt: vec![1, 2, 3].into(),
                committed: Vec::new().into(),
                max_new_tokens: target,
                max_response_tokens: self.run.rollout.max_response_tokens,
                version: 0,
                sampling: SamplingConfig::default(),
            })
            .await
            .unwrap();
        assert!(out.finish.ends_trajectory());
        out.tokens
    }

    /// Checks a finished trajectory: contiguous segments of at most S tokens, the last one
    /// ending it, tokens equal to the one-shot generation. Returns its segments.
    async fn check_complete(&self, id: &TrajectoryId) -> Vec<Segment> {
        let t = self.state.trajectory(id).await.unwrap().unwrap();
        assert_eq!(t.status, TrajectoryStatus::Finished, "{id}");
        let segments = self.segments(id).await;
        let s = self.run.rollout.segment_tokens as usize;
        for (i, seg) in segments.iter().enumerate() {
            assert_eq!(seg.seq as usize, i);
            assert!(seg.tokens.len() <= s, "segment longer than S");
            assert_eq!(seg.finish.ends_trajectory(), i + 1 == segments.len());
        }
        let tokens: Vec<u32> = segments.iter().flat_map(|s| s.tokens.clone()).collect();
        assert_eq!(tokens, self.expected(id).await, "{id}: tokens differ");
        assert_eq!(t.tokens, tokens.len() as u64);
        segments
    }
}

fn prompt(id: &str, k: u32) -> Prompt {
    Prompt {
        id: PromptId(id.into()),
        input: PromptInput::Tokens(vec![1, 2, 3]),
        verifier: VerifierSpec::ExactMatch {
            answer: "never".into(),
        },
        group_size: k,
        metadata: Default::default(),
    }
}

fn tid(prompt: &str, sample: u32) -> TrajectoryId {
    TrajectoryId {
        prompt: PromptId(prompt.into()),
        sample,
    }
}

fn rollout(mode: RolloutMode, s: u32, budget: u64) -> RolloutConfig {
    RolloutConfig {
        mode,
        version_budget_tokens: budget,
        segment_tokens: s,
        max_response_tokens: 64,
        retention_limit: 4,
        lease_ms: 5_000,
        ..RolloutConfig::default()
    }
}

#[tokio::test]
async fn every_trajectory_is_generated_to_its_end_in_segments() {
    let env = Env::new(
        rollout(RolloutMode::Partial, 4, 100_000),
        LengthDistribution::Uniform { lo: 1, hi: 30 },
    )
    .await;
    for p in ["a", "b", "c"] {
        env.register(p, 3).await;
    }
    env.open_version(0, 100_000, 4).await;
    let worker = env.start("w1", None).await;
    env.wait_for("9 finished trajectories", |state| async move {
        state.counts().await.unwrap().finished == 9
    })
    .await;
    let mut total = 0;
    for p in ["a", "b", "c"] {
        for k in 0..3 {
            let segments = env.check_complete(&tid(p, k)).await;
            total += segments.iter().map(|s| s.tokens.len()).sum::<usize>();
            let t = env.state.trajectory(&tid(p, k)).await.unwrap().unwrap();
            assert_eq!(t.reward, Some(0.0), "exact match against `never` scores 0");
        }
    }
    // Every finished trajectory is on the stream.
    let finished = env
        .state
        .read_finished(Default::default(), 100)
        .await
        .unwrap();
    assert_eq!(finished.len(), 9);
    // The budget was charged exactly the generated tokens (unused reservations refunded).
    let budget = env.state.budget().await.unwrap().unwrap();
    assert_eq!(budget.total - budget.remaining, total as u64);
    // Metrics agree, and the server renders them.
    assert_eq!(worker.metrics.tokens_generated.get(), total as u64);
    assert_eq!(worker.metrics.finished.get(), 9);
    let url = format!("http://{}/metrics", worker.admin_addr.unwrap());
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert!(
        text.contains(&format!("flywheel_worker_tokens_generated_total {total}")),
        "{text}"
    );
    let ready = format!("http://{}/readyz", worker.admin_addr.unwrap());
    assert_eq!(reqwest::get(&ready).await.unwrap().status(), 200);
    assert!(worker.shutdown().await);
    assert_eq!(env.state.counts().await.unwrap().generating, 0);
}

#[tokio::test]
async fn partial_parks_on_a_spent_budget_and_resumes_first_under_the_next_version() {
    // 2 trajectories of 12 tokens each, S = 4, Φ_r = 10: version 0 cannot finish them.
    let env = Env::new(
        rollout(RolloutMode::Partial, 4, 10),
        LengthDistribution::Fixed { tokens: 12 },
    )
    .await;
    env.register("p", 2).await;
    env.open_version(0, 10, 4).await;
    let worker = env.start("w1", None).await;
    env.wait_for(
        "the budget spent with nothing generating",
        |state| async move {
            let c = state.counts().await.unwrap();
            let b = state.budget().await.unwrap().unwrap();
            b.remaining == 0 && c.generating == 0 && c.parked + c.pending == 2
        },
    )
    .await;
    let c = env.state.counts().await.unwrap();
    assert_eq!(c.finished, 0);
    assert!(c.parked >= 1, "{c:?}");
    // Exactly Φ_r tokens were committed under version 0.
    let mut v0_tokens = 0;
    for k in 0..2 {
        for s in env.segments(&tid("p", k)).await {
            assert_eq!(s.version, 0);
            v0_tokens += s.tokens.len();
        }
    }
    assert_eq!(v0_tokens, 10);
    assert!(worker.metrics.budget_waits.get() >= 1);

    // A new prompt registered now must wait behind the parked ones.
    env.register("q", 1).await;
    env.open_version(1, 100, 4).await;
    env.wait_for("3 finished trajectories", |state| async move {
        state.counts().await.unwrap().finished == 3
    })
    .await;
    for k in 0..2 {
        let segments = env.check_complete(&tid("p", k)).await;
        // Versions never go back, and the parked one was continued by version 1.
        assert!(segments.windows(2).all(|w| w[0].version <= w[1].version));
        assert_eq!(segments.last().unwrap().version, 1);
    }
    env.check_complete(&tid("q", 0)).await;
    assert!(worker.metrics.resumed.get() >= 1);
    assert!(worker.metrics.parked.get() >= 1);
    assert!(worker.shutdown().await);
}

#[tokio::test]
async fn sync_runs_a_started_trajectory_to_its_end_and_holds_back_new_ones() {
    let env = Env::new(
        rollout(RolloutMode::Sync, 4, 4),
        LengthDistribution::Fixed { tokens: 12 },
    )
    .await;
    env.register("p", 2).await;
    env.open_version(0, 4, 4).await;
    let worker = env.start("w1", None).await;
    env.wait_for("one finished and one waiting", |state| async move {
        let c = state.counts().await.unwrap();
        c.finished == 1 && c.pending == 1 && c.generating == 0
    })
    .await;
    let c = env.state.counts().await.unwrap();
    assert_eq!(c.parked, 0, "sync never parks");
    env.open_version(1, 4, 4).await;
    env.wait_for("both finished", |state| async move {
        state.counts().await.unwrap().finished == 2
    })
    .await;
    // Each trajectory ran entirely under the version it started with.
    let mut versions = Vec::new();
    for k in 0..2 {
        let segments = env.check_complete(&tid("p", k)).await;
        let v = segments[0].version;
        assert!(segments.iter().all(|s| s.version == v));
        versions.push(v);
    }
    versions.sort();
    assert_eq!(versions, vec![0, 1]);
    assert!(worker.shutdown().await);
}

/// `async`: a started trajectory runs to its end past the spent budget; starting new ones
/// waits for budget (a newer version's).
#[tokio::test]
async fn async_started_trajectories_never_wait_and_new_ones_wait_for_budget() {
    let env = Env::new(
        rollout(RolloutMode::Async, 4, 4),
        LengthDistribution::Fixed { tokens: 12 },
    )
    .await;
    env.register("p", 3).await;
    env.open_version(0, 4, 4).await;
    let worker = env.start("w1", None).await;
    env.wait_for("1 finished past the budget", |state| async move {
        state.counts().await.unwrap().finished == 1
    })
    .await;
    let metrics = worker.metrics.clone();
    testkit::wait_for(DEADLINE, "a slot waiting for budget", || {
        let m = metrics.clone();
        async move { m.budget_waits.get() > 0 }
    })
    .await;
    let c = env.state.counts().await.unwrap();
    assert_eq!((c.finished, c.pending), (1, 2), "{c:?}");
    env.open_version(1, 100, 4).await;
    env.wait_for("3 finished", |state| async move {
        state.counts().await.unwrap().finished == 3
    })
    .await;
    for k in 0..3 {
        env.check_complete(&tid("p", k)).await;
    }
    assert!(worker.shutdown().await);
}

#[tokio::test]
async fn a_stolen_trajectory_resumes_from_its_last_committed_segment_and_fences_the_old_holder() {
    let env = Env::new(
        rollout(RolloutMode::Partial, 4, 1000),
        LengthDistribution::Fixed { tokens: 14 },
    )
    .await;
    env.register("p", 1).await;
    env.open_version(0, 1000, 4).await;
    let id = tid("p", 0);
    // A "dead" worker claims it with a short lease and commits one segment.
    let claim = env
        .state
        .claim(&id, "ghost", Duration::from_millis(150))
        .await
        .unwrap();
    let ghost_epoch = claim.lease().epoch;
    let expected = env.expected(&id).await;
    let first = Segment {
        trajectory: id.clone(),
        seq: 0,
        version: 0,
        lease_epoch: ghost_epoch,
        tokens: expected[..4].to_vec(),
        logprobs: vec![-0.5; 4],
        finish: FinishReason::None,
    };
    let key = keys::segment(env.state.run_id(), &id.prompt, 0, 0, ghost_epoch);
    env.blobs
        .put(&key, codec::encode(&first).unwrap())
        .await
        .unwrap();
    let r = SegmentRef {
        seq: 0,
        key,
        tokens: 4,
        version: 0,
    };
    env.state
        .commit_segment(&id, "ghost", ghost_epoch, &r, Duration::from_millis(150))
        .await
        .unwrap();
    // The ghost dies; its lease expires; the worker steals and finishes it.
    let worker = env.start("w1", None).await;
    env.wait_for("the stolen trajectory finished", |state| async move {
        state.counts().await.unwrap().finished == 1
    })
    .await;
    let segments = env.check_complete(&id).await;
    assert_eq!(segments[0].lease_epoch, ghost_epoch);
    assert!(segments[1..].iter().all(|s| s.lease_epoch > ghost_epoch));
    assert_eq!(worker.metrics.lease_steals.get(), 1);
    // The ghost wakes up and tries to commit its next segment: fenced out.
    let late = SegmentRef {
        seq: 1,
        key: keys::segment(env.state.run_id(), &id.prompt, 0, 1, ghost_epoch),
        tokens: 4,
        version: 0,
    };
    let err = env
        .state
        .commit_segment(&id, "ghost", ghost_epoch, &late, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("rejected"), "{err}");
    assert!(worker.shutdown().await);
}

#[tokio::test]
async fn shutdown_releases_every_lease_and_parks_what_has_segments() {
    let mut env = Env::new(
        rollout(RolloutMode::Partial, 4, 100_000),
        LengthDistribution::Fixed { tokens: 60 },
    )
    .await;
    // Slow decoding so that trajectories are mid-generation when shutdown comes.
    env.sim.decode_tokens_per_s = 200.0;
    env.register("p", 4).await;
    env.open_version(0, 100_000, 4).await;
    let worker = env.start("w1", None).await;
    let metrics = worker.metrics.clone();
    testkit::wait_for(DEADLINE, "a few committed segments", || {
        let n = metrics.segments_committed.get();
        async move { n >= 6 }
    })
    .await;
    assert!(worker.shutdown().await, "stopped within the grace period");
    let c = env.state.counts().await.unwrap();
    assert_eq!(c.generating, 0, "every lease released: {c:?}");
    assert!(c.parked >= 1, "{c:?}");
    // Another worker finishes everything from where the first stopped.
    env.sim.decode_tokens_per_s = 0.0;
    let second = env.start("w2", None).await;
    env.wait_for("4 finished", |state| async move {
        state.counts().await.unwrap().finished == 4
    })
    .await;
    for k in 0..4 {
        env.check_complete(&tid("p", k)).await;
    }
    assert!(second.metrics.resumed.get() >= 1);
    assert!(second.shutdown().await);
}

#[tokio::test]
async fn redelivered_prompts_register_nothing_twice_and_malformed_ones_are_dead_lettered() {
    let kafka = EmbeddedKafka::start(1).unwrap();
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let config = KafkaConfig {
        brokers: kafka.bootstrap_servers(),
        topic: format!("prompts-{tag}"),
        group_id: format!("g-{tag}"),
        session_timeout_ms: 6_000,
        auto_commit_interval_ms: 100,
        max_message_bytes: 4096,
        max_group_size: 16,
        ..KafkaConfig::default()
    };
    kafka.create_topics(&config, 1).unwrap();
    let env = Env::new(
        rollout(RolloutMode::Partial, 4, 100_000),
        LengthDistribution::Fixed { tokens: 5 },
    )
    .await;
    let producer = PromptProducer::new(&config).unwrap();
    producer.send(&prompt("p1", 2)).await.unwrap();
    producer
        .send_raw(Some(b"bad".as_slice()), b"{not json")
        .await
        .unwrap();
    producer.send(&prompt("p2", 3)).await.unwrap();
    // K above kafka.max_group_size (the producer refuses it, so send the raw JSON).
    let big = serde_json::to_vec(&prompt("big", 99)).unwrap();
    producer
        .send_raw(Some(b"big".as_slice()), &big)
        .await
        .unwrap();

    // A first member registers p1 but dies before acknowledging it.
    let first = PromptConsumer::new(&config).unwrap();
    let delivery = tokio::time::timeout(DEADLINE, first.recv())
        .await
        .expect("first delivery")
        .unwrap();
    assert_eq!(delivery.prompt.id.0, "p1");
    register_prompt(
        env.state.as_ref(),
        env.ledger.as_ref(),
        &WorkerMetrics::new(),
        &delivery.prompt,
    )
    .await
    .unwrap();
    drop(delivery);
    drop(first);

    // The worker's intake gets p1 again (registered nothing twice) and p2; the malformed and
    // oversized messages go to the DLQ while it keeps running.
    env.open_version(0, 100_000, 4).await;
    let worker = env.start("w1", Some(config.clone())).await;
    let metrics = worker.metrics.clone();
    testkit::wait_for(DEADLINE, "p1 redelivered and p2 registered", || {
        let m = metrics.clone();
        async move { m.prompts_redelivered.get() == 1 && m.prompts_registered.get() == 1 }
    })
    .await;
    env.wait_for("5 finished", |state| async move {
        state.counts().await.unwrap().finished == 5
    })
    .await;
    let c = env.state.counts().await.unwrap();
    assert_eq!(c.prompts, 2);
    assert_eq!(c.finished, 5, "2 + 3 trajectories, none twice");
    // The ledger accounts for every message read: the two prompts, and the two rejected ones
    // as dropped (the undecodable one under where it was read).
    let run = env.state.run_id();
    testkit::wait_for(DEADLINE, "both rejections recorded", || {
        let ledger = env.ledger.clone();
        async move { ledger.prompt_counts(run).await.unwrap().dropped == 2 }
    })
    .await;
    let counts = env.ledger.prompt_counts(run).await.unwrap();
    assert_eq!((counts.total(), counts.dropped), (4, 2));
    for id in [format!("kafka:{}/0/1", config.topic), "big".to_owned()] {
        let status = env
            .ledger
            .prompt_status(run, &PromptId(id.clone()))
            .await
            .unwrap();
        assert!(
            matches!(
                status,
                Some(PromptStatus::Dropped {
                    reason: DropReason::Malformed,
                    ..
                })
            ),
            "{id}: {status:?}"
        );
    }
    // Both dead letters are in the DLQ, and the group's offset moves past every message
    // (the intake is still running: `big` may come after p2's trajectories finished).
    wait_for_dlq_and_offset(&config, 2, 4).await;
    assert!(worker.shutdown().await);
}

/// A dead worker's trajectory is not taken while the version's budget is spent (the
/// coordinator does not wait for it); it resumes under the next version, and every
/// trajectory ends.
#[tokio::test]
async fn a_dead_workers_trajectory_resumes_under_the_next_version() {
    let env = Env::new(
        rollout(RolloutMode::Partial, 4, 4),
        LengthDistribution::Fixed { tokens: 12 },
    )
    .await;
    env.register("p", 3).await;
    env.open_version(0, 4, 4).await;
    let ghost = env
        .state
        .claim(&tid("p", 0), "ghost", Duration::from_millis(1500))
        .await
        .unwrap();
    let worker = env.start("w1", None).await;
    env.wait_for(
        "the budget spent and the ghost's lease expired",
        |state| async move {
            let c = state.counts().await.unwrap();
            let b = state.budget().await.unwrap().unwrap();
            b.remaining == 0 && c.lease_expired == 1
        },
    )
    .await;
    env.open_version(1, 1000, 4).await;
    env.wait_for("3 finished", |state| async move {
        state.counts().await.unwrap().finished == 3
    })
    .await;
    let t = env.state.trajectory(&tid("p", 0)).await.unwrap().unwrap();
    assert!(
        t.lease.unwrap().epoch > ghost.lease().epoch,
        "taken from the ghost"
    );
    assert!(worker.metrics.lease_steals.get() >= 1);
    for k in 0..3 {
        env.check_complete(&tid("p", k)).await;
    }
    assert!(worker.shutdown().await);
}

/// The sim engine, except that every segment of `poison`'s trajectories fails with `error`.
struct Poisoned {
    inner: SimEngine,
    poison: PromptId,
    error: fn() -> EngineError,
    /// Calls for the poisoned prompt.
    poisoned_calls: std::sync::atomic::AtomicU64,
}

#[async_trait::async_trait]
impl Engine for Poisoned {
    fn name(&self) -> &str {
        "poisoned"
    }

    fn slots(&self) -> usize {
        self.inner.slots()
    }

    async fn generate(&self, req: SegmentRequest) -> Result<SegmentOutput, EngineError> {
        if req.trajectory.prompt == self.poison {
            self.poisoned_calls
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err((self.error)());
        }
        self.inner.generate(req).await
    }

    async fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.inner.tokenize(text).await
    }

    async fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError> {
        self.inner.detokenize(tokens).await
    }
}

impl Env {
    /// A worker whose engine fails every segment of `poison` with `error`.
    async fn start_poisoned(
        &self,
        id: &str,
        poison: &str,
        error: fn() -> EngineError,
    ) -> (Worker, Arc<Poisoned>) {
        let engine = Arc::new(Poisoned {
            inner: SimEngine::new(self.sim.clone()).unwrap(),
            poison: PromptId(poison.into()),
            error,
            poisoned_calls: Default::default(),
        });
        let stores = RunStores {
            run_id: self.run.storage.run_id.clone(),
            state: self.state.clone(),
            ledger: self.ledger.clone(),
            blobs: self.blobs.clone(),
            queue: None,
        };
        let config = ServiceConfig {
            run: self.run.clone(),
            worker: self.worker_config(id),
        };
        let worker = Worker::start(stores, config, engine.clone())
            .await
            .expect("worker starts");
        (worker, engine)
    }

    /// The give-up entries of the finished stream.
    async fn give_ups(&self) -> Vec<(TrajectoryId, GiveUp)> {
        self.state
            .read_finished(StreamCursor::START, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|e| Some((e.trajectory, e.gave_up?)))
            .collect()
    }
}

fn rejected() -> EngineError {
    EngineError::Rejected {
        engine: "poisoned".into(),
        status: 400,
        message: "prompt too long for this model".into(),
    }
}

fn unavailable() -> EngineError {
    EngineError::Unavailable {
        engine: "poisoned".into(),
        message: "connection refused".into(),
    }
}

/// An engine error that cannot pass gives up after `max_failures` attempts (over every claim):
/// the trajectory is dropped with a give-up entry for the coordinator, and the engine is
/// never called for it again. Other prompts are not held up.
#[tokio::test]
async fn a_prompt_the_engine_rejects_gives_up_after_the_bounded_attempts() {
    let mut rollout = rollout(RolloutMode::Partial, 4, 100_000);
    (rollout.max_failures, rollout.max_transient_failures) = (3, 7);
    let env = Env::new(rollout, LengthDistribution::Fixed { tokens: 9 }).await;
    env.register("poison", 2).await;
    env.register("fine", 2).await;
    env.open_version(0, 100_000, 4).await;
    let (worker, engine) = env.start_poisoned("w1", "poison", rejected).await;
    env.wait_for(
        "both poisoned trajectories gave up, the others finished",
        |state| async move {
            let c = state.counts().await.unwrap();
            c.dropped == 2 && c.finished == 2
        },
    )
    .await;
    for k in 0..2 {
        let t = env
            .state
            .trajectory(&tid("poison", k))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((t.status, t.failures), (TrajectoryStatus::Dropped, 3));
        env.check_complete(&tid("fine", k)).await;
    }
    let give_ups = env.give_ups().await;
    assert_eq!(give_ups.len(), 2);
    for (id, g) in give_ups {
        assert_eq!(
            (id.prompt.0.as_str(), g.reason),
            ("poison", DropReason::GenerationFailed)
        );
        assert!(g.detail.contains("prompt too long"), "{}", g.detail);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        engine
            .poisoned_calls
            .load(std::sync::atomic::Ordering::SeqCst),
        6,
        "three attempts per trajectory, then never again"
    );
    assert_eq!(
        worker
            .metrics
            .attempt_failures
            .with_label_values(&["permanent"])
            .get(),
        6
    );
    assert!(worker.shutdown().await);
}

/// An error that may pass (the engine unavailable) is retried up to the larger
/// `max_transient_failures`, then the trajectory gives up too.
#[tokio::test]
async fn an_engine_that_stays_unavailable_for_a_prompt_gives_up_at_the_transient_bound() {
    let mut rollout = rollout(RolloutMode::Partial, 4, 100_000);
    (rollout.max_failures, rollout.max_transient_failures) = (2, 5);
    let env = Env::new(rollout, LengthDistribution::Fixed { tokens: 9 }).await;
    env.register("poison", 1).await;
    env.open_version(0, 100_000, 4).await;
    let (worker, engine) = env.start_poisoned("w1", "poison", unavailable).await;
    env.wait_for("the trajectory gave up", |state| async move {
        state.counts().await.unwrap().dropped == 1
    })
    .await;
    let t = env
        .state
        .trajectory(&tid("poison", 0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.failures, 5);
    assert_eq!(
        engine
            .poisoned_calls
            .load(std::sync::atomic::Ordering::SeqCst),
        5
    );
    assert_eq!(
        worker
            .metrics
            .trajectories_given_up
            .with_label_values(&["generation_failed"])
            .get(),
        1
    );
    assert!(worker.shutdown().await);
}

/// A committed segment that is corrupt (or missing) when a trajectory is resumed sends it back
/// to its last good segment: it is generated on from there, and ends as if nothing happened.
#[tokio::test]
async fn an_unusable_committed_segment_is_regenerated_from_the_last_good_one() {
    let env = Env::new(
        rollout(RolloutMode::Partial, 4, 100_000),
        LengthDistribution::Fixed { tokens: 14 },
    )
    .await;
    env.register("p", 2).await;
    env.open_version(0, 100_000, 4).await;
    let lease = Duration::from_millis(150);
    // A dead worker committed two segments of p#0 (the second's object is corrupt) and one of
    // p#1 (its object is gone).
    for (k, segments) in [(0u32, 2u32), (1, 1)] {
        let id = tid("p", k);
        let epoch = env
            .state
            .claim(&id, "ghost", lease)
            .await
            .unwrap()
            .lease()
            .epoch;
        let expected = env.expected(&id).await;
        for seq in 0..segments {
            let start = seq as usize * 4;
            let segment = Segment {
                trajectory: id.clone(),
                seq,
                version: 0,
                lease_epoch: epoch,
                tokens: expected[start..start + 4].to_vec(),
                logprobs: vec![-0.5; 4],
                finish: FinishReason::None,
            };
            let key = keys::segment(env.state.run_id(), &id.prompt, k, seq, epoch);
            let body = match (k, seq) {
                (0, 1) => b"not a segment".to_vec().into(),
                _ => codec::encode(&segment).unwrap(),
            };
            if k == 0 {
                env.blobs.put(&key, body).await.unwrap();
            }
            let r = SegmentRef {
                seq,
                key,
                tokens: 4,
                version: 0,
            };
            env.state
                .commit_segment(&id, "ghost", epoch, &r, lease)
                .await
                .unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let worker = env.start("w1", None).await;
    env.wait_for("both finished", |state| async move {
        state.counts().await.unwrap().finished == 2
    })
    .await;
    for k in 0..2 {
        env.check_complete(&tid("p", k)).await;
    }
    assert_eq!(worker.metrics.segments_unusable.get(), 2);
    assert!(worker.shutdown().await);
}

/// `async`: a trajectory found more than η versions behind gives up (`lag_exceeded`) as soon
/// as it is claimed, and the worker's other slots go on with the rest.
#[tokio::test]
async fn async_a_trajectory_past_the_lag_bound_gives_up_and_the_rest_goes_on() {
    let mut rollout = rollout(RolloutMode::Async, 4, 100_000);
    rollout.max_lag = 1;
    let env = Env::new(rollout, LengthDistribution::Fixed { tokens: 12 }).await;
    env.register("old", 1).await;
    env.register("new", 2).await;
    env.open_version(0, 100_000, 8).await;
    let id = tid("old", 0);
    let lease = Duration::from_millis(150);
    let epoch = env
        .state
        .claim(&id, "ghost", lease)
        .await
        .unwrap()
        .lease()
        .epoch;
    let expected = env.expected(&id).await;
    let segment = Segment {
        trajectory: id.clone(),
        seq: 0,
        version: 0,
        lease_epoch: epoch,
        tokens: expected[..4].to_vec(),
        logprobs: vec![-0.5; 4],
        finish: FinishReason::None,
    };
    let key = keys::segment(env.state.run_id(), &id.prompt, 0, 0, epoch);
    env.blobs
        .put(&key, codec::encode(&segment).unwrap())
        .await
        .unwrap();
    let r = SegmentRef {
        seq: 0,
        key,
        tokens: 4,
        version: 0,
    };
    env.state
        .commit_segment(&id, "ghost", epoch, &r, lease)
        .await
        .unwrap();
    for v in 1..=3 {
        env.open_version(v, 100_000, 8).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let worker = env.start("w1", None).await;
    env.wait_for("old gave up, new finished", |state| async move {
        let c = state.counts().await.unwrap();
        c.dropped == 1 && c.finished == 2
    })
    .await;
    let give_ups = env.give_ups().await;
    assert_eq!(give_ups.len(), 1);
    assert_eq!(give_ups[0].1.reason, DropReason::LagExceeded);
    for k in 0..2 {
        env.check_complete(&tid("new", k)).await;
    }
    assert!(worker.shutdown().await);
}

/// `sync`: a trajectory parked by a stopping worker is finished under the version it started
/// in, even though the budget is spent (it never spans two versions).
#[tokio::test]
async fn sync_a_parked_trajectory_finishes_under_its_version_past_the_spent_budget() {
    let env = Env::new(
        rollout(RolloutMode::Sync, 4, 4),
        LengthDistribution::Fixed { tokens: 12 },
    )
    .await;
    env.register("p", 1).await;
    env.open_version(0, 4, 4).await;
    let id = tid("p", 0);
    let epoch = env
        .state
        .claim(&id, "stopping", DEADLINE)
        .await
        .unwrap()
        .lease()
        .epoch;
    let expected = env.expected(&id).await;
    let segment = Segment {
        trajectory: id.clone(),
        seq: 0,
        version: 0,
        lease_epoch: epoch,
        tokens: expected[..4].to_vec(),
        logprobs: vec![-0.5; 4],
        finish: FinishReason::None,
    };
    let key = keys::segment(env.state.run_id(), &id.prompt, 0, 0, epoch);
    env.blobs
        .put(&key, codec::encode(&segment).unwrap())
        .await
        .unwrap();
    let r = SegmentRef {
        seq: 0,
        key,
        tokens: 4,
        version: 0,
    };
    assert_eq!(
        env.state.reserve(0, 4).await.unwrap(),
        4,
        "the budget is spent"
    );
    env.state
        .commit_segment(&id, "stopping", epoch, &r, DEADLINE)
        .await
        .unwrap();
    assert_eq!(
        env.state.release(&id, "stopping", epoch).await.unwrap(),
        TrajectoryStatus::Parked
    );
    let worker = env.start("w1", None).await;
    env.wait_for("finished", |state| async move {
        state.counts().await.unwrap().finished == 1
    })
    .await;
    let segments = env.check_complete(&id).await;
    assert!(segments.iter().all(|s| s.version == 0), "one version");
    assert!(worker.shutdown().await);
}

/// Waits (bounded) until `config`'s DLQ holds `dead_letters` messages and its group has
/// committed `offset` on partition 0 of the prompt topic.
async fn wait_for_dlq_and_offset(config: &KafkaConfig, dead_letters: i64, offset: i64) {
    let what = format!("the DLQ holds {dead_letters} messages and offset {offset} is committed");
    testkit::wait_for(DEADLINE, &what, || {
        let (brokers, dlq, topic, group) = (
            config.brokers.clone(),
            config.dlq_topic(),
            config.topic.clone(),
            config.group_id.clone(),
        );
        async move {
            tokio::task::spawn_blocking(move || {
                use rdkafka::consumer::{BaseConsumer, Consumer};
                let c: BaseConsumer = rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .set("group.id", &group)
                    .create()
                    .unwrap();
                let (_, high) = c
                    .fetch_watermarks(&dlq, 0, Duration::from_secs(10))
                    .unwrap();
                let mut tpl = rdkafka::TopicPartitionList::new();
                tpl.add_partition(&topic, 0);
                let committed = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
                high == dead_letters
                    && committed.elements()[0].offset() == rdkafka::Offset::Offset(offset)
            })
            .await
            .unwrap()
        }
    })
    .await;
}

/// Where a Kafka test runs: librdkafka's mock cluster, or the real broker of the test
/// services (`FLYWHEEL_TEST_KAFKA_BROKERS`).
enum Queue {
    Embedded(EmbeddedKafka),
    Broker(String),
}

impl Queue {
    fn embedded() -> Queue {
        Queue::Embedded(EmbeddedKafka::start(1).unwrap())
    }

    fn broker() -> Queue {
        Queue::Broker(testkit::kafka_brokers())
    }

    /// A Kafka config for a fresh topic and group, with the topic (and its DLQ) created.
    async fn fresh_topic(&self) -> KafkaConfig {
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..10];
        let brokers = match self {
            Queue::Embedded(kafka) => kafka.bootstrap_servers(),
            Queue::Broker(brokers) => brokers.clone(),
        };
        let config = KafkaConfig {
            brokers,
            topic: format!("prompts-{tag}"),
            group_id: format!("g-{tag}"),
            session_timeout_ms: 6_000,
            auto_commit_interval_ms: 100,
            max_message_bytes: 4096,
            max_group_size: 16,
            ..KafkaConfig::default()
        };
        match self {
            Queue::Embedded(kafka) => kafka.create_topics(&config, 1).unwrap(),
            Queue::Broker(brokers) => ensure_topics(&config, 1, 1)
                .await
                .unwrap_or_else(|e| panic!("creating a topic on the broker at {brokers}: {e}")),
        }
        config
    }
}

/// The ledger status of prompt `id`, for assertions.
async fn drop_of(env: &Env, id: &str) -> Option<(DropReason, String)> {
    match env
        .ledger
        .prompt_status(env.state.run_id(), &PromptId(id.into()))
        .await
        .unwrap()
    {
        Some(PromptStatus::Dropped { reason, detail }) => Some((reason, detail)),
        _ => None,
    }
}

/// The intake checks each prompt against what will run it: token ids outside the engine's
/// vocabulary, a reward service the config does not define and an id that cannot name an
/// object are refused before the run accepts them: dead-lettered, recorded dropped in the
/// ledger with the reason, acknowledged. The valid prompt beside them runs.
#[tokio::test]
async fn prompts_that_cannot_run_are_rejected_at_intake_and_recorded() {
    rejected_at_intake(Queue::embedded()).await;
}

#[tokio::test]
async fn prompts_that_cannot_run_are_rejected_at_intake_and_recorded_on_the_broker() {
    rejected_at_intake(Queue::broker()).await;
}

async fn rejected_at_intake(queue: Queue) {
    let config = queue.fresh_topic().await;
    let env = Env::new(
        rollout(RolloutMode::Partial, 4, 100_000),
        LengthDistribution::Fixed { tokens: 5 },
    )
    .await;
    let producer = PromptProducer::new(&config).unwrap();
    let mut out_of_vocabulary = prompt("tokens", 1);
    out_of_vocabulary.input = PromptInput::Tokens(vec![1, 40_000]);
    producer.send(&out_of_vocabulary).await.unwrap();
    let mut unknown_service = prompt("service", 1);
    unknown_service.verifier = VerifierSpec::Service {
        name: "nowhere".into(),
    };
    producer.send(&unknown_service).await.unwrap();
    // The producer refuses a bad id, so send the raw JSON.
    let bad_id = serde_json::to_vec(&prompt("../escape", 1)).unwrap();
    producer.send_raw(None, &bad_id).await.unwrap();
    producer.send(&prompt("fine", 2)).await.unwrap();

    env.open_version(0, 100_000, 4).await;
    let worker = env.start("w1", Some(config.clone())).await;
    env.wait_for("the valid prompt finished", |state| async move {
        state.counts().await.unwrap().finished == 2
    })
    .await;
    wait_for_dlq_and_offset(&config, 3, 4).await;
    let (reason, detail) = drop_of(&env, "tokens").await.expect("recorded");
    assert_eq!(reason, DropReason::Malformed);
    assert!(detail.contains("token id 40000"), "{detail}");
    let (reason, detail) = drop_of(&env, "service").await.expect("recorded");
    assert_eq!(reason, DropReason::Malformed);
    assert!(detail.contains("nowhere"), "{detail}");
    let (reason, detail) = drop_of(&env, &format!("kafka:{}/0/2", config.topic))
        .await
        .expect("recorded under where it was read");
    assert_eq!(reason, DropReason::Malformed);
    assert!(detail.contains("invalid field id"), "{detail}");
    assert_eq!(
        env.state.counts().await.unwrap().prompts,
        1,
        "only `fine` registered"
    );
    let rejected = &worker.metrics.prompts_rejected;
    assert_eq!(rejected.with_label_values(&["malformed"]).get(), 3);
    assert!(worker.shutdown().await);
}

/// A dead letter that cannot be written (here: larger than the producer accepts) is retried a
/// bounded number of times and then given up: the rejection is still recorded in the ledger,
/// and the partition's offset moves past it, so the prompts behind it run.
#[tokio::test]
async fn an_unwritable_dead_letter_does_not_pin_its_partition() {
    unwritable_dead_letter(Queue::embedded()).await;
}

#[tokio::test]
async fn an_unwritable_dead_letter_does_not_pin_its_partition_on_the_broker() {
    unwritable_dead_letter(Queue::broker()).await;
}

async fn unwritable_dead_letter(queue: Queue) {
    let sender = queue.fresh_topic().await;
    let mut config = sender.clone();
    config.max_message_bytes = 1500;
    config
        .librdkafka
        .insert("message.max.bytes".into(), "2000".into());
    let env = Env::new(
        rollout(RolloutMode::Partial, 4, 100_000),
        LengthDistribution::Fixed { tokens: 5 },
    )
    .await;
    let producer = PromptProducer::new(&sender).unwrap();
    let mut huge = prompt("huge", 1);
    huge.metadata.insert("padding".into(), "x".repeat(3000));
    producer
        .send_raw(
            Some(b"huge".as_slice()),
            &serde_json::to_vec(&huge).unwrap(),
        )
        .await
        .unwrap();
    producer.send(&prompt("behind", 1)).await.unwrap();
    env.open_version(0, 100_000, 4).await;
    let worker = env.start("w1", Some(config.clone())).await;
    env.wait_for("the prompt behind it finished", |state| async move {
        state.counts().await.unwrap().finished == 1
    })
    .await;
    wait_for_dlq_and_offset(&config, 0, 2).await;
    let (reason, _) = drop_of(&env, "huge").await.expect("recorded");
    assert_eq!(reason, DropReason::Oversized);
    assert_eq!(worker.metrics.dead_letters_lost.get(), 1);
    assert!(worker.shutdown().await);
}
