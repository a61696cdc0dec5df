//! The compute backend: the one trait through which all of the model's math runs.
//!
//! The model code (forward, backward, sampling) is written once against [`Backend`]; a device
//! (the CPU now, CUDA through cudarc later) is one implementation of it. Buffers are the
//! backend's own type ([`Backend::Buf`]), so an accelerator keeps weights and activations in
//! device memory; only small per-row vectors (token ids, log-probs, their gradients) cross as
//! host slices.
//!
//! Matrices are described by [`MatLayout`] (offset and strides into a buffer), so transposes,
//! head slices of a fused QKV matrix and per-head batches are views, not copies.

use std::fmt;
use std::str::FromStr;

use crate::adamw::AdamWStep;
use crate::error::{ModelError, Result};

/// Token target meaning "no log-prob wanted for this row" in [`Backend::token_logprobs`].
pub const IGNORE_TARGET: u32 = u32::MAX;

/// A strided view of a (batch of) matrices inside a buffer: element (b, i, j) lives at
/// `offset + b·batch_stride + i·row_stride + j·col_stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatLayout {
    /// Index of element (0, 0, 0).
    pub offset: usize,
    /// Distance between consecutive rows.
    pub row_stride: usize,
    /// Distance between consecutive columns.
    pub col_stride: usize,
    /// Distance between consecutive matrices of a batch.
    pub batch_stride: usize,
}

impl MatLayout {
    /// A dense row-major matrix with `cols` columns at the start of its buffer.
    pub fn row_major(cols: usize) -> Self {
        MatLayout {
            offset: 0,
            row_stride: cols,
            col_stride: 1,
            batch_stride: 0,
        }
    }

    /// A row-major matrix starting at `offset` whose rows are `row_stride` apart.
    pub fn at(offset: usize, row_stride: usize) -> Self {
        MatLayout {
            offset,
            row_stride,
            col_stride: 1,
            batch_stride: 0,
        }
    }

    /// The transposed view of the same memory.
    pub fn t(self) -> Self {
        MatLayout {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// The same view starting `by` values further.
    pub fn shifted(self, by: usize) -> Self {
        MatLayout {
            offset: self.offset + by,
            ..self
        }
    }

    /// The same view with consecutive batch entries `stride` apart.
    pub fn batched(self, stride: usize) -> Self {
        MatLayout {
            batch_stride: stride,
            ..self
        }
    }

    /// One past the largest index touched by a `batch × rows × cols` view (0 if empty).
    pub fn end(&self, batch: usize, rows: usize, cols: usize) -> usize {
        if batch == 0 || rows == 0 || cols == 0 {
            return 0;
        }
        self.offset
            + (batch - 1) * self.batch_stride
            + (rows - 1) * self.row_stride
            + (cols - 1) * self.col_stride
            + 1
    }
}

/// The precision of the matrix products' operands (`--products`, `products` in the
/// `[trainer]` and `[worker.engine]` sections).
///
/// `bf16` rounds both operands of every product to bf16 (to nearest even) and accumulates and
/// writes the product in f32, as tensor cores compute it; everything else (the weights, which
/// stay the f32 masters, norms, softmax, log-probs, the IcePop ratio and the loss) stays f32.
/// The CPU backend emulates it exactly (for parity tests; it is slower than `f32` there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Products {
    /// f32 operands.
    #[default]
    F32,
    /// bf16 operands, f32 accumulation and output.
    Bf16,
}

impl FromStr for Products {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "f32" => Ok(Products::F32),
            "bf16" => Ok(Products::Bf16),
            other => Err(ModelError::InvalidInput(format!(
                "`{other}` is not a product precision: use f32 or bf16"
            ))),
        }
    }
}

impl fmt::Display for Products {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Products::F32 => "f32",
            Products::Bf16 => "bf16",
        })
    }
}

/// A (batched) matrix product `C[b] ← alpha · A[b] · B[b] + beta · C[b]` with A `m × k`,
/// B `k × n`, C `m × n`. With `beta == 0`, C is not read (it may hold garbage).
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    /// Rows of A and C.
    pub m: usize,
    /// Columns of A, rows of B.
    pub k: usize,
    /// Columns of B and C.
    pub n: usize,
    /// Number of independent products.
    pub batch: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of C's previous contents (1 accumulates, 0 overwrites).
    pub beta: f32,
    /// View of A.
    pub a: MatLayout,
    /// View of B.
    pub b: MatLayout,
    /// View of C.
    pub c: MatLayout,
}

/// The operations the model is made of. All buffers hold `f32`; every row-wise op works on a
/// dense row-major `[rows, cols]` block at the start of its buffers unless an offset is given.
///
/// Implementations check every view against their buffers' lengths and return
/// [`crate::ModelError::Backend`] rather than touching memory out of bounds.
pub trait Backend: Send + Sync {
    /// A buffer of `f32` in the backend's memory.
    type Buf: Send + Sync;

    /// A short name for logs ("cpu", "cuda:0").
    fn name(&self) -> String;
    /// A zero-filled buffer of `len` values.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    /// Number of values in `buf`.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Number of values `buf` can hold without a new allocation.
    fn capacity(&self, buf: &Self::Buf) -> usize {
        self.len(buf)
    }
    /// A zero-filled buffer of `len` values, made from `buf`'s memory where the backend can
    /// (a new allocation otherwise).
    fn reuse(&self, buf: Self::Buf, len: usize) -> Result<Self::Buf> {
        drop(buf);
        self.alloc(len)
    }
    /// Copies host values into the start of `buf`.
    fn upload(&self, src: &[f32], buf: &mut Self::Buf) -> Result<()>;
    /// Copies `out.len()` values starting at `offset` of `buf` to the host.
    fn download(&self, buf: &Self::Buf, offset: usize, out: &mut [f32]) -> Result<()>;
    /// Sets every value of `buf` to zero.
    fn fill_zero(&self, buf: &mut Self::Buf) -> Result<()>;
    /// Copies a `rows × cols` block between views (layouts' column strides are honoured).
    fn copy(
        &self,
        src: &Self::Buf,
        src_at: MatLayout,
        dst: &mut Self::Buf,
        dst_at: MatLayout,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    /// `dst[0..len] += src[0..len]`.
    fn add_assign(&self, dst: &mut Self::Buf, src: &Self::Buf, len: usize) -> Result<()>;
    /// The matrix product described by `g`. `c` must be a buffer distinct from `a` and `b`.
    fn gemm(&self, g: &Gemm, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf) -> Result<()>;

    /// `out[r] = tok_emb[tokens[r]]`, rows of width `d`.
    fn embed(
        &self,
        tok_emb: &Self::Buf,
        tokens: &[u32],
        out: &mut Self::Buf,
        d: usize,
    ) -> Result<()>;
    /// Accumulates the embedding gradient: `d_tok[tokens[r]] += d_out[r]`.
    fn embed_backward(
        &self,
        d_out: &Self::Buf,
        tokens: &[u32],
        d_tok: &mut Self::Buf,
        d: usize,
    ) -> Result<()>;

    /// RMSNorm of each `cols`-wide row of `x` into `out`, as transformers computes it:
    /// `x · rsqrt(mean(x²) + eps) · gamma`. Saves each row's reciprocal RMS in `rstd` (`rows`
    /// values) for the backward pass.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm(
        &self,
        eps: f32,
        x: &Self::Buf,
        gamma: &Self::Buf,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    /// Backward of [`Backend::rms_norm`]: *adds* the input gradient to `dx` and accumulates
    /// `d_gamma`.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_backward(
        &self,
        x: &Self::Buf,
        gamma: &Self::Buf,
        rstd: &Self::Buf,
        d_out: &Self::Buf,
        dx: &mut Self::Buf,
        d_gamma: &mut Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    /// `x[r] += bias` for every `cols`-wide row of the dense `rows × cols` block.
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf, rows: usize, cols: usize)
    -> Result<()>;
    /// Backward of [`Backend::add_bias`]: `d_bias += Σ_r d_out[r]`.
    fn bias_backward(
        &self,
        d_out: &Self::Buf,
        d_bias: &mut Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    /// The SwiGLU activation: `out[i] = silu(gate[i]) · up[i]` for `i < len`.
    fn swiglu(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        out: &mut Self::Buf,
        len: usize,
    ) -> Result<()>;
    /// Backward of [`Backend::swiglu`]: writes (overwrites) the gradients w.r.t. `gate` and
    /// `up` from the gradient `d_out` w.r.t. its output.
    #[allow(clippy::too_many_arguments)]
    fn swiglu_backward(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        d_out: &Self::Buf,
        d_gate: &mut Self::Buf,
        d_up: &mut Self::Buf,
        len: usize,
    ) -> Result<()>;

    /// Rotary position embedding in place, on `positions.len()` rows of `heads` heads of width
    /// `hd` (dense, `heads · hd` per row), in the half-split layout transformers uses
    /// (dimension `i` pairs with `i + hd/2`). `cos` and `sin` hold `hd/2` values per position.
    /// `inverse` rotates by −θ: the backward pass of the forward rotation.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Buf,
        positions: &[u32],
        cos: &Self::Buf,
        sin: &Self::Buf,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) -> Result<()>;

    /// In place on the `batch × rows × cols` block at `offset`: row `i` becomes the softmax of
    /// its first `past + i + 1` entries (a causal mask for queries at positions `past + i`
    /// over keys `0..cols`); the masked entries become 0.
    fn causal_softmax(
        &self,
        scores: &mut Self::Buf,
        offset: usize,
        batch: usize,
        rows: usize,
        cols: usize,
        past: usize,
    ) -> Result<()>;
    /// Softmax backward, row-wise over `rows × cols` blocks: `dp ← p ⊙ (dp − Σ_j p·dp)`.
    /// `p` starts at `p_offset`, `dp` at `dp_offset`.
    #[allow(clippy::too_many_arguments)]
    fn softmax_backward(
        &self,
        p: &Self::Buf,
        p_offset: usize,
        dp: &mut Self::Buf,
        dp_offset: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    /// For each row of `logits` (`rows × vocab`): `logprob[r] = log softmax(row)[targets[r]]` and
    /// `entropy[r] = −Σ p log p`. Rows whose target is [`IGNORE_TARGET`] get 0 for both.
    fn token_logprobs(
        &self,
        logits: &Self::Buf,
        targets: &[u32],
        vocab: usize,
        logprob: &mut [f32],
        entropy: &mut [f32],
    ) -> Result<()>;
    /// Backward of [`Backend::token_logprobs`]: writes (overwrites) `d_logits` from the
    /// gradients w.r.t. each row's log-prob and entropy.
    fn token_logprobs_backward(
        &self,
        logits: &Self::Buf,
        targets: &[u32],
        vocab: usize,
        d_logprob: &[f32],
        d_entropy: &[f32],
        d_logits: &mut Self::Buf,
    ) -> Result<()>;

    /// Appends to `out` the f64 sums of squares of `buf[..len]` by block, in the order
    /// [`crate::adamw::sum_squares_blocks`] defines (the optimizer's gradient norm).
    fn sum_squares(&self, buf: &Self::Buf, len: usize, out: &mut Vec<f64>) -> Result<()>;
    /// One AdamW step of `len` values ([`AdamWStep::apply`]): `w`, `m` and `v` move in place
    /// with the gradient `g`. With `rounded`, `w` holds f32 master weights and `rounded`
    /// receives them rounded to bf16 (the weights the model computes with).
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        step: &AdamWStep,
        w: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        rounded: Option<&mut Self::Buf>,
        len: usize,
    ) -> Result<()>;
}
