//! The state-store conformance suite against a real Redis at `FLYWHEEL_TEST_REDIS_URL`
//! (default `redis://127.0.0.1:6379`; `scripts/services.sh` starts one). Each test runs under
//! its own random run id and deletes its keys when it passes. An unreachable Redis fails the
//! tests, naming it.

use std::sync::Arc;

use async_trait::async_trait;
use flywheel_storage::state::conformance::StoreFactory;
use flywheel_storage::state::{RedisStateStore, StateStore};

/// Opens stores on the test Redis, one random run per `fresh`.
struct Redis {
    /// Runs this test created, deleted on drop of the factory when the test passed.
    runs: std::sync::Mutex<Vec<RedisStateStore>>,
}

impl Redis {
    fn from_env() -> Self {
        Redis {
            runs: Default::default(),
        }
    }
}

#[async_trait]
impl StoreFactory for Redis {
    async fn fresh(&self) -> Arc<dyn StateStore> {
        let run = format!("test-{:016x}", rand::random::<u64>());
        let store = flywheel_storage::testkit::redis_state(&run).await;
        self.runs.lock().unwrap().push(store.clone());
        Arc::new(store)
    }

    async fn attach(&self, store: &Arc<dyn StateStore>) -> Arc<dyn StateStore> {
        Arc::new(flywheel_storage::testkit::redis_connect(store.run_id()).await)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // Keep a failed test's keys for inspection; clean up after a pass.
        if std::thread::panicking() {
            return;
        }
        let runs = std::mem::take(&mut *self.runs.lock().unwrap());
        if runs.is_empty() {
            return;
        }
        // Drop runs inside the test's runtime; block on a helper thread's runtime.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                for r in runs {
                    let _ = r.delete_run().await;
                }
            });
        })
        .join()
        .ok();
    }
}

flywheel_storage::state_store_conformance!(Redis::from_env());
