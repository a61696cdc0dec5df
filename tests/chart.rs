//! The Helm chart and the metrics it relies on, checked with the real tools (installed by
//! `scripts/chart_tools.sh`, which `scripts/test.sh` runs first):
//!
//! - `scripts/check_chart.py` lints and renders the chart through Helm's own library for the
//!   default values and for `charts/flywheel/ci/all-on-values.yaml`, validates every manifest
//!   against the Kubernetes schemas and the KEDA / prometheus-operator objects against their
//!   CRD schemas, runs `promtool check rules` on the alert rules, and checks that wrong values
//!   are refused naming the key;
//! - the config file the chart renders loads and validates as every service reads it;
//! - a short run of real `flywheel` processes (coordinator, trainer, worker, the task's reward
//!   service) on the real services is scraped: every scrape passes `promtool check metrics`,
//!   and every metric the dashboard and the alert rules use is one the binaries export.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Processes, RealRun, http_get, stores_toml};
use flywheel::config::{FileConfig, load_with_env};
use flywheel_model::{ModelConfig, Tokenizer};
use flywheel_storage::state::StateStore;
use flywheel_storage::testkit::free_port;

const DEADLINE: Duration = Duration::from_secs(300);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The chart tools' Python, or a failure that says how to install them.
fn chart_python() -> PathBuf {
    let python = root().join(".services/chart-venv/bin/python");
    assert!(
        python.exists() && which("node") && which("promtool"),
        "the chart tools are missing (need {}, node and promtool): run scripts/chart_tools.sh \
         (scripts/test.sh does)",
        python.display()
    );
    python
}

fn which(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs the chart checks into `out`; panics with their output when one fails.
fn check_chart(out: &Path) {
    let run = Command::new(chart_python())
        .arg(root().join("scripts/check_chart.py"))
        .arg("--out")
        .arg(out)
        .output()
        .expect("run scripts/check_chart.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    println!("{text}");
    assert!(run.status.success(), "the chart checks failed:\n{text}");
}

#[test]
fn the_chart_lints_renders_and_validates_and_its_config_loads() {
    let out = tempfile::tempdir().unwrap();
    check_chart(out.path());
    for values in ["defaults", "all-on"] {
        let path = out.path().join(format!("{values}.toml"));
        let config: FileConfig = load_with_env(Some(&path), Vec::new())
            .unwrap_or_else(|e| panic!("{values}: the rendered config does not load: {e:#}"));
        config.run().validate().unwrap();
        config.worker().validate().unwrap();
        config.coordinator().validate().unwrap();
        // A checkpoint named by an object-store URL is downloaded at start-up; validate the
        // rest without it.
        let mut trainer = config.trainer(true);
        trainer.trainer.hf_model.clear();
        trainer.validate().unwrap();
    }
}

/// The metric families (`# TYPE` lines) of an exposition.
fn families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// `promtool check metrics` on one scrape.
fn promtool_check_metrics(name: &str, exposition: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (scripts/chart_tools.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "promtool check metrics on the {name}'s /metrics:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_use_is_exported() {
    let out = tempfile::tempdir().unwrap();
    check_chart(out.path());
    let referenced: BTreeSet<String> =
        std::fs::read_to_string(out.path().join("referenced-metrics.txt"))
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();

    let RealRun {
        run_id,
        s3,
        state,
        test_ledger,
        dir,
    } = RealRun::new("chart").await;
    let ports = [free_port(), free_port(), free_port(), free_port()];
    let [coordinator, worker, trainer, rewards] = ports.map(|p| format!("127.0.0.1:{p}"));
    let model = ModelConfig {
        d_model: 16,
        n_layers: 1,
        n_heads: 2,
        d_ff: 32,
        max_seq_len: 40,
        ..ModelConfig::tiny(Tokenizer::arithmetic().vocab_size())
    };
    let config = format!(
        r#"{stores}
[rollout]
version_budget_tokens = 512
segment_tokens = 8
max_response_tokens = 24

[batch]
token_budget = 256
# The briefly warm-started model solves little: train every group, so steps keep coming.
filter_zero_variance = false

[task]
max_terms = 3
group_size = 4

[coordinator]
bind = "{coordinator}"
tick_ms = 100

[worker]
metrics_addr = "{worker}"
poll_interval_ms = 50

[worker.engine]
kind = "builtin"
weights_wait_ms = 600000

[worker.rewards.services]
addition = "http://{rewards}/reward"

[trainer]
poll_ms = 50
metrics_addr = "{trainer}"
checkpoint_every = 2

[trainer.model]
{model}
"#,
        stores = stores_toml(&run_id, &s3.url(&run_id), test_ledger.url(), ""),
        model = toml::to_string(&model).unwrap(),
    );
    let path = dir.join("flywheel.toml");
    std::fs::write(&path, config).unwrap();
    let path = path.to_str().unwrap();
    let mut procs = Processes::new(&dir);
    procs.spawn("rewards", &["rewards", "--bind", &rewards], &[]);
    procs.spawn("coordinator", &["coordinator", "--config", path], &[]);
    procs.spawn(
        "trainer",
        &["trainer", "--config", path, "--warm-start-steps", "20"],
        &[],
    );
    procs.spawn("worker", &["worker", "--config", path], &[]);
    let ingest = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(["ingest", "--config", path, "--demo-task", "60"])
        .output()
        .expect("run flywheel ingest");
    assert!(
        ingest.status.success(),
        "flywheel ingest failed: {}",
        String::from_utf8_lossy(&ingest.stderr)
    );
    procs
        .wait_until(&[], "two steps trained", DEADLINE, || async {
            state.finished_step().await.unwrap().is_some_and(|s| s >= 1)
        })
        .await;
    // The consumer lag comes with librdkafka's statistics, every few seconds.
    let worker_metrics = format!("http://{worker}/metrics");
    procs
        .wait_until(&[], "the worker's consumer lag", DEADLINE, || async {
            http_get(&worker_metrics)
                .await
                .contains("flywheel_worker_kafka_consumer_lag{")
        })
        .await;

    let mut exported = BTreeSet::new();
    for (name, addr) in [
        ("coordinator", &coordinator),
        ("worker", &worker),
        ("trainer", &trainer),
    ] {
        let exposition = http_get(&format!("http://{addr}/metrics")).await;
        promtool_check_metrics(name, &exposition);
        exported.extend(families(&exposition));
    }
    procs.stop();
    let missing: Vec<&String> = referenced.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard or the alert rules use metrics no binary exports: {missing:?}\n\
         exported: {exported:?}"
    );
    println!(
        "{} metrics referenced, all among the {} exported",
        referenced.len(),
        exported.len()
    );
    test_ledger.teardown().await;
}
