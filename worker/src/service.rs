//! The segment loop (DESIGN.md §6.1, §6.2): N slots, each claiming a trajectory and
//! generating it segment by segment under a lease.
//!
//! # One segment
//! claim → reserve min(S, remaining response) tokens from the current version's budget →
//! generate (prompt + committed tokens re-prefilled) → refund the unused → put the encoded
//! segment at `{run}/segments/{prompt}/{sample}/{seq:08}-e{epoch}` → `commit_segment` under the
//! lease epoch (a stale epoch is rejected: the work is dropped and logged) → which renews the
//! lease. When a segment ends the trajectory (EOS or the response cap), the response is
//! detokenised, scored by the prompt's verifier, and `finish` pushes it to the finished stream.
//! The lease is also renewed on a timer (every third of `lease_ms`) while the engine or the
//! verifier works, so a slow segment does not lose its lease.
//!
//! # Modes (`rollout.mode`)
//! - `partial` (C3PO++): every segment reserves from the version's budget; a grant of 0 means
//!   the budget is spent: the trajectory is released (parked when it has committed segments,
//!   back to pending otherwise) and the slot waits until a fresh read of the budget shows
//!   tokens again: a newer version, or refunds of other segments' unused reservations (a
//!   spent budget must end exactly at 0, which the coordinator's step cut waits for). On a new version
//!   `claim_next` hands out parked trajectories first, oldest first version first.
//! - `sync`: the budget only gates *starting* a trajectory: a trajectory with no committed
//!   segment that gets no budget is released and the slot waits; one already started runs to
//!   its end whatever the budget says (its extra tokens are generated unreserved), so every
//!   trajectory of a step ends under the version it started with. Slots keep claiming while
//!   started work is left (an expired lease, a trajectory parked by a stopping worker): the
//!   coordinator does not cut the version's step before it is finished.
//! - `async`: the same gate, over a budget of (η + 1) · Φ_r per version: starting new work is
//!   bounded run-wide, a started trajectory never waits. A trajectory found more than η
//!   versions behind the current one before a segment is abandoned (it gives up with
//!   `lag_exceeded`, and the coordinator drops its group): no slot waits on it.
//!
//! # Failures
//! A turn that fails (an engine or verifier error, an object-store failure) is recorded on the
//! trajectory ([`StateStore::record_failure`]) and the lease given up; another attempt
//! follows, on any worker. After `rollout.max_failures` failed attempts whose last error cannot
//! pass on a retry (or `rollout.max_transient_failures` of any kind) the trajectory gives up
//! and its group is dropped (`generation_failed`): nothing is retried for ever.
//!
//! # Shutdown (SIGTERM)
//! The `stop` token ends claiming at once; a slot lets the segment in hand finish, commits it
//! and releases the lease (parking the trajectory). The `abort` token (fired at 80 % of the
//! grace period) drops the segment in hand instead: its reservation is refunded and the lease
//! released. Every path out of a trajectory releases its lease unless the lease was lost.
//!
//! # Resume
//! A claimed trajectory with committed segments is re-read from the object store (each segment
//! decoded and checked: seq, token count); the engine re-prefills prompt + committed tokens. A
//! segment that is missing, will not decode or does not match its index entry is unusable:
//! the trajectory goes back to its last good segment ([`StateStore::truncate`]) and is
//! generated on from there. A trajectory whose last committed segment already ended it (a
//! worker died between commit and finish) is scored and finished without generating.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flywheel_storage::blob::{BlobError, BlobStore};
use flywheel_storage::codec::{self, CodecError};
use flywheel_storage::config::{RolloutConfig, RolloutMode};
use flywheel_storage::ledger::DropReason;
use flywheel_storage::state::{
    Budget, Claim, ClaimSource, FailureRecorded, GiveUp, StateError, StateStore,
};
use flywheel_storage::{
    FinishReason, PolicyVersion, Prompt, PromptInput, Segment, SegmentRef, TrajectoryId,
    TrajectoryStatus, keys,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::engine::{Engine, EngineError, SamplingConfig, SegmentRequest, prompt_tokens};
use crate::metrics::WorkerMetrics;
use crate::verify::{VerifierFactory, VerifyError, VerifyInput};

/// Why one trajectory's turn on a slot ended badly (logged; the lease is released or lost).
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The object store failed.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// A committed segment could not be decoded, or the one to write could not be encoded.
    #[error("segment codec: {0}")]
    Codec(#[from] CodecError),
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The verifier failed.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The committed segments do not match the index (a corrupt or foreign object).
    #[error("trajectory {id}: {problem}")]
    Inconsistent {
        /// The trajectory.
        id: TrajectoryId,
        /// What does not match.
        problem: String,
    },
}

impl SlotError {
    /// Whether another attempt may succeed: the engine or verifier was unavailable, or the
    /// object store failed. A rejected request, a protocol error, an unknown reward service or
    /// a codec error will fail the same way again.
    fn is_transient(&self) -> bool {
        match self {
            SlotError::Engine(e) => e.is_retryable(),
            SlotError::Verify(e) => e.is_retryable(),
            SlotError::State(_) | SlotError::Blob(_) => true,
            SlotError::Codec(_) | SlotError::Inconsistent { .. } => false,
        }
    }
}

/// Whether a lease write failed because the lease is gone: fenced by a newer claim, or the
/// trajectory is unknown (the state store was lost; the leader rebuilds it without leases).
fn lease_lost(e: &StateError) -> bool {
    matches!(
        e,
        StateError::Fenced { .. } | StateError::UnknownTrajectory(_)
    )
}

/// A claimed trajectory's usable committed segments, read back.
struct Loaded {
    /// Their tokens, in order.
    tokens: Vec<u32>,
    /// How the last one ended.
    last_finish: Option<FinishReason>,
    /// The version of the first one.
    first_version: Option<PolicyVersion>,
    /// How many are usable (the next segment's seq).
    segments: u32,
}

/// An error's text cut to a size fit for the state store and the ledger.
fn bounded_text(text: &str) -> String {
    const MAX: usize = 1000;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// Shutdown signals shared by the slots and the intake.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    /// Stop taking work: no more claims, no more prompts; finish the segment in hand.
    pub stop: CancellationToken,
    /// Drop the segment in hand now and release the lease.
    pub abort: CancellationToken,
}

/// What the slots share.
pub struct SegmentLoop {
    /// The lease owner.
    worker_id: String,
    /// Run state.
    state: Arc<dyn StateStore>,
    /// Where segments are written and read back.
    blobs: BlobStore,
    /// The inference engine.
    engine: Arc<dyn Engine>,
    /// Builds the verifier of a prompt.
    verifiers: VerifierFactory,
    /// Rollout protocol settings.
    rollout: RolloutConfig,
    /// How segments are sampled.
    sampling: SamplingConfig,
    /// Idle re-check interval.
    poll: Duration,
    /// Metrics.
    metrics: WorkerMetrics,
    /// Shutdown signals.
    shutdown: Shutdown,
    /// The current budget as last read by the poller (None before the first version).
    budget: watch::Receiver<Option<Polled>>,
    /// Number of budget reads the poller has started (the generation of the next read).
    polls: AtomicU64,
    /// The poll generation when a reservation last found the budget spent: only a budget read
    /// that started after it (a strictly newer generation) can say there is budget again.
    /// Refunds can bring a spent budget back above 0 within the same version, so a spent
    /// budget is not sticky until the next version (that could stall the step cut, which
    /// waits for the budget to be exactly spent).
    spent_at: AtomicU64,
    /// Started work of the run waiting for a slot: expired leases plus parked trajectories,
    /// as last counted by the poller (`sync` and `async` claim it whatever the budget says).
    started_waiting: AtomicU64,
}

/// A budget read and the poll generation it started in.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Polled {
    budget: Budget,
    generation: u64,
}

/// Counts a trajectory in the active gauge for as long as its turn lasts.
struct Active<'a>(&'a WorkerMetrics);

impl<'a> Active<'a> {
    fn new(metrics: &'a WorkerMetrics) -> Self {
        metrics.active_trajectories.inc();
        Active(metrics)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active_trajectories.dec();
    }
}

/// How a call made under a lease ended early.
enum Interrupted {
    /// The abort token fired.
    Aborted,
    /// The lease is no longer ours (renew was fenced): drop the work.
    Lost(StateError),
}

/// The inputs of [`SegmentLoop::new`].
pub struct SegmentLoopParts {
    /// The lease owner (unique per process).
    pub worker_id: String,
    /// Run state.
    pub state: Arc<dyn StateStore>,
    /// Object store of the run.
    pub blobs: BlobStore,
    /// The engine.
    pub engine: Arc<dyn Engine>,
    /// Verifiers.
    pub verifiers: VerifierFactory,
    /// Rollout settings.
    pub rollout: RolloutConfig,
    /// Sampling settings.
    pub sampling: SamplingConfig,
    /// Idle re-check interval.
    pub poll: Duration,
    /// Metrics.
    pub metrics: WorkerMetrics,
    /// Shutdown signals.
    pub shutdown: Shutdown,
}

impl SegmentLoop {
    /// Builds the loop and starts its poller (budget, counts and heartbeat), which runs until
    /// `stop` fires.
    pub fn new(parts: SegmentLoopParts) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(None);
        let this = Arc::new(SegmentLoop {
            worker_id: parts.worker_id,
            state: parts.state,
            blobs: parts.blobs,
            engine: parts.engine,
            verifiers: parts.verifiers,
            rollout: parts.rollout,
            sampling: parts.sampling,
            poll: parts.poll,
            metrics: parts.metrics,
            shutdown: parts.shutdown,
            budget: rx,
            polls: AtomicU64::new(0),
            spent_at: AtomicU64::new(0),
            started_waiting: AtomicU64::new(0),
        });
        let poller = tokio::spawn(this.clone().poll_state(tx));
        (this, poller)
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.rollout.lease_ms)
    }

    /// Re-reads the budget every poll interval and heartbeats every third of the lease.
    async fn poll_state(self: Arc<Self>, tx: watch::Sender<Option<Polled>>) {
        let heartbeat_every = self.ttl() / 3;
        let mut last_heartbeat: Option<tokio::time::Instant> = None;
        loop {
            // Generations start at 1; `spent_at` = 0 means never spent.
            let generation = self.polls.fetch_add(1, Ordering::SeqCst) + 1;
            match self.state.budget().await {
                Ok(budget) => {
                    if let Some(b) = budget {
                        self.metrics.current_version.set(b.version as i64);
                    }
                    let polled = budget.map(|budget| Polled { budget, generation });
                    tx.send_replace(polled);
                }
                Err(e) => warn!(error = %e, "cannot read the rollout budget"),
            }
            if last_heartbeat.is_none_or(|t| t.elapsed() >= heartbeat_every) {
                let beat = self.state.heartbeat(
                    flywheel_storage::state::MemberRole::Worker,
                    &self.worker_id,
                    self.ttl(),
                );
                match beat.await {
                    Ok(()) => last_heartbeat = Some(tokio::time::Instant::now()),
                    Err(e) => warn!(error = %e, "heartbeat failed"),
                }
                if let Ok(c) = self.state.counts().await {
                    self.started_waiting
                        .store(c.lease_expired + c.parked, Ordering::Relaxed);
                    let g = &self.metrics.run_trajectories;
                    for (status, n) in [
                        ("pending", c.pending),
                        ("generating", c.generating),
                        ("parked", c.parked),
                        ("finished", c.finished),
                        ("purged", c.purged),
                        ("dropped", c.dropped),
                    ] {
                        g.with_label_values(&[status]).set(n as i64);
                    }
                }
            }
            tokio::select! {
                _ = self.shutdown.stop.cancelled() => return,
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
    }

    /// Runs one slot until shutdown.
    pub async fn run_slot(self: Arc<Self>, slot: usize) {
        let mut budget = self.budget.clone();
        loop {
            if !self.wait_for_work(&mut budget).await {
                return;
            }
            match self.state.claim_next(&self.worker_id, self.ttl()).await {
                Ok(Some(claim)) => {
                    let id = claim.state.id.clone();
                    if let Err(e) = self.run_claim(claim).await {
                        warn!(slot, trajectory = %id, error = %e, "trajectory turn failed");
                        self.idle(self.poll * 5).await;
                    }
                }
                Ok(None) => self.idle(self.poll).await,
                Err(e) => {
                    warn!(slot, error = %e, "claim failed");
                    self.idle(self.poll * 5).await;
                }
            }
        }
    }

    /// Sleeps unless shutdown begins first.
    async fn idle(&self, d: Duration) {
        tokio::select! {
            _ = self.shutdown.stop.cancelled() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }

    /// Waits until the mode allows claiming; false once shutdown begins.
    async fn wait_for_work(&self, budget: &mut watch::Receiver<Option<Polled>>) -> bool {
        loop {
            if self.shutdown.stop.is_cancelled() {
                return false;
            }
            let current = *budget.borrow_and_update();
            let budget_open = |p: &Polled| {
                p.budget.remaining > 0 && p.generation > self.spent_at.load(Ordering::SeqCst)
            };
            let ok = match current {
                None => false,
                Some(p) => match self.rollout.mode {
                    RolloutMode::Partial => budget_open(&p),
                    // Started work (a dead worker's expired lease, a trajectory parked by a
                    // stopping one) runs on whatever the budget says: parked and expired
                    // trajectories are claimed before pending work.
                    RolloutMode::Sync | RolloutMode::Async => {
                        budget_open(&p) || self.started_waiting.load(Ordering::Relaxed) > 0
                    }
                },
            };
            if ok {
                return true;
            }
            tokio::select! {
                _ = self.shutdown.stop.cancelled() => return false,
                _ = budget.changed() => {}
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
    }

    /// Records that the budget is spent: slots wait until a budget read started after now
    /// shows tokens again (a newer version, or refunds).
    fn mark_spent(&self) {
        let now = self.polls.load(Ordering::SeqCst);
        self.spent_at.fetch_max(now, Ordering::SeqCst);
        self.metrics.budget_waits.inc();
    }

    /// Reserves up to `want` tokens of the current version; a grant of 0 from a version that
    /// was replaced meanwhile is retried against the new one.
    async fn reserve(&self, want: u64) -> Result<(PolicyVersion, u64), StateError> {
        let mut version = self.current_version().await?;
        for _ in 0..3 {
            let granted = self.state.reserve(version, want).await?;
            if granted > 0 {
                return Ok((version, granted));
            }
            let now = self.current_version().await?;
            if now == version {
                break;
            }
            version = now;
        }
        Ok((version, 0))
    }

    async fn current_version(&self) -> Result<PolicyVersion, StateError> {
        self.state.current_version().await?.ok_or_else(|| {
            StateError::Invalid("no policy version is open yet (the coordinator opens v0)".into())
        })
    }

    /// Runs `fut` while renewing the lease on a timer; stops early on abort or a lost lease.
    async fn under_lease<F: Future>(
        &self,
        id: &TrajectoryId,
        epoch: u64,
        fut: F,
    ) -> Result<F::Output, Interrupted> {
        tokio::pin!(fut);
        let every = self.ttl() / 3;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                out = &mut fut => return Ok(out),
                _ = self.shutdown.abort.cancelled() => return Err(Interrupted::Aborted),
                _ = tick.tick() => {
                    match self.state.renew(id, &self.worker_id, epoch, self.ttl()).await {
                        Ok(_) => {}
                        Err(e) if lease_lost(&e) => return Err(Interrupted::Lost(e)),
                        // A transient failure: the next tick (well before expiry) tries again.
                        Err(e) => warn!(trajectory = %id, error = %e, "lease renewal failed"),
                    }
                }
            }
        }
    }

    /// Gives the lease up; returns the status the trajectory went to.
    async fn release(&self, id: &TrajectoryId, epoch: u64) -> Option<TrajectoryStatus> {
        match self.state.release(id, &self.worker_id, epoch).await {
            Ok(status) => {
                if status == TrajectoryStatus::Parked {
                    self.metrics.parked.inc();
                }
                debug!(trajectory = %id, ?status, "lease released");
                Some(status)
            }
            Err(e) => {
                if lease_lost(&e) {
                    self.metrics.fenced_writes.inc();
                }
                warn!(trajectory = %id, error = %e, "release failed; the lease will expire");
                None
            }
        }
    }

    /// Runs one claimed trajectory until it ends, parks, or this worker stops. Releases the
    /// lease on every path except a lost lease; a failed turn is recorded on the trajectory.
    async fn run_claim(&self, claim: Claim) -> Result<(), SlotError> {
        let id = claim.state.id.clone();
        let epoch = claim.lease().epoch;
        let source = match claim.source {
            ClaimSource::Parked => "parked",
            ClaimSource::Pending => "pending",
            ClaimSource::Expired => "expired",
        };
        self.metrics.lease_claims.with_label_values(&[source]).inc();
        match claim.source {
            ClaimSource::Parked => self.metrics.resumed.inc(),
            ClaimSource::Expired => {
                self.metrics.lease_steals.inc();
                info!(trajectory = %id, epoch, segments = claim.state.segments.len(), "resuming a trajectory whose lease expired");
            }
            ClaimSource::Pending => {}
        }
        let _active = Active::new(&self.metrics);
        debug!(trajectory = %id, epoch, source, segments = claim.state.segments.len(), "claimed");

        match self.generate(&claim).await {
            Ok(()) => Ok(()),
            // The store itself failed: nothing to record the failure in.
            Err(e @ SlotError::State(_)) => {
                self.release(&id, epoch).await;
                Err(e)
            }
            Err(e) => {
                self.record_failure(&id, epoch, &e).await;
                Err(e)
            }
        }
    }

    /// Records a failed turn on the trajectory (and gives the lease up); at the bound the
    /// trajectory gives up and its group is dropped.
    async fn record_failure(&self, id: &TrajectoryId, epoch: u64, error: &SlotError) {
        let transient = error.is_transient();
        let kind = if transient { "transient" } else { "permanent" };
        self.metrics
            .attempt_failures
            .with_label_values(&[kind])
            .inc();
        let limit = if transient {
            self.rollout.max_transient_failures
        } else {
            self.rollout.max_failures
        };
        let give_up = GiveUp {
            reason: DropReason::GenerationFailed,
            detail: bounded_text(&error.to_string()),
        };
        self.give_up_at(id, epoch, &give_up, limit).await;
    }

    /// [`StateStore::record_failure`] with logging and metrics; a failure to record releases
    /// the lease instead (or leaves it to expire).
    async fn give_up_at(&self, id: &TrajectoryId, epoch: u64, give_up: &GiveUp, limit: u32) {
        match self
            .state
            .record_failure(id, &self.worker_id, epoch, give_up, limit)
            .await
        {
            Ok(FailureRecorded::Released { status, failures }) => {
                warn!(trajectory = %id, failures, limit, ?status, error = %give_up.detail, "attempt failed; the trajectory will be tried again");
            }
            Ok(FailureRecorded::GaveUp(_)) => {
                self.metrics
                    .trajectories_given_up
                    .with_label_values(&[give_up.reason.as_str()])
                    .inc();
                warn!(trajectory = %id, reason = %give_up.reason, error = %give_up.detail, "trajectory gave up; its group will be dropped");
            }
            Err(e) => {
                warn!(trajectory = %id, error = %e, "cannot record the failed attempt");
                if !lease_lost(&e) {
                    self.release(id, epoch).await;
                }
            }
        }
    }

    /// The body of [`SegmentLoop::run_claim`]; an error return means the lease is still held
    /// (the caller releases it).
    async fn generate(&self, claim: &Claim) -> Result<(), SlotError> {
        let id = &claim.state.id;
        let epoch = claim.lease().epoch;
        let prompt =
            self.state
                .prompt(&id.prompt)
                .await?
                .ok_or_else(|| SlotError::Inconsistent {
                    id: id.clone(),
                    problem: "its prompt is not registered".into(),
                })?;
        let prompt_ids = prompt_tokens(self.engine.as_ref(), &prompt.input).await?;
        let Some(loaded) = self.load_committed(claim).await? else {
            return Ok(()); // the lease was lost
        };
        let (mut committed, mut last_finish) = (loaded.tokens, loaded.last_finish);
        let mut first_version = loaded.first_version;
        let mut seq = loaded.segments;
        let cap = self.rollout.max_response_tokens;

        loop {
            let ended = last_finish.is_some_and(FinishReason::ends_trajectory)
                || committed.len() >= cap as usize;
            if ended {
                return self.score_and_finish(id, epoch, &prompt, &committed).await;
            }
            if self.shutdown.stop.is_cancelled() {
                self.release(id, epoch).await;
                return Ok(());
            }
            if let Some(give_up) = self.lagging(first_version).await? {
                self.give_up_at(id, epoch, &give_up, 1).await;
                return Ok(());
            }
            let want = self
                .rollout
                .segment_tokens
                .min(cap - committed.len() as u32);
            let (version, granted) = self.reserve(u64::from(want)).await?;
            if granted == 0 {
                let wait = match self.rollout.mode {
                    RolloutMode::Partial => true,
                    RolloutMode::Sync | RolloutMode::Async => seq == 0,
                };
                if wait {
                    self.mark_spent();
                    let status = self.release(id, epoch).await;
                    info!(trajectory = %id, version, ?status, "version budget spent; waiting for the next version");
                    return Ok(());
                }
            }
            // `granted` ≤ `want` ≤ u32::MAX; unreserved (sync tail, async) generates `want`.
            let n = if granted > 0 { granted as u32 } else { want };
            let req = SegmentRequest {
                trajectory: id.clone(),
                prompt: prompt_ids.clone(),
                committed: committed.as_slice().into(),
                max_new_tokens: n,
                max_response_tokens: cap,
                version,
                sampling: self.sampling.clone(),
            };
            let timer = self.metrics.engine_latency.start_timer();
            let outcome = self.under_lease(id, epoch, self.engine.generate(req)).await;
            timer.observe_duration();
            let out = match outcome {
                Ok(Ok(out)) => out,
                Ok(Err(e)) => {
                    self.metrics.engine_errors.inc();
                    self.refund(version, granted).await;
                    return Err(e.into());
                }
                Err(Interrupted::Aborted) => {
                    self.refund(version, granted).await;
                    info!(trajectory = %id, seq, "segment aborted by shutdown");
                    self.release(id, epoch).await;
                    return Ok(());
                }
                Err(Interrupted::Lost(e)) => {
                    self.refund(version, granted).await;
                    self.metrics.fenced_writes.inc();
                    warn!(trajectory = %id, error = %e, "lease lost while generating; segment dropped");
                    return Ok(());
                }
            };
            let generated = out.tokens.len() as u64;
            self.metrics.tokens_generated.inc_by(generated);
            if granted > generated {
                self.refund(version, granted - generated).await;
            }

            let segment = Segment {
                trajectory: id.clone(),
                seq,
                version: out.version,
                lease_epoch: epoch,
                tokens: out.tokens,
                logprobs: out.logprobs,
                finish: out.finish,
            };
            if !self.store_segment(&segment).await? {
                return Ok(());
            }
            committed.extend_from_slice(&segment.tokens);
            last_finish = Some(segment.finish);
            first_version.get_or_insert(segment.version);
            seq += 1;
        }
    }

    /// In `async` mode: the give-up of a trajectory that started more than η versions before
    /// the current one (its group would be dropped at completion anyway).
    async fn lagging(&self, first: Option<PolicyVersion>) -> Result<Option<GiveUp>, StateError> {
        let Some(first) = first.filter(|_| self.rollout.mode == RolloutMode::Async) else {
            return Ok(None);
        };
        let current = self.current_version().await?;
        let eta = self.rollout.max_lag;
        Ok(
            (current.saturating_sub(first) > u64::from(eta)).then(|| GiveUp {
                reason: DropReason::LagExceeded,
                detail: format!(
                    "started under version {first}, the current version is {current}: more than \
                 η = {eta} versions behind"
                ),
            }),
        )
    }

    /// Writes `segment` to the object store and commits it to the index, both under the
    /// lease. Returns whether it is committed; `false` when the turn ended instead (aborted
    /// by shutdown: the lease is released; the lease lost: the work is dropped).
    async fn store_segment(&self, segment: &Segment) -> Result<bool, SlotError> {
        let started = std::time::Instant::now();
        let (id, seq, epoch) = (&segment.trajectory, segment.seq, segment.lease_epoch);
        let key = keys::segment(self.state.run_id(), &id.prompt, id.sample, seq, epoch);
        let encoded = codec::encode(segment)?;
        match self
            .under_lease(id, epoch, self.blobs.put(&key, encoded))
            .await
        {
            Ok(put) => put?,
            Err(Interrupted::Aborted) => {
                self.release(id, epoch).await;
                return Ok(false);
            }
            Err(Interrupted::Lost(e)) => {
                self.metrics.fenced_writes.inc();
                warn!(trajectory = %id, error = %e, "lease lost while writing; segment dropped");
                return Ok(false);
            }
        }
        let reference = SegmentRef {
            seq,
            key,
            tokens: segment.tokens.len() as u32,
            version: segment.version,
        };
        match self
            .state
            .commit_segment(id, &self.worker_id, epoch, &reference, self.ttl())
            .await
        {
            Ok(_) => {
                self.metrics.segments_committed.inc();
                self.metrics
                    .segment_commit_latency
                    .observe(started.elapsed().as_secs_f64());
                Ok(true)
            }
            Err(e) if lease_lost(&e) => {
                // Another worker owns the trajectory now; its segments win. Our object is
                // under our epoch's key, so it never overwrote theirs.
                self.metrics.fenced_writes.inc();
                warn!(trajectory = %id, seq, error = %e, "segment commit fenced; work dropped");
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Refunds a reservation (best effort: a lost refund only under-uses the budget).
    async fn refund(&self, version: PolicyVersion, tokens: u64) {
        if tokens == 0 {
            return;
        }
        if let Err(e) = self.state.refund(version, tokens).await {
            warn!(version, tokens, error = %e, "refund failed");
        }
    }

    /// Reads the committed segments back. The first unusable one (missing, undecodable, or
    /// not what its index entry says) and every one after it are forgotten under the lease
    /// ([`StateStore::truncate`]), so the trajectory goes on from its last good segment.
    /// `None` when the lease was lost meanwhile.
    async fn load_committed(&self, claim: &Claim) -> Result<Option<Loaded>, SlotError> {
        let id = &claim.state.id;
        let mut loaded = Loaded {
            tokens: Vec::with_capacity(claim.state.tokens as usize),
            last_finish: None,
            first_version: None,
            segments: 0,
        };
        for r in &claim.state.segments {
            let problem = match self.blobs.get(&r.key).await {
                Ok(bytes) => match codec::decode(&bytes) {
                    Ok(segment)
                        if segment.seq == r.seq
                            && segment.tokens.len() == r.tokens as usize
                            && segment.trajectory == *id =>
                    {
                        loaded.tokens.extend_from_slice(&segment.tokens);
                        loaded.last_finish = Some(segment.finish);
                        loaded.first_version.get_or_insert(r.version);
                        loaded.segments += 1;
                        continue;
                    }
                    Ok(_) => "does not match its index entry".to_owned(),
                    Err(e) => format!("cannot be decoded: {e}"),
                },
                Err(BlobError::NotFound { .. }) => "is missing".to_owned(),
                Err(e) => return Err(e.into()),
            };
            self.metrics.segments_unusable.inc();
            warn!(trajectory = %id, seq = r.seq, key = %r.key, %problem, "committed segment unusable; going back to the last good segment");
            let epoch = claim.lease().epoch;
            match self
                .state
                .truncate(id, &self.worker_id, epoch, loaded.segments)
                .await
            {
                Ok(_) => break,
                Err(e) if lease_lost(&e) => {
                    self.metrics.fenced_writes.inc();
                    warn!(trajectory = %id, error = %e, "lease lost while truncating");
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(loaded))
    }

    /// Scores the response and finishes the trajectory (pushing it to the finished stream).
    async fn score_and_finish(
        &self,
        id: &TrajectoryId,
        epoch: u64,
        prompt: &Prompt,
        response: &[u32],
    ) -> Result<(), SlotError> {
        let verifier = self.verifiers.build(&prompt.verifier)?;
        let prompt_text = match &prompt.input {
            PromptInput::Text(t) => t.clone(),
            PromptInput::Tokens(t) => self.engine.detokenize(t).await?,
        };
        let response_text = self.engine.detokenize(response).await?;
        let input = VerifyInput {
            prompt: &prompt_text,
            response: &response_text,
            metadata: &prompt.metadata,
        };
        let reward = match self.under_lease(id, epoch, verifier.score(&input)).await {
            Ok(reward) => reward?,
            Err(Interrupted::Aborted) => {
                self.release(id, epoch).await;
                return Ok(());
            }
            Err(Interrupted::Lost(e)) => {
                self.metrics.fenced_writes.inc();
                warn!(trajectory = %id, error = %e, "lease lost while scoring");
                return Ok(());
            }
        };
        match self.state.finish(id, &self.worker_id, epoch, reward).await {
            Ok(entry) => {
                self.metrics.finished.inc();
                debug!(trajectory = %id, reward, tokens = entry.tokens, "finished");
                Ok(())
            }
            Err(e) if lease_lost(&e) => {
                self.metrics.fenced_writes.inc();
                warn!(trajectory = %id, error = %e, "finish fenced; dropped");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}
