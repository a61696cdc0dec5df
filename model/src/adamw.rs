//! The arithmetic of an AdamW step that backends run ([`crate::Backend::adamw`],
//! [`crate::Backend::sum_squares`]), defined once here so that the CPU, the GPU and the
//! trainer's host optimizer give the same bits: every operation is an IEEE f64 operation
//! rounded once (the GPU kernels use the explicitly rounded intrinsics, so nothing is fused
//! into a multiply-add), and sums run in a fixed order.

use rayon::prelude::*;

use crate::config::WeightDtype;

/// Values one thread steps at a time in [`AdamWStep::apply_tensor`]; a tensor of fewer than
/// two chunks is stepped on the calling thread (handing it to rayon's pool costs more than it
/// saves).
pub const PAR_CHUNK: usize = 1 << 16;

/// Lanes of a block of [`sum_squares_blocks`] (the GPU's threads per block).
pub const SQUARES_LANES: usize = 256;

/// Values of a block of [`sum_squares_blocks`]: each lane adds 64 of them.
pub const SQUARES_BLOCK: usize = SQUARES_LANES * 64;

/// Appends to `out` the f64 sum of squares of each block of [`SQUARES_BLOCK`] values of
/// `values` (the last block may be shorter), in a fixed order: lane l adds the squares of the
/// block's values l, l + 256, l + 512, … in turn, then the lanes are added pairwise, lane l
/// taking lane l + h for h = 128, 64, …, 1. A non-finite value makes its block's sum
/// non-finite.
pub fn sum_squares_blocks(values: &[f32], out: &mut Vec<f64>) {
    for block in values.chunks(SQUARES_BLOCK) {
        let mut lanes = [0.0f64; SQUARES_LANES];
        for (l, lane) in lanes.iter_mut().enumerate() {
            for &x in block.iter().skip(l).step_by(SQUARES_LANES) {
                let x = f64::from(x);
                *lane += x * x;
            }
        }
        let mut h = SQUARES_LANES / 2;
        while h > 0 {
            for l in 0..h {
                lanes[l] += lanes[l + h];
            }
            h /= 2;
        }
        out.push(lanes[0]);
    }
}

/// What one AdamW step applies to every element: the optimizer's hyper-parameters with the
/// step's learning rate, bias corrections and clip scale folded in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// The step's learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the second moment's root.
    pub eps: f64,
    /// `1 − beta1^t`.
    pub bias1: f64,
    /// `1 − beta2^t`.
    pub bias2: f64,
    /// `1 − lr · weight_decay` (decoupled weight decay).
    pub decay: f64,
    /// The factor the gradient is multiplied by (global-norm clipping; 1 when not clipped).
    pub clip_scale: f64,
}

impl AdamWStep {
    /// Steps every element of `w` (the weights, or their f32 masters) with the gradient `g`,
    /// updating the moments `m` and `v`.
    pub fn apply(&self, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let AdamWStep {
            lr,
            beta1,
            beta2,
            eps,
            bias1,
            bias2,
            decay,
            clip_scale,
        } = *self;
        for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m).zip(v) {
            let g = f64::from(g) * clip_scale;
            let m_new = beta1 * f64::from(*m) + (1.0 - beta1) * g;
            let v_new = beta2 * f64::from(*v) + (1.0 - beta2) * g * g;
            *m = m_new as f32;
            *v = v_new as f32;
            let update = (m_new / bias1) / ((v_new / bias2).sqrt() + eps);
            *w = (f64::from(*w) * decay - lr * update) as f32;
        }
    }

    /// [`AdamWStep::apply`] to a whole tensor, in parallel chunks when it is large
    /// (element-wise: the same bits as one loop); then, with `rounded`, `w` (the masters)
    /// rounded to the weights' dtype is written to it.
    pub fn apply_tensor(
        &self,
        w: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        rounded: Option<(&mut [f32], WeightDtype)>,
    ) {
        let round = |out: &mut [f32], w: &[f32], dtype: WeightDtype| {
            out.iter_mut()
                .zip(w)
                .for_each(|(o, w)| *o = dtype.round(*w));
        };
        if w.len() < 2 * PAR_CHUNK {
            self.apply(w, g, m, v);
            if let Some((out, dtype)) = rounded {
                round(out, w, dtype);
            }
            return;
        }
        w.par_chunks_mut(PAR_CHUNK)
            .zip(g.par_chunks(PAR_CHUNK))
            .zip(m.par_chunks_mut(PAR_CHUNK))
            .zip(v.par_chunks_mut(PAR_CHUNK))
            .for_each(|(((w, g), m), v)| self.apply(w, g, m, v));
        if let Some((out, dtype)) = rounded {
            out.par_chunks_mut(PAR_CHUNK)
                .zip(w.par_chunks(PAR_CHUNK))
                .for_each(|(o, w)| round(o, w, dtype));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sums_follow_the_lane_order_and_flag_non_finite_values() {
        let values: Vec<f32> = (0..SQUARES_BLOCK + 300)
            .map(|i| (i % 17) as f32 - 8.0)
            .collect();
        let mut sums = Vec::new();
        sum_squares_blocks(&values, &mut sums);
        assert_eq!(sums.len(), 2);
        let exact = |vs: &[f32]| vs.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
        // Small integers: every order gives the exact sum.
        assert_eq!(sums[0], exact(&values[..SQUARES_BLOCK]));
        assert_eq!(sums[1], exact(&values[SQUARES_BLOCK..]));
        let mut bad = values.clone();
        bad[SQUARES_BLOCK + 7] = f32::NAN;
        sums.clear();
        sum_squares_blocks(&bad, &mut sums);
        assert!(sums[0].is_finite() && sums[1].is_nan());
    }
}
