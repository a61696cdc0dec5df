//! Credentials given to a run are never stored or shown: a coordinator and a worker run as
//! `flywheel` processes on the real services with a PostgreSQL password, S3 keys and an admin
//! token in their config, and none of them appears in the ledger's record of the run, in
//! their logs, or in `/v1/status`.

mod common;

use std::time::Duration;

use common::{Processes, http_get, stores_toml};
use flywheel_storage::ledger::conformance::TestLedger;
use flywheel_storage::testkit::{self, free_port};

const DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_ledger_the_logs_or_the_status() {
    let s3 = testkit::S3Server::from_env();
    let test_ledger = TestLedger::postgres().await;
    let run_id = testkit::unique_id("secrets");
    // The test server trusts every password, so one can be given without being needed.
    let pg_secret = "pg-pass-31337";
    let mut ledger_url = url::Url::parse(test_ledger.url()).unwrap();
    ledger_url.set_password(Some(pg_secret)).unwrap();
    let admin_token = "7770123";
    let secrets = [pg_secret, s3.secret_key.as_str(), admin_token];
    let port = free_port();
    let config = format!(
        r#"{stores}
[coordinator]
bind = "127.0.0.1:{port}"

[worker]
metrics_addr = "127.0.0.1:{worker_port}"
"#,
        stores = stores_toml(&run_id, &s3.url(&run_id), ledger_url.as_str(), ""),
        worker_port = free_port(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flywheel.toml");
    std::fs::write(&path, config).unwrap();
    let path = path.to_str().unwrap();
    let mut procs = Processes::new(dir.path());
    // The token comes from the environment, the way a Kubernetes Secret is mounted.
    let token_env = [("FLYWHEEL_COORDINATOR__ADMIN_TOKEN", admin_token.to_owned())];
    procs.spawn(
        "coordinator",
        &["coordinator", "--config", path],
        &token_env,
    );
    procs.spawn("worker", &["worker", "--config", path], &[]);

    let base = format!("http://127.0.0.1:{port}");
    procs
        .wait_until(
            &[],
            "the coordinator to lead (recovered) and answer",
            DEADLINE,
            || async {
                // Not listening yet is "not yet", not a failure.
                let Ok(ready) = reqwest::get(format!("{base}/readyz")).await else {
                    return false;
                };
                ready.status().is_success()
                    && http_get(&format!("{base}/v1/status"))
                        .await
                        .contains("\"answering_is_leader\":true")
            },
        )
        .await;
    // The admin token works (so the coordinator really has it) …
    let paused = reqwest::Client::new()
        .post(format!("{base}/v1/pause"))
        .bearer_auth(admin_token)
        .send()
        .await
        .unwrap();
    assert!(paused.status().is_success(), "{}", paused.status());
    // … and is shown nowhere.
    let status = http_get(&format!("{base}/v1/status")).await;
    let record = test_ledger
        .ledger()
        .run(&run_id)
        .await
        .unwrap()
        .expect("the run is recorded");
    let recorded = record.config.to_string();
    procs.stop();
    let logs = format!("{}\n{}", procs.log("coordinator"), procs.log("worker"));
    assert!(
        recorded.contains("***"),
        "the recorded config is redacted: {recorded}"
    );
    for secret in secrets {
        assert!(
            !recorded.contains(secret),
            "{secret} in the ledger: {recorded}"
        );
        assert!(!status.contains(secret), "{secret} in /v1/status: {status}");
        assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
    }
    test_ledger.teardown().await;
}
