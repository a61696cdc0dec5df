//! The ledger on SQLite: the conformance suite on a file and in memory, plus what only a file
//! shows (it survives reopening) and how bad URLs are reported.

use flywheel_storage::ledger::conformance::TestLedger;
use flywheel_storage::ledger::{self, Backend, LedgerError, PromptStatus, Recorded, StepRecord};
use flywheel_storage::{Prompt, PromptId, PromptInput, VerifierSpec};

mod file {
    use super::*;
    flywheel_storage::ledger_conformance_tests!(TestLedger::sqlite_file());
}

mod memory {
    use super::*;
    flywheel_storage::ledger_conformance_tests!(TestLedger::sqlite_memory());
}

fn prompt(id: &str) -> Prompt {
    Prompt {
        id: PromptId::from(id),
        input: PromptInput::Tokens(vec![1, 2, 3]),
        verifier: VerifierSpec::Math { answer: "7".into() },
        group_size: 2,
        metadata: Default::default(),
    }
}

#[tokio::test]
async fn a_ledger_file_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("ledger.db").display()
    );
    let record = StepRecord {
        step: 0,
        manifest_key: "manifests/0.json".into(),
        prompts: vec![PromptId::from("a")],
        total_tokens: 64,
        world_size: 1,
        min_version: 0,
        max_version: 0,
    };
    {
        let ledger = ledger::open(&url).await.unwrap();
        assert_eq!(ledger.backend(), Backend::Sqlite);
        ledger
            .create_run("r", &serde_json::json!({"k": 1}))
            .await
            .unwrap();
        for id in ["a", "b"] {
            ledger.accept_prompt("r", &prompt(id)).await.unwrap();
        }
        ledger.record_step("r", &record, 0).await.unwrap();
    }
    // Reopening applies no migration twice and finds everything.
    let ledger = ledger::open(&url).await.unwrap();
    assert_eq!(
        ledger.run("r").await.unwrap().unwrap().config,
        serde_json::json!({"k": 1})
    );
    assert_eq!(ledger.last_step("r").await.unwrap(), Some(0));
    assert_eq!(
        ledger
            .prompt_status("r", &PromptId::from("a"))
            .await
            .unwrap(),
        Some(PromptStatus::Trained { step: 0 })
    );
    assert_eq!(
        ledger.pending_prompts("r").await.unwrap(),
        vec![prompt("b")]
    );
    assert_eq!(
        ledger.record_step("r", &record, 0).await.unwrap(),
        Recorded::Existing
    );
}

#[tokio::test]
async fn in_memory_ledgers_are_private() {
    let first = ledger::open("sqlite::memory:").await.unwrap();
    let second = ledger::open("sqlite::memory:").await.unwrap();
    first.create_run("r", &serde_json::json!({})).await.unwrap();
    assert!(first.run("r").await.unwrap().is_some());
    assert_eq!(second.run("r").await.unwrap(), None);
}

#[tokio::test]
async fn a_missing_file_without_create_mode_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("absent.db").display());
    match ledger::open(&url).await {
        Err(
            error @ LedgerError::Connect {
                backend: Backend::Sqlite,
                ..
            },
        ) => {
            assert!(error.to_string().contains("mode=rwc"), "{error}");
        }
        Err(other) => panic!("expected a connect error, got {other}"),
        Ok(_) => panic!("opening a missing file without mode=rwc must fail"),
    }
}

#[tokio::test]
async fn unsupported_and_invalid_urls_are_refused() {
    for url in ["mysql://root@localhost/db", "ledger.db", ""] {
        match ledger::open(url).await {
            Err(LedgerError::UnsupportedUrl { .. }) => {}
            Err(other) => panic!("{url:?}: expected an unsupported URL error, got {other}"),
            Ok(_) => panic!("{url:?} must be refused"),
        }
    }
    match ledger::open("sqlite://x.db?mode=bogus").await {
        Err(LedgerError::InvalidUrl { .. }) => {}
        Err(other) => panic!("expected an invalid URL error, got {other}"),
        Ok(_) => panic!("an unknown mode must be refused"),
    }
}
