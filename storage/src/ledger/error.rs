//! What can go wrong with the ledger, each case saying what to do about it.

use thiserror::Error;

use super::{Backend, DropReason};
use crate::types::{PromptId, StepId};

/// An error of a ledger operation.
#[derive(Debug, Error)]
pub enum LedgerError {
    /// The URL names no backend the ledger supports.
    #[error(
        "unsupported ledger URL {url:?}: use postgres://USER@HOST:PORT/DB, sqlite://PATH?mode=rwc \
         or sqlite::memory:"
    )]
    UnsupportedUrl {
        /// The URL as given (password removed).
        url: String,
    },

    /// The URL names a supported backend but cannot be parsed.
    #[error("invalid ledger URL {url:?}: {source}")]
    InvalidUrl {
        /// The URL as given (password removed).
        url: String,
        /// What the driver objected to.
        #[source]
        source: sqlx::Error,
    },

    /// The database could not be reached or opened.
    #[error(
        "cannot connect to the {backend} ledger at {url}: {source}; {hint}",
        hint = .backend.connect_hint()
    )]
    Connect {
        /// Which engine.
        backend: Backend,
        /// The URL (password removed).
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// The schema could not be brought up to date.
    #[error(
        "cannot apply the ledger migrations to {url}: {source}; if the database holds a schema \
         from another flywheel version, use a fresh database or the matching version"
    )]
    Migrate {
        /// The URL (password removed).
        url: String,
        /// The migrator's error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },

    /// An argument is unusable (empty id, duplicate prompts, a number out of range…).
    #[error("invalid ledger input: {0}")]
    InvalidInput(String),

    /// The run is not in the ledger.
    #[error("run {run:?} is not in the ledger: create it first (create_run)")]
    RunNotFound {
        /// The run asked for.
        run: String,
    },

    /// A step names a prompt the run never accepted.
    #[error(
        "prompt {prompt} of run {run:?} was never accepted, so step {step} cannot train it: \
         accept prompts before cutting steps from them"
    )]
    PromptNotAccepted {
        /// The run.
        run: String,
        /// The unknown prompt.
        prompt: PromptId,
        /// The step that named it.
        step: StepId,
    },

    /// The prompt was already trained (in `step`), so it can be neither trained again nor
    /// dropped.
    #[error(
        "prompt {prompt} of run {run:?} was already trained in step {step}: a prompt is trained \
         exactly once and never dropped afterwards; leave it out"
    )]
    PromptAlreadyTrained {
        /// The run.
        run: String,
        /// The prompt.
        prompt: PromptId,
        /// The step that trained it.
        step: StepId,
    },

    /// The prompt was already dropped, so it can be neither trained nor dropped again (for
    /// another reason).
    #[error(
        "prompt {prompt} of run {run:?} was already dropped ({reason}): a dropped prompt is \
         never trained nor dropped again; leave it out"
    )]
    PromptAlreadyDropped {
        /// The run.
        run: String,
        /// The prompt.
        prompt: PromptId,
        /// Why it was dropped.
        reason: DropReason,
    },

    /// A leader write (a step commit, a drop) carrying a fencing token lower than one that
    /// already wrote to the run: the writer was deposed by a newer leader (DESIGN.md §6.1).
    #[error(
        "run {run:?}: leader write with fencing token {token} rejected, a newer leader (token \
         {newest}) has written; this process lost the leader lock and must stop writing"
    )]
    LeaderFenced {
        /// The run.
        run: String,
        /// The token the writer presented.
        token: u64,
        /// The highest token that has written to the run.
        newest: u64,
    },

    /// A prompt id already accepted arrived with different content.
    #[error(
        "prompt {prompt} of run {run:?} was already accepted with different content: prompt ids \
         must be unique within a run; give the new prompt a new id"
    )]
    PromptIdReused {
        /// The run.
        run: String,
        /// The reused id.
        prompt: PromptId,
    },

    /// The step number is taken by a different record.
    #[error(
        "step {step} of run {run:?} is already recorded with a different {difference}: a step \
         is committed once; replay it unchanged, or cut step {next} from prompts not yet \
         trained",
        next = .step + 1
    )]
    StepConflict {
        /// The run.
        run: String,
        /// The step number.
        step: StepId,
        /// Which part differs (manifest key, prompts, tokens…).
        difference: String,
    },

    /// The step is not the next one of the run.
    #[error(
        "step {step} of run {run:?} is out of order: steps are recorded without gaps and the \
         next one is {expected}"
    )]
    StepOutOfOrder {
        /// The run.
        run: String,
        /// The step offered.
        step: StepId,
        /// The step the ledger expects next.
        expected: StepId,
    },

    /// A checkpoint names a step the ledger has not recorded.
    #[error(
        "cannot record a checkpoint of step {step} of run {run:?}: the step is not recorded; \
         checkpoint only committed steps"
    )]
    StepNotRecorded {
        /// The run.
        run: String,
        /// The step.
        step: StepId,
    },

    /// The step already has a checkpoint with other manifests.
    #[error(
        "a checkpoint of step {step} of run {run:?} is already recorded with other manifests; \
         delete it first if it is to be replaced"
    )]
    CheckpointConflict {
        /// The run.
        run: String,
        /// The step.
        step: StepId,
    },

    /// A stored value cannot be read back (edited by hand, or written by another version).
    #[error("the ledger holds an unreadable {what}: {detail}; was the database edited by hand?")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// Why it could not be read.
        detail: String,
    },

    /// The database failed an operation (connection lost, disk full, timeout…).
    #[error("ledger database error: {0}; check that the database is up and reachable")]
    Database(#[from] sqlx::Error),
}
