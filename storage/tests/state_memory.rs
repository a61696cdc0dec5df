//! The state-store conformance suite against the memory implementation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use flywheel_storage::state::conformance::StoreFactory;
use flywheel_storage::state::{MemoryStateStore, StateStore};

/// Fresh memory stores; attaching shares the same store, as threads of one process would.
struct Memory;

#[async_trait]
impl StoreFactory for Memory {
    async fn fresh(&self) -> Arc<dyn StateStore> {
        static RUN: AtomicU64 = AtomicU64::new(0);
        Arc::new(MemoryStateStore::new(format!(
            "mem-{}",
            RUN.fetch_add(1, Ordering::Relaxed)
        )))
    }

    async fn attach(&self, store: &Arc<dyn StateStore>) -> Arc<dyn StateStore> {
        store.clone()
    }
}

flywheel_storage::state_store_conformance!(Memory);
