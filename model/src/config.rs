//! The model's shape: a serde config, validated before anything is allocated.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Which normalisation the pre-norm blocks and the final norm use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// LayerNorm with a learned scale and bias (GPT-2 style).
    #[default]
    LayerNorm,
    /// RMSNorm with a learned scale only (LLaMA style).
    RmsNorm,
}

/// The size of the decoder-only transformer.
///
/// Parameters: `vocab_size × d_model` token embeddings, `max_seq_len × d_model` learned position
/// embeddings, `n_layers` pre-norm blocks (causal self-attention with `n_heads` heads, then a
/// GELU MLP of width `d_ff`), a final norm and an untied LM head. Linear layers have no bias.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Number of token ids (must match the tokenizer's `vocab_size`).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Number of attention heads; must divide `d_model`.
    pub n_heads: usize,
    /// Hidden width of the MLP.
    pub d_ff: usize,
    /// Longest sequence (prompt + response) the model accepts; sizes the position embeddings
    /// and the sampler's KV cache.
    pub max_seq_len: usize,
    /// Normalisation used in every block and at the end.
    #[serde(default)]
    pub norm: NormKind,
    /// Epsilon inside the norm's square root, for numerical safety.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f32,
}

fn default_norm_eps() -> f32 {
    1e-5
}

/// Largest dimension accepted, so that products of sizes cannot overflow and a typo in a config
/// (an extra zero or three) is caught before a giant allocation.
const MAX_DIM: usize = 1 << 20;

impl ModelConfig {
    /// A small model suited to the built-in arithmetic demo on a CPU.
    pub fn tiny(vocab_size: usize) -> Self {
        ModelConfig {
            vocab_size,
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
            d_ff: 256,
            max_seq_len: 128,
            norm: NormKind::LayerNorm,
            norm_eps: default_norm_eps(),
        }
    }

    /// Checks that the sizes are positive, bounded and consistent.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("d_ff", self.d_ff),
            ("max_seq_len", self.max_seq_len),
        ];
        for (name, value) in dims {
            if value == 0 || value > MAX_DIM {
                return Err(ModelError::InvalidConfig(format!(
                    "{name} = {value}; it must be between 1 and {MAX_DIM}"
                )));
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(ModelError::InvalidConfig(format!(
                "d_model = {} is not divisible by n_heads = {}; choose n_heads dividing d_model",
                self.d_model, self.n_heads
            )));
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(ModelError::InvalidConfig(
                "vocab_size must fit token ids in u32".into(),
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(ModelError::InvalidConfig(format!(
                "norm_eps = {} must be a positive finite number (1e-5 is usual)",
                self.norm_eps
            )));
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
}
