//! flywheel-worker: the rollout worker (DESIGN.md §3, §6.1, §6.2).
//!
//! - [`engine`]: the [`engine::Engine`] trait that generates one segment of one trajectory,
//!   and its implementations (`sim`, `openai`);
//! - [`verify`]: rewards for finished trajectories ([`verify::Verifier`]);
//! - [`http`]: JSON over HTTP with bounded timeouts and retries, shared by both;
//! - [`intake`]: Kafka prompts → ledger + state registration → ack;
//! - [`service`]: the segment loop (slots, budgets, leases, parking, resume, shutdown);
//! - [`metrics`]: Prometheus metrics and `/metrics`, `/healthz`, `/readyz`;
//! - [`config`]: the `[worker]` section and the file `flywheel worker` reads.
//!
//! [`run`] is the `flywheel worker` service; [`Worker::start`] starts the same thing on
//! stores the caller opened (tests, the embedded demo).

#![warn(missing_docs)]

pub mod config;
pub mod engine;
pub mod http;
pub mod intake;
pub mod metrics;
pub mod service;
pub mod verify;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flywheel_storage::blob::{BlobError, BlobStore};
use flywheel_storage::config::{ConfigError, RunConfig};
use flywheel_storage::ledger::{Ledger, LedgerError};
use flywheel_storage::queue::{PromptConsumer, QueueError};
use flywheel_storage::state::{MemberRole, StateError, StateStore};
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use config::{WorkerConfig, WorkerFileConfig};

use crate::engine::{Engine, EngineError};
use crate::metrics::WorkerMetrics;
use crate::service::{SegmentLoop, SegmentLoopParts, Shutdown};
use crate::verify::{VerifierFactory, VerifyError};

/// Why the worker could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state store could not be opened.
    #[error(transparent)]
    State(#[from] StateError),
    /// The object store could not be opened.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The ledger could not be opened.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The Kafka consumer could not be created.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The engine could not be built.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The reward services are misconfigured.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The metrics server could not bind its address.
    #[error(
        "cannot serve metrics on {addr}: {source} (set worker.metrics_addr, or empty to disable)"
    )]
    Metrics {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Work was still running when the grace period ran out; its leases will expire.
    #[error("shutdown overran the grace period of {0:?}; unreleased leases will expire")]
    ShutdownOverdue(Duration),
    /// Installing the signal handler failed.
    #[error("cannot install the SIGTERM handler: {0}")]
    Signal(std::io::Error),
}

/// What [`Worker::start`] runs on: the stores and engine, opened by the caller.
pub struct WorkerParts {
    /// The shared run configuration (`rollout` matters here).
    pub run: RunConfig,
    /// The worker section.
    pub worker: WorkerConfig,
    /// Run state.
    pub state: Arc<dyn StateStore>,
    /// Object store.
    pub blobs: BlobStore,
    /// The ledger (prompt acceptance).
    pub ledger: Arc<dyn Ledger>,
    /// The engine.
    pub engine: Arc<dyn Engine>,
    /// The consumer of the prompt topic; `None` runs the segment loop only (prompts are
    /// registered by someone else).
    pub consumer: Option<PromptConsumer>,
}

/// A started worker.
pub struct Worker {
    /// Its id (the lease owner).
    pub id: String,
    /// Its metrics.
    pub metrics: WorkerMetrics,
    /// Where `/metrics` is served, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The shutdown signals (tests may fire them directly).
    pub shutdown: Shutdown,
    state: Arc<dyn StateStore>,
    grace: Duration,
    ready: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    server: Option<JoinHandle<()>>,
    server_stop: tokio_util::sync::CancellationToken,
}

impl Worker {
    /// Starts the intake, the slots and the metrics server.
    pub async fn start(parts: WorkerParts) -> Result<Worker, WorkerError> {
        parts.worker.validate()?;
        parts.run.rollout.validate()?;
        let id = parts.worker.worker_id();
        let metrics = WorkerMetrics::new();
        let shutdown = Shutdown::default();
        let ready = Arc::new(AtomicBool::new(false));
        let server_stop = tokio_util::sync::CancellationToken::new();
        let (metrics_addr, server) = if parts.worker.metrics_addr.is_empty() {
            (None, None)
        } else {
            let addr: SocketAddr = parts.worker.metrics_addr.parse().map_err(|_| ConfigError {
                field: "worker.metrics_addr",
                problem: "is not host:port".into(),
            })?;
            let (bound, task) =
                metrics::serve(addr, metrics.clone(), ready.clone(), server_stop.clone())
                    .await
                    .map_err(|source| WorkerError::Metrics {
                        addr: parts.worker.metrics_addr.clone(),
                        source,
                    })?;
            (Some(bound), Some(task))
        };
        let slots = if parts.worker.slots == 0 {
            parts.engine.slots()
        } else {
            parts.worker.slots
        };
        let (segments, poller) = SegmentLoop::new(SegmentLoopParts {
            worker_id: id.clone(),
            state: parts.state.clone(),
            blobs: parts.blobs,
            engine: parts.engine,
            verifiers: VerifierFactory::new(&parts.worker.rewards)?,
            rollout: parts.run.rollout.clone(),
            sampling: parts.worker.sampling.clone(),
            poll: parts.worker.poll_interval(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        });
        let mut tasks = vec![poller];
        for slot in 0..slots {
            tasks.push(tokio::spawn(segments.clone().run_slot(slot)));
        }
        if let Some(consumer) = parts.consumer {
            let intake = intake::Intake {
                consumer,
                state: parts.state.clone(),
                ledger: parts.ledger,
                metrics: metrics.clone(),
                max_pending: parts.worker.max_pending_trajectories,
                poll: parts.worker.poll_interval(),
                stop: shutdown.stop.clone(),
            };
            tasks.push(tokio::spawn(intake.run()));
        }
        ready.store(true, Ordering::Relaxed);
        info!(worker = %id, slots, mode = ?parts.run.rollout.mode, "worker started");
        Ok(Worker {
            id,
            metrics,
            metrics_addr,
            shutdown,
            state: parts.state,
            grace: parts.worker.grace_period(),
            ready,
            tasks,
            server,
            server_stop,
        })
    }

    /// Graceful shutdown within the grace period: stop claiming and taking prompts, let the
    /// segments in hand commit until 80 % of the grace period, then abort them; every lease is
    /// released; leave the membership. Returns whether everything stopped in time.
    pub async fn shutdown(self) -> bool {
        let started = tokio::time::Instant::now();
        self.ready.store(false, Ordering::Relaxed);
        self.shutdown.stop.cancel();
        let abort = self.shutdown.abort.clone();
        let abort_at = started + self.grace.mul_f64(0.8);
        let aborter = tokio::spawn(async move {
            tokio::time::sleep_until(abort_at).await;
            abort.cancel();
        });
        let deadline = started + self.grace.mul_f64(0.95);
        let mut clean = true;
        for task in self.tasks {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                clean = false;
            }
        }
        aborter.abort();
        if let Err(e) = self.state.leave(MemberRole::Worker, &self.id).await {
            warn!(error = %e, "could not leave the membership; the heartbeat will lapse");
        }
        self.server_stop.cancel();
        if let Some(server) = self.server {
            let _ = tokio::time::timeout_at(deadline, server).await;
        }
        info!(worker = %self.id, clean, elapsed_ms = started.elapsed().as_millis() as u64, "worker stopped");
        clean
    }
}

/// `flywheel worker`: opens the stores named by `config`, joins the consumer group, runs
/// until SIGTERM or SIGINT, then shuts down within the grace period.
pub async fn run(config: WorkerFileConfig) -> Result<(), WorkerError> {
    config.validate()?;
    let run = &config.run;
    let state = flywheel_storage::state::open(&run.storage.state_url, &run.storage.run_id).await?;
    let blobs = BlobStore::open(&run.storage.blob_url)?;
    let engine_blobs = blobs.clone();
    let ledger = flywheel_storage::ledger::open(&run.storage.ledger_url).await?;
    let run_json = serde_json::to_value(run).unwrap_or(serde_json::Value::Null);
    ledger.create_run(&run.storage.run_id, &run_json).await?;
    let engine = config
        .worker
        .engine
        .build_for_run(&engine_blobs, &run.storage.run_id)?;
    let consumer = PromptConsumer::new(&run.kafka)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(WorkerError::Signal)?;
    let worker = Worker::start(WorkerParts {
        run: config.run.clone(),
        worker: config.worker.clone(),
        state,
        blobs,
        ledger,
        engine,
        consumer: Some(consumer),
    })
    .await?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
    }
    let grace = config.worker.grace_period();
    if !worker.shutdown().await {
        return Err(WorkerError::ShutdownOverdue(grace));
    }
    Ok(())
}
