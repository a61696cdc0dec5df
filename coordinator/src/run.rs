//! `flywheel coordinator`: opens the run's stores, serves the HTTP API and runs the loop
//! until SIGINT/SIGTERM (then gives the leader lock up so a standby takes over at once).

use anyhow::Context;
use flywheel_storage::blob::BlobStore;
use flywheel_storage::config::RunConfig;
use flywheel_storage::{ledger, state};

use crate::config::CoordinatorConfig;
use crate::http::{ApiState, router};
use crate::service::Coordinator;
use crate::status::StatusSources;

/// The HTTP API state of a coordinator.
pub fn api_state(
    c: &Coordinator,
    sources: StatusSources,
    admin_token: Option<String>,
    min_budget: u64,
) -> ApiState {
    ApiState {
        sources,
        metrics: c.metrics().clone(),
        controls: c.controls(),
        snapshot: c.snapshot(),
        admin_token,
        min_budget,
    }
}

/// Runs the coordinator service with the run's configuration and its own section.
pub async fn run(run: RunConfig, config: CoordinatorConfig) -> anyhow::Result<()> {
    run.validate()?;
    config.validate()?;
    let run_id = run.storage.run_id.clone();
    let state = state::open(&run.storage.state_url, &run_id)
        .await
        .context("opening the state store (storage.state_url)")?;
    let ledger = ledger::open(&run.storage.ledger_url)
        .await
        .context("opening the ledger (storage.ledger_url)")?;
    let config_json = serde_json::to_value(&run).context("serialising the run config")?;
    ledger.create_run(&run_id, &config_json).await?;
    let blobs = BlobStore::open(&run.storage.blob_url)
        .context("opening the object store (storage.blob_url)")?;
    let sources = StatusSources {
        run: run_id.clone(),
        state: state.clone(),
        ledger: ledger.clone(),
        blobs: blobs.clone(),
        token_budget: run.batch.token_budget,
    };
    let admin_token = config.resolved_admin_token();
    if admin_token.is_none() {
        tracing::warn!(
            "no admin token configured: /v1/pause, /v1/resume and /v1/budget are disabled"
        );
    }
    let min_budget = u64::from(run.rollout.segment_tokens);
    let mut coordinator = Coordinator::new(run, config.clone(), state, ledger, blobs);
    let app = router(api_state(&coordinator, sources, admin_token, min_budget));
    let listener = tokio::net::TcpListener::bind(&config.bind)
        .await
        .with_context(|| format!("binding the HTTP API to {} (coordinator.bind)", config.bind))?;
    tracing::info!(bind = %listener.local_addr()?, id = coordinator.id(), run = %run_id, "coordinator up");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    coordinator
        .run_until(async {
            shutdown_signal().await;
            tracing::info!("shutting down: giving the leader lock up");
        })
        .await;
    server.abort();
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
