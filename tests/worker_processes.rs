//! Two real `flywheel worker` processes against the real services (DESIGN.md §6.2, issue 3
//! item 5): Redis (`FLYWHEEL_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`), PostgreSQL
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

use std::collections::BTreeMap;
use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flywheel_storage::blob::BlobStore;
use flywheel_storage::codec;
use flywheel_storage::ledger::conformance::TestLedger;
use flywheel_storage::queue::{KafkaConfig, PromptProducer, ensure_topics};
use flywheel_storage::state::{RedisStateStore, StateStore};
use flywheel_storage::{
    Prompt, PromptId, PromptInput, Segment, TrajectoryId, TrajectoryStatus, VerifierSpec,
};
use flywheel_worker::engine::sim::{LengthDistribution, SimConfig, SimEngine};
use flywheel_worker::engine::{Engine, SamplingConfig, SegmentRequest};

const DEADLINE: Duration = Duration::from_secs(180);

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fails unless `addr` accepts a TCP connection.
fn require(service: &str, var: &str, addr: &str) {
    let ok = addr
        .parse()
        .ok()
        .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)).ok())
        .is_some();
    assert!(
        ok,
        "{service} at {addr} ({var}) is unreachable. Start it with scripts/services.sh."
    );
}

/// A free loopback port (bound, then released) for a worker's metrics server.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One test run on the real services.
struct Run {
    /// Keeps the fresh schema's connection (a failed run leaves its `flywheel_test_*` schema).
    _ledger: TestLedger,
    dir: tempfile::TempDir,
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
        let redis = env_or("FLYWHEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379");
        let brokers = env_or("FLYWHEEL_TEST_KAFKA_BROKERS", "127.0.0.1:9092");
        let s3 = env_or("FLYWHEEL_TEST_S3_ENDPOINT", "http://127.0.0.1:8014");
        require(
            "Kafka",
            "FLYWHEEL_TEST_KAFKA_BROKERS",
            brokers.split(',').next().unwrap(),
        );
        require(
            "S3 (s3s-fs)",
            "FLYWHEEL_TEST_S3_ENDPOINT",
            s3.trim_start_matches("http://").trim_end_matches('/'),
        );
        let run_id = format!("wp-{tag}-{:012x}", rand::random::<u64>() >> 16);
        let state = RedisStateStore::connect(&redis, &run_id)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "Redis at {redis} (FLYWHEEL_TEST_REDIS_URL) is unreachable: {e}. \
                     Start it with scripts/services.sh."
                )
            });
        // A fresh schema (FLYWHEEL_TEST_POSTGRES_URL): the run never depends on, or changes,
        // what other runs migrated. Panics naming PostgreSQL when it is unreachable.
        let test_ledger = TestLedger::postgres().await;
        let postgres = test_ledger.url().to_owned();
        test_ledger
            .ledger()
            .create_run(&run_id, &serde_json::json!({"test": tag}))
            .await
            .unwrap();
        let blob_url = format!(
            "s3://flywheel-test/{run_id}?endpoint={s3}&region=us-east-1\
             &access_key_id=flywheel&secret_access_key=flywheel-secret"
        );
        let blobs = BlobStore::open(&blob_url).unwrap();
        let kafka = KafkaConfig {
            brokers: brokers.clone(),
            topic: run_id.clone(),
            group_id: run_id.clone(),
            session_timeout_ms: 6_000,
            auto_commit_interval_ms: 200,
            ..KafkaConfig::default()
        };
        ensure_topics(&kafka, 2, 1)
            .await
            .expect("create the topics");
        let config_base = format!(
            r#"
[storage]
run_id = "{run_id}"
state_url = "{redis}"
blob_url = "{blob_url}"
ledger_url = "{postgres}"

[kafka]
brokers = "{brokers}"
topic = "{run_id}"
group_id = "{run_id}"
session_timeout_ms = 6000
auto_commit_interval_ms = 200

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
            seed = sim.seed,
            slots = sim.slots,
            rate = sim.decode_tokens_per_s,
        );
        Run {
            _ledger: test_ledger,
            dir: tempfile::tempdir().unwrap(),
            state,
            blobs,
            kafka,
            sim,
            config_base,
        }
    }

    /// Starts `flywheel worker` with id `id`; returns the child and its metrics address.
    fn spawn(&self, id: &str) -> (Child, String) {
        let port = free_port();
        let config: PathBuf = self.dir.path().join(format!("{id}.toml"));
        std::fs::write(&config, &self.config_base).unwrap();
        let log = std::fs::File::create(self.log_path(id)).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flywheel"))
            .args(["worker", "--config"])
            .arg(&config)
            .env("FLYWHEEL_WORKER__ID", id)
            .env("FLYWHEEL_WORKER__METRICS_ADDR", format!("127.0.0.1:{port}"))
            .env("FLYWHEEL_LOG", "info,librdkafka=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start flywheel worker");
        (child, format!("127.0.0.1:{port}"))
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.dir.path().join(format!("{id}.log"))
    }

    fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.log_path(id)).unwrap_or_default()
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
        let t = self
            .state
            .trajectory(id)
            .await
            .unwrap()
            .expect("registered");
        let mut out = Vec::new();
        for r in &t.segments {
            let s = codec::decode(&self.blobs.get(&r.key).await.unwrap()).unwrap();
            out.push((r.key.clone(), s));
        }
        out
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

/// Waits for a child to exit (on a blocking thread), bounded by the deadline.
async fn wait_exit(mut child: Child) -> std::process::ExitStatus {
    tokio::time::timeout(
        DEADLINE,
        tokio::task::spawn_blocking(move || child.wait().unwrap()),
    )
    .await
    .expect("the worker process exits")
    .unwrap()
}

async fn metric(addr: &str, name: &str) -> f64 {
    let body = reqwest_get(&format!("http://{addr}/metrics")).await;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("metric {name} missing from {addr}: {body}"))
}

/// A minimal HTTP GET (the root crate does not depend on an HTTP client).
async fn reqwest_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM");
}

/// Dumps both workers' logs when a test fails, to say what happened.
struct Logs<'a>(&'a Run, [&'a str; 2]);

impl Drop for Logs<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for id in self.1 {
                eprintln!("----- {id} -----\n{}", self.0.log(id));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_in_the_grace_period_with_leases_released() {
    // Long leases: a lease the worker failed to release could not be hidden by a steal.
    let run = Run::new("term", 60_000, sim()).await;
    let _logs = Logs(&run, ["w-a", "w-b"]);
    // The test plays the coordinator leader: opening a version is a fenced leader write.
    let lead = run
        .state
        .acquire_leader("test-leader", Duration::from_secs(600))
        .await
        .unwrap()
        .expect("the leader lock is free");
    run.state
        .open_version(0, 10_000_000, 4, lead.token)
        .await
        .unwrap();
    let ids = run.send_prompts(4, 2).await;
    let (a, _) = run.spawn("w-a");
    wait_for("w-a holding leases with committed segments", || async {
        let held = run.held_by(&ids, "w-a").await;
        let mut with_segments = 0;
        for id in &held {
            if run
                .state
                .trajectory(id)
                .await
                .unwrap()
                .unwrap()
                .segments
                .len()
                >= 2
            {
                with_segments += 1;
            }
        }
        with_segments >= 2
    })
    .await;
    let (b, b_addr) = run.spawn("w-b");
    sigterm(&a);
    let status = wait_exit(a).await;
    assert!(
        status.success(),
        "w-a must exit cleanly within its grace period: {status}\n{}",
        run.log("w-a")
    );
    assert!(
        run.held_by(&ids, "w-a").await.is_empty(),
        "w-a released every lease"
    );
    wait_for("all 8 trajectories finished by w-b", || async {
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
    sigterm(&b);
    assert!(wait_exit(b).await.success(), "{}", run.log("w-b"));
    run.state.delete_run().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_leases_expire_and_the_other_worker_continues_from_the_last_commit() {
    let run = Run::new("kill", 2_000, sim()).await;
    let _logs = Logs(&run, ["w-a", "w-b"]);
    // The test plays the coordinator leader: opening a version is a fenced leader write.
    let lead = run
        .state
        .acquire_leader("test-leader", Duration::from_secs(600))
        .await
        .unwrap()
        .expect("the leader lock is free");
    run.state
        .open_version(0, 10_000_000, 4, lead.token)
        .await
        .unwrap();
    let ids = run.send_prompts(4, 2).await;
    let (mut a, _) = run.spawn("w-a");
    wait_for("w-a holding leases with committed segments", || async {
        let held = run.held_by(&ids, "w-a").await;
        let mut with_segments = 0;
        for id in &held {
            if run
                .state
                .trajectory(id)
                .await
                .unwrap()
                .unwrap()
                .segments
                .len()
                >= 2
            {
                with_segments += 1;
            }
        }
        with_segments >= 2
    })
    .await;
    a.kill().unwrap(); // SIGKILL
    let _ = wait_exit(a).await;
    // What w-a had committed when it died, for the trajectories it held.
    let held = run.held_by(&ids, "w-a").await;
    assert!(!held.is_empty());
    let mut prefixes = BTreeMap::new();
    for id in &held {
        prefixes.insert(id.clone(), run.segments(id).await);
    }
    let (b, b_addr) = run.spawn("w-b");
    wait_for("all 8 trajectories finished by w-b", || async {
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
    sigterm(&b);
    assert!(wait_exit(b).await.success(), "{}", run.log("w-b"));
    run.state.delete_run().await.unwrap();
}
