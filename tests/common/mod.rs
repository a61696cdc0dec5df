//! The harness of the tests that run `flywheel` processes on the real services: start them
//! with a config and environment, read their logs, signal and kill them, wait on them (every
//! wait bounded, failing with the logs), and scrape their metrics.
#![allow(dead_code)] // each test binary uses a different part of it

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use flywheel_storage::ledger::Ledger;
use flywheel_storage::ledger::conformance::TestLedger;
use flywheel_storage::state::{RedisStateStore, StateStore};
use flywheel_storage::testkit;

/// A fresh run on the real services: a unique id, its Redis state, a fresh PostgreSQL schema
/// and the S3 server (each panics naming the service when it is unreachable), and a folder for
/// the config and the services' logs, kept after the test for a failure's post-mortem.
pub struct RealRun {
    /// `<label>-<random hex>`.
    pub run_id: String,
    /// The object store's server.
    pub s3: testkit::S3Server,
    /// The run's Redis state.
    pub state: RedisStateStore,
    /// The run's own ledger schema.
    pub test_ledger: TestLedger,
    /// `<temp>/flywheel-<run id>`.
    pub dir: PathBuf,
}

impl RealRun {
    /// Sets up a run labelled `label`.
    pub async fn new(label: &str) -> RealRun {
        let s3 = testkit::S3Server::from_env();
        let run_id = format!("{label}-{:012x}", rand::random::<u64>() >> 16);
        let state = testkit::redis_state(&run_id).await;
        let test_ledger = TestLedger::postgres().await;
        let dir = std::env::temp_dir().join(format!("flywheel-{run_id}"));
        std::fs::create_dir_all(&dir).unwrap();
        RealRun {
            run_id,
            s3,
            state,
            test_ledger,
            dir,
        }
    }
}

/// The `flywheel` processes of a test, each logging to `<dir>/<name>.log`; SIGKILLed if the
/// test ends early.
pub struct Processes {
    /// Where the logs go.
    pub dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Processes {
    /// No process yet; logs in `dir`.
    pub fn new(dir: &Path) -> Processes {
        std::fs::create_dir_all(dir).unwrap();
        Processes {
            dir: dir.to_path_buf(),
            children: Vec::new(),
        }
    }

    /// Starts `flywheel <args>` as `name`, with `env` set.
    pub fn spawn(&mut self, name: &str, args: &[&str], env: &[(&str, String)]) {
        let log = std::fs::File::create(self.log_path(name)).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flywheel"));
        cmd.args(args)
            .env("FLYWHEEL_LOG", "info,librdkafka=warn")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start flywheel {name}: {e}"));
        self.children.push((name.to_owned(), child));
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// What `name` has logged.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// How many times `needle` occurs in all the logs.
    pub fn count_in_logs(&self, needle: &str) -> usize {
        self.children
            .iter()
            .map(|(name, _)| self.log(name).matches(needle).count())
            .sum()
    }

    /// The last lines of every process's log.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.children {
            let text = self.log(name);
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            out.push_str(&format!(
                "---- {name} (last lines) ----\n{}\n",
                tail.join("\n")
            ));
        }
        out
    }

    /// Panics, with the logs, if a process other than `except` has exited.
    pub fn check_alive(&mut self, except: &[&str]) {
        let mut dead = Vec::new();
        for (name, child) in &mut self.children {
            if except.contains(&name.as_str()) {
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                dead.push(format!("{name} exited early ({status})"));
            }
        }
        if !dead.is_empty() {
            panic!("{}\n{}", dead.join("; "), self.logs());
        }
    }

    fn child(&mut self, name: &str) -> &mut Child {
        &mut self
            .children
            .iter_mut()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name} was started"))
            .1
    }

    /// SIGKILL: no shutdown, leases left to expire.
    pub fn kill(&mut self, name: &str) {
        let child = self.child(name);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, the notice Kubernetes and spot reclaims give.
    pub fn sigterm(&mut self, name: &str) {
        let pid = self.child(name).id();
        let ok = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {name}");
    }

    /// Waits for `name` to exit, bounded by `deadline`.
    pub async fn wait_exit(&mut self, name: &str, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child(name).try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < deadline,
                "{name} did not exit within {deadline:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM to every live process, then wait for them.
    pub fn stop(&mut self) {
        for (_, child) in &mut self.children {
            if let Ok(None) = child.try_wait() {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
            }
        }
        for (_, child) in &mut self.children {
            let _ = child.wait();
        }
    }

    /// Polls `check` until it holds, failing with `what` and the logs at `deadline` or as
    /// soon as a process other than `except` exits.
    pub async fn wait_until<F, Fut>(
        &mut self,
        except: &[&str],
        what: &str,
        deadline: Duration,
        mut check: F,
    ) where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let start = Instant::now();
        while !check().await {
            self.check_alive(except);
            if start.elapsed() > deadline {
                panic!(
                    "timed out waiting for {what} (logs in {})\n{}",
                    self.dir.display(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until all `prompts` ingested prompts of `run_id` are trained or dropped in the
    /// ledger and the last recorded step is trained: the run has drained.
    pub async fn wait_until_settled(
        &mut self,
        except: &[&str],
        (ledger, state, run_id): (&dyn Ledger, &dyn StateStore, &str),
        prompts: u64,
        deadline: Duration,
    ) {
        self.wait_until(
            except,
            "every ingested prompt to be trained or dropped and the last step trained",
            deadline,
            || async {
                let counts = ledger.prompt_counts(run_id).await.unwrap();
                if counts.pending > 0 || counts.trained + counts.dropped < prompts {
                    return false;
                }
                let last = ledger.last_step(run_id).await.unwrap();
                last.is_some() && last == state.finished_step().await.unwrap()
            },
        )
        .await
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The value of metric `name` (no labels) served at `http://addr/metrics`.
pub async fn metric(addr: &str, name: &str) -> f64 {
    let body = http_get(&format!("http://{addr}/metrics")).await;
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .filter(|rest| rest.starts_with(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("metric {name} missing from {addr}: {body}"))
}

/// The body of `GET url`.
pub async fn http_get(url: &str) -> String {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap()
}

/// The `[storage]` and `[kafka]` sections of a run on the test services: Redis and Kafka
/// from the environment, topic `<run_id>.prompts`, group `<run_id>.workers`; `kafka_extra`
/// holds more `[kafka]` lines.
pub fn stores_toml(run_id: &str, blob_url: &str, ledger_url: &str, kafka_extra: &str) -> String {
    let redis = flywheel_storage::testkit::redis_url();
    let kafka = flywheel_storage::testkit::kafka_brokers();
    stores_toml_on(run_id, (&redis, blob_url, ledger_url, &kafka), kafka_extra)
}

/// [`stores_toml`] on the given services: Redis URL, object store URL, ledger URL and Kafka
/// brokers.
pub fn stores_toml_on(
    run_id: &str,
    (redis, blob_url, ledger_url, kafka): (&str, &str, &str, &str),
    kafka_extra: &str,
) -> String {
    format!(
        r#"
[storage]
run_id = "{run_id}"
state_url = "{redis}"
blob_url = "{blob_url}"
ledger_url = "{ledger_url}"

[kafka]
brokers = "{kafka}"
topic = "{run_id}.prompts"
group_id = "{run_id}.workers"
{kafka_extra}
"#
    )
}
