//! The architecture description: one config for the Llama / Qwen2 / Qwen3 family, which every
//! backend reads, validated before anything is allocated.
//!
//! The family shares one block: `x += o(attn(rope(qk_norm(q, k)), v))` after an RMSNorm, then
//! `x += down(silu(gate(h)) · up(h))` after another, then a final RMSNorm and the LM head. The
//! architectures differ only in flags (biases, QK norm, head width, tied embeddings), so they
//! are all one [`ModelConfig`]; [`crate::hf`] reads one from a checkpoint's `config.json`.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The Hugging Face architecture a config describes; it decides the names in an exported
/// `config.json` and the defaults of the flags that architecture fixes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// `LlamaForCausalLM`.
    Llama,
    /// `Qwen2ForCausalLM` (q/k/v biases).
    #[default]
    Qwen2,
    /// `Qwen3ForCausalLM` (RMSNorm of each query and key head before RoPE).
    Qwen3,
}

impl Architecture {
    /// The `architectures` entry of a Hugging Face `config.json`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The `model_type` of a Hugging Face `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }
}

/// Llama 3's piecewise rescaling of the rotary frequencies (`rope_type = "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Llama3Rope {
    /// How much longer the context became (`factor`).
    pub factor: f64,
    /// Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are scaled
    /// by `1/factor`.
    pub low_freq_factor: f64,
    /// Wavelengths shorter than `original_max_position_embeddings / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was pre-trained with.
    pub original_max_position_embeddings: f64,
}

/// The dtype weights are stored and published in (training always runs on `f32` masters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightDtype {
    /// 32-bit floats.
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl WeightDtype {
    /// The name transformers writes in `config.json` (`dtype` / `torch_dtype`).
    pub fn hf_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::Bf16 => "bfloat16",
            WeightDtype::F16 => "float16",
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::Bf16 | WeightDtype::F16 => 2,
        }
    }

    /// `value` as stored in this dtype, read back (bf16 and f16 round to nearest even).
    pub fn round(self, value: f32) -> f32 {
        match self {
            WeightDtype::F32 => value,
            WeightDtype::Bf16 => half::bf16::from_f32(value).to_f32(),
            WeightDtype::F16 => half::f16::from_f32(value).to_f32(),
        }
    }

    /// The values in this dtype, little-endian (bf16 and f16 round to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.size());
        match self {
            WeightDtype::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            WeightDtype::Bf16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
            WeightDtype::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        }
        out
    }

    /// Replaces `out` with the little-endian values of `bytes` (a whole number of values).
    pub fn decode_into(self, bytes: &[u8], out: &mut Vec<f32>) {
        out.clear();
        match self {
            WeightDtype::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            WeightDtype::Bf16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            WeightDtype::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
    }
}

/// The shape of one model of the family.
///
/// Parameters (Hugging Face names and shapes, linear weights `[out, in]`): the token embedding
/// `vocab_size × d_model`; per block an input RMSNorm, q/k/v/o projections (`n_heads` query
/// heads and `n_kv_heads` key/value heads of width `head_dim`), optional biases and QK norms, a
/// post-attention RMSNorm and a SwiGLU MLP of width `d_ff`; a final RMSNorm and the LM head
/// (the embedding itself when `tie_embeddings`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Which Hugging Face class this is (export names; nothing numeric depends on it).
    #[serde(default)]
    pub architecture: Architecture,
    /// Number of token ids (at least the tokenizer's vocabulary; checkpoints may pad it).
    pub vocab_size: usize,
    /// Width of the residual stream (`hidden_size`).
    pub d_model: usize,
    /// Number of transformer blocks (`num_hidden_layers`).
    pub n_layers: usize,
    /// Number of query heads (`num_attention_heads`).
    pub n_heads: usize,
    /// Number of key/value heads (`num_key_value_heads`; grouped-query attention when fewer
    /// than `n_heads`). Defaults to `n_heads`.
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    /// Width of one head. Defaults to `d_model / n_heads`; Qwen3 sets it explicitly.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Hidden width of the MLP (`intermediate_size`).
    pub d_ff: usize,
    /// Longest sequence (prompt + response) accepted; sizes the sampler's KV cache.
    pub max_seq_len: usize,
    /// Epsilon inside every RMSNorm's square root (`rms_norm_eps`).
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f32,
    /// Base of the rotary frequencies (`rope_theta`).
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Llama 3 frequency rescaling; `None` is plain RoPE.
    #[serde(default)]
    pub rope_llama3: Option<Llama3Rope>,
    /// Biases on the q, k and v projections (Qwen2; Llama's `attention_bias`).
    #[serde(default)]
    pub qkv_bias: bool,
    /// A bias on the output projection (Llama's `attention_bias`).
    #[serde(default)]
    pub o_bias: bool,
    /// Biases on the three MLP projections (Llama's `mlp_bias`).
    #[serde(default)]
    pub mlp_bias: bool,
    /// RMSNorm of every query and key head before RoPE (Qwen3).
    #[serde(default)]
    pub qk_norm: bool,
    /// The LM head is the token embedding (`tie_word_embeddings`).
    #[serde(default)]
    pub tie_embeddings: bool,
    /// The dtype weights are published and exported in.
    #[serde(default)]
    pub dtype: WeightDtype,
}

fn default_norm_eps() -> f32 {
    1e-6
}

fn default_rope_theta() -> f64 {
    10_000.0
}

/// Largest dimension accepted, so that products of sizes cannot overflow and a typo in a config
/// (an extra zero or three) is caught before a giant allocation.
const MAX_DIM: usize = 1 << 20;

impl ModelConfig {
    /// A small Qwen2-shaped model suited to the built-in arithmetic demo on a CPU.
    pub fn tiny(vocab_size: usize) -> Self {
        ModelConfig {
            architecture: Architecture::Qwen2,
            vocab_size,
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: None,
            head_dim: None,
            d_ff: 192,
            max_seq_len: 128,
            norm_eps: default_norm_eps(),
            rope_theta: default_rope_theta(),
            rope_llama3: None,
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            tie_embeddings: false,
            dtype: WeightDtype::F32,
        }
    }

    /// Checks that the sizes are positive, bounded and consistent.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.kv_heads()),
            ("head_dim", self.head_dim()),
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
        if self.head_dim.is_none() && !self.d_model.is_multiple_of(self.n_heads) {
            return Err(ModelError::InvalidConfig(format!(
                "d_model = {} is not divisible by n_heads = {}; choose n_heads dividing d_model \
                 or set head_dim",
                self.d_model, self.n_heads
            )));
        }
        if !self.n_heads.is_multiple_of(self.kv_heads()) {
            return Err(ModelError::InvalidConfig(format!(
                "n_heads = {} is not a multiple of n_kv_heads = {}; every key/value head must \
                 serve the same number of query heads",
                self.n_heads,
                self.kv_heads()
            )));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(ModelError::InvalidConfig(format!(
                "head_dim = {} must be even (RoPE rotates pairs of dimensions)",
                self.head_dim()
            )));
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(ModelError::InvalidConfig(
                "vocab_size must fit token ids in u32".into(),
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(ModelError::InvalidConfig(format!(
                "norm_eps = {} must be a positive finite number (1e-6 is usual)",
                self.norm_eps
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(ModelError::InvalidConfig(format!(
                "rope_theta = {} must be a finite number above 1 (10000 is usual)",
                self.rope_theta
            )));
        }
        if let Some(r) = &self.rope_llama3 {
            let ok = [r.factor, r.low_freq_factor, r.high_freq_factor]
                .iter()
                .all(|v| v.is_finite() && *v > 0.0)
                && r.original_max_position_embeddings >= 1.0
                && r.high_freq_factor > r.low_freq_factor;
            if !ok {
                return Err(ModelError::InvalidConfig(format!(
                    "llama3 rope scaling {r:?}: factors must be positive and high_freq_factor \
                     above low_freq_factor"
                )));
            }
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.d_model / self.n_heads.max(1))
    }

    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    /// Width of all query heads side by side.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim()
    }

    /// Width of all key (or value) heads side by side.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads() * self.head_dim()
    }

    /// The rotary inverse frequencies, `head_dim / 2` of them, as transformers computes them
    /// (`1 / θ^(2i/d)`, then Llama 3's rescaling when configured).
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim();
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        let Some(r) = &self.rope_llama3 else {
            return base;
        };
        let low_wavelen = r.original_max_position_embeddings / r.low_freq_factor;
        let high_wavelen = r.original_max_position_embeddings / r.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen > low_wavelen {
                    f / r.factor
                } else if wavelen < high_wavelen {
                    f
                } else {
                    let smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor)
                        / (r.high_freq_factor - r.low_freq_factor);
                    (1.0 - smooth) * f / r.factor + smooth * f
                }
            })
            .collect()
    }
}
