//! The decoder-only transformer of the Llama / Qwen2 / Qwen3 family: weights on a backend, the
//! training forward pass (log-probs and entropies of response tokens) and its backward pass.
//!
//! One block, for every architecture (the flags of [`ModelConfig`] switch its parts):
//! `h1 = rms(x)`, `q, k, v = h1·Wᵀ (+b)`, optional per-head RMSNorm of q and k, RoPE on q and k,
//! causal grouped-query attention, `x += att·Woᵀ (+b)`; `h2 = rms(x)`,
//! `x += (silu(h2·Wgᵀ) ⊙ h2·Wuᵀ)·Wdᵀ`. Then a final RMSNorm and the LM head.

use std::ops::Range;
use std::sync::Arc;

use crate::backend::{Backend, Gemm, IGNORE_TARGET, MatLayout};
use crate::config::ModelConfig;
use crate::cpu::CpuBackend;
use crate::error::{ModelError, Result};
use crate::params::{LayerIndex, Linear, ParamIndex, Params, param_index};
use crate::pool::BufPool;

/// The model's weights, resident on a backend, ready for forward, backward and sampling.
///
/// Host-side [`Params`] stay the canonical copy (initialised, optimised, published and loaded
/// as named tensors); [`Model::load_params`] refreshes the backend copy after an update.
pub struct Model<B: Backend = CpuBackend> {
    /// The shape of the model.
    config: ModelConfig,
    /// Where the math runs.
    backend: B,
    /// Positions of each named tensor in `weights`.
    index: ParamIndex,
    /// Names and shapes, in the stable order (for downloading back to [`Params`]).
    layout: Params,
    /// One backend buffer per tensor, in the stable order.
    weights: Vec<B::Buf>,
    /// RoPE cosines, `max_seq_len × head_dim/2`, computed once from the config.
    rope_cos: B::Buf,
    /// RoPE sines, same layout.
    rope_sin: B::Buf,
    /// Activation and scratch buffers of finished passes, reused by the next ones.
    pool: Arc<BufPool<B>>,
}

/// Gradient accumulators on the backend, one buffer per parameter tensor (stable order).
/// [`Model::backward`] adds to them; [`Model::gradients_to_params`] brings them to the host.
pub struct Gradients<B: Backend = CpuBackend> {
    /// One buffer per parameter, same order and length as the model's weights.
    bufs: Vec<B::Buf>,
}

impl<B: Backend> Gradients<B> {
    /// One buffer per parameter, in the model's stable order.
    pub fn bufs(&self) -> &[B::Buf] {
        &self.bufs
    }
}

/// One sequence to score: the prompt followed by the response. The model returns the
/// log-probability (and entropy) of every response token `tokens[response_start..]`, each
/// predicted from the tokens before it.
#[derive(Clone, Copy, Debug)]
pub struct Sequence<'a> {
    /// Prompt then response token ids; at most `max_seq_len` of them.
    pub tokens: &'a [u32],
    /// Index of the first response token; at least 1 (the first token has nothing to be
    /// predicted from) and at most `tokens.len()` (an empty response).
    pub response_start: usize,
}

/// Where one sequence lives inside a packed batch.
#[derive(Clone, Debug)]
struct SeqMeta {
    /// First row of the sequence in the packed activations.
    row0: usize,
    /// Number of tokens (rows).
    len: usize,
    /// Range of its response tokens in the flat log-prob output.
    out: Range<usize>,
    /// Offset of its attention probabilities (`heads × len × len`) in each layer's buffer.
    p_off: usize,
}

/// The attention inputs of `rows` positions: queries and keys after their norms and RoPE,
/// values, and what the QK norms' backward needs. Training keeps one per block; the sampler
/// reuses one as scratch.
pub(crate) struct Qkv<B: Backend> {
    /// Queries, `rows × q_dim`.
    pub q: B::Buf,
    /// Keys, `rows × kv_dim`.
    pub k: B::Buf,
    /// Values, `rows × kv_dim`.
    pub v: B::Buf,
    /// With QK norms: the projections before them and their per-head reciprocal RMS.
    pub pre_norm: Option<QkPreNorm<B>>,
}

/// Queries and keys before the per-head RMSNorm (Qwen3), for its backward pass.
pub(crate) struct QkPreNorm<B: Backend> {
    /// Query projections, `rows × q_dim`.
    q: B::Buf,
    /// Key projections, `rows × kv_dim`.
    k: B::Buf,
    /// Reciprocal RMS of every query head (`rows × n_heads`).
    q_rstd: B::Buf,
    /// Reciprocal RMS of every key head (`rows × n_kv_heads`).
    k_rstd: B::Buf,
}

impl<B: Backend> Qkv<B> {
    /// Buffers for `rows` positions of `cfg`, each from `alloc` (zero-filled, given a length).
    pub(crate) fn alloc(
        cfg: &ModelConfig,
        rows: usize,
        alloc: impl Fn(usize) -> Result<B::Buf>,
    ) -> Result<Self> {
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let pre_norm = if cfg.qk_norm {
            Some(QkPreNorm {
                q: alloc(rows * qd)?,
                k: alloc(rows * kvd)?,
                q_rstd: alloc(rows * cfg.n_heads)?,
                k_rstd: alloc(rows * cfg.kv_heads())?,
            })
        } else {
            None
        };
        Ok(Qkv {
            q: alloc(rows * qd)?,
            k: alloc(rows * kvd)?,
            v: alloc(rows * kvd)?,
            pre_norm,
        })
    }

    /// Every buffer, for the pool.
    fn into_bufs(self) -> impl Iterator<Item = B::Buf> {
        let pre = self
            .pre_norm
            .into_iter()
            .flat_map(|p| [p.q, p.k, p.q_rstd, p.k_rstd]);
        [self.q, self.k, self.v].into_iter().chain(pre)
    }
}

/// Activations of one block saved for the backward pass (rows × width, packed over sequences).
struct LayerActs<B: Backend> {
    /// Residual stream entering the block.
    x_in: B::Buf,
    /// Reciprocal RMS of the attention pre-norm's rows.
    rstd1: B::Buf,
    /// Normalised input of attention.
    h1: B::Buf,
    /// Queries, keys and values.
    qkv: Qkv<B>,
    /// Attention probabilities, per sequence `heads × len × len`.
    probs: B::Buf,
    /// Attention output before the output projection (`rows × q_dim`).
    att: B::Buf,
    /// Residual stream after attention.
    x_mid: B::Buf,
    /// Reciprocal RMS of the MLP pre-norm's rows.
    rstd2: B::Buf,
    /// Normalised input of the MLP.
    h2: B::Buf,
    /// Gate projection (`rows × d_ff`).
    gate: B::Buf,
    /// Up projection (`rows × d_ff`).
    up: B::Buf,
    /// SwiGLU output, silu(gate) ⊙ up.
    act: B::Buf,
}

impl<B: Backend> LayerActs<B> {
    /// Every buffer, for the pool.
    fn into_bufs(self) -> impl Iterator<Item = B::Buf> {
        [
            self.x_in, self.rstd1, self.h1, self.probs, self.att, self.x_mid, self.rstd2, self.h2,
            self.gate, self.up, self.act,
        ]
        .into_iter()
        .chain(self.qkv.into_bufs())
    }
}

/// The activations a forward pass saves for the backward pass.
struct Activations<B: Backend> {
    /// Saved activations per block.
    layers: Vec<LayerActs<B>>,
    /// Residual stream after the last block.
    x_final: B::Buf,
    /// Reciprocal RMS of the final norm's rows.
    rstd_f: B::Buf,
    /// Normalised final hidden states.
    hf: B::Buf,
    /// LM-head outputs (`rows × vocab`).
    logits: B::Buf,
}

impl<B: Backend> Activations<B> {
    /// Every buffer, for the pool.
    fn into_bufs(self) -> impl Iterator<Item = B::Buf> {
        [self.x_final, self.rstd_f, self.hf, self.logits]
            .into_iter()
            .chain(self.layers.into_iter().flat_map(LayerActs::into_bufs))
    }
}

/// The result of [`Model::forward`]: response log-probs and entropies, and everything the
/// backward pass needs.
pub struct ForwardCache<B: Backend = CpuBackend> {
    /// Layout of each sequence in the batch.
    seqs: Vec<SeqMeta>,
    /// Total packed rows.
    rows: usize,
    /// Input token of each row.
    tokens: Vec<u32>,
    /// Position of each row within its sequence.
    positions: Vec<u32>,
    /// Next token each row is scored against, or [`IGNORE_TARGET`].
    targets: Vec<u32>,
    /// Row of each flat response output.
    out_rows: Vec<usize>,
    /// The saved activations; taken only when the cache is dropped.
    acts: Option<Activations<B>>,
    /// log π(token) of every response token, sequence after sequence.
    logprobs: Vec<f32>,
    /// Entropy of the predictive distribution at every response token.
    entropies: Vec<f32>,
    /// The model's pool, which gets the activations back when the cache is dropped.
    pool: Arc<BufPool<B>>,
}

impl<B: Backend> Drop for ForwardCache<B> {
    fn drop(&mut self) {
        if let Some(acts) = self.acts.take() {
            self.pool.give(acts.into_bufs());
        }
    }
}

impl<B: Backend> ForwardCache<B> {
    /// Log-probabilities of all response tokens, sequence after sequence.
    pub fn logprobs(&self) -> &[f32] {
        &self.logprobs
    }

    /// Entropies (nats) of the distributions the response tokens were scored under.
    pub fn entropies(&self) -> &[f32] {
        &self.entropies
    }

    /// Number of sequences in the batch.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// The range of sequence `i`'s response tokens in [`Self::logprobs`] (and in the gradient
    /// slices given to [`Model::backward`]); `None` if the batch has no sequence `i`.
    pub fn sequence_range(&self, i: usize) -> Option<Range<usize>> {
        self.seqs.get(i).map(|m| m.out.clone())
    }

    /// Log-probabilities of sequence `i`'s response tokens.
    pub fn sequence_logprobs(&self, i: usize) -> Option<&[f32]> {
        Some(&self.logprobs[self.sequence_range(i)?])
    }

    /// Entropies at sequence `i`'s response tokens.
    pub fn sequence_entropies(&self, i: usize) -> Option<&[f32]> {
        Some(&self.entropies[self.sequence_range(i)?])
    }

    fn acts(&self) -> Result<&Activations<B>> {
        self.acts
            .as_ref()
            .ok_or_else(|| ModelError::InvalidInput("forward cache already released".into()))
    }
}

/// The causal grouped-query attention of `n` queries at positions `past..past + n` over
/// `past + n` keys: `probs` gets softmax(q·kᵀ/√hd) per query head at `p_off`
/// (`heads × n × keys`), `out` gets probs · v with heads side by side.
///
/// `q`, `k`, `v` are the head-0 views (row-major, `hd` columns); head `h` is `h·hd` columns
/// further, and query head `h` reads key/value head `h / group`. Shared by training and
/// sampling so both compute exactly the same thing.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_forward<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    q: (&B::Buf, MatLayout),
    k: (&B::Buf, MatLayout),
    v: (&B::Buf, MatLayout),
    probs: &mut B::Buf,
    p_off: usize,
    out: &mut B::Buf,
    out_at: MatLayout,
    n: usize,
    past: usize,
) -> Result<()> {
    let (kv_heads, hd) = (cfg.kv_heads(), cfg.head_dim());
    let group = cfg.n_heads / kv_heads;
    let keys = past + n;
    // One batched product per position within a group: batch entry j is query head
    // j·group + i, reading key/value head j.
    for i in 0..group {
        be.gemm(
            &Gemm {
                m: n,
                k: hd,
                n: keys,
                batch: kv_heads,
                alpha: 1.0 / (hd as f32).sqrt(),
                beta: 0.0,
                a: q.1.shifted(i * hd).batched(group * hd),
                b: k.1.t().batched(hd),
                c: MatLayout::at(p_off + i * n * keys, keys).batched(group * n * keys),
            },
            q.0,
            k.0,
            probs,
        )?;
    }
    be.causal_softmax(probs, p_off, cfg.n_heads, n, keys, past)?;
    for i in 0..group {
        be.gemm(
            &Gemm {
                m: n,
                k: keys,
                n: hd,
                batch: kv_heads,
                alpha: 1.0,
                beta: 0.0,
                a: MatLayout::at(p_off + i * n * keys, keys).batched(group * n * keys),
                b: v.1.batched(hd),
                c: out_at.shifted(i * hd).batched(group * hd),
            },
            probs,
            v.0,
            out,
        )?;
    }
    Ok(())
}

/// `C (m × n) ← A (m × k) · B (k × n) + beta·C` for dense row-major operands, with A or B
/// optionally read transposed (their stored shapes then being `k × m` / `n × k`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<B: Backend>(
    be: &B,
    m: usize,
    k: usize,
    n: usize,
    a: &B::Buf,
    a_t: bool,
    b: &B::Buf,
    b_t: bool,
    beta: f32,
    c: &mut B::Buf,
) -> Result<()> {
    let a_at = if a_t {
        MatLayout::row_major(m).t()
    } else {
        MatLayout::row_major(k)
    };
    let b_at = if b_t {
        MatLayout::row_major(k).t()
    } else {
        MatLayout::row_major(n)
    };
    be.gemm(
        &Gemm {
            m,
            k,
            n,
            batch: 1,
            alpha: 1.0,
            beta,
            a: a_at,
            b: b_at,
            c: MatLayout::row_major(n),
        },
        a,
        b,
        c,
    )
}

impl Model<CpuBackend> {
    /// A model on the CPU with these parameters.
    pub fn cpu(params: &Params) -> Result<Self> {
        Model::new(CpuBackend::default(), params)
    }
}

impl<B: Backend> Model<B> {
    /// Uploads `params` to `backend`.
    pub fn new(backend: B, params: &Params) -> Result<Self> {
        let config = params.config().clone();
        config.validate()?;
        let layout = Params::zeros(&config)?;
        layout.check_same_layout(params)?;
        let weights = params
            .tensors()
            .iter()
            .map(|t| {
                let mut buf = backend.alloc(t.data.len())?;
                backend.upload(&t.data, &mut buf)?;
                Ok(buf)
            })
            .collect::<Result<_>>()?;
        let (cos, sin) = rope_tables(&config);
        let mut rope_cos = backend.alloc(cos.len())?;
        backend.upload(&cos, &mut rope_cos)?;
        let mut rope_sin = backend.alloc(sin.len())?;
        backend.upload(&sin, &mut rope_sin)?;
        Ok(Model {
            index: param_index(&config),
            config,
            backend,
            layout,
            weights,
            rope_cos,
            rope_sin,
            pool: Arc::new(BufPool::new()),
        })
    }

    /// Replaces the weights with `params` (same config), e.g. after an optimizer step or when
    /// a new policy version arrives.
    pub fn load_params(&mut self, params: &Params) -> Result<()> {
        if params.config() != &self.config {
            return Err(ModelError::InvalidConfig(format!(
                "cannot load parameters of config {:?} into a model of config {:?}",
                params.config(),
                self.config
            )));
        }
        self.layout.check_same_layout(params)?;
        for (buf, t) in self.weights.iter_mut().zip(params.tensors()) {
            self.backend.upload(&t.data, buf)?;
        }
        Ok(())
    }

    /// Replaces one tensor's values (e.g. the only tensors that changed in a new policy
    /// version), leaving the others as they are.
    pub fn load_tensor(&mut self, name: &str, data: &[f32]) -> Result<()> {
        let (i, t) = self
            .layout
            .tensors()
            .iter()
            .enumerate()
            .find(|(_, t)| t.name == name)
            .ok_or_else(|| ModelError::BadParameter {
                name: name.to_owned(),
                reason: "not a parameter of this model config".into(),
            })?;
        if data.len() != t.data.len() {
            return Err(ModelError::BadParameter {
                name: name.to_owned(),
                reason: format!(
                    "expected {} values (shape {:?}), got {}",
                    t.data.len(),
                    t.shape,
                    data.len()
                ),
            });
        }
        self.backend.upload(data, &mut self.weights[i])
    }

    /// Number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.layout.num_elements()
    }

    /// Downloads the weights as named tensors.
    pub fn to_params(&self) -> Result<Params> {
        self.download_all(&self.weights)
    }

    fn download_all(&self, bufs: &[B::Buf]) -> Result<Params> {
        let mut out = self.layout.clone();
        for (t, buf) in out.tensors_mut().iter_mut().zip(bufs) {
            self.backend.download(buf, 0, &mut t.data)?;
        }
        Ok(out)
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub(crate) fn weights(&self) -> &[B::Buf] {
        &self.weights
    }

    /// The tensors' names and shapes, in the stable order (the values are unused).
    pub fn layout(&self) -> &Params {
        &self.layout
    }

    /// The backend, the tensors' names and shapes (the layout; its values are unused) and the
    /// weight buffers in the same order: what an optimizer needs to step the weights where
    /// they live.
    pub fn weights_mut(&mut self) -> (&B, &Params, &mut [B::Buf]) {
        (&self.backend, &self.layout, &mut self.weights)
    }

    pub(crate) fn index(&self) -> &ParamIndex {
        &self.index
    }

    /// `out ← rms_norm(x)` over `rows` rows of width `d_model` with the scale `weights[scale]`;
    /// saves the rows' reciprocal RMS in `rstd`.
    pub(crate) fn norm(
        &self,
        scale: usize,
        x: &B::Buf,
        out: &mut B::Buf,
        rstd: &mut B::Buf,
        rows: usize,
    ) -> Result<()> {
        let cfg = &self.config;
        let gamma = &self.weights[scale];
        self.backend
            .rms_norm(cfg.norm_eps, x, gamma, out, rstd, rows, cfg.d_model)
    }

    /// `out ← x·Wᵀ + b + beta·out` for `rows` rows of `x` (`beta = 1` adds a residual).
    pub(crate) fn linear(
        &self,
        lin: &Linear,
        x: &B::Buf,
        rows: usize,
        beta: f32,
        out: &mut B::Buf,
    ) -> Result<()> {
        let (be, w) = (&self.backend, &self.weights);
        matmul(
            be, rows, lin.inp, lin.out, x, false, &w[lin.w], true, beta, out,
        )?;
        match lin.b {
            Some(b) => be.add_bias(out, &w[b], rows, lin.out),
            None => Ok(()),
        }
    }

    /// Backward of [`Model::linear`] given `d_out` (`rows × out`): accumulates the weight's
    /// (and bias's) gradient and, when `d_in` is given, writes `d_out·W + beta·d_in` there.
    fn linear_backward(
        &self,
        lin: &Linear,
        x: &B::Buf,
        d_out: &B::Buf,
        rows: usize,
        d_in: Option<(&mut B::Buf, f32)>,
        grads: &mut [B::Buf],
    ) -> Result<()> {
        let (be, w) = (&self.backend, &self.weights);
        let (o, i) = (lin.out, lin.inp);
        matmul(
            be,
            o,
            rows,
            i,
            d_out,
            true,
            x,
            false,
            1.0,
            &mut grads[lin.w],
        )?;
        if let Some(b) = lin.b {
            be.bias_backward(d_out, &mut grads[b], rows, o)?;
        }
        match d_in {
            Some((d_in, beta)) => {
                matmul(be, rows, o, i, d_out, false, &w[lin.w], false, beta, d_in)
            }
            None => Ok(()),
        }
    }

    /// The attention inputs of `rows` positions from the normalised residual `h`: projections,
    /// the QK norms (if any) and RoPE at `positions`, into `out`.
    pub(crate) fn project_qkv(
        &self,
        li: &LayerIndex,
        h: &B::Buf,
        positions: &[u32],
        out: &mut Qkv<B>,
    ) -> Result<()> {
        let (be, cfg, w) = (&self.backend, &self.config, &self.weights);
        let (rows, hd) = (positions.len(), cfg.head_dim());
        let (heads, kv_heads) = (cfg.n_heads, cfg.kv_heads());
        self.linear(&li.v, h, rows, 0.0, &mut out.v)?;
        match (&mut out.pre_norm, li.qk_norm) {
            (Some(pre), Some((qn, kn))) => {
                self.linear(&li.q, h, rows, 0.0, &mut pre.q)?;
                self.linear(&li.k, h, rows, 0.0, &mut pre.k)?;
                let eps = cfg.norm_eps;
                be.rms_norm(
                    eps,
                    &pre.q,
                    &w[qn],
                    &mut out.q,
                    &mut pre.q_rstd,
                    rows * heads,
                    hd,
                )?;
                be.rms_norm(
                    eps,
                    &pre.k,
                    &w[kn],
                    &mut out.k,
                    &mut pre.k_rstd,
                    rows * kv_heads,
                    hd,
                )?;
            }
            (None, None) => {
                self.linear(&li.q, h, rows, 0.0, &mut out.q)?;
                self.linear(&li.k, h, rows, 0.0, &mut out.k)?;
            }
            _ => {
                return Err(ModelError::Backend(
                    "attention buffers were sized for another config".into(),
                ));
            }
        }
        let (cos, sin) = (&self.rope_cos, &self.rope_sin);
        be.rope(&mut out.q, positions, cos, sin, heads, hd, false)?;
        be.rope(&mut out.k, positions, cos, sin, kv_heads, hd, false)
    }

    /// The MLP of `rows` rows: `x += down(silu(gate(h)) ⊙ up(h))`, with `gate`, `up` and `act`
    /// (`rows × d_ff`) left holding the intermediate values.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mlp(
        &self,
        li: &LayerIndex,
        h: &B::Buf,
        rows: usize,
        gate: &mut B::Buf,
        up: &mut B::Buf,
        act: &mut B::Buf,
        x: &mut B::Buf,
    ) -> Result<()> {
        self.linear(&li.gate, h, rows, 0.0, gate)?;
        self.linear(&li.up, h, rows, 0.0, up)?;
        self.backend
            .swiglu(gate, up, act, rows * self.config.d_ff)?;
        self.linear(&li.down, act, rows, 1.0, x)
    }

    /// Zeroed gradient accumulators for this model.
    pub fn new_gradients(&self) -> Result<Gradients<B>> {
        let bufs = self
            .layout
            .tensors()
            .iter()
            .map(|t| self.backend.alloc(t.data.len()))
            .collect::<Result<_>>()?;
        Ok(Gradients { bufs })
    }

    /// Resets gradient accumulators to zero.
    pub fn zero_gradients(&self, grads: &mut Gradients<B>) -> Result<()> {
        for b in &mut grads.bufs {
            self.backend.fill_zero(b)?;
        }
        Ok(())
    }

    /// Uploads host gradients (e.g. a step's sum over ranks) into `grads`, replacing what they
    /// hold.
    pub fn upload_gradients(&self, from: &Params, grads: &mut Gradients<B>) -> Result<()> {
        self.layout.check_same_layout(from)?;
        if grads.bufs.len() != self.weights.len() {
            return Err(ModelError::InvalidInput(
                "gradients belong to a model of another config".into(),
            ));
        }
        for (buf, t) in grads.bufs.iter_mut().zip(from.tensors()) {
            self.backend.upload(&t.data, buf)?;
        }
        Ok(())
    }

    /// Downloads accumulated gradients as named tensors (same names and shapes as the
    /// parameters).
    pub fn gradients_to_params(&self, grads: &Gradients<B>) -> Result<Params> {
        if grads.bufs.len() != self.weights.len() {
            return Err(ModelError::InvalidInput(
                "gradients belong to a model of another config".into(),
            ));
        }
        self.download_all(&grads.bufs)
    }

    /// Checks one sequence against the config.
    fn check_sequence(&self, i: usize, s: &Sequence<'_>) -> Result<()> {
        let len = s.tokens.len();
        if len == 0 || len > self.config.max_seq_len {
            return Err(ModelError::InvalidInput(format!(
                "sequence {i} has {len} tokens; it needs 1 to max_seq_len = {}",
                self.config.max_seq_len
            )));
        }
        if s.response_start == 0 || s.response_start > len {
            return Err(ModelError::InvalidInput(format!(
                "sequence {i}: response_start = {} must be in 1..={len} (the prompt needs at \
                 least one token, e.g. BOS)",
                s.response_start
            )));
        }
        if let Some(&t) = s
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(ModelError::InvalidInput(format!(
                "sequence {i} holds token {t}, outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// The training forward pass over a batch of sequences (packed; no padding): the
    /// log-probability and entropy of every response token, and the activations for
    /// [`Model::backward`].
    pub fn forward(&self, seqs: &[Sequence<'_>]) -> Result<ForwardCache<B>> {
        let be = &self.backend;
        let cfg = &self.config;
        let (d, v, heads) = (cfg.d_model, cfg.vocab_size, cfg.n_heads);
        let w = &self.weights;
        let ix = &self.index;

        let mut metas = Vec::with_capacity(seqs.len());
        let (mut rows, mut outs, mut p_len) = (0, 0, 0);
        for (i, s) in seqs.iter().enumerate() {
            self.check_sequence(i, s)?;
            let len = s.tokens.len();
            let n_out = len - s.response_start;
            metas.push(SeqMeta {
                row0: rows,
                len,
                out: outs..outs + n_out,
                p_off: p_len,
            });
            rows += len;
            outs += n_out;
            p_len += heads * len * len;
        }
        let mut tokens = Vec::with_capacity(rows);
        let mut positions = Vec::with_capacity(rows);
        let mut targets = Vec::with_capacity(rows);
        let mut out_rows = Vec::with_capacity(outs);
        for (s, m) in seqs.iter().zip(&metas) {
            tokens.extend_from_slice(s.tokens);
            positions.extend(0..s.tokens.len() as u32);
            for p in 0..m.len {
                // Row p predicts token p + 1 when that token belongs to the response.
                if p + 1 >= s.response_start && p + 1 < m.len {
                    targets.push(s.tokens[p + 1]);
                    out_rows.push(m.row0 + p);
                } else {
                    targets.push(IGNORE_TARGET);
                }
            }
        }

        let take = |len| self.pool.take(be, len);
        let mut x = take(rows * d)?;
        be.embed(&w[ix.tok_emb], &tokens, &mut x, d)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for li in &ix.layers {
            let (acts, x_out) = self.block_forward(li, x, &metas, &positions, p_len)?;
            layers.push(acts);
            x = x_out;
        }
        let mut rstd_f = take(rows)?;
        let mut hf = take(rows * d)?;
        self.norm(ix.final_norm, &x, &mut hf, &mut rstd_f, rows)?;
        let mut logits = take(rows * v)?;
        matmul(
            be,
            rows,
            d,
            v,
            &hf,
            false,
            &w[ix.lm_head],
            true,
            0.0,
            &mut logits,
        )?;
        let mut row_lp = vec![0.0; rows];
        let mut row_ent = vec![0.0; rows];
        be.token_logprobs(&logits, &targets, v, &mut row_lp, &mut row_ent)?;
        let logprobs = out_rows.iter().map(|&r| row_lp[r]).collect();
        let entropies = out_rows.iter().map(|&r| row_ent[r]).collect();
        Ok(ForwardCache {
            seqs: metas,
            rows,
            tokens,
            positions,
            targets,
            out_rows,
            acts: Some(Activations {
                layers,
                x_final: x,
                rstd_f,
                hf,
                logits,
            }),
            logprobs,
            entropies,
            pool: self.pool.clone(),
        })
    }

    /// One pre-norm block over the packed rows: returns its saved activations (the input
    /// `x` among them) and the residual stream after it.
    fn block_forward(
        &self,
        li: &LayerIndex,
        x: B::Buf,
        metas: &[SeqMeta],
        positions: &[u32],
        p_len: usize,
    ) -> Result<(LayerActs<B>, B::Buf)> {
        let (be, cfg) = (&self.backend, &self.config);
        let (d, ff, qd, kvd) = (cfg.d_model, cfg.d_ff, cfg.q_dim(), cfg.kv_dim());
        let rows = positions.len();
        let take = |len| self.pool.take(be, len);
        let mut rstd1 = take(rows)?;
        let mut h1 = take(rows * d)?;
        self.norm(li.norm1, &x, &mut h1, &mut rstd1, rows)?;
        let mut qkv = Qkv::alloc(cfg, rows, take)?;
        self.project_qkv(li, &h1, positions, &mut qkv)?;
        let mut probs = take(p_len)?;
        let mut att = take(rows * qd)?;
        for m in metas {
            attention_forward(
                be,
                cfg,
                (&qkv.q, MatLayout::at(m.row0 * qd, qd)),
                (&qkv.k, MatLayout::at(m.row0 * kvd, kvd)),
                (&qkv.v, MatLayout::at(m.row0 * kvd, kvd)),
                &mut probs,
                m.p_off,
                &mut att,
                MatLayout::at(m.row0 * qd, qd),
                m.len,
                0,
            )?;
        }
        // x_mid = x + att·Woᵀ, in a new buffer: x stays saved for the backward pass.
        let mut x_mid = take(rows * d)?;
        let layout = MatLayout::row_major(d);
        be.copy(&x, layout, &mut x_mid, layout, rows, d)?;
        self.linear(&li.o, &att, rows, 1.0, &mut x_mid)?;

        let mut rstd2 = take(rows)?;
        let mut h2 = take(rows * d)?;
        self.norm(li.norm2, &x_mid, &mut h2, &mut rstd2, rows)?;
        let (mut gate, mut up, mut act) = (take(rows * ff)?, take(rows * ff)?, take(rows * ff)?);
        let mut x_out = take(rows * d)?;
        be.copy(&x_mid, layout, &mut x_out, layout, rows, d)?;
        self.mlp(li, &h2, rows, &mut gate, &mut up, &mut act, &mut x_out)?;
        let acts = LayerActs {
            x_in: x,
            rstd1,
            h1,
            qkv,
            probs,
            att,
            x_mid,
            rstd2,
            h2,
            gate,
            up,
            act,
        };
        Ok((acts, x_out))
    }

    /// Backward of one block's MLP and its pre-norm: adds to `dx` (the residual stream's
    /// gradient) and to the weights' gradients; `s` holds the scratch buffers.
    fn mlp_backward(
        &self,
        li: &LayerIndex,
        acts: &LayerActs<B>,
        dx: &mut B::Buf,
        s: &mut Scratch<B>,
        gr: &mut [B::Buf],
        rows: usize,
    ) -> Result<()> {
        let be = &self.backend;
        let ff = self.config.d_ff;
        // x_out = x_mid + act·Wdᵀ: d_act = dx·Wd.
        self.linear_backward(&li.down, &acts.act, dx, rows, Some((&mut s.d_act, 0.0)), gr)?;
        be.swiglu_backward(
            &acts.gate,
            &acts.up,
            &s.d_act,
            &mut s.d_gate,
            &mut s.d_up,
            rows * ff,
        )?;
        self.linear_backward(
            &li.gate,
            &acts.h2,
            &s.d_gate,
            rows,
            Some((&mut s.dh, 0.0)),
            gr,
        )?;
        self.linear_backward(&li.up, &acts.h2, &s.d_up, rows, Some((&mut s.dh, 1.0)), gr)?;
        let gamma = &self.weights[li.norm2];
        be.rms_norm_backward(
            &acts.x_mid,
            gamma,
            &acts.rstd2,
            &s.dh,
            dx,
            &mut gr[li.norm2],
            rows,
            self.config.d_model,
        )
    }

    /// Backward of the attention of every sequence of one block: from `s.datt` (the gradient
    /// of the heads' outputs, side by side) into `s.dq`, `s.dk`, `s.dv`.
    fn attention_backward(
        &self,
        acts: &LayerActs<B>,
        seqs: &[SeqMeta],
        s: &mut Scratch<B>,
    ) -> Result<()> {
        let (be, cfg) = (&self.backend, &self.config);
        let (heads, kv_heads, hd) = (cfg.n_heads, cfg.kv_heads(), cfg.head_dim());
        let (qd, kvd, group) = (cfg.q_dim(), cfg.kv_dim(), heads / kv_heads);
        let scale = 1.0 / (hd as f32).sqrt();
        let qkv = &acts.qkv;
        for m in seqs {
            let n = m.len;
            // Batch entry j of the products for group position i is query head j·group + i,
            // which reads key/value head j; key/value gradients sum over i.
            let q_at = |i: usize| MatLayout::at(m.row0 * qd + i * hd, qd).batched(group * hd);
            let kv_at = MatLayout::at(m.row0 * kvd, kvd).batched(hd);
            let p_at =
                |off: usize, i: usize| MatLayout::at(off + i * n * n, n).batched(group * n * n);
            let prod = |m_: usize, k_: usize, n_: usize, alpha, beta, a, b, c| Gemm {
                m: m_,
                k: k_,
                n: n_,
                batch: kv_heads,
                alpha,
                beta,
                a,
                b,
                c,
            };
            for i in 0..group {
                let beta = if i == 0 { 0.0 } else { 1.0 };
                // dP = dO · Vᵀ;  dV += Pᵀ · dO.
                be.gemm(
                    &prod(n, hd, n, 1.0, 0.0, q_at(i), kv_at.t(), p_at(0, i)),
                    &s.datt,
                    &qkv.v,
                    &mut s.dp,
                )?;
                be.gemm(
                    &prod(n, n, hd, 1.0, beta, p_at(m.p_off, i).t(), q_at(i), kv_at),
                    &acts.probs,
                    &s.datt,
                    &mut s.dv,
                )?;
            }
            // dS = softmax'(dP), then dQ = s·dS·K and dK += s·dSᵀ·Q.
            be.softmax_backward(&acts.probs, m.p_off, &mut s.dp, 0, heads * n, n)?;
            for i in 0..group {
                let beta = if i == 0 { 0.0 } else { 1.0 };
                be.gemm(
                    &prod(n, n, hd, scale, 0.0, p_at(0, i), kv_at, q_at(i)),
                    &s.dp,
                    &qkv.k,
                    &mut s.dq,
                )?;
                be.gemm(
                    &prod(n, n, hd, scale, beta, p_at(0, i).t(), q_at(i), kv_at),
                    &s.dp,
                    &qkv.q,
                    &mut s.dk,
                )?;
            }
        }
        Ok(())
    }

    /// Backward of the LM head and the final norm: the gradient of the residual stream after
    /// the last block.
    fn head_backward(
        &self,
        cache: &ForwardCache<B>,
        d_logprob: &[f32],
        d_entropy: Option<&[f32]>,
        gr: &mut [B::Buf],
    ) -> Result<B::Buf> {
        let (be, cfg, w, ix) = (&self.backend, &self.config, &self.weights, &self.index);
        let (d, v, rows) = (cfg.d_model, cfg.vocab_size, cache.rows);
        let mut row_dlp = vec![0.0; rows];
        let mut row_dent = vec![0.0; rows];
        for (k, &r) in cache.out_rows.iter().enumerate() {
            row_dlp[r] = d_logprob[k];
            row_dent[r] = d_entropy.map_or(0.0, |de| de[k]);
        }
        let acts = cache.acts()?;
        let take = |len| self.pool.take(be, len);
        let mut dlogits = take(rows * v)?;
        be.token_logprobs_backward(
            &acts.logits,
            &cache.targets,
            v,
            &row_dlp,
            &row_dent,
            &mut dlogits,
        )?;
        // logits = hf·Wᵀ with W `vocab × d`.
        matmul(
            be,
            v,
            rows,
            d,
            &dlogits,
            true,
            &acts.hf,
            false,
            1.0,
            &mut gr[ix.lm_head],
        )?;
        let mut dh = take(rows * d)?;
        matmul(
            be,
            rows,
            v,
            d,
            &dlogits,
            false,
            &w[ix.lm_head],
            false,
            0.0,
            &mut dh,
        )?;
        let mut dx = take(rows * d)?;
        let gamma = &w[ix.final_norm];
        be.rms_norm_backward(
            &acts.x_final,
            gamma,
            &acts.rstd_f,
            &dh,
            &mut dx,
            &mut gr[ix.final_norm],
            rows,
            d,
        )?;
        self.pool.give([dlogits, dh]);
        Ok(dx)
    }

    /// Backward of [`Model::project_qkv`]: from the gradients w.r.t. the attention inputs
    /// (`s.dq`, `s.dk`, `s.dv`, consumed) to `s.dh`, the gradient w.r.t. the normalised
    /// residual, accumulating the projections' (and QK norms') gradients.
    fn qkv_backward(
        &self,
        li: &LayerIndex,
        acts: &LayerActs<B>,
        positions: &[u32],
        s: &mut Scratch<B>,
        gr: &mut [B::Buf],
    ) -> Result<()> {
        let (be, cfg, w) = (&self.backend, &self.config, &self.weights);
        let (rows, hd) = (positions.len(), cfg.head_dim());
        let (heads, kv_heads) = (cfg.n_heads, cfg.kv_heads());
        let (cos, sin) = (&self.rope_cos, &self.rope_sin);
        be.rope(&mut s.dq, positions, cos, sin, heads, hd, true)?;
        be.rope(&mut s.dk, positions, cos, sin, kv_heads, hd, true)?;
        let h1 = &acts.h1;
        self.linear_backward(&li.v, h1, &s.dv, rows, Some((&mut s.dh, 0.0)), gr)?;
        match (&acts.qkv.pre_norm, li.qk_norm, &mut s.qk_pre) {
            (Some(pre), Some((qn, kn)), Some((dq_pre, dk_pre))) => {
                be.fill_zero(dq_pre)?;
                be.fill_zero(dk_pre)?;
                let (q_rows, k_rows) = (rows * heads, rows * kv_heads);
                be.rms_norm_backward(
                    &pre.q,
                    &w[qn],
                    &pre.q_rstd,
                    &s.dq,
                    dq_pre,
                    &mut gr[qn],
                    q_rows,
                    hd,
                )?;
                be.rms_norm_backward(
                    &pre.k,
                    &w[kn],
                    &pre.k_rstd,
                    &s.dk,
                    dk_pre,
                    &mut gr[kn],
                    k_rows,
                    hd,
                )?;
                self.linear_backward(&li.q, h1, dq_pre, rows, Some((&mut s.dh, 1.0)), gr)?;
                self.linear_backward(&li.k, h1, dk_pre, rows, Some((&mut s.dh, 1.0)), gr)?;
                Ok(())
            }
            (None, None, None) => {
                self.linear_backward(&li.q, h1, &s.dq, rows, Some((&mut s.dh, 1.0)), gr)?;
                self.linear_backward(&li.k, h1, &s.dk, rows, Some((&mut s.dh, 1.0)), gr)
            }
            _ => Err(ModelError::InvalidInput(
                "forward cache belongs to a model of another config".into(),
            )),
        }
    }

    /// The backward pass: given dL/d(logprob) for every response token of `cache` (same flat
    /// layout as [`ForwardCache::logprobs`]) and optionally dL/d(entropy), *adds* dL/dθ to
    /// `grads`.
    pub fn backward(
        &self,
        cache: &ForwardCache<B>,
        d_logprob: &[f32],
        d_entropy: Option<&[f32]>,
        grads: &mut Gradients<B>,
    ) -> Result<()> {
        let be = &self.backend;
        let cfg = &self.config;
        let w = &self.weights;
        let ix = &self.index;
        let rows = cache.rows;
        let n_out = cache.out_rows.len();
        if d_logprob.len() != n_out {
            return Err(ModelError::InvalidInput(format!(
                "d_logprob has {} values; the forward pass scored {n_out} response tokens",
                d_logprob.len()
            )));
        }
        if let Some(de) = d_entropy
            && de.len() != n_out
        {
            return Err(ModelError::InvalidInput(format!(
                "d_entropy has {} values; the forward pass scored {n_out} response tokens",
                de.len()
            )));
        }
        let layers = &cache.acts()?.layers;
        if grads.bufs.len() != w.len() || layers.len() != cfg.n_layers {
            return Err(ModelError::InvalidInput(
                "gradients or forward cache belong to a model of another config".into(),
            ));
        }
        let gr = &mut grads.bufs;

        let mut dx = self.head_backward(cache, d_logprob, d_entropy, gr)?;
        let max_len = cache.seqs.iter().map(|m| m.len).max().unwrap_or(0);
        let mut s = Scratch::alloc(cfg, rows, max_len, |len| self.pool.take(be, len))?;
        for (li, acts) in ix.layers.iter().zip(layers).rev() {
            self.mlp_backward(li, acts, &mut dx, &mut s, gr, rows)?;
            // x_mid = x_in + att·Woᵀ: d_att = dx·Wo.
            self.linear_backward(&li.o, &acts.att, &dx, rows, Some((&mut s.datt, 0.0)), gr)?;
            self.attention_backward(acts, &cache.seqs, &mut s)?;
            self.qkv_backward(li, acts, &cache.positions, &mut s, gr)?;
            be.rms_norm_backward(
                &acts.x_in,
                &w[li.norm1],
                &acts.rstd1,
                &s.dh,
                &mut dx,
                &mut gr[li.norm1],
                rows,
                cfg.d_model,
            )?;
        }
        be.embed_backward(&dx, &cache.tokens, &mut gr[ix.tok_emb], cfg.d_model)?;
        self.pool.give(s.into_bufs().chain([dx]));
        Ok(())
    }
}

/// Scratch buffers of the backward pass, taken once per call and reused by every block.
struct Scratch<B: Backend> {
    /// Gradient w.r.t. a normalised residual (`rows × d`).
    dh: B::Buf,
    /// Gradient w.r.t. the attention output (`rows × q_dim`).
    datt: B::Buf,
    /// Gradient w.r.t. the attention probabilities of one sequence (`heads × len × len`).
    dp: B::Buf,
    /// Gradients w.r.t. queries, keys and values.
    dq: B::Buf,
    /// See `dq`.
    dk: B::Buf,
    /// See `dq`.
    dv: B::Buf,
    /// With QK norms: gradients w.r.t. the query and key projections before them.
    qk_pre: Option<(B::Buf, B::Buf)>,
    /// Gradients w.r.t. the SwiGLU output and its two inputs (`rows × d_ff`).
    d_act: B::Buf,
    /// See `d_act`.
    d_gate: B::Buf,
    /// See `d_act`.
    d_up: B::Buf,
}

impl<B: Backend> Scratch<B> {
    fn alloc(
        cfg: &ModelConfig,
        rows: usize,
        max_len: usize,
        alloc: impl Fn(usize) -> Result<B::Buf>,
    ) -> Result<Self> {
        let (qd, kvd, ff) = (cfg.q_dim(), cfg.kv_dim(), cfg.d_ff);
        let qk_pre = if cfg.qk_norm {
            Some((alloc(rows * qd)?, alloc(rows * kvd)?))
        } else {
            None
        };
        Ok(Scratch {
            dh: alloc(rows * cfg.d_model)?,
            datt: alloc(rows * qd)?,
            dp: alloc(cfg.n_heads * max_len * max_len)?,
            dq: alloc(rows * qd)?,
            dk: alloc(rows * kvd)?,
            dv: alloc(rows * kvd)?,
            qk_pre,
            d_act: alloc(rows * ff)?,
            d_gate: alloc(rows * ff)?,
            d_up: alloc(rows * ff)?,
        })
    }

    /// Every buffer, for the pool.
    fn into_bufs(self) -> impl Iterator<Item = B::Buf> {
        let pre = self.qk_pre.into_iter().flat_map(|(q, k)| [q, k]);
        [
            self.dh,
            self.datt,
            self.dp,
            self.dq,
            self.dk,
            self.dv,
            self.d_act,
            self.d_gate,
            self.d_up,
        ]
        .into_iter()
        .chain(pre)
    }
}

/// RoPE's cosine and sine tables (`max_seq_len × head_dim/2`), computed as transformers does:
/// f32 inverse frequencies times f32 positions, then cos and sin.
fn rope_tables(cfg: &ModelConfig) -> (Vec<f32>, Vec<f32>) {
    let inv_freq: Vec<f32> = cfg.rope_inv_freq().into_iter().map(|f| f as f32).collect();
    let n = cfg.max_seq_len * inv_freq.len();
    let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for p in 0..cfg.max_seq_len {
        for &f in &inv_freq {
            let angle = (p as f32 * f) as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}
