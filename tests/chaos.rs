//! The chaos suite (DESIGN.md §7): the distributed RL job, small, with real `flywheel`
//! processes (a reward service, coordinators, a trainer, builtin-engine workers) on real
//! services on loopback. Each test injects one kind of fault mid-run, waits for the run to
//! drain (every ingested prompt trained or dropped, the last step trained) and ends with
//! `flywheel audit` passing: every consumed message accounted for, steps and versions without
//! gaps, no prompt in two steps, every trained segment verified, every checkpoint restorable.
//!
//! Faults: a worker killed with SIGKILL mid-segment, one drained with SIGTERM and one joining
//! late; the leader coordinator killed with a standby running; a coordinator killed at each
//! point of the step commit (the process aborts there: `FLYWHEEL_COORDINATOR_CRASH_AT`); the
//! trainer killed mid-step and restarted with `--resume`; Redis flushed (the leader rebuilds
//! it); the Kafka-compatible broker restarted on a storage engine that keeps its data;
//! PostgreSQL restarted; the object store behind a proxy that fails, stalls and loses the
//! answers of a fraction of requests.
//!
//! Services: the shared ones of the other tests (`scripts/services.sh`: Redis, PostgreSQL,
//! Kafka, S3; an unreachable one fails the test naming it), and where a test restarts or
//! flushes one, its own instance on a free port: `redis-server`, a PostgreSQL cluster made
//! with `initdb` (as the `postgres` user when run as root), `tansu` storing in the S3
//! server's `tansu-chaos` bucket. The tests run one at a time (they share two cores).
//!
//! Waits are bounded by a generous deadline that names what did not happen; nothing asserts
//! on durations. Logs stay in `<temp>/flywheel-<run id>/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Processes, stores_toml_on};
use flywheel_model::{ModelConfig, Tokenizer};
use flywheel_storage::blob::BlobStore;
use flywheel_storage::ledger::conformance::TestLedger;
use flywheel_storage::ledger::{self, EventKind, Ledger};
use flywheel_storage::state::{RedisStateStore, StateStore};
use flywheel_storage::testkit::{self, S3Server, free_port};
use flywheel_storage::types::BatchManifest;
use flywheel_storage::{codec, keys};
use flywheel_task::TaskSection;

/// Prompts ingested per run.
const PROMPTS: u64 = 160;
/// Bound on every wait.
const DEADLINE: Duration = Duration::from_secs(600);
/// K of the task's prompts.
const GROUP_SIZE: u32 = 4;
/// Supervised warm-start steps of version 0.
const WARM_START_STEPS: &str = "100";

/// The tests share two cores and some services: one at a time (an async lock: it is held
/// across the whole test, and a failed test does not poison it).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where a run's services are.
struct Endpoints {
    redis: String,
    kafka: String,
    s3: S3Server,
    /// `None`: a fresh schema on the shared PostgreSQL.
    ledger: Option<String>,
}

impl Endpoints {
    /// The shared test services.
    fn shared() -> Endpoints {
        Endpoints {
            redis: testkit::redis_url(),
            kafka: testkit::kafka_brokers(),
            s3: S3Server::from_env(),
            ledger: None,
        }
    }
}

/// One chaos run: its config, processes and handles on its stores.
struct Chaos {
    run_id: String,
    dir: PathBuf,
    config: PathBuf,
    procs: Processes,
    ledger: Arc<dyn Ledger>,
    state: RedisStateStore,
    blobs: BlobStore,
    test_ledger: Option<TestLedger>,
    /// Prompts sent so far.
    ingested: u64,
    /// Ports handed to this run's processes: a port `free_port` finds free can be handed out
    /// again before the first process binds it.
    ports: std::collections::HashSet<u16>,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Chaos {
    /// Writes the run's config and starts the reward service; the test starts the rest.
    async fn new(label: &str, endpoints: Endpoints) -> Chaos {
        let serial = SERIAL.lock().await;
        let run_id = format!("chaos-{label}-{:08x}", rand::random::<u32>());
        let dir = std::env::temp_dir().join(format!("flywheel-{run_id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (ledger_url, test_ledger) = match endpoints.ledger {
            Some(url) => (url, None),
            None => {
                let t = TestLedger::postgres().await;
                (t.url().to_owned(), Some(t))
            }
        };
        let ledger = ledger::open(&ledger_url)
            .await
            .unwrap_or_else(|e| panic!("ledger {ledger_url}: {e}"));
        let state = RedisStateStore::connect(&endpoints.redis, &run_id)
            .await
            .unwrap_or_else(|e| panic!("Redis {}: {e}", endpoints.redis));
        let blob_url = endpoints.s3.url(&run_id);
        let rewards_port = free_port();
        let task = TaskSection {
            max_terms: 3,
            group_size: GROUP_SIZE,
            ..TaskSection::default()
        };
        let model = ModelConfig {
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            d_ff: 128,
            max_seq_len: 32,
            ..ModelConfig::tiny(Tokenizer::arithmetic().vocab_size())
        };
        let config = format!(
            r#"{stores}
[rollout]
mode = "partial"
version_budget_tokens = 640
segment_tokens = 8
max_response_tokens = 16
retention_limit = 4
lease_ms = 3000

[batch]
token_budget = 256
micro_batch_tokens = 4096
filter_zero_variance = false

[task]
max_terms = {max_terms}
group_size = {group_size}

[coordinator]
tick_ms = 100

[worker]
slots = 2
poll_interval_ms = 50
grace_period_ms = 10000

[worker.engine]
kind = "builtin"
slots = 2
weights_wait_ms = 600000

[worker.rewards.services]
addition = "http://127.0.0.1:{rewards_port}/reward"

[trainer]
poll_ms = 50
rank_claim_ms = 5000
checkpoint_every = 3
keep_segment_steps = 2

[trainer.model]
{model_toml}
[trainer.optimizer]
lr = 0.0003
weight_decay = 0.0
"#,
            stores = stores_toml_on(
                &run_id,
                (&endpoints.redis, &blob_url, &ledger_url, &endpoints.kafka),
                "session_timeout_ms = 6000\nauto_commit_interval_ms = 200",
            ),
            max_terms = task.max_terms,
            group_size = task.group_size,
            model_toml = toml::to_string(&model).unwrap(),
        );
        let config_path = dir.join("flywheel.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut procs = Processes::new(&dir);
        let bind = format!("127.0.0.1:{rewards_port}");
        procs.spawn("rewards", &["rewards", "--bind", &bind], &[]);
        Chaos {
            run_id,
            dir,
            config: config_path,
            procs,
            ledger,
            state,
            blobs: BlobStore::open(&blob_url).unwrap(),
            test_ledger,
            ingested: 0,
            ports: [rewards_port].into(),
            _serial: serial,
        }
    }

    /// A free loopback port not handed to another process of the run.
    fn port(&mut self) -> u16 {
        loop {
            let port = free_port();
            if self.ports.insert(port) {
                return port;
            }
        }
    }

    fn config_arg(&self) -> String {
        self.config.to_str().unwrap().to_owned()
    }

    /// Starts a coordinator candidate `name` (its own port and candidate id), with `env`.
    fn coordinator(&mut self, name: &str, env: &[(&str, String)]) {
        let config = self.config_arg();
        let mut env = env.to_vec();
        let port = self.port();
        env.push(("FLYWHEEL_COORDINATOR__BIND", format!("127.0.0.1:{port}")));
        env.push(("FLYWHEEL_COORDINATOR__CANDIDATE_ID", name.to_owned()));
        self.procs
            .spawn(name, &["coordinator", "--config", &config], &env);
    }

    /// Starts trainer process `name` (trainer id `trainer-0`): warm-starting version 0, or
    /// resuming from the newest checkpoint.
    fn trainer(&mut self, name: &str, resume: bool) {
        let config = self.config_arg();
        let mut args = vec!["trainer", "--config", &config];
        if resume {
            args.push("--resume");
        } else {
            args.extend(["--warm-start-steps", WARM_START_STEPS]);
        }
        let port = self.port();
        let env = [
            ("FLYWHEEL_TRAINER__ID", "trainer-0".to_owned()),
            (
                "FLYWHEEL_TRAINER__METRICS_ADDR",
                format!("127.0.0.1:{port}"),
            ),
        ];
        self.procs.spawn(name, &args, &env);
    }

    /// Starts worker `name`.
    fn worker(&mut self, name: &str) {
        let config = self.config_arg();
        let port = self.port();
        let env = [
            ("FLYWHEEL_WORKER__ID", name.to_owned()),
            ("FLYWHEEL_WORKER__METRICS_ADDR", format!("127.0.0.1:{port}")),
        ];
        self.procs
            .spawn(name, &["worker", "--config", &config], &env);
    }

    /// The usual cast: one coordinator, the trainer, two workers.
    fn start_all(&mut self) {
        self.coordinator("coordinator-0", &[]);
        self.trainer("trainer", false);
        self.worker("worker-0");
        self.worker("worker-1");
    }

    /// Sends the run's prompts.
    fn ingest(&mut self) {
        self.ingest_batch(PROMPTS, 1);
    }

    /// Sends `count` prompts of the task with `seed` (`flywheel ingest --demo-task`; each
    /// seed names its prompts apart).
    fn ingest_batch(&mut self, count: u64, seed: u64) {
        let out = Command::new(env!("CARGO_BIN_EXE_flywheel"))
            .args(["ingest", "--config", &self.config_arg(), "--demo-task"])
            .arg(count.to_string())
            .args(["--seed", &seed.to_string()])
            .output()
            .expect("run flywheel ingest");
        assert!(
            out.status.success(),
            "flywheel ingest failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.ingested += count;
    }

    /// Waits until step `step` is finished (trained and published).
    async fn wait_finished(&mut self, step: u64, except: &[&str]) {
        let state = self.state.clone();
        self.procs
            .wait_until(except, &format!("step {step} to finish"), DEADLINE, || {
                let state = state.clone();
                async move {
                    state
                        .finished_step()
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|s| s >= step)
                }
            })
            .await;
    }

    /// Waits until `what` holds, failing with the logs at the deadline or if a process other
    /// than `except` exits.
    async fn wait_for<F, Fut>(&mut self, except: &[&str], what: &str, check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        self.procs.wait_until(except, what, DEADLINE, check).await;
    }

    /// Waits for the run to drain, stops every process and audits. Returns the audit's
    /// summary.
    async fn finish(&mut self, except: &[&str]) -> String {
        let (ledger, state) = (self.ledger.clone(), self.state.clone());
        self.procs
            .wait_until_settled(
                except,
                (ledger.as_ref(), &state, &self.run_id),
                self.ingested,
                DEADLINE,
            )
            .await;
        self.procs.stop();
        let summary = audit_config(&self.config, true, &self.dir);
        eprintln!("{}: audit:\n{summary}", self.run_id);
        summary
    }

    /// Drops the run's ledger schema (a failed test keeps it for inspection).
    async fn cleanup(mut self) {
        if let Some(t) = self.test_ledger.take() {
            t.teardown().await;
        }
    }

    /// A kill of `name` while trajectories are generating (mid-segment).
    async fn kill_mid_segment(&mut self, name: &str) {
        let state = self.state.clone();
        self.wait_for(&[], "a trajectory to be generating", || {
            let state = state.clone();
            async move { state.counts().await.is_ok_and(|c| c.generating > 0) }
        })
        .await;
        self.procs.kill(name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_drained_and_joining() {
    let mut run = Chaos::new("workers", Endpoints::shared()).await;
    run.start_all();
    run.ingest();
    run.wait_finished(1, &[]).await;
    run.kill_mid_segment("worker-0").await;
    run.wait_finished(2, &["worker-0"]).await;
    run.worker("worker-2");
    run.wait_finished(3, &["worker-0"]).await;
    run.procs.sigterm("worker-1");
    let status = run.procs.wait_exit("worker-1", DEADLINE).await;
    assert!(status.success(), "a drained worker exits cleanly: {status}");
    let summary = run.finish(&["worker-0", "worker-1"]).await;
    assert!(summary.contains("no violation"), "{summary}");

    // The audit notices a trained segment that no longer verifies.
    let last = run.ledger.last_step(&run.run_id).await.unwrap().unwrap();
    let manifest: BatchManifest = serde_json::from_slice(
        &run.blobs
            .get(&keys::step_manifest(&run.run_id, last))
            .await
            .unwrap(),
    )
    .unwrap();
    let key = manifest.ranks[0][0].entries[0].segments[0].key.clone();
    let mut bytes = run.blobs.get(&key).await.unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    assert!(codec::decode(&bytes).is_err());
    run.blobs.put(&key, bytes.into()).await.unwrap();
    let out = audit_config(&run.config, false, &run.dir);
    assert!(out.contains(&key), "the violation names the segment: {out}");
    run.cleanup().await;
}

/// `flywheel audit --config <config>`, asserted to pass or not; what it printed.
fn audit_config(config: &Path, passes: bool, dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(["audit", "--config", config.to_str().unwrap()])
        .env("FLYWHEEL_LOG", "warn")
        .output()
        .expect("run flywheel audit");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.success(),
        passes,
        "flywheel audit:\n{stdout}\n{}\nlogs in {}",
        String::from_utf8_lossy(&out.stderr),
        dir.display()
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_with_a_standby_running() {
    let mut run = Chaos::new("leader", Endpoints::shared()).await;
    run.coordinator("coordinator-a", &[]);
    run.coordinator("coordinator-b", &[]);
    run.trainer("trainer", false);
    run.worker("worker-0");
    run.worker("worker-1");
    run.ingest();
    run.wait_finished(2, &[]).await;
    let leader = run.state.leader().await.unwrap().expect("a leader").holder;
    let standby = if leader == "coordinator-a" {
        "coordinator-b"
    } else {
        "coordinator-a"
    };
    run.procs.kill(&leader);
    let state = run.state.clone();
    run.wait_for(&[&leader], "the standby to take the lead", || {
        let state = state.clone();
        async move {
            state
                .leader()
                .await
                .ok()
                .flatten()
                .is_some_and(|l| l.holder == standby)
        }
    })
    .await;
    let summary = run.finish(&[&leader]).await;
    assert!(summary.contains("no violation"), "{summary}");
    run.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_at_each_point_of_the_step_commit() {
    let mut run = Chaos::new("commit", Endpoints::shared()).await;
    run.trainer("trainer", false);
    run.worker("worker-0");
    run.worker("worker-1");
    run.ingest();
    let points = [
        "before_manifest",
        "after_manifest",
        "after_ledger",
        "after_announce",
    ];
    let mut crashed = Vec::new();
    for point in points {
        let name = format!("coordinator-{point}");
        run.coordinator(
            &name,
            &[("FLYWHEEL_COORDINATOR_CRASH_AT", point.to_owned())],
        );
        let status = run.procs.wait_exit(&name, DEADLINE).await;
        assert!(!status.success(), "{name} should die at {point}: {status}");
        let log = run.procs.log(&name);
        assert!(
            log.contains("aborting at the injected crash point"),
            "{name} died elsewhere:\n{log}"
        );
        crashed.push(name);
    }
    run.coordinator("coordinator", &[]);
    let except: Vec<&str> = crashed.iter().map(String::as_str).collect();
    let summary = run.finish(&except).await;
    assert!(summary.contains("no violation"), "{summary}");
    run.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainer_killed_mid_step_resumes_without_training_twice() {
    let mut run = Chaos::new("trainer", Endpoints::shared()).await;
    run.start_all();
    run.ingest();
    run.wait_finished(3, &[]).await;
    let state = run.state.clone();
    run.wait_for(&[], "a step to be training", || {
        let state = state.clone();
        async move {
            let announced = state.announced_step().await.ok().flatten().map(|a| a.step);
            let finished = state.finished_step().await.ok().flatten();
            announced.is_some() && announced > finished
        }
    })
    .await;
    run.procs.kill("trainer");
    run.trainer("trainer-resumed", true);
    let summary = run.finish(&["trainer"]).await;
    assert!(summary.contains("no violation"), "{summary}");
    run.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushed_mid_run_is_rebuilt() {
    let redis = OwnService::redis();
    let endpoints = Endpoints {
        redis: redis.url.clone(),
        ..Endpoints::shared()
    };
    let mut run = Chaos::new("redis", endpoints).await;
    run.start_all();
    run.ingest();
    run.wait_finished(2, &[]).await;
    redis.flushall();
    let (ledger, run_id) = (run.ledger.clone(), run.run_id.clone());
    run.wait_for(&[], "the state store to be rebuilt", || {
        let (ledger, run_id) = (ledger.clone(), run_id.clone());
        async move {
            ledger
                .events(&run_id)
                .await
                .is_ok_and(|events| events.iter().any(|e| e.kind == EventKind::StateRebuilt))
        }
    })
    .await;
    let summary = run.finish(&[]).await;
    assert!(summary.contains("no violation"), "{summary}");
    run.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_restarted_mid_run() {
    let s3 = S3Server::from_env();
    let mut kafka = OwnService::tansu(&s3);
    let endpoints = Endpoints {
        kafka: kafka.url.clone(),
        ..Endpoints::shared()
    };
    let mut run = Chaos::new("kafka", endpoints).await;
    run.start_all();
    run.ingest();
    run.wait_finished(1, &[]).await;
    kafka.restart();
    run.wait_finished(3, &[]).await;
    let summary = run.finish(&[]).await;
    assert!(summary.contains("no violation"), "{summary}");
    assert!(
        !summary.contains("messages: 0 consumed"),
        "the audit read the topic back: {summary}"
    );
    run.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_run() {
    let mut postgres = OwnService::postgres();
    let endpoints = Endpoints {
        ledger: Some(postgres.url.clone()),
        ..Endpoints::shared()
    };
    let mut run = Chaos::new("postgres", endpoints).await;
    run.start_all();
    run.ingest();
    run.wait_finished(1, &[]).await;
    postgres.restart();
    run.wait_finished(3, &[]).await;
    let summary = run.finish(&[]).await;
    assert!(summary.contains("no violation"), "{summary}");
    run.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_failing_and_stalling() {
    let s3 = S3Server::from_env();
    let proxy = FaultyProxy::start(&s3.endpoint).await;
    let endpoints = Endpoints {
        s3: S3Server {
            endpoint: proxy.endpoint.clone(),
            ..s3
        },
        ..Endpoints::shared()
    };
    let mut run = Chaos::new("s3", endpoints).await;
    run.start_all();
    run.ingest();
    let summary = run.finish(&[]).await;
    assert!(summary.contains("no violation"), "{summary}");
    let (forwarded, failed, lost, stalled) = proxy.counts();
    eprintln!(
        "object store proxy: {forwarded} requests forwarded, {failed} failed, {lost} answers \
         lost, {stalled} stalled"
    );
    assert!(
        failed > 0 && lost > 0 && stalled > 0,
        "the proxy injected faults"
    );
    run.cleanup().await;
}

/// What a worker logs when it resumes a trajectory whose lease expired (its holder died).
const STEAL_LOG: &str = "resuming a trajectory whose lease expired";

/// Prompts per batch of the soak; another batch is sent whenever fewer are in flight (not
/// yet trained or dropped).
const SOAK_BATCH: u64 = 200;

/// The soak (`scripts/soak`): the job runs for `FLYWHEEL_SOAK_SECONDS` (default 900) with
/// two coordinators, the trainer and two workers, prompts sent in batches while it runs,
/// and every 15 to 45 s (seeded by `FLYWHEEL_SOAK_SEED`, default 1) one fault: a worker
/// killed with SIGKILL, a worker drained with SIGTERM (each replaced by a new worker), the
/// leader killed with SIGKILL (the standby takes over; a new standby starts), or the
/// trainer killed with SIGKILL (restarted with `--resume`). Then the input stops, the run
/// drains, and the audit must pass. Prints the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs for 15 minutes: scripts/soak"]
async fn soak() {
    use rand::{Rng, SeedableRng};
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
            })
            .unwrap_or(default)
    };
    let seconds = env("FLYWHEEL_SOAK_SECONDS", 900);
    let seed = env("FLYWHEEL_SOAK_SEED", 1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut run = Chaos::new("soak", Endpoints::shared()).await;
    let mut coordinators = vec!["coordinator-0".to_owned(), "coordinator-1".to_owned()];
    for c in &coordinators {
        run.coordinator(c, &[]);
    }
    let mut trainer = "trainer-0".to_owned();
    run.trainer(&trainer, false);
    let mut workers = vec!["worker-0".to_owned(), "worker-1".to_owned()];
    for w in &workers {
        run.worker(w);
    }
    let mut spawned = 2;
    let mut batches = 0;
    run.ingest_batch(SOAK_BATCH, 1000 + batches);
    batches += 1;
    let mut gone: Vec<String> = Vec::new();
    let mut kills = std::collections::BTreeMap::<&str, u64>::new();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        let pause = Duration::from_secs(rng.random_range(15..=45));
        let until = std::time::Instant::now() + pause;
        while std::time::Instant::now() < until {
            let except: Vec<&str> = gone.iter().map(String::as_str).collect();
            run.procs.check_alive(&except);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let counts = run.ledger.prompt_counts(&run.run_id).await.unwrap();
        if counts.pending + (run.ingested - counts.pending - counts.trained - counts.dropped)
            < SOAK_BATCH
        {
            run.ingest_batch(SOAK_BATCH, 1000 + batches);
            batches += 1;
        }
        match rng.random_range(0..4) {
            0 | 1 => {
                let i = rng.random_range(0..workers.len());
                let name = workers.remove(i);
                if rng.random_bool(0.5) {
                    run.procs.kill(&name);
                    *kills.entry("worker SIGKILL").or_default() += 1;
                } else {
                    run.procs.sigterm(&name);
                    let status = run.procs.wait_exit(&name, DEADLINE).await;
                    assert!(status.success(), "a drained worker exits cleanly: {status}");
                    *kills.entry("worker SIGTERM").or_default() += 1;
                }
                gone.push(name);
                let new = format!("worker-{spawned}");
                spawned += 1;
                run.worker(&new);
                workers.push(new);
            }
            2 => {
                let Some(leader) = run.state.leader().await.unwrap() else {
                    continue; // between leaders: try again next time
                };
                run.procs.kill(&leader.holder);
                *kills.entry("leader SIGKILL").or_default() += 1;
                coordinators.retain(|c| *c != leader.holder);
                gone.push(leader.holder);
                let new = format!("coordinator-{spawned}");
                spawned += 1;
                run.coordinator(&new, &[]);
                coordinators.push(new);
            }
            _ => {
                run.procs.kill(&trainer);
                *kills.entry("trainer SIGKILL").or_default() += 1;
                gone.push(std::mem::replace(
                    &mut trainer,
                    format!("trainer-{spawned}"),
                ));
                spawned += 1;
                run.trainer(&trainer, true);
                *kills.entry("trainer resumes").or_default() += 1;
            }
        }
    }
    let except: Vec<String> = gone.clone();
    let except: Vec<&str> = except.iter().map(String::as_str).collect();
    let summary = run.finish(&except).await;
    let counts = run.ledger.prompt_counts(&run.run_id).await.unwrap();
    let steps = run.ledger.steps(&run.run_id).await.unwrap().len();
    println!(
        "soak: {seconds} s of faults, seed {seed} (FLYWHEEL_SOAK_SECONDS={seconds} \
         FLYWHEEL_SOAK_SEED={seed} scripts/soak)"
    );
    println!(
        "prompts: {} ingested, {} trained, {} dropped",
        run.ingested, counts.trained, counts.dropped
    );
    println!(
        "trajectories: {} (K = {GROUP_SIZE}); {} resumed by another worker after a kill",
        (counts.trained + counts.dropped) * u64::from(GROUP_SIZE),
        run.procs.count_in_logs(STEAL_LOG)
    );
    println!("steps: {steps}");
    for (kind, n) in &kills {
        println!("{kind}: {n}");
    }
    println!("audit:\n{summary}");
    assert!(summary.contains("no violation"), "{summary}");
    run.cleanup().await;
}

/// A service a test starts on a free port, to restart or flush it; killed on drop.
struct OwnService {
    /// The client URL.
    url: String,
    /// How to start it again (program, args, and the user to run it as).
    start: Box<dyn Fn() -> Child + Send>,
    child: Option<Child>,
    /// How the test checks it answers.
    port: u16,
    name: &'static str,
    /// The signal of a clean, prompt stop (PostgreSQL's SIGTERM waits for every client).
    stop_signal: &'static str,
    /// Its data folder, removed with it.
    data: Option<PathBuf>,
}

impl OwnService {
    fn launch(
        name: &'static str,
        url: String,
        port: u16,
        start: Box<dyn Fn() -> Child + Send>,
    ) -> OwnService {
        let mut s = OwnService {
            url,
            start,
            child: None,
            port,
            name,
            stop_signal: "TERM",
            data: None,
        };
        s.up();
        s
    }

    /// Starts it and waits (bounded) until its port accepts connections.
    fn up(&mut self) {
        self.child = Some((self.start)());
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited at start: {status}", self.name);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not answer on port {}",
                self.name,
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops it (its stop signal, then SIGKILL after 30 s) and starts it again on the same
    /// port and data.
    fn restart(&mut self) {
        self.stop();
        self.up();
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args([&format!("-{}", self.stop_signal), &child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis-server` on a free port, nothing persisted.
    fn redis() -> OwnService {
        let port = free_port();
        let start = move || {
            Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server (the Debian package redis-server) must be installed")
        };
        Self::launch(
            "redis-server",
            format!("redis://127.0.0.1:{port}"),
            port,
            Box::new(start),
        )
    }

    /// `FLUSHALL`: Redis loses everything.
    fn flushall(&self) {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "FLUSHALL"])
            .output()
            .expect("redis-cli");
        assert!(out.status.success(), "FLUSHALL failed");
    }

    /// tansu on a free port, storing topics and offsets in the S3 server's `tansu-chaos`
    /// bucket (under a cluster id of its own), so they outlive a restart.
    fn tansu(s3: &S3Server) -> OwnService {
        let port = free_port();
        let cluster = format!("chaos-{:08x}", rand::random::<u32>());
        let s3 = s3.clone();
        let start = move || {
            Command::new(tansu_binary())
                .args([
                    "broker",
                    "--cluster-id",
                    &cluster,
                    "--listener-url",
                    &format!("tcp://127.0.0.1:{port}"),
                    "--advertised-listener-url",
                    &format!("tcp://127.0.0.1:{port}"),
                    "--storage-engine",
                    "s3://tansu-chaos/",
                ])
                .env("AWS_ACCESS_KEY_ID", &s3.access_key)
                .env("AWS_SECRET_ACCESS_KEY", &s3.secret_key)
                .env("AWS_ENDPOINT", &s3.endpoint)
                .env("AWS_ALLOW_HTTP", "true")
                .env("AWS_DEFAULT_REGION", "us-east-1")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("tansu (scripts/services.sh installs it)")
        };
        Self::launch("tansu", format!("127.0.0.1:{port}"), port, Box::new(start))
    }

    /// A PostgreSQL cluster of its own (`initdb` into a temp folder, trust auth), as the
    /// `postgres` user when the tests run as root.
    fn postgres() -> OwnService {
        let port = free_port();
        let bin = postgres_bin();
        let data = tempfile::Builder::new()
            .prefix("flywheel-chaos-pg")
            .tempdir()
            .unwrap()
            .keep();
        // As root, PostgreSQL runs as the `postgres` user: set in the child itself (not
        // through `runuser`), so that the signals the test sends reach the server.
        let id = |flag: &str| -> Option<u32> {
            let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let user = if as_root {
            let user = id("-u")
                .zip(id("-g"))
                .expect("a `postgres` user (the postgresql package makes one)");
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres", data.to_str().unwrap()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the PostgreSQL data folder");
            Some(user)
        } else {
            None
        };
        let command = move |program: &str| {
            use std::os::unix::process::CommandExt;
            let mut c = Command::new(bin.join(program));
            if let Some((uid, gid)) = user {
                c.uid(uid).gid(gid);
            }
            c
        };
        let out = command("initdb")
            .args([
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
            ])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let folder = data.clone();
        let start = move || {
            command("postgres")
                .args(["-D", data.to_str().unwrap(), "-p", &port.to_string()])
                .args([
                    "-k",
                    data.to_str().unwrap(),
                    "-c",
                    "listen_addresses=127.0.0.1",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("postgres")
        };
        let mut pg = Self::launch(
            "postgres",
            format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            port,
            Box::new(start),
        );
        // SIGINT: the fast shutdown, which disconnects the clients.
        pg.stop_signal = "INT";
        pg.data = Some(folder);
        // Accepting connections can trail the open port.
        std::thread::sleep(Duration::from_secs(1));
        pg
    }
}

impl Drop for OwnService {
    fn drop(&mut self) {
        self.stop();
        if let Some(data) = self.data.take() {
            let _ = std::fs::remove_dir_all(data);
        }
    }
}

/// `tansu` on the PATH or where `cargo install` puts it.
fn tansu_binary() -> PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let installed = home.join("bin/tansu");
    if installed.exists() {
        installed
    } else {
        PathBuf::from("tansu")
    }
}

/// The newest PostgreSQL server binaries of the Debian layout (`/usr/lib/postgresql/<v>/bin`).
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries in /usr/lib/postgresql (the postgresql package)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("initdb under /usr/lib/postgresql/*/bin")
}

/// An HTTP proxy in front of the S3 server that, per request and seeded: fails one in ten
/// with `503 SlowDown` without forwarding it, forwards one in twenty and then answers 503
/// anyway (the answer is lost: the retry finds the write done), and stalls one in ten for
/// 1.5 s before forwarding. The rest pass through unchanged (SigV4 signatures included: the
/// Host header is kept).
struct FaultyProxy {
    endpoint: String,
    counts: Arc<[AtomicU64; 4]>,
    server: tokio::task::JoinHandle<()>,
}

impl FaultyProxy {
    async fn start(upstream: &str) -> FaultyProxy {
        use axum::body::{Body, to_bytes};
        use axum::extract::{Request, State};
        use axum::http::StatusCode;
        use axum::response::Response;
        use rand::{Rng, SeedableRng};

        #[derive(Clone)]
        struct Proxy {
            upstream: String,
            client: reqwest::Client,
            rng: Arc<Mutex<rand_chacha::ChaCha8Rng>>,
            counts: Arc<[AtomicU64; 4]>,
        }

        /// Headers of one connection, not of the request.
        const HOP_BY_HOP: [&str; 3] = ["connection", "keep-alive", "transfer-encoding"];

        const SLOW_DOWN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error>\
            <Code>SlowDown</Code><Message>injected fault</Message></Error>";

        fn slow_down() -> Response {
            Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .body(Body::from(SLOW_DOWN))
                .unwrap()
        }

        async fn forward(State(p): State<Proxy>, req: Request) -> Response {
            let roll: f64 = p.rng.lock().unwrap().random();
            let [forwarded, failed, lost, stalled] = &*p.counts;
            if roll < 0.10 {
                failed.fetch_add(1, Ordering::Relaxed);
                return slow_down();
            }
            if roll < 0.20 {
                stalled.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            let (parts, body) = req.into_parts();
            let Ok(body) = to_bytes(body, 1 << 30).await else {
                return slow_down();
            };
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let mut upstream = p
                .client
                .request(parts.method, format!("{}{path}", p.upstream))
                .body(body);
            for (name, value) in &parts.headers {
                if !HOP_BY_HOP.contains(&name.as_str()) {
                    upstream = upstream.header(name, value);
                }
            }
            let Ok(answer) = upstream.send().await else {
                return slow_down();
            };
            forwarded.fetch_add(1, Ordering::Relaxed);
            if (0.20..0.25).contains(&roll) {
                lost.fetch_add(1, Ordering::Relaxed);
                return slow_down();
            }
            let mut response = Response::builder().status(answer.status());
            for (name, value) in answer.headers() {
                if !HOP_BY_HOP.contains(&name.as_str()) {
                    response = response.header(name, value);
                }
            }
            let body = answer.bytes().await.unwrap_or_default();
            response.body(Body::from(body)).unwrap()
        }

        let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
        let proxy = Proxy {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: reqwest::Client::new(),
            rng: Arc::new(Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(15))),
            counts: counts.clone(),
        };
        let app = axum::Router::new().fallback(forward).with_state(proxy);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FaultyProxy {
            endpoint,
            counts,
            server,
        }
    }

    /// Requests forwarded, failed, answered-then-lost, stalled.
    fn counts(&self) -> (u64, u64, u64, u64) {
        let [a, b, c, d] = &*self.counts;
        let get = |x: &AtomicU64| x.load(Ordering::Relaxed);
        (get(a), get(b), get(c), get(d))
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}
