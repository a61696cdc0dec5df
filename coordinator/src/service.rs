//! The coordinator loop (DESIGN.md §6.1, §6.3, §7): leader election, versions and budgets,
//! groups from the finished stream, C3PO step cuts and the step commit protocol.
//!
//! # Leadership
//! Every coordinator process is a candidate for the leader lock of the state store. Each
//! [`Coordinator::tick`] renews the lock (or tries to take it); a candidate that cannot renew
//! it has been deposed and stops writing at once, dropping everything it held in memory. A
//! standby takes over once the lock lapses (`leader_ttl_ms`). Writes carry the fencing token
//! where the store can check it (the step announcement); the ledger commit and manifest write
//! are safe against a deposed leader because they are deterministic and create-if-absent:
//! whoever writes step s's manifest first fixes step s, and every later commit of step s
//! (by any leader) adopts that manifest, so two leaders can never commit different step s.
//! The lock is renewed right before the ledger commit so a deposed leader notices first.
//!
//! # Versions and budgets
//! One step trains at a time: step s needs the weights of version s (published by step
//! s − 1), so the leader cuts step s only after the board reports step s − 1 finished, and
//! opens version s + 1 when step s is finished. Per mode:
//! - `partial` (C3PO++): version v opens with Φ_r tokens; parked trajectories past σ are
//!   purged (dropped or regenerated per `purge_action`, recorded in the ledger / metrics).
//! - `sync`: the same budget and retention; the difference is in the workers, which run every
//!   trajectory to its end (they never park).
//! - `async`: versions open with (η + 1) · Φ_r, which bounds how much new work starts per
//!   version (started trajectories never wait); a complete group whose oldest token is more
//!   than η versions behind the current version is dropped (`lag_exceeded`), and workers
//!   abandon such trajectories before they complete.
//!
//! # Dropped groups
//! A group is dropped (recorded in the ledger with its reason) when it carries no signal,
//! outlived σ, lagged past η, or one of its trajectories gave up (its attempts kept failing:
//! a give-up entry on the finished stream). Its unfinished trajectories are then stopped
//! ([`StateStore::close_group`]), so no worker spends more on them.
//!
//! # Cut rule
//! Step s is cut when the waiting complete groups hold ≥ Φ tokens; or when the version's
//! budget is spent and nothing is generating that the step waits for (in `partial` and
//! `async`, a trajectory whose lease expired does not count: it resumes later; in `sync`,
//! parked trajectories count too, as every trajectory of a step ends under its version); or
//! when the input is drained (nothing pending, generating or parked). The world size is the
//! number of live trainers (at least 1) at the cut.
//!
//! # A spent version that can complete no group
//! When the budget is spent, nothing that the step waits for is generating, no group is
//! complete and work is left (parked or pending trajectories, say groups of K whose
//! siblings did not fit), no step can be cut and so no newer version can open. When the
//! leader sees this on two ticks in a row it widens the version's budget by Φ_r (the amount
//! versions open with) and notes it in the ledger (`budget_widened`) and in
//! `flywheel_coordinator_budget_widenings_total`: the run goes on, and the note says that Φ_r
//! is too small for the responses.
//!
//! # Commit protocol (crash-safe)
//! manifest `put_if_absent` → `Ledger::record_step` (the commit point) → `announce_step`.
//! A new leader (or a restarted one) first finishes what a crash left: it announces the last
//! recorded step if the board lacks it, and commits a manifest written for the next step but
//! not recorded. A crash at any point thus yields the same step, never a second step with the
//! same groups ([`CrashPoint`] injects the crashes in tests).
//!
//! # Resuming the finished stream
//! The stream cursor is not stored: a new leader reads the stream from the start and skips
//! every prompt the ledger says is trained or dropped (one ledger query per prompt, cached),
//! so groups are rebuilt exactly from the ledger and the state store. After each committed
//! step the leader trims the entries before the first one of a prompt still open, so the
//! stream, and the time a failover takes to read it, stays bounded by what is in flight.
//!
//! # Operator controls
//! Pause and Φ_r changes (the admin API) are written to the ledger by the leader, fenced by
//! its token, and loaded by every new leader: they survive restarts and failovers. A standby
//! refuses them, naming the leader.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use flywheel_service::admin::AdminError;
use flywheel_service::{ConfigError, member_id};
use flywheel_storage::RunStores;
use flywheel_storage::blob::{BlobError, BlobStore, PutOutcome};
use flywheel_storage::config::{PurgeAction, RolloutMode, RunConfig};
use flywheel_storage::keys;
use flywheel_storage::ledger::{
    DropReason, EventKind, Ledger, LedgerError, PromptStatus, RunEvent, StepRecord,
};
use flywheel_storage::state::{
    Budget, LeaderLease, MAX_TOKENS, MemberRole, StateCounts, StateError, StateStore,
    StepAnnouncement, StreamCursor,
};
use flywheel_storage::types::{
    BatchManifest, Group, PolicyVersion, PromptId, StepId, TrajectoryId, TrajectoryStatus,
};
use tracing::{info, warn};

use crate::batch::{self, GroupConfig, GroupOutcome, PlanConfig};
use crate::config::{CoordinatorConfig, ServiceConfig};
use crate::http::{self, ApiState};
use crate::metrics::Metrics;
use crate::partition;
use crate::rebuild;
use crate::status::StatusSources;

/// Where a test makes the coordinator "crash" (return [`CoordinatorError::InjectedCrash`]
/// without doing the rest) during the commit of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// After planning, before the manifest is written.
    BeforeManifest,
    /// After the manifest is written, before the ledger commit.
    AfterManifest,
    /// After the ledger commit, before the announcement.
    AfterLedger,
    /// After the announcement.
    AfterAnnounce,
}

impl std::str::FromStr for CrashPoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "before_manifest" => CrashPoint::BeforeManifest,
            "after_manifest" => CrashPoint::AfterManifest,
            "after_ledger" => CrashPoint::AfterLedger,
            "after_announce" => CrashPoint::AfterAnnounce,
            other => {
                return Err(format!(
                    "unknown crash point {other:?}: use before_manifest, after_manifest, \
                     after_ledger or after_announce"
                ));
            }
        })
    }
}

/// Errors of the coordinator loop.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The state store failed.
    #[error("state store: {0}")]
    State(#[from] StateError),
    /// The ledger failed.
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    /// The object store failed.
    #[error("object store: {0}")]
    Blob(#[from] BlobError),
    /// The published weights could not be listed.
    #[error("weights: {0}")]
    Weights(#[from] flywheel_storage::weights::WeightsError),
    /// A stored manifest cannot be read: the object store holds something this code did not
    /// write; inspect the key.
    #[error("manifest {key} is not a valid batch manifest: {reason}")]
    BadManifest {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// Planning failed (an inconsistent index or configuration).
    #[error("planning step {step}: {source}")]
    Plan {
        /// The step.
        step: StepId,
        /// Why.
        #[source]
        source: batch::PlanError,
    },
    /// A test-injected crash.
    #[error("injected crash at {0:?}")]
    InjectedCrash(CrashPoint),
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP API could not be served.
    #[error(transparent)]
    Admin(#[from] AdminError),
}

/// What a tick did, for tests and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TickOutcome {
    /// Another candidate leads; nothing was written.
    Standby,
    /// Leading, paused by an operator: nothing was written.
    Paused,
    /// Leading; nothing to commit.
    Idle,
    /// Leading; committed this step.
    Committed(StepId),
}

/// Knobs the HTTP admin API changes at run time, shared with the loop. The ledger holds the
/// durable copy ([`flywheel_storage::ledger::RunControls`]); these are the leader's view.
#[derive(Debug)]
pub struct Controls {
    /// While set, the leader keeps its lock but opens no version and cuts no step.
    pub paused: AtomicBool,
    /// Φ_r for the versions opened from now on.
    pub version_budget: AtomicU64,
    /// Φ_r of the configuration (what the controls fall back to).
    pub configured_budget: u64,
    /// The leader token this process holds; 0 while it stands by (the API then refuses
    /// changes: only the leader writes them, fenced by this token).
    pub leader_token: AtomicU64,
}

/// A point-in-time summary the loop publishes for `/v1/status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LoopSnapshot {
    /// Whether this process leads.
    pub leader: bool,
    /// Complete groups waiting for a step.
    pub groups_waiting: u64,
    /// Their trained-token total.
    pub waiting_tokens: u64,
    /// Trained tokens of the steps this process committed, by staleness in versions.
    pub staleness_tokens: BTreeMap<u64, u64>,
    /// The last step this process committed.
    pub last_committed: Option<StepId>,
}

/// The leader's in-memory view, rebuilt from the ledger and the state store on takeover.
#[derive(Default)]
struct Book {
    /// Next finished-stream position to read after.
    cursor: StreamCursor,
    /// Prompts that are trained or dropped: their stream entries are ignored.
    closed: HashSet<PromptId>,
    /// Prompts the ledger was asked about this term (not closed).
    checked: HashSet<PromptId>,
    /// Finished samples of open prompts.
    finished: HashMap<PromptId, BTreeSet<u32>>,
    /// Group sizes, by prompt.
    group_size: HashMap<PromptId, u32>,
    /// Complete groups waiting for a step, by prompt.
    waiting: BTreeMap<PromptId, Group>,
    /// Where each open prompt's first finished entry is: the stream is trimmed before the
    /// oldest of them.
    first_entry: HashMap<PromptId, StreamCursor>,
    /// The next step to cut (the ledger's last + 1).
    next_step: StepId,
    /// The budget of a spent version seen unable to complete a group on the last tick.
    stalled: Option<Budget>,
}

/// One coordinator process: a candidate for leadership and, while leading, the loop.
pub struct Coordinator {
    run: RunConfig,
    config: CoordinatorConfig,
    id: String,
    state: Arc<dyn StateStore>,
    ledger: Arc<dyn Ledger>,
    blobs: BlobStore,
    metrics: Metrics,
    controls: Arc<Controls>,
    snapshot: Arc<std::sync::RwLock<LoopSnapshot>>,
    lease: Option<LeaderLease>,
    book: Book,
    crash_at: Option<CrashPoint>,
    /// Whether reaching `crash_at` aborts the process (a kill at that point) rather than
    /// failing the tick.
    crash_aborts: bool,
}

impl Coordinator {
    /// A coordinator over the run's stores. It writes nothing until it wins the leader lock.
    pub fn new(stores: RunStores, config: ServiceConfig) -> Self {
        let ServiceConfig {
            run,
            coordinator: config,
        } = config;
        let id = member_id("coordinator", &config.candidate_id);
        let controls = Arc::new(Controls {
            paused: AtomicBool::new(false),
            version_budget: AtomicU64::new(run.rollout.version_budget_tokens),
            configured_budget: run.rollout.version_budget_tokens,
            leader_token: AtomicU64::new(0),
        });
        Coordinator {
            run,
            config,
            id,
            state: stores.state,
            ledger: stores.ledger,
            blobs: stores.blobs,
            metrics: Metrics::new(),
            controls,
            snapshot: Default::default(),
            lease: None,
            book: Book::default(),
            crash_at: None,
            crash_aborts: false,
        }
    }

    /// The `/v1` routes of the HTTP API over this coordinator; `admin_token` guards the
    /// mutating ones (`None` disables them).
    pub fn api_router(&self, admin_token: Option<String>) -> axum::Router {
        let sources = StatusSources {
            run: self.run_id().to_owned(),
            state: self.state.clone(),
            ledger: self.ledger.clone(),
            blobs: self.blobs.clone(),
            token_budget: self.run.batch.token_budget,
        };
        http::router(ApiState {
            sources,
            controls: self.controls(),
            snapshot: self.snapshot(),
            admin_token,
            min_budget: u64::from(self.run.rollout.segment_tokens),
            id: self.id.clone(),
        })
    }

    /// Injects a crash at `point` of the next commit (tests).
    pub fn crash_at(&mut self, point: Option<CrashPoint>) {
        self.crash_at = point;
    }

    /// Aborts the process at `point` of the next commit, as a kill there would: nothing
    /// after it runs, the lock is not given up (the chaos tests' process kills).
    pub fn abort_at(&mut self, point: CrashPoint) {
        self.crash_at = Some(point);
        self.crash_aborts = true;
    }

    /// This candidate's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The metrics (shared with the HTTP server).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The run-time controls (shared with the HTTP server).
    pub fn controls(&self) -> Arc<Controls> {
        self.controls.clone()
    }

    /// The loop's published summary (shared with the HTTP server).
    pub fn snapshot(&self) -> Arc<std::sync::RwLock<LoopSnapshot>> {
        self.snapshot.clone()
    }

    /// The leader lease this process holds, if it leads.
    pub fn lease(&self) -> Option<&LeaderLease> {
        self.lease.as_ref()
    }

    fn run_id(&self) -> &str {
        &self.run.storage.run_id
    }

    /// Gives the lock up (clean shutdown) so a standby takes over at once.
    pub async fn resign(&mut self) {
        self.controls.leader_token.store(0, Ordering::SeqCst);
        if let Some(l) = self.lease.take() {
            let _ = self.state.release_leader(&self.id, l.token).await;
        }
        self.metrics.is_leader.set(0);
    }

    /// Ticks every `tick_ms` until `shutdown` resolves, then resigns; errors are logged and
    /// the loop goes on (the next tick retries), so a flaky store never kills the service.
    pub async fn tick_until(&mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut interval = tokio::time::interval(self.config.tick());
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = interval.tick() => {}
            }
            match self.tick().await {
                Ok(TickOutcome::Committed(step)) => info!(step, "step committed"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "coordinator tick failed; retrying"),
            }
        }
        self.resign().await;
    }

    /// One iteration: hold (or seek) the lock; as leader, open the due version, read the
    /// finished stream, and cut and commit a step when the rule says so.
    pub async fn tick(&mut self) -> Result<TickOutcome, CoordinatorError> {
        self.refresh_members().await;
        if !self.hold_lock().await? {
            return Ok(TickOutcome::Standby);
        }
        if self.controls.paused.load(Ordering::SeqCst) {
            return Ok(TickOutcome::Paused);
        }
        let result = self.lead().await;
        self.publish();
        result
    }

    async fn refresh_members(&self) {
        for role in [MemberRole::Worker, MemberRole::Trainer] {
            if let Ok(m) = self.state.live_members(role).await {
                self.metrics
                    .members_alive
                    .with_label_values(&[role.as_str()])
                    .set(m.len() as i64);
            }
        }
    }

    /// Renews or takes the lock; on takeover, recovers. False while standing by.
    async fn hold_lock(&mut self) -> Result<bool, CoordinatorError> {
        let ttl = self.config.leader_ttl();
        if let Some(l) = &self.lease {
            match self.state.renew_leader(&self.id, l.token, ttl).await {
                Ok(l) => {
                    self.lease = Some(l);
                    return Ok(true);
                }
                Err(StateError::NotLeader { .. }) => {
                    warn!(id = %self.id, "lost the leader lock; standing by");
                    self.step_down();
                }
                Err(e) => return Err(e.into()),
            }
        }
        if self.state.leader().await?.is_none() {
            // A lost and rebuilt lock must not hand out a token the ledger would refuse.
            let newest = self.ledger.leader_token(self.run_id()).await?;
            self.state.raise_leader_token(newest).await?;
        }
        let Some(l) = self.state.acquire_leader(&self.id, ttl).await? else {
            return Ok(false);
        };
        info!(id = %self.id, token = l.token, "took the leader lock");
        self.lease = Some(l);
        self.metrics.is_leader.set(1);
        let recovered = self.recover().await;
        if recovered.is_ok() {
            self.controls
                .leader_token
                .store(self.token(), Ordering::SeqCst);
        }
        if let Err(e) = recovered {
            // Recovery is redone by the next takeover; give the lock back so nobody waits.
            self.resign().await;
            self.book = Book::default();
            return Err(e);
        }
        Ok(true)
    }

    fn step_down(&mut self) {
        self.controls.leader_token.store(0, Ordering::SeqCst);
        self.lease = None;
        self.book = Book::default();
        self.metrics.is_leader.set(0);
        if let Ok(mut s) = self.snapshot.write() {
            s.leader = false;
        }
    }

    fn token(&self) -> u64 {
        self.lease.as_ref().map_or(0, |l| l.token)
    }

    /// Passes `e` on; when it says a newer leader fenced this one out of a write (the state
    /// store's or the ledger's fence), steps down first so it stops writing.
    fn fenced_out(&mut self, e: CoordinatorError) -> CoordinatorError {
        if matches!(
            e,
            CoordinatorError::State(StateError::LeaderFenced { .. })
                | CoordinatorError::Ledger(LedgerError::LeaderFenced { .. })
        ) {
            warn!(id = %self.id, error = %e, "fenced out by a newer leader; standing by");
            self.step_down();
        }
        e
    }

    /// Rebuilds a lost state store, finishes what a crashed leader left and rebuilds the book.
    async fn recover(&mut self) -> Result<(), CoordinatorError> {
        let run = self.run_id().to_owned();
        self.book = Book::default();
        if !self.state.initialised().await? {
            self.rebuild_state().await?;
        }
        let controls = self.ledger.controls(&run).await?;
        self.controls
            .paused
            .store(controls.paused, Ordering::SeqCst);
        self.controls.version_budget.store(
            controls
                .version_budget_tokens
                .unwrap_or(self.controls.configured_budget),
            Ordering::SeqCst,
        );
        let last = self.ledger.last_step(&run).await?;
        self.book.next_step = last.map_or(0, |s| s + 1);
        // A step recorded but never announced (crash after the commit point).
        if let Some(s) = last {
            let announced = self.state.announced_step().await?.map(|a| a.step);
            if announced.is_none_or(|a| a < s) {
                let rec = self.ledger.step(&run, s).await?.ok_or_else(|| {
                    CoordinatorError::BadManifest {
                        key: format!("ledger step {s}"),
                        reason: "last_step names a step the ledger cannot return".into(),
                    }
                })?;
                self.announce(s, rec.manifest_key, rec.world_size).await?;
            }
        }
        // A manifest written for the next step but never recorded (crash before the commit
        // point): commit exactly it.
        let key = keys::step_manifest(&run, self.book.next_step);
        if self.blobs.exists(&key).await? && self.previous_step_finished().await? {
            let manifest = self.read_manifest(&key).await?;
            self.commit(manifest, Instant::now()).await?;
        }
        // Purges a crash may have left unrecorded: open prompts with a purged member.
        for p in self.ledger.pending_prompts(&run).await? {
            let mut purged = Vec::new();
            for id in p.trajectory_ids() {
                if let Some(t) = self.state.trajectory(&id).await?
                    && t.status == TrajectoryStatus::Purged
                {
                    purged.push(id);
                }
            }
            if !purged.is_empty() {
                self.handle_purged(purged).await?;
            }
        }
        Ok(())
    }

    /// Rebuilds the state store from the ledger and the object store (it is empty: a fresh
    /// run, or Redis was lost) and marks it initialised; a rebuild of a run that had started
    /// is noted in the ledger.
    async fn rebuild_state(&mut self) -> Result<(), CoordinatorError> {
        let run = self.run_id().to_owned();
        let token = self.token();
        let lead = rebuild::Lead {
            candidate: &self.id,
            token,
            ttl: self.config.leader_ttl(),
        };
        let rebuilt = rebuild::rebuild(
            self.state.as_ref(),
            self.ledger.as_ref(),
            &self.blobs,
            &run,
            lead,
        )
        .await;
        let r = rebuilt.map_err(|e| self.fenced_out(e))?;
        if r != rebuild::Rebuilt::default() {
            let detail = format!(
                "the state store was empty: rebuilt {} pending prompts ({} trajectories with \
                 {} segments) and finished step {:?} from the ledger and the object store",
                r.prompts, r.trajectories, r.segments, r.finished_step
            );
            warn!(prompts = r.prompts, trajectories = r.trajectories, segments = r.segments, finished_step = ?r.finished_step, "state store rebuilt");
            let event = RunEvent {
                key: format!("state-rebuilt/token-{token}"),
                kind: EventKind::StateRebuilt,
                detail,
            };
            self.ledger.record_event(&run, &event).await?;
            self.metrics.state_rebuilds.inc();
        }
        self.state.mark_initialised().await?;
        Ok(())
    }

    /// The leader's work of one tick.
    async fn lead(&mut self) -> Result<TickOutcome, CoordinatorError> {
        self.open_due_version().await?;
        self.read_stream().await?;
        self.drop_lagging().await?;
        let outcome = self.maybe_cut().await;
        self.observe_run().await?;
        outcome
    }

    /// The run's gauges: budget, trajectories by status, committed and finished steps.
    async fn observe_run(&self) -> Result<(), CoordinatorError> {
        let m = &self.metrics;
        if let Some(b) = self.state.budget().await? {
            m.budget_total.set(b.total as i64);
            m.budget_remaining.set(b.remaining as i64);
        }
        let c = self.state.counts().await?;
        for (status, n) in [
            ("pending", c.pending),
            ("generating", c.generating),
            ("parked", c.parked),
            ("finished", c.finished),
            ("purged", c.purged),
            ("dropped", c.dropped),
        ] {
            m.trajectories.with_label_values(&[status]).set(n as i64);
        }
        m.step_committed.set(self.book.next_step as i64 - 1);
        let finished = self.state.finished_step().await?;
        m.step_finished.set(finished.map_or(-1, |s| s as i64));
        Ok(())
    }

    /// Opens version `finished + 1` (or 0) when it is not open yet.
    async fn open_due_version(&mut self) -> Result<(), CoordinatorError> {
        let due = self.state.finished_step().await?.map_or(0, |s| s + 1);
        let current = self.state.current_version().await?;
        if current.is_some_and(|c| c >= due) {
            self.metrics.version.set(current.unwrap_or(0) as i64);
            return Ok(());
        }
        let r = &self.run.rollout;
        let budget = self.opening_budget();
        let sigma = match r.mode {
            RolloutMode::Async => r.retention_limit.max(r.max_lag),
            RolloutMode::Sync | RolloutMode::Partial => r.retention_limit,
        };
        let opened = match self
            .state
            .open_version(due, budget, sigma, self.token())
            .await
        {
            Ok(o) => o,
            // Another (deposed or new) leader opened it first: nothing to do.
            Err(StateError::VersionNotNewer { .. }) => return Ok(()),
            Err(e) => return Err(self.fenced_out(e.into())),
        };
        info!(
            version = due,
            budget,
            retained = opened.retained,
            purged = opened.purged.len(),
            "opened version"
        );
        self.metrics.version.set(due as i64);
        self.handle_purged(opened.purged).await
    }

    /// What a version opens with: Φ_r, or in `async` mode (η + 1) · Φ_r.
    fn opening_budget(&self) -> u64 {
        let phi_r = self.controls.version_budget.load(Ordering::SeqCst);
        let versions = match self.run.rollout.mode {
            RolloutMode::Async => u64::from(self.run.rollout.max_lag) + 1,
            RolloutMode::Sync | RolloutMode::Partial => 1,
        };
        phi_r.saturating_mul(versions).min(MAX_TOKENS)
    }

    /// Applies the purge action to trajectories purged past σ and records it.
    async fn handle_purged(&mut self, purged: Vec<TrajectoryId>) -> Result<(), CoordinatorError> {
        let run = self.run_id().to_owned();
        let sigma = self.run.rollout.retention_limit;
        for id in purged {
            match self.run.rollout.purge_action {
                PurgeAction::Drop => {
                    if self.book.closed.contains(&id.prompt) {
                        continue;
                    }
                    let detail =
                        format!("trajectory {id} outlived the retention limit σ = {sigma}");
                    self.drop_prompt(&run, &id.prompt, DropReason::PurgedRetention, &detail)
                        .await?;
                }
                PurgeAction::Regenerate => {
                    let epoch = self
                        .state
                        .trajectory(&id)
                        .await?
                        .and_then(|t| t.lease)
                        .map_or(0, |l| l.epoch);
                    match self.state.regenerate(&id, self.token()).await {
                        Ok(()) | Err(StateError::NotPurged { .. }) => {}
                        Err(e) => return Err(self.fenced_out(e.into())),
                    }
                    // Keyed by the purged generation's last epoch: one note per regeneration.
                    let event = RunEvent {
                        key: format!("regenerated/{id}/epoch-{epoch}"),
                        kind: EventKind::Regenerated,
                        detail: format!(
                            "trajectory {id} outlived the retention limit σ = {sigma}; \
                             regenerated from scratch"
                        ),
                    };
                    self.ledger.record_event(&run, &event).await?;
                    if let Some(s) = self.book.finished.get_mut(&id.prompt) {
                        s.remove(&id.sample);
                    }
                    info!(trajectory = %id, "regenerating a purged trajectory from scratch");
                    self.metrics
                        .groups_dropped
                        .with_label_values(&["purged_regenerated"])
                        .inc();
                }
            }
        }
        Ok(())
    }

    /// Records `prompt` dropped and forgets it.
    async fn drop_prompt(
        &mut self,
        run: &str,
        prompt: &PromptId,
        reason: DropReason,
        detail: &str,
    ) -> Result<(), CoordinatorError> {
        let token = self.token();
        match self
            .ledger
            .drop_prompt(run, prompt, reason, detail, token)
            .await
        {
            Ok(_) => {
                info!(%prompt, %reason, detail, "dropped a group");
                self.metrics
                    .groups_dropped
                    .with_label_values(&[reason.as_str()])
                    .inc();
                match self.state.close_group(prompt, token).await {
                    Ok(stopped) if !stopped.is_empty() => {
                        info!(%prompt, stopped = stopped.len(), "stopped the dropped group's unfinished trajectories");
                    }
                    Ok(_) => {}
                    Err(e) => return Err(self.fenced_out(e.into())),
                }
                self.delete_segments(prompt).await;
            }
            // Already closed another way: the ledger's record stands.
            Err(
                e @ (LedgerError::PromptAlreadyDropped { .. }
                | LedgerError::PromptAlreadyTrained { .. }),
            ) => warn!(%prompt, error = %e, "drop not recorded"),
            Err(e) => return Err(self.fenced_out(e.into())),
        }
        self.close(prompt);
        Ok(())
    }

    /// Deletes the segments of a dropped group (its unfinished trajectories are stopped):
    /// nothing will read them again, and storage stays bounded. Best effort: a failure, or a
    /// stopped writer's last object landing after this, only leaves garbage.
    async fn delete_segments(&self, prompt: &PromptId) {
        let Ok(Some(p)) = self.state.prompt(prompt).await else {
            return;
        };
        for id in p.trajectory_ids() {
            let Ok(Some(t)) = self.state.trajectory(&id).await else {
                continue;
            };
            for segment in &t.segments {
                if let Err(e) = self.blobs.delete(&segment.key).await {
                    warn!(key = %segment.key, error = %e, "cannot delete a dropped segment");
                }
            }
        }
    }

    fn close(&mut self, prompt: &PromptId) {
        self.book.closed.insert(prompt.clone());
        self.book.finished.remove(prompt);
        self.book.waiting.remove(prompt);
        self.book.first_entry.remove(prompt);
    }

    /// Reads the finished stream and turns complete prompts into waiting groups.
    async fn read_stream(&mut self) -> Result<(), CoordinatorError> {
        let run = self.run_id().to_owned();
        loop {
            let entries = self
                .state
                .read_finished(self.book.cursor, self.config.read_batch)
                .await?;
            let Some(last) = entries.last() else {
                return Ok(());
            };
            let last = last.cursor;
            for e in entries {
                let p = e.trajectory.prompt.clone();
                if self.book.closed.contains(&p) || self.book.waiting.contains_key(&p) {
                    continue;
                }
                if self.book.checked.insert(p.clone())
                    && let Some(PromptStatus::Trained { .. } | PromptStatus::Dropped { .. }) =
                        self.ledger.prompt_status(&run, &p).await?
                {
                    self.book.closed.insert(p);
                    continue;
                }
                self.book.first_entry.entry(p.clone()).or_insert(e.cursor);
                if let Some(g) = &e.gave_up {
                    let detail = format!("trajectory {} gave up: {}", e.trajectory, g.detail);
                    self.drop_prompt(&run, &p, g.reason, &detail).await?;
                    continue;
                }
                self.book
                    .finished
                    .entry(p.clone())
                    .or_default()
                    .insert(e.trajectory.sample);
                self.try_complete(&p).await?;
            }
            self.book.cursor = last;
        }
    }

    /// Forms `p`'s group once all K samples are finished.
    async fn try_complete(&mut self, p: &PromptId) -> Result<(), CoordinatorError> {
        let k = match self.book.group_size.get(p) {
            Some(k) => *k,
            None => match self.state.prompt(p).await? {
                Some(prompt) => {
                    self.book.group_size.insert(p.clone(), prompt.group_size);
                    prompt.group_size
                }
                None => {
                    warn!(prompt = %p, "finished trajectory of an unregistered prompt; ignored");
                    self.book.first_entry.remove(p);
                    return Ok(());
                }
            },
        };
        let samples: Vec<u32> = self.book.finished[p].iter().copied().collect();
        if samples.len() < k as usize {
            return Ok(());
        }
        let mut members = Vec::with_capacity(k as usize);
        for sample in samples {
            let id = TrajectoryId {
                prompt: p.clone(),
                sample,
            };
            match self.state.trajectory(&id).await? {
                Some(t) if t.status == TrajectoryStatus::Finished => members.push(t),
                // Regenerated since it finished: wait for its new finish.
                _ => {
                    if let Some(s) = self.book.finished.get_mut(p) {
                        s.remove(&sample);
                    }
                }
            }
        }
        if members.len() < k as usize {
            return Ok(());
        }
        let config = GroupConfig {
            filter_zero_variance: self.run.batch.filter_zero_variance,
        };
        match batch::form_group(p, k, members, &config) {
            Ok(GroupOutcome::Ready(g)) => {
                self.book.finished.remove(p);
                self.book.waiting.insert(p.clone(), g);
            }
            Ok(GroupOutcome::Dropped(d)) => {
                let run = self.run_id().to_owned();
                self.drop_prompt(&run, p, d.reason, &d.detail).await?;
            }
            Err(e) => warn!(prompt = %p, error = %e, "cannot form the group; it waits"),
        }
        Ok(())
    }

    /// `async` mode: drops waiting groups more than η versions behind the current version.
    async fn drop_lagging(&mut self) -> Result<(), CoordinatorError> {
        if self.run.rollout.mode != RolloutMode::Async {
            return Ok(());
        }
        let Some(current) = self.state.current_version().await? else {
            return Ok(());
        };
        let eta = u64::from(self.run.rollout.max_lag);
        let lagging: Vec<(PromptId, PolicyVersion)> = self
            .book
            .waiting
            .values()
            .filter_map(|g| {
                let oldest = g.members.iter().filter_map(|m| m.first_version).min()?;
                (current.saturating_sub(oldest) > eta).then(|| (g.prompt.clone(), oldest))
            })
            .collect();
        let run = self.run_id().to_owned();
        for (p, oldest) in lagging {
            let detail =
                format!("oldest token from version {oldest}, current {current}: lag > η = {eta}");
            self.drop_prompt(&run, &p, DropReason::LagExceeded, &detail)
                .await?;
        }
        Ok(())
    }

    async fn previous_step_finished(&self) -> Result<bool, CoordinatorError> {
        let next = self.book.next_step;
        Ok(next == 0
            || self
                .state
                .finished_step()
                .await?
                .is_some_and(|f| f + 1 >= next))
    }

    fn waiting_tokens(&self) -> u64 {
        self.book
            .waiting
            .values()
            .flat_map(|g| &g.members)
            .map(|m| m.tokens)
            .sum()
    }

    /// Trajectories a spent version's step waits for. In `partial` and `async` mode a
    /// trajectory whose lease expired is not among them: its worker is gone; it resumes later
    /// (in `partial` under the next version, before any pending work). In `sync` mode workers
    /// claim and finish it, and any parked trajectory (a stopping worker's), under this
    /// version, so the step waits for those too: a trajectory never spans two versions.
    fn generating(&self, c: &StateCounts) -> u64 {
        match self.run.rollout.mode {
            RolloutMode::Partial | RolloutMode::Async => {
                c.generating.saturating_sub(c.lease_expired)
            }
            RolloutMode::Sync => c.generating + c.parked,
        }
    }

    /// Cuts and commits a step when the rule says so.
    async fn maybe_cut(&mut self) -> Result<TickOutcome, CoordinatorError> {
        if self.book.waiting.is_empty() {
            self.widen_if_stalled().await?;
            return Ok(TickOutcome::Idle);
        }
        self.book.stalled = None;
        if !self.previous_step_finished().await? {
            return Ok(TickOutcome::Idle);
        }
        let phi = self.run.batch.token_budget;
        // In `sync` mode a step trains what its version generated, all of it finished: a full
        // budget of waiting groups is not enough while the version's trajectories still run.
        let mut due = self.run.rollout.mode != RolloutMode::Sync && self.waiting_tokens() >= phi;
        if !due {
            let counts = self.state.counts().await?;
            let drained = counts.pending == 0 && counts.generating == 0 && counts.parked == 0;
            let spent = self.generating(&counts) == 0
                && self.state.budget().await?.is_some_and(|b| b.remaining == 0);
            due = drained || spent;
        }
        if !due {
            return Ok(TickOutcome::Idle);
        }
        let started = Instant::now();
        let step = self.book.next_step;
        let world = self
            .state
            .live_members(MemberRole::Trainer)
            .await?
            .len()
            .clamp(1, flywheel_storage::state::MAX_WORLD_SIZE as usize) as u32;
        // A `sync` step trains its version's whole batch, whatever its size: leaving part of
        // it for the next step would train that part one version stale.
        let budget = match self.run.rollout.mode {
            RolloutMode::Sync => phi.max(self.waiting_tokens()),
            RolloutMode::Partial | RolloutMode::Async => phi,
        };
        let plan_config = PlanConfig {
            token_budget: budget,
            micro_batch_tokens: self.run.batch.micro_batch_tokens,
            partition: Default::default(),
        };
        let groups: Vec<Group> = self.book.waiting.values().cloned().collect();
        let plan = batch::plan_step(step, world, groups, &plan_config)
            .map_err(|source| CoordinatorError::Plan { step, source })?;
        self.check_crash(CrashPoint::BeforeManifest)?;
        self.commit(plan.manifest, started).await?;
        Ok(TickOutcome::Committed(step))
    }

    /// The stall rule (module docs): a spent version that can complete no group, seen on two
    /// ticks in a row, gets Φ_r more tokens, noted in the ledger and the metrics.
    async fn widen_if_stalled(&mut self) -> Result<(), CoordinatorError> {
        let stalled = self.stalled_budget().await?;
        let seen_before = stalled.is_some() && stalled == self.book.stalled;
        self.book.stalled = stalled;
        let Some(b) = stalled.filter(|_| seen_before) else {
            return Ok(());
        };
        let extra = self.opening_budget();
        let widened = match self
            .state
            .widen_budget(b.version, extra, self.token())
            .await
        {
            Ok(Some(w)) => w,
            Ok(None) => return Ok(()), // a newer version opened meanwhile
            Err(e) => return Err(self.fenced_out(e.into())),
        };
        self.book.stalled = None;
        self.metrics.budget_widenings.inc();
        let detail = format!(
            "version {}: the budget of {} tokens was spent and no group could complete, so it \
             was widened to {} tokens; rollout.version_budget_tokens (Φ_r) is too small for \
             the responses (or for groups of K), raise it",
            b.version, b.total, widened.total
        );
        warn!(
            version = b.version,
            from = b.total,
            to = widened.total,
            "{detail}"
        );
        let event = RunEvent {
            key: format!("budget-widened/v{}/total-{}", b.version, widened.total),
            kind: EventKind::BudgetWidened,
            detail,
        };
        self.ledger.record_event(self.run_id(), &event).await?;
        Ok(())
    }

    /// The budget of the current version when it is spent, nothing the step waits for is
    /// generating, and work is left for it: with no complete group, nothing can move.
    async fn stalled_budget(&self) -> Result<Option<Budget>, CoordinatorError> {
        let Some(b) = self.state.budget().await? else {
            return Ok(None);
        };
        if b.remaining > 0 || !self.previous_step_finished().await? {
            return Ok(None);
        }
        let c = self.state.counts().await?;
        let work_left = c.pending + c.parked + c.lease_expired > 0;
        Ok((self.generating(&c) == 0 && work_left).then_some(b))
    }

    /// Trims the finished stream before the first entry of any prompt still open (or after
    /// the last entry read, when none is). Best effort: a failure only leaves the stream
    /// longer until the next step.
    async fn trim_stream(&mut self) {
        let first_kept = self
            .book
            .first_entry
            .values()
            .min()
            .copied()
            .unwrap_or(self.book.cursor.next());
        if let Err(e) = self.state.trim_finished(first_kept, self.token()).await {
            warn!(error = %e, "cannot trim the finished stream");
        }
    }

    fn check_crash(&mut self, point: CrashPoint) -> Result<(), CoordinatorError> {
        if self.crash_at == Some(point) {
            if self.crash_aborts {
                tracing::error!(?point, "aborting at the injected crash point");
                std::process::abort();
            }
            self.crash_at = None;
            return Err(CoordinatorError::InjectedCrash(point));
        }
        Ok(())
    }

    async fn read_manifest(&self, key: &str) -> Result<BatchManifest, CoordinatorError> {
        let bytes = self.blobs.get(key).await?;
        serde_json::from_slice(&bytes).map_err(|e| CoordinatorError::BadManifest {
            key: key.to_owned(),
            reason: e.to_string(),
        })
    }

    /// The commit protocol: manifest create-if-absent (adopting one already there), ledger
    /// commit, announcement.
    async fn commit(
        &mut self,
        manifest: BatchManifest,
        started: Instant,
    ) -> Result<(), CoordinatorError> {
        let run = self.run_id().to_owned();
        let step = manifest.step;
        let key = keys::step_manifest(&run, step);
        let json = serde_json::to_vec(&manifest).map_err(|e| CoordinatorError::BadManifest {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        let manifest = match self.blobs.put_if_absent(&key, Bytes::from(json)).await? {
            PutOutcome::Created => manifest,
            // Written before (by a crashed or deposed leader): that one is step s.
            _ => self.read_manifest(&key).await?,
        };
        if manifest.step != step {
            return Err(CoordinatorError::BadManifest {
                key,
                reason: format!("it describes step {}, not {step}", manifest.step),
            });
        }
        self.check_crash(CrashPoint::AfterManifest)?;
        // A deposed leader finds out here, before the commit point.
        let lease = self
            .state
            .renew_leader(&self.id, self.token(), self.config.leader_ttl())
            .await;
        match lease {
            Ok(l) => self.lease = Some(l),
            Err(e) => {
                self.step_down();
                return Err(e.into());
            }
        }
        let record = StepRecord::from_manifest(&manifest, &key);
        if let Err(e) = self.ledger.record_step(&run, &record, self.token()).await {
            return Err(self.fenced_out(e.into()));
        }
        self.check_crash(CrashPoint::AfterLedger)?;
        self.announce(step, key, manifest.world_size).await?;
        // Bookkeeping of a committed step.
        self.observe_rewards(&manifest);
        for p in &manifest.prompts {
            self.close(p);
        }
        self.trim_stream().await;
        self.book.next_step = step + 1;
        self.metrics.steps_cut.inc();
        self.metrics
            .step_tokens
            .observe(manifest.total_tokens as f64);
        self.metrics
            .batch_cut_latency
            .observe(started.elapsed().as_secs_f64());
        let imbalance = partition::imbalance(&batch::rank_loads(&manifest));
        self.metrics
            .partition_imbalance
            .set((imbalance * 1000.0).round() as i64);
        let by_version = batch::trained_tokens_by_version(&manifest);
        if let Ok(mut s) = self.snapshot.write() {
            for (v, tokens) in &by_version {
                let stale = step.saturating_sub(*v);
                *s.staleness_tokens.entry(stale).or_insert(0) += tokens;
                for _ in 0..*tokens {
                    self.metrics.staleness.observe(stale as f64);
                }
            }
            s.last_committed = Some(step);
        }
        info!(
            step,
            tokens = manifest.total_tokens,
            world = manifest.world_size,
            prompts = manifest.prompts.len(),
            "committed step"
        );
        self.check_crash(CrashPoint::AfterAnnounce)?;
        Ok(())
    }

    /// The reward and accuracy gauges of a committed step's groups (those in the book: a
    /// step adopted from a crashed leader's manifest is not observed).
    fn observe_rewards(&self, manifest: &BatchManifest) {
        let rewards: Vec<f32> = manifest
            .prompts
            .iter()
            .filter_map(|p| self.book.waiting.get(p))
            .flat_map(|g| &g.members)
            .filter_map(|m| m.reward)
            .collect();
        if rewards.is_empty() {
            return;
        }
        let n = rewards.len() as f64;
        let mean = rewards.iter().map(|&r| f64::from(r)).sum::<f64>() / n;
        let solved = rewards.iter().filter(|&&r| r >= 1.0).count() as f64;
        self.metrics.step_reward.set(mean);
        self.metrics.step_accuracy.set(solved / n);
    }

    async fn announce(
        &mut self,
        step: StepId,
        manifest_key: String,
        world_size: u32,
    ) -> Result<(), CoordinatorError> {
        let a = StepAnnouncement {
            step,
            manifest_key,
            world_size,
        };
        match self.state.announce_step(&a, self.token()).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fenced_out(e.into())),
        }
    }

    fn publish(&self) {
        let (n, tokens) = (self.book.waiting.len() as u64, self.waiting_tokens());
        self.metrics.groups_waiting.set(n as i64);
        self.metrics.waiting_tokens.set(tokens as i64);
        if let Ok(mut s) = self.snapshot.write() {
            s.leader = self.lease.is_some();
            s.groups_waiting = n;
            s.waiting_tokens = tokens;
        }
    }
}
