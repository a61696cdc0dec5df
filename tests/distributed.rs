//! The demo's RL job distributed over real processes and real services, on a
//! short schedule: the task's reward service, a coordinator, a trainer (which warm-starts
//! the model and publishes it as version 0) and two builtin-engine workers, each a `flywheel`
//! process reading one config; the task's prompts ingested with `flywheel ingest --demo-task`.
//! One worker is killed with SIGKILL once the second step is trained. The test then checks
//! that
//!
//! - the run finishes: every ingested prompt is settled in the ledger, the recorded steps are
//!   0..=last without gaps, at least [`MIN_STEPS`] of them, and the trainer trained the last
//!   one;
//! - every ingested prompt is trained in exactly one step or dropped with a reason (the
//!   ledger, `flywheel::demo::run::check_accounting`);
//! - the policy learns: held-out accuracy of the last published version is at least
//!   [`MIN_GAIN_POINTS`] above that of version 0 (the warm start), both read back from the
//!   object store and evaluated on the same problems and random draws. (Mean reward by
//!   finishing version is not the measure: with a finite prompt set in partial mode the last
//!   versions mostly finish the long, parked, harder trajectories.)
//!
//! Schedule: a 2-layer d=32 model, problems of 2 to 4 terms, K = 8, Φ = 1024, Φ_r = 2560,
//! S = 8, partial mode (C3PO++), 1,000 prompts (about 55 steps), 400 warm-start steps, AdamW
//! lr 3e-4 falling linearly to 3e-5 over 60 steps. Φ_r is 2.5 Φ: about as many tokens per
//! version as a step trains once zero-variance groups are dropped, so complete groups do not
//! pile up and go stale.
//!
//! The workers run with the default `max_pending_trajectories`: the survivor's intake pauses
//! its partitions when its backlog is full and keeps polling, so it completes the rebalance
//! after the SIGKILL and takes the dead worker's partitions.
//!
//! Services (an unreachable one fails the test, naming it; `scripts/services.sh` starts them):
//! Redis `FLYWHEEL_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`), PostgreSQL
//! `FLYWHEEL_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`, a
//! fresh schema per run), Kafka `FLYWHEEL_TEST_KAFKA_BROKERS` (default `127.0.0.1:9092`), S3
//! `FLYWHEEL_TEST_S3_ENDPOINT` (default `http://127.0.0.1:8014`, bucket `flywheel-test`).
//!
//! No assertion is on durations; waits are bounded by a generous deadline that names what
//! did not happen, and the service logs are printed on failure.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::{Processes, RealRun, stores_toml};
use flywheel_model::{Model, ModelConfig, Params, TextCodec, Tokenizer};
use flywheel_storage::blob::BlobStore;
use flywheel_storage::ledger::PromptStatus;
use flywheel_storage::state::StateStore;
use flywheel_storage::testkit::free_port;
use flywheel_storage::weights::{self, WeightsConfig};
use flywheel_task::{TaskSection, held_out_set};

/// Prompts ingested.
const PROMPTS: usize = 1000;
/// Supervised warm-start steps: enough for the format, few enough to leave room to learn.
const WARM_START_STEPS: usize = 400;
/// The run must record at least this many steps (Φ = 1024 tokens; ~18 prompts a step).
const MIN_STEPS: u64 = 10;
/// `[rollout] max_response_tokens`, also the evaluation's limit.
const MAX_RESPONSE_TOKENS: usize = 24;
/// Held-out problems evaluated with the first and the last weights.
const HELD_OUT: usize = 1000;
/// Seed of the held-out set and of its sampling streams.
const HELD_OUT_SEED: u64 = 7;
/// Held-out accuracy must rise by at least this many points from v0 to the last version (the
/// test prints what it measured). Both evaluations share their problems and random draws, so
/// their difference is steadier than either.
const MIN_GAIN_POINTS: f64 = 2.0;
/// Bound on every wait (the whole run takes well under it on 2 cores).
const DEADLINE: Duration = Duration::from_secs(900);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_run_survives_a_killed_worker() {
    let RealRun {
        run_id,
        s3,
        state,
        test_ledger,
        dir,
    } = RealRun::new("dist").await;
    let ledger = test_ledger.ledger();

    let coordinator_port = free_port();
    let rewards_port = free_port();
    let task = TaskSection {
        max_terms: 4,
        group_size: 8,
        ..TaskSection::default()
    };
    let blob_url = s3.url(&run_id);
    let model = ModelConfig {
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        d_ff: 128,
        max_seq_len: 40,
        ..ModelConfig::tiny(Tokenizer::arithmetic().vocab_size())
    };
    let config = format!(
        r#"{stores}
[rollout]
mode = "partial"
version_budget_tokens = 2560
segment_tokens = 8
max_response_tokens = {MAX_RESPONSE_TOKENS}
retention_limit = 4
lease_ms = 3000

[batch]
token_budget = 1024
micro_batch_tokens = 4096

[task]
max_terms = {max_terms}
group_size = {group_size}

[coordinator]
bind = "127.0.0.1:{coordinator_port}"
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
id = "trainer-0"
poll_ms = 50
rank_claim_ms = 10000
metrics_addr = "127.0.0.1:{trainer_port}"

[trainer.model]
{model_toml}
[trainer.optimizer]
lr = 0.0003
weight_decay = 0.0
decay_steps = 60
final_lr_fraction = 0.1
"#,
        stores = stores_toml(
            &run_id,
            &blob_url,
            test_ledger.url(),
            "session_timeout_ms = 6000\nauto_commit_interval_ms = 200",
        ),
        max_terms = task.max_terms,
        group_size = task.group_size,
        trainer_port = free_port(),
        model_toml = toml::to_string(&model).unwrap(),
    );
    let config_path = dir.join("flywheel.toml");
    std::fs::write(&config_path, config).unwrap();
    let config_arg = config_path.to_str().unwrap();

    let mut procs = Processes::new(&dir);
    let rewards_bind = format!("127.0.0.1:{rewards_port}");
    procs.spawn("rewards", &["rewards", "--bind", &rewards_bind], &[]);
    procs.spawn("coordinator", &["coordinator", "--config", config_arg], &[]);
    let warm = WARM_START_STEPS.to_string();
    procs.spawn(
        "trainer",
        &[
            "trainer",
            "--config",
            config_arg,
            "--warm-start-steps",
            &warm,
        ],
        &[],
    );
    for i in 0..2 {
        procs.spawn(
            &format!("worker-{i}"),
            &["worker", "--config", config_arg],
            &[
                ("FLYWHEEL_WORKER__ID", format!("worker-{i}")),
                (
                    "FLYWHEEL_WORKER__METRICS_ADDR",
                    format!("127.0.0.1:{}", free_port()),
                ),
            ],
        );
    }
    let ingest = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(["ingest", "--config", config_arg, "--demo-task"])
        .arg(PROMPTS.to_string())
        .args(["--seed", "1"])
        .output()
        .expect("run flywheel ingest");
    assert!(
        ingest.status.success(),
        "flywheel ingest failed: {}",
        String::from_utf8_lossy(&ingest.stderr)
    );

    // The warm start (version 0), read back before the trainer's garbage collection removes
    // it (it keeps the newest few versions).
    let blobs = BlobStore::open(&blob_url).unwrap();
    procs
        .wait_until(&[], "version 0 to be published", DEADLINE, || async {
            weights::exists(&blobs, &run_id, 0).await.unwrap()
        })
        .await;
    let v0 = weights::fetch(&blobs, &run_id, 0, None, &WeightsConfig::default())
        .await
        .unwrap();

    // Kill a worker mid-run: once the second step is trained.
    procs
        .wait_until(&[], "step 1 to be trained", DEADLINE, || async {
            state.finished_step().await.unwrap().is_some_and(|s| s >= 1)
        })
        .await;
    procs.kill("worker-1");

    // The run drains: every prompt settled, the last recorded step trained.
    let n = PROMPTS as u64;
    procs
        .wait_until_settled(
            &["worker-1"],
            (ledger.as_ref(), &state, &run_id),
            n,
            DEADLINE,
        )
        .await;
    let status = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(["status", "--json", "--url"])
        .arg(format!("http://127.0.0.1:{coordinator_port}"))
        .output()
        .expect("run flywheel status");
    assert!(
        status.status.success(),
        "flywheel status failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    procs.stop();

    // ---- the run finished ----
    let steps = ledger.steps(&run_id).await.unwrap();
    let numbers: Vec<u64> = steps.iter().map(|s| s.step).collect();
    assert_eq!(
        numbers,
        (0..steps.len() as u64).collect::<Vec<_>>(),
        "steps are recorded 0, 1, 2, … without gaps"
    );

    // ---- every prompt trained once or dropped with a reason ----
    let (trained, dropped) = flywheel::demo::run::check_accounting(ledger.as_ref(), &run_id)
        .await
        .unwrap();
    assert_eq!(trained + dropped, n, "every ingested prompt is settled");
    let ingested = task.prompts(PROMPTS, 1).unwrap();
    let mut reasons = BTreeMap::new();
    for p in &ingested {
        match ledger.prompt_status(&run_id, &p.id).await.unwrap() {
            Some(PromptStatus::Trained { .. }) => {}
            Some(PromptStatus::Dropped { reason, .. }) => {
                *reasons.entry(format!("{reason:?}")).or_insert(0u64) += 1;
            }
            other => panic!("prompt {} is {other:?}", p.id.0),
        }
    }

    eprintln!(
        "{} steps, {trained} prompts trained, {dropped} dropped ({reasons:?})",
        steps.len()
    );
    assert!(
        steps.len() as u64 >= MIN_STEPS,
        "only {} steps were recorded; the schedule plans at least {MIN_STEPS}",
        steps.len()
    );

    // ---- it learns: held-out accuracy of the warm start (v0) and of the last version ----
    let last = weights::latest_version(&blobs, &run_id)
        .await
        .unwrap()
        .expect("published versions");
    assert_eq!(
        Some(last),
        steps.last().map(|s| s.step + 1),
        "the last step published the newest version"
    );
    let config = task.task().unwrap();
    let held_out = held_out_set(&config, HELD_OUT_SEED, HELD_OUT).unwrap();
    let v_last = weights::fetch(&blobs, &run_id, last, None, &WeightsConfig::default())
        .await
        .unwrap();
    let mut accuracy = Vec::new();
    for fetched in [v0, v_last] {
        let params = Params::from_bytes_map(&model, &fetched.tensors).unwrap();
        let acc = flywheel_task::accuracy(
            &config,
            &Model::cpu(&params).unwrap(),
            &TextCodec::Chars(Tokenizer::arithmetic()),
            &held_out,
            MAX_RESPONSE_TOKENS,
            HELD_OUT_SEED,
        )
        .unwrap();
        accuracy.push(acc);
    }
    let gain = 100.0 * (accuracy[1] - accuracy[0]);
    eprintln!(
        "held-out accuracy ({HELD_OUT} problems): v0 (warm start) {:.1}%, v{last} {:.1}% \
         ({gain:+.1} points)",
        100.0 * accuracy[0],
        100.0 * accuracy[1]
    );
    assert!(
        gain >= MIN_GAIN_POINTS,
        "RL should raise held-out accuracy by at least {MIN_GAIN_POINTS} points, got \
         {gain:+.1} (v0 {:.1}% → v{last} {:.1}%); logs in {}",
        100.0 * accuracy[0],
        100.0 * accuracy[1],
        dir.display()
    );
    test_ledger.teardown().await;
}
