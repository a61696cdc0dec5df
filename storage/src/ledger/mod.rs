//! The ledger: the durable, transactional record of a run (DESIGN.md §5, §6.3, §7).
//!
//! It records runs with their configuration; every prompt the run accepted, and whether it was
//! trained (in which step) or dropped (with a reason); the optimizer steps; and checkpoints.
//! The transaction of [`Ledger::record_step`] is the commit point of a step: it inserts the
//! step and marks each of its prompts trained, all or nothing. Together with the rule that a
//! prompt is trained at most once and never both trained and dropped, this is what makes
//! "nothing lost, nothing trained twice" checkable.
//!
//! One trait, [`Ledger`], with two backends behind one SQL implementation ([`SqlLedger`]):
//! PostgreSQL for deployments and SQLite for the embedded mode, chosen by URL with [`open`].
//! The schema lives in the repository's `migrations/` and is applied on open.
//!
//! [`conformance`] is the test suite every backend must pass.

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;
mod error;
mod sql;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::types::{BatchManifest, PolicyVersion, Prompt, PromptId, StepId};

pub use error::LedgerError;
pub use sql::SqlLedger;

/// The result type of ledger operations.
pub type Result<T, E = LedgerError> = std::result::Result<T, E>;

/// Opens the ledger at `url` and brings its schema up to date.
///
/// `postgres://USER@HOST:PORT/DB` (or `postgresql://`) opens PostgreSQL;
/// `sqlite://PATH?mode=rwc` opens (and creates) an SQLite file; `sqlite::memory:` opens a
/// private in-memory SQLite database that lives as long as the returned ledger.
pub async fn open(url: &str) -> Result<Arc<dyn Ledger>> {
    Ok(Arc::new(SqlLedger::connect(url).await?))
}

/// Which database engine a ledger runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// PostgreSQL: deployments.
    Postgres,
    /// SQLite: the embedded mode and single-machine runs.
    Sqlite,
}

impl Backend {
    /// What to check when a connection fails.
    fn connect_hint(self) -> &'static str {
        match self {
            Backend::Postgres => {
                "is PostgreSQL running and the URL right? scripts/services.sh starts one on \
                 127.0.0.1:5432"
            }
            Backend::Sqlite => {
                "does the file exist (add ?mode=rwc to create it) in a writable directory?"
            }
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        })
    }
}

/// Whether a write created something or found it already there.
///
/// Every ledger write is idempotent: replaying the exact same write (after a crash, a
/// redelivery, a failover) answers [`Recorded::Existing`] and changes nothing. A write that
/// contradicts what is recorded is an error instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Recorded {
    /// This call wrote the record.
    New,
    /// The same record was already there; nothing changed.
    Existing,
}

/// A run as the ledger knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run's identifier (unique in the ledger).
    pub run_id: String,
    /// The configuration the run was created with, as JSON.
    pub config: serde_json::Value,
    /// When the run was created, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
}

/// Why a prompt was dropped instead of trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// A trajectory of its group outlived the retention limit σ (C3PO++) and the group was
    /// dropped rather than regenerated.
    PurgedRetention,
    /// All rewards of its group were equal: the group carries no learning signal.
    ZeroVariance,
    /// The input could not be parsed or failed validation.
    Malformed,
    /// The prompt exceeded a size limit.
    Oversized,
    /// In `async` mode, the group fell further behind the current version than the lag bound η.
    LagExceeded,
    /// Every response of its group was empty: there are no tokens to train.
    EmptyResponses,
    /// Generating or scoring one of its trajectories kept failing (the engine or the verifier
    /// refused it) past the attempt bound.
    GenerationFailed,
}

impl DropReason {
    /// Every reason, for parsing and for metrics labels.
    pub const ALL: [DropReason; 7] = [
        DropReason::PurgedRetention,
        DropReason::ZeroVariance,
        DropReason::Malformed,
        DropReason::Oversized,
        DropReason::LagExceeded,
        DropReason::EmptyResponses,
        DropReason::GenerationFailed,
    ];

    /// The stable name stored in the ledger and used as a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::PurgedRetention => "purged_retention",
            DropReason::ZeroVariance => "zero_variance",
            DropReason::Malformed => "malformed",
            DropReason::Oversized => "oversized",
            DropReason::LagExceeded => "lag_exceeded",
            DropReason::EmptyResponses => "empty_responses",
            DropReason::GenerationFailed => "generation_failed",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DropReason {
    type Err = LedgerError;

    fn from_str(s: &str) -> Result<Self> {
        DropReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                LedgerError::InvalidInput(format!(
                    "unknown drop reason {s:?}: expected one of {}",
                    DropReason::ALL.map(DropReason::as_str).join(", ")
                ))
            })
    }
}

/// Where a prompt is in its life, according to the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum PromptStatus {
    /// Accepted; neither trained nor dropped yet.
    Pending,
    /// Trained in exactly this step.
    Trained {
        /// The step that trained it.
        step: StepId,
    },
    /// Dropped, never to be trained.
    Dropped {
        /// Why.
        reason: DropReason,
        /// Free-form detail for a person (may be empty).
        detail: String,
    },
}

/// How many prompts of a run are in each state. The states are disjoint: every prompt the
/// ledger knows is counted exactly once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptCounts {
    /// Accepted, neither trained nor dropped.
    pub pending: u64,
    /// Trained in some step.
    pub trained: u64,
    /// Dropped with a reason.
    pub dropped: u64,
}

impl PromptCounts {
    /// Every prompt the ledger knows for the run.
    pub fn total(&self) -> u64 {
        self.pending + self.trained + self.dropped
    }
}

/// The ledger's record of one optimizer step: what [`Ledger::record_step`] commits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step number; steps of a run are recorded in order 0, 1, 2, … without gaps.
    pub step: StepId,
    /// Object-store key of the step's batch manifest (written create-if-absent before the
    /// ledger commit).
    pub manifest_key: String,
    /// The prompts whose groups the step trains. Order does not matter; the ledger returns
    /// them sorted.
    pub prompts: Vec<PromptId>,
    /// Trained tokens over all ranks.
    pub total_tokens: u64,
    /// Trainer ranks the step was cut for.
    pub world_size: u32,
    /// Oldest policy version among the trained segments.
    pub min_version: PolicyVersion,
    /// Newest policy version among the trained segments.
    pub max_version: PolicyVersion,
}

impl StepRecord {
    /// The record of the step a manifest describes, stored under `manifest_key`.
    pub fn from_manifest(manifest: &BatchManifest, manifest_key: impl Into<String>) -> Self {
        StepRecord {
            step: manifest.step,
            manifest_key: manifest_key.into(),
            prompts: manifest.prompts.clone(),
            total_tokens: manifest.total_tokens,
            world_size: manifest.world_size,
            min_version: manifest.min_version,
            max_version: manifest.max_version,
        }
    }
}

/// A recorded step without its prompt list, for listings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSummary {
    /// The step number.
    pub step: StepId,
    /// Object-store key of the step's batch manifest.
    pub manifest_key: String,
    /// How many prompts the step trained.
    pub prompt_count: u64,
    /// Trained tokens over all ranks.
    pub total_tokens: u64,
    /// Trainer ranks the step was cut for.
    pub world_size: u32,
    /// Oldest policy version among the trained segments.
    pub min_version: PolicyVersion,
    /// Newest policy version among the trained segments.
    pub max_version: PolicyVersion,
    /// When the step was committed, milliseconds since the Unix epoch.
    pub recorded_at_ms: i64,
}

/// A checkpoint taken after a recorded step: the weights of version `step + 1` and the
/// optimizer state, each as an object-store manifest (DESIGN.md §6.5).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The step after which it was taken; must already be recorded.
    pub step: StepId,
    /// Object-store key of the weights manifest.
    pub weights_key: String,
    /// Object-store key of the optimizer-state manifest.
    pub optimizer_key: String,
}

/// What a [`RunEvent`] notes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A spent version could complete no group, so the coordinator widened its budget.
    BudgetWidened,
    /// A trajectory purged past σ was regenerated from scratch.
    Regenerated,
    /// An entry of a committed step was left out of its step: its data was unusable.
    EntryDropped,
    /// An operator paused or resumed the run, or changed Φ_r.
    ControlsChanged,
    /// The state store was found empty (Redis lost) and rebuilt from the ledger and the
    /// object store.
    StateRebuilt,
}

impl EventKind {
    /// Every kind, for parsing.
    pub const ALL: [EventKind; 5] = [
        EventKind::BudgetWidened,
        EventKind::Regenerated,
        EventKind::EntryDropped,
        EventKind::ControlsChanged,
        EventKind::StateRebuilt,
    ];

    /// The stable name stored in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::BudgetWidened => "budget_widened",
            EventKind::Regenerated => "regenerated",
            EventKind::EntryDropped => "entry_dropped",
            EventKind::ControlsChanged => "controls_changed",
            EventKind::StateRebuilt => "state_rebuilt",
        }
    }
}

impl FromStr for EventKind {
    type Err = LedgerError;

    fn from_str(s: &str) -> Result<Self> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| LedgerError::InvalidInput(format!("unknown event kind {s:?}")))
    }
}

/// A note on a run (see [`EventKind`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEvent {
    /// Unique within the run and deterministic for what it notes (for example
    /// `budget-widened/v12/total-20480`), so a replayed write records nothing twice.
    pub key: String,
    /// What it notes.
    pub kind: EventKind,
    /// For a person.
    pub detail: String,
}

/// The operator's controls of a run (the coordinator's admin API), durable in the ledger so
/// they survive a restart and a failover.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunControls {
    /// While set, the leader opens no version and cuts no step.
    pub paused: bool,
    /// Φ_r for the versions opened from now on; `None` keeps the configured one.
    pub version_budget_tokens: Option<u64>,
}

/// The durable record of runs, prompts, steps and checkpoints.
///
/// Every write is idempotent (see [`Recorded`]) and every multi-row write is one transaction.
/// Query methods about a run the ledger does not know answer empty (`None`, zero counts, empty
/// lists) rather than failing.
#[async_trait]
pub trait Ledger: Send + Sync {
    /// The database engine behind this ledger.
    fn backend(&self) -> Backend;

    /// Creates run `run` with its configuration unless it exists. An existing run keeps the
    /// configuration it was created with ([`Recorded::Existing`]); compare with
    /// [`Ledger::run`] if a changed configuration matters.
    async fn create_run(&self, run: &str, config: &serde_json::Value) -> Result<Recorded>;

    /// The run, if the ledger knows it.
    async fn run(&self, run: &str) -> Result<Option<RunRecord>>;

    /// Records that the run accepted `prompt`, keeping the prompt itself so that the run can
    /// be rebuilt without Kafka or Redis. Idempotent per prompt id; a different prompt under
    /// an id already accepted is [`LedgerError::PromptIdReused`].
    async fn accept_prompt(&self, run: &str, prompt: &Prompt) -> Result<Recorded>;

    /// Records that `prompt` is dropped for `reason` (with `detail` for a person). A prompt
    /// is dropped at most once: repeating the same reason is [`Recorded::Existing`], another
    /// reason is [`LedgerError::PromptAlreadyDropped`], and a trained prompt cannot be dropped
    /// ([`LedgerError::PromptAlreadyTrained`]). A prompt never accepted (malformed input) can
    /// be dropped too.
    ///
    /// A leader write: `leader_token` is the writer's leader-lock fencing token. The run keeps
    /// the highest token that has written to it, and a lower one is rejected with
    /// [`LedgerError::LeaderFenced`] (a deposed leader), in the same transaction.
    async fn drop_prompt(
        &self,
        run: &str,
        prompt: &PromptId,
        reason: DropReason,
        detail: &str,
        leader_token: u64,
    ) -> Result<Recorded>;

    /// Records that input under `prompt`'s id was rejected at intake (it failed validation,
    /// or could not be read) without ever being accepted: it is dropped with `reason`. Not a
    /// leader write (workers' intakes call it). Repeating it is [`Recorded::Existing`]; an id
    /// already accepted is [`LedgerError::PromptIdReused`]; one dropped for another reason is
    /// [`LedgerError::PromptAlreadyDropped`].
    async fn reject_prompt(
        &self,
        run: &str,
        prompt: &PromptId,
        reason: DropReason,
        detail: &str,
    ) -> Result<Recorded>;

    /// Commits step `step.step`: in one transaction, records the step and marks each of its
    /// prompts trained in it. This is the commit point of the step.
    ///
    /// Replaying the same record is [`Recorded::Existing`]. Otherwise nothing changes and the
    /// error says why: the step number is taken by a different record
    /// ([`LedgerError::StepConflict`]), is not the next one ([`LedgerError::StepOutOfOrder`]),
    /// or a prompt is unknown, already trained or dropped. Fenced by `leader_token` like
    /// [`Ledger::drop_prompt`] ([`LedgerError::LeaderFenced`]), replays included.
    async fn record_step(
        &self,
        run: &str,
        step: &StepRecord,
        leader_token: u64,
    ) -> Result<Recorded>;

    /// The step, with its prompts (sorted), if recorded.
    async fn step(&self, run: &str, step: StepId) -> Result<Option<StepRecord>>;

    /// Every recorded step of the run, oldest first.
    async fn steps(&self, run: &str) -> Result<Vec<StepSummary>>;

    /// The last recorded step of the run, if any.
    async fn last_step(&self, run: &str) -> Result<Option<StepId>>;

    /// Where the prompt is, if the ledger knows it.
    async fn prompt_status(&self, run: &str, prompt: &PromptId) -> Result<Option<PromptStatus>>;

    /// How many prompts of the run are pending, trained and dropped.
    async fn prompt_counts(&self, run: &str) -> Result<PromptCounts>;

    /// The prompt as accepted; `None` for an unknown id, or a message rejected before it
    /// could be read as a prompt.
    async fn prompt(&self, run: &str, prompt: &PromptId) -> Result<Option<Prompt>>;

    /// The prompts accepted but neither trained nor dropped, in the order they were accepted:
    /// what must be re-registered after losing Redis.
    async fn pending_prompts(&self, run: &str) -> Result<Vec<Prompt>>;

    /// Records a checkpoint taken after a recorded step. Idempotent; other manifests for the
    /// same step are [`LedgerError::CheckpointConflict`].
    async fn record_checkpoint(&self, run: &str, checkpoint: &Checkpoint) -> Result<Recorded>;

    /// The run's checkpoints, newest (highest step) first.
    async fn checkpoints(&self, run: &str) -> Result<Vec<Checkpoint>>;

    /// The newest checkpoint, if any.
    async fn latest_checkpoint(&self, run: &str) -> Result<Option<Checkpoint>>;

    /// Forgets the checkpoint of `step` (keep-last-N); whether there was one.
    async fn delete_checkpoint(&self, run: &str, step: StepId) -> Result<bool>;

    /// Records a note on the run, once per key: a second write under the same key is
    /// [`Recorded::Existing`] and changes nothing.
    async fn record_event(&self, run: &str, event: &RunEvent) -> Result<Recorded>;

    /// The run's notes, oldest first.
    async fn events(&self, run: &str) -> Result<Vec<RunEvent>>;

    /// Sets the run's controls. A leader write, fenced by `leader_token` like
    /// [`Ledger::drop_prompt`].
    async fn set_controls(
        &self,
        run: &str,
        controls: &RunControls,
        leader_token: u64,
    ) -> Result<()>;

    /// The run's controls (the defaults for a run the ledger does not know).
    async fn controls(&self, run: &str) -> Result<RunControls>;

    /// The newest leader fencing token the run's leader writes carried (0 before any): a
    /// leader lock rebuilt after the state store was lost must hand out tokens above it.
    async fn leader_token(&self, run: &str) -> Result<u64>;
}
