//! One rank's share of a training step: fetch, stitch, forward, loss, backward (DESIGN.md §6.4).
//!
//! The flow for rank r of step s:
//!
//! 1. [`fetch_segments`] downloads every segment the rank's micro-batches reference,
//!    concurrently, and decodes each with the segment codec (its crc32c is verified). An
//!    entry with a corrupt, truncated, missing or mismatched segment is left out of the step
//!    and recorded ([`load_rank`]); nothing of it is trained (DESIGN.md §7, invariant 3).
//! 2. [`stitch`] rebuilds each trajectory: the prompt's tokens ([`prompt_tokens`]) followed by
//!    the segments' tokens in `seq` order. The segments' log-probs are π_infer. Only the
//!    response up to `train_end` is kept: the model is causal, so a cut group's tail changes
//!    nothing before it and need not be scored.
//! 3. [`accumulate_policy`] runs one micro-batch: a forward pass under θ_old (the weights the
//!    model holds: version s), the IcePop + PPO-clip loss on the trained range
//!    `[train_start, train_end)` only, and a backward pass that *adds* to the gradient
//!    accumulators. With the constant normaliser 1/Φ, micro-batches and ranks are summed,
//!    never averaged.
//!
//! Each step does one optimizer update on its batch, so the weights being trained are θ_old
//! itself: π_θ = π_train and the PPO ratio is exactly 1 at the point the gradient is taken.
//! The clip matters only to an implementation that takes several updates per batch.
//!
//! [`apply_update`] sums nothing itself: it applies AdamW with a gradient (already summed over
//! ranks) to the host parameters and loads them into the model. [`supervised_step`] is the
//! warm-start path: cross-entropy on reference responses, one optimizer step.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::time::{Duration, Instant};

use flywheel_model::{
    Backend, ForwardCache, Gradients, Model, ModelError, Params, Sequence, TextCodec,
};
use flywheel_storage::blob::{BlobError, BlobStore};
use flywheel_storage::codec::{self, CodecError};
use flywheel_storage::{
    BatchEntry, BatchManifest, Prompt, PromptId, PromptInput, Segment, TrajectoryId,
};
use futures::StreamExt;
use thiserror::Error;

use crate::loss::{
    LossError, LossStats, PolicyLoss, PolicyTokens, SupervisedTokens, supervised_loss,
};
use crate::optim::{AdamW, OptimError, StepReport};

/// What can go wrong in a training step. Data errors name the object or trajectory at fault.
#[derive(Debug, Error)]
pub enum StepError {
    /// A segment could not be read from the object store.
    #[error("cannot read segment `{key}`: {source}")]
    Fetch {
        /// The segment's key.
        key: String,
        /// The store's error.
        #[source]
        source: BlobError,
    },
    /// A segment failed to decode (bad checksum, truncated, …): it is never trained.
    #[error("corrupt segment `{key}`: {source}; the step cannot be trained from it")]
    CorruptSegment {
        /// The segment's key.
        key: String,
        /// The codec's error.
        #[source]
        source: CodecError,
    },
    /// A segment decoded but is not the one the manifest references.
    #[error("segment `{key}` does not match the batch manifest: {reason}")]
    SegmentMismatch {
        /// The segment's key.
        key: String,
        /// What differs.
        reason: String,
    },
    /// A prompt could not be turned into tokens, or is unknown.
    #[error("prompt `{prompt}`: {reason}")]
    Prompt {
        /// The prompt.
        prompt: PromptId,
        /// What is wrong.
        reason: String,
    },
    /// A trajectory of the manifest cannot be trained as described.
    #[error("trajectory {trajectory}: {reason}")]
    Trajectory {
        /// The trajectory.
        trajectory: TrajectoryId,
        /// What is wrong.
        reason: String,
    },
    /// The manifest has no such rank.
    #[error("rank {rank} does not exist in a step of world size {world_size}")]
    NoSuchRank {
        /// The rank asked for.
        rank: u32,
        /// The manifest's world size.
        world_size: u32,
    },
    /// The model rejected an input or failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The loss rejected its inputs.
    #[error(transparent)]
    Loss(#[from] LossError),
    /// The optimizer rejected the gradients.
    #[error(transparent)]
    Optim(#[from] OptimError),
}

/// A trajectory ready for the model.
#[derive(Clone, Debug, PartialEq)]
pub struct Stitched {
    /// Which trajectory.
    pub trajectory: TrajectoryId,
    /// Prompt tokens then the response up to the end of the trained range.
    pub tokens: Vec<u32>,
    /// Index of the first response token in `tokens` (the prompt's length).
    pub response_start: usize,
    /// π_infer of each response token in `tokens` (log-probs from the segments).
    pub infer_logprobs: Vec<f32>,
    /// The trained response tokens, as indices into the response.
    pub train: Range<usize>,
    /// The trajectory's advantage.
    pub advantage: f32,
}

impl Stitched {
    /// Number of response tokens in `tokens`.
    pub fn response_len(&self) -> usize {
        self.tokens.len() - self.response_start
    }

    /// The sequence the model scores.
    pub fn sequence(&self) -> Sequence<'_> {
        Sequence {
            tokens: &self.tokens,
            response_start: self.response_start,
        }
    }
}

/// The model's view of a prompt: with [`PromptInput::Text`], the run's tokenizer's ids (BOS
/// then characters for the built-in model; exactly what the builtin engine prefills); with [`PromptInput::Tokens`], the ids as given.
pub fn prompt_tokens(prompt: &Prompt, tokenizer: &TextCodec) -> Result<Vec<u32>, StepError> {
    let bad = |reason: String| StepError::Prompt {
        prompt: prompt.id.clone(),
        reason,
    };
    let tokens = match &prompt.input {
        PromptInput::Text(text) => tokenizer
            .encode_prompt(text)
            .map_err(|e| bad(e.to_string()))?,
        PromptInput::Tokens(ids) => ids.clone(),
    };
    if tokens.is_empty() {
        return Err(bad(
            "no tokens: the model needs at least one prompt token (e.g. BOS)".into(),
        ));
    }
    Ok(tokens)
}

impl StepError {
    /// Whether the error is in the data itself (a segment corrupt, missing or not the one the
    /// manifest names; a trajectory that cannot be stitched): trying again cannot help, so the
    /// entry is dropped from its step instead.
    pub fn is_data_error(&self) -> bool {
        match self {
            StepError::Fetch { source, .. } => matches!(source, BlobError::NotFound { .. }),
            StepError::CorruptSegment { .. }
            | StepError::SegmentMismatch { .. }
            | StepError::Trajectory { .. } => true,
            _ => false,
        }
    }
}

/// A step's entry that could not be trained, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DroppedEntry {
    /// The trajectory.
    pub trajectory: TrajectoryId,
    /// Why its data is unusable.
    pub reason: String,
}

/// One rank's share of a step, fetched and stitched.
#[derive(Debug, Default)]
pub struct RankBatch {
    /// The micro-batches of the trajectories that could be stitched.
    pub micro_batches: Vec<Vec<Stitched>>,
    /// The entries dropped because their data is unusable ([`StepError::is_data_error`]).
    pub dropped: Vec<DroppedEntry>,
}

/// The segments of a rank, fetched and decoded, by key.
#[derive(Debug, Default)]
pub struct FetchedSegments {
    /// The segments that decoded.
    pub usable: HashMap<String, Segment>,
    /// The segments whose data is unusable ([`StepError::is_data_error`]), with why.
    pub unusable: HashMap<String, StepError>,
}

/// Downloads and decodes every segment referenced by `entries`, `concurrency` at a time,
/// telling unusable segments (corrupt or missing) from failures of the store: those fail the
/// fetch, naming the segment's key.
pub async fn fetch_segments<'a>(
    blob: &BlobStore,
    entries: impl IntoIterator<Item = &'a BatchEntry>,
    concurrency: usize,
) -> Result<FetchedSegments, StepError> {
    // Owned keys: the fetch futures borrow nothing, so they are `Send` for any caller
    // (rust-lang/rust#102211).
    let keys: Vec<String> = entries
        .into_iter()
        .flat_map(|e| e.segments.iter().map(|s| s.key.clone()))
        .collect();
    let fetched: Vec<(String, Result<Segment, StepError>)> = futures::stream::iter(keys)
        .map(|key| {
            let blob = blob.clone();
            async move {
                let segment = match blob.get(&key).await {
                    Ok(bytes) => {
                        codec::decode(&bytes).map_err(|source| StepError::CorruptSegment {
                            key: key.clone(),
                            source,
                        })
                    }
                    Err(source) => Err(StepError::Fetch {
                        key: key.clone(),
                        source,
                    }),
                };
                (key, segment)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut segments = FetchedSegments::default();
    for (key, segment) in fetched {
        match segment {
            Ok(s) => {
                segments.usable.insert(key, s);
            }
            Err(e) if e.is_data_error() => {
                segments.unusable.insert(key, e);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(segments)
}

/// Rebuilds one trajectory from its prompt tokens and its (fetched) segments, checking each
/// segment against the manifest's reference.
pub fn stitch(
    entry: &BatchEntry,
    prompt: &[u32],
    segments: &HashMap<String, Segment>,
) -> Result<Stitched, StepError> {
    let bad = |reason: String| StepError::Trajectory {
        trajectory: entry.trajectory.clone(),
        reason,
    };
    if prompt.is_empty() {
        return Err(bad("empty prompt".into()));
    }
    let (start, end) = (entry.train_start as usize, entry.train_end as usize);
    if start > end {
        return Err(bad(format!("train range [{start}, {end}) is reversed")));
    }
    let mut response = Vec::new();
    let mut infer = Vec::new();
    let mut refs: Vec<_> = entry.segments.iter().collect();
    refs.sort_by_key(|r| r.seq);
    for (i, r) in refs.iter().enumerate() {
        let mismatch = |reason: String| StepError::SegmentMismatch {
            key: r.key.clone(),
            reason,
        };
        if r.seq as usize != i {
            return Err(bad(format!(
                "segments are not contiguous: seq {} at {i}",
                r.seq
            )));
        }
        let seg = segments
            .get(&r.key)
            .ok_or_else(|| mismatch("not fetched".into()))?;
        if seg.trajectory != entry.trajectory {
            return Err(mismatch(format!("it belongs to {}", seg.trajectory)));
        }
        if seg.seq != r.seq {
            return Err(mismatch(format!("seq {} instead of {}", seg.seq, r.seq)));
        }
        if seg.tokens.len() != r.tokens as usize || seg.logprobs.len() != seg.tokens.len() {
            return Err(mismatch(format!(
                "{} tokens and {} log-probs, the manifest says {}",
                seg.tokens.len(),
                seg.logprobs.len(),
                r.tokens
            )));
        }
        response.extend_from_slice(&seg.tokens);
        infer.extend_from_slice(&seg.logprobs);
        if response.len() >= end {
            break; // the rest lies beyond the trained range
        }
    }
    if end > response.len() {
        return Err(bad(format!(
            "train range [{start}, {end}) exceeds the {} response tokens",
            response.len()
        )));
    }
    response.truncate(end);
    infer.truncate(end);
    let mut tokens = Vec::with_capacity(prompt.len() + end);
    tokens.extend_from_slice(prompt);
    tokens.extend_from_slice(&response);
    Ok(Stitched {
        trajectory: entry.trajectory.clone(),
        tokens,
        response_start: prompt.len(),
        infer_logprobs: infer,
        train: start..end,
        advantage: entry.advantage,
    })
}

/// Fetches and stitches rank `rank`'s micro-batches of `manifest`. `prompts` maps each prompt
/// of the rank to its tokens ([`prompt_tokens`]). An entry whose data is unusable (a segment
/// corrupt, missing or not the manifest's; see [`StepError::is_data_error`]) is left out and
/// listed in [`RankBatch::dropped`]: it is never trained, and the rest of the step is. Any
/// other failure (the store unreachable) fails the rank, which is tried again.
pub async fn load_rank(
    blob: &BlobStore,
    manifest: &BatchManifest,
    rank: u32,
    prompts: &BTreeMap<PromptId, Vec<u32>>,
    concurrency: usize,
) -> Result<RankBatch, StepError> {
    let micro = manifest
        .ranks
        .get(rank as usize)
        .filter(|_| rank < manifest.world_size)
        .ok_or(StepError::NoSuchRank {
            rank,
            world_size: manifest.world_size,
        })?;
    let entries = micro.iter().flat_map(|m| &m.entries);
    let segments = fetch_segments(blob, entries, concurrency).await?;
    let mut batch = RankBatch::default();
    for mb in micro {
        let mut stitched = Vec::with_capacity(mb.entries.len());
        for e in &mb.entries {
            let prompt = prompts
                .get(&e.trajectory.prompt)
                .ok_or_else(|| StepError::Prompt {
                    prompt: e.trajectory.prompt.clone(),
                    reason: "unknown to the trainer (not registered?)".into(),
                })?;
            let unusable = e
                .segments
                .iter()
                .find_map(|r| segments.unusable.get(&r.key));
            let unusable_reason = match unusable {
                Some(err) => Some(err.to_string()),
                None => match stitch(e, prompt, &segments.usable) {
                    Ok(trajectory) => {
                        stitched.push(trajectory);
                        None
                    }
                    Err(err) if err.is_data_error() => Some(err.to_string()),
                    Err(err) => return Err(err),
                },
            };
            if let Some(reason) = unusable_reason {
                batch.dropped.push(DroppedEntry {
                    trajectory: e.trajectory.clone(),
                    reason,
                });
            }
        }
        batch.micro_batches.push(stitched);
    }
    Ok(batch)
}

/// Additive statistics of micro-batches, ranks and steps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TrainStats {
    /// The loss terms, masked and clipped counts, Σ|log k|.
    pub loss: LossStats,
    /// Σ of the predictive entropy over trained tokens (nats).
    pub sum_entropy: f64,
    /// Sequences processed.
    pub sequences: u64,
}

impl TrainStats {
    /// Adds `other` to these.
    pub fn merge(&mut self, other: &TrainStats) {
        self.loss.merge(&other.loss);
        self.sum_entropy += other.sum_entropy;
        self.sequences += other.sequences;
    }

    /// Mean entropy over trained tokens (0 when nothing was trained).
    pub fn mean_entropy(&self) -> f64 {
        if self.loss.tokens_trained == 0 {
            0.0
        } else {
            self.sum_entropy / self.loss.tokens_trained as f64
        }
    }
}

/// The forward pass over the sequences of `items`; `None` for an empty micro-batch.
fn forward<'a, B: Backend, T>(
    model: &Model<B>,
    items: &'a [T],
    sequence: impl Fn(&'a T) -> Sequence<'a>,
) -> Result<Option<ForwardCache<B>>, StepError> {
    if items.is_empty() {
        return Ok(None);
    }
    let seqs: Vec<Sequence<'a>> = items.iter().map(sequence).collect();
    Ok(Some(model.forward(&seqs)?))
}

/// Runs one micro-batch of the policy loss: forward under the model's weights (θ_old), IcePop
/// loss on the trained ranges, backward *adding* to `grads`.
pub fn accumulate_policy<B: Backend>(
    model: &Model<B>,
    loss: &PolicyLoss,
    micro: &[Stitched],
    grads: &mut Gradients<B>,
) -> Result<TrainStats, StepError> {
    let Some(cache) = forward(model, micro, Stitched::sequence)? else {
        return Ok(TrainStats::default());
    };
    let n = cache.logprobs().len();
    let (mut infer, mut adv, mut trained) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for s in micro {
        infer.extend_from_slice(&s.infer_logprobs);
        adv.extend(std::iter::repeat_n(s.advantage, s.response_len()));
        trained.extend((0..s.response_len()).map(|j| s.train.contains(&j)));
    }
    // One update per batch: the trained weights are θ_old, so new = old.
    let logprobs = cache.logprobs();
    let out = loss.compute(&PolicyTokens {
        new_logprobs: logprobs,
        old_logprobs: logprobs,
        infer_logprobs: &infer,
        advantages: &adv,
        trained: &trained,
    })?;
    model.backward(&cache, &out.grad, None, grads)?;
    Ok(TrainStats {
        loss: out.stats,
        sum_entropy: sum_trained(cache.entropies(), &trained),
        sequences: micro.len() as u64,
    })
}

/// Σ of `values` where `trained`.
fn sum_trained(values: &[f32], trained: &[bool]) -> f64 {
    values
        .iter()
        .zip(trained)
        .filter(|(_, t)| **t)
        .map(|(v, _)| f64::from(*v))
        .sum()
}

/// A reference solution for supervised warm-starting: prompt tokens then the reference
/// response (ending with EOS if the model should learn to stop).
#[derive(Clone, Debug, PartialEq)]
pub struct SupervisedExample {
    /// Prompt then reference response tokens.
    pub tokens: Vec<u32>,
    /// Index of the first response token (≥ 1).
    pub response_start: usize,
}

impl SupervisedExample {
    /// The sequence the model scores.
    pub fn sequence(&self) -> Sequence<'_> {
        Sequence {
            tokens: &self.tokens,
            response_start: self.response_start,
        }
    }

    /// `prompt` as the model sees prompts (the codec's, e.g. BOS first), then `response` and
    /// EOS.
    pub fn from_text(
        tokenizer: &TextCodec,
        prompt: &str,
        response: &str,
    ) -> Result<SupervisedExample, ModelError> {
        let mut tokens = tokenizer.encode_prompt(prompt)?;
        let response_start = tokens.len();
        tokens.extend(tokenizer.encode_response(response)?);
        Ok(SupervisedExample {
            tokens,
            response_start,
        })
    }
}

/// Runs one micro-batch of the supervised loss (cross-entropy on every response token),
/// normalised by `normalizer` (the step's total response tokens), adding to `grads`.
pub fn accumulate_supervised<B: Backend>(
    model: &Model<B>,
    examples: &[SupervisedExample],
    normalizer: u64,
    grads: &mut Gradients<B>,
) -> Result<TrainStats, StepError> {
    let Some(cache) = forward(model, examples, SupervisedExample::sequence)? else {
        return Ok(TrainStats::default());
    };
    let trained = vec![true; cache.logprobs().len()];
    let out = supervised_loss(
        &SupervisedTokens {
            new_logprobs: cache.logprobs(),
            trained: &trained,
        },
        normalizer,
    )?;
    model.backward(&cache, &out.grad, None, grads)?;
    Ok(TrainStats {
        loss: out.stats,
        sum_entropy: sum_trained(cache.entropies(), &trained),
        sequences: examples.len() as u64,
    })
}

/// Applies one AdamW step with `grads` (the step's summed gradient) to `params`, then loads
/// the new weights into `model`.
pub fn apply_update<B: Backend>(
    model: &mut Model<B>,
    params: &mut Params,
    optimizer: &mut AdamW,
    grads: &Params,
) -> Result<StepReport, StepError> {
    params.check_same_layout(grads)?;
    let report = optimizer.step_params(params, grads)?;
    model.load_params(params)?;
    Ok(report)
}

/// What one optimizer step did, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepMetrics {
    /// The step's loss (sum over ranks and micro-batches; already normalised).
    pub loss: f64,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
    /// Factor the gradient was scaled by (1 when not clipped).
    pub clip_scale: f64,
    /// Mean predictive entropy over trained tokens.
    pub entropy: f64,
    /// Fraction of trained tokens IcePop masked out.
    pub masked_fraction: f64,
    /// Fraction of trained tokens the PPO clip removed.
    pub clip_fraction: f64,
    /// Mean |log k| (training/inference discrepancy) over trained tokens.
    pub mean_abs_log_k: f64,
    /// Tokens trained.
    pub tokens_trained: u64,
    /// Wall time of the step.
    pub step_time: Duration,
}

impl StepMetrics {
    /// Combines the step's statistics, the optimizer's report and the elapsed time.
    pub fn new(stats: &TrainStats, report: &StepReport, step_time: Duration) -> Self {
        StepMetrics {
            loss: stats.loss.loss,
            grad_norm: report.grad_norm,
            clip_scale: report.clip_scale,
            entropy: stats.mean_entropy(),
            masked_fraction: stats.loss.masked_fraction(),
            clip_fraction: stats.loss.clip_fraction(),
            mean_abs_log_k: stats.loss.mean_abs_log_k(),
            tokens_trained: stats.loss.tokens_trained,
            step_time,
        }
    }
}

/// One supervised (cross-entropy) optimizer step on `examples`, packed into micro-batches of
/// at most `micro_batch_tokens` tokens: the warm start of a policy from reference solutions.
pub fn supervised_step<B: Backend>(
    model: &mut Model<B>,
    params: &mut Params,
    optimizer: &mut AdamW,
    examples: &[SupervisedExample],
    micro_batch_tokens: usize,
) -> Result<StepMetrics, StepError> {
    let started = Instant::now();
    let normalizer: u64 = examples
        .iter()
        .map(|e| e.tokens.len().saturating_sub(e.response_start) as u64)
        .sum();
    let mut grads = model.new_gradients()?;
    let mut stats = TrainStats::default();
    let mut start = 0;
    while start < examples.len() {
        let mut end = start;
        let mut tokens = 0;
        while end < examples.len()
            && (end == start || tokens + examples[end].tokens.len() <= micro_batch_tokens)
        {
            tokens += examples[end].tokens.len();
            end += 1;
        }
        let s = accumulate_supervised(model, &examples[start..end], normalizer.max(1), &mut grads)?;
        stats.merge(&s);
        start = end;
    }
    let grads = model.gradients_to_params(&grads)?;
    let report = apply_update(model, params, optimizer, &grads)?;
    Ok(StepMetrics::new(&stats, &report, started.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use flywheel_model::ModelConfig;
    use flywheel_model::Tokenizer;
    use flywheel_storage::{FinishReason, MicroBatch, SegmentRef, keys};

    use crate::loss::LossConfig;
    use crate::optim::AdamWConfig;

    fn traj(p: &str, k: u32) -> TrajectoryId {
        TrajectoryId {
            prompt: PromptId::from(p),
            sample: k,
        }
    }

    /// Writes a trajectory's response as segments of `seg_len` tokens; returns their refs.
    async fn put_segments(
        blob: &BlobStore,
        t: &TrajectoryId,
        tokens: &[u32],
        logprobs: &[f32],
        seg_len: usize,
    ) -> Vec<SegmentRef> {
        let mut refs = Vec::new();
        for (seq, (tk, lp)) in tokens
            .chunks(seg_len)
            .zip(logprobs.chunks(seg_len))
            .enumerate()
        {
            let seg = Segment {
                trajectory: t.clone(),
                seq: seq as u32,
                version: 0,
                lease_epoch: 1,
                tokens: tk.to_vec(),
                logprobs: lp.to_vec(),
                finish: if (seq + 1) * seg_len >= tokens.len() {
                    FinishReason::Eos
                } else {
                    FinishReason::None
                },
            };
            let key = keys::segment("run", &t.prompt, t.sample, seq as u32, 1);
            blob.put(&key, codec::encode(&seg).unwrap()).await.unwrap();
            refs.push(SegmentRef {
                seq: seq as u32,
                key,
                tokens: tk.len() as u32,
                version: 0,
            });
        }
        refs
    }

    fn entry(
        t: TrajectoryId,
        segments: Vec<SegmentRef>,
        train: Range<u32>,
        adv: f32,
    ) -> BatchEntry {
        BatchEntry {
            trajectory: t,
            segments,
            train_start: train.start,
            train_end: train.end,
            advantage: adv,
        }
    }

    fn manifest(ranks: Vec<Vec<MicroBatch>>) -> BatchManifest {
        BatchManifest {
            step: 0,
            token_budget: 64,
            world_size: ranks.len() as u32,
            ranks,
            total_tokens: 0,
            prompts: vec![],
            min_version: 0,
            max_version: 0,
        }
    }

    fn tiny() -> (Tokenizer, Params) {
        let tok = Tokenizer::arithmetic();
        let mut cfg = ModelConfig::tiny(tok.vocab_size());
        cfg.d_model = 16;
        cfg.d_ff = 32;
        cfg.n_heads = 2;
        cfg.max_seq_len = 32;
        (tok.clone(), Params::init_scaled(&cfg, 3, 5.0).unwrap())
    }

    #[tokio::test]
    async fn stitching_orders_segments_and_cuts_at_the_trained_end() {
        let blob = BlobStore::open("memory://").unwrap();
        let t = traj("p", 0);
        let resp: Vec<u32> = (4..14).collect();
        let lps: Vec<f32> = (0..10).map(|i| -0.1 * i as f32).collect();
        let mut refs = put_segments(&blob, &t, &resp, &lps, 4).await;
        refs.reverse(); // the manifest order does not matter, seq does
        let e = entry(t, refs, 2..7, 0.5);
        let segs = fetch_segments(&blob, [&e], 2).await.unwrap().usable;
        let s = stitch(&e, &[1, 2, 3], &segs).unwrap();
        assert_eq!(s.tokens, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(s.response_start, 3);
        assert_eq!(s.infer_logprobs, &lps[..7]);
        assert_eq!(s.train, 2..7);

        let mut beyond = e.clone();
        beyond.train_end = 11;
        assert!(matches!(
            stitch(&beyond, &[1], &segs),
            Err(StepError::Trajectory { .. })
        ));
    }

    #[tokio::test]
    async fn corrupt_missing_and_mismatched_segments_are_unusable_naming_the_key() {
        let blob = BlobStore::open("memory://").unwrap();
        let t = traj("p", 0);
        let refs = put_segments(&blob, &t, &[4, 5, 6, 7], &[-0.5; 4], 2).await;
        let e = entry(t.clone(), refs.clone(), 0..4, 1.0);

        let mut bytes = blob.get(&refs[1].key).await.unwrap().to_vec();
        let last = bytes.len() - 6;
        bytes[last] ^= 0x40;
        blob.put(&refs[1].key, Bytes::from(bytes)).await.unwrap();
        let fetched = fetch_segments(&blob, [&e], 4).await.unwrap();
        match fetched.unusable.get(&refs[1].key) {
            Some(StepError::CorruptSegment { key, .. }) => assert_eq!(key, &refs[1].key),
            other => panic!("expected a corrupt segment, got {other:?}"),
        }
        assert_eq!(fetched.usable.len(), 1);

        blob.delete(&refs[1].key).await.unwrap();
        let fetched = fetch_segments(&blob, [&e], 4).await.unwrap();
        match fetched.unusable.get(&refs[1].key) {
            Some(StepError::Fetch { key, .. }) => assert_eq!(key, &refs[1].key),
            other => panic!("expected a missing segment, got {other:?}"),
        }

        // A segment of another trajectory under a referenced key.
        let other = put_segments(&blob, &traj("q", 1), &[4, 5], &[-0.5; 2], 2).await;
        let mut wrong = e.clone();
        wrong.segments = vec![SegmentRef {
            key: other[0].key.clone(),
            ..refs[0].clone()
        }];
        wrong.train_end = 2;
        let segs = fetch_segments(&blob, [&wrong], 4).await.unwrap().usable;
        assert!(matches!(
            stitch(&wrong, &[1], &segs),
            Err(StepError::SegmentMismatch { .. })
        ));
    }

    #[test]
    fn prompt_tokens_add_bos_to_text_and_keep_ids() {
        let chars = Tokenizer::arithmetic();
        let tok = TextCodec::Chars(chars.clone());
        let mut p = Prompt {
            id: PromptId::from("p"),
            input: PromptInput::Text("1+2=".into()),
            verifier: flywheel_storage::VerifierSpec::ExactMatch { answer: "3".into() },
            group_size: 2,
            metadata: Default::default(),
        };
        assert_eq!(
            prompt_tokens(&p, &tok).unwrap(),
            chars.encode_prompt("1+2=").unwrap()
        );
        p.input = PromptInput::Text("héllo".into());
        assert!(matches!(
            prompt_tokens(&p, &tok),
            Err(StepError::Prompt { .. })
        ));
        p.input = PromptInput::Tokens(vec![7, 8]);
        assert_eq!(prompt_tokens(&p, &tok).unwrap(), [7, 8]);
        p.input = PromptInput::Tokens(vec![]);
        assert!(prompt_tokens(&p, &tok).is_err());

        // A checkpoint's tokenizer: its ids, exactly as transformers encodes the text.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../model/tests/fixtures/hf/qwen2");
        let hf = TextCodec::open(dir.to_str().unwrap(), "").unwrap();
        p.input = PromptInput::Text("What is 12 + 30?".into());
        let ids = prompt_tokens(&p, &hf).unwrap();
        assert_eq!(hf.decode(&ids).unwrap(), "What is 12 + 30?");
        assert!(ids.len() < 16, "BPE merges, not characters: {ids:?}");
    }

    /// Stitched trajectories for the policy tests: two prompts, four trajectories.
    async fn rank_batch(blob: &BlobStore) -> (BatchManifest, BTreeMap<PromptId, Vec<u32>>) {
        let mut entries = Vec::new();
        for (i, (p, k, adv)) in [
            ("a", 0, 1.0f32),
            ("a", 1, -1.0),
            ("b", 0, 0.5),
            ("b", 1, -0.5),
        ]
        .into_iter()
        .enumerate()
        {
            let t = traj(p, k);
            let resp: Vec<u32> = (0..6).map(|j| 3 + ((i * 7 + j * 3) % 12) as u32).collect();
            // Log-probs near the model's so that k stays inside [α, β] for most tokens, one
            // far off so that it is masked.
            let mut lps = vec![-2.6f32; 6];
            lps[5] = -0.01;
            let refs = put_segments(blob, &t, &resp, &lps, 4).await;
            entries.push(entry(t, refs, 1..6, adv));
        }
        let ranks = vec![
            vec![
                MicroBatch {
                    entries: entries[..2].to_vec(),
                },
                MicroBatch {
                    entries: entries[2..3].to_vec(),
                },
            ],
            vec![MicroBatch {
                entries: entries[3..].to_vec(),
            }],
        ];
        let prompts = [("a", vec![1u32, 5, 6]), ("b", vec![1u32, 7])]
            .into_iter()
            .map(|(p, t)| (PromptId::from(p), t))
            .collect();
        (manifest(ranks), prompts)
    }

    #[tokio::test]
    async fn rank_gradients_sum_to_the_single_batch_gradient() {
        let blob = BlobStore::open("memory://").unwrap();
        let (m, prompts) = rank_batch(&blob).await;
        let (_, params) = tiny();
        let model = Model::cpu(&params).unwrap();
        let loss = PolicyLoss::new(LossConfig {
            token_budget: 64,
            ..LossConfig::default()
        })
        .unwrap();

        // Rank by rank, micro-batch by micro-batch.
        let mut total = TrainStats::default();
        let mut summed = Params::zeros(params.config()).unwrap();
        for r in 0..2 {
            let rank = load_rank(&blob, &m, r, &prompts, 3).await.unwrap();
            assert!(rank.dropped.is_empty());
            let mut g = model.new_gradients().unwrap();
            for mb in &rank.micro_batches {
                total.merge(&accumulate_policy(&model, &loss, mb, &mut g).unwrap());
            }
            let g = model.gradients_to_params(&g).unwrap();
            for (s, t) in summed.tensors_mut().iter_mut().zip(g.tensors()) {
                s.data.iter_mut().zip(&t.data).for_each(|(a, b)| *a += b);
            }
        }
        assert_eq!(total.loss.tokens_trained, 20);
        assert_eq!(total.sequences, 4);
        assert!(
            total.loss.tokens_masked >= 4,
            "the far-off tokens are masked"
        );
        assert!(total.loss.tokens_masked < 20);
        assert!(total.mean_entropy() > 0.0);

        // Everything in one micro-batch gives the same loss and gradient.
        let mut all: Vec<Stitched> = Vec::new();
        for r in 0..2 {
            for mb in load_rank(&blob, &m, r, &prompts, 3)
                .await
                .unwrap()
                .micro_batches
            {
                all.extend(mb);
            }
        }
        let mut g = model.new_gradients().unwrap();
        let one = accumulate_policy(&model, &loss, &all, &mut g).unwrap();
        let g = model.gradients_to_params(&g).unwrap();
        assert!((one.loss.loss - total.loss.loss).abs() < 1e-9);
        assert_eq!(one.loss.tokens_masked, total.loss.tokens_masked);
        let mut norm = 0.0f64;
        for (a, b) in g.tensors().iter().zip(summed.tensors()) {
            for (x, y) in a.data.iter().zip(&b.data) {
                assert!(
                    (x - y).abs() <= 1e-6 + 1e-4 * x.abs(),
                    "{}: {x} vs {y}",
                    a.name
                );
                norm += f64::from(*x).powi(2);
            }
        }
        assert!(norm > 0.0, "the loss has a gradient");

        assert!(matches!(
            load_rank(&blob, &m, 2, &prompts, 3).await,
            Err(StepError::NoSuchRank { .. })
        ));
    }

    #[tokio::test]
    async fn a_policy_step_raises_the_logprob_of_positive_advantage_tokens() {
        let blob = BlobStore::open("memory://").unwrap();
        let t = traj("a", 0);
        let resp = vec![5u32, 9, 4, 11];
        let (_, mut params) = tiny();
        let mut model = Model::cpu(&params).unwrap();
        let prompt = vec![1u32, 6];
        let full = [prompt.clone(), resp.clone()].concat();
        let score = |model: &Model| {
            let seq = Sequence {
                tokens: &full,
                response_start: 2,
            };
            model.forward(&[seq]).unwrap().logprobs().to_vec()
        };
        let before = score(&model);
        // π_infer = π_train: k = 1, nothing masked.
        let refs = put_segments(&blob, &t, &resp, &before, 2).await;
        let m = manifest(vec![vec![MicroBatch {
            entries: vec![entry(t, refs, 0..4, 1.0)],
        }]]);
        let prompts = [(PromptId::from("a"), prompt)].into_iter().collect();
        let rank = load_rank(&blob, &m, 0, &prompts, 2)
            .await
            .unwrap()
            .micro_batches;
        let loss = PolicyLoss::new(LossConfig {
            token_budget: 4,
            ..LossConfig::default()
        })
        .unwrap();
        let mut g = model.new_gradients().unwrap();
        let stats = accumulate_policy(&model, &loss, &rank[0], &mut g).unwrap();
        assert_eq!(stats.loss.tokens_masked, 0);
        assert!(stats.loss.mean_abs_log_k() < 1e-6);
        let g = model.gradients_to_params(&g).unwrap();
        let mut opt = AdamW::new(AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        })
        .unwrap();
        let report = apply_update(&mut model, &mut params, &mut opt, &g).unwrap();
        assert!(report.grad_norm > 0.0);
        let after = score(&model);
        let (sb, sa): (f32, f32) = (before.iter().sum(), after.iter().sum());
        assert!(
            sa > sb,
            "log-likelihood of the rewarded response rises: {sb} → {sa}"
        );
    }

    #[test]
    fn supervised_steps_lower_the_cross_entropy() {
        let (tok, mut params) = tiny();
        let mut model = Model::cpu(&params).unwrap();
        let examples: Vec<SupervisedExample> = ["1+2=3", "2+2=4", "3+4=7"]
            .iter()
            .map(|s| {
                let (p, a) = s.split_at(4);
                let mut tokens = tok.encode_prompt(p).unwrap();
                let response_start = tokens.len();
                tokens.extend(tok.encode(a).unwrap());
                tokens.push(Tokenizer::EOS);
                SupervisedExample {
                    tokens,
                    response_start,
                }
            })
            .collect();
        let mut opt = AdamW::new(AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        })
        .unwrap();
        let first = supervised_step(&mut model, &mut params, &mut opt, &examples, 8).unwrap();
        assert_eq!(first.tokens_trained, 6);
        let mut last = first;
        for _ in 0..20 {
            last = supervised_step(&mut model, &mut params, &mut opt, &examples, 8).unwrap();
        }
        assert!(
            last.loss < first.loss * 0.5,
            "{} → {}",
            first.loss,
            last.loss
        );
        assert_eq!(opt.step_count(), 21);
    }
}
