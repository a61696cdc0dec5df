//! `flywheel demo --quick` end to end in this process: the embedded Kafka queue, the workers
//! with the builtin engine, the coordinator and the trainer run a few steps of a tiny model.
//! This checks the plumbing and the bookkeeping, not that the model learns (that takes
//! minutes; `cargo run --release -- demo` shows it).

use clap::Parser;
use flywheel::demo::args::DemoArgs;
use flywheel::demo::report::MetricsDocument;
use flywheel::demo::run::{check_accounting, run};

/// Parses demo options the way the binary does.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    demo: DemoArgs,
}

/// A policy that never solves the task has every group filtered (one reward for all its
/// samples), so no step is ever trained; the demo says so after `--stall-secs` instead of
/// feeding prompts for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_that_trains_nothing_stops_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    // An untrained model (no warm start) with the zero-variance filter on (no `--quick`),
    // sampled from weights drowned in noise: the logits saturate, the K samples of a prompt
    // are the same text, and every group has one reward.
    let cli = Cli::parse_from([
        "demo",
        "--engine-weight-noise=1000",
        "--steps=3",
        "--d-model=16",
        "--layers=1",
        "--heads=2",
        "--sft-steps=0",
        "--eval-size=16",
        "--eval-every=0",
        "--group-size=4",
        "--token-budget=128",
        "--version-budget=1024",
        "--segment-tokens=8",
        "--max-terms=6",
        "--stall-secs=5",
        &format!("--out={}", out.display()),
    ]);
    let ran = tokio::time::timeout(std::time::Duration::from_secs(120), run(cli.demo))
        .await
        .expect("the demo stops on its own");
    let err = format!("{:#}", ran.expect_err("a run that trains nothing fails"));
    assert!(err.contains("no step was trained for 5 s"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quick_demo_writes_its_report_and_accounts_for_every_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let cli = Cli::parse_from([
        "demo",
        "--quick",
        "--steps",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    let outcome = run(cli.demo).await.expect("the quick demo runs to its end");

    // The report folder holds every file the report promises.
    let report_files = [
        "report.html",
        "metrics.json",
        "metrics.csv",
        "reward_accuracy.png",
        "tokens_per_second.png",
        "staleness.png",
        "icepop_masked.png",
        "step_time.png",
    ];
    for file in report_files {
        let path = out.join(file);
        let len = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{} is missing: {e}", path.display()))
            .len();
        assert!(len > 0, "{} is empty", path.display());
    }
    let doc: MetricsDocument =
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    assert!(!doc.steps.is_empty(), "no RL step was trained");
    // (Floats are compared through JSON only loosely: serde_json's default parser may round
    // the last bit.)
    let key =
        |s: &flywheel::demo::report::StepMetrics| (s.step, s.policy_version, s.tokens_trained);
    assert_eq!(
        doc.steps.iter().map(key).collect::<Vec<_>>(),
        outcome.steps.iter().map(key).collect::<Vec<_>>()
    );
    assert!(doc.steps.windows(2).all(|w| w[0].step < w[1].step));
    assert!(doc.steps.iter().all(|s| s.tokens_trained > 0));
    assert!(
        (0.0..=1.0).contains(&doc.summary.warm_start_accuracy)
            && (0.0..=1.0).contains(&doc.summary.final_accuracy)
    );
    // The run's objects are gone: the folder keeps the report and the ledger, nothing else.
    for entry in std::fs::read_dir(&out).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            report_files.contains(&name.as_str()) || name.starts_with("ledger.db"),
            "{name} is left behind in the report folder"
        );
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("reward_accuracy.png"));

    let ledger = assert_accounted(&outcome).await;
    let steps = ledger.steps(&outcome.run_id).await.unwrap();
    assert_eq!(
        steps.len(),
        doc.steps.len(),
        "one report row per committed step"
    );
}

/// `flywheel demo --quick --model DIR` runs the same loop on a Hugging Face checkpoint of each
/// architecture (the committed tiny random ones): its tokenizer reads the task, its weights
/// start the warm start, and every prompt is accounted for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quick_demo_trains_a_checkpoint_of_each_architecture() {
    for name in ["qwen2", "llama", "qwen3"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("report");
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("model/tests/fixtures/hf")
            .join(name);
        let cli = Cli::parse_from([
            "demo",
            "--quick",
            "--steps",
            "2",
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let outcome = run(cli.demo)
            .await
            .expect("the quick demo runs on a checkpoint");
        assert!(!outcome.steps.is_empty(), "{name}: no RL step was trained");
        assert_accounted(&outcome).await;
    }
}

/// The ledger accounts for every prompt the demo sent: each accepted, then trained in exactly
/// one step or dropped with a reason; none left pending; the audit found nothing wrong.
/// Returns the ledger.
async fn assert_accounted(
    outcome: &flywheel::demo::run::DemoOutcome,
) -> std::sync::Arc<dyn flywheel_storage::ledger::Ledger> {
    let ledger = flywheel_storage::ledger::open(&outcome.ledger_url)
        .await
        .unwrap();
    let (trained, dropped) = check_accounting(ledger.as_ref(), &outcome.run_id)
        .await
        .unwrap();
    assert!(outcome.prompts_sent > 0);
    assert_eq!(trained + dropped, outcome.prompts_sent);
    assert!(trained > 0);
    let audit = &outcome.audit;
    assert!(audit.violations.is_empty(), "{}", audit.summary());
    assert_eq!(
        audit.messages_checked + audit.messages_unconsumed,
        outcome.prompts_sent,
        "the audit reads back every message sent"
    );
    assert!(audit.segments_verified > 0, "{}", audit.summary());
    ledger
}
