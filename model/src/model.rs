//! The decoder-only transformer: weights on a backend, the training forward pass (log-probs and
//! entropies of response tokens) and its backward pass.

use std::ops::Range;

use crate::backend::{Backend, Gemm, IGNORE_TARGET, MatLayout};
use crate::config::ModelConfig;
use crate::cpu::CpuBackend;
use crate::error::{ModelError, Result};
use crate::params::{LayerIndex, ParamIndex, Params, param_index};

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
}

/// Gradient accumulators on the backend, one buffer per parameter tensor (stable order).
/// [`Model::backward`] adds to them; [`Model::gradients_to_params`] brings them to the host.
pub struct Gradients<B: Backend = CpuBackend> {
    /// One buffer per parameter, same order and length as the model's weights.
    bufs: Vec<B::Buf>,
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

/// Activations of one block saved for the backward pass (rows × width, packed over sequences).
struct LayerActs<B: Backend> {
    /// Residual stream entering the block.
    x_in: B::Buf,
    /// Statistics of the attention pre-norm.
    stats1: B::Buf,
    /// Normalised input of attention.
    h1: B::Buf,
    /// Fused query, key, value projections (`rows × 3d`).
    qkv: B::Buf,
    /// Attention probabilities, per sequence `heads × len × len`.
    probs: B::Buf,
    /// Attention output before the output projection.
    att: B::Buf,
    /// Residual stream after attention.
    x_mid: B::Buf,
    /// Statistics of the MLP pre-norm.
    stats2: B::Buf,
    /// Normalised input of the MLP.
    h2: B::Buf,
    /// MLP pre-activation (`rows × d_ff`).
    f1: B::Buf,
    /// MLP activation, GELU(f1).
    g: B::Buf,
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
    /// Saved activations per block.
    layers: Vec<LayerActs<B>>,
    /// Residual stream after the last block.
    x_final: B::Buf,
    /// Statistics of the final norm.
    stats_f: B::Buf,
    /// Normalised final hidden states.
    hf: B::Buf,
    /// LM-head outputs (`rows × vocab`).
    logits: B::Buf,
    /// log π(token) of every response token, sequence after sequence.
    logprobs: Vec<f32>,
    /// Entropy of the predictive distribution at every response token.
    entropies: Vec<f32>,
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
}

/// The (batched over heads) causal attention of `n` queries at positions `past..past + n`
/// over `past + n` keys: `probs` gets softmax(q·kᵀ/√hd) per head at `p_off`
/// (`heads × n × keys`), `out` gets probs · v with heads side by side.
///
/// `q`, `k`, `v` are the head-0 views (row-major, `hd` columns); head `h` is `h·hd` columns
/// further. Shared by training and sampling so both compute exactly the same thing.
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
    let (heads, hd) = (cfg.n_heads, cfg.head_dim());
    let keys = past + n;
    be.gemm(
        &Gemm {
            m: n,
            k: hd,
            n: keys,
            batch: heads,
            alpha: 1.0 / (hd as f32).sqrt(),
            beta: 0.0,
            a: q.1.batched(hd),
            b: k.1.t().batched(hd),
            c: MatLayout::at(p_off, keys).batched(n * keys),
        },
        q.0,
        k.0,
        probs,
    )?;
    be.causal_softmax(probs, p_off, heads, n, keys, past)?;
    be.gemm(
        &Gemm {
            m: n,
            k: keys,
            n: hd,
            batch: heads,
            alpha: 1.0,
            beta: 0.0,
            a: MatLayout::at(p_off, keys).batched(n * keys),
            b: v.1.batched(hd),
            c: out_at.batched(hd),
        },
        probs,
        v.0,
        out,
    )
}

/// `C (m × n) ← A (m × k) · B (k × n) + beta·C` for dense row-major operands, with A or B
/// A residual step: `residual + input · weight` (`residual` is `rows × d`, `input` `rows × k`)
/// in a new buffer, keeping `residual` for the backward pass.
fn plus_projection<B: Backend>(
    be: &B,
    (residual, rows, d): (&B::Buf, usize, usize),
    (input, k): (&B::Buf, usize),
    weight: &B::Buf,
) -> Result<B::Buf> {
    let mut out = be.alloc(rows * d)?;
    let layout = MatLayout::row_major(d);
    be.copy(residual, layout, &mut out, layout, rows, d)?;
    matmul(be, rows, k, d, input, false, weight, false, 1.0, &mut out)?;
    Ok(out)
}

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
        Model::new(CpuBackend, params)
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
        Ok(Model {
            index: param_index(&config),
            config,
            backend,
            layout,
            weights,
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

    pub(crate) fn index(&self) -> &ParamIndex {
        &self.index
    }

    /// `out ← norm(x)` over `rows` rows of width `d_model`, with the norm whose scale (and
    /// bias) are the weights `(scale, bias)`; saves the row statistics in `stats`.
    pub(crate) fn norm(
        &self,
        (scale, bias): (usize, Option<usize>),
        x: &B::Buf,
        out: &mut B::Buf,
        stats: &mut B::Buf,
        rows: usize,
    ) -> Result<()> {
        let (cfg, w) = (&self.config, &self.weights);
        let bias = bias.map(|b| &w[b]);
        self.backend.norm(
            cfg.norm,
            cfg.norm_eps,
            x,
            &w[scale],
            bias,
            out,
            stats,
            rows,
            cfg.d_model,
        )
    }

    /// Backward of [`Model::norm`]: adds the input gradient to `dx` and accumulates the
    /// norm's weight gradients in `grads`.
    #[allow(clippy::too_many_arguments)]
    fn norm_backward(
        &self,
        (scale, bias): (usize, Option<usize>),
        x: &B::Buf,
        stats: &B::Buf,
        d_out: &B::Buf,
        dx: &mut B::Buf,
        grads: &mut [B::Buf],
        rows: usize,
    ) -> Result<()> {
        let cfg = &self.config;
        let (d_scale, d_bias) = two_grads(grads, scale, bias);
        self.backend.norm_backward(
            cfg.norm,
            x,
            &self.weights[scale],
            stats,
            d_out,
            dx,
            d_scale,
            d_bias,
            rows,
            cfg.d_model,
        )
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

        let mut x = be.alloc(rows * d)?;
        be.embed(
            &w[ix.tok_emb],
            &w[ix.pos_emb],
            &tokens,
            &positions,
            &mut x,
            d,
        )?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for li in &ix.layers {
            let (acts, x_out) = self.block_forward(li, x, &metas, rows, p_len)?;
            layers.push(acts);
            x = x_out;
        }
        let mut stats_f = be.alloc(2 * rows)?;
        let mut hf = be.alloc(rows * d)?;
        self.norm(ix.final_norm(), &x, &mut hf, &mut stats_f, rows)?;
        let mut logits = be.alloc(rows * v)?;
        matmul(
            be,
            rows,
            d,
            v,
            &hf,
            false,
            &w[ix.lm_head],
            false,
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
            layers,
            x_final: x,
            stats_f,
            hf,
            logits,
            logprobs,
            entropies,
        })
    }

    /// Backward of one block's MLP (x_out = x_mid + gelu(h2 · W1) · W2) and its pre-norm:
    /// adds to `dx` (the residual stream's gradient) and to the weights' gradients; `dg` and
    /// `dh` are scratch.
    #[allow(clippy::too_many_arguments)]
    fn mlp_backward(
        &self,
        li: &LayerIndex,
        acts: &LayerActs<B>,
        dx: &mut B::Buf,
        dg: &mut B::Buf,
        dh: &mut B::Buf,
        gr: &mut [B::Buf],
        rows: usize,
    ) -> Result<()> {
        let (be, cfg, w) = (&self.backend, &self.config, &self.weights);
        let (d, ff) = (cfg.d_model, cfg.d_ff);
        // MLP: x_out = x_mid + gelu(h2 · W1) · W2.
        matmul(be, rows, d, ff, dx, false, &w[li.w2], true, 0.0, dg)?;
        matmul(
            be,
            ff,
            rows,
            d,
            &acts.g,
            true,
            dx,
            false,
            1.0,
            &mut gr[li.w2],
        )?;
        be.gelu_backward(&acts.f1, dg, rows * ff)?;
        matmul(
            be,
            d,
            rows,
            ff,
            &acts.h2,
            true,
            dg,
            false,
            1.0,
            &mut gr[li.w1],
        )?;
        matmul(be, rows, ff, d, dg, false, &w[li.w1], true, 0.0, dh)?;
        self.norm_backward(li.norm2(), &acts.x_mid, &acts.stats2, dh, dx, gr, rows)?;
        Ok(())
    }

    /// Backward of the attention of every sequence of one block: from `datt` (the gradient
    /// of the heads' outputs, side by side) into `dqkv`; `dp` is scratch for one sequence's
    /// attention probabilities.
    fn attention_backward(
        &self,
        acts: &LayerActs<B>,
        seqs: &[SeqMeta],
        datt: &B::Buf,
        dqkv: &mut B::Buf,
        dp: &mut B::Buf,
    ) -> Result<()> {
        let (be, cfg) = (&self.backend, &self.config);
        let (d, heads, hd) = (cfg.d_model, cfg.n_heads, cfg.head_dim());
        let scale = 1.0 / (hd as f32).sqrt();
        for m in seqs {
            let (n, base) = (m.len, m.row0 * 3 * d);
            let q_at = MatLayout::at(base, 3 * d).batched(hd);
            let k_at = MatLayout::at(base + d, 3 * d).batched(hd);
            let v_at = MatLayout::at(base + 2 * d, 3 * d).batched(hd);
            let o_at = MatLayout::at(m.row0 * d, d).batched(hd);
            let p_at = MatLayout::at(m.p_off, n).batched(n * n);
            let dp_at = MatLayout::at(0, n).batched(n * n);
            let gemm = |m_, k_, n_, alpha, a, b, c| Gemm {
                m: m_,
                k: k_,
                n: n_,
                batch: heads,
                alpha,
                beta: 0.0,
                a,
                b,
                c,
            };
            // dP = dO · Vᵀ;  dV = Pᵀ · dO.
            be.gemm(
                &gemm(n, hd, n, 1.0, o_at, v_at.t(), dp_at),
                datt,
                &acts.qkv,
                dp,
            )?;
            be.gemm(
                &gemm(n, n, hd, 1.0, p_at.t(), o_at, v_at),
                &acts.probs,
                datt,
                dqkv,
            )?;
            // dS = softmax'(dP), then dQ = s·dS·K and dK = s·dSᵀ·Q.
            be.softmax_backward(&acts.probs, m.p_off, dp, 0, heads * n, n)?;
            be.gemm(
                &gemm(n, n, hd, scale, dp_at, k_at, q_at),
                dp,
                &acts.qkv,
                dqkv,
            )?;
            be.gemm(
                &gemm(n, n, hd, scale, dp_at.t(), q_at, k_at),
                dp,
                &acts.qkv,
                dqkv,
            )?;
        }
        Ok(())
    }

    /// Backward of the LM head and the final norm: the gradients of the residual stream
    /// after the last block (`dx`) and a scratch buffer of the same shape (`dh`).
    fn head_backward(
        &self,
        cache: &ForwardCache<B>,
        d_logprob: &[f32],
        d_entropy: Option<&[f32]>,
        gr: &mut [B::Buf],
    ) -> Result<(B::Buf, B::Buf)> {
        let (be, cfg, w, ix) = (&self.backend, &self.config, &self.weights, &self.index);
        let (d, v, rows) = (cfg.d_model, cfg.vocab_size, cache.rows);
        let mut row_dlp = vec![0.0; rows];
        let mut row_dent = vec![0.0; rows];
        for (k, &r) in cache.out_rows.iter().enumerate() {
            row_dlp[r] = d_logprob[k];
            row_dent[r] = d_entropy.map_or(0.0, |de| de[k]);
        }
        let mut dlogits = be.alloc(rows * v)?;
        be.token_logprobs_backward(
            &cache.logits,
            &cache.targets,
            v,
            &row_dlp,
            &row_dent,
            &mut dlogits,
        )?;
        matmul(
            be,
            d,
            rows,
            v,
            &cache.hf,
            true,
            &dlogits,
            false,
            1.0,
            &mut gr[ix.lm_head],
        )?;
        let mut dh = be.alloc(rows * d)?;
        matmul(
            be,
            rows,
            v,
            d,
            &dlogits,
            false,
            &w[ix.lm_head],
            true,
            0.0,
            &mut dh,
        )?;
        drop(dlogits);
        // dx: gradient w.r.t. the residual stream, walked back through the blocks.
        let mut dx = be.alloc(rows * d)?;
        self.norm_backward(
            ix.final_norm(),
            &cache.x_final,
            &cache.stats_f,
            &dh,
            &mut dx,
            gr,
            rows,
        )?;

        Ok((dx, dh))
    }

    /// One pre-norm block over the packed rows: returns its saved activations (the input
    /// `x` among them) and the residual stream after it.
    fn block_forward(
        &self,
        li: &LayerIndex,
        x: B::Buf,
        metas: &[SeqMeta],
        rows: usize,
        p_len: usize,
    ) -> Result<(LayerActs<B>, B::Buf)> {
        let (be, cfg, w) = (&self.backend, &self.config, &self.weights);
        let (d, ff) = (cfg.d_model, cfg.d_ff);
        let mut stats1 = be.alloc(2 * rows)?;
        let mut h1 = be.alloc(rows * d)?;
        self.norm(li.norm1(), &x, &mut h1, &mut stats1, rows)?;
        let mut qkv = be.alloc(rows * 3 * d)?;
        matmul(
            be,
            rows,
            d,
            3 * d,
            &h1,
            false,
            &w[li.wqkv],
            false,
            0.0,
            &mut qkv,
        )?;
        let mut probs = be.alloc(p_len)?;
        let mut att = be.alloc(rows * d)?;
        for m in metas {
            let base = m.row0 * 3 * d;
            attention_forward(
                be,
                cfg,
                (&qkv, MatLayout::at(base, 3 * d)),
                (&qkv, MatLayout::at(base + d, 3 * d)),
                (&qkv, MatLayout::at(base + 2 * d, 3 * d)),
                &mut probs,
                m.p_off,
                &mut att,
                MatLayout::at(m.row0 * d, d),
                m.len,
                0,
            )?;
        }
        let x_mid = plus_projection(be, (&x, rows, d), (&att, d), &w[li.wo])?;

        let mut stats2 = be.alloc(2 * rows)?;
        let mut h2 = be.alloc(rows * d)?;
        self.norm(li.norm2(), &x_mid, &mut h2, &mut stats2, rows)?;
        let mut f1 = be.alloc(rows * ff)?;
        matmul(be, rows, d, ff, &h2, false, &w[li.w1], false, 0.0, &mut f1)?;
        let mut g = be.alloc(rows * ff)?;
        be.gelu(&f1, &mut g, rows * ff)?;
        let x_out = plus_projection(be, (&x_mid, rows, d), (&g, ff), &w[li.w2])?;
        let acts = LayerActs {
            x_in: x,
            stats1,
            h1,
            qkv,
            probs,
            att,
            x_mid,
            stats2,
            h2,
            f1,
            g,
        };
        Ok((acts, x_out))
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
        let (d, ff, heads) = (cfg.d_model, cfg.d_ff, cfg.n_heads);
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
        if grads.bufs.len() != w.len() || cache.layers.len() != cfg.n_layers {
            return Err(ModelError::InvalidInput(
                "gradients or forward cache belong to a model of another config".into(),
            ));
        }
        let gr = &mut grads.bufs;

        let (mut dx, mut dh) = self.head_backward(cache, d_logprob, d_entropy, gr)?;

        let mut dg = be.alloc(rows * ff)?;
        let mut datt = be.alloc(rows * d)?;
        let mut dqkv = be.alloc(rows * 3 * d)?;
        let max_len = cache.seqs.iter().map(|m| m.len).max().unwrap_or(0);
        let mut dp = be.alloc(heads * max_len * max_len)?;
        for (li, acts) in ix.layers.iter().zip(&cache.layers).rev() {
            self.mlp_backward(li, acts, &mut dx, &mut dg, &mut dh, gr, rows)?;
            // Attention: x_mid = x_in + attn(h1) · Wo.
            matmul(be, rows, d, d, &dx, false, &w[li.wo], true, 0.0, &mut datt)?;
            matmul(
                be,
                d,
                rows,
                d,
                &acts.att,
                true,
                &dx,
                false,
                1.0,
                &mut gr[li.wo],
            )?;
            self.attention_backward(acts, &cache.seqs, &datt, &mut dqkv, &mut dp)?;
            matmul(
                be,
                d,
                rows,
                3 * d,
                &acts.h1,
                true,
                &dqkv,
                false,
                1.0,
                &mut gr[li.wqkv],
            )?;
            matmul(
                be,
                rows,
                3 * d,
                d,
                &dqkv,
                false,
                &w[li.wqkv],
                true,
                0.0,
                &mut dh,
            )?;
            self.norm_backward(li.norm1(), &acts.x_in, &acts.stats1, &dh, &mut dx, gr, rows)?;
        }
        let (dtok, dpos) = two_mut(gr, ix.tok_emb, ix.pos_emb);
        be.embed_backward(&dx, &cache.tokens, &cache.positions, dtok, dpos, d)
    }
}

/// Mutable references to two distinct elements of a slice.
fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert_ne!(a, b, "two_mut needs distinct indices");
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&mut lo[a], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&mut hi[0], &mut lo[b])
    }
}

/// The gradient buffers of a norm's scale and (optional) bias.
fn two_grads<T>(v: &mut [T], w: usize, b: Option<usize>) -> (&mut T, Option<&mut T>) {
    match b {
        Some(b) => {
            let (x, y) = two_mut(v, w, b);
            (x, Some(y))
        }
        None => (&mut v[w], None),
    }
}
