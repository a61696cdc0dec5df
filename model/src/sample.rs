//! KV-cached sampling with temperature, top-k and top-p, reporting each sampled token's
//! log-probability.
//!
//! A [`Sampler`] owns its KV cache and every scratch buffer, sized once for the model's
//! `max_seq_len`, so the sampling loop allocates nothing per token and one sampler can be
//! reused across requests and policy versions (of the same config).

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, MatLayout};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::model::{Model, Qkv, attention_forward};

/// How tokens are drawn from the model's next-token distribution.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleConfig {
    /// Softmax temperature. 1.0 (the default) samples from the model's own distribution, so
    /// the reported log-probs equal the training forward's (π_infer = π_train). 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
    /// `top_p`, renormalised. 1.0 (the default) keeps every token.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (applied before `top_p`). 0 (the default)
    /// keeps every token.
    pub top_k: usize,
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
        }
    }
}

impl SampleConfig {
    /// Checks `temperature ≥ 0` and `0 < top_p ≤ 1`, both finite.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::InvalidInput(format!(
                "temperature = {} must be a finite number ≥ 0 (1.0 samples the model's own \
                 distribution, 0 is greedy)",
                self.temperature
            )));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::InvalidInput(format!(
                "top_p = {} must be in (0, 1] (1.0 disables nucleus sampling)",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Why [`Sampler::generate`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A stop token (EOS) was sampled; it is included in the output.
    Eos,
    /// `max_new` tokens were sampled.
    MaxNewTokens,
    /// The context reached the model's `max_seq_len`; nothing more can be appended.
    ContextFull,
}

/// Most prompt tokens processed in one forward chunk; bounds the attention scratch to
/// `heads × PREFILL_CHUNK × max_seq_len` instead of `heads × max_seq_len²`.
const PREFILL_CHUNK: usize = 64;

/// Incremental decoding state for one sequence on one backend: the KV cache of the context
/// so far plus preallocated scratch.
///
/// Usage: [`Sampler::prefill`] the prompt (and any already committed response tokens, to
/// continue a trajectory started elsewhere), then [`Sampler::generate`]. Generating in several
/// calls, or prefilling the committed tokens into a fresh sampler, gives the same tokens and
/// log-probs as one uninterrupted call fed the same RNG (each sampled token consumes exactly
/// one `f64` from the RNG).
pub struct Sampler<B: Backend> {
    /// The config the buffers were sized for; models of any other config are refused.
    config: ModelConfig,
    /// Keys of every cached position, per layer (`max_seq_len × kv_dim`).
    k_cache: Vec<B::Buf>,
    /// Values of every cached position, per layer (`max_seq_len × kv_dim`).
    v_cache: Vec<B::Buf>,
    /// Residual stream of the chunk being processed (`chunk × d`).
    x: B::Buf,
    /// Normalised residual (`chunk × d`).
    h: B::Buf,
    /// Attention output (`chunk × q_dim`).
    att: B::Buf,
    /// Queries, keys and values of the chunk.
    qkv: Qkv<B>,
    /// MLP gate projection (`chunk × d_ff`).
    gate: B::Buf,
    /// MLP up projection (`chunk × d_ff`).
    up: B::Buf,
    /// MLP activation (`chunk × d_ff`).
    act: B::Buf,
    /// Attention probabilities (`heads × chunk × max_seq_len`).
    probs: B::Buf,
    /// Norm statistics (`chunk`).
    rstd: B::Buf,
    /// Next-token logits on the backend (`vocab`).
    logits: B::Buf,
    /// Next-token logits on the host.
    host_logits: Vec<f32>,
    /// Unnormalised probabilities while sampling (`vocab`).
    weights: Vec<f64>,
    /// Token ids sorted by probability, for top-k and top-p (`vocab`).
    order: Vec<u32>,
    /// `0..max_seq_len`, the position ids fed to RoPE.
    positions: Vec<u32>,
    /// The whole context: prompt, committed and sampled tokens (capacity `max_seq_len`).
    tokens: Vec<u32>,
    /// How many of `tokens` are in the KV cache; `host_logits` predict the token after them.
    cached: usize,
}

impl<B: Backend> Sampler<B> {
    /// Allocates the KV cache and scratch for `model`'s config (reusable for any model of the
    /// same config, e.g. the next policy version).
    pub fn new(model: &Model<B>) -> Result<Self> {
        let cfg = model.config().clone();
        let be = model.backend();
        let (d, s, v, ff) = (cfg.d_model, cfg.max_seq_len, cfg.vocab_size, cfg.d_ff);
        let chunk = PREFILL_CHUNK.min(s);
        let per_layer = |_| be.alloc(s * cfg.kv_dim());
        Ok(Sampler {
            k_cache: (0..cfg.n_layers).map(per_layer).collect::<Result<_>>()?,
            v_cache: (0..cfg.n_layers).map(per_layer).collect::<Result<_>>()?,
            x: be.alloc(chunk * d)?,
            h: be.alloc(chunk * d)?,
            att: be.alloc(chunk * cfg.q_dim())?,
            qkv: Qkv::alloc(&cfg, chunk, |len| be.alloc(len))?,
            gate: be.alloc(chunk * ff)?,
            up: be.alloc(chunk * ff)?,
            act: be.alloc(chunk * ff)?,
            probs: be.alloc(cfg.n_heads * chunk * s)?,
            rstd: be.alloc(chunk)?,
            logits: be.alloc(v)?,
            host_logits: vec![0.0; v],
            weights: vec![0.0; v],
            order: (0..v as u32).collect(),
            positions: (0..s as u32).collect(),
            tokens: Vec::with_capacity(s),
            cached: 0,
            config: cfg,
        })
    }

    /// The context so far (prompt, committed and sampled tokens).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forgets the context (keeps the buffers).
    pub fn reset(&mut self) {
        self.tokens.clear();
        self.cached = 0;
    }

    /// Replaces the context with `tokens` (a prompt, or a prompt plus the response tokens
    /// committed so far) and runs them through the model.
    pub fn prefill(&mut self, model: &Model<B>, tokens: &[u32]) -> Result<()> {
        self.reset();
        self.append(model, tokens)
    }

    /// Appends `tokens` to the context and runs them through the model.
    pub fn append(&mut self, model: &Model<B>, tokens: &[u32]) -> Result<()> {
        self.check_model(model)?;
        if self.tokens.len() + tokens.len() > self.config.max_seq_len {
            return Err(ModelError::InvalidInput(format!(
                "context of {} + {} tokens exceeds max_seq_len = {}",
                self.tokens.len(),
                tokens.len(),
                self.config.max_seq_len
            )));
        }
        if let Some(&t) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(ModelError::InvalidInput(format!(
                "token {t} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        self.tokens.extend_from_slice(tokens);
        self.feed(model)
    }

    /// Samples up to `max_new` tokens after the context, appending each to `out_tokens` and
    /// its log-probability to `out_logprobs`, and stops after sampling one of the `stop`
    /// tokens (EOS), after `max_new` tokens, or when the context is full.
    ///
    /// The log-probability is that of the distribution actually sampled from: the
    /// temperature-scaled, top-k/top-p-renormalised one. With the defaults (temperature 1, top-p 1)
    /// that is the model's own log π(token), equal to [`Model::forward`]'s up to float
    /// rounding. Greedy (temperature 0) reports 0 (a point mass).
    #[allow(clippy::too_many_arguments)]
    pub fn generate<R: Rng + ?Sized>(
        &mut self,
        model: &Model<B>,
        sample: &SampleConfig,
        max_new: usize,
        stop: &[u32],
        rng: &mut R,
        out_tokens: &mut Vec<u32>,
        out_logprobs: &mut Vec<f32>,
    ) -> Result<StopReason> {
        self.check_model(model)?;
        sample.validate()?;
        if self.tokens.is_empty() {
            return Err(ModelError::InvalidInput(
                "nothing to continue: prefill at least one token (e.g. BOS) first".into(),
            ));
        }
        let room = self.config.max_seq_len - self.tokens.len();
        out_tokens.reserve(max_new.min(room));
        out_logprobs.reserve(max_new.min(room));
        for _ in 0..max_new {
            if self.tokens.len() >= self.config.max_seq_len {
                return Ok(StopReason::ContextFull);
            }
            // The previously sampled token enters the KV cache only now, so that stopping
            // never pays for a forward pass whose logits nobody reads.
            self.feed(model)?;
            if let Some(bad) = self.host_logits.iter().find(|z| !z.is_finite()) {
                return Err(ModelError::InvalidInput(format!(
                    "the model produced a non-finite logit ({bad}) at position {}: its weights \
                     have diverged; load a healthy checkpoint",
                    self.tokens.len()
                )));
            }
            let (token, logprob) = self.pick(sample, rng.random::<f64>());
            self.tokens.push(token);
            out_tokens.push(token);
            out_logprobs.push(logprob);
            if stop.contains(&token) {
                return Ok(StopReason::Eos);
            }
        }
        Ok(StopReason::MaxNewTokens)
    }

    fn check_model(&self, model: &Model<B>) -> Result<()> {
        if model.config() != &self.config {
            return Err(ModelError::InvalidConfig(format!(
                "sampler was sized for {:?}, not for the model's {:?}; create a new Sampler",
                self.config,
                model.config()
            )));
        }
        Ok(())
    }

    /// Draws one token from `host_logits` with the uniform variate `u ∈ [0, 1)`.
    fn pick(&mut self, sample: &SampleConfig, u: f64) -> (u32, f32) {
        let z = &self.host_logits;
        if sample.temperature == 0.0 {
            let best = (0..z.len()).fold(0, |b, j| if z[j] > z[b] { j } else { b });
            return (best as u32, 0.0);
        }
        let inv_t = 1.0 / sample.temperature as f64;
        let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let mut total = 0.0;
        for (w, &v) in self.weights.iter_mut().zip(z) {
            *w = ((v as f64 - max) * inv_t).exp();
            total += *w;
        }
        let vocab = self.order.len();
        let top_k = if sample.top_k == 0 {
            vocab
        } else {
            sample.top_k.min(vocab)
        };
        let (candidates, mass) = if sample.top_p < 1.0 || top_k < vocab {
            let w = &self.weights;
            // Sorting a vocab-sized index array in place: no allocation. Ties go to the
            // smaller id, so the kept set is deterministic.
            let by_weight =
                |a: &u32, b: &u32| w[*b as usize].total_cmp(&w[*a as usize]).then(a.cmp(b));
            if top_k < vocab {
                self.order.select_nth_unstable_by(top_k - 1, by_weight);
            }
            self.order[..top_k].sort_unstable_by(by_weight);
            let kept_mass: f64 = self.order[..top_k].iter().map(|&t| w[t as usize]).sum();
            let want = sample.top_p as f64 * kept_mass;
            let (mut kept, mut mass) = (0, 0.0);
            for &t in &self.order[..top_k] {
                mass += w[t as usize];
                kept += 1;
                if mass >= want {
                    break;
                }
            }
            (&self.order[..kept], mass)
        } else {
            // Natural order; restore it in case a top-k/top-p call sorted it.
            for (i, o) in self.order.iter_mut().enumerate() {
                *o = i as u32;
            }
            (&self.order[..], total)
        };
        let target = u * mass;
        let mut acc = 0.0;
        // If rounding leaves `target` just past the last cumulative sum, take the last
        // candidate with non-zero weight (never one of probability 0, whose log-prob is −∞).
        let mut chosen = None;
        let mut last_positive = candidates[0];
        for &t in candidates {
            let w = self.weights[t as usize];
            if w > 0.0 {
                last_positive = t;
            }
            acc += w;
            if target < acc && w > 0.0 {
                chosen = Some(t);
                break;
            }
        }
        let chosen = chosen.unwrap_or(last_positive);
        let logprob = (self.weights[chosen as usize] / mass).ln();
        (chosen, logprob as f32)
    }

    /// Runs every token not yet in the KV cache through the model, in chunks, leaving the
    /// logits of the last one in `host_logits`.
    fn feed(&mut self, model: &Model<B>) -> Result<()> {
        if self.tokens.is_empty() {
            return Err(ModelError::InvalidInput(
                "empty context: prefill at least one token (e.g. BOS)".into(),
            ));
        }
        while self.cached < self.tokens.len() {
            let n = (self.tokens.len() - self.cached).min(PREFILL_CHUNK);
            self.forward_chunk(model, n)?;
            self.cached += n;
        }
        Ok(())
    }

    /// Forward of `n` tokens at positions `cached..cached + n`: writes their keys and values to
    /// the cache and the next-token logits of the last one to `host_logits`.
    fn forward_chunk(&mut self, model: &Model<B>, n: usize) -> Result<()> {
        let be = model.backend();
        let cfg = &self.config;
        let (d, v, qd, kvd) = (cfg.d_model, cfg.vocab_size, cfg.q_dim(), cfg.kv_dim());
        let (w, ix) = (model.weights(), model.index());
        let past = self.cached;
        be.embed(&w[ix.tok_emb], &self.tokens[past..past + n], &mut self.x, d)?;
        let positions = &self.positions[past..past + n];
        for (l, li) in ix.layers.iter().enumerate() {
            model.norm(li.norm1, &self.x, &mut self.h, &mut self.rstd, n)?;
            model.project_qkv(li, &self.h, positions, &mut self.qkv)?;
            let (chunk_at, cache_at) = (MatLayout::row_major(kvd), MatLayout::at(past * kvd, kvd));
            be.copy(
                &self.qkv.k,
                chunk_at,
                &mut self.k_cache[l],
                cache_at,
                n,
                kvd,
            )?;
            be.copy(
                &self.qkv.v,
                chunk_at,
                &mut self.v_cache[l],
                cache_at,
                n,
                kvd,
            )?;
            attention_forward(
                be,
                cfg,
                (&self.qkv.q, MatLayout::row_major(qd)),
                (&self.k_cache[l], MatLayout::row_major(kvd)),
                (&self.v_cache[l], MatLayout::row_major(kvd)),
                &mut self.probs,
                0,
                &mut self.att,
                MatLayout::row_major(qd),
                n,
                past,
            )?;
            model.linear(&li.o, &self.att, n, 1.0, &mut self.x)?;
            model.norm(li.norm2, &self.x, &mut self.h, &mut self.rstd, n)?;
            let (gate, up, act) = (&mut self.gate, &mut self.up, &mut self.act);
            model.mlp(li, &self.h, n, gate, up, act, &mut self.x)?;
        }
        model.norm(ix.final_norm, &self.x, &mut self.h, &mut self.rstd, n)?;
        // Only the last position's logits are needed; the head is `vocab × d`.
        be.gemm(
            &crate::backend::Gemm {
                m: 1,
                k: d,
                n: v,
                batch: 1,
                alpha: 1.0,
                beta: 0.0,
                a: MatLayout::at((n - 1) * d, d),
                b: MatLayout::row_major(d).t(),
                c: MatLayout::row_major(v),
            },
            &self.h,
            &w[ix.lm_head],
            &mut self.logits,
        )?;
        be.download(&self.logits, 0, &mut self.host_logits)
    }
}
