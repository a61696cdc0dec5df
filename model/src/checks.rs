//! The bounds every [`crate::Backend`] checks before an op touches memory: one function per
//! op, over the lengths of its buffers, shared by the CPU and the CUDA backends.

use crate::backend::{Gemm, IGNORE_TARGET, MatLayout};
use crate::error::{ModelError, Result};

/// Fails unless `end` values fit in a buffer of `len`. `what` is formatted only on failure
/// (the ops run per sampled token, which must not allocate).
pub(crate) fn check(what: impl std::fmt::Display, end: usize, len: usize) -> Result<()> {
    if end > len {
        return Err(ModelError::Backend(format!(
            "{what}: view needs {end} values but the buffer holds {len}"
        )));
    }
    Ok(())
}

/// Fails if a target is neither a token of the vocabulary nor [`IGNORE_TARGET`].
pub(crate) fn check_targets(targets: &[u32], vocab: usize) -> Result<()> {
    match targets
        .iter()
        .find(|&&t| t != IGNORE_TARGET && t as usize >= vocab)
    {
        Some(t) => Err(ModelError::InvalidInput(format!(
            "target token {t} is outside the vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

pub(crate) fn copy(
    src: usize,
    src_at: &MatLayout,
    dst: usize,
    dst_at: &MatLayout,
    rows: usize,
    cols: usize,
) -> Result<()> {
    check("copy src", src_at.end(1, rows, cols), src)?;
    check("copy dst", dst_at.end(1, rows, cols), dst)
}

/// The buffers of an AdamW step (weights, gradient, moments and the rounded copy if any).
pub(crate) fn adamw(len: usize, bufs: &[usize]) -> Result<()> {
    for &buf in bufs {
        check("adamw", len, buf)?;
    }
    Ok(())
}

pub(crate) fn add_assign(dst: usize, src: usize, len: usize) -> Result<()> {
    check("add_assign dst", len, dst)?;
    check("add_assign src", len, src)
}

/// The views of a product with at least one output (callers return early on an empty one).
pub(crate) fn gemm(g: &Gemm, a: usize, b: usize, c: usize) -> Result<()> {
    check("gemm A", g.a.end(g.batch, g.m, g.k), a)?;
    check("gemm B", g.b.end(g.batch, g.k, g.n), b)?;
    check("gemm C", g.c.end(g.batch, g.m, g.n), c)?;
    if (g.m > 1 && g.c.row_stride == 0) || (g.n > 1 && g.c.col_stride == 0) {
        return Err(ModelError::Backend(
            "gemm C: zero stride aliases outputs".into(),
        ));
    }
    Ok(())
}

/// `embed` and `embed_backward`: `rows` is the buffer of `tokens.len()` rows of `d`, `table`
/// the embedding (or its gradient).
pub(crate) fn embed(what: &str, table: usize, tokens: &[u32], rows: usize, d: usize) -> Result<()> {
    check(format_args!("{what} rows"), tokens.len() * d, rows)?;
    if let Some(&t) = tokens.iter().max() {
        check(format_args!("{what} token"), (t as usize + 1) * d, table)?;
    }
    Ok(())
}

pub(crate) fn rms_norm(
    x: usize,
    gamma: usize,
    out: usize,
    rstd: usize,
    rows: usize,
    cols: usize,
) -> Result<()> {
    check("rms_norm x", rows * cols, x)?;
    check("rms_norm out", rows * cols, out)?;
    check("rms_norm rstd", rows, rstd)?;
    check("rms_norm gamma", cols, gamma)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn rms_norm_backward(
    x: usize,
    gamma: usize,
    rstd: usize,
    d_out: usize,
    dx: usize,
    d_gamma: usize,
    rows: usize,
    cols: usize,
) -> Result<()> {
    check("rms_norm_backward x", rows * cols, x)?;
    check("rms_norm_backward d_out", rows * cols, d_out)?;
    check("rms_norm_backward dx", rows * cols, dx)?;
    check("rms_norm_backward rstd", rows, rstd)?;
    check("rms_norm_backward gamma", cols, gamma)?;
    check("rms_norm_backward d_gamma", cols, d_gamma)
}

/// `add_bias` and `bias_backward`: `x` is the `rows × cols` block, `bias` its bias (gradient).
pub(crate) fn bias(what: &str, x: usize, bias: usize, rows: usize, cols: usize) -> Result<()> {
    check(format_args!("{what} rows"), rows * cols, x)?;
    check(format_args!("{what} bias"), cols, bias)
}

/// Element-wise ops: every buffer holds at least `len` values.
pub(crate) fn elementwise(what: &str, bufs: &[usize], len: usize) -> Result<()> {
    bufs.iter().try_for_each(|&n| check(what, len, n))
}

pub(crate) fn rope(
    x: usize,
    positions: &[u32],
    cos: usize,
    sin: usize,
    heads: usize,
    hd: usize,
) -> Result<()> {
    check("rope x", positions.len() * heads * hd, x)?;
    if let Some(&p) = positions.iter().max() {
        check("rope cos", (p as usize + 1) * (hd / 2), cos)?;
        check("rope sin", (p as usize + 1) * (hd / 2), sin)?;
    }
    Ok(())
}

pub(crate) fn softmax_backward(
    p: usize,
    p_offset: usize,
    dp: usize,
    dp_offset: usize,
    rows: usize,
    cols: usize,
) -> Result<()> {
    check("softmax_backward p", p_offset + rows * cols, p)?;
    check("softmax_backward dp", dp_offset + rows * cols, dp)
}

/// `token_logprobs` and its backward: `logits` and `d_logits` hold `rows × vocab` values, the
/// per-row vectors `rows` each.
pub(crate) fn token_logprobs(
    what: &str,
    logits: &[usize],
    per_row: &[usize],
    targets: &[u32],
    vocab: usize,
) -> Result<()> {
    let rows = targets.len();
    for &n in logits {
        check(format_args!("{what} logits"), rows * vocab, n)?;
    }
    for &n in per_row {
        check(format_args!("{what} rows"), rows, n)?;
    }
    check_targets(targets, vocab)
}
