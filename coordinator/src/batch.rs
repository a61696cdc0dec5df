//! GRPO groups and C3PO step batches (DESIGN.md §4, §6.3), as pure functions.
//!
//! The pipeline of one step, all deterministic so that a replay after a crash produces the
//! same manifest byte for byte:
//!
//! 1. [`form_group`]: a prompt's K finished trajectories → a [`Group`] with GRPO advantages,
//!    or a [`DroppedGroup`] with the [`DropReason`] the caller records in the ledger.
//! 2. [`cut_step`]: complete groups, oldest first, → the entries of one step training exactly
//!    Φ tokens (the crossing group's tails masked), the prompts consumed, the groups left over.
//! 3. [`assemble_manifest`]: the cut → a [`BatchManifest`]: entries balanced over the W ranks
//!    ([`crate::partition`]) and packed into micro-batches of at most M tokens.
//!
//! [`plan_step`] runs 2 and 3 together.

use std::collections::{BTreeMap, BTreeSet};

use flywheel_storage::ledger::DropReason;
use flywheel_storage::{
    BatchEntry, BatchManifest, Group, MicroBatch, PolicyVersion, PromptId, StepId, TrajectoryId,
    TrajectoryState, TrajectoryStatus,
};
use serde::{Deserialize, Serialize};

use crate::partition::{self, PartitionError, PartitionStrategy};

/// The ε in A_i = (R_i − mean R) / (std R + ε): keeps the division finite for groups whose
/// rewards barely differ.
pub const ADVANTAGE_EPSILON: f64 = 1e-6;

/// How groups are formed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupConfig {
    /// Drop groups whose K rewards are all equal. Their advantages are all zero, so they add
    /// nothing to the gradient but still take tokens of the budget Φ (and so dilute the
    /// constant 1/Φ normaliser). On by default.
    pub filter_zero_variance: bool,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            filter_zero_variance: true,
        }
    }
}

/// How step batches are cut and laid out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// Φ: tokens trained per optimizer step, and the constant loss normaliser (C3PO).
    pub token_budget: u64,
    /// M: the most tokens one micro-batch (one forward/backward pass) may hold.
    pub micro_batch_tokens: u64,
    /// How sequences are spread over the trainer ranks.
    #[serde(default)]
    pub partition: PartitionStrategy,
}

impl PlanConfig {
    /// Checks the values a step cannot be planned without.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.token_budget == 0 {
            return Err(PlanError::ZeroTokenBudget);
        }
        if self.micro_batch_tokens == 0 {
            return Err(PlanError::Partition(PartitionError::ZeroMicroBatchLimit));
        }
        Ok(())
    }
}

/// Why a prompt's group cannot be formed: the trajectory index is inconsistent or the caller
/// asked too early. Nothing is dropped on such an error; fix the cause and form it again.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GroupError {
    /// K = 0 cannot form a group.
    #[error("prompt {prompt}: group size K is 0; a prompt needs at least one sample")]
    ZeroGroupSize {
        /// The prompt concerned.
        prompt: PromptId,
    },
    /// Not all K trajectories were given.
    #[error(
        "prompt {prompt}: {got} trajectories given, group size is {expected}; wait until all are finished"
    )]
    Incomplete {
        /// The prompt concerned.
        prompt: PromptId,
        /// K.
        expected: u32,
        /// How many were given.
        got: usize,
    },
    /// A trajectory of another prompt was passed in.
    #[error("trajectory {trajectory} does not belong to prompt {prompt}")]
    ForeignMember {
        /// The prompt whose group is being formed.
        prompt: PromptId,
        /// The stray trajectory.
        trajectory: TrajectoryId,
    },
    /// A sample index is not below K.
    #[error("trajectory {trajectory}: sample index is outside 0..{group_size}")]
    SampleOutOfRange {
        /// The offending trajectory.
        trajectory: TrajectoryId,
        /// K.
        group_size: u32,
    },
    /// The same sample was given twice.
    #[error("trajectory {trajectory} was given twice")]
    DuplicateSample {
        /// The duplicated trajectory.
        trajectory: TrajectoryId,
    },
    /// A member is still generating (or was purged).
    #[error(
        "trajectory {trajectory} is {status:?}, not finished; form the group once all members finish"
    )]
    NotFinished {
        /// The member concerned.
        trajectory: TrajectoryId,
        /// Its current status.
        status: TrajectoryStatus,
    },
    /// A finished member has no reward.
    #[error(
        "trajectory {trajectory} is finished but has no reward; score it before forming its group"
    )]
    MissingReward {
        /// The member concerned.
        trajectory: TrajectoryId,
    },
    /// A reward is NaN or infinite: the verifier is broken.
    #[error("trajectory {trajectory} has a non-finite reward {reward}; check its verifier")]
    NonFiniteReward {
        /// The member concerned.
        trajectory: TrajectoryId,
        /// The reward.
        reward: f32,
    },
}

/// A complete group that will not be trained, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DroppedGroup {
    /// The prompt to record as dropped.
    pub prompt: PromptId,
    /// The reason to record with it.
    pub reason: DropReason,
    /// What a person reads about it.
    pub detail: String,
}

/// The result of [`form_group`].
#[derive(Debug, Clone, PartialEq)]
pub enum GroupOutcome {
    /// A group to wait for a step.
    Ready(Group),
    /// A group to record as dropped.
    Dropped(DroppedGroup),
}

/// GRPO advantages: A_i = (R_i − mean R) / (std R + ε), ε = [`ADVANTAGE_EPSILON`].
///
/// `std` is the population standard deviation (divide by K, not K − 1): the group is the whole
/// set being normalised, not a sample of a larger one, and K = 1 stays defined (A = 0). The
/// arithmetic is in f64 in a fixed order, so it is deterministic. When all rewards are equal
/// the advantages are exactly 0 (computing the mean in floating point could leave ±1e-11
/// crumbs otherwise). The caller checks rewards are finite; an empty slice gives an empty
/// result.
pub fn grpo_advantages(rewards: &[f32]) -> Vec<f32> {
    if rewards.iter().all(|&r| r == rewards[0]) {
        return vec![0.0; rewards.len()];
    }
    let n = rewards.len() as f64;
    let mean = rewards.iter().map(|&r| f64::from(r)).sum::<f64>() / n;
    let variance = rewards
        .iter()
        .map(|&r| (f64::from(r) - mean).powi(2))
        .sum::<f64>()
        / n;
    let denominator = variance.sqrt() + ADVANTAGE_EPSILON;
    rewards
        .iter()
        .map(|&r| ((f64::from(r) - mean) / denominator) as f32)
        .collect()
}

/// Forms the GRPO group of `prompt` from its `group_size` finished trajectories (any order;
/// the group lists them in sample order) and computes their advantages.
///
/// A group whose responses are all empty is always dropped ([`DropReason::EmptyResponses`]);
/// a group whose rewards are all equal is dropped when `config.filter_zero_variance` is set
/// ([`DropReason::ZeroVariance`]), and otherwise kept with all-zero advantages.
pub fn form_group(
    prompt: &PromptId,
    group_size: u32,
    mut members: Vec<TrajectoryState>,
    config: &GroupConfig,
) -> Result<GroupOutcome, GroupError> {
    if group_size == 0 {
        return Err(GroupError::ZeroGroupSize {
            prompt: prompt.clone(),
        });
    }
    if members.len() != group_size as usize {
        return Err(GroupError::Incomplete {
            prompt: prompt.clone(),
            expected: group_size,
            got: members.len(),
        });
    }
    members.sort_by_key(|m| m.id.sample);
    let mut rewards = Vec::with_capacity(members.len());
    // K members, all below K, none twice: the samples are exactly 0..K.
    for (i, member) in members.iter().enumerate() {
        if member.id.prompt != *prompt {
            return Err(GroupError::ForeignMember {
                prompt: prompt.clone(),
                trajectory: member.id.clone(),
            });
        }
        if member.id.sample >= group_size {
            return Err(GroupError::SampleOutOfRange {
                trajectory: member.id.clone(),
                group_size,
            });
        }
        if i > 0 && members[i - 1].id.sample == member.id.sample {
            return Err(GroupError::DuplicateSample {
                trajectory: member.id.clone(),
            });
        }
        if member.status != TrajectoryStatus::Finished {
            return Err(GroupError::NotFinished {
                trajectory: member.id.clone(),
                status: member.status,
            });
        }
        let reward = member.reward.ok_or_else(|| GroupError::MissingReward {
            trajectory: member.id.clone(),
        })?;
        if !reward.is_finite() {
            return Err(GroupError::NonFiniteReward {
                trajectory: member.id.clone(),
                reward,
            });
        }
        rewards.push(reward);
    }
    if members.iter().all(|m| m.tokens == 0) {
        return Ok(GroupOutcome::Dropped(DroppedGroup {
            prompt: prompt.clone(),
            reason: DropReason::EmptyResponses,
            detail: "no response tokens to train".into(),
        }));
    }
    if config.filter_zero_variance && rewards.iter().all(|&r| r == rewards[0]) {
        return Ok(GroupOutcome::Dropped(DroppedGroup {
            prompt: prompt.clone(),
            reason: DropReason::ZeroVariance,
            detail: format!("every reward is {}, so every advantage is 0", rewards[0]),
        }));
    }
    let advantages = grpo_advantages(&rewards);
    Ok(GroupOutcome::Ready(Group {
        prompt: prompt.clone(),
        members,
        advantages,
    }))
}

/// Why a step cannot be planned. These are caller or index errors, never a matter of waiting.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// Φ = 0 trains nothing.
    #[error("token budget Φ is 0: set it to the tokens one optimizer step should train")]
    ZeroTokenBudget,
    /// Invalid ranks or micro-batch limit.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// There is nothing to train: cut a step only when groups are waiting.
    #[error("step {step} has no tokens to train; wait for complete groups before cutting a step")]
    EmptyStep {
        /// The step concerned.
        step: StepId,
    },
    /// Two candidate groups have the same prompt: it would be trained twice.
    #[error("prompt {prompt} appears in more than one candidate group; it must be trained once")]
    DuplicatePrompt {
        /// The duplicated prompt.
        prompt: PromptId,
    },
    /// An entry of a cut trains tokens outside its trajectory, or a trajectory twice.
    #[error("entry of trajectory {trajectory} is invalid: {problem}; build cuts with cut_step")]
    InvalidEntry {
        /// The trajectory concerned.
        trajectory: TrajectoryId,
        /// What is wrong.
        problem: String,
    },
    /// A candidate group breaks an invariant [`form_group`] guarantees.
    #[error("group of prompt {prompt} is invalid: {problem}; form groups with form_group")]
    InvalidGroup {
        /// The prompt concerned.
        prompt: PromptId,
        /// What is wrong.
        problem: String,
    },
}

/// The C3PO selection of one step: what it trains, what it consumes, what waits.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCut {
    /// The step's entries, in candidate order (oldest group first, members in sample order).
    /// Members with nothing to train (empty responses, or a zero share of a cut) have none.
    pub entries: Vec<BatchEntry>,
    /// Prompts whose groups the step consumes, oldest first; this includes the cut group.
    pub consumed: Vec<PromptId>,
    /// Groups left for later steps, oldest first, unchanged.
    pub leftover: Vec<Group>,
    /// Tokens trained: min(Φ, tokens available).
    pub total_tokens: u64,
    /// Tail tokens of the cut group that are masked out and never trained.
    pub masked_tokens: u64,
    /// The group that crossed Φ and had its tails masked, if any.
    pub cut_prompt: Option<PromptId>,
}

impl StepCut {
    /// Whether the step trains nothing (no candidate groups).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The age key of a group: its members' oldest first version (older trains first), ties by
/// prompt id so the order is total and deterministic.
fn age_key(group: &Group) -> (PolicyVersion, &PromptId) {
    let oldest = group
        .members
        .iter()
        .filter_map(|m| m.first_version)
        .min()
        .unwrap_or(0);
    (oldest, &group.prompt)
}

/// Checks what the cut relies on and returns the group's total tokens.
fn validate_group(group: &Group) -> Result<u64, PlanError> {
    let invalid = |problem: String| PlanError::InvalidGroup {
        prompt: group.prompt.clone(),
        problem,
    };
    if group.members.is_empty() {
        return Err(invalid("it has no members".into()));
    }
    if group.members.len() != group.advantages.len() {
        return Err(invalid(format!(
            "{} members but {} advantages",
            group.members.len(),
            group.advantages.len()
        )));
    }
    let mut samples = BTreeSet::new();
    let mut total = 0u64;
    for (member, advantage) in group.members.iter().zip(&group.advantages) {
        if member.id.prompt != group.prompt {
            return Err(invalid(format!(
                "member {} belongs to another prompt",
                member.id
            )));
        }
        if !samples.insert(member.id.sample) {
            return Err(invalid(format!(
                "sample {} appears twice",
                member.id.sample
            )));
        }
        if !advantage.is_finite() {
            return Err(invalid(format!(
                "member {} has a non-finite advantage",
                member.id
            )));
        }
        let segment_tokens: u64 = member.segments.iter().map(|s| u64::from(s.tokens)).sum();
        if segment_tokens != member.tokens {
            return Err(invalid(format!(
                "member {} counts {} tokens but its segments hold {}; rebuild its index entry",
                member.id, member.tokens, segment_tokens
            )));
        }
        if u32::try_from(member.tokens).is_err() {
            return Err(invalid(format!(
                "member {} has {} tokens, over u32::MAX",
                member.id, member.tokens
            )));
        }
        if member.tokens > 0 && member.first_version.is_none() {
            return Err(invalid(format!(
                "member {} has tokens but no first version",
                member.id
            )));
        }
        total += member.tokens;
    }
    if total == 0 {
        return Err(invalid(
            "it has no response tokens (drop it as empty_responses)".into(),
        ));
    }
    Ok(total)
}

/// Shares `budget` tokens among members of the given lengths in proportion to their lengths
/// (largest remainder, ties to the earlier member). Requires `0 < budget < sum(lengths)`;
/// every share is ≤ its length and the shares sum to `budget`.
fn proportional_shares(lengths: &[u64], budget: u64) -> Vec<u64> {
    let total: u128 = lengths.iter().map(|&l| u128::from(l)).sum();
    let budget = u128::from(budget);
    let mut shares: Vec<u64> = Vec::with_capacity(lengths.len());
    let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(lengths.len());
    for (i, &len) in lengths.iter().enumerate() {
        let exact = u128::from(len) * budget;
        // Lossless: the quotient is below `len`, which fits in u64.
        shares.push((exact / total) as u64);
        remainders.push((exact % total, i));
    }
    let given: u128 = shares.iter().map(|&s| u128::from(s)).sum();
    // Fewer than len() tokens remain, and more members than that have a positive remainder
    // (the fractional parts sum to it and each is < 1), so each extra token goes to a member
    // whose exact share was not an integer and therefore below its length.
    let missing = (budget - given) as usize;
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take(missing) {
        shares[i] += 1;
    }
    shares
}

fn entry(member: &TrajectoryState, advantage: f32, trained: u64) -> BatchEntry {
    BatchEntry {
        trajectory: member.id.clone(),
        segments: member.segments.clone(),
        train_start: 0,
        // Validated to fit in u32, and `trained` ≤ member.tokens.
        train_end: trained as u32,
        advantage,
    }
}

/// Cuts one C3PO step of exactly `token_budget` (Φ) trained tokens, or all that is available
/// when less is.
///
/// Candidates are ordered oldest first (by the oldest `first_version` among a group's members;
/// ties by prompt id), whatever order they come in. Whole groups are added while the total
/// stays ≤ Φ. The first group that would cross Φ is included with its tails masked: the
/// remaining budget is shared among its members in proportion to their lengths (largest
/// remainder, ties to the lower sample), each member training a prefix `[0, share)` of its
/// response. Proportional rather than dropping the last members whole keeps every sample of
/// the group in the gradient, and does not favour short responses over long ones. The
/// advantages are those computed for the whole group, before the cut. The cut group is
/// consumed: its masked tails are never trained (as in C3PO). The step stops there; groups
/// after it wait, unchanged, even if a smaller one would still fit, so no group overtakes an
/// older one.
///
/// A step is never split across a group otherwise: every group is either consumed whole (with
/// possibly masked tails) or left over whole.
pub fn cut_step(groups: Vec<Group>, token_budget: u64) -> Result<StepCut, PlanError> {
    if token_budget == 0 {
        return Err(PlanError::ZeroTokenBudget);
    }
    let mut candidates = Vec::with_capacity(groups.len());
    for group in groups {
        let tokens = validate_group(&group)?;
        candidates.push((group, tokens));
    }
    candidates.sort_by(|a, b| age_key(&a.0).cmp(&age_key(&b.0)));
    for pair in candidates.windows(2) {
        if pair[0].0.prompt == pair[1].0.prompt {
            return Err(PlanError::DuplicatePrompt {
                prompt: pair[0].0.prompt.clone(),
            });
        }
    }

    let mut cut = StepCut {
        entries: Vec::new(),
        consumed: Vec::new(),
        leftover: Vec::new(),
        total_tokens: 0,
        masked_tokens: 0,
        cut_prompt: None,
    };
    let mut candidates = candidates.into_iter();
    for (group, tokens) in candidates.by_ref() {
        let remaining = token_budget - cut.total_tokens;
        if tokens <= remaining {
            for (member, &advantage) in group.members.iter().zip(&group.advantages) {
                if member.tokens > 0 {
                    cut.entries.push(entry(member, advantage, member.tokens));
                }
            }
            cut.total_tokens += tokens;
        } else {
            let lengths: Vec<u64> = group.members.iter().map(|m| m.tokens).collect();
            let shares = proportional_shares(&lengths, remaining);
            for ((member, &advantage), share) in
                group.members.iter().zip(&group.advantages).zip(shares)
            {
                if share > 0 {
                    cut.entries.push(entry(member, advantage, share));
                }
            }
            cut.total_tokens = token_budget;
            cut.masked_tokens = tokens - remaining;
            cut.cut_prompt = Some(group.prompt.clone());
        }
        cut.consumed.push(group.prompt);
        if cut.total_tokens == token_budget {
            break;
        }
    }
    cut.leftover = candidates.map(|(group, _)| group).collect();
    Ok(cut)
}

/// The trained tokens of each segment of an entry, with the segment's version: the overlap
/// of the segment with `[train_start, train_end)`, segments outside it left out.
fn trained_segment_tokens(entry: &BatchEntry) -> impl Iterator<Item = (PolicyVersion, u64)> + '_ {
    let (start, end) = (u64::from(entry.train_start), u64::from(entry.train_end));
    entry
        .segments
        .iter()
        .scan(0u64, move |offset, segment| {
            let (lo, hi) = (*offset, *offset + u64::from(segment.tokens));
            *offset = hi;
            Some((segment.version, hi.min(end).saturating_sub(lo.max(start))))
        })
        .filter(|&(_, tokens)| tokens > 0)
}

/// The oldest and newest policy version among the segments an entry trains, or None when it
/// trains nothing.
fn trained_versions(entry: &BatchEntry) -> Option<(PolicyVersion, PolicyVersion)> {
    trained_segment_tokens(entry).fold(None, |span, (version, _)| {
        Some(match span {
            None => (version, version),
            Some((lo, hi)) => (lo.min(version), hi.max(version)),
        })
    })
}

/// Lays a cut out as the manifest of `step` over `world_size` ranks.
///
/// Entries are weighted by their trained tokens (prompt tokens are not counted: the
/// coordinator does not know them, and a group's members share one prompt), spread over the
/// ranks with `config.partition`, and packed per rank into micro-batches of at most
/// `config.micro_batch_tokens` by first-fit decreasing; an entry longer than M gets a
/// micro-batch of its own (see [`partition::pack_micro_batches`]). A rank may get no
/// micro-batch when there are fewer entries than ranks. `prompts` lists the consumed prompts
/// in the cut's (oldest-first) order; `min_version`/`max_version` span the trained segments.
pub fn assemble_manifest(
    step: StepId,
    world_size: u32,
    cut: &StepCut,
    config: &PlanConfig,
) -> Result<BatchManifest, PlanError> {
    config.validate()?;
    if world_size == 0 {
        return Err(PartitionError::NoRanks.into());
    }
    if cut.entries.is_empty() {
        return Err(PlanError::EmptyStep { step });
    }
    let mut min_version = PolicyVersion::MAX;
    let mut max_version = PolicyVersion::MIN;
    let mut seen = BTreeSet::new();
    for entry in &cut.entries {
        let invalid = |problem: String| PlanError::InvalidEntry {
            trajectory: entry.trajectory.clone(),
            problem,
        };
        if !seen.insert(&entry.trajectory) {
            return Err(invalid("it appears twice in the step".into()));
        }
        let available: u64 = entry.segments.iter().map(|s| u64::from(s.tokens)).sum();
        if entry.train_start >= entry.train_end || u64::from(entry.train_end) > available {
            return Err(invalid(format!(
                "trained range [{}, {}) is empty or outside its {available} tokens",
                entry.train_start, entry.train_end
            )));
        }
        // A non-empty range within the segments overlaps at least one of them.
        if let Some((lo, hi)) = trained_versions(entry) {
            min_version = min_version.min(lo);
            max_version = max_version.max(hi);
        }
    }
    let weights: Vec<u64> = cut.entries.iter().map(BatchEntry::trained_tokens).collect();
    let assignment = partition::partition(&weights, world_size as usize, config.partition)?;
    let mut ranks = Vec::with_capacity(world_size as usize);
    for items in &assignment.ranks {
        let micro_batches =
            partition::pack_micro_batches(&weights, items, config.micro_batch_tokens)?
                .into_iter()
                .map(|members| MicroBatch {
                    entries: members
                        .into_iter()
                        .map(|i| cut.entries[i].clone())
                        .collect(),
                })
                .collect();
        ranks.push(micro_batches);
    }
    Ok(BatchManifest {
        step,
        token_budget: config.token_budget,
        world_size,
        ranks,
        total_tokens: weights.iter().sum(),
        prompts: cut.consumed.clone(),
        min_version,
        max_version,
    })
}

/// A planned step: the manifest to commit and what the cut left behind.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPlan {
    /// The manifest to write (create-if-absent) and record in the ledger.
    pub manifest: BatchManifest,
    /// Groups that wait for the next step, oldest first.
    pub leftover: Vec<Group>,
    /// Tail tokens masked in the cut group (a metric).
    pub masked_tokens: u64,
    /// The group whose tails were masked, if any.
    pub cut_prompt: Option<PromptId>,
}

/// Cuts step `step` from the waiting `groups` and lays it out over `world_size` ranks:
/// [`cut_step`] then [`assemble_manifest`]. Returns [`PlanError::EmptyStep`] when no group
/// is waiting.
pub fn plan_step(
    step: StepId,
    world_size: u32,
    groups: Vec<Group>,
    config: &PlanConfig,
) -> Result<StepPlan, PlanError> {
    config.validate()?;
    let mut cut = cut_step(groups, config.token_budget)?;
    let manifest = assemble_manifest(step, world_size, &cut, config)?;
    Ok(StepPlan {
        manifest,
        leftover: std::mem::take(&mut cut.leftover),
        masked_tokens: cut.masked_tokens,
        cut_prompt: cut.cut_prompt,
    })
}

/// Trained tokens of a manifest by the policy version that generated them, for the staleness
/// histogram: a token generated under version v and trained in step s (which publishes s + 1)
/// is s − v versions stale.
pub fn trained_tokens_by_version(manifest: &BatchManifest) -> BTreeMap<PolicyVersion, u64> {
    let mut by_version = BTreeMap::new();
    for entry in manifest.ranks.iter().flatten().flat_map(|mb| &mb.entries) {
        for (version, tokens) in trained_segment_tokens(entry) {
            *by_version.entry(version).or_insert(0) += tokens;
        }
    }
    by_version
}

/// Tokens per rank of a manifest, for the partition-imbalance metric
/// ([`partition::imbalance`]).
pub fn rank_loads(manifest: &BatchManifest) -> Vec<u64> {
    manifest
        .ranks
        .iter()
        .map(|rank| {
            rank.iter()
                .flat_map(|mb| &mb.entries)
                .map(BatchEntry::trained_tokens)
                .sum()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_storage::SegmentRef;
    use proptest::prelude::*;

    /// A finished trajectory whose segments have the given (tokens, version) pairs.
    fn member(
        prompt: &str,
        sample: u32,
        segments: &[(u32, PolicyVersion)],
        reward: f32,
    ) -> TrajectoryState {
        let segments: Vec<SegmentRef> = (0u32..)
            .zip(segments)
            .map(|(seq, &(tokens, version))| SegmentRef {
                seq,
                key: format!("segments/{prompt}/{sample}/{seq}"),
                tokens,
                version,
            })
            .collect();
        TrajectoryState {
            id: TrajectoryId {
                prompt: prompt.into(),
                sample,
            },
            status: TrajectoryStatus::Finished,
            tokens: segments.iter().map(|s| u64::from(s.tokens)).sum(),
            first_version: segments.first().map(|s| s.version),
            last_version: segments.last().map(|s| s.version),
            segments,
            retention: 0,
            lease: None,
            reward: Some(reward),
            failures: 0,
        }
    }

    /// A group of one-segment members of the given lengths, all generated under `version`,
    /// with distinct rewards 0, 1, 2, … so nothing is zero-variance.
    fn group(prompt: &str, version: PolicyVersion, lengths: &[u32]) -> Group {
        let members = (0u32..)
            .zip(lengths)
            .map(|(k, &len)| {
                let segments = if len == 0 {
                    vec![]
                } else {
                    vec![(len, version)]
                };
                member(prompt, k, &segments, k as f32)
            })
            .collect::<Vec<_>>();
        ready(form_group(
            &prompt.into(),
            lengths.len() as u32,
            members,
            &GroupConfig {
                filter_zero_variance: false,
            },
        ))
    }

    fn ready(outcome: Result<GroupOutcome, GroupError>) -> Group {
        match outcome {
            Ok(GroupOutcome::Ready(group)) => group,
            other => panic!("expected a ready group, got {other:?}"),
        }
    }

    fn trained(cut: &StepCut) -> Vec<(String, u32)> {
        cut.entries
            .iter()
            .map(|e| (e.trajectory.to_string(), e.train_end))
            .collect()
    }

    fn prompts(ids: &[&str]) -> Vec<PromptId> {
        ids.iter().map(|&p| p.into()).collect()
    }

    fn config(token_budget: u64, micro_batch_tokens: u64) -> PlanConfig {
        PlanConfig {
            token_budget,
            micro_batch_tokens,
            partition: PartitionStrategy::Best,
        }
    }

    // ---- advantages and groups ----

    #[test]
    fn advantages_use_the_population_std() {
        let a = grpo_advantages(&[1.0, 2.0, 3.0, 4.0]);
        // mean 2.5, population variance 1.25, std 1.118034.
        let std = 1.25f64.sqrt() + 1e-6;
        let expected: Vec<f32> = [-1.5, -0.5, 0.5, 1.5]
            .iter()
            .map(|d| (d / std) as f32)
            .collect();
        assert_eq!(a, expected);
        assert!((a[0] + 1.341_64).abs() < 1e-5);
        // Binary rewards: ±1 (up to ε).
        let b = grpo_advantages(&[1.0, 0.0, 0.0, 1.0]);
        assert!(
            b.iter().all(|x| (x.abs() - 0.999_998).abs() < 1e-6),
            "{b:?}"
        );
        assert!(b.iter().sum::<f32>().abs() < 1e-6);
    }

    #[test]
    fn equal_rewards_give_exactly_zero_advantages() {
        assert_eq!(grpo_advantages(&[0.1, 0.1, 0.1]), vec![0.0; 3]);
        assert_eq!(grpo_advantages(&[7.0]), vec![0.0]);
        assert!(grpo_advantages(&[]).is_empty());
    }

    #[test]
    fn form_group_orders_members_and_computes_advantages() {
        let members = vec![
            member("p", 1, &[(3, 0)], 0.0),
            member("p", 0, &[(5, 0)], 1.0),
        ];
        let g = ready(form_group(&"p".into(), 2, members, &GroupConfig::default()));
        assert_eq!(
            g.members.iter().map(|m| m.id.sample).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert!(g.advantages[0] > 0.99 && g.advantages[1] < -0.99);
    }

    #[test]
    fn zero_variance_groups_are_dropped_or_kept_per_config() {
        let members = || {
            vec![
                member("p", 0, &[(3, 0)], 1.0),
                member("p", 1, &[(4, 0)], 1.0),
            ]
        };
        let dropped = form_group(
            &"p".into(),
            2,
            members(),
            &GroupConfig {
                filter_zero_variance: true,
            },
        );
        let Ok(GroupOutcome::Dropped(d)) = dropped else {
            panic!("expected a drop, got {dropped:?}")
        };
        assert_eq!(d.prompt, PromptId::from("p"));
        assert_eq!(d.reason, DropReason::ZeroVariance);
        assert!(d.detail.contains("every reward is 1"), "{}", d.detail);
        assert_eq!(d.reason.as_str(), "zero_variance");
        let kept = ready(form_group(
            &"p".into(),
            2,
            members(),
            &GroupConfig {
                filter_zero_variance: false,
            },
        ));
        assert_eq!(kept.advantages, vec![0.0, 0.0]);
    }

    #[test]
    fn all_empty_responses_are_dropped_whatever_the_filter() {
        for filter_zero_variance in [false, true] {
            let members = vec![member("p", 0, &[], 1.0), member("p", 1, &[(0, 2)], 0.0)];
            let outcome = form_group(
                &"p".into(),
                2,
                members,
                &GroupConfig {
                    filter_zero_variance,
                },
            );
            let Ok(GroupOutcome::Dropped(d)) = outcome else {
                panic!("expected a drop, got {outcome:?}")
            };
            assert_eq!(d.reason, DropReason::EmptyResponses);
            assert_eq!(d.reason.as_str(), "empty_responses");
        }
    }

    #[test]
    fn form_group_rejects_bad_members_with_typed_errors() {
        let cfg = GroupConfig::default();
        let p: PromptId = "p".into();
        let ok = |k| member("p", k, &[(2, 0)], k as f32);
        assert_eq!(
            form_group(&p, 0, vec![], &cfg),
            Err(GroupError::ZeroGroupSize { prompt: p.clone() })
        );
        assert_eq!(
            form_group(&p, 3, vec![ok(0), ok(1)], &cfg),
            Err(GroupError::Incomplete {
                prompt: p.clone(),
                expected: 3,
                got: 2
            })
        );
        let foreign = member("q", 1, &[(2, 0)], 0.0);
        assert!(matches!(
            form_group(&p, 2, vec![ok(0), foreign], &cfg),
            Err(GroupError::ForeignMember { .. })
        ));
        assert!(matches!(
            form_group(&p, 2, vec![ok(0), ok(0)], &cfg),
            Err(GroupError::DuplicateSample { .. })
        ));
        assert!(matches!(
            form_group(&p, 2, vec![ok(0), ok(2)], &cfg),
            Err(GroupError::SampleOutOfRange { group_size: 2, .. })
        ));
        let mut generating = ok(1);
        generating.status = TrajectoryStatus::Generating;
        assert!(matches!(
            form_group(&p, 2, vec![ok(0), generating], &cfg),
            Err(GroupError::NotFinished {
                status: TrajectoryStatus::Generating,
                ..
            })
        ));
        let mut unscored = ok(1);
        unscored.reward = None;
        assert!(matches!(
            form_group(&p, 2, vec![ok(0), unscored], &cfg),
            Err(GroupError::MissingReward { .. })
        ));
        let mut nan = ok(1);
        nan.reward = Some(f32::NAN);
        let err = form_group(&p, 2, vec![ok(0), nan], &cfg).unwrap_err();
        assert!(matches!(err, GroupError::NonFiniteReward { .. }));
        assert!(err.to_string().contains("check its verifier"));
    }

    // ---- the C3PO cut ----

    #[test]
    fn empty_input_cuts_an_empty_step() {
        let cut = cut_step(vec![], 100).unwrap();
        assert!(cut.is_empty());
        assert!(cut.consumed.is_empty() && cut.leftover.is_empty());
        assert_eq!(
            (cut.total_tokens, cut.masked_tokens, cut.cut_prompt.clone()),
            (0, 0, None)
        );
        assert_eq!(
            assemble_manifest(0, 2, &cut, &config(100, 10)),
            Err(PlanError::EmptyStep { step: 0 })
        );
        assert_eq!(
            plan_step(4, 2, vec![], &config(100, 10)),
            Err(PlanError::EmptyStep { step: 4 })
        );
    }

    #[test]
    fn zero_budget_is_a_typed_error() {
        assert_eq!(
            cut_step(vec![group("a", 0, &[1, 2])], 0),
            Err(PlanError::ZeroTokenBudget)
        );
        assert_eq!(config(0, 10).validate(), Err(PlanError::ZeroTokenBudget));
        assert_eq!(
            config(10, 0).validate(),
            Err(PlanError::Partition(PartitionError::ZeroMicroBatchLimit))
        );
    }

    #[test]
    fn exactly_phi_takes_whole_groups_and_masks_nothing() {
        let groups = vec![
            group("a", 0, &[10, 20]),
            group("b", 1, &[30, 40]),
            group("c", 2, &[5, 5]),
        ];
        let cut = cut_step(groups, 100).unwrap();
        assert_eq!(cut.total_tokens, 100);
        assert_eq!(cut.masked_tokens, 0);
        assert_eq!(cut.cut_prompt, None);
        assert_eq!(cut.consumed, prompts(&["a", "b"]));
        assert_eq!(
            cut.leftover
                .iter()
                .map(|g| g.prompt.clone())
                .collect::<Vec<_>>(),
            prompts(&["c"])
        );
        assert_eq!(
            trained(&cut),
            vec![
                ("a#0".into(), 10),
                ("a#1".into(), 20),
                ("b#0".into(), 30),
                ("b#1".into(), 40)
            ]
        );
    }

    #[test]
    fn groups_are_taken_oldest_first_ties_by_prompt_id() {
        // Input order is scrambled; age is the oldest first_version among members.
        let mut late = group("a", 5, &[4, 4]);
        late.members[1].first_version = Some(1); // one member started at v1: the group is v1
        let groups = vec![
            group("z", 3, &[4]),
            late,
            group("m", 0, &[4]),
            group("b", 3, &[4]),
        ];
        let cut = cut_step(groups, 1000).unwrap();
        assert_eq!(cut.consumed, prompts(&["m", "a", "b", "z"]));
    }

    #[test]
    fn the_crossing_group_is_cut_in_proportion_with_advantages_from_before_the_cut() {
        // 50 tokens of budget left after "a"; "b" has 10+30+0+20 = 60, cut to 5+15+0+10... of 30.
        let b = group("b", 1, &[10, 30, 0, 20]);
        let advantages_before = b.advantages.clone();
        let groups = vec![group("a", 0, &[40, 30]), b, group("c", 2, &[1])];
        let cut = cut_step(groups, 100).unwrap();
        assert_eq!(cut.total_tokens, 100);
        assert_eq!(cut.masked_tokens, 30);
        assert_eq!(cut.cut_prompt, Some("b".into()));
        assert_eq!(cut.consumed, prompts(&["a", "b"]));
        assert_eq!(
            trained(&cut),
            vec![
                ("a#0".into(), 40),
                ("a#1".into(), 30),
                ("b#0".into(), 5),
                ("b#1".into(), 15),
                ("b#3".into(), 10)
            ]
        );
        let b_entries: Vec<f32> = cut.entries[2..].iter().map(|e| e.advantage).collect();
        assert_eq!(
            b_entries,
            vec![
                advantages_before[0],
                advantages_before[1],
                advantages_before[3]
            ]
        );
        // "c" would fit in nothing; it waits, unchanged.
        assert_eq!(cut.leftover, vec![group("c", 2, &[1])]);
    }

    #[test]
    fn largest_remainders_get_the_odd_tokens_ties_to_the_lower_sample() {
        assert_eq!(proportional_shares(&[1, 1, 1], 2), vec![1, 1, 0]);
        assert_eq!(proportional_shares(&[100, 50], 1), vec![1, 0]);
        assert_eq!(proportional_shares(&[100, 50], 3), vec![2, 1]);
        assert_eq!(proportional_shares(&[7, 0, 6], 5), vec![3, 0, 2]);
        assert_eq!(
            proportional_shares(&[u32::MAX as u64; 4], 5),
            vec![2, 1, 1, 1]
        );
    }

    #[test]
    fn a_single_group_larger_than_phi_is_cut_and_consumed() {
        let groups = vec![group("big", 0, &[300, 100]), group("next", 1, &[10])];
        let cut = cut_step(groups, 200).unwrap();
        assert_eq!(
            trained(&cut),
            vec![("big#0".into(), 150), ("big#1".into(), 50)]
        );
        assert_eq!((cut.total_tokens, cut.masked_tokens), (200, 200));
        assert_eq!(cut.consumed, prompts(&["big"]));
        assert_eq!(cut.leftover.len(), 1);
    }

    #[test]
    fn phi_smaller_than_one_sequence() {
        let cut = cut_step(vec![group("g", 0, &[1000, 10])], 3).unwrap();
        assert_eq!(trained(&cut), vec![("g#0".into(), 3)]);
        assert_eq!((cut.total_tokens, cut.masked_tokens), (3, 1007));
        assert_eq!(cut.consumed, prompts(&["g"]));
        let cut = cut_step(vec![group("g", 0, &[1000])], 1).unwrap();
        assert_eq!(trained(&cut), vec![("g#0".into(), 1)]);
    }

    #[test]
    fn zero_length_responses_train_nothing_but_their_group_is_consumed() {
        let groups = vec![group("a", 0, &[0, 12, 0]), group("b", 1, &[0, 8])];
        let cut = cut_step(groups, 100).unwrap();
        assert_eq!(trained(&cut), vec![("a#1".into(), 12), ("b#1".into(), 8)]);
        assert_eq!(cut.total_tokens, 20);
        assert_eq!(cut.consumed, prompts(&["a", "b"]));
    }

    #[test]
    fn zero_variance_groups_kept_by_config_train_with_zero_advantage() {
        let members = vec![
            member("z", 0, &[(6, 0)], 1.0),
            member("z", 1, &[(4, 0)], 1.0),
        ];
        let z = ready(form_group(
            &"z".into(),
            2,
            members,
            &GroupConfig {
                filter_zero_variance: false,
            },
        ));
        let cut = cut_step(vec![z], 5).unwrap();
        assert_eq!(trained(&cut), vec![("z#0".into(), 3), ("z#1".into(), 2)]);
        assert!(cut.entries.iter().all(|e| e.advantage == 0.0));
    }

    #[test]
    fn invalid_candidates_are_rejected() {
        let err = cut_step(vec![group("a", 0, &[1]), group("a", 1, &[2])], 10).unwrap_err();
        assert_eq!(err, PlanError::DuplicatePrompt { prompt: "a".into() });
        let mut empty = group("e", 0, &[1]);
        empty.members[0] = member("e", 0, &[], 0.0);
        assert!(matches!(
            cut_step(vec![empty], 10),
            Err(PlanError::InvalidGroup { .. })
        ));
        let mut short = group("s", 0, &[1, 2]);
        short.advantages.pop();
        assert!(matches!(
            cut_step(vec![short], 10),
            Err(PlanError::InvalidGroup { .. })
        ));
        let mut lying = group("l", 0, &[5]);
        lying.members[0].tokens = 9;
        let err = cut_step(vec![lying], 10).unwrap_err();
        assert!(err.to_string().contains("rebuild its index entry"), "{err}");
    }

    // ---- the manifest ----

    #[test]
    fn manifest_balances_ranks_and_packs_micro_batches() {
        let groups = vec![
            group("a", 0, &[50, 40, 30]),
            group("b", 1, &[30, 20, 10, 10]),
        ];
        let plan = plan_step(7, 2, groups, &config(190, 60)).unwrap();
        let m = &plan.manifest;
        assert_eq!(
            (m.step, m.token_budget, m.world_size, m.total_tokens),
            (7, 190, 2, 190)
        );
        assert_eq!(m.prompts, prompts(&["a", "b"]));
        assert_eq!((m.min_version, m.max_version), (0, 1));
        // All lengths are multiples of 10, so 95/95 is impossible: 100/90 is the optimum.
        assert_eq!(rank_loads(m), vec![100, 90]);
        assert_eq!(partition::imbalance(&rank_loads(m)), 100.0 / 95.0);
        for mb in m.ranks.iter().flatten() {
            assert!(
                mb.entries
                    .iter()
                    .map(BatchEntry::trained_tokens)
                    .sum::<u64>()
                    <= 60
            );
        }
        assert!(plan.leftover.is_empty());
        assert_eq!((plan.masked_tokens, plan.cut_prompt.clone()), (0, None));
    }

    #[test]
    fn a_sequence_longer_than_m_gets_its_own_micro_batch() {
        let plan = plan_step(0, 1, vec![group("a", 0, &[100, 7, 3])], &config(1000, 10)).unwrap();
        let sizes: Vec<Vec<u32>> = plan.manifest.ranks[0]
            .iter()
            .map(|mb| mb.entries.iter().map(|e| e.train_end).collect())
            .collect();
        assert_eq!(sizes, vec![vec![100], vec![7, 3]]);
    }

    #[test]
    fn more_ranks_than_sequences_leaves_ranks_idle() {
        let plan = plan_step(0, 4, vec![group("a", 0, &[5, 6])], &config(100, 10)).unwrap();
        assert_eq!(plan.manifest.ranks.len(), 4);
        assert_eq!(
            rank_loads(&plan.manifest)
                .iter()
                .filter(|&&l| l == 0)
                .count(),
            2
        );
        assert_eq!(
            plan_step(0, 0, vec![group("a", 0, &[5])], &config(100, 10)),
            Err(PlanError::Partition(PartitionError::NoRanks))
        );
    }

    #[test]
    fn versions_span_only_the_trained_segments() {
        // Sample 0: 10 tokens at v2 then 10 at v5; sample 1: 10 tokens at v3.
        let members = vec![
            member("p", 0, &[(10, 2), (10, 5)], 1.0),
            member("p", 1, &[(10, 3)], 0.0),
        ];
        let g = ready(form_group(&"p".into(), 2, members, &GroupConfig::default()));
        // Φ = 15 of 30: shares 10 and 5, so sample 0's v5 segment is masked out entirely.
        let plan = plan_step(0, 1, vec![g.clone()], &config(15, 100)).unwrap();
        assert_eq!(
            (plan.manifest.min_version, plan.manifest.max_version),
            (2, 3)
        );
        assert_eq!(
            trained_tokens_by_version(&plan.manifest),
            BTreeMap::from([(2, 10), (3, 5)])
        );
        // Φ = 24 of 30: shares 16 and 8, so 6 of the v5 segment's 10 tokens are trained.
        let plan = plan_step(0, 1, vec![g.clone()], &config(24, 100)).unwrap();
        assert_eq!(
            (plan.manifest.min_version, plan.manifest.max_version),
            (2, 5)
        );
        assert_eq!(
            trained_tokens_by_version(&plan.manifest),
            BTreeMap::from([(2, 10), (3, 8), (5, 6)])
        );
        let plan = plan_step(0, 1, vec![g], &config(30, 100)).unwrap();
        assert_eq!(
            (plan.manifest.min_version, plan.manifest.max_version),
            (2, 5)
        );
        assert_eq!(
            trained_tokens_by_version(&plan.manifest),
            BTreeMap::from([(2, 10), (3, 10), (5, 10)])
        );
    }

    #[test]
    fn hand_built_cuts_with_bad_entries_are_rejected() {
        let mut cut = cut_step(vec![group("a", 0, &[5, 6])], 100).unwrap();
        cut.entries[1].train_end = 7;
        assert!(matches!(
            assemble_manifest(0, 1, &cut, &config(100, 10)),
            Err(PlanError::InvalidEntry { .. })
        ));
        let mut cut = cut_step(vec![group("a", 0, &[5, 6])], 100).unwrap();
        cut.entries[1] = cut.entries[0].clone();
        assert!(matches!(
            assemble_manifest(0, 1, &cut, &config(100, 10)),
            Err(PlanError::InvalidEntry { .. })
        ));
    }

    #[test]
    fn the_same_input_gives_the_same_manifest_byte_for_byte() {
        let groups = || {
            vec![
                group("q7", 2, &[120, 33, 7, 0]),
                group("q1", 0, &[64, 64, 64]),
                group("q3", 0, &[15, 250]),
                group("q2", 1, &[9, 9, 9, 9]),
            ]
        };
        let cfg = config(400, 128);
        let first = serde_json::to_vec(&plan_step(3, 3, groups(), &cfg).unwrap().manifest).unwrap();
        let again = serde_json::to_vec(&plan_step(3, 3, groups(), &cfg).unwrap().manifest).unwrap();
        assert_eq!(first, again);
        // The order groups arrive in (a replay reads the stream again) does not matter.
        let mut reversed = groups();
        reversed.reverse();
        let replayed =
            serde_json::to_vec(&plan_step(3, 3, reversed, &cfg).unwrap().manifest).unwrap();
        assert_eq!(first, replayed);
    }

    // ---- invariants ----

    /// Random waiting groups: unique prompts, 1–5 members, 0–3 segments of 0–40 tokens each with
    /// non-decreasing versions, rewards in {0, 1, 2}; at least one token per group.
    fn arb_groups() -> impl Strategy<Value = Vec<Group>> {
        let segment = (0u32..40, 0u64..2);
        let member_spec = (0u64..4, prop::collection::vec(segment, 0..4), 0u8..3);
        let group_spec = prop::collection::vec(member_spec, 1..6);
        prop::collection::vec(group_spec, 0..9).prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(g, members)| {
                    let prompt = format!("p{g:02}");
                    let mut states: Vec<TrajectoryState> = (0u32..)
                        .zip(members)
                        .map(|(k, (start, steps, reward))| {
                            let mut version = start;
                            let segs: Vec<(u32, PolicyVersion)> = steps
                                .into_iter()
                                .map(|(tokens, bump)| {
                                    version += bump;
                                    (tokens, version)
                                })
                                .collect();
                            member(&prompt, k, &segs, f32::from(reward))
                        })
                        .collect();
                    if states.iter().all(|m| m.tokens == 0) {
                        states[0] = member(&prompt, 0, &[(1, 0)], states[0].reward.unwrap());
                    }
                    let k = states.len() as u32;
                    ready(form_group(
                        &prompt.as_str().into(),
                        k,
                        states,
                        &GroupConfig {
                            filter_zero_variance: false,
                        },
                    ))
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn cut_invariants(groups in arb_groups(), budget in 1u64..300) {
            let available: u64 = groups.iter().flat_map(|g| &g.members).map(|m| m.tokens).sum();
            let cut = cut_step(groups.clone(), budget).unwrap();
            prop_assert_eq!(cut.total_tokens, budget.min(available));
            prop_assert_eq!(cut.entries.iter().map(BatchEntry::trained_tokens).sum::<u64>(), cut.total_tokens);

            // Every range within its trajectory; no trajectory twice; none empty.
            let by_id: std::collections::BTreeMap<&TrajectoryId, &TrajectoryState> =
                groups.iter().flat_map(|g| &g.members).map(|m| (&m.id, m)).collect();
            let mut seen = BTreeSet::new();
            for e in &cut.entries {
                prop_assert!(seen.insert(e.trajectory.clone()), "{} twice", e.trajectory);
                let m = by_id[&e.trajectory];
                prop_assert!(e.train_start < e.train_end && u64::from(e.train_end) <= m.tokens);
                prop_assert_eq!(&e.segments, &m.segments);
                prop_assert!(cut.consumed.contains(&e.trajectory.prompt));
            }

            // Groups are never split across steps: consumed or left over, whole and unchanged.
            let consumed: BTreeSet<&PromptId> = cut.consumed.iter().collect();
            prop_assert_eq!(consumed.len(), cut.consumed.len());
            for g in &cut.leftover {
                prop_assert!(!consumed.contains(&g.prompt));
                prop_assert!(groups.contains(g));
            }
            prop_assert_eq!(consumed.len() + cut.leftover.len(), groups.len());
            // Only the last consumed group may be cut; all others train every token.
            for g in groups.iter().filter(|g| consumed.contains(&g.prompt)) {
                let trained: u64 = cut.entries.iter().filter(|e| e.trajectory.prompt == g.prompt).map(BatchEntry::trained_tokens).sum();
                let total: u64 = g.members.iter().map(|m| m.tokens).sum();
                if Some(&g.prompt) == cut.cut_prompt.as_ref() {
                    prop_assert_eq!(cut.consumed.last(), Some(&g.prompt));
                    prop_assert_eq!(trained + cut.masked_tokens, total);
                    prop_assert!(cut.masked_tokens > 0);
                } else {
                    prop_assert_eq!(trained, total);
                }
            }
            // Oldest first: nothing left over is older than anything consumed.
            let key = |p: &PromptId| age_key(groups.iter().find(|g| &g.prompt == p).unwrap());
            if let (Some(last), Some(first_left)) = (cut.consumed.last(), cut.leftover.first()) {
                prop_assert!(key(last) < age_key(first_left));
            }
        }

        #[test]
        fn repeated_steps_train_every_prompt_exactly_once(groups in arb_groups(), budget in 1u64..200) {
            let all: BTreeSet<PromptId> = groups.iter().map(|g| g.prompt.clone()).collect();
            let mut trained = BTreeSet::new();
            let mut waiting = groups;
            while !waiting.is_empty() {
                let cut = cut_step(waiting, budget).unwrap();
                prop_assert!(!cut.consumed.is_empty(), "a step with waiting groups makes progress");
                for p in cut.consumed {
                    prop_assert!(trained.insert(p), "prompt consumed twice");
                }
                waiting = cut.leftover;
            }
            prop_assert_eq!(trained, all);
        }

        #[test]
        fn manifest_invariants(
            groups in arb_groups(),
            budget in 1u64..300,
            world_size in 1u32..6,
            micro_batch_tokens in 1u64..80,
            s in 0usize..3,
        ) {
            let cfg = PlanConfig {
                token_budget: budget,
                micro_batch_tokens,
                partition: [PartitionStrategy::Lpt, PartitionStrategy::KarmarkarKarp, PartitionStrategy::Best][s],
            };
            let cut = cut_step(groups.clone(), budget).unwrap();
            let result = assemble_manifest(9, world_size, &cut, &cfg);
            if cut.is_empty() {
                prop_assert_eq!(result, Err(PlanError::EmptyStep { step: 9 }));
                return Ok(());
            }
            let m = result.unwrap();
            prop_assert_eq!(m.ranks.len(), world_size as usize);
            prop_assert_eq!(m.total_tokens, cut.total_tokens);
            prop_assert_eq!(rank_loads(&m).iter().sum::<u64>(), m.total_tokens);
            prop_assert_eq!(&m.prompts, &cut.consumed);
            let mut entries: Vec<&BatchEntry> = Vec::new();
            for mb in m.ranks.iter().flatten() {
                prop_assert!(!mb.entries.is_empty());
                let load: u64 = mb.entries.iter().map(BatchEntry::trained_tokens).sum();
                prop_assert!(load <= micro_batch_tokens || mb.entries.len() == 1, "micro-batch of {} > M = {}", load, micro_batch_tokens);
                entries.extend(&mb.entries);
            }
            // Exactly the cut's entries, each once.
            prop_assert_eq!(entries.len(), cut.entries.len());
            for e in &cut.entries {
                prop_assert_eq!(entries.iter().filter(|x| ***x == *e).count(), 1);
            }
            prop_assert!(m.min_version <= m.max_version);
            let by_version = trained_tokens_by_version(&m);
            prop_assert_eq!(by_version.values().sum::<u64>(), m.total_tokens);
            prop_assert_eq!(by_version.keys().next(), Some(&m.min_version));
            prop_assert_eq!(by_version.keys().next_back(), Some(&m.max_version));
            // Deterministic whatever the arrival order.
            let mut shuffled = groups;
            shuffled.reverse();
            let again = plan_step(9, world_size, shuffled, &cfg).unwrap().manifest;
            prop_assert_eq!(serde_json::to_vec(&again).unwrap(), serde_json::to_vec(&m).unwrap());
        }
    }
}
