//! The coordinator service: the leader loop and its HTTP API on one admin server. On
//! shutdown it gives the leader lock up so that a standby takes over at once.

use std::future::Future;

use flywheel_service::{AdminServer, ConfigError, Readiness};
use flywheel_storage::RunStores;

use crate::config::ServiceConfig;
use crate::service::{Coordinator, CoordinatorError, CrashPoint};

/// Makes the process abort at a point of the step commit (`before_manifest`,
/// `after_manifest`, `after_ledger`, `after_announce`): how the chaos tests kill a
/// coordinator exactly there.
pub const CRASH_AT_ENV: &str = "FLYWHEEL_COORDINATOR_CRASH_AT";

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
    let crash_at = crash_point_from_env()?;
    let mut coordinator = Coordinator::new(stores, config);
    if let Some(point) = crash_at {
        tracing::warn!(
            ?point,
            "{CRASH_AT_ENV} is set: the process aborts at that point of its first commit"
        );
        coordinator.abort_at(point);
    }
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

/// The crash point [`CRASH_AT_ENV`] names, if it is set.
fn crash_point_from_env() -> Result<Option<CrashPoint>, ConfigError> {
    std::env::var(CRASH_AT_ENV)
        .ok()
        .map(|v| {
            v.parse()
                .map_err(|e: String| ConfigError::new(CRASH_AT_ENV, e))
        })
        .transpose()
}
