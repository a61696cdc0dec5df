//! The conformance suite every [`Ledger`] backend must pass (DESIGN.md §9), and fixtures that
//! open isolated ledgers on the real engines.
//!
//! This is test support: the cases and fixtures panic on failure, as tests do. A backend's
//! integration test runs the whole suite with one line:
//!
//! ```text
//! flywheel_storage::ledger_conformance_tests!(TestLedger::postgres());
//! ```
//!
//! Every case works in runs of its own (random run ids), so cases never see each other's data
//! even when they share a database.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tempfile::TempDir;

use super::{
    Checkpoint, DropReason, EventKind, Ledger, LedgerError, PromptCounts, PromptStatus, Recorded,
    RunControls, RunEvent, StepRecord, open,
};
use crate::testkit::{POSTGRES_URL_ENV, postgres_url};
use crate::types::{Prompt, PromptId, PromptInput, StepId, VerifierSpec};

/// An isolated ledger for one test, and what to clean up after it.
pub struct TestLedger {
    /// The URL the ledger was opened with (opening it again reaches the same data, except
    /// for `sqlite::memory:`).
    url: String,
    /// The ledger under test.
    ledger: Arc<dyn Ledger>,
    /// What the fixture created and must remove.
    cleanup: Cleanup,
}

/// What a fixture removes after its test.
enum Cleanup {
    /// Nothing (an in-memory database goes with its pool).
    Nothing,
    /// A temporary directory holding an SQLite file (removed when dropped).
    Directory(TempDir),
    /// A PostgreSQL schema made for the test, and a connection to drop it with.
    Schema {
        /// A connection to the server's default schema.
        admin: PgConnection,
        /// The schema's name.
        schema: String,
    },
}

impl TestLedger {
    /// A ledger in a fresh SQLite file in a temporary directory.
    pub async fn sqlite_file() -> Self {
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("ledger.db").display()
        );
        let ledger = open(&url)
            .await
            .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
        TestLedger {
            url,
            ledger,
            cleanup: Cleanup::Directory(dir),
        }
    }

    /// A ledger in a private in-memory SQLite database.
    pub async fn sqlite_memory() -> Self {
        let url = "sqlite::memory:".to_owned();
        let ledger = open(&url)
            .await
            .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
        TestLedger {
            url,
            ledger,
            cleanup: Cleanup::Nothing,
        }
    }

    /// A ledger in a fresh schema of the PostgreSQL server at [`postgres_url`].
    ///
    /// # Panics
    /// When the server is unreachable, naming it and how to start it: a test that needs
    /// PostgreSQL fails rather than skips.
    pub async fn postgres() -> Self {
        let url = postgres_url();
        // One plain connection, not a pool: a pool retries a refused connection until its
        // timeout and then reports only the timeout.
        let mut admin = PgConnection::connect(&url).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is unreachable at {} ({e}): start it with scripts/services.sh or \
                 point {POSTGRES_URL_ENV} at a running server",
                flywheel_service::redact_url(&url)
            )
        });
        let schema = format!("flywheel_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("cannot create schema {schema} at {url}: {e}"));
        let separator = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{separator}options[search_path]={schema}");
        let ledger = open(&url)
            .await
            .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
        TestLedger {
            url,
            ledger,
            cleanup: Cleanup::Schema { admin, schema },
        }
    }

    /// The ledger under test.
    pub fn ledger(&self) -> Arc<dyn Ledger> {
        Arc::clone(&self.ledger)
    }

    /// The URL the ledger was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Removes what the fixture created. (A failed test skips this and leaves its schema or
    /// nothing behind: schemas are named `flywheel_test_*`.)
    pub async fn teardown(self) {
        let TestLedger {
            ledger, cleanup, ..
        } = self;
        drop(ledger);
        match cleanup {
            Cleanup::Nothing => {}
            Cleanup::Directory(dir) => {
                let path = dir.path().display().to_string();
                dir.close()
                    .unwrap_or_else(|e| panic!("cannot remove {path}: {e}"));
            }
            Cleanup::Schema { mut admin, schema } => {
                sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                    .execute(&mut admin)
                    .await
                    .unwrap_or_else(|e| panic!("cannot drop schema {schema}: {e}"));
                // Closing politely is best effort: the schema is already gone.
                let _ = admin.close().await;
            }
        }
    }
}

/// Generates one `#[tokio::test]` per conformance case, each on a fresh ledger from `$fixture`
/// (an expression evaluating to a future of a [`TestLedger`]).
#[macro_export]
macro_rules! ledger_conformance_tests {
    ($fixture:expr) => {
        $crate::ledger_conformance_tests!(@cases $fixture;
            runs_are_created_once,
            accepting_a_prompt_is_idempotent,
            dropping_a_prompt_happens_once,
            recording_a_step_trains_its_prompts,
            replaying_a_step_is_idempotent,
            a_conflicting_step_changes_nothing,
            a_prompt_is_trained_at_most_once,
            dropped_and_unknown_prompts_are_never_trained,
            a_deposed_leader_cannot_write,
            steps_are_recorded_in_order,
            a_large_step_commits_all_or_nothing,
            checkpoints_keep_last_n,
            runs_are_isolated,
            concurrent_step_commits_claim_a_prompt_once,
            concurrent_replays_commit_once,
            concurrent_drop_and_train_agree,
            rejecting_an_input_records_it_dropped,
            events_are_recorded_once_per_key,
            controls_are_durable_and_fenced,
        );
    };
    (@cases $fixture:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $fixture.await;
                $crate::ledger::conformance::$case(fixture.ledger()).await;
                fixture.teardown().await;
            }
        )*
    };
}

/// A rejected input is recorded as dropped without ever being accepted, once; a later
/// accept of the same id adds nothing, and the id of an accepted prompt cannot be rejected.
/// Not a leader write: it works whatever leader token the run has seen.
pub async fn rejecting_an_input_records_it_dropped(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let run = new_run(ledger).await;
    // A leader has written: the intake's rejection still goes through.
    ledger
        .set_controls(&run, &RunControls::default(), 9)
        .await
        .unwrap();
    accept(ledger, &run, &["ok"]).await;
    let bad = PromptId::from("bad-tokens");
    let malformed = DropReason::Malformed;
    for expected in [Recorded::New, Recorded::Existing] {
        assert_eq!(
            ledger
                .reject_prompt(&run, &bad, malformed, "token 99 >= vocab 20")
                .await
                .unwrap(),
            expected
        );
        assert_eq!(ledger.prompt(&run, &bad).await.unwrap(), None, "no content");
    }
    assert_eq!(
        status(ledger, &run, "bad-tokens").await,
        Some(PromptStatus::Dropped {
            reason: malformed,
            detail: "token 99 >= vocab 20".into()
        })
    );
    match ledger
        .reject_prompt(&run, &bad, DropReason::Oversized, "")
        .await
    {
        Err(LedgerError::PromptAlreadyDropped { reason, .. }) => assert_eq!(reason, malformed),
        other => panic!("another reason must be refused, got {other:?}"),
    }
    match ledger
        .reject_prompt(&run, &PromptId::from("ok"), malformed, "")
        .await
    {
        Err(LedgerError::PromptIdReused { .. }) => {}
        other => panic!("an accepted id cannot be rejected, got {other:?}"),
    }
    assert_eq!(counts(ledger, &run).await, (1, 0, 1));
    match ledger
        .reject_prompt(&new_run_id(), &bad, malformed, "")
        .await
    {
        Err(LedgerError::RunNotFound { .. }) => {}
        other => panic!("an unknown run must fail, got {other:?}"),
    }
}

/// Events are recorded once per key, read back oldest first, and kept per run.
pub async fn events_are_recorded_once_per_key(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let run = new_run(ledger).await;
    let widened = RunEvent {
        key: "budget-widened/v3/total-200".into(),
        kind: EventKind::BudgetWidened,
        detail: "version 3: 100 -> 200 tokens".into(),
    };
    let regenerated = RunEvent {
        key: "regenerated/p#1/epoch-4".into(),
        kind: EventKind::Regenerated,
        detail: "p#1 outlived σ".into(),
    };
    assert_eq!(
        ledger.record_event(&run, &widened).await.unwrap(),
        Recorded::New
    );
    assert_eq!(
        ledger.record_event(&run, &regenerated).await.unwrap(),
        Recorded::New
    );
    assert_eq!(
        ledger.record_event(&run, &widened).await.unwrap(),
        Recorded::Existing
    );
    let events = ledger.events(&run).await.unwrap();
    assert_eq!(events.len(), 2);
    assert!(events.contains(&widened) && events.contains(&regenerated));
    assert!(ledger.events(&new_run_id()).await.unwrap().is_empty());
    match ledger.record_event(&new_run_id(), &widened).await {
        Err(LedgerError::RunNotFound { .. }) => {}
        other => panic!("an unknown run must fail, got {other:?}"),
    }
}

/// The controls start at their defaults, are set by the live leader only, and read back; the
/// newest leader token is kept.
pub async fn controls_are_durable_and_fenced(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let run = new_run(ledger).await;
    assert_eq!(ledger.controls(&run).await.unwrap(), RunControls::default());
    let paused = RunControls {
        paused: true,
        version_budget_tokens: Some(5120),
    };
    assert_eq!(ledger.leader_token(&run).await.unwrap(), 0);
    ledger.set_controls(&run, &paused, 2).await.unwrap();
    assert_eq!(ledger.controls(&run).await.unwrap(), paused);
    assert_eq!(ledger.leader_token(&run).await.unwrap(), 2);
    match ledger.set_controls(&run, &RunControls::default(), 1).await {
        Err(LedgerError::LeaderFenced { token, newest, .. }) => assert_eq!((token, newest), (1, 2)),
        other => panic!("a deposed leader must be fenced, got {other:?}"),
    }
    assert_eq!(
        ledger.controls(&run).await.unwrap(),
        paused,
        "nothing written"
    );
    ledger
        .set_controls(&run, &RunControls::default(), 3)
        .await
        .unwrap();
    assert_eq!(ledger.controls(&run).await.unwrap(), RunControls::default());
    assert_eq!(ledger.leader_token(&run).await.unwrap(), 3);
    assert_eq!(
        ledger.controls(&new_run_id()).await.unwrap(),
        RunControls::default()
    );
    assert_eq!(ledger.leader_token(&new_run_id()).await.unwrap(), 0);
}

/// A fresh run id.
fn new_run_id() -> String {
    format!("run-{}", uuid::Uuid::new_v4().simple())
}

/// Creates a fresh run and returns its id.
async fn new_run(ledger: &dyn Ledger) -> String {
    let run = new_run_id();
    let config = serde_json::json!({ "token_budget": 4096, "mode": "partial" });
    assert_eq!(
        ledger.create_run(&run, &config).await.unwrap(),
        Recorded::New
    );
    run
}

/// A prompt with id `id`.
fn prompt(id: &str) -> Prompt {
    Prompt {
        id: PromptId::from(id),
        input: PromptInput::Text(format!("What is the answer to {id}?")),
        verifier: VerifierSpec::ExactMatch {
            answer: "42".into(),
        },
        group_size: 4,
        metadata: [("source".to_owned(), "conformance".to_owned())].into(),
    }
}

/// Accepts prompts with these ids.
async fn accept(ledger: &dyn Ledger, run: &str, ids: &[&str]) {
    for id in ids {
        assert_eq!(
            ledger.accept_prompt(run, &prompt(id)).await.unwrap(),
            Recorded::New
        );
    }
}

/// A step record training `ids`.
fn step(number: StepId, ids: &[&str]) -> StepRecord {
    StepRecord {
        step: number,
        manifest_key: format!("manifests/step-{number:08}.json"),
        prompts: ids.iter().map(|id| PromptId::from(*id)).collect(),
        total_tokens: 100 * ids.len() as u64,
        world_size: 2,
        min_version: number.saturating_sub(1),
        max_version: number,
    }
}

/// The status of prompt `id`.
async fn status(ledger: &dyn Ledger, run: &str, id: &str) -> Option<PromptStatus> {
    ledger
        .prompt_status(run, &PromptId::from(id))
        .await
        .unwrap()
}

/// Counts as a tuple (pending, trained, dropped), for short assertions.
async fn counts(ledger: &dyn Ledger, run: &str) -> (u64, u64, u64) {
    let PromptCounts {
        pending,
        trained,
        dropped,
    } = ledger.prompt_counts(run).await.unwrap();
    (pending, trained, dropped)
}

/// The ids of the pending prompts, in order.
async fn pending_ids(ledger: &dyn Ledger, run: &str) -> Vec<String> {
    ledger
        .pending_prompts(run)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id.0)
        .collect()
}

const TRAINED_0: Option<PromptStatus> = Some(PromptStatus::Trained { step: 0 });

/// A run is created once, keeps its first configuration, and reads back.
pub async fn runs_are_created_once(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let run = new_run_id();
    assert_eq!(ledger.run(&run).await.unwrap(), None);
    let config = serde_json::json!({ "phi": 409600, "nested": { "sigma": 2 } });
    assert_eq!(
        ledger.create_run(&run, &config).await.unwrap(),
        Recorded::New
    );
    let record = ledger
        .run(&run)
        .await
        .unwrap()
        .expect("the run was just created");
    assert_eq!(record.run_id, run);
    assert_eq!(record.config, config);
    assert!(record.created_at_ms > 0);

    let other = serde_json::json!({ "phi": 1 });
    assert_eq!(
        ledger.create_run(&run, &other).await.unwrap(),
        Recorded::Existing
    );
    assert_eq!(
        ledger.run(&run).await.unwrap().unwrap().config,
        config,
        "the first config stays"
    );

    assert!(matches!(
        ledger.create_run("", &config).await,
        Err(LedgerError::InvalidInput(_))
    ));
    assert_eq!(counts(ledger, &run).await, (0, 0, 0));
    assert_eq!(ledger.last_step(&run).await.unwrap(), None);
}

/// Accepting is idempotent per prompt id, keeps the prompt, and refuses a reused id.
pub async fn accepting_a_prompt_is_idempotent(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let run = new_run(ledger).await;
    let p = prompt("p1");
    assert_eq!(ledger.accept_prompt(&run, &p).await.unwrap(), Recorded::New);
    assert_eq!(
        ledger.accept_prompt(&run, &p).await.unwrap(),
        Recorded::Existing
    );
    assert_eq!(
        status(ledger, &run, "p1").await,
        Some(PromptStatus::Pending)
    );
    assert_eq!(status(ledger, &run, "nope").await, None);
    assert_eq!(counts(ledger, &run).await, (1, 0, 0));
    assert_eq!(ledger.pending_prompts(&run).await.unwrap(), vec![p.clone()]);
    assert_eq!(ledger.prompt(&run, &p.id).await.unwrap(), Some(p.clone()));
    assert_eq!(
        ledger.prompt(&run, &PromptId::from("nope")).await.unwrap(),
        None
    );

    let mut reused = p.clone();
    reused.group_size = 8;
    match ledger.accept_prompt(&run, &reused).await {
        Err(LedgerError::PromptIdReused { prompt, .. }) => assert_eq!(prompt.0, "p1"),
        other => panic!("a reused prompt id must be refused, got {other:?}"),
    }
    assert_eq!(
        ledger.pending_prompts(&run).await.unwrap(),
        vec![p.clone()],
        "first one kept"
    );

    match ledger.accept_prompt(&new_run_id(), &p).await {
        Err(LedgerError::RunNotFound { .. }) => {}
        other => panic!("accepting into an unknown run must fail, got {other:?}"),
    }
    let mut unnamed = p;
    unnamed.id = PromptId::from("");
    assert!(matches!(
        ledger.accept_prompt(&run, &unnamed).await,
        Err(LedgerError::InvalidInput(_))
    ));
}

/// A prompt is dropped at most once, with its reason; malformed input can be dropped without
/// being accepted.
pub async fn dropping_a_prompt_happens_once(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let run = new_run(ledger).await;
    accept(ledger, &run, &["a", "b"]).await;
    let a = PromptId::from("a");
    let zero = DropReason::ZeroVariance;
    assert_eq!(
        ledger
            .drop_prompt(&run, &a, zero, "rewards all 1", 0)
            .await
            .unwrap(),
        Recorded::New
    );
    let dropped = Some(PromptStatus::Dropped {
        reason: zero,
        detail: "rewards all 1".into(),
    });
    assert_eq!(status(ledger, &run, "a").await, dropped);
    assert_eq!(
        ledger
            .drop_prompt(&run, &a, zero, "again", 0)
            .await
            .unwrap(),
        Recorded::Existing
    );
    assert_eq!(
        status(ledger, &run, "a").await,
        dropped,
        "a replayed drop changes nothing"
    );
    match ledger
        .drop_prompt(&run, &a, DropReason::PurgedRetention, "", 0)
        .await
    {
        Err(LedgerError::PromptAlreadyDropped { reason, .. }) => assert_eq!(reason, zero),
        other => panic!("a second drop reason must be refused, got {other:?}"),
    }
    // Redelivered after being dropped: still dropped, nothing new.
    assert_eq!(
        ledger.accept_prompt(&run, &prompt("a")).await.unwrap(),
        Recorded::Existing
    );
    assert_eq!(status(ledger, &run, "a").await, dropped);

    // Malformed input, never accepted.
    let bad = PromptId::from("garbled-17");
    let malformed = DropReason::Malformed;
    assert_eq!(
        ledger
            .drop_prompt(&run, &bad, malformed, "not JSON", 0)
            .await
            .unwrap(),
        Recorded::New
    );
    assert_eq!(
        status(ledger, &run, "garbled-17").await,
        Some(PromptStatus::Dropped {
            reason: malformed,
            detail: "not JSON".into()
        })
    );
    assert_eq!(
        ledger
            .accept_prompt(&run, &prompt("garbled-17"))
            .await
            .unwrap(),
        Recorded::Existing
    );

    assert_eq!(counts(ledger, &run).await, (1, 0, 2));
    assert_eq!(pending_ids(ledger, &run).await, vec!["b"]);
    match ledger.drop_prompt(&new_run_id(), &a, zero, "", 0).await {
        Err(LedgerError::RunNotFound { .. }) => {}
        other => panic!("dropping in an unknown run must fail, got {other:?}"),
    }
}

/// Recording a step marks exactly its prompts trained, and the queries see it.
pub async fn recording_a_step_trains_its_prompts(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let run = new_run(ledger).await;
    accept(ledger, &run, &["c", "a", "b"]).await;
    let record = step(0, &["b", "a"]);
    assert_eq!(
        ledger.record_step(&run, &record, 0).await.unwrap(),
        Recorded::New
    );

    assert_eq!(status(ledger, &run, "a").await, TRAINED_0);
    assert_eq!(status(ledger, &run, "b").await, TRAINED_0);
    assert_eq!(status(ledger, &run, "c").await, Some(PromptStatus::Pending));
    assert_eq!(counts(ledger, &run).await, (1, 2, 0));
    assert_eq!(pending_ids(ledger, &run).await, vec!["c"]);
    assert_eq!(ledger.last_step(&run).await.unwrap(), Some(0));

    let stored = ledger
        .step(&run, 0)
        .await
        .unwrap()
        .expect("step 0 was recorded");
    assert_eq!(
        stored,
        StepRecord {
            prompts: vec!["a".into(), "b".into()],
            ..record.clone()
        }
    );
    assert_eq!(ledger.step(&run, 1).await.unwrap(), None);

    let steps = ledger.steps(&run).await.unwrap();
    assert_eq!(steps.len(), 1);
    let summary = &steps[0];
    assert_eq!(summary.step, 0);
    assert_eq!(summary.manifest_key, record.manifest_key);
    assert_eq!(summary.prompt_count, 2);
    assert_eq!(summary.total_tokens, record.total_tokens);
    assert_eq!(summary.world_size, record.world_size);
    assert_eq!((summary.min_version, summary.max_version), (0, 0));
    assert!(summary.recorded_at_ms > 0);

    accept(ledger, &run, &["d"]).await;
    assert_eq!(
        ledger
            .record_step(&run, &step(1, &["c", "d"]), 0)
            .await
            .unwrap(),
        Recorded::New
    );
    let numbers: Vec<StepId> = ledger
        .steps(&run)
        .await
        .unwrap()
        .iter()
        .map(|s| s.step)
        .collect();
    assert_eq!(numbers, vec![0, 1]);
    assert_eq!(ledger.last_step(&run).await.unwrap(), Some(1));
    assert_eq!(counts(ledger, &run).await, (0, 4, 0));
    assert!(ledger.pending_prompts(&run).await.unwrap().is_empty());
}

/// Replaying the exact same step (after a crash) is answered as already recorded.
pub async fn replaying_a_step_is_idempotent(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let run = new_run(ledger).await;
    accept(ledger, &run, &["a", "b", "c"]).await;
    assert_eq!(
        ledger
            .record_step(&run, &step(0, &["a", "b"]), 0)
            .await
            .unwrap(),
        Recorded::New
    );
    for replay in [step(0, &["a", "b"]), step(0, &["b", "a"])] {
        assert_eq!(
            ledger.record_step(&run, &replay, 0).await.unwrap(),
            Recorded::Existing
        );
    }
    assert_eq!(counts(ledger, &run).await, (1, 2, 0));
    assert_eq!(ledger.steps(&run).await.unwrap().len(), 1);
}

/// The same step number with different content is refused, and changes nothing.
pub async fn a_conflicting_step_changes_nothing(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let run = new_run(ledger).await;
    accept(ledger, &run, &["a", "b"]).await;
    let recorded = step(0, &["a"]);
    ledger.record_step(&run, &recorded, 0).await.unwrap();

    let more_prompts = step(0, &["a", "b"]);
    let other_prompt = step(0, &["b"]);
    let other_manifest = StepRecord {
        manifest_key: "manifests/elsewhere.json".into(),
        ..recorded.clone()
    };
    let other_tokens = StepRecord {
        total_tokens: 7,
        ..recorded.clone()
    };
    for conflicting in [more_prompts, other_prompt, other_manifest, other_tokens] {
        match ledger.record_step(&run, &conflicting, 0).await {
            Err(LedgerError::StepConflict { step: 0, .. }) => {}
            other => panic!("{conflicting:?} must conflict with step 0, got {other:?}"),
        }
    }
    assert_eq!(status(ledger, &run, "b").await, Some(PromptStatus::Pending));
    assert_eq!(ledger.step(&run, 0).await.unwrap().unwrap(), recorded);
    assert_eq!(counts(ledger, &run).await, (1, 1, 0));
}

/// A step that would train an already-trained prompt is refused as a whole.
pub async fn a_prompt_is_trained_at_most_once(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let run = new_run(ledger).await;
    accept(ledger, &run, &["a", "b", "c"]).await;
    ledger
        .record_step(&run, &step(0, &["a", "b"]), 0)
        .await
        .unwrap();
    match ledger.record_step(&run, &step(1, &["c", "a"]), 0).await {
        Err(LedgerError::PromptAlreadyTrained {
            prompt, step: 0, ..
        }) => assert_eq!(prompt.0, "a"),
        other => panic!("retraining prompt a must be refused, got {other:?}"),
    }
    assert_eq!(
        status(ledger, &run, "c").await,
        Some(PromptStatus::Pending),
        "nothing changed"
    );
    assert_eq!(ledger.step(&run, 1).await.unwrap(), None);
    assert_eq!(ledger.last_step(&run).await.unwrap(), Some(0));
    assert_eq!(counts(ledger, &run).await, (1, 2, 0));

    assert_eq!(
        ledger.record_step(&run, &step(1, &["c"]), 0).await.unwrap(),
        Recorded::New
    );
    assert_eq!(
        status(ledger, &run, "c").await,
        Some(PromptStatus::Trained { step: 1 })
    );
}

/// The run keeps the highest leader token that wrote to it: a step commit or a drop with a
/// lower one (a deposed leader) is rejected and changes nothing, replays included; the same or
/// a higher token writes.
pub async fn a_deposed_leader_cannot_write(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let run = new_run(ledger).await;
    accept(ledger, &run, &["a", "b", "c"]).await;
    let (old, new) = (3, 4);
    ledger
        .record_step(&run, &step(0, &["a"]), old)
        .await
        .unwrap();
    ledger
        .record_step(&run, &step(1, &["b"]), new)
        .await
        .unwrap();

    match ledger.record_step(&run, &step(2, &["c"]), old).await {
        Err(LedgerError::LeaderFenced { token, newest, .. }) => {
            assert_eq!((token, newest), (old, new))
        }
        other => panic!("a deposed leader's step must be fenced, got {other:?}"),
    }
    match ledger.record_step(&run, &step(1, &["b"]), old).await {
        Err(LedgerError::LeaderFenced { .. }) => {}
        other => panic!("a deposed leader's replay must be fenced, got {other:?}"),
    }
    match ledger
        .drop_prompt(&run, &PromptId::from("c"), DropReason::LagExceeded, "", old)
        .await
    {
        Err(LedgerError::LeaderFenced { token, newest, .. }) => {
            assert_eq!((token, newest), (old, new))
        }
        other => panic!("a deposed leader's drop must be fenced, got {other:?}"),
    }
    assert_eq!(
        ledger.last_step(&run).await.unwrap(),
        Some(1),
        "nothing written"
    );
    assert_eq!(status(ledger, &run, "c").await, Some(PromptStatus::Pending));

    // The newest leader (or a newer one still) writes.
    ledger
        .drop_prompt(
            &run,
            &PromptId::from("c"),
            DropReason::LagExceeded,
            "",
            new + 1,
        )
        .await
        .unwrap();
    match ledger.record_step(&run, &step(2, &["c"]), new).await {
        Err(LedgerError::LeaderFenced { newest, .. }) => assert_eq!(newest, new + 1),
        other => panic!("the drop raised the token, got {other:?}"),
    }
}

/// Dropped prompts and prompts never accepted are never trained; trained ones never dropped.
pub async fn dropped_and_unknown_prompts_are_never_trained(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let run = new_run(ledger).await;
    accept(ledger, &run, &["a", "b"]).await;
    let purged = DropReason::PurgedRetention;
    ledger
        .drop_prompt(&run, &PromptId::from("a"), purged, "retention 3 > σ 2", 0)
        .await
        .unwrap();

    match ledger.record_step(&run, &step(0, &["a", "b"]), 0).await {
        Err(LedgerError::PromptAlreadyDropped { prompt, reason, .. }) => {
            assert_eq!((prompt.0.as_str(), reason), ("a", purged));
        }
        other => panic!("training a dropped prompt must be refused, got {other:?}"),
    }
    match ledger.record_step(&run, &step(0, &["b", "ghost"]), 0).await {
        Err(LedgerError::PromptNotAccepted {
            prompt, step: 0, ..
        }) => assert_eq!(prompt.0, "ghost"),
        other => panic!("training an unknown prompt must be refused, got {other:?}"),
    }
    assert_eq!(status(ledger, &run, "b").await, Some(PromptStatus::Pending));
    assert_eq!(status(ledger, &run, "ghost").await, None);
    assert_eq!(ledger.last_step(&run).await.unwrap(), None);

    ledger.record_step(&run, &step(0, &["b"]), 0).await.unwrap();
    match ledger
        .drop_prompt(&run, &PromptId::from("b"), DropReason::ZeroVariance, "", 0)
        .await
    {
        Err(LedgerError::PromptAlreadyTrained { step: 0, .. }) => {}
        other => panic!("dropping a trained prompt must be refused, got {other:?}"),
    }
    assert_eq!(status(ledger, &run, "b").await, TRAINED_0);
    assert_eq!(counts(ledger, &run).await, (0, 1, 1));
}

/// Steps are recorded 0, 1, 2… without gaps, into existing runs, with valid content.
pub async fn steps_are_recorded_in_order(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let run = new_run(ledger).await;
    accept(ledger, &run, &["a", "b", "c"]).await;
    match ledger.record_step(&run, &step(1, &["a"]), 0).await {
        Err(LedgerError::StepOutOfOrder {
            step: 1,
            expected: 0,
            ..
        }) => {}
        other => panic!("step 1 before step 0 must be refused, got {other:?}"),
    }
    ledger.record_step(&run, &step(0, &["a"]), 0).await.unwrap();
    match ledger.record_step(&run, &step(2, &["b"]), 0).await {
        Err(LedgerError::StepOutOfOrder {
            step: 2,
            expected: 1,
            ..
        }) => {}
        other => panic!("a gap must be refused, got {other:?}"),
    }
    assert_eq!(status(ledger, &run, "b").await, Some(PromptStatus::Pending));
    match ledger.record_step(&new_run_id(), &step(0, &["a"]), 0).await {
        Err(LedgerError::RunNotFound { .. }) => {}
        other => panic!("a step of an unknown run must be refused, got {other:?}"),
    }
    let invalid = [
        step(1, &[]),
        step(1, &["b", "b"]),
        StepRecord {
            world_size: 0,
            ..step(1, &["b"])
        },
        StepRecord {
            manifest_key: String::new(),
            ..step(1, &["b"])
        },
        StepRecord {
            step: u64::MAX,
            ..step(1, &["b"])
        },
    ];
    for bad in invalid {
        match ledger.record_step(&run, &bad, 0).await {
            Err(LedgerError::InvalidInput(_)) => {}
            other => panic!("{bad:?} must be refused as invalid, got {other:?}"),
        }
    }
    assert_eq!(ledger.last_step(&run).await.unwrap(), Some(0));
    assert_eq!(counts(ledger, &run).await, (2, 1, 0));
}

/// A step with more prompts than one statement claims is still all or nothing.
pub async fn a_large_step_commits_all_or_nothing(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let run = new_run(ledger).await;
    let ids: Vec<String> = (0..1100).map(|i| format!("p{i:05}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    accept(ledger, &run, &refs).await;
    // The last prompt (in the last claim chunk) was dropped: the earlier chunks, already
    // claimed inside the transaction, must be rolled back.
    let last = PromptId::from(refs[refs.len() - 1]);
    ledger
        .drop_prompt(&run, &last, DropReason::ZeroVariance, "", 0)
        .await
        .unwrap();
    match ledger.record_step(&run, &step(0, &refs), 0).await {
        Err(LedgerError::PromptAlreadyDropped { prompt, .. }) => assert_eq!(prompt, last),
        other => panic!("the step must be refused for {last}, got {other:?}"),
    }
    assert_eq!(counts(ledger, &run).await, (1099, 0, 1));

    let trainable = &refs[..refs.len() - 1];
    assert_eq!(
        ledger
            .record_step(&run, &step(0, trainable), 0)
            .await
            .unwrap(),
        Recorded::New
    );
    assert_eq!(counts(ledger, &run).await, (0, 1099, 1));
    assert_eq!(
        ledger.step(&run, 0).await.unwrap().unwrap().prompts.len(),
        1099
    );
    assert_eq!(ledger.steps(&run).await.unwrap()[0].prompt_count, 1099);
}

/// Checkpoints reference recorded steps, list newest first, and can be deleted (keep-last-N).
pub async fn checkpoints_keep_last_n(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let run = new_run(ledger).await;
    let checkpoint = |step: StepId| Checkpoint {
        step,
        weights_key: format!("weights/v{}/manifest.json", step + 1),
        optimizer_key: format!("optimizer/step-{step}/manifest.json"),
    };
    assert_eq!(ledger.latest_checkpoint(&run).await.unwrap(), None);
    match ledger.record_checkpoint(&run, &checkpoint(0)).await {
        Err(LedgerError::StepNotRecorded { step: 0, .. }) => {}
        other => panic!("a checkpoint of an unrecorded step must be refused, got {other:?}"),
    }
    for s in 0..5u64 {
        let id = format!("p{s}");
        accept(ledger, &run, &[&id]).await;
        ledger.record_step(&run, &step(s, &[&id]), 0).await.unwrap();
        assert_eq!(
            ledger
                .record_checkpoint(&run, &checkpoint(s))
                .await
                .unwrap(),
            Recorded::New
        );
    }
    assert_eq!(
        ledger
            .record_checkpoint(&run, &checkpoint(2))
            .await
            .unwrap(),
        Recorded::Existing
    );
    let other = Checkpoint {
        weights_key: "weights/other.json".into(),
        ..checkpoint(2)
    };
    match ledger.record_checkpoint(&run, &other).await {
        Err(LedgerError::CheckpointConflict { step: 2, .. }) => {}
        other => panic!("other manifests for step 2 must be refused, got {other:?}"),
    }
    let steps = |list: Vec<Checkpoint>| list.into_iter().map(|c| c.step).collect::<Vec<_>>();
    assert_eq!(
        steps(ledger.checkpoints(&run).await.unwrap()),
        vec![4, 3, 2, 1, 0]
    );
    assert_eq!(ledger.checkpoints(&run).await.unwrap()[2], checkpoint(2));
    assert_eq!(
        ledger.latest_checkpoint(&run).await.unwrap(),
        Some(checkpoint(4))
    );

    // Keep the last 3.
    for old in ledger.checkpoints(&run).await.unwrap().into_iter().skip(3) {
        assert!(ledger.delete_checkpoint(&run, old.step).await.unwrap());
    }
    assert!(
        !ledger.delete_checkpoint(&run, 0).await.unwrap(),
        "already deleted"
    );
    assert_eq!(
        steps(ledger.checkpoints(&run).await.unwrap()),
        vec![4, 3, 2]
    );
    assert_eq!(
        ledger.latest_checkpoint(&run).await.unwrap(),
        Some(checkpoint(4))
    );
    // A deleted checkpoint can be recorded again (the step is still recorded).
    assert_eq!(
        ledger
            .record_checkpoint(&run, &checkpoint(1))
            .await
            .unwrap(),
        Recorded::New
    );
}

/// Runs share nothing: the same prompt ids and step numbers live independently in each.
pub async fn runs_are_isolated(ledger: Arc<dyn Ledger>) {
    let ledger = &*ledger;
    let first = new_run(ledger).await;
    let second = new_run(ledger).await;
    accept(ledger, &first, &["a", "b"]).await;
    accept(ledger, &second, &["a"]).await;
    ledger
        .record_step(&first, &step(0, &["a"]), 0)
        .await
        .unwrap();
    assert_eq!(
        status(ledger, &second, "a").await,
        Some(PromptStatus::Pending)
    );
    assert_eq!(ledger.last_step(&second).await.unwrap(), None);
    ledger
        .drop_prompt(&second, &PromptId::from("a"), DropReason::Oversized, "", 0)
        .await
        .unwrap();
    assert_eq!(status(ledger, &first, "a").await, TRAINED_0);
    assert_eq!(counts(ledger, &first).await, (1, 1, 0));
    assert_eq!(counts(ledger, &second).await, (0, 0, 1));
    assert_eq!(ledger.steps(&second).await.unwrap(), vec![]);
}

/// How many calls race in the concurrency cases.
const RACERS: usize = 4;
/// How many races each concurrency case runs.
const ROUNDS: u64 = 16;

/// A boxed ledger call, for [`race`].
type Call<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Runs `calls` at once, each in its own task, released together by a barrier so that they
/// overlap at the database; returns their results in order.
async fn race<T: Send + 'static>(calls: Vec<Call<T>>) -> Vec<T> {
    let barrier = Arc::new(tokio::sync::Barrier::new(calls.len()));
    let tasks: Vec<_> = calls
        .into_iter()
        .map(|call| {
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                call.await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.expect("a racing ledger call panicked"));
    }
    results
}

/// Step commits racing to claim the same prompt: exactly one wins, the losers change nothing.
pub async fn concurrent_step_commits_claim_a_prompt_once(ledger: Arc<dyn Ledger>) {
    let run = new_run(&*ledger).await;
    for round in 0..ROUNDS {
        let shared = format!("shared{round}");
        let own: Vec<String> = (0..RACERS).map(|i| format!("own{round}-{i}")).collect();
        accept(&*ledger, &run, &[&shared]).await;
        for id in &own {
            accept(&*ledger, &run, &[id]).await;
        }
        let claims: Vec<StepRecord> = own
            .iter()
            .map(|id| StepRecord {
                manifest_key: format!("manifests/{round}-{id}.json"),
                ..step(round, &[id, &shared])
            })
            .collect();
        let results = race(
            claims
                .iter()
                .cloned()
                .map(|claim| {
                    let (ledger, run) = (Arc::clone(&ledger), run.clone());
                    Box::pin(async move { ledger.record_step(&run, &claim, 0).await })
                        as Call<super::Result<Recorded>>
                })
                .collect(),
        )
        .await;
        let winners: Vec<usize> = (0..RACERS).filter(|&i| results[i].is_ok()).collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one commit wins, got {results:?}"
        );
        let winner = winners[0];
        assert_eq!(results[winner].as_ref().unwrap(), &Recorded::New);
        let trained = Some(PromptStatus::Trained { step: round });
        assert_eq!(status(&*ledger, &run, &shared).await, trained);
        for (i, result) in results.iter().enumerate().filter(|(i, _)| *i != winner) {
            match result {
                Err(LedgerError::StepConflict { .. }) => {}
                other => panic!("round {round}: a loser must be refused, got {other:?}"),
            }
            assert_eq!(
                status(&*ledger, &run, &own[i]).await,
                Some(PromptStatus::Pending)
            );
            // The losers' own prompts leave the game, to keep the next rounds simple.
            let id = PromptId(own[i].clone());
            ledger
                .drop_prompt(&run, &id, DropReason::LagExceeded, "", 0)
                .await
                .unwrap();
        }
        assert_eq!(status(&*ledger, &run, &own[winner]).await, trained);
        let stored = ledger
            .step(&run, round)
            .await
            .unwrap()
            .expect("the winner's step");
        let expected: BTreeSet<&PromptId> = claims[winner].prompts.iter().collect();
        assert_eq!(stored.prompts.iter().collect::<BTreeSet<_>>(), expected);
        assert_eq!(stored.manifest_key, claims[winner].manifest_key);
    }
    let losers = ROUNDS * (RACERS as u64 - 1);
    assert_eq!(counts(&*ledger, &run).await, (0, 2 * ROUNDS, losers));
}

/// The same step committed several times at once (a coordinator and its replacements): one
/// commit, the others "already recorded".
pub async fn concurrent_replays_commit_once(ledger: Arc<dyn Ledger>) {
    let run = new_run(&*ledger).await;
    for round in 0..ROUNDS {
        let id = format!("p{round}");
        accept(&*ledger, &run, &[&id]).await;
        let record = step(round, &[&id]);
        let calls = (0..RACERS)
            .map(|_| {
                let (ledger, run, record) = (Arc::clone(&ledger), run.clone(), record.clone());
                Box::pin(async move { ledger.record_step(&run, &record, 0).await })
                    as Call<super::Result<Recorded>>
            })
            .collect();
        let outcomes: Vec<Recorded> = race(calls)
            .await
            .into_iter()
            .map(|result| result.unwrap_or_else(|e| panic!("round {round}: a replay failed: {e}")))
            .collect();
        let new = outcomes.iter().filter(|o| **o == Recorded::New).count();
        assert_eq!(
            new, 1,
            "round {round}: exactly one commit, got {outcomes:?}"
        );
    }
    assert_eq!(ledger.steps(&run).await.unwrap().len(), ROUNDS as usize);
}

/// A drop racing a step commit for the same prompt: the prompt ends up either trained or
/// dropped, never both, and the other call is refused.
pub async fn concurrent_drop_and_train_agree(ledger: Arc<dyn Ledger>) {
    let run = new_run(&*ledger).await;
    let mut next_step = 0;
    for round in 0..ROUNDS {
        let (contested, companion) = (format!("c{round}"), format!("k{round}"));
        accept(&*ledger, &run, &[&contested, &companion]).await;
        let record = step(next_step, &[&contested, &companion]);
        let contested_id = PromptId(contested.clone());
        let train: Call<_> = {
            let (ledger, run) = (Arc::clone(&ledger), run.clone());
            Box::pin(async move { ledger.record_step(&run, &record, 0).await })
        };
        let drop: Call<_> = {
            let (ledger, run) = (Arc::clone(&ledger), run.clone());
            let reason = DropReason::PurgedRetention;
            Box::pin(async move {
                ledger
                    .drop_prompt(&run, &contested_id, reason, "raced", 0)
                    .await
            })
        };
        let mut results = race(vec![train, drop]).await.into_iter();
        let (trained, dropped) = (results.next().unwrap(), results.next().unwrap());
        match (&trained, &dropped) {
            (Ok(Recorded::New), Err(LedgerError::PromptAlreadyTrained { .. })) => {
                let expected = Some(PromptStatus::Trained { step: next_step });
                assert_eq!(status(&*ledger, &run, &contested).await, expected);
                assert_eq!(status(&*ledger, &run, &companion).await, expected);
                next_step += 1;
            }
            (Err(LedgerError::PromptAlreadyDropped { .. }), Ok(Recorded::New)) => {
                assert!(matches!(
                    status(&*ledger, &run, &contested).await,
                    Some(PromptStatus::Dropped { .. })
                ));
                assert_eq!(
                    status(&*ledger, &run, &companion).await,
                    Some(PromptStatus::Pending)
                );
                assert_eq!(ledger.step(&run, next_step).await.unwrap(), None);
                ledger
                    .record_step(&run, &step(next_step, &[&companion]), 0)
                    .await
                    .unwrap();
                next_step += 1;
            }
            other => panic!("round {round}: exactly one of train and drop must win, got {other:?}"),
        }
    }
    let (pending, trained, dropped) = counts(&*ledger, &run).await;
    assert_eq!((pending, trained + dropped), (0, 2 * ROUNDS));
}
