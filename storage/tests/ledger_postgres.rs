//! The ledger on a real PostgreSQL server (`FLYWHEEL_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`; `scripts/services.sh` starts one). Each test
//! works in a fresh schema. An unreachable server fails the tests, naming it.

use flywheel_storage::ledger::conformance::TestLedger;
use flywheel_storage::ledger::{self, Backend, LedgerError};

flywheel_storage::ledger_conformance_tests!(TestLedger::postgres());

#[tokio::test]
async fn the_fixture_is_on_postgres() {
    let fixture = TestLedger::postgres().await;
    assert_eq!(fixture.ledger().backend(), Backend::Postgres);
    fixture.teardown().await;
}

#[tokio::test]
async fn an_unreachable_server_is_a_connect_error_that_says_what_to_do() {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let url = "postgres://flywheel:secret@127.0.0.1:1/flywheel";
    match ledger::open(url).await {
        Err(
            error @ LedgerError::Connect {
                backend: Backend::Postgres,
                ..
            },
        ) => {
            let message = error.to_string();
            assert!(message.contains("scripts/services.sh"), "{message}");
            assert!(message.contains("127.0.0.1:1"), "{message}");
            assert!(
                !message.contains("secret"),
                "the password must not be shown: {message}"
            );
        }
        Err(other) => panic!("expected a connect error, got {other}"),
        Ok(_) => panic!("nothing listens on port 1"),
    }
}

#[tokio::test]
async fn reopening_a_migrated_schema_finds_it_up_to_date() {
    let fixture = TestLedger::postgres().await;
    let config = serde_json::json!({ "phi": 8 });
    fixture.ledger().create_run("r", &config).await.unwrap();
    let again = ledger::open(fixture.url()).await.unwrap();
    assert_eq!(again.run("r").await.unwrap().unwrap().config, config);
    drop(again);
    fixture.teardown().await;
}
