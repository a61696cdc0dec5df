//! How a row-major, strided [`Gemm`] becomes one column-major cuBLAS strided-batched call.
//!
//! A row-major `m × n` matrix with unit column stride is, read column-major with the row
//! stride as leading dimension, its transpose. So `C = A·B` is computed as `Cᵀ = Bᵀ·Aᵀ`: cuBLAS
//! gets B first and A second, each with `OP_N` when its columns are unit-stride and `OP_T`
//! when its rows are (a transposed view). An output whose *rows* are unit-stride is handled by
//! solving the transposed problem `Cᵀ = Bᵀ·Aᵀ` the same way. Other layouts are an error.
//!
//! This is plain arithmetic on strides, so it is tested on the CPU against a column-major
//! product written out in loops (`tests` below), without a GPU.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{GemmConfig, StridedBatchedConfig};

use crate::backend::{Gemm, MatLayout};
use crate::error::{ModelError, Result};

/// Which operand of the row-major product a cuBLAS operand is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operand {
    /// The left factor.
    A,
    /// The right factor.
    B,
}

/// One cuBLAS `sgemmStridedBatched` call (column-major terms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ColMajorGemm {
    /// The row-major operand passed as cuBLAS's A (the other one is its B).
    pub first: Operand,
    /// Whether cuBLAS transposes its A.
    pub transa: bool,
    /// Whether cuBLAS transposes its B.
    pub transb: bool,
    /// cuBLAS's m, n and k.
    pub m: usize,
    /// cuBLAS's n.
    pub n: usize,
    /// cuBLAS's k.
    pub k: usize,
    /// Leading dimensions of cuBLAS's A, B and C.
    pub lda: usize,
    /// Leading dimension of cuBLAS's B.
    pub ldb: usize,
    /// Leading dimension of C.
    pub ldc: usize,
    /// Batch strides of cuBLAS's A, B and C.
    pub stride_a: usize,
    /// Batch stride of cuBLAS's B.
    pub stride_b: usize,
    /// Batch stride of C.
    pub stride_c: usize,
    /// Where cuBLAS's A, B and C start in their buffers.
    pub first_offset: usize,
    /// Where cuBLAS's B starts.
    pub second_offset: usize,
    /// Where C starts.
    pub c_offset: usize,
}

/// How to read a row-major `rows × cols` view as the column-major `cols × rows` matrix
/// `op(X)` cuBLAS wants: (transpose?, leading dimension), or `None` if neither stride is 1.
fn transposed_view(rows: usize, cols: usize, at: &MatLayout) -> Option<(bool, usize)> {
    if at.col_stride == 1 || cols == 1 {
        // Xᵀ(p, q) = X(q, p) sits at p + q·row_stride: stored as is, leading dim row_stride.
        let ld = at.row_stride.max(cols).max(1);
        (rows == 1 || at.row_stride >= cols).then_some((false, ld))
    } else if at.row_stride == 1 || rows == 1 {
        // X(i, j) sits at i + j·col_stride: X stored column-major, so Xᵀ is its transpose.
        let ld = at.col_stride.max(rows).max(1);
        (cols == 1 || at.col_stride >= rows).then_some((true, ld))
    } else {
        None
    }
}

impl ColMajorGemm {
    /// The cuBLAS call computing `g`.
    pub(crate) fn plan(g: &Gemm) -> Result<Self> {
        let unsupported = |what: &str, at: &MatLayout| {
            ModelError::Backend(format!(
                "cuBLAS cannot read the {what} view {at:?}: one of its strides must be 1"
            ))
        };
        // Rows of C unit-stride (and not also its columns): solve Cᵀ = Bᵀ·Aᵀ instead.
        let swap = g.c.col_stride != 1 && g.n != 1;
        let (m, n, a, b, c, first) = if swap {
            (g.n, g.m, g.b.t(), g.a.t(), g.c.t(), Operand::A)
        } else {
            (g.m, g.n, g.a, g.b, g.c, Operand::B)
        };
        if c.col_stride != 1 && n != 1 {
            return Err(unsupported("output", &g.c));
        }
        let ldc = c.row_stride.max(n).max(1);
        if m > 1 && c.row_stride < n {
            return Err(unsupported("output", &g.c));
        }
        // cuBLAS's A is Bᵀ (n × k), its B is Aᵀ (k × m).
        let (transa, lda) = transposed_view(g.k, n, &b).ok_or_else(|| unsupported("B", &g.b))?;
        let (transb, ldb) = transposed_view(m, g.k, &a).ok_or_else(|| unsupported("A", &g.a))?;
        Ok(ColMajorGemm {
            first,
            transa,
            transb,
            m: n,
            n: m,
            k: g.k,
            lda,
            ldb,
            ldc,
            stride_a: b.batch_stride,
            stride_b: a.batch_stride,
            stride_c: c.batch_stride,
            first_offset: b.offset,
            second_offset: a.offset,
            c_offset: c.offset,
        })
    }

    /// The cuBLAS configuration of this call (alpha, beta and the batch from `g`).
    pub(crate) fn config(&self, g: &Gemm) -> StridedBatchedConfig<f32> {
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        StridedBatchedConfig {
            gemm: GemmConfig {
                transa: op(self.transa),
                transb: op(self.transb),
                m: self.m as i32,
                n: self.n as i32,
                k: self.k as i32,
                alpha: g.alpha,
                lda: self.lda as i32,
                ldb: self.ldb as i32,
                beta: g.beta,
                ldc: self.ldc as i32,
            },
            batch_size: g.batch as i32,
            stride_a: self.stride_a as i64,
            stride_b: self.stride_b as i64,
            stride_c: self.stride_c as i64,
        }
    }

    /// What cuBLAS computes for this call, in loops: the reference the plan is tested with.
    #[cfg(test)]
    fn emulate(&self, g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (first, second) = match self.first {
            Operand::A => (a, b),
            Operand::B => (b, a),
        };
        // Element (i, j) of op(X) for a column-major X with leading dimension ld.
        let at = |x: &[f32], base: usize, trans: bool, ld: usize, i: usize, j: usize| {
            if trans {
                x[base + j + i * ld]
            } else {
                x[base + i + j * ld]
            }
        };
        for batch in 0..g.batch {
            let (fa, fb) = (
                self.first_offset + batch * self.stride_a,
                self.second_offset + batch * self.stride_b,
            );
            let fc = self.c_offset + batch * self.stride_c;
            for i in 0..self.m {
                for j in 0..self.n {
                    let mut sum = 0.0f32;
                    for p in 0..self.k {
                        sum += at(first, fa, self.transa, self.lda, i, p)
                            * at(second, fb, self.transb, self.ldb, p, j);
                    }
                    let out = &mut c[fc + i + j * self.ldc];
                    *out = if g.beta == 0.0 {
                        g.alpha * sum
                    } else {
                        g.alpha * sum + g.beta * *out
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::cpu::CpuBackend;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A view of a `rows × cols` matrix per batch entry: row-major or transposed, padded,
    /// offset.
    fn view(rng: &mut ChaCha8Rng, rows: usize, cols: usize, batch: usize) -> (MatLayout, usize) {
        let pad = rng.random_range(0..3);
        let offset = rng.random_range(0..4);
        let (row_stride, col_stride, size) = if rng.random_bool(0.5) {
            (cols + pad, 1, rows * (cols + pad))
        } else {
            (1, rows + pad, cols * (rows + pad))
        };
        let batch_stride = size + rng.random_range(0..3);
        let at = MatLayout {
            offset,
            row_stride,
            col_stride,
            batch_stride,
        };
        (at, offset + batch * batch_stride + 1)
    }

    #[test]
    fn the_cublas_call_computes_the_row_major_product_for_every_layout() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for case in 0..400 {
            let (m, k, n, batch) = (
                rng.random_range(1..6),
                rng.random_range(1..6),
                rng.random_range(1..6),
                rng.random_range(1..4),
            );
            let (a_at, a_len) = view(&mut rng, m, k, batch);
            let (b_at, b_len) = view(&mut rng, k, n, batch);
            let (c_at, c_len) = view(&mut rng, m, n, batch);
            let g = Gemm {
                m,
                k,
                n,
                batch,
                alpha: 0.5,
                beta: if case % 2 == 0 { 0.0 } else { 1.0 },
                a: a_at,
                b: b_at,
                c: c_at,
            };
            let values = |len: usize, rng: &mut ChaCha8Rng| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
            };
            let (a, b, c0) = (
                values(a_len, &mut rng),
                values(b_len, &mut rng),
                values(c_len, &mut rng),
            );
            let mut want = c0.clone();
            CpuBackend::default().gemm(&g, &a, &b, &mut want).unwrap();
            let plan = ColMajorGemm::plan(&g).unwrap();
            let mut got = c0.clone();
            plan.emulate(&g, &a, &b, &mut got);
            for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (x - y).abs() < 1e-5,
                    "case {case} {g:?} {plan:?}: c[{i}] {x} != {y}"
                );
            }
        }
    }

    #[test]
    fn a_view_with_no_unit_stride_is_an_error() {
        let at = MatLayout {
            offset: 0,
            row_stride: 4,
            col_stride: 2,
            batch_stride: 0,
        };
        let g = Gemm {
            m: 2,
            k: 2,
            n: 2,
            batch: 1,
            alpha: 1.0,
            beta: 0.0,
            a: at,
            b: MatLayout::row_major(2),
            c: MatLayout::row_major(2),
        };
        let err = ColMajorGemm::plan(&g).unwrap_err().to_string();
        assert!(err.contains("strides must be 1"), "{err}");
    }
}
