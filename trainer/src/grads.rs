//! The per-rank gradient object (`{run}/steps/{step}/grads/rank-{r}`), private to trainers.
//!
//! One rank's gradient sum over its micro-batches and the additive statistics of its loss,
//! so the finisher can sum ranks (in rank order: deterministic) and report the whole step.
//!
//! Layout (little-endian): magic `FWGRAD\0\0`, format u32, step u64, rank u32, the statistics
//! (loss f64, tokens_trained u64, tokens_masked u64, tokens_clipped u64, sum_abs_log_k f64,
//! sum_kl f64, sum_entropy f64, sequences u64), tensor count u32, then per tensor: name length
//! u32, name (UTF-8), value count u64, values f32; finally a crc32c of everything before it.
//! Format 2 is a rank whose gradient was summed by the step's collective exchange
//! (`crate::exchange`): the same header and statistics, no tensors.
//! The decoder checks lengths before allocating and never panics.

use flywheel_model::{ModelConfig, Params};
use flywheel_storage::StepId;
use flywheel_storage::codec::{ByteReader, Truncated};
use thiserror::Error;

use crate::loss::LossStats;
use crate::step::TrainStats;

const MAGIC: &[u8; 8] = b"FWGRAD\0\0";
const FORMAT: u32 = 1;
const FORMAT_EXCHANGED: u32 = 2;

/// A gradient object that cannot be used.
#[derive(Debug, Error)]
#[error("corrupt gradient object: {0}")]
pub struct GradError(pub String);

/// One rank's contribution to a step.
#[derive(Clone, Debug, PartialEq)]
pub struct RankGradient {
    /// The step.
    pub step: StepId,
    /// The rank.
    pub rank: u32,
    /// Loss statistics of the rank.
    pub stats: TrainStats,
    /// Σ over the rank's micro-batches of dL/dθ; `None` when the step's collective exchange
    /// summed it (the finisher holds the sum, or recomputes the rank).
    pub grads: Option<Params>,
}

impl RankGradient {
    /// Encodes the object.
    pub fn to_bytes(&self) -> Vec<u8> {
        let values = self.grads.as_ref().map_or(0, Params::num_elements);
        let mut out = Vec::with_capacity(128 + values * 4);
        let format = if self.grads.is_some() {
            FORMAT
        } else {
            FORMAT_EXCHANGED
        };
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&format.to_le_bytes());
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&self.rank.to_le_bytes());
        let s = &self.stats;
        out.extend_from_slice(&s.loss.loss.to_le_bytes());
        out.extend_from_slice(&s.loss.tokens_trained.to_le_bytes());
        out.extend_from_slice(&s.loss.tokens_masked.to_le_bytes());
        out.extend_from_slice(&s.loss.tokens_clipped.to_le_bytes());
        out.extend_from_slice(&s.loss.sum_abs_log_k.to_le_bytes());
        out.extend_from_slice(&s.loss.sum_kl.to_le_bytes());
        out.extend_from_slice(&s.sum_entropy.to_le_bytes());
        out.extend_from_slice(&s.sequences.to_le_bytes());
        if let Some(grads) = &self.grads {
            write_tensors(&mut out, grads);
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// The same rank's object without its gradient (what a rank summed by the exchange
    /// writes).
    pub fn exchanged(&self) -> RankGradient {
        RankGradient {
            step: self.step,
            rank: self.rank,
            stats: self.stats,
            grads: None,
        }
    }

    /// Decodes an object written by [`RankGradient::to_bytes`] for a model of `config`.
    pub fn from_bytes(config: &ModelConfig, bytes: &[u8]) -> Result<Self, GradError> {
        let bad = |m: &str| GradError(m.to_owned());
        let body_len = bytes
            .len()
            .checked_sub(4)
            .ok_or_else(|| bad("shorter than its checksum"))?;
        let (body, crc) = bytes.split_at(body_len);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(bad("checksum mismatch"));
        }
        let mut r = ByteReader::new(body);
        if r.take(8)? != MAGIC {
            return Err(bad("not a gradient object (bad magic)"));
        }
        let format = r.u32()?;
        if format != FORMAT && format != FORMAT_EXCHANGED {
            return Err(bad("unsupported format version"));
        }
        let step = r.u64()?;
        let rank = r.u32()?;
        let stats = TrainStats {
            loss: LossStats {
                loss: r.f64()?,
                tokens_trained: r.u64()?,
                tokens_masked: r.u64()?,
                tokens_clipped: r.u64()?,
                sum_abs_log_k: r.f64()?,
                sum_kl: r.f64()?,
            },
            sum_entropy: r.f64()?,
            sequences: r.u64()?,
        };
        let grads = if format == FORMAT {
            Some(read_tensors(&mut r, config)?)
        } else {
            None
        };
        if r.remaining() > 0 {
            return Err(bad("trailing bytes"));
        }
        Ok(RankGradient {
            step,
            rank,
            stats,
            grads,
        })
    }
}

fn read_tensors(r: &mut ByteReader<'_>, config: &ModelConfig) -> Result<Params, GradError> {
    let mut grads = Params::zeros(config).map_err(|e| GradError(e.to_string()))?;
    let count = r.u32()? as usize;
    if count != grads.tensors().len() {
        return Err(GradError(format!(
            "{count} tensors, the model has {}",
            grads.tensors().len()
        )));
    }
    for t in grads.tensors_mut() {
        let name_len = r.u32()? as usize;
        let name = r.take(name_len)?;
        if name != t.name.as_bytes() {
            return Err(GradError(format!(
                "tensor `{}` missing or out of order",
                t.name
            )));
        }
        let n = r.u64()?;
        if n != t.data.len() as u64 {
            return Err(GradError(format!("tensor `{}` has {n} values", t.name)));
        }
        let data = r.take(t.data.len() * 4)?;
        for (v, c) in t.data.iter_mut().zip(data.chunks_exact(4)) {
            *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    Ok(grads)
}

fn write_tensors(out: &mut Vec<u8>, grads: &Params) {
    out.extend_from_slice(&(grads.tensors().len() as u32).to_le_bytes());
    for t in grads.tensors() {
        out.extend_from_slice(&(t.name.len() as u32).to_le_bytes());
        out.extend_from_slice(t.name.as_bytes());
        out.extend_from_slice(&(t.data.len() as u64).to_le_bytes());
        for v in &t.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

impl From<Truncated> for GradError {
    fn from(t: Truncated) -> Self {
        GradError(t.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_model::Tokenizer;

    #[test]
    fn round_trips_and_rejects_corruption() {
        let mut cfg = ModelConfig::tiny(Tokenizer::arithmetic().vocab_size());
        cfg.d_model = 8;
        cfg.n_heads = 2;
        cfg.d_ff = 16;
        cfg.max_seq_len = 8;
        let g = RankGradient {
            step: 4,
            rank: 1,
            stats: TrainStats {
                loss: LossStats {
                    loss: -0.25,
                    tokens_trained: 9,
                    tokens_masked: 2,
                    tokens_clipped: 0,
                    sum_abs_log_k: 1.5,
                    sum_kl: 0.0,
                },
                sum_entropy: 3.0,
                sequences: 2,
            },
            grads: Some(Params::init(&cfg, 1).unwrap()),
        };
        let bytes = g.to_bytes();
        assert_eq!(RankGradient::from_bytes(&cfg, &bytes).unwrap(), g);
        // A rank summed by the exchange: its statistics, no tensors.
        let exchanged = g.exchanged().to_bytes();
        assert!(exchanged.len() < 100);
        assert_eq!(
            RankGradient::from_bytes(&cfg, &exchanged).unwrap(),
            RankGradient {
                grads: None,
                ..g.clone()
            }
        );
        for cut in [0, 3, 20, bytes.len() - 1] {
            assert!(RankGradient::from_bytes(&cfg, &bytes[..cut]).is_err());
        }
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        assert!(RankGradient::from_bytes(&cfg, &flipped).is_err());
        let mut other = cfg.clone();
        other.d_ff = 32;
        assert!(RankGradient::from_bytes(&other, &bytes).is_err());
    }
}
