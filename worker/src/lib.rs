//! flywheel-worker: the rollout worker (DESIGN.md §3, §6.1, §6.2).
//!
//! - [`engine`]: the [`engine::Engine`] trait that generates one segment of one trajectory,
//!   and its implementations (`sim`, `openai`, `builtin`);
//! - [`verify`]: rewards for finished trajectories ([`verify::Verifier`]);
//! - [`http`]: JSON over HTTP with bounded timeouts and retries, shared by both;
//! - [`hf_dir`]: a published version as a Hugging Face directory (exports, engine servers);
//! - [`intake`]: Kafka prompts → ledger + state registration → ack;
//! - [`service`]: the segment loop (slots, budgets, leases, parking, resume, shutdown);
//! - [`metrics`]: the worker's Prometheus metrics;
//! - [`config`]: the `[worker]` section and [`ServiceConfig`].
//!
//! [`run_until`] is the worker service; [`Worker::start`] starts the same thing with an engine
//! the caller built (tests).

#![warn(missing_docs)]

pub mod config;
pub mod engine;
pub mod hf_dir;
pub mod http;
pub mod intake;
pub mod metrics;
pub mod service;
pub mod verify;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flywheel_service::admin::AdminError;
use flywheel_service::{AdminServer, ConfigError, Readiness};
use flywheel_storage::RunStores;
use flywheel_storage::queue::{PromptConsumer, QueueError};
use flywheel_storage::state::MemberRole;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use config::{ServiceConfig, WorkerConfig};

use crate::engine::{Engine, EngineError};
use crate::metrics::WorkerMetrics;
use crate::service::{SegmentLoop, SegmentLoopParts, Shutdown};
use crate::verify::{VerifierFactory, VerifyError};

/// Why the worker could not start (or stopped badly).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The Kafka consumer could not be created.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The engine could not be built.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The reward services are misconfigured.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The admin server could not start.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// Work was still running when the grace period ran out; its leases will expire.
    #[error("shutdown overran the grace period of {0:?}; unreleased leases will expire")]
    ShutdownOverdue(Duration),
}

/// A started worker.
pub struct Worker {
    /// Its id (the lease owner).
    pub id: String,
    /// Its metrics.
    pub metrics: WorkerMetrics,
    /// Where the admin server listens, if it is on.
    pub admin_addr: Option<SocketAddr>,
    /// The shutdown signals (tests may fire them directly).
    pub shutdown: Shutdown,
    stores: RunStores,
    grace: Duration,
    readiness: Readiness,
    tasks: Vec<JoinHandle<()>>,
    admin: Option<AdminServer>,
}

impl Worker {
    /// Starts the intake (when the stores have a queue), the slots and the admin server.
    pub async fn start(
        stores: RunStores,
        config: ServiceConfig,
        engine: Arc<dyn Engine>,
    ) -> Result<Worker, WorkerError> {
        config.validate()?;
        let ServiceConfig { run, worker } = config;
        let id = worker.worker_id();
        let metrics = WorkerMetrics::new();
        let shutdown = Shutdown::default();
        let readiness = Readiness::new();
        stores.add_readiness_checks(&readiness);
        let admin = AdminServer::start_unless_empty(
            &worker.metrics_addr,
            metrics.registry.clone(),
            readiness.clone(),
        )
        .await?;
        let slots = if worker.slots == 0 {
            engine.slots()
        } else {
            worker.slots
        };
        warn_if_budget_small(&run.rollout, slots);
        let verifiers = VerifierFactory::new(&worker.rewards)?;
        let admission = intake::Admission {
            engine: engine.clone(),
            verifiers: verifiers.clone(),
        };
        let (segments, poller) = SegmentLoop::new(SegmentLoopParts {
            worker_id: id.clone(),
            state: stores.state.clone(),
            blobs: stores.blobs.clone(),
            engine,
            verifiers,
            rollout: run.rollout.clone(),
            sampling: worker.sampling.clone(),
            poll: worker.poll_interval(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        });
        let mut tasks = vec![poller];
        for slot in 0..slots {
            tasks.push(tokio::spawn(segments.clone().run_slot(slot)));
        }
        if let Some(queue) = &stores.queue {
            let intake = intake::Intake {
                consumer: PromptConsumer::new(queue)?,
                admission,
                state: stores.state.clone(),
                ledger: stores.ledger.clone(),
                metrics: metrics.clone(),
                max_pending: worker.max_pending_trajectories,
                poll: worker.poll_interval(),
                stop: shutdown.stop.clone(),
            };
            tasks.push(tokio::spawn(intake.run()));
        }
        readiness.set_serving(true);
        info!(worker = %id, slots, mode = ?run.rollout.mode, "worker started");
        Ok(Worker {
            id,
            metrics,
            admin_addr: admin.as_ref().map(AdminServer::local_addr),
            shutdown,
            stores,
            grace: worker.grace_period(),
            readiness,
            tasks,
            admin,
        })
    }

    /// Graceful shutdown within the grace period: stop claiming and taking prompts, let the
    /// segments in hand commit until 80 % of the grace period, then abort them; every lease is
    /// released; leave the membership. Returns whether everything stopped in time.
    pub async fn shutdown(self) -> bool {
        let started = tokio::time::Instant::now();
        self.readiness.set_serving(false);
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
        if let Err(e) = self.stores.state.leave(MemberRole::Worker, &self.id).await {
            warn!(error = %e, "could not leave the membership; the heartbeat will lapse");
        }
        if let Some(admin) = self.admin {
            admin.stop().await;
        }
        info!(worker = %self.id, clean, elapsed_ms = started.elapsed().as_millis() as u64, "worker stopped");
        clean
    }
}

/// Warns when Φ_r is small against what this worker keeps in flight: every slot reserves up to
/// S tokens a segment, so with Φ_r below slots × S a version's budget is spent before each
/// slot has had one segment, and groups of K need K trajectories to progress. (The
/// coordinator widens a spent budget that can complete no group, so the run goes on, but a
/// larger Φ_r avoids the stalls.)
fn warn_if_budget_small(rollout: &flywheel_storage::config::RolloutConfig, slots: usize) {
    let per_version = slots as u64 * u64::from(rollout.segment_tokens);
    if rollout.version_budget_tokens < per_version {
        warn!(
            version_budget_tokens = rollout.version_budget_tokens,
            slots,
            segment_tokens = rollout.segment_tokens,
            "rollout.version_budget_tokens (Φ_r) is below this worker's slots × \
             rollout.segment_tokens: a version's budget is spent before every slot generates \
             one segment, and groups may not complete within a version; raise Φ_r to at least \
             slots × S × K for groups of K"
        );
    }
}

/// The worker service: builds the configured engine, joins the consumer group (when the
/// stores have a queue), generates until `shutdown` resolves, then shuts down within the
/// grace period.
pub async fn run_until(
    stores: RunStores,
    config: ServiceConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    config.validate()?;
    let engine = config
        .worker
        .engine
        .build_for_run(&stores.blobs, &stores.run_id)?;
    let grace = config.worker.grace_period();
    let worker = Worker::start(stores, config, engine).await?;
    shutdown.await;
    if !worker.shutdown().await {
        return Err(WorkerError::ShutdownOverdue(grace));
    }
    Ok(())
}
