//! The coordinator service: the leader loop and its HTTP API on one admin server. On
//! shutdown it gives the leader lock up so that a standby takes over at once.

use std::future::Future;

use flywheel_service::{AdminServer, Readiness};
use flywheel_storage::RunStores;

use crate::config::ServiceConfig;
use crate::service::{Coordinator, CoordinatorError};

/// Runs the coordinator until `shutdown` resolves: serves `/v1/*`, `/metrics`, `/healthz` and
/// `/readyz` on `coordinator.bind` and ticks the loop.
pub async fn run_until(
    stores: RunStores,
    config: ServiceConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    config.validate()?;
    let admin_token = config.coordinator.resolved_admin_token();
    if admin_token.is_none() {
        tracing::warn!(
            "no admin token configured: /v1/pause, /v1/resume and /v1/budget are disabled"
        );
    }
    let bind = config.coordinator.bind.clone();
    let readiness = Readiness::new();
    stores.add_readiness_checks(&readiness);
    let run_id = stores.run_id.clone();
    let mut coordinator = Coordinator::new(stores, config);
    let admin = AdminServer::start(
        &bind,
        coordinator.metrics().registry.clone(),
        readiness.clone(),
        coordinator.api_router(admin_token),
    )
    .await?;
    tracing::info!(bind = %admin.local_addr(), id = coordinator.id(), run = %run_id, "coordinator up");
    readiness.set_serving(true);
    coordinator.tick_until(shutdown).await;
    readiness.set_serving(false);
    admin.stop().await;
    Ok(())
}
