//! The failover test against real services: Redis at `FLYWHEEL_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`) and PostgreSQL at `FLYWHEEL_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); `scripts/services.sh` starts both. An
//! unreachable service fails the test, naming it. Each test uses a random run id and a fresh
//! PostgreSQL schema, so it never depends on (or changes) what other runs migrated.

mod common;

use std::sync::Arc;

use common::{World, crash_and_take_over, random_run, run_config};
use flywheel_coordinator::CrashPoint;
use flywheel_storage::ledger::conformance::TestLedger;
use flywheel_storage::state::{RedisStateStore, StateStore};

async fn real_world() -> (World, RedisStateStore, TestLedger) {
    let run = run_config(&random_run());
    // Panics naming Redis and scripts/services.sh when it is unreachable.
    let state = flywheel_storage::testkit::redis_state(&run.storage.run_id).await;
    // Panics naming PostgreSQL and scripts/services.sh when it is unreachable.
    let ledger = TestLedger::postgres().await;
    let shared: Arc<dyn StateStore> = Arc::new(state.clone());
    (
        World::with(run, shared, ledger.ledger()).await,
        state,
        ledger,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_after_ledger_commit_on_redis_and_postgres() {
    let (w, redis, ledger) = real_world().await;
    crash_and_take_over(&w, CrashPoint::AfterLedger).await;
    redis.delete_run().await.unwrap();
    drop(w);
    ledger.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_after_manifest_on_redis_and_postgres() {
    let (w, redis, ledger) = real_world().await;
    crash_and_take_over(&w, CrashPoint::AfterManifest).await;
    redis.delete_run().await.unwrap();
    drop(w);
    ledger.teardown().await;
}
