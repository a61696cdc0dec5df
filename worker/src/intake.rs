//! The intake: the run's Kafka consumer group → durable registration → ack.
//!
//! For each delivered prompt (malformed and oversized ones never get here: the consumer
//! dead-letters them with the reason and acknowledges them itself): `Ledger::accept_prompt`
//! (the durable record the run can be rebuilt from), then `StateStore::register_prompt`
//! (its K trajectories become claimable), and only then the receipt is acknowledged, which
//! stores the offset. Both writes are idempotent per prompt id, so a prompt redelivered after
//! a crash or a rebalance registers nothing twice. A transient failure of either store is
//! retried (with backoff) until it succeeds or the worker stops; an unacknowledged prompt is
//! simply redelivered later.
//!
//! A prompt whose id was already accepted with *different* content is not registered (the
//! ledger refuses it); it is logged as an error and acknowledged, so it cannot block the
//! partition.

use std::sync::Arc;
use std::time::Duration;

use flywheel_service::Backoff;
use flywheel_storage::Prompt;
use flywheel_storage::ledger::{Ledger, LedgerError};
use flywheel_storage::queue::{PromptConsumer, QueueError};
use flywheel_storage::state::{Registration, StateStore};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics::WorkerMetrics;

/// What the intake needs.
pub struct Intake {
    /// The group member on the prompt topic.
    pub consumer: PromptConsumer,
    /// Run state, where trajectories are registered.
    pub state: Arc<dyn StateStore>,
    /// The durable record of accepted prompts.
    pub ledger: Arc<dyn Ledger>,
    /// Metrics.
    pub metrics: WorkerMetrics,
    /// Pause taking prompts while this many trajectories are pending (0: no bound).
    pub max_pending: u64,
    /// Idle/backoff interval.
    pub poll: Duration,
    /// Stops the intake.
    pub stop: CancellationToken,
}

/// How one prompt's registration went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// Newly registered.
    New,
    /// It was registered before (a redelivery): nothing written.
    Again,
    /// Refused for good (id reused with other content); acknowledged anyway.
    Refused,
}

impl Intake {
    /// Runs until `stop` fires, then commits the acknowledged offsets and leaves the group
    /// (its partitions move to the other workers at once).
    pub async fn run(self) {
        let Intake { consumer, .. } = self.take_prompts().await;
        if let Err(e) = consumer.close().await {
            warn!(error = %e, "closing the kafka consumer failed; the group will time it out");
        }
    }

    /// Whether the backlog of pending trajectories is at the bound.
    async fn backlog_full(&self) -> bool {
        if self.max_pending == 0 {
            return false;
        }
        match self.state.counts().await {
            Ok(c) => c.pending >= self.max_pending,
            Err(e) => {
                warn!(error = %e, "cannot read trajectory counts");
                false
            }
        }
    }

    /// The intake loop; returns itself once `stop` fires.
    ///
    /// While the backlog is full the partitions are paused, not left unpolled: `recv` keeps
    /// running (librdkafka serves rebalances inside it), so this member still hands over and
    /// takes partitions when another member joins or dies. A partition assigned meanwhile
    /// starts fetching until the next pass pauses it, so the backlog overshoots by at most a
    /// message per new partition.
    async fn take_prompts(self) -> Self {
        let backoff = Backoff::new(self.poll, Duration::from_secs(10));
        let mut receive_failures = 0;
        let mut paused = false;
        loop {
            if self.stop.is_cancelled() {
                return self;
            }
            let full = self.backlog_full().await;
            let flow = if full {
                self.consumer.pause()
            } else if paused {
                self.consumer.resume()
            } else {
                Ok(())
            };
            match flow {
                Ok(()) => paused = full,
                Err(e) => warn!(error = %e, "cannot pause or resume the prompt partitions"),
            }
            let delivery = tokio::select! {
                _ = self.stop.cancelled() => None,
                d = self.consumer.recv() => Some(d),
                _ = tokio::time::sleep(self.poll), if full => continue,
            };
            let Some(delivery) = delivery else {
                return self;
            };
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => {
                    warn!(error = %e, "kafka receive failed; retrying");
                    receive_failures += 1;
                    self.sleep(backoff.delay(receive_failures)).await;
                    continue;
                }
            };
            receive_failures = 0;
            // Keep trying this prompt: giving up would leave its offset unstored and block
            // the partition's later acks until a restart redelivers it anyway.
            let mut failures = 0;
            loop {
                let registered = register_prompt(
                    self.state.as_ref(),
                    self.ledger.as_ref(),
                    &self.metrics,
                    &delivery.prompt,
                );
                match registered.await {
                    Ok(_) => break,
                    Err(e) => {
                        warn!(prompt = %delivery.prompt.id, error = %e, "registration failed; retrying");
                        if self.stop.is_cancelled() {
                            // Not acknowledged: redelivered to the group later.
                            return self;
                        }
                        failures += 1;
                        self.sleep(backoff.delay(failures)).await;
                    }
                }
            }
            match delivery.receipt.ack() {
                Ok(outcome) => tracing::debug!(?outcome, "prompt acknowledged"),
                Err(e) => warn!(error = %e, "ack failed; the prompt will be redelivered"),
            }
        }
    }

    async fn sleep(&self, d: Duration) {
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }
}

/// Records the prompt in the ledger and registers its trajectories (both idempotent).
pub async fn register_prompt(
    state: &dyn StateStore,
    ledger: &dyn Ledger,
    metrics: &WorkerMetrics,
    prompt: &Prompt,
) -> Result<Registered, IntakeError> {
    let run = state.run_id().to_owned();
    match ledger.accept_prompt(&run, prompt).await {
        Ok(_) => {}
        Err(e @ LedgerError::PromptIdReused { .. }) => {
            error!(prompt = %prompt.id, error = %e, "prompt id reused with different content; not registered");
            return Ok(Registered::Refused);
        }
        Err(e) => return Err(e.into()),
    }
    match state.register_prompt(prompt).await? {
        Registration::Registered => {
            metrics.prompts_registered.inc();
            info!(prompt = %prompt.id, k = prompt.group_size, "prompt registered");
            Ok(Registered::New)
        }
        Registration::AlreadyRegistered => {
            metrics.prompts_redelivered.inc();
            info!(prompt = %prompt.id, "prompt already registered (redelivery)");
            Ok(Registered::Again)
        }
    }
}

/// Why a prompt could not be registered (transient: retried).
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The state store failed.
    #[error(transparent)]
    State(#[from] flywheel_storage::state::StateError),
    /// Kafka failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
}
