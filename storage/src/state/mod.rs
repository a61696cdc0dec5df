//! Run state: trajectory index, leases, budgets, versions, the finished stream, membership and
//! the leader lock (DESIGN.md §5, §6.1, §6.2).
//!
//! [`StateStore`] is the one interface; [`MemoryStateStore`] (embedded mode) and
//! [`RedisStateStore`] (distributed mode) implement it with the same semantics, checked by the
//! one suite in [`conformance`].
//!
//! # Semantics in brief
//!
//! - A prompt is registered once; its K trajectories start `pending`, in registration order.
//! - A worker *claims* a trajectory and gets a [`Lease`] (owner, epoch, expiry). Each claim of a
//!   trajectory gets a strictly higher epoch. Claim order: parked trajectories first (oldest
//!   first version first), then those whose lease expired (earliest expiry first: a dead
//!   worker's trajectories resume before new work), then pending ones (registration order).
//! - Every write for a trajectory (segment commit, renew, finish, release) carries the
//!   writer's `(owner, epoch)` and is rejected with [`StateError::Fenced`] unless that lease is
//!   the current one and has not expired. An expired lease cannot be renewed: its owner must
//!   claim again (and gets a new epoch), so a lease is never silently resurrected.
//! - Releasing a trajectory returns it to `pending` when it has no committed segment and
//!   *parks* it otherwise (that is how the worker parks when a version's budget is spent).
//! - Opening version v sets the current version and budget, and bumps the retention of every
//!   parked trajectory; those past σ are purged.
//! - A failed attempt (engine or verifier error) is counted on the trajectory and releases it;
//!   at the caller's bound the trajectory gives up (`dropped`, with a give-up entry on the
//!   finished stream). Closing a dropped group stops its unfinished trajectories the same way,
//!   so their writers are fenced out.
//!
//! # Clock
//!
//! Every expiry (leases, heartbeats, the leader lock) is decided by the store's own clock, never
//! by the caller's: the Redis implementation reads the server's `TIME` inside each script, the
//! memory implementation reads the process clock. Callers pass durations (`ttl`), never
//! instants, so skew between worker machines cannot extend or cut a lease. The `*_ms` instants
//! handed back are on that clock (milliseconds since the Unix epoch).

mod board;
#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;
mod memory;
mod redis;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::ledger::DropReason;
use crate::types::{
    Lease, PolicyVersion, Prompt, PromptId, SegmentRef, StepId, TrajectoryId, TrajectoryState,
    TrajectoryStatus,
};

pub use self::board::{MAX_WORLD_SIZE, RankClaim, RankDone, RankFenceReason, StepAnnouncement};
pub use self::memory::MemoryStateStore;
pub use self::redis::RedisStateStore;

/// The largest token budget or amount the store accepts: 2^53 − 1, the largest integer that
/// Redis' Lua (IEEE doubles) represents exactly.
pub const MAX_TOKENS: u64 = (1 << 53) - 1;

/// What [`StateStore::register_prompt`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    /// The prompt was new: it and its K trajectories (all `pending`) are now stored.
    Registered,
    /// A prompt with this id was already registered; nothing was written.
    AlreadyRegistered,
}

/// Where a claimed trajectory came from; workers count steals and resumes from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimSource {
    /// It was parked: a partial rollout resumed under a newer version.
    Parked,
    /// It was pending: never generated, or released before its first segment.
    Pending,
    /// Its previous lease had expired: the holder died or stalled; this is a steal.
    Expired,
}

/// A successful claim: the trajectory's state (with its new lease) and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim {
    /// The trajectory as it is now, `generating`, with `lease` set to the caller's new lease.
    pub state: TrajectoryState,
    /// Which queue the trajectory was taken from.
    pub source: ClaimSource,
}

impl Claim {
    /// The caller's new lease (always present on a claim).
    pub fn lease(&self) -> &Lease {
        self.state
            .lease
            .as_ref()
            .expect("a claimed trajectory always carries its new lease")
    }
}

/// Why a claim of a specific trajectory was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotClaimable {
    /// Another (or the same) worker holds a lease that has not expired.
    Held(Lease),
    /// The trajectory is finished or purged: there is nothing left to generate.
    Done(TrajectoryStatus),
}

impl fmt::Display for NotClaimable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotClaimable::Held(l) => write!(
                f,
                "held by {} (epoch {}) until {} ms",
                l.owner, l.epoch, l.expires_at_ms
            ),
            NotClaimable::Done(s) => write!(f, "it is already {s:?}"),
        }
    }
}

/// Why a fenced write was rejected: the writer's lease is not the live, current one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceReason {
    /// The trajectory was claimed again since: the writer's epoch is stale.
    StaleEpoch {
        /// The writer's epoch.
        given: u64,
        /// The trajectory's current epoch.
        current: u64,
    },
    /// The epoch matches but the owner does not.
    ForeignOwner {
        /// The owner recorded for that epoch.
        holder: String,
    },
    /// The lease expired (even if nobody has claimed it yet); claim again.
    Expired {
        /// When it expired, on the store's clock.
        expired_at_ms: u64,
    },
    /// Nobody is generating it (it was released, parked, finished or purged).
    NotGenerating(TrajectoryStatus),
}

impl fmt::Display for FenceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FenceReason::StaleEpoch { given, current } => {
                write!(
                    f,
                    "stale lease epoch {given}, the current epoch is {current}"
                )
            }
            FenceReason::ForeignOwner { holder } => write!(f, "the lease belongs to {holder}"),
            FenceReason::Expired { expired_at_ms } => {
                write!(f, "the lease expired at {expired_at_ms} ms; claim it again")
            }
            FenceReason::NotGenerating(s) => write!(f, "it is {s:?}, not generating"),
        }
    }
}

/// A position in the finished-trajectory stream (a Redis stream id `ms-seq`). Entries are read
/// strictly after a cursor; [`StreamCursor::START`] reads from the beginning. A consumer stores
/// the cursor of the last entry it has durably handled and resumes from it after a restart.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct StreamCursor {
    /// Milliseconds part of the id.
    pub ms: u64,
    /// Sequence within the millisecond.
    pub seq: u64,
}

impl StreamCursor {
    /// Before the first entry.
    pub const START: StreamCursor = StreamCursor { ms: 0, seq: 0 };

    /// The smallest cursor after this one: reading after `self` and trimming before
    /// `self.next()` split the stream at the same place.
    pub fn next(self) -> StreamCursor {
        StreamCursor {
            ms: self.ms,
            seq: self.seq + 1,
        }
    }
}

impl fmt::Display for StreamCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for StreamCursor {
    type Err = StateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || StateError::Invalid(format!("stream cursor {s:?} is not of the form MS-SEQ"));
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(StreamCursor {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// One entry of the finished-trajectory stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinishedEntry {
    /// Its position; pass it to [`StateStore::read_finished`] to read what follows.
    pub cursor: StreamCursor,
    /// The finished trajectory.
    pub trajectory: TrajectoryId,
    /// Its reward.
    pub reward: f32,
    /// Its committed tokens.
    pub tokens: u64,
    /// Version of its first segment (None when it finished without any).
    pub first_version: Option<PolicyVersion>,
    /// Version of its last segment.
    pub last_version: Option<PolicyVersion>,
    /// Set when the trajectory gave up instead of finishing (see
    /// [`StateStore::record_failure`]): it has no response, and the coordinator drops its
    /// group for this reason.
    pub gave_up: Option<GiveUp>,
}

/// Why a trajectory gave up: the reason its group is dropped for, and a detail for a person.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GiveUp {
    /// The ledger's drop reason.
    pub reason: DropReason,
    /// What happened (the last error).
    pub detail: String,
}

/// What [`StateStore::record_failure`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum FailureRecorded {
    /// Below the bound: the lease is given up as by [`StateStore::release`] and the
    /// trajectory will be tried again.
    Released {
        /// Where it went: `pending` or `parked`.
        status: TrajectoryStatus,
        /// Its failed attempts so far.
        failures: u32,
    },
    /// At the bound: the trajectory is `dropped` and its give-up entry is on the finished
    /// stream.
    GaveUp(FinishedEntry),
}

/// A trajectory as rebuilt from the object store after the state was lost
/// ([`StateStore::restore_prompt`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoredTrajectory {
    /// Its sample index within the group.
    pub sample: u32,
    /// Its committed segments, found intact in the object store: seq 0, 1, 2, … in order.
    pub segments: Vec<SegmentRef>,
    /// The highest lease epoch any of its objects was written under: its next claim gets a
    /// higher one, so no new object overwrites an old one.
    pub epoch: u64,
}

/// The current version's rollout budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// The current policy version.
    pub version: PolicyVersion,
    /// Φ_r: tokens the version was opened with.
    pub total: u64,
    /// Tokens not yet reserved.
    pub remaining: u64,
}

/// What [`StateStore::open_version`] did to the parked trajectories.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionOpened {
    /// Parked trajectories kept (their retention grew by one, still ≤ σ).
    pub retained: u64,
    /// Parked trajectories purged because their retention went past σ.
    pub purged: Vec<TrajectoryId>,
}

/// The kinds of members that heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    /// A rollout worker.
    Worker,
    /// A trainer rank.
    Trainer,
}

impl MemberRole {
    /// Name used in keys and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Worker => "worker",
            MemberRole::Trainer => "trainer",
        }
    }
}

/// A live member and when its heartbeat runs out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The member's id (unique per process).
    pub id: String,
    /// When it is considered gone unless it heartbeats again (store clock, ms).
    pub expires_at_ms: u64,
}

/// The leader lock as held by one candidate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderLease {
    /// The holder's candidate id.
    pub holder: String,
    /// Fencing token: strictly increases with each acquisition; the leader stamps its writes
    /// (e.g. ledger commits) with it so a deposed leader's late writes can be refused.
    pub token: u64,
    /// When the lock lapses unless renewed (store clock, ms).
    pub expires_at_ms: u64,
}

/// Trajectory counts for status reports and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCounts {
    /// Registered prompts.
    pub prompts: u64,
    /// Trajectories waiting for a first claim (or released before any segment).
    pub pending: u64,
    /// Trajectories under a lease, live or expired.
    pub generating: u64,
    /// Of `generating`, those whose lease has expired and that await a steal.
    pub lease_expired: u64,
    /// Unfinished trajectories waiting for the next version.
    pub parked: u64,
    /// Finished trajectories.
    pub finished: u64,
    /// Trajectories purged past the retention limit (and not regenerated since).
    pub purged: u64,
    /// Trajectories stopped because their group was dropped, or that gave up.
    pub dropped: u64,
}

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Redis failed or could not be reached.
    #[error(
        "redis state store: {0} (is Redis up and the URL right? scripts/services.sh starts one)"
    )]
    Redis(#[from] ::redis::RedisError),
    /// The trajectory (or its prompt) was never registered in this run.
    #[error("trajectory {0} is not registered in this run")]
    UnknownTrajectory(TrajectoryId),
    /// A claim of a specific trajectory was refused.
    #[error("trajectory {id} cannot be claimed: {reason}")]
    NotClaimable {
        /// The trajectory.
        id: TrajectoryId,
        /// Why.
        reason: NotClaimable,
    },
    /// A write under a lease that is not the live, current one (DESIGN.md §6.2 fencing).
    #[error("write to trajectory {id} rejected: {reason}")]
    Fenced {
        /// The trajectory.
        id: TrajectoryId,
        /// Why.
        reason: FenceReason,
    },
    /// A segment's `seq` skips ahead: segments are contiguous from 0.
    #[error("segment {given} of trajectory {id} is out of order: the next one is {expected}")]
    SegmentOutOfOrder {
        /// The trajectory.
        id: TrajectoryId,
        /// The seq the caller sent.
        given: u32,
        /// The seq the store expects next.
        expected: u32,
    },
    /// A segment with this seq is already committed with different content.
    #[error("segment {seq} of trajectory {id} is already committed with different content")]
    SegmentConflict {
        /// The trajectory.
        id: TrajectoryId,
        /// The seq.
        seq: u32,
    },
    /// Only a purged trajectory can be regenerated.
    #[error("trajectory {id} is {status:?}, not purged; only purged trajectories are regenerated")]
    NotPurged {
        /// The trajectory.
        id: TrajectoryId,
        /// Its status.
        status: TrajectoryStatus,
    },
    /// Versions only move forward; opening one twice would bump retention twice.
    #[error("cannot open version {requested}: the current version is already {current}")]
    VersionNotNewer {
        /// The version asked for.
        requested: PolicyVersion,
        /// The current version.
        current: PolicyVersion,
    },
    /// A leader renew/release by a candidate that does not hold the lock (any more).
    #[error("{candidate} does not hold the leader lock with token {token}; current: {current:?}")]
    NotLeader {
        /// The caller.
        candidate: String,
        /// The token the caller believed it held.
        token: u64,
        /// The live holder, if any.
        current: Option<LeaderLease>,
    },
    /// A leader write (a step announcement, a version opening, a regeneration) with a token that is not the live leader's: the
    /// writer was deposed (or its lock lapsed) and must stop writing.
    #[error("leader write with token {token} fenced out; the live leader is {current:?}")]
    LeaderFenced {
        /// The token the writer presented.
        token: u64,
        /// The live leader, if any.
        current: Option<LeaderLease>,
    },
    /// A step-board transition that contradicts the board (an older or different
    /// announcement, a newer step while one is training, finishing an unfinished step).
    #[error("step {step}: {reason}")]
    StepConflict {
        /// The step.
        step: StepId,
        /// What contradicts it.
        reason: String,
    },
    /// A trainer's rank write (renew, complete) under a claim that is not the live one.
    #[error("rank {rank} of step {step}: write rejected: {reason}")]
    RankFenced {
        /// The step.
        step: StepId,
        /// The rank.
        rank: u32,
        /// Why.
        reason: RankFenceReason,
    },
    /// Registrations and claims wait until a leader has initialised the run's state, or
    /// rebuilt it after it was lost ([`StateStore::initialised`]).
    #[error(
        "the state of run {run} is not initialised: the leading coordinator initialises it, or \
         rebuilds it from the ledger and the object store after it was lost (is a coordinator \
         running?)"
    )]
    NotInitialised {
        /// The run.
        run: String,
    },
    /// An argument the store cannot accept (empty id, K = 0, NaN reward, …).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The backend holds data this code cannot read (another version wrote it, or it was
    /// edited by hand); rebuild the run's Redis state from the object store and ledger.
    #[error("corrupt run state: {0}")]
    Corrupt(String),
}

/// The run's coordination state. Every method is atomic with respect to every other.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// The run this store's keys belong to.
    fn run_id(&self) -> &str;

    // --- prompts and trajectories ---

    /// Stores `prompt` and its K trajectories as `pending`, in sample order, after every
    /// trajectory registered before. Idempotent per prompt id: a second call writes nothing and
    /// returns [`Registration::AlreadyRegistered`].
    async fn register_prompt(&self, prompt: &Prompt) -> Result<Registration, StateError>;

    /// The prompt as registered (workers re-prefill from it after a steal).
    async fn prompt(&self, id: &PromptId) -> Result<Option<Prompt>, StateError>;

    /// A trajectory's state.
    async fn trajectory(&self, id: &TrajectoryId) -> Result<Option<TrajectoryState>, StateError>;

    // --- leases ---

    /// Claims the next claimable trajectory for `owner` with a lease of `ttl`: parked first
    /// (oldest first version first), then expired leases (earliest expiry first), then pending
    /// (registration order). `None` when there is nothing to claim.
    async fn claim_next(&self, owner: &str, ttl: Duration) -> Result<Option<Claim>, StateError>;

    /// Claims one specific trajectory (pending, parked, or with an expired lease).
    async fn claim(
        &self,
        id: &TrajectoryId,
        owner: &str,
        ttl: Duration,
    ) -> Result<Claim, StateError>;

    /// Extends the caller's live lease to now + `ttl`.
    async fn renew(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<Lease, StateError>;

    /// Gives the lease up: the trajectory goes back to `pending` if it has no committed
    /// segment, else it is `parked` (resumed first, oldest first version first). Returns the
    /// status it went to.
    async fn release(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
    ) -> Result<TrajectoryStatus, StateError>;

    // --- segments ---

    /// Appends a committed segment under the caller's lease and extends the lease to
    /// now + `ttl`. `segment.seq` must be the next one; re-sending the last committed segment
    /// unchanged is accepted (a retried commit), anything else is rejected.
    async fn commit_segment(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        segment: &SegmentRef,
        ttl: Duration,
    ) -> Result<TrajectoryState, StateError>;

    /// Marks the trajectory finished with `reward`, drops the lease and appends it to the
    /// finished stream. Returns the stream entry.
    async fn finish(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        reward: f32,
    ) -> Result<FinishedEntry, StateError>;

    /// Records a failed attempt at the trajectory (an engine or verifier error, or for a
    /// trajectory past the lag bound a give-up with `limit` 1) under the caller's lease, and
    /// gives the lease up. The trajectory's `failures` grows by one; below `limit` it is
    /// released as by [`StateStore::release`] and tried again later; at `limit` it gives up:
    /// it becomes `dropped` and a finished entry carrying `give_up` goes on the stream, so the
    /// coordinator drops its group. Fenced like every lease write.
    async fn record_failure(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        give_up: &GiveUp,
        limit: u32,
    ) -> Result<FailureRecorded, StateError>;

    /// Forgets the committed segments from `keep` on under the caller's lease (the first of
    /// them is corrupt or missing in the object store): the trajectory goes on from its last
    /// good segment. Its token count and versions are recomputed from what is kept.
    async fn truncate(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        keep: u32,
    ) -> Result<TrajectoryState, StateError>;

    /// Stops every trajectory of `prompt` that is pending, generating or parked (its group was
    /// dropped): each becomes `dropped` and its lease ends, so a worker still generating it is fenced at its
    /// next write and drops the work. Returns the trajectories stopped. A leader write,
    /// fenced by `leader_token` like [`StateStore::open_version`].
    async fn close_group(
        &self,
        prompt: &PromptId,
        leader_token: u64,
    ) -> Result<Vec<TrajectoryId>, StateError>;

    // --- versions and budgets ---

    /// Opens `version` with a rollout budget of `budget` tokens: atomically sets it current,
    /// replaces the previous version's budget, and bumps the retention of every parked
    /// trajectory, purging those whose retention exceeds `retention_limit` (σ). A leader
    /// write: `leader_token` must be the live leader's ([`StateError::LeaderFenced`]
    /// otherwise, checked atomically with the change).
    async fn open_version(
        &self,
        version: PolicyVersion,
        budget: u64,
        retention_limit: u32,
        leader_token: u64,
    ) -> Result<VersionOpened, StateError>;

    /// Puts a purged trajectory back to `pending` with nothing committed (the "regenerate from
    /// scratch" policy for purged groups), at its original place in the registration order.
    /// Its epoch history is kept, so writers of the purged generation stay fenced out. A leader
    /// write, fenced by `leader_token` like [`StateStore::open_version`].
    async fn regenerate(&self, id: &TrajectoryId, leader_token: u64) -> Result<(), StateError>;

    /// The current version, `None` before the first `open_version`.
    async fn current_version(&self) -> Result<Option<PolicyVersion>, StateError>;

    /// The current version's budget, `None` before the first `open_version`.
    async fn budget(&self) -> Result<Option<Budget>, StateError>;

    /// Reserves min(`want`, remaining) tokens of `version`'s budget and returns that amount:
    /// 0 when it is spent or `version` is no longer current.
    async fn reserve(&self, version: PolicyVersion, want: u64) -> Result<u64, StateError>;

    /// Adds `tokens` to `version`'s budget, total and remaining (the coordinator's rule when
    /// a spent version can complete no group). `None`, and nothing changes, when `version` is
    /// not the current one. A leader write, fenced by `leader_token`.
    async fn widen_budget(
        &self,
        version: PolicyVersion,
        tokens: u64,
        leader_token: u64,
    ) -> Result<Option<Budget>, StateError>;

    /// Returns unused reserved tokens to `version`'s budget (never above what it was opened
    /// with). A refund to a version that is no longer current is dropped. Returns the tokens
    /// credited.
    async fn refund(&self, version: PolicyVersion, tokens: u64) -> Result<u64, StateError>;

    // --- finished stream ---

    /// Up to `limit` finished entries strictly after `after`, oldest first.
    async fn read_finished(
        &self,
        after: StreamCursor,
        limit: usize,
    ) -> Result<Vec<FinishedEntry>, StateError>;

    /// Deletes the finished entries before `first_kept` once they are consumed (a new leader
    /// reads the stream from its start, so a short stream keeps failover fast). Returns how
    /// many were deleted. A leader write, fenced by `leader_token`.
    async fn trim_finished(
        &self,
        first_kept: StreamCursor,
        leader_token: u64,
    ) -> Result<u64, StateError>;

    // --- membership ---

    /// Records that `id` is alive for another `ttl`.
    async fn heartbeat(&self, role: MemberRole, id: &str, ttl: Duration) -> Result<(), StateError>;

    /// Removes `id` at once (a clean shutdown) instead of waiting for its heartbeat to lapse.
    async fn leave(&self, role: MemberRole, id: &str) -> Result<(), StateError>;

    /// Members whose heartbeat has not lapsed, by id.
    async fn live_members(&self, role: MemberRole) -> Result<Vec<Member>, StateError>;

    // --- leader lock ---

    /// Takes the leader lock for `ttl` if nobody holds it live; each success carries a fencing
    /// token higher than any before. `None` when someone (the caller included) holds it.
    async fn acquire_leader(
        &self,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Option<LeaderLease>, StateError>;

    /// Extends the caller's live lock; fails with [`StateError::NotLeader`] once it lapsed or
    /// was taken over, even if the caller still thinks it leads.
    async fn renew_leader(
        &self,
        candidate: &str,
        token: u64,
        ttl: Duration,
    ) -> Result<LeaderLease, StateError>;

    /// Gives the lock up so a standby takes over without waiting for the expiry.
    async fn release_leader(&self, candidate: &str, token: u64) -> Result<(), StateError>;

    /// The live leader, if any.
    async fn leader(&self) -> Result<Option<LeaderLease>, StateError>;

    // --- status ---

    /// Counts by trajectory status.
    async fn counts(&self) -> Result<StateCounts, StateError>;

    // --- the step board (module `board` documents the rules) ---

    /// Announces a step to the trainers. Fenced by the leader lock: `leader_token` must be the
    /// live leader's ([`StateError::LeaderFenced`] otherwise). Idempotent for the same
    /// announcement; a newer step needs the newest one finished.
    async fn announce_step(
        &self,
        announcement: &StepAnnouncement,
        leader_token: u64,
    ) -> Result<(), StateError>;

    /// The newest announcement.
    async fn announced_step(&self) -> Result<Option<StepAnnouncement>, StateError>;

    /// Claims a rank of `step` for `trainer` for `ttl`: the lowest never-claimed rank, else the
    /// one whose claim expired first (with a higher epoch). `None` when every rank is held or
    /// done, or `step` is not the announced, unfinished step.
    async fn claim_rank(
        &self,
        step: StepId,
        trainer: &str,
        ttl: Duration,
    ) -> Result<Option<RankClaim>, StateError>;

    /// Extends the caller's live rank claim to now + `ttl` (fenced like a lease renew).
    async fn renew_rank(
        &self,
        claim: &RankClaim,
        trainer: &str,
        ttl: Duration,
    ) -> Result<(), StateError>;

    /// Marks the claimed rank done (fenced). `all_done` is true for exactly one claim holder,
    /// the one completing the last rank (a retry of that completion gets it again).
    async fn complete_rank(&self, claim: &RankClaim, trainer: &str)
    -> Result<RankDone, StateError>;

    /// The finisher: every rank of `step` is done and weights `version_published` (= step + 1)
    /// are published. Idempotent.
    async fn finish_step(
        &self,
        step: StepId,
        version_published: PolicyVersion,
    ) -> Result<(), StateError>;

    /// The newest finished step.
    async fn finished_step(&self) -> Result<Option<StepId>, StateError>;

    // --- losing the state (DESIGN.md §7) ---

    /// Whether the run's state is initialised: by the first leader of a fresh run, or by the
    /// leader that rebuilt it from the ledger and the object store after it was lost. Until
    /// then registrations and claims are refused ([`StateError::NotInitialised`]), so no
    /// work starts on a half-rebuilt state. A fresh memory store is initialised.
    async fn initialised(&self) -> Result<bool, StateError>;

    /// Marks the state initialised; the leader calls it once its rebuild is complete.
    async fn mark_initialised(&self) -> Result<(), StateError>;

    /// Registers `prompt` as rebuilt from the object store, before the state is initialised:
    /// each restored trajectory with segments is parked with them (its retention starts
    /// over), every other trajectory is pending, and each one's next claim gets an epoch
    /// above its restored `epoch`. Idempotent per prompt id like
    /// [`StateStore::register_prompt`]. A leader write, fenced by `leader_token`.
    async fn restore_prompt(
        &self,
        prompt: &Prompt,
        trajectories: &[RestoredTrajectory],
        leader_token: u64,
    ) -> Result<Registration, StateError>;

    /// Sets the step board's finished step to `step` (rebuilt from the published weights)
    /// unless it is already there or later. A leader write, fenced by `leader_token`.
    async fn restore_finished_step(
        &self,
        step: StepId,
        leader_token: u64,
    ) -> Result<(), StateError>;

    /// Makes every leader token handed out from now on greater than `floor` (the ledger's
    /// newest): a leader elected on a lost and rebuilt state is not fenced out of the ledger.
    async fn raise_leader_token(&self, floor: u64) -> Result<(), StateError>;

    /// Deletes all of the run's state, as losing Redis would (the next leader rebuilds it).
    /// Returns how many keys or entries it deleted.
    async fn delete_run(&self) -> Result<u64, StateError>;
}

/// Opens the run's state store by URL: `memory://` (a fresh in-process store, the embedded
/// mode) or `redis://…` / `rediss://…`.
pub async fn open(url: &str, run_id: &str) -> Result<std::sync::Arc<dyn StateStore>, StateError> {
    check::name("run id", run_id)?;
    if url.starts_with("memory:") {
        Ok(std::sync::Arc::new(MemoryStateStore::new(run_id)))
    } else if url.starts_with("redis://") || url.starts_with("rediss://") {
        Ok(std::sync::Arc::new(
            RedisStateStore::connect(url, run_id).await?,
        ))
    } else {
        Err(StateError::Invalid(format!(
            "state URL {url:?}: use memory:// or redis://HOST:PORT"
        )))
    }
}

/// Checks arguments both implementations reject the same way.
pub(crate) mod check {
    use super::*;

    /// A lease/heartbeat duration in ms: at least 1 ms, at most a day (a longer one is a bug).
    pub fn ttl(ttl: Duration) -> Result<u64, StateError> {
        let ms = ttl.as_millis();
        if ms == 0 || ms > 86_400_000 {
            return Err(StateError::Invalid(format!(
                "ttl {ttl:?} must be between 1 ms and 24 h"
            )));
        }
        Ok(ms as u64)
    }

    /// A non-empty identifier (owner, candidate, member).
    pub fn name(what: &str, s: &str) -> Result<(), StateError> {
        if s.is_empty() || s.len() > 256 {
            return Err(StateError::Invalid(format!(
                "{what} must be 1..=256 bytes, got {} bytes",
                s.len()
            )));
        }
        Ok(())
    }

    /// A token amount Lua can hold exactly.
    pub fn tokens(what: &str, n: u64) -> Result<(), StateError> {
        if n > MAX_TOKENS {
            return Err(StateError::Invalid(format!(
                "{what} {n} exceeds the maximum {MAX_TOKENS}"
            )));
        }
        Ok(())
    }

    /// A prompt that can be registered.
    pub fn prompt(p: &Prompt) -> Result<(), StateError> {
        name("prompt id", &p.id.0)?;
        if p.group_size == 0 || p.group_size > 4096 {
            return Err(StateError::Invalid(format!(
                "prompt {}: group size must be 1..=4096, got {}",
                p.id, p.group_size
            )));
        }
        Ok(())
    }

    /// A finite reward.
    pub fn reward(r: f32) -> Result<(), StateError> {
        if !r.is_finite() {
            return Err(StateError::Invalid(format!("reward {r} is not finite")));
        }
        Ok(())
    }

    /// A segment's numbers fit the store.
    pub fn segment(s: &SegmentRef) -> Result<(), StateError> {
        tokens("segment version", s.version)
    }

    /// Restored trajectories of `p`: distinct samples below K, segments contiguous from 0.
    pub fn restored(p: &Prompt, trajectories: &[RestoredTrajectory]) -> Result<(), StateError> {
        prompt(p)?;
        let mut seen = std::collections::HashSet::new();
        for t in trajectories {
            if t.sample >= p.group_size || !seen.insert(t.sample) {
                return Err(StateError::Invalid(format!(
                    "prompt {}: restored sample {} is repeated or not below K = {}",
                    p.id, t.sample, p.group_size
                )));
            }
            tokens("epoch", t.epoch)?;
            for (i, s) in t.segments.iter().enumerate() {
                segment(s)?;
                if s.seq as usize != i {
                    return Err(StateError::Invalid(format!(
                        "prompt {} sample {}: restored segments must be seq 0, 1, 2, …",
                        p.id, t.sample
                    )));
                }
            }
        }
        Ok(())
    }
}
