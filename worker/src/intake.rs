//! The intake: the run's Kafka consumer group → admission → durable registration → ack.
//!
//! For each delivered prompt: [`Admission::check`] tests it against what will run it (the
//! engine's vocabulary, tokenizer and context, the verifier it names); an admitted prompt is
//! recorded with `Ledger::accept_prompt` (the durable record the run can be rebuilt from), its
//! K trajectories are registered with `StateStore::register_prompt`, and only then is the
//! receipt acknowledged, which stores the offset. Both writes are idempotent per prompt id, so
//! a prompt redelivered after a crash or a rebalance registers nothing twice; one the ledger
//! already closed (trained or dropped) is not registered again. A transient failure of either
//! store is retried (with backoff) until it succeeds or the worker stops; an unacknowledged
//! prompt is simply redelivered later.
//!
//! A message that is not an acceptable prompt (malformed, oversized, an invalid id; or a
//! prompt the admission refuses) is *rejected*: copied to the dead-letter topic with its
//! reason (bounded retries: a copy that cannot be written is given up rather than pinning the
//! partition), recorded in the ledger as dropped (`Malformed` or `Oversized`) under its id
//! (or `kafka:<topic>/<partition>/<offset>` when it has no usable id), then acknowledged.
//!
//! A prompt whose id was already accepted with *different* content is not registered (the
//! ledger refuses it); it is logged as an error and acknowledged, so it cannot block the
//! partition.

use std::sync::Arc;
use std::time::Duration;

use flywheel_service::Backoff;
use flywheel_storage::ledger::{DropReason, Ledger, LedgerError, PromptStatus, Recorded};
use flywheel_storage::queue::{self, InvalidPrompt, PromptConsumer, QueueError, Receipt, Received};
use flywheel_storage::state::{Registration, StateStore};
use flywheel_storage::{Prompt, PromptId, PromptInput};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::engine::{Engine, EngineError, EngineLimits};
use crate::metrics::WorkerMetrics;
use crate::verify::VerifierFactory;

/// What the intake needs.
pub struct Intake {
    /// The group member on the prompt topic.
    pub consumer: PromptConsumer,
    /// What a prompt must pass before it is accepted.
    pub admission: Admission,
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
    /// Refused for good (id reused with other content), or already trained or dropped:
    /// nothing registered; acknowledged anyway.
    Refused,
}

/// Why the intake refuses a prompt, for the dead letter and the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The ledger's drop reason (`Malformed` or `Oversized`).
    pub reason: DropReason,
    /// Short, stable name for the dead letter's kind header.
    pub kind: &'static str,
    /// What is wrong, for a person.
    pub detail: String,
}

impl Rejection {
    fn new(reason: DropReason, kind: &'static str, detail: String) -> Self {
        Rejection {
            reason,
            kind,
            detail,
        }
    }

    /// The rejection of a message that is not a prompt at all.
    fn of_invalid(invalid: &InvalidPrompt) -> Self {
        let reason = match invalid {
            InvalidPrompt::Oversized { .. } => DropReason::Oversized,
            _ => DropReason::Malformed,
        };
        Rejection::new(reason, invalid.kind(), invalid.to_string())
    }
}

/// Checks prompts against what will run them, so that a prompt that cannot run is refused
/// once, at intake, instead of failing every attempt later.
#[derive(Clone)]
pub struct Admission {
    /// The engine: its vocabulary, tokenizer and context.
    pub engine: Arc<dyn Engine>,
    /// The verifiers: the reward service a prompt names must be configured.
    pub verifiers: VerifierFactory,
}

impl Admission {
    /// `Ok(None)` admits the prompt; `Ok(Some(_))` refuses it for good; `Err` is an engine
    /// error that may pass (the caller tries again later).
    pub async fn check(&self, prompt: &Prompt) -> Result<Option<Rejection>, EngineError> {
        let malformed =
            |kind, detail| Ok(Some(Rejection::new(DropReason::Malformed, kind, detail)));
        if let Err(e) = self.verifiers.build(&prompt.verifier) {
            return malformed("verifier", e.to_string());
        }
        let limits = match self.engine.limits().await {
            Ok(limits) => limits,
            Err(e) if e.is_retryable() => return Err(e),
            Err(e) => {
                warn!(error = %e, "the engine cannot say what a prompt must fit; admitting unchecked");
                EngineLimits::default()
            }
        };
        let tokens = match &prompt.input {
            PromptInput::Tokens(tokens) => tokens.clone(),
            PromptInput::Text(text) => match self.engine.tokenize(text).await {
                Ok(tokens) => tokens,
                Err(e) if e.is_retryable() => return Err(e),
                Err(e) => {
                    return malformed("tokenizer", format!("the text cannot be tokenised: {e}"));
                }
            },
        };
        if let Some(vocab) = limits.vocab_size
            && let Some(bad) = tokens.iter().find(|&&t| t >= vocab)
        {
            return malformed(
                "vocabulary",
                format!("token id {bad} is outside the model's vocabulary of {vocab} ids"),
            );
        }
        if let Some(context) = limits.context_tokens
            && tokens.len() >= context as usize
        {
            return Ok(Some(Rejection::new(
                DropReason::Oversized,
                "context",
                format!(
                    "the prompt has {} tokens; the model's context of {context} leaves no room \
                     for a response",
                    tokens.len()
                ),
            )));
        }
        Ok(None)
    }
}

/// A message to reject: what the dead letter copies and the ledger records.
struct ToReject<'a> {
    /// The ledger id it is recorded under.
    id: PromptId,
    /// Where it was read ([`Receipt::source`]).
    source: String,
    key: Option<&'a [u8]>,
    payload: &'a [u8],
    rejection: Rejection,
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
        let mut lag_recorded: Option<tokio::time::Instant> = None;
        loop {
            if self.stop.is_cancelled() {
                return self;
            }
            if lag_recorded.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                self.metrics
                    .record_consumer_lag(&self.consumer.consumer_lag());
                lag_recorded = Some(tokio::time::Instant::now());
            }
            // Both are set on the assignment of the moment, every pass: a rebalance can hand
            // back partitions still paused (or take them while a resume ran on an empty
            // assignment), so "resumed once" does not mean "fetching now".
            let full = self.backlog_full().await;
            let flow = if full {
                self.consumer.pause()
            } else {
                self.consumer.resume()
            };
            if let Err(e) = flow {
                warn!(error = %e, "cannot pause or resume the prompt partitions");
            }
            // `recv_any` is cancellation-safe (nothing is taken before it returns): an idle
            // member still wakes every second to report its lag.
            let received = tokio::select! {
                _ = self.stop.cancelled() => None,
                d = self.consumer.recv_any() => Some(d),
                _ = tokio::time::sleep(self.poll), if full => continue,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            };
            let Some(received) = received else {
                return self;
            };
            let received = match received {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "kafka receive failed; retrying");
                    receive_failures += 1;
                    self.sleep(backoff.delay(receive_failures)).await;
                    continue;
                }
            };
            receive_failures = 0;
            let done = match received {
                Received::Prompt(delivery) => {
                    self.take(delivery.prompt, delivery.receipt, &backoff).await
                }
                Received::Invalid(message) => {
                    let rejection = Rejection::of_invalid(&message.invalid);
                    let reject = ToReject {
                        id: queue::ledger_id(&message.payload, &message.receipt.source()),
                        source: message.receipt.source(),
                        key: message.key.as_deref(),
                        payload: &message.payload,
                        rejection,
                    };
                    self.reject(&reject, &backoff)
                        .await
                        .then_some(message.receipt)
                }
            };
            // Not done: the worker is stopping; the message is redelivered to the group later.
            let Some(receipt) = done else {
                return self;
            };
            match receipt.ack() {
                Ok(outcome) => tracing::debug!(?outcome, "prompt acknowledged"),
                Err(e) => warn!(error = %e, "ack failed; the prompt will be redelivered"),
            }
        }
    }

    /// Admits and registers a valid prompt, or rejects it. Returns the receipt to acknowledge,
    /// or `None` when the worker stopped first.
    async fn take(&self, prompt: Prompt, receipt: Receipt, backoff: &Backoff) -> Option<Receipt> {
        // Keep trying this prompt: giving up would leave its offset unstored and block the
        // partition's later acks until a restart redelivers it anyway.
        let mut failures = 0;
        loop {
            let attempt = match self.admission.check(&prompt).await {
                Ok(None) => register_prompt(
                    self.state.as_ref(),
                    self.ledger.as_ref(),
                    &self.metrics,
                    &prompt,
                )
                .await
                .map(drop),
                Ok(Some(rejection)) => {
                    let payload = serde_json::to_vec(&prompt).unwrap_or_default();
                    let reject = ToReject {
                        id: prompt.id.clone(),
                        source: receipt.source(),
                        key: Some(prompt.id.0.as_bytes()),
                        payload: &payload,
                        rejection,
                    };
                    return self.reject(&reject, backoff).await.then_some(receipt);
                }
                Err(e) => Err(IntakeError::Engine(e)),
            };
            match attempt {
                Ok(()) => return Some(receipt),
                Err(e) => {
                    warn!(prompt = %prompt.id, error = %e, "registration failed; retrying");
                    if self.stop.is_cancelled() {
                        return None;
                    }
                    failures += 1;
                    self.sleep(backoff.delay(failures)).await;
                }
            }
        }
    }

    /// Dead-letters a rejected message and records it dropped in the ledger. Returns whether
    /// it is done (false: the worker stopped before the ledger took the record).
    async fn reject(&self, message: &ToReject<'_>, backoff: &Backoff) -> bool {
        let r = &message.rejection;
        warn!(prompt = %message.id, reason = %r.reason, detail = %r.detail, "prompt rejected");
        let copied = self
            .consumer
            .dead_letter(
                message.key,
                message.payload,
                &message.source,
                r.kind,
                &r.detail,
            )
            .await;
        if !copied {
            self.metrics.dead_letters_lost.inc();
        }
        let run = self.state.run_id();
        let mut failures = 0;
        loop {
            match self
                .ledger
                .reject_prompt(run, &message.id, r.reason, &r.detail)
                .await
            {
                Ok(_) => break,
                Err(
                    e @ (LedgerError::PromptIdReused { .. }
                    | LedgerError::PromptAlreadyDropped { .. }),
                ) => {
                    error!(prompt = %message.id, error = %e, "rejected input's id is already in the ledger; not recorded again");
                    break;
                }
                Err(e) => {
                    warn!(prompt = %message.id, error = %e, "cannot record the rejection; retrying");
                    if self.stop.is_cancelled() {
                        return false;
                    }
                    failures += 1;
                    self.sleep(backoff.delay(failures)).await;
                }
            }
        }
        self.metrics
            .prompts_rejected
            .with_label_values(&[r.reason.as_str()])
            .inc();
        true
    }

    async fn sleep(&self, d: Duration) {
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }
}

/// Records the prompt in the ledger and registers its trajectories (both idempotent). A
/// prompt the ledger already closed (trained, or dropped, for example rejected earlier under
/// the same id) is not registered.
pub async fn register_prompt(
    state: &dyn StateStore,
    ledger: &dyn Ledger,
    metrics: &WorkerMetrics,
    prompt: &Prompt,
) -> Result<Registered, IntakeError> {
    let run = state.run_id().to_owned();
    match ledger.accept_prompt(&run, prompt).await {
        Ok(Recorded::New) => {}
        Ok(Recorded::Existing) => match ledger.prompt_status(&run, &prompt.id).await? {
            Some(PromptStatus::Pending) => {}
            status => {
                info!(prompt = %prompt.id, ?status, "prompt already closed in the ledger; not registered");
                return Ok(Registered::Refused);
            }
        },
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
    /// The engine could not say whether the prompt fits (it is unavailable).
    #[error(transparent)]
    Engine(#[from] EngineError),
}
