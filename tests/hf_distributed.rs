//! A distributed run of a Hugging Face checkpoint on the real services: the tiny random Qwen2
//! fixture (model/tests/fixtures/hf/qwen2), uploaded to the object store and named by its URL
//! (`[trainer] hf_model = "s3://…"`; each process downloads it into its cache), trained by a
//! `flywheel trainer`, sampled by a builtin-engine `flywheel worker` that reads text with the
//! checkpoint's tokenizer and stops at its EOS, on prompts from a GSM8K-style dataset file
//! (`flywheel ingest --jsonl`, through the chat template). The test checks that
//!
//! - the run finishes: every prompt is trained in exactly one step or dropped with a reason
//!   (the ledger's accounting), over steps 0..=last without gaps;
//! - versions were published, and the newest exports (`flywheel weights export`) to a
//!   checkpoint directory of the same architecture, tokenizer and EOS, whose weights differ
//!   from the checkpoint's (optimizer steps were applied; with zero advantages that shows the
//!   plumbing, not learning).
//!
//! The random model solves nothing, so every group's rewards are equal: the run keeps such
//! groups (`filter_zero_variance = false`) so that steps train. Services as in
//! tests/distributed.rs.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Processes, RealRun, stores_toml};
use flywheel_model::Checkpoint;
use flywheel_storage::blob::BlobStore;
use flywheel_storage::testkit::free_port;
use flywheel_storage::weights;

/// Dataset lines ingested.
const PROMPTS: usize = 24;
/// Bound on every wait.
const DEADLINE: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qwen2_checkpoint_trains_distributed_and_exports() {
    let RealRun {
        run_id,
        s3,
        state,
        test_ledger,
        dir,
    } = RealRun::new("hf-dist").await;
    let ledger = test_ledger.ledger();
    let checkpoint =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("model/tests/fixtures/hf/qwen2");

    let dataset = dir.join("questions.jsonl");
    let lines: Vec<String> = (0..PROMPTS)
        .map(|i| {
            serde_json::json!({
                "question": format!("What is {i} + {}?", i + 1),
                "answer": format!("The sum is {}.\n#### {}", 2 * i + 1, 2 * i + 1),
            })
            .to_string()
        })
        .collect();
    std::fs::write(&dataset, lines.join("\n")).unwrap();

    let blob_url = s3.url(&run_id);
    // The checkpoint, uploaded next to the run's objects.
    let checkpoint_url = s3.url(&format!("{run_id}-checkpoint"));
    let upload = BlobStore::open(&checkpoint_url).unwrap();
    for entry in std::fs::read_dir(&checkpoint).unwrap() {
        let entry = entry.unwrap();
        let bytes = std::fs::read(entry.path()).unwrap();
        upload
            .put(entry.file_name().to_str().unwrap(), bytes.into())
            .await
            .unwrap();
    }
    let config = format!(
        r#"{stores}
[rollout]
mode = "partial"
version_budget_tokens = 96
segment_tokens = 4
max_response_tokens = 8
lease_ms = 3000

[batch]
token_budget = 64
micro_batch_tokens = 1024
filter_zero_variance = false

[coordinator]
bind = "127.0.0.1:{coordinator_port}"
tick_ms = 100

[worker]
slots = 2
poll_interval_ms = 50

[worker.engine]
kind = "builtin"
slots = 2
weights_wait_ms = 300000

[trainer]
id = "trainer-0"
poll_ms = 50
hf_model = "{checkpoint_url}"
metrics_addr = "127.0.0.1:{trainer_port}"
"#,
        stores = stores_toml(&run_id, &blob_url, test_ledger.url(), ""),
        coordinator_port = free_port(),
        trainer_port = free_port(),
        checkpoint_url = checkpoint_url,
    );
    let config_path = dir.join("flywheel.toml");
    std::fs::write(&config_path, config).unwrap();
    let config_arg = config_path.to_str().unwrap();

    // Each process its own download cache, as on separate machines.
    let cache = |name: &str| {
        (
            "FLYWHEEL_CACHE_DIR",
            dir.join(format!("cache-{name}")).display().to_string(),
        )
    };
    let mut procs = Processes::new(&dir);
    procs.spawn("coordinator", &["coordinator", "--config", config_arg], &[]);
    procs.spawn(
        "trainer",
        &["trainer", "--config", config_arg],
        &[cache("trainer")],
    );
    procs.spawn(
        "worker",
        &["worker", "--config", config_arg],
        &[
            (
                "FLYWHEEL_WORKER__METRICS_ADDR",
                format!("127.0.0.1:{}", free_port()),
            ),
            cache("worker"),
        ],
    );
    let ingest = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .env("FLYWHEEL_CACHE_DIR", dir.join("cache-ingest"))
        .args(["ingest", "--config", config_arg, "--jsonl"])
        .arg(&dataset)
        .args(["--prompt-field", "question", "--answer-field", "answer"])
        .args(["--chat-template", "--group-size", "2"])
        .output()
        .expect("run flywheel ingest");
    assert!(
        ingest.status.success(),
        "flywheel ingest failed: {}",
        String::from_utf8_lossy(&ingest.stderr)
    );

    let n = PROMPTS as u64;
    procs
        .wait_until_settled(&[], (ledger.as_ref(), &state, &run_id), n, DEADLINE)
        .await;
    procs.stop();

    let steps = ledger.steps(&run_id).await.unwrap();
    let numbers: Vec<u64> = steps.iter().map(|s| s.step).collect();
    assert!(!numbers.is_empty(), "no step was recorded");
    assert_eq!(numbers, (0..steps.len() as u64).collect::<Vec<_>>());
    let (trained, dropped) = flywheel::demo::run::check_accounting(ledger.as_ref(), &run_id)
        .await
        .unwrap();
    assert_eq!(trained + dropped, n, "every ingested prompt is settled");
    assert!(
        trained > 0,
        "nothing was trained ({dropped} dropped); logs in {}",
        dir.display()
    );

    let blobs = BlobStore::open(&blob_url).unwrap();
    let last = weights::latest_version(&blobs, &run_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Some(last), steps.last().map(|s| s.step + 1));
    let out = dir.join("export");
    let export = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .env("FLYWHEEL_CACHE_DIR", dir.join("cache-export"))
        .args(["weights", "export", "--config", config_arg, "--out"])
        .arg(&out)
        .output()
        .expect("run flywheel weights export");
    assert!(
        export.status.success(),
        "flywheel weights export failed: {}",
        String::from_utf8_lossy(&export.stderr)
    );
    let original = Checkpoint::open(&checkpoint, None).unwrap();
    let exported = Checkpoint::open(&out, None).unwrap();
    assert_eq!(exported.config, original.config);
    assert_eq!(exported.eos, original.eos);
    assert!(out.join("tokenizer.json").is_file());
    assert_ne!(
        exported.params, original.params,
        "the exported version was trained"
    );
    eprintln!(
        "{} steps, {trained} prompts trained, {dropped} dropped; v{last} exported to {}",
        steps.len(),
        out.display()
    );
}
