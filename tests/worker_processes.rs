//! Two real `flywheel worker` processes against the real services (DESIGN.md §6.2): Redis (`FLYWHEEL_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`), PostgreSQL
//! (`FLYWHEEL_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`), a
//! Kafka broker (`FLYWHEEL_TEST_KAFKA_BROKERS`, default `127.0.0.1:9092`) and an S3 server
//! (`FLYWHEEL_TEST_S3_ENDPOINT`, default `http://127.0.0.1:8014`, bucket `flywheel-test`,
//! key `flywheel` / `flywheel-secret`). `scripts/services.sh` starts them all; an unreachable
//! one fails the test, naming it.
//!
//! The test plays the coordinator (it opens version 0) and the ingest (it sends prompts).
//! With the deterministic `sim` engine, every trajectory's tokens are known in advance, so
//! "continued from the last committed segment, nothing duplicated" is checked exactly:
//!
//! - SIGTERM: the worker exits successfully (its exit status says it stopped within the grace
//!   period) holding no lease; the other worker finishes everything.
//! - `kill -9`: the other worker claims the dead one's leases once they expire and continues
//!   each trajectory from its last committed segment: the committed prefix is kept as it was
//!   (same objects, same epoch), the rest comes under newer epochs, and the tokens equal the
//!   one-shot generation.
//!
//! Waits are bounded by a generous deadline; nothing asserts on durations.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::{Processes, metric, stores_toml};
use flywheel_storage::blob::BlobStore;
use flywheel_storage::ledger::conformance::TestLedger;
use flywheel_storage::queue::{KafkaConfig, PromptProducer, ensure_topics};
use flywheel_storage::state::{RedisStateStore, StateStore};
use flywheel_storage::testkit::{self, free_port};
use flywheel_storage::{
    Prompt, PromptId, PromptInput, Segment, TrajectoryId, TrajectoryStatus, VerifierSpec,
};
use flywheel_worker::engine::sim::{LengthDistribution, SimConfig, SimEngine};
use flywheel_worker::engine::{Engine, SamplingConfig, SegmentRequest};

const DEADLINE: Duration = Duration::from_secs(180);

/// One test run on the real services.
struct Run {
    /// Keeps the fresh schema's connection (a failed run leaves its `flywheel_test_*` schema).
    _ledger: TestLedger,
    dir: tempfile::TempDir,
    procs: Processes,
    state: RedisStateStore,
    blobs: BlobStore,
    kafka: KafkaConfig,
    sim: SimConfig,
    config_base: String,
}

impl Run {
    async fn new(tag: &str, lease_ms: u64, sim: SimConfig) -> Run {
        let LengthDistribution::Uniform { lo, hi } = sim.lengths else {
            panic!("these tests use uniform lengths");
        };
        let brokers = testkit::kafka_brokers();
        let s3 = testkit::S3Server::from_env();
        let run_id = format!("wp-{tag}-{:012x}", rand::random::<u64>() >> 16);
        let state = testkit::redis_state(&run_id).await;
        // A fresh schema (FLYWHEEL_TEST_POSTGRES_URL): the run never depends on, or changes,
        // what other runs migrated. Panics naming PostgreSQL when it is unreachable.
        let test_ledger = TestLedger::postgres().await;
        let postgres = test_ledger.url().to_owned();
        test_ledger
            .ledger()
            .create_run(&run_id, &serde_json::json!({"test": tag}))
            .await
            .unwrap();
        let blob_url = s3.url(&run_id);
        let blobs = BlobStore::open(&blob_url).unwrap();
        let kafka = KafkaConfig {
            brokers: brokers.clone(),
            topic: format!("{run_id}.prompts"),
            group_id: format!("{run_id}.workers"),
            session_timeout_ms: 6_000,
            auto_commit_interval_ms: 200,
            ..KafkaConfig::default()
        };
        ensure_topics(&kafka, 2, 1)
            .await
            .expect("create the topics");
        let config_base = format!(
            r#"{stores}
[rollout]
mode = "partial"
version_budget_tokens = 10000000
segment_tokens = 8
max_response_tokens = 512
lease_ms = {lease_ms}

[worker]
grace_period_ms = 20000
poll_interval_ms = 50

[worker.engine]
kind = "sim"
seed = {seed}
slots = {slots}
decode_tokens_per_s = {rate:?}
lengths = {{ kind = "uniform", lo = {lo}, hi = {hi} }}
"#,
            stores = stores_toml(
                &run_id,
                &blob_url,
                &postgres,
                "session_timeout_ms = 6000\nauto_commit_interval_ms = 200",
            ),
            seed = sim.seed,
            slots = sim.slots,
            rate = sim.decode_tokens_per_s,
        );
        let dir = tempfile::tempdir().unwrap();
        Run {
            _ledger: test_ledger,
            procs: Processes::new(dir.path()),
            dir,
            state,
            blobs,
            kafka,
            sim,
            config_base,
        }
    }

    /// Starts `flywheel worker` with id `id`; returns its admin address.
    fn spawn(&mut self, id: &str) -> String {
        let addr = format!("127.0.0.1:{}", free_port());
        let config: PathBuf = self.dir.path().join(format!("{id}.toml"));
        std::fs::write(&config, &self.config_base).unwrap();
        let args = ["worker", "--config", config.to_str().unwrap()];
        let env = [
            ("FLYWHEEL_WORKER__ID", id.to_owned()),
            ("FLYWHEEL_WORKER__METRICS_ADDR", addr.clone()),
        ];
        self.procs.spawn(id, &args, &env);
        addr
    }

    /// Waits for worker `id` to exit, bounded by the deadline.
    async fn wait_exit(&mut self, id: &str) -> std::process::ExitStatus {
        self.procs.wait_exit(id, DEADLINE).await
    }

    async fn send_prompts(&self, n: usize, k: u32) -> Vec<TrajectoryId> {
        let producer = PromptProducer::new(&self.kafka).unwrap();
        let mut ids = Vec::new();
        for i in 0..n {
            let p = Prompt {
                id: PromptId(format!("p{i}")),
                input: PromptInput::Text(format!("prompt {i}")),
                verifier: VerifierSpec::Math {
                    answer: "42".into(),
                },
                group_size: k,
                metadata: Default::default(),
            };
            producer.send(&p).await.unwrap();
            ids.extend(p.trajectory_ids());
        }
        ids
    }

    async fn segments(&self, id: &TrajectoryId) -> Vec<(String, Segment)> {
        testkit::committed_segments(&self.state, &self.blobs, id)
            .await
            .into_iter()
            .map(|(r, s)| (r.key, s))
            .collect()
    }

    /// Stops worker `id` with SIGTERM, checks it exits cleanly and deletes the run's state.
    async fn finish(&mut self, id: &str) {
        self.procs.sigterm(id);
        let status = self.wait_exit(id).await;
        assert!(status.success(), "{id}: {status}\n{}", self.procs.log(id));
        self.state.delete_run().await.unwrap();
    }

    /// The whole trajectory generated in one engine call.
    async fn expected(&self, id: &TrajectoryId, prompt: &str) -> Vec<u32> {
        let engine = SimEngine::new(SimConfig {
            decode_tokens_per_s: 0.0,
            ..self.sim.clone()
        })
        .unwrap();
        let out = engine
            .generate(SegmentRequest {
                trajectory: id.clone(),
                prompt: engine.tokenize(prompt).await.unwrap().into(),
                committed: Vec::new().into(),
                max_new_tokens: engine.target_length(id),
                max_response_tokens: 512,
                version: 0,
                sampling: SamplingConfig::default(),
            })
            .await
            .unwrap();
        out.tokens
    }

    /// Every trajectory finished, its segments contiguous, its tokens the one-shot ones.
    async fn check_all(
        &self,
        ids: &[TrajectoryId],
    ) -> BTreeMap<TrajectoryId, Vec<(String, Segment)>> {
        let mut all = BTreeMap::new();
        for id in ids {
            let t = self.state.trajectory(id).await.unwrap().unwrap();
            assert_eq!(t.status, TrajectoryStatus::Finished, "{id}");
            let segments = self.segments(id).await;
            for (i, (_, s)) in segments.iter().enumerate() {
                assert_eq!(s.seq as usize, i, "{id}: segments are contiguous");
                assert!(s.tokens.len() <= 8);
                assert!(
                    segments[..i]
                        .iter()
                        .all(|(_, p)| p.lease_epoch <= s.lease_epoch),
                    "{id}: epochs never go back"
                );
            }
            let tokens: Vec<u32> = segments
                .iter()
                .flat_map(|(_, s)| s.tokens.clone())
                .collect();
            let prompt = format!("prompt {}", &id.prompt.0[1..]);
            assert_eq!(tokens, self.expected(id, &prompt).await, "{id}: tokens");
            all.insert(id.clone(), segments);
        }
        all
    }

    /// Trajectories whose live lease is held by `owner`.
    async fn held_by(&self, ids: &[TrajectoryId], owner: &str) -> Vec<TrajectoryId> {
        let mut out = Vec::new();
        for id in ids {
            if let Some(t) = self.state.trajectory(id).await.unwrap()
                && t.status == TrajectoryStatus::Generating
                && t.lease.as_ref().is_some_and(|l| l.owner == owner)
            {
                out.push(id.clone());
            }
        }
        out
    }

    /// Opens version 0 as the coordinator leader would (a fenced leader write), sends 4
    /// prompts of 2 samples and starts worker `w-a`; returns once it holds at least two
    /// trajectories with two committed segments or more (mid-flight).
    async fn start_w_a(&mut self) -> Vec<TrajectoryId> {
        let lead = self
            .state
            .acquire_leader("test-leader", Duration::from_secs(600))
            .await
            .unwrap()
            .expect("the leader lock is free");
        self.state
            .open_version(0, 10_000_000, 4, lead.token)
            .await
            .unwrap();
        let ids = self.send_prompts(4, 2).await;
        self.spawn("w-a");
        let run = &*self;
        testkit::wait_for(
            DEADLINE,
            "w-a holding leases with committed segments",
            || async {
                let mut with_segments = 0;
                for id in run.held_by(&ids, "w-a").await {
                    let t = run.state.trajectory(&id).await.unwrap().unwrap();
                    with_segments += usize::from(t.segments.len() >= 2);
                }
                with_segments >= 2
            },
        )
        .await;
        ids
    }

    async fn finished(&self) -> u64 {
        self.state.counts().await.unwrap().finished
    }
}

fn sim() -> SimConfig {
    SimConfig {
        seed: 5,
        slots: 4,
        // 8-token segments of ~80 ms: trajectories are mid-flight when the signal comes.
        decode_tokens_per_s: 100.0,
        lengths: LengthDistribution::Uniform { lo: 60, hi: 160 },
        ..SimConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_in_the_grace_period_with_leases_released() {
    // Long leases: a lease the worker failed to release could not be hidden by a steal.
    let mut run = Run::new("term", 60_000, sim()).await;
    let ids = run.start_w_a().await;
    let b_addr = run.spawn("w-b");
    run.procs.sigterm("w-a");
    let status = run.wait_exit("w-a").await;
    assert!(
        status.success(),
        "w-a must exit cleanly within its grace period: {status}\n{}",
        run.procs.log("w-a")
    );
    assert!(
        run.held_by(&ids, "w-a").await.is_empty(),
        "w-a released every lease"
    );
    testkit::wait_for(DEADLINE, "all 8 trajectories finished by w-b", || async {
        run.finished().await == ids.len() as u64
    })
    .await;
    let all = run.check_all(&ids).await;
    // w-a's parked trajectories were resumed by w-b under a newer epoch.
    let resumed = all
        .values()
        .filter(|s| s.first().map(|f| f.1.lease_epoch) != s.last().map(|l| l.1.lease_epoch))
        .count();
    assert!(resumed >= 1, "some trajectory moved from w-a to w-b");
    assert!(metric(&b_addr, "flywheel_worker_trajectories_finished_total").await >= 1.0);
    run.finish("w-b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_leases_expire_and_the_other_worker_continues_from_the_last_commit() {
    let mut run = Run::new("kill", 2_000, sim()).await;
    let ids = run.start_w_a().await;
    run.procs.kill("w-a");
    // What w-a had committed when it died, for the trajectories it held.
    let held = run.held_by(&ids, "w-a").await;
    assert!(!held.is_empty());
    let mut prefixes = BTreeMap::new();
    for id in &held {
        prefixes.insert(id.clone(), run.segments(id).await);
    }
    let b_addr = run.spawn("w-b");
    testkit::wait_for(DEADLINE, "all 8 trajectories finished by w-b", || async {
        run.finished().await == ids.len() as u64
    })
    .await;
    let all = run.check_all(&ids).await;
    for (id, prefix) in &prefixes {
        let segments = &all[id];
        assert!(segments.len() >= prefix.len());
        // The committed prefix is exactly what w-a left: same objects, same content.
        for ((k0, s0), (k1, s1)) in prefix.iter().zip(segments) {
            assert_eq!(k0, k1, "{id}: the committed prefix is kept");
            assert_eq!(s0, s1);
        }
        // The rest was generated by w-b under a newer epoch.
        let old = prefix.last().map_or(0, |(_, s)| s.lease_epoch);
        assert!(
            segments[prefix.len()..]
                .iter()
                .all(|(_, s)| s.lease_epoch > old),
            "{id}: continued under a newer epoch"
        );
    }
    assert!(
        metric(&b_addr, "flywheel_worker_lease_steals_total").await >= held.len() as f64,
        "w-b stole every lease w-a held"
    );
    run.finish("w-b").await;
}
