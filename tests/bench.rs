//! Each `flywheel bench` runs once on a tiny configuration, to prove that it works and prints
//! its comparison and how to reproduce it. Nothing here asserts on time.

mod common;

use std::process::Command;

use common::stores_toml;
use flywheel_storage::blob::BlobStore;
use flywheel_storage::ledger::conformance::TestLedger;
use flywheel_storage::testkit::{self, S3Server};

/// The benches that start the platform run one at a time: each measures a window of a second
/// or two, which two cores shared with another platform can leave empty.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `flywheel bench ARGS`; returns its stdout, failing with its stderr.
fn bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "flywheel bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("reproduce: "), "{stdout}");
    stdout
}

#[test]
fn trainer_bench_runs() {
    let out = bench(&[
        "trainer",
        "--batch",
        "1",
        "--seq-len",
        "16",
        "--iters",
        "1",
        "--sample-tokens",
        "4",
    ]);
    assert!(out.contains("tokens/s"), "{out}");
}

/// On the S3 server, and it leaves nothing behind.
#[tokio::test]
async fn weights_bench_runs_on_s3_and_cleans_up() {
    let s3 = S3Server::from_env();
    let prefix = testkit::unique_id("bench-weights");
    let url = s3.url(&prefix);
    let out = bench(&["weights", "--versions", "2", "--blob-url", &url]);
    for line in [
        "publish incremental / whole: bytes",
        "load from v-1 / from scratch: bytes",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
    let rows = out
        .lines()
        .filter(|l| {
            l.split('|')
                .next()
                .is_some_and(|v| v.trim().parse::<u64>().is_ok())
        })
        .count();
    assert_eq!(rows, 2, "a row per version:\n{out}");
    assert!(
        !out.contains(&s3.secret_key),
        "the S3 secret is printed:\n{out}"
    );
    let left = BlobStore::open(&url).unwrap().list("").await.unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The three modes, one measured step each, on the test services (Redis, PostgreSQL, Kafka,
/// S3) with a sim engine that costs no time; the plots land in `--out`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_bench_runs_every_mode_on_the_services() {
    let dir = tempfile::tempdir().unwrap();
    let out = bench_on_services(&[
        "modes",
        "--steps",
        "1",
        "--workers",
        "1",
        "--slots",
        "4",
        "--decode-tokens-per-s",
        "0",
        "--length-median",
        "16",
        "--length-cap",
        "64",
        "--token-budget",
        "256",
        "--segment-tokens",
        "16",
        "--out",
        dir.path().to_str().unwrap(),
    ])
    .await;
    assert_pngs(dir.path(), &["step_time.png", "rollout_time.png"]);
    for line in [
        "Sync: end-to-end per step",
        "Partial: end-to-end per step",
        "Async: end-to-end per step",
        "Partial/sync: trained tokens/s",
        "Async/sync: trained tokens/s",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
}

/// One worker count for a second and a small step cut, on the test services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataplane_bench_runs_on_the_services() {
    let out = bench_on_services(&[
        "dataplane",
        "--workers",
        "1",
        "--seconds",
        "2",
        "--cut-prompts",
        "8",
        "--cut-group-size",
        "2",
    ])
    .await;
    for line in [
        "1 workers: ",
        "segments/s, ",
        "commit latency p50 ",
        "alone at concurrency 16: state store ",
        "of the slower store's limit",
        "step cut: 8 prompts x 2 samples x 50 tokens = Φ 800 tokens",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
}

/// `flywheel bench ARGS --config F` with F naming the test services (a fresh ledger schema,
/// a fresh object-store prefix).
async fn bench_on_services(args: &[&str]) -> String {
    let _serial = SERIAL.lock().await;
    let s3 = S3Server::from_env();
    let ledger = TestLedger::postgres().await;
    let prefix = testkit::unique_id(&format!("bench-{}", args[0]));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flywheel.toml");
    std::fs::write(
        &config,
        stores_toml(&prefix, &s3.url(&prefix), ledger.url(), ""),
    )
    .unwrap();
    let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    args.extend(["--config".to_owned(), config.to_str().unwrap().to_owned()]);
    let out = tokio::task::spawn_blocking(move || {
        bench(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    ledger.teardown().await;
    out
}

#[test]
fn weights_bench_refuses_bad_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(["bench", "weights", "--lr", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--lr must be a positive number"));
}

/// Both arms on the demo's `--quick` setup, one seed: every run's line, the per-arm summary,
/// the verdict, and the CSV and plots in `--out`.
#[test]
fn icepop_bench_runs_both_arms() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("icepop");
    let out = bench(&[
        "icepop",
        "--quick",
        "--seeds",
        "1",
        "--noise",
        "0.2",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    for line in ["grpo   seed 0:", "icepop seed 0:", "the paper's finding"] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
    let csv = std::fs::read_to_string(out_dir.join("runs.csv")).unwrap();
    assert!(csv.lines().any(|l| l.starts_with("grpo,0,")), "{csv}");
    assert!(csv.lines().any(|l| l.starts_with("icepop,0,")), "{csv}");
    assert_pngs(
        &out_dir,
        &[
            "reward.png",
            "held_out_accuracy.png",
            "mean_abs_log_k.png",
            "masked_fraction.png",
            "grad_norm.png",
        ],
    );
}

/// Fails unless each of `files` in `dir` is a PNG.
fn assert_pngs(dir: &std::path::Path, files: &[&str]) {
    for png in files {
        let bytes = std::fs::read(dir.join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{png} is not a PNG");
    }
}
