//! The data model of DESIGN.md §4: prompts, trajectories, segments, groups and step batches.
//!
//! Everything here is plain data, serialisable with serde, shared by every component. The
//! binary segment codec lives in [`crate::codec`]; everything else travels as JSON.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A policy version. 0 is the initial weights; optimizer step `s` trains on batch `s` and
/// publishes version `s + 1`.
pub type PolicyVersion = u64;

/// An optimizer step number (0-based).
pub type StepId = u64;

/// The identifier of a prompt, unique within a run (it is the idempotency key of
/// registration: a redelivered prompt with the same id registers nothing twice).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PromptId(pub String);

impl fmt::Display for PromptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PromptId {
    /// The longest id accepted, in bytes.
    pub const MAX_LEN: usize = 200;

    /// Checks that the id can name objects, Redis keys and ledger rows as it is: 1 to
    /// [`PromptId::MAX_LEN`] bytes of ASCII letters, digits and `- _ . : @ + = , ~ /`, where
    /// `/` separates non-empty parts that are not `.` or `..` (object stores refuse those).
    /// The error says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let id = &self.0;
        if id.is_empty() || id.len() > Self::MAX_LEN {
            return Err(format!(
                "must be 1 to {} bytes, not {}",
                Self::MAX_LEN,
                id.len()
            ));
        }
        if let Some(c) = id.chars().find(|c| {
            !(c.is_ascii_alphanumeric()
                || matches!(c, '-' | '_' | '.' | ':' | '@' | '+' | '=' | ',' | '~' | '/'))
        }) {
            return Err(format!(
                "contains {c:?}: use ASCII letters, digits and - _ . : @ + = , ~ /"
            ));
        }
        if id.split('/').any(|part| matches!(part, "" | "." | "..")) {
            return Err(
                "has an empty, `.` or `..` part between slashes (or starts or ends with `/`)"
                    .into(),
            );
        }
        Ok(())
    }
}

impl From<&str> for PromptId {
    fn from(s: &str) -> Self {
        PromptId(s.to_owned())
    }
}

/// What the model is asked: either text (tokenised by the engine) or token ids.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// How a finished trajectory is scored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VerifierSpec {
    /// Reward 1 when the response (trimmed) equals `answer`, else 0.
    ExactMatch { answer: String },
    /// Reward 1 when the final `\boxed{}` (or the last number) equals `answer` numerically.
    Math { answer: String },
    /// Ask the HTTP reward service registered under `name` in the config.
    Service { name: String },
}

/// One unit of input work read from the `prompts` topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prompt {
    /// Unique within a run.
    pub id: PromptId,
    /// What to generate from.
    pub input: PromptInput,
    /// How to score each of the group's responses.
    pub verifier: VerifierSpec,
    /// K: how many samples (trajectories) form this prompt's group.
    pub group_size: u32,
    /// Free-form labels carried through to the ledger and reports.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl Prompt {
    /// The ids of this prompt's K trajectories, in sample order.
    pub fn trajectory_ids(&self) -> impl Iterator<Item = TrajectoryId> + '_ {
        (0..self.group_size).map(|sample| TrajectoryId {
            prompt: self.id.clone(),
            sample,
        })
    }
}

/// One sample of a prompt: (prompt id, sample index k < K).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TrajectoryId {
    pub prompt: PromptId,
    pub sample: u32,
}

impl fmt::Display for TrajectoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.prompt, self.sample)
    }
}

/// Why a segment ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The segment hit its token budget; the trajectory goes on.
    None,
    /// The model emitted end-of-sequence: the trajectory is finished.
    Eos,
    /// The trajectory hit its maximum response length: finished.
    Length,
    /// Generation was abandoned (shutdown, engine error): the trajectory is finished unscored
    /// or regenerated, per config.
    Abort,
}

impl FinishReason {
    /// Whether a trajectory whose last segment ended this way is done generating.
    pub fn ends_trajectory(self) -> bool {
        !matches!(self, FinishReason::None)
    }
}

/// A piece of a trajectory generated under one policy version and one lease epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub trajectory: TrajectoryId,
    /// Position of this segment within its trajectory (0-based, contiguous).
    pub seq: u32,
    /// The policy version that generated these tokens.
    pub version: PolicyVersion,
    /// The lease epoch of the writer; the index rejects a segment from a stale epoch.
    pub lease_epoch: u64,
    /// Sampled token ids.
    pub tokens: Vec<u32>,
    /// The engine's log-probability of each sampled token (same length as `tokens`).
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
}

/// Where a trajectory is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrajectoryStatus {
    /// Registered, no segment yet, nobody generating.
    Pending,
    /// A worker holds its lease and is generating.
    Generating,
    /// Unfinished, waiting for the next policy version (C3PO++).
    Parked,
    /// Done generating; scored.
    Finished,
    /// Dropped after outliving the retention limit σ.
    Purged,
    /// Its group was dropped (a sibling gave up or was purged, or the group fell behind the
    /// lag bound η): nothing more is generated for it.
    Dropped,
}

/// A worker's claim on a trajectory. A claim after expiry gets a new, higher epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The worker that holds it.
    pub owner: String,
    /// Fencing epoch: strictly increases with each claim of this trajectory.
    pub epoch: u64,
    /// Wall-clock expiry, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

/// A committed segment as the index knows it: enough to fetch and check it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRef {
    /// Position within the trajectory.
    pub seq: u32,
    /// Object-store key of the encoded segment.
    pub key: String,
    /// Number of tokens in the segment.
    pub tokens: u32,
    /// The policy version that generated it.
    pub version: PolicyVersion,
}

/// The index's record of one trajectory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrajectoryState {
    pub id: TrajectoryId,
    pub status: TrajectoryStatus,
    /// Committed segments, in order.
    pub segments: Vec<SegmentRef>,
    /// Sum of the committed segments' tokens.
    pub tokens: u64,
    /// Version of the first committed segment (None before any).
    pub first_version: Option<PolicyVersion>,
    /// Version of the last committed segment.
    pub last_version: Option<PolicyVersion>,
    /// Version bumps survived while unfinished (compared against σ).
    pub retention: u32,
    /// The current lease, if any worker holds or last held one.
    pub lease: Option<Lease>,
    /// Set when finished.
    pub reward: Option<f32>,
    /// Failed attempts at generating or scoring it (engine or verifier errors); at the
    /// configured bound it gives up and its group is dropped.
    #[serde(default)]
    pub failures: u32,
}

/// A prompt's K finished trajectories with their rewards and advantages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub prompt: PromptId,
    /// The finished trajectories, in sample order.
    pub members: Vec<TrajectoryState>,
    /// A_i = (R_i − mean R) / (std R + 1e-6), in member order.
    pub advantages: Vec<f32>,
}

/// One trajectory's share of a step: which tokens are trained and with what advantage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchEntry {
    pub trajectory: TrajectoryId,
    /// Its committed segments, in order.
    pub segments: Vec<SegmentRef>,
    /// Response-token range trained, `[start, end)`; a cut group's tail is outside it.
    pub train_start: u32,
    pub train_end: u32,
    pub advantage: f32,
}

impl BatchEntry {
    /// Tokens this entry trains.
    pub fn trained_tokens(&self) -> u64 {
        u64::from(self.train_end.saturating_sub(self.train_start))
    }
}

/// Entries one rank processes in one forward/backward pass (at most M tokens).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MicroBatch {
    pub entries: Vec<BatchEntry>,
}

/// The plan of optimizer step `step`: written create-if-absent before the ledger commit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchManifest {
    pub step: StepId,
    /// The token budget Φ; also the constant loss normaliser (C3PO).
    pub token_budget: u64,
    /// Trainer ranks the step was cut for.
    pub world_size: u32,
    /// `ranks[r]` is rank r's list of micro-batches.
    pub ranks: Vec<Vec<MicroBatch>>,
    /// Trained tokens over all ranks (= Φ unless the input ran short).
    pub total_tokens: u64,
    /// Prompts whose groups this step consumes.
    pub prompts: Vec<PromptId>,
    /// Oldest and newest policy version among the trained segments.
    pub min_version: PolicyVersion,
    pub max_version: PolicyVersion,
}
