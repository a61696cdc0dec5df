//! Parameters as named tensors in one stable order: the unit of initialisation, optimisation,
//! publication and loading.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::{ModelConfig, WeightDtype};
use crate::error::{ModelError, Result};

/// One named parameter tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Stable name, e.g. `model.layers.0.self_attn.q_proj.weight` (the Hugging Face name); the
    /// key under which it is published.
    pub name: String,
    /// Dimensions, outermost first. Matrices of linear layers are `[out, in]` (y = x · Wᵀ).
    pub shape: Vec<usize>,
    /// The values, `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

impl Tensor {
    /// Number of elements the shape describes.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as little-endian bytes of `dtype` (the published wire format).
    pub fn encode(&self, dtype: WeightDtype) -> Vec<u8> {
        dtype.encode(&self.data)
    }

    /// Replaces the values with the little-endian `dtype` values `bytes`, which must hold
    /// exactly `numel()` values.
    pub fn load_bytes(&mut self, bytes: &[u8], dtype: WeightDtype) -> Result<()> {
        let want = self.numel() * dtype.size();
        if bytes.len() != want {
            return Err(ModelError::BadParameter {
                name: self.name.clone(),
                reason: format!(
                    "expected {want} bytes ({} {} values of shape {:?}), got {}: were these \
                     weights published in another dtype or for another model config?",
                    self.numel(),
                    dtype.hf_name(),
                    self.shape,
                    bytes.len()
                ),
            });
        }
        dtype.decode_into(bytes, &mut self.data);
        Ok(())
    }
}

/// Where each parameter of one transformer block sits in the ordered list.
#[derive(Clone, Debug)]
pub(crate) struct LayerIndex {
    /// Scale of the attention pre-norm (`input_layernorm`).
    pub norm1: usize,
    /// Query projection, `q_dim × d`, and its bias.
    pub q: Linear,
    /// Key projection, `kv_dim × d`, and its bias.
    pub k: Linear,
    /// Value projection, `kv_dim × d`, and its bias.
    pub v: Linear,
    /// Output projection, `d × q_dim`, and its bias.
    pub o: Linear,
    /// Per-head RMSNorm scales of queries and keys (`head_dim` each), with `qk_norm`.
    pub qk_norm: Option<(usize, usize)>,
    /// Scale of the MLP pre-norm (`post_attention_layernorm`).
    pub norm2: usize,
    /// MLP gate projection, `d_ff × d`.
    pub gate: Linear,
    /// MLP up projection, `d_ff × d`.
    pub up: Linear,
    /// MLP down projection, `d × d_ff`.
    pub down: Linear,
}

/// A linear layer's weight (`[out, in]`, y = x·Wᵀ + b) and optional bias.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Linear {
    /// Index of the weight.
    pub w: usize,
    /// Index of the bias, if the layer has one.
    pub b: Option<usize>,
    /// Output width.
    pub out: usize,
    /// Input width.
    pub inp: usize,
}

/// Where each parameter sits in the ordered list; built together with the list itself so the
/// order is defined in exactly one place ([`param_specs`]).
#[derive(Clone, Debug)]
pub(crate) struct ParamIndex {
    /// Token embeddings, `vocab × d`.
    pub tok_emb: usize,
    /// The blocks, first to last.
    pub layers: Vec<LayerIndex>,
    /// Scale of the final norm.
    pub final_norm: usize,
    /// LM head, `vocab × d`: its own tensor, or `tok_emb` when the embeddings are tied.
    pub lm_head: usize,
}

/// How a tensor is initialised.
#[derive(Clone, Copy, Debug)]
enum Init {
    /// Normal with this standard deviation.
    Normal(f32),
    /// All ones (norm scales).
    Ones,
    /// All zeros (biases).
    Zeros,
}

/// The ordered list of (name, shape, init) and the index into it. Names are those of the
/// Hugging Face checkpoints of the family, so that publishing and exporting rename nothing.
fn param_specs(c: &ModelConfig) -> (Vec<(String, Vec<usize>, Init)>, ParamIndex) {
    let (d, v, ff, hd) = (c.d_model, c.vocab_size, c.d_ff, c.head_dim());
    let (qd, kvd) = (c.q_dim(), c.kv_dim());
    let std = 0.02;
    // GPT-2: residual projections scaled down so the residual stream's variance does not grow
    // with depth.
    let resid_std = std / (2.0 * c.n_layers as f32).sqrt();
    let mut specs = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, init: Init| {
        specs.push((name, shape, init));
        specs.len() - 1
    };
    let tok_emb = push(
        "model.embed_tokens.weight".into(),
        vec![v, d],
        Init::Normal(std),
    );
    let mut layers = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let p = format!("model.layers.{l}");
        let norm1 = push(format!("{p}.input_layernorm.weight"), vec![d], Init::Ones);
        let mut linear = |name: String, out: usize, inp: usize, bias: bool, std: f32| Linear {
            w: push(format!("{name}.weight"), vec![out, inp], Init::Normal(std)),
            b: bias.then(|| push(format!("{name}.bias"), vec![out], Init::Zeros)),
            out,
            inp,
        };
        let attn = format!("{p}.self_attn");
        let q = linear(format!("{attn}.q_proj"), qd, d, c.qkv_bias, std);
        let k = linear(format!("{attn}.k_proj"), kvd, d, c.qkv_bias, std);
        let v_ = linear(format!("{attn}.v_proj"), kvd, d, c.qkv_bias, std);
        let o = linear(format!("{attn}.o_proj"), d, qd, c.o_bias, resid_std);
        let qk_norm = c.qk_norm.then(|| {
            (
                push(format!("{attn}.q_norm.weight"), vec![hd], Init::Ones),
                push(format!("{attn}.k_norm.weight"), vec![hd], Init::Ones),
            )
        });
        let norm2 = push(
            format!("{p}.post_attention_layernorm.weight"),
            vec![d],
            Init::Ones,
        );
        let mut linear = |name: String, out: usize, inp: usize, std: f32| Linear {
            w: push(
                format!("{p}.mlp.{name}.weight"),
                vec![out, inp],
                Init::Normal(std),
            ),
            b: c.mlp_bias
                .then(|| push(format!("{p}.mlp.{name}.bias"), vec![out], Init::Zeros)),
            out,
            inp,
        };
        let gate = linear("gate_proj".into(), ff, d, std);
        let up = linear("up_proj".into(), ff, d, std);
        let down = linear("down_proj".into(), d, ff, resid_std);
        layers.push(LayerIndex {
            norm1,
            q,
            k,
            v: v_,
            o,
            qk_norm,
            norm2,
            gate,
            up,
            down,
        });
    }
    let final_norm = push("model.norm.weight".into(), vec![d], Init::Ones);
    let lm_head = if c.tie_embeddings {
        tok_emb
    } else {
        push("lm_head.weight".into(), vec![v, d], Init::Normal(std))
    };
    let index = ParamIndex {
        tok_emb,
        layers,
        final_norm,
        lm_head,
    };
    (specs, index)
}

/// The index of a (validated) config.
pub(crate) fn param_index(config: &ModelConfig) -> ParamIndex {
    param_specs(config).1
}

/// All parameters of a model, as named tensors in a stable order.
///
/// The same type holds gradients and optimizer moments (same names and shapes), so an optimizer
/// can zip `params.tensors_mut()` with `grads.tensors()`.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// The configuration the tensors were shaped by.
    config: ModelConfig,
    /// The tensors, in the order defined by the config.
    tensors: Vec<Tensor>,
}

impl Params {
    /// Deterministic initialisation from `seed`: normal(0, 0.02) for embeddings and matrices,
    /// residual projections (`o_proj`, `down_proj`) scaled by 1/√(2·n_layers), norm scales 1 and
    /// biases 0. The same seed and config give bit-identical tensors on every platform
    /// (ChaCha8 stream).
    pub fn init(config: &ModelConfig, seed: u64) -> Result<Self> {
        Self::init_scaled(config, seed, 1.0)
    }

    /// Like [`Params::init`], with every random tensor's standard deviation multiplied by
    /// `scale` (tests use larger weights so that gradients are far from zero).
    pub fn init_scaled(config: &ModelConfig, seed: u64, scale: f32) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (specs, _) = param_specs(config);
        let tensors = specs
            .into_iter()
            .map(|(name, shape, init)| {
                let n: usize = shape.iter().product();
                let data = match init {
                    Init::Ones => vec![1.0; n],
                    Init::Zeros => vec![0.0; n],
                    Init::Normal(std) => {
                        let dist = Normal::new(0.0f32, std * scale).map_err(|e| {
                            ModelError::InvalidConfig(format!("init scale {scale}: {e}"))
                        })?;
                        (0..n).map(|_| dist.sample(&mut rng)).collect()
                    }
                };
                Ok(Tensor { name, shape, data })
            })
            .collect::<Result<_>>()?;
        Ok(Params {
            config: config.clone(),
            tensors,
        })
    }

    /// All-zero tensors of the model's names and shapes (gradient accumulators, AdamW moments).
    pub fn zeros(config: &ModelConfig) -> Result<Self> {
        config.validate()?;
        let (specs, _) = param_specs(config);
        let tensors = specs
            .into_iter()
            .map(|(name, shape, _)| Tensor {
                data: vec![0.0; shape.iter().product()],
                name,
                shape,
            })
            .collect();
        Ok(Params {
            config: config.clone(),
            tensors,
        })
    }

    /// Records the dtype the weights are stored and published in (the layout does not
    /// depend on it).
    pub fn set_dtype(&mut self, dtype: WeightDtype) {
        self.config.dtype = dtype;
    }

    /// The configuration these tensors belong to.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The tensors in their stable order.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// The tensors in their stable order, mutably (for an optimizer). Changing a tensor's name
    /// or shape breaks the model that loads it; only change `data` values.
    pub fn tensors_mut(&mut self) -> &mut [Tensor] {
        &mut self.tensors
    }

    /// The tensor called `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor called `name`, mutably (only change its `data` values).
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.tensors.iter_mut().find(|t| t.name == name)
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }

    /// Sets every value to zero (reuse a gradient accumulator).
    pub fn fill_zero(&mut self) {
        for t in &mut self.tensors {
            t.data.fill(0.0);
        }
    }

    /// Each tensor's values as little-endian bytes of the config's dtype, keyed by name (what
    /// is published).
    pub fn to_bytes_map(&self) -> BTreeMap<String, Vec<u8>> {
        self.tensors
            .iter()
            .map(|t| (t.name.clone(), t.encode(self.config.dtype)))
            .collect()
    }

    /// Builds parameters for `config` from a map name → little-endian bytes of `config.dtype`.
    /// Every tensor the config defines must be present with the exact byte length, and no
    /// other key may be.
    pub fn from_bytes_map(config: &ModelConfig, map: &BTreeMap<String, Vec<u8>>) -> Result<Self> {
        let mut params = Params::zeros(config)?;
        for t in &mut params.tensors {
            let bytes = map.get(&t.name).ok_or_else(|| ModelError::BadParameter {
                name: t.name.clone(),
                reason: "missing from the weights; were they published for another model \
                         config?"
                    .into(),
            })?;
            t.load_bytes(bytes, config.dtype)?;
        }
        if let Some(extra) = map.keys().find(|k| params.get(k).is_none()) {
            return Err(ModelError::BadParameter {
                name: extra.clone(),
                reason: "not a parameter of this model config".into(),
            });
        }
        Ok(params)
    }

    /// Checks that `other` has the same names and shapes (e.g. gradients for these parameters).
    pub fn check_same_layout(&self, other: &Params) -> Result<()> {
        if self.tensors.len() != other.tensors.len() {
            return Err(ModelError::BadParameter {
                name: "*".into(),
                reason: format!(
                    "{} tensors against {}: different model configs",
                    self.tensors.len(),
                    other.tensors.len()
                ),
            });
        }
        for (a, b) in self.tensors.iter().zip(&other.tensors) {
            if a.name != b.name || a.shape != b.shape || a.data.len() != b.data.len() {
                return Err(ModelError::BadParameter {
                    name: a.name.clone(),
                    reason: format!(
                        "layout mismatch against `{}` {:?} ({} values)",
                        b.name,
                        b.shape,
                        b.data.len()
                    ),
                });
            }
        }
        Ok(())
    }
}
