//! The CPU implementation of [`Backend`]: `matrixmultiply` for products, plain loops for the
//! row-wise ops, rayon's pool for what is large enough to split.

use std::ops::Range;

use rayon::prelude::*;

use crate::adamw::{AdamWStep, sum_squares_blocks};
use crate::backend::{Backend, Gemm, IGNORE_TARGET, MatLayout, Products};
use crate::checks;
use crate::config::WeightDtype;
use crate::error::Result;

/// Runs the model on the CPU, on rayon's pool (all cores; `RAYON_NUM_THREADS` overrides): large
/// matrix products split by rows of the output, batches of small products (attention heads)
/// and large row-wise ops by batch entry and row. Small work (one-token decoding) stays on the
/// calling thread.
///
/// Every split goes through rayon, whose idle threads sleep and whose callers take work back
/// from a busy pool. `matrixmultiply`'s own threading (its `threading` feature) is not used:
/// its caller spins on `sched_yield` until its helper thread has run, which on a machine whose
/// cores are all busy (a trainer beside sampling workers) burns the time in the kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend {
    /// The precision of the products' operands (`bf16`: emulated, operands rounded first).
    products: Products,
}

impl CpuBackend {
    /// A CPU backend computing its products with `products` operands.
    pub fn new(products: Products) -> Self {
        CpuBackend { products }
    }
}

/// Row-wise work on fewer values than this runs on the calling thread: handing it to rayon
/// (a wake-up of the pool's threads, tens of microseconds) costs more than it saves, and
/// single-token decoding never crosses it.
const PAR_MIN: usize = 1 << 17;

/// Batched products smaller than this (m·k·n) run their batch entries in parallel (when all
/// of them together reach [`PAR_GEMM_MIN`]); larger ones run one after the other, each split
/// by rows.
const PAR_GEMM_MAX: usize = 1 << 18;

/// Products (or batches of them) of fewer multiply-adds than this run on the calling thread:
/// they cost less than the hand-off. Larger ones split the rows of their output over the
/// pool, in blocks of at least [`PAR_GEMM_ROWS`] rows.
const PAR_GEMM_MIN: usize = 1 << 21;

/// The fewest rows of a block of a split product.
const PAR_GEMM_ROWS: usize = 32;

/// Runs `f(row index, row)` over the `cols`-wide rows of `out`, in parallel when large.
fn for_rows<F>(out: &mut [f32], cols: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        out.chunks_mut(cols).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// Whether the `batch` output matrices of a view are pairwise disjoint, so that they may be
/// written from different threads: either each matrix lies within its own batch stride, or the
/// matrices sit side by side within each row (attention heads of a `rows × d` matrix).
fn batches_disjoint(c: &MatLayout, batch: usize, m: usize, n: usize) -> bool {
    if batch <= 1 {
        return true;
    }
    let span = c.end(1, m, n) - c.offset;
    c.batch_stride >= span
        || (c.col_stride == 1
            && c.batch_stride >= n
            && c.row_stride >= (batch - 1) * c.batch_stride + n)
}

/// Raw pointers that may cross threads; only used for batch entries proven disjoint.
#[derive(Clone, Copy)]
struct SendPtrs(
    /// Start of A's buffer.
    *const f32,
    /// Start of B's buffer.
    *const f32,
    /// Start of C's buffer.
    *mut f32,
);
// SAFETY: the pointers are only dereferenced by `matrixmultiply::sgemm` on in-bounds,
// pairwise-disjoint output matrices (checked by `batches_disjoint`) and read-only inputs.
unsafe impl Send for SendPtrs {}
unsafe impl Sync for SendPtrs {}

/// Elementwise ops split their input into chunks of this many values for the thread pool.
const ELEMENTWISE_CHUNK: usize = 4096;

impl Backend for CpuBackend {
    type Buf = Vec<f32>;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn capacity(&self, buf: &Vec<f32>) -> usize {
        buf.capacity()
    }

    fn reuse(&self, mut buf: Vec<f32>, len: usize) -> Result<Vec<f32>> {
        // Within the capacity this writes zeros into pages that are already mapped.
        buf.clear();
        buf.resize(len, 0.0);
        Ok(buf)
    }

    fn upload(&self, src: &[f32], buf: &mut Vec<f32>) -> Result<()> {
        checks::check("upload", src.len(), buf.len())?;
        buf[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn download(&self, buf: &Vec<f32>, offset: usize, out: &mut [f32]) -> Result<()> {
        checks::check("download", offset + out.len(), buf.len())?;
        out.copy_from_slice(&buf[offset..offset + out.len()]);
        Ok(())
    }

    fn fill_zero(&self, buf: &mut Vec<f32>) -> Result<()> {
        buf.fill(0.0);
        Ok(())
    }

    fn copy(
        &self,
        src: &Vec<f32>,
        src_at: MatLayout,
        dst: &mut Vec<f32>,
        dst_at: MatLayout,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        checks::copy(src.len(), &src_at, dst.len(), &dst_at, rows, cols)?;
        for i in 0..rows {
            let s = src_at.offset + i * src_at.row_stride;
            let d = dst_at.offset + i * dst_at.row_stride;
            if src_at.col_stride == 1 && dst_at.col_stride == 1 {
                dst[d..d + cols].copy_from_slice(&src[s..s + cols]);
            } else {
                for j in 0..cols {
                    dst[d + j * dst_at.col_stride] = src[s + j * src_at.col_stride];
                }
            }
        }
        Ok(())
    }

    fn add_assign(&self, dst: &mut Vec<f32>, src: &Vec<f32>, len: usize) -> Result<()> {
        checks::add_assign(dst.len(), src.len(), len)?;
        for (d, s) in dst[..len].iter_mut().zip(&src[..len]) {
            *d += s;
        }
        Ok(())
    }

    fn gemm(&self, g: &Gemm, a: &Vec<f32>, b: &Vec<f32>, c: &mut Vec<f32>) -> Result<()> {
        if g.batch == 0 || g.m == 0 || g.n == 0 {
            return Ok(());
        }
        checks::gemm(g, a.len(), b.len(), c.len())?;
        match self.products {
            Products::F32 => gemm_f32(g, a, b, c),
            Products::Bf16 => {
                let (a_bf16, a_at) = rounded_to_bf16(a, g.a, g.batch, g.m, g.k);
                let (b_bf16, b_at) = rounded_to_bf16(b, g.b, g.batch, g.k, g.n);
                gemm_f32(
                    &Gemm {
                        a: a_at,
                        b: b_at,
                        ..*g
                    },
                    &a_bf16,
                    &b_bf16,
                    c,
                );
            }
        }
        Ok(())
    }

    fn embed(
        &self,
        tok_emb: &Vec<f32>,
        tokens: &[u32],
        out: &mut Vec<f32>,
        d: usize,
    ) -> Result<()> {
        checks::embed("embed", tok_emb.len(), tokens, out.len(), d)?;
        for (r, &t) in tokens.iter().enumerate() {
            let t = t as usize * d;
            out[r * d..(r + 1) * d].copy_from_slice(&tok_emb[t..t + d]);
        }
        Ok(())
    }

    fn embed_backward(
        &self,
        d_out: &Vec<f32>,
        tokens: &[u32],
        d_tok: &mut Vec<f32>,
        d: usize,
    ) -> Result<()> {
        checks::embed("embed_backward", d_tok.len(), tokens, d_out.len(), d)?;
        for (r, &t) in tokens.iter().enumerate() {
            let t = t as usize * d;
            for (o, v) in d_tok[t..t + d].iter_mut().zip(&d_out[r * d..(r + 1) * d]) {
                *o += v;
            }
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        eps: f32,
        x: &Vec<f32>,
        gamma: &Vec<f32>,
        out: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        checks::rms_norm(x.len(), gamma.len(), out.len(), rstd.len(), rows, cols)?;
        // Statistics first (cheap, serial), then the normalised rows (in parallel).
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
            rstd[r] = (1.0 / (ms + eps as f64).sqrt()) as f32;
        }
        let rstd = &rstd[..];
        for_rows(&mut out[..rows * cols], cols, |r, or| {
            let xr = &x[r * cols..(r + 1) * cols];
            for j in 0..cols {
                or[j] = xr[j] * rstd[r] * gamma[j];
            }
        });
        Ok(())
    }

    fn rms_norm_backward(
        &self,
        x: &Vec<f32>,
        gamma: &Vec<f32>,
        rstd: &Vec<f32>,
        d_out: &Vec<f32>,
        dx: &mut Vec<f32>,
        d_gamma: &mut Vec<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        checks::rms_norm_backward(
            x.len(),
            gamma.len(),
            rstd.len(),
            d_out.len(),
            dx.len(),
            d_gamma.len(),
            rows,
            cols,
        )?;
        // Parameter gradients: a reduction over rows (serial).
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            let gr = &d_out[r * cols..(r + 1) * cols];
            for j in 0..cols {
                d_gamma[j] += gr[j] * xr[j] * rstd[r];
            }
        }
        // Input gradients: independent per row (in parallel).
        for_rows(&mut dx[..rows * cols], cols, |r, dr| {
            let xr = &x[r * cols..(r + 1) * cols];
            let gr = &d_out[r * cols..(r + 1) * cols];
            // With xhat = x·rstd and dxhat = d_out·gamma: dx = rstd·(dxhat − xhat·mean(dxhat·xhat)).
            let m2 = (0..cols)
                .map(|j| (gr[j] * gamma[j] * xr[j] * rstd[r]) as f64)
                .sum::<f64>()
                / cols as f64;
            let m2 = m2 as f32;
            for j in 0..cols {
                let xhat = xr[j] * rstd[r];
                dr[j] += rstd[r] * (gr[j] * gamma[j] - xhat * m2);
            }
        });
        Ok(())
    }

    fn add_bias(&self, x: &mut Vec<f32>, bias: &Vec<f32>, rows: usize, cols: usize) -> Result<()> {
        checks::bias("add_bias", x.len(), bias.len(), rows, cols)?;
        for_rows(&mut x[..rows * cols], cols, |_, xr| {
            xr.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        });
        Ok(())
    }

    fn bias_backward(
        &self,
        d_out: &Vec<f32>,
        d_bias: &mut Vec<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        checks::bias("bias_backward", d_out.len(), d_bias.len(), rows, cols)?;
        for gr in d_out[..rows * cols].chunks_exact(cols) {
            d_bias.iter_mut().zip(gr).for_each(|(b, g)| *b += g);
        }
        Ok(())
    }

    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>, len: usize) -> Result<()> {
        checks::elementwise("swiglu", &[gate.len(), up.len(), out.len()], len)?;
        for_rows(&mut out[..len], ELEMENTWISE_CHUNK, |i, o| {
            let at = i * ELEMENTWISE_CHUNK;
            for ((o, &g), &u) in o.iter_mut().zip(&gate[at..]).zip(&up[at..]) {
                *o = g * sigmoid(g) * u;
            }
        });
        Ok(())
    }

    fn swiglu_backward(
        &self,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        d_out: &Vec<f32>,
        d_gate: &mut Vec<f32>,
        d_up: &mut Vec<f32>,
        len: usize,
    ) -> Result<()> {
        let lens = [gate.len(), up.len(), d_out.len(), d_gate.len(), d_up.len()];
        checks::elementwise("swiglu_backward", &lens, len)?;
        for_rows(&mut d_up[..len], ELEMENTWISE_CHUNK, |i, du| {
            let at = i * ELEMENTWISE_CHUNK;
            for ((du, &g), &d) in du.iter_mut().zip(&gate[at..]).zip(&d_out[at..]) {
                *du = d * g * sigmoid(g);
            }
        });
        for_rows(&mut d_gate[..len], ELEMENTWISE_CHUNK, |i, dg| {
            let at = i * ELEMENTWISE_CHUNK;
            for (j, dg) in dg.iter_mut().enumerate() {
                let (g, u, d) = (gate[at + j], up[at + j], d_out[at + j]);
                let s = sigmoid(g);
                // d silu(g)/dg = s·(1 + g·(1 − s)).
                *dg = d * u * s * (1.0 + g * (1.0 - s));
            }
        });
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        positions: &[u32],
        cos: &Vec<f32>,
        sin: &Vec<f32>,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) -> Result<()> {
        let (rows, half, width) = (positions.len(), hd / 2, heads * hd);
        checks::rope(x.len(), positions, cos.len(), sin.len(), heads, hd)?;
        let sign = if inverse { -1.0 } else { 1.0 };
        for_rows(&mut x[..rows * width], width, |r, xr| {
            let at = positions[r] as usize * half;
            let (c, s) = (&cos[at..at + half], &sin[at..at + half]);
            for head in xr.chunks_exact_mut(hd) {
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b, si) = (lo[i], hi[i], sign * s[i]);
                    // (a, b) ↦ (a·cos − b·sin, b·cos + a·sin): x·cos + rotate_half(x)·sin.
                    lo[i] = a * c[i] - b * si;
                    hi[i] = b * c[i] + a * si;
                }
            }
        });
        Ok(())
    }

    fn causal_softmax(
        &self,
        scores: &mut Vec<f32>,
        offset: usize,
        batch: usize,
        rows: usize,
        cols: usize,
        past: usize,
    ) -> Result<()> {
        checks::check("causal_softmax", offset + batch * rows * cols, scores.len())?;
        let block = &mut scores[offset..offset + batch * rows * cols];
        for_rows(block, cols, |r, row| {
            {
                // Row r is query r % rows of batch entry r / rows.
                let i = r % rows;
                let valid = (past + i + 1).min(cols);
                let max = row[..valid]
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut sum = 0.0f32;
                for v in &mut row[..valid] {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                let inv = 1.0 / sum;
                for v in &mut row[..valid] {
                    *v *= inv;
                }
                row[valid..].fill(0.0);
            }
        });
        Ok(())
    }

    fn softmax_backward(
        &self,
        p: &Vec<f32>,
        p_offset: usize,
        dp: &mut Vec<f32>,
        dp_offset: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        checks::softmax_backward(p.len(), p_offset, dp.len(), dp_offset, rows, cols)?;
        let block = &mut dp[dp_offset..dp_offset + rows * cols];
        for_rows(block, cols, |r, dr| {
            let pr = &p[p_offset + r * cols..p_offset + (r + 1) * cols];
            let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
            for (d, &pv) in dr.iter_mut().zip(pr) {
                *d = pv * (*d - dot);
            }
        });
        Ok(())
    }

    fn token_logprobs(
        &self,
        logits: &Vec<f32>,
        targets: &[u32],
        vocab: usize,
        logprob: &mut [f32],
        entropy: &mut [f32],
    ) -> Result<()> {
        let rows = targets.len();
        let per_row = [logprob.len(), entropy.len()];
        checks::token_logprobs("token_logprobs", &[logits.len()], &per_row, targets, vocab)?;
        let one = |(r, (lp, ent)): (usize, (&mut f32, &mut f32))| {
            let t = targets[r];
            if t == IGNORE_TARGET {
                (*lp, *ent) = (0.0, 0.0);
                return;
            }
            let z = &logits[r * vocab..(r + 1) * vocab];
            let (lse, h) = lse_entropy(z);
            *lp = (z[t as usize] as f64 - lse) as f32;
            *ent = h as f32;
        };
        let (logprob, entropy) = (&mut logprob[..rows], &mut entropy[..rows]);
        if rows * vocab >= PAR_MIN {
            logprob
                .par_iter_mut()
                .zip(entropy.par_iter_mut())
                .enumerate()
                .for_each(one);
        } else {
            logprob
                .iter_mut()
                .zip(entropy.iter_mut())
                .enumerate()
                .for_each(one);
        }
        Ok(())
    }

    fn token_logprobs_backward(
        &self,
        logits: &Vec<f32>,
        targets: &[u32],
        vocab: usize,
        d_logprob: &[f32],
        d_entropy: &[f32],
        d_logits: &mut Vec<f32>,
    ) -> Result<()> {
        let rows = targets.len();
        checks::token_logprobs(
            "token_logprobs_backward",
            &[logits.len(), d_logits.len()],
            &[d_logprob.len(), d_entropy.len()],
            targets,
            vocab,
        )?;
        for_rows(&mut d_logits[..rows * vocab], vocab, |r, dz| {
            let t = targets[r];
            if t == IGNORE_TARGET || (d_logprob[r] == 0.0 && d_entropy[r] == 0.0) {
                dz.fill(0.0);
                return;
            }
            let z = &logits[r * vocab..(r + 1) * vocab];
            let (lse, ent) = lse_entropy(z);
            let (glp, gent) = (d_logprob[r] as f64, d_entropy[r] as f64);
            for (j, (d, &zj)) in dz.iter_mut().zip(z).enumerate() {
                let logp = zj as f64 - lse;
                let p = logp.exp();
                let onehot = if j == t as usize { 1.0 } else { 0.0 };
                // d logp_t / dz_j = 1[j=t] − p_j;  dH/dz_j = −p_j (log p_j + H).
                *d = (glp * (onehot - p) - gent * p * (logp + ent)) as f32;
            }
        });
        Ok(())
    }

    fn sum_squares(&self, buf: &Vec<f32>, len: usize, out: &mut Vec<f64>) -> Result<()> {
        checks::check("sum_squares", len, buf.len())?;
        sum_squares_blocks(&buf[..len], out);
        Ok(())
    }

    fn adamw(
        &self,
        step: &AdamWStep,
        w: &mut Vec<f32>,
        g: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        rounded: Option<&mut Vec<f32>>,
        len: usize,
    ) -> Result<()> {
        let rounded_len = rounded.as_ref().map_or(len, |r| r.len());
        checks::adamw(len, &[w.len(), g.len(), m.len(), v.len(), rounded_len])?;
        step.apply_tensor(
            &mut w[..len],
            &g[..len],
            &mut m[..len],
            &mut v[..len],
            rounded.map(|r| (&mut r[..len], WeightDtype::Bf16)),
        );
        Ok(())
    }
}

/// The logistic function; saturates cleanly to 0 and 1 (exp overflowing to ∞ gives 0).
#[inline]
fn sigmoid(y: f32) -> f32 {
    1.0 / (1.0 + (-y).exp())
}

/// Products with at most this many rows of A (single-token decoding) use [`gemm_small`]:
/// `matrixmultiply` packs its operands into a freshly allocated buffer on every call, which
/// costs more than the product itself for one row and would allocate per sampled token.
const SMALL_M: usize = 4;

/// The f32 product of [`Backend::gemm`] (operands checked by the caller).
fn gemm_f32(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    if g.m <= SMALL_M {
        gemm_small(g, a, b, c);
        return;
    }
    let ptrs = SendPtrs(a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    // Rows `rows` of batch entry `bi`.
    let block = |bi: usize, rows: Range<usize>| {
        let p = ptrs;
        let (a_at, c_at) = (
            g.a.offset + bi * g.a.batch_stride + rows.start * g.a.row_stride,
            g.c.offset + bi * g.c.batch_stride + rows.start * g.c.row_stride,
        );
        // SAFETY: every element touched is within the buffers (checked above), `c` is a
        // distinct, exclusively borrowed buffer, its strides do not alias, and blocks run
        // concurrently only when their outputs are disjoint (batch entries: checked by
        // `batches_disjoint`; row blocks: rows of a row-major C are disjoint ranges).
        unsafe {
            matrixmultiply::sgemm(
                rows.len(),
                g.k,
                g.n,
                g.alpha,
                p.0.add(a_at),
                g.a.row_stride as isize,
                g.a.col_stride as isize,
                p.1.add(g.b.offset + bi * g.b.batch_stride),
                g.b.row_stride as isize,
                g.b.col_stride as isize,
                g.beta,
                p.2.add(c_at),
                g.c.row_stride as isize,
                g.c.col_stride as isize,
            );
        }
    };
    let work = g.m * g.k * g.n;
    if g.batch > 1
        && work <= PAR_GEMM_MAX
        && g.batch * work >= PAR_GEMM_MIN
        && batches_disjoint(&g.c, g.batch, g.m, g.n)
    {
        (0..g.batch)
            .into_par_iter()
            .for_each(|bi| block(bi, 0..g.m));
        return;
    }
    let blocks = (g.m / PAR_GEMM_ROWS).min(rayon::current_num_threads());
    let rows_disjoint = g.c.col_stride == 1 && g.c.row_stride >= g.n;
    for bi in 0..g.batch {
        if work >= PAR_GEMM_MIN && blocks > 1 && rows_disjoint {
            let per = g.m.div_ceil(blocks);
            (0..blocks)
                .into_par_iter()
                .for_each(|i| block(bi, i * per..((i + 1) * per).min(g.m)));
        } else {
            block(bi, 0..g.m);
        }
    }
}

/// The values of `buf` that `at` reads for a `batch × rows × cols` operand, rounded to bf16,
/// and `at` moved to read them from the copy.
fn rounded_to_bf16(
    buf: &[f32],
    at: MatLayout,
    batch: usize,
    rows: usize,
    cols: usize,
) -> (Vec<f32>, MatLayout) {
    let end = at.end(batch, rows, cols).max(at.offset);
    let values = buf[at.offset..end]
        .iter()
        .map(|&v| WeightDtype::Bf16.round(v))
        .collect();
    (values, MatLayout { offset: 0, ..at })
}

/// A loop implementation of [`Gemm`] for few rows; allocates nothing. Bounds were checked by
/// the caller.
fn gemm_small(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    for bi in 0..g.batch {
        let (a0, b0, c0) = (
            g.a.offset + bi * g.a.batch_stride,
            g.b.offset + bi * g.b.batch_stride,
            g.c.offset + bi * g.c.batch_stride,
        );
        for i in 0..g.m {
            let ci = c0 + i * g.c.row_stride;
            let ai = a0 + i * g.a.row_stride;
            if g.b.col_stride == 1 && g.c.col_stride == 1 {
                // Rows of B are contiguous: accumulate alpha·a_ik·B[k, :] into the row of C.
                let crow = &mut c[ci..ci + g.n];
                if g.beta == 0.0 {
                    crow.fill(0.0);
                } else if g.beta != 1.0 {
                    crow.iter_mut().for_each(|v| *v *= g.beta);
                }
                for kk in 0..g.k {
                    let s = g.alpha * a[ai + kk * g.a.col_stride];
                    let bk = b0 + kk * g.b.row_stride;
                    for (cv, bv) in crow.iter_mut().zip(&b[bk..bk + g.n]) {
                        *cv += s * bv;
                    }
                }
            } else {
                // Columns of B are (typically) contiguous, as in q·kᵀ: one dot product each.
                for j in 0..g.n {
                    let bj = b0 + j * g.b.col_stride;
                    let acc = if g.a.col_stride == 1 && g.b.row_stride == 1 {
                        dot(&a[ai..ai + g.k], &b[bj..bj + g.k])
                    } else {
                        let mut acc = 0.0f32;
                        for kk in 0..g.k {
                            acc += a[ai + kk * g.a.col_stride] * b[bj + kk * g.b.row_stride];
                        }
                        acc
                    };
                    let cv = &mut c[ci + j * g.c.col_stride];
                    *cv = if g.beta == 0.0 {
                        g.alpha * acc
                    } else {
                        g.alpha * acc + g.beta * *cv
                    };
                }
            }
        }
    }
}

/// Dot product with 8 independent accumulators, so that the compiler vectorises it (a single
/// running sum is a serial dependency chain in strict IEEE arithmetic).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Log-sum-exp and entropy of the softmax of `z`, in f64.
fn lse_entropy(z: &[f32]) -> (f64, f64) {
    let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = z.iter().map(|&v| (v as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    let ent = -z
        .iter()
        .map(|&v| {
            let logp = v as f64 - lse;
            logp.exp() * logp
        })
        .sum::<f64>();
    (lse, ent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The reference: a triple loop in f64.
    fn naive(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        for bi in 0..g.batch {
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut acc = 0.0f64;
                    for kk in 0..g.k {
                        let ai = g.a.offset + bi * g.a.batch_stride;
                        let bj = g.b.offset + bi * g.b.batch_stride;
                        acc += a[ai + i * g.a.row_stride + kk * g.a.col_stride] as f64
                            * b[bj + kk * g.b.row_stride + j * g.b.col_stride] as f64;
                    }
                    let ci = g.c.offset
                        + bi * g.c.batch_stride
                        + i * g.c.row_stride
                        + j * g.c.col_stride;
                    let old = if g.beta == 0.0 {
                        0.0
                    } else {
                        c[ci] as f64 * g.beta as f64
                    };
                    c[ci] = (g.alpha as f64 * acc + old) as f32;
                }
            }
        }
    }

    /// Random A, B and C buffers covering `g`'s views.
    fn operands(g: &Gemm, rng: &mut ChaCha8Rng) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut fill =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
        (
            fill(g.a.end(g.batch, g.m, g.k)),
            fill(g.b.end(g.batch, g.k, g.n)),
            fill(g.c.end(g.batch, g.m, g.n)),
        )
    }

    #[test]
    fn gemm_matches_naive_for_strided_transposed_batched_views() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let be = CpuBackend::default();
        for case in 0..200 {
            let (m, k, n, batch) = (
                rng.random_range(1..10),
                rng.random_range(1..9),
                rng.random_range(1..9),
                rng.random_range(1..4),
            );
            let mut layout = |rows: usize, cols: usize| {
                let pad = rng.random_range(0..3);
                let off = rng.random_range(0..5);
                let base = if rng.random_bool(0.5) {
                    MatLayout::at(off, cols + pad)
                } else {
                    MatLayout::at(off, rows + pad).t()
                };
                base.batched(base.end(1, rows, cols) + rng.random_range(0..3))
            };
            let g = Gemm {
                m,
                k,
                n,
                batch,
                alpha: [1.0, 0.5][case % 2],
                beta: [0.0, 1.0, 0.3][case % 3],
                a: layout(m, k),
                b: layout(k, n),
                c: layout(m, n),
            };
            let (a, b, c0) = operands(&g, &mut rng);
            let mut want = c0.clone();
            naive(&g, &a, &b, &mut want);
            let mut got = c0.clone();
            be.gemm(&g, &a, &b, &mut got).unwrap();
            let mut small = c0.clone();
            gemm_small(&g, &a, &b, &mut small);
            for i in 0..want.len() {
                assert!((want[i] - got[i]).abs() < 1e-5, "case {case}: {g:?}");
                assert!(
                    (want[i] - small[i]).abs() < 1e-5,
                    "case {case} small: {g:?}"
                );
            }
        }
    }

    #[test]
    fn bf16_products_are_the_f32_products_of_operands_rounded_to_bf16() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (f32_be, bf16_be) = (CpuBackend::default(), CpuBackend::new(Products::Bf16));
        let round =
            |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| WeightDtype::Bf16.round(x)).collect() };
        let mut differs = false;
        for case in 0..100 {
            let (m, k, n) = (
                rng.random_range(1..40),
                rng.random_range(1..9),
                rng.random_range(1..9),
            );
            let off = rng.random_range(0..5);
            let a_at = if case % 2 == 0 {
                MatLayout::at(off, k + 1)
            } else {
                MatLayout::at(off, m).t()
            };
            let g = Gemm {
                m,
                k,
                n,
                batch: 1,
                alpha: 0.5,
                beta: [0.0, 1.0][case % 2],
                a: a_at,
                b: MatLayout::at(3, n),
                c: MatLayout::row_major(n),
            };
            let (a, b, c0) = operands(&g, &mut rng);
            let mut got = c0.clone();
            bf16_be.gemm(&g, &a, &b, &mut got).unwrap();
            let mut want = c0.clone();
            f32_be.gemm(&g, &round(&a), &round(&b), &mut want).unwrap();
            assert_eq!(got, want, "case {case}: {g:?}");
            let mut exact = c0.clone();
            f32_be.gemm(&g, &a, &b, &mut exact).unwrap();
            differs |= exact != got;
        }
        assert!(differs, "rounding to bf16 changed no product");
    }

    /// Large inputs take the parallel paths; running the same op on small row blocks (the
    /// serial paths) must give bit-identical results.
    #[test]
    fn parallel_row_ops_equal_serial_ones() {
        let be = CpuBackend::default();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (rows, cols) = (2 * PAR_MIN / 64 + 3, 64);
        let n = rows * cols;
        assert!(n >= PAR_MIN);
        let rand_vec = |len: usize, rng: &mut ChaCha8Rng| -> Vec<f32> {
            (0..len).map(|_| rng.random_range(-3.0..3.0)).collect()
        };
        let x = rand_vec(n, &mut rng);
        let dy = rand_vec(n, &mut rng);
        let gamma = rand_vec(cols, &mut rng);
        let block = 5; // rows per serial call
        let serial = |f: &mut dyn FnMut(Range<usize>)| {
            let mut r = 0;
            while r < rows {
                let e = (r + block).min(rows);
                f(r..e);
                r = e;
            }
        };

        // SwiGLU and its backward.
        let up = rand_vec(n, &mut rng);
        let mut par = vec![0.0; n];
        be.swiglu(&x, &up, &mut par, n).unwrap();
        let (mut par_dg, mut par_du) = (vec![0.0; n], vec![0.0; n]);
        be.swiglu_backward(&x, &up, &dy, &mut par_dg, &mut par_du, n)
            .unwrap();
        let (mut ser, mut ser_dg, mut ser_du) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        serial(&mut |r: Range<usize>| {
            let (a, b) = (r.start * cols, r.end * cols);
            let (xs, us, ds) = (x[a..b].to_vec(), up[a..b].to_vec(), dy[a..b].to_vec());
            let mut o = vec![0.0; b - a];
            be.swiglu(&xs, &us, &mut o, b - a).unwrap();
            ser[a..b].copy_from_slice(&o);
            let (mut dg, mut du) = (vec![0.0; b - a], vec![0.0; b - a]);
            be.swiglu_backward(&xs, &us, &ds, &mut dg, &mut du, b - a)
                .unwrap();
            ser_dg[a..b].copy_from_slice(&dg);
            ser_du[a..b].copy_from_slice(&du);
        });
        assert_eq!(par, ser);
        assert_eq!(par_dg, ser_dg);
        assert_eq!(par_du, ser_du);

        // RMSNorm and its backward.
        let (mut out, mut rstd) = (vec![0.0; n], vec![0.0; rows]);
        be.rms_norm(1e-5, &x, &gamma, &mut out, &mut rstd, rows, cols)
            .unwrap();
        let (mut dx, mut dg) = (dy.clone(), vec![0.0; cols]);
        be.rms_norm_backward(&x, &gamma, &rstd, &dy, &mut dx, &mut dg, rows, cols)
            .unwrap();
        let (mut s_out, mut s_dx, mut s_dg) = (vec![0.0; n], dy.clone(), vec![0.0; cols]);
        serial(&mut |r: Range<usize>| {
            let (a, b, k) = (r.start * cols, r.end * cols, r.len());
            let (mut o, mut st) = (vec![0.0; b - a], vec![0.0; k]);
            let xs = x[a..b].to_vec();
            be.rms_norm(1e-5, &xs, &gamma, &mut o, &mut st, k, cols)
                .unwrap();
            s_out[a..b].copy_from_slice(&o);
            let mut d = dy[a..b].to_vec();
            be.rms_norm_backward(
                &xs,
                &gamma,
                &st,
                &dy[a..b].to_vec(),
                &mut d,
                &mut s_dg,
                k,
                cols,
            )
            .unwrap();
            s_dx[a..b].copy_from_slice(&d);
        });
        assert_eq!(out, s_out);
        assert_eq!(dx, s_dx);
        assert_eq!(dg, s_dg);

        // RoPE, and its inverse undoing it.
        let half = cols / 4;
        let positions: Vec<u32> = (0..rows as u32).map(|r| r % 7).collect();
        let (cos, sin) = (rand_vec(7 * half, &mut rng), rand_vec(7 * half, &mut rng));
        let mut par = x.clone();
        be.rope(&mut par, &positions, &cos, &sin, 2, cols / 2, false)
            .unwrap();
        let mut ser = x.clone();
        serial(&mut |r: Range<usize>| {
            let (a, b) = (r.start * cols, r.end * cols);
            let mut blk = x[a..b].to_vec();
            be.rope(
                &mut blk,
                &positions[r.clone()],
                &cos,
                &sin,
                2,
                cols / 2,
                false,
            )
            .unwrap();
            ser[a..b].copy_from_slice(&blk);
        });
        assert_eq!(par, ser);

        // Causal softmax (as one batch of `rows` queries) and its backward.
        let mut p = x.clone();
        be.causal_softmax(&mut p, 0, 1, rows, cols, 3).unwrap();
        let mut dp = dy.clone();
        be.softmax_backward(&p, 0, &mut dp, 0, rows, cols).unwrap();
        let (mut s_p, mut s_dp) = (x.clone(), dy.clone());
        serial(&mut |r: Range<usize>| {
            // Queries r.start.. see 3 + r.start + i + 1 keys: a block at past = 3 + r.start.
            let (a, b) = (r.start * cols, r.end * cols);
            let mut blk = x[a..b].to_vec();
            be.causal_softmax(&mut blk, 0, 1, r.len(), cols, 3 + r.start)
                .unwrap();
            s_p[a..b].copy_from_slice(&blk);
            let mut d = dy[a..b].to_vec();
            be.softmax_backward(&blk, 0, &mut d, 0, r.len(), cols)
                .unwrap();
            s_dp[a..b].copy_from_slice(&d);
        });
        assert_eq!(p, s_p);
        assert_eq!(dp, s_dp);

        // Token log-probs and their backward (every fourth row ignored).
        let targets: Vec<u32> = (0..rows)
            .map(|r| {
                if r % 4 == 0 {
                    IGNORE_TARGET
                } else {
                    (r % cols) as u32
                }
            })
            .collect();
        let (mut lp, mut ent) = (vec![0.0; rows], vec![0.0; rows]);
        be.token_logprobs(&x, &targets, cols, &mut lp, &mut ent)
            .unwrap();
        let dlp = rand_vec(rows, &mut rng);
        let dent = rand_vec(rows, &mut rng);
        let mut dz = vec![0.0; n];
        be.token_logprobs_backward(&x, &targets, cols, &dlp, &dent, &mut dz)
            .unwrap();
        let (mut s_lp, mut s_ent, mut s_dz) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; n]);
        serial(&mut |r: Range<usize>| {
            let (a, b) = (r.start * cols, r.end * cols);
            let xs = x[a..b].to_vec();
            be.token_logprobs(
                &xs,
                &targets[r.clone()],
                cols,
                &mut s_lp[r.clone()],
                &mut s_ent[r.clone()],
            )
            .unwrap();
            let mut d = vec![0.0; b - a];
            be.token_logprobs_backward(
                &xs,
                &targets[r.clone()],
                cols,
                &dlp[r.clone()],
                &dent[r.clone()],
                &mut d,
            )
            .unwrap();
            s_dz[a..b].copy_from_slice(&d);
        });
        assert_eq!(lp, s_lp);
        assert_eq!(ent, s_ent);
        assert_eq!(dz, s_dz);
    }

    /// Products large enough to be split by rows of the output, plain and batched, with a
    /// transposed operand and accumulation into C.
    #[test]
    fn split_gemm_matches_naive() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let be = CpuBackend::default();
        let (m, k, n, batch) = (200, 128, 96, 2);
        assert!(m * k * n >= PAR_GEMM_MIN && m / PAR_GEMM_ROWS > 1);
        let g = Gemm {
            m,
            k,
            n,
            batch,
            alpha: 0.5,
            beta: 1.0,
            a: MatLayout::row_major(k).batched(m * k),
            b: MatLayout::row_major(k).t().batched(k * n),
            c: MatLayout::at(3, n + 5).batched(m * (n + 5)),
        };
        let (a, b, c0) = operands(&g, &mut rng);
        let mut want = c0.clone();
        naive(&g, &a, &b, &mut want);
        let mut got = c0;
        be.gemm(&g, &a, &b, &mut got).unwrap();
        for (w, v) in want.iter().zip(&got) {
            assert!((w - v).abs() < 1e-4, "{w} vs {v}");
        }
    }

    /// Attention heads: side-by-side column blocks of one matrix, written in parallel.
    #[test]
    fn parallel_head_gemm_matches_naive() {
        let be = CpuBackend::default();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        // Large enough in all for the batch entries to run in parallel.
        let (n_rows, heads, hd) = (64, 16, 32);
        let d = heads * hd;
        let work = n_rows * n_rows * hd;
        assert!(work <= PAR_GEMM_MAX && heads * work >= PAR_GEMM_MIN);
        let q: Vec<f32> = (0..n_rows * d)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let p: Vec<f32> = (0..heads * n_rows * n_rows)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        let g = Gemm {
            m: n_rows,
            k: n_rows,
            n: hd,
            batch: heads,
            alpha: 1.0,
            beta: 0.0,
            a: MatLayout::row_major(n_rows).batched(n_rows * n_rows),
            b: MatLayout::at(0, d).batched(hd),
            c: MatLayout::at(0, d).batched(hd),
        };
        assert!(batches_disjoint(&g.c, g.batch, g.m, g.n));
        let mut want = vec![0.0; n_rows * d];
        naive(&g, &p, &q, &mut want);
        let mut got = vec![0.0; n_rows * d];
        be.gemm(&g, &p, &q, &mut got).unwrap();
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() < 1e-4);
        }
        // Overlapping outputs are never written concurrently.
        let overlapping = MatLayout::at(0, d).batched(1);
        assert!(!batches_disjoint(&overlapping, heads, n_rows, hd));
    }

    #[test]
    fn out_of_bounds_views_are_errors() {
        let be = CpuBackend::default();
        let g = Gemm {
            m: 2,
            k: 2,
            n: 2,
            batch: 1,
            alpha: 1.0,
            beta: 0.0,
            a: MatLayout::row_major(2),
            b: MatLayout::row_major(2),
            c: MatLayout::row_major(2),
        };
        let mut c = vec![0.0; 3];
        assert!(be.gemm(&g, &vec![0.0; 4], &vec![0.0; 4], &mut c).is_err());
        assert!(be.add_assign(&mut vec![0.0; 2], &vec![0.0; 3], 3).is_err());
        assert!(
            be.token_logprobs(&vec![0.0; 4], &[5], 4, &mut [0.0], &mut [0.0])
                .is_err()
        );
    }
}
