//! Hugging Face checkpoint directories of the Llama / Qwen2 / Qwen3 family: `config.json` (in
//! the transformers 4 and 5 layouts) to a [`ModelConfig`], `*.safetensors` (one file or an
//! index of shards; f32, bf16 or f16) to [`Params`], and back.
//!
//! Whatever this module cannot represent exactly (another architecture, an activation, a rope
//! type, sliding-window attention, quantisation, a tensor it does not know) is an error that
//! names it: a checkpoint is never loaded as a silently different model.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde_json::{Value, json};

use crate::config::{Architecture, Llama3Rope, ModelConfig, WeightDtype};
use crate::error::{ModelError, Result};
use crate::params::Params;

/// The longest context a loaded checkpoint gets by default: it sizes the sampler's KV cache,
/// and checkpoints declare far longer ones (32k and more) than RL responses need here.
pub const DEFAULT_MAX_SEQ_LEN: usize = 4096;

/// Files of a checkpoint directory that are copied verbatim into an export (the tokenizer and
/// the generation defaults; the weights and `config.json` are written from the parameters).
pub const COPIED_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
];

/// A loaded checkpoint directory.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Where it was read from.
    pub dir: PathBuf,
    /// Its architecture; `dtype` is that of its weight files.
    pub config: ModelConfig,
    /// Its weights, as `f32`.
    pub params: Params,
    /// The token ids that end a response (`generation_config.json`, else `config.json`).
    pub eos: Vec<u32>,
}

impl Checkpoint {
    /// Loads `dir`, capping the context at `max_seq_len` (or
    /// [`DEFAULT_MAX_SEQ_LEN`] and the checkpoint's own `max_position_embeddings`).
    pub fn open(dir: &Path, max_seq_len: Option<usize>) -> Result<Self> {
        let config = read_config(dir, max_seq_len)?;
        let (mut params, dtype) = load_params(dir, &config)?;
        params.set_dtype(dtype);
        Ok(Checkpoint {
            dir: dir.to_owned(),
            config: params.config().clone(),
            params,
            eos: eos_tokens(dir)?,
        })
    }
}

fn err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| err(path, format!("not valid JSON: {e}")))
}

/// Reads `dir/config.json` (see [`config_from_json`]).
pub fn read_config(dir: &Path, max_seq_len: Option<usize>) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(err(
            dir,
            "no config.json: is this a Hugging Face checkpoint directory?",
        ));
    }
    config_from_json(&read_json(&path)?, max_seq_len).map_err(|e| match e {
        ModelError::InvalidConfig(reason) => err(&path, reason),
        other => other,
    })
}

/// The architecture a `config.json` describes, in either layout: transformers 4
/// (`rope_theta`, `rope_scaling`, `torch_dtype` at the top level) or 5 (`rope_parameters`,
/// `dtype`).
pub fn config_from_json(v: &Value, max_seq_len: Option<usize>) -> Result<ModelConfig> {
    let bad = |msg: String| ModelError::InvalidConfig(msg);
    let class = v["architectures"]
        .get(0)
        .and_then(Value::as_str)
        .or_else(|| v["model_type"].as_str())
        .ok_or_else(|| bad("neither `architectures` nor `model_type` is set".into()))?;
    let architecture = match class {
        "LlamaForCausalLM" | "llama" => Architecture::Llama,
        "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
        "Qwen3ForCausalLM" | "qwen3" => Architecture::Qwen3,
        other => {
            return Err(bad(format!(
                "architecture `{other}` is not supported; Flywheel runs LlamaForCausalLM, \
                 Qwen2ForCausalLM and Qwen3ForCausalLM"
            )));
        }
    };
    let size = |field: &str| -> Result<Option<usize>> {
        match &v[field] {
            Value::Null => Ok(None),
            x => x
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| bad(format!("`{field}` = {x} is not a non-negative integer"))),
        }
    };
    let required = |field: &str| size(field)?.ok_or_else(|| bad(format!("`{field}` is missing")));
    let flag = |field: &str| -> Result<bool> {
        match &v[field] {
            Value::Null => Ok(false),
            Value::Bool(b) => Ok(*b),
            x => Err(bad(format!("`{field}` = {x} is not a boolean"))),
        }
    };
    let number = |field: &str, x: &Value| -> Result<f64> {
        x.as_f64()
            .ok_or_else(|| bad(format!("`{field}` = {x} is not a number")))
    };

    if let Some(act) = v["hidden_act"].as_str()
        && act != "silu"
    {
        return Err(bad(format!(
            "`hidden_act` = \"{act}\" is not supported; the family's MLP is SwiGLU (\"silu\")"
        )));
    }
    if !v["quantization_config"].is_null() {
        return Err(bad(
            "`quantization_config` is set: quantised checkpoints are not supported; use the \
             f32, bf16 or f16 weights"
                .into(),
        ));
    }
    if flag("use_sliding_window")? {
        return Err(bad(
            "`use_sliding_window` = true: sliding-window attention is not supported".into(),
        ));
    }
    if let Some(types) = v["layer_types"].as_array()
        && let Some(other) = types.iter().find(|t| t.as_str() != Some("full_attention"))
    {
        return Err(bad(format!(
            "`layer_types` contains {other}: only full attention is supported"
        )));
    }

    // Rope: transformers 5 nests it in `rope_parameters`; 4 has `rope_theta` and
    // `rope_scaling` at the top level.
    let (theta, scaling) = match &v["rope_parameters"] {
        Value::Object(p) => (p.get("rope_theta").cloned(), Some(Value::Object(p.clone()))),
        _ => (
            Some(v["rope_theta"].clone()),
            Some(v["rope_scaling"].clone()),
        ),
    };
    let rope_theta = match theta {
        Some(t) if !t.is_null() => number("rope_theta", &t)?,
        _ => 10_000.0,
    };
    let rope_llama3 = match scaling {
        Some(Value::Object(s)) => {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            match kind {
                "default" => None,
                "llama3" => {
                    let field = |name: &str| -> Result<f64> {
                        let x = s.get(name).cloned().unwrap_or(Value::Null);
                        number(&format!("rope_scaling.{name}"), &x)
                    };
                    Some(Llama3Rope {
                        factor: field("factor")?,
                        low_freq_factor: field("low_freq_factor")?,
                        high_freq_factor: field("high_freq_factor")?,
                        original_max_position_embeddings: field(
                            "original_max_position_embeddings",
                        )?,
                    })
                }
                other => {
                    return Err(bad(format!(
                        "rope type `{other}` is not supported; Flywheel implements \"default\" \
                         and \"llama3\""
                    )));
                }
            }
        }
        Some(Value::Null) | None => None,
        Some(other) => return Err(bad(format!("`rope_scaling` = {other} is not an object"))),
    };

    let attention_bias = flag("attention_bias")?;
    let (qkv_bias, o_bias, mlp_bias) = match architecture {
        Architecture::Llama => (attention_bias, attention_bias, flag("mlp_bias")?),
        Architecture::Qwen2 => (true, false, false),
        Architecture::Qwen3 => (attention_bias, attention_bias, false),
    };
    let n_heads = required("num_attention_heads")?;
    let d_model = required("hidden_size")?;
    let head_dim = match (size("head_dim")?, architecture) {
        (Some(hd), _) => Some(hd),
        // Qwen3Config's default.
        (None, Architecture::Qwen3) => Some(128),
        (None, _) => None,
    };
    let context = size("max_position_embeddings")?.unwrap_or(DEFAULT_MAX_SEQ_LEN);
    let config = ModelConfig {
        architecture,
        vocab_size: required("vocab_size")?,
        d_model,
        n_layers: required("num_hidden_layers")?,
        n_heads,
        n_kv_heads: size("num_key_value_heads")?,
        head_dim,
        d_ff: required("intermediate_size")?,
        max_seq_len: context.min(max_seq_len.unwrap_or(DEFAULT_MAX_SEQ_LEN)),
        norm_eps: match &v["rms_norm_eps"] {
            Value::Null => 1e-6,
            x => number("rms_norm_eps", x)? as f32,
        },
        rope_theta,
        rope_llama3,
        qkv_bias,
        o_bias,
        mlp_bias,
        qk_norm: architecture == Architecture::Qwen3,
        tie_embeddings: flag("tie_word_embeddings")?,
        dtype: match v["dtype"].as_str().or_else(|| v["torch_dtype"].as_str()) {
            Some("bfloat16") => WeightDtype::Bf16,
            Some("float16") => WeightDtype::F16,
            _ => WeightDtype::F32,
        },
    };
    config.validate()?;
    Ok(config)
}

/// A `config.json` for `config` in the transformers 4 layout, which transformers 5, vLLM and
/// SGLang all read.
pub fn config_to_json(config: &ModelConfig, eos: &[u32]) -> Value {
    let c = config;
    let rope_scaling = c.rope_llama3.map(|r| {
        json!({
            "rope_type": "llama3",
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings as u64,
        })
    });
    let mut v = json!({
        "architectures": [c.architecture.hf_class()],
        "model_type": c.architecture.model_type(),
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads(),
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": c.dtype.hf_name(),
        "use_cache": true,
    });
    if let Some(hd) = c.head_dim {
        v["head_dim"] = json!(hd);
    }
    match c.architecture {
        Architecture::Llama => {
            v["attention_bias"] = json!(c.qkv_bias);
            v["mlp_bias"] = json!(c.mlp_bias);
        }
        Architecture::Qwen3 => v["attention_bias"] = json!(c.qkv_bias),
        Architecture::Qwen2 => v["use_sliding_window"] = json!(false),
    }
    match eos {
        [] => {}
        [one] => v["eos_token_id"] = json!(one),
        many => v["eos_token_id"] = json!(many),
    }
    v
}

/// The EOS token ids of a checkpoint: `eos_token_id` of `generation_config.json` if it has
/// one, else of `config.json`; an int or a list. Empty when neither says.
pub fn eos_tokens(dir: &Path) -> Result<Vec<u32>> {
    for file in ["generation_config.json", "config.json"] {
        let path = dir.join(file);
        if !path.is_file() {
            continue;
        }
        let ids = match &read_json(&path)?["eos_token_id"] {
            Value::Null => continue,
            Value::Array(list) => list.iter().map(Value::as_u64).collect::<Option<Vec<_>>>(),
            x => x.as_u64().map(|n| vec![n]),
        };
        return ids
            .and_then(|ids| ids.into_iter().map(|n| u32::try_from(n).ok()).collect())
            .ok_or_else(|| err(&path, "`eos_token_id` must be a token id or a list of them"));
    }
    Ok(Vec::new())
}

/// The weight files of `dir` and, for an index, which file holds which tensor.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let map = read_json(&index)?;
        let map = map["weight_map"]
            .as_object()
            .ok_or_else(|| err(&index, "no `weight_map` object"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for file in map.values() {
            let file = file
                .as_str()
                .ok_or_else(|| err(&index, "`weight_map` values must be file names"))?;
            if file.contains('/') || file.contains("..") {
                return Err(err(
                    &index,
                    format!("`{file}` is not a file of this directory"),
                ));
            }
            let path = dir.join(file);
            if !files.contains(&path) {
                files.push(path);
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(err(
        dir,
        "no model.safetensors or model.safetensors.index.json (only safetensors weights are \
         supported; convert a pytorch_model.bin with transformers' save_pretrained)",
    ))
}

/// Reads every weight of `config` from `dir` as `f32`, and the dtype they were stored in.
pub fn load_params(dir: &Path, config: &ModelConfig) -> Result<(Params, WeightDtype)> {
    let mut params = Params::zeros(config)?;
    let wanted: HashMap<String, usize> = params
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let mut found = vec![false; wanted.len()];
    let mut dtype = None;
    for path in weight_files(dir)? {
        let bytes = std::fs::read(&path).map_err(|e| err(&path, e.to_string()))?;
        let file = SafeTensors::deserialize(&bytes)
            .map_err(|e| err(&path, format!("not a safetensors file: {e}")))?;
        for (name, view) in file.tensors() {
            let Some(&i) = wanted.get(&name) else {
                // Tied checkpoints sometimes still carry the head; it is the embedding.
                let harmless = (name == "lm_head.weight" && config.tie_embeddings)
                    || name.ends_with("rotary_emb.inv_freq");
                if harmless {
                    continue;
                }
                return Err(err(
                    &path,
                    format!(
                        "tensor `{name}` is not part of a {} with this config.json; the \
                         checkpoint has parts Flywheel would ignore",
                        config.architecture.hf_class()
                    ),
                ));
            };
            let t = &mut params.tensors_mut()[i];
            if view.shape() != t.shape.as_slice() {
                return Err(err(
                    &path,
                    format!(
                        "tensor `{name}` has shape {:?}; config.json implies {:?}",
                        view.shape(),
                        t.shape
                    ),
                ));
            }
            let (values, this) = to_f32(&view).map_err(|e| err(&path, format!("`{name}`: {e}")))?;
            t.data = values;
            found[i] = true;
            // The dtype of the largest tensor (the embedding) is the checkpoint's.
            if name == "model.embed_tokens.weight" || dtype.is_none() {
                dtype = Some(this);
            }
        }
    }
    if let Some(i) = found.iter().position(|f| !f) {
        return Err(err(
            dir,
            format!(
                "tensor `{}` is missing from the weights",
                params.tensors()[i].name
            ),
        ));
    }
    Ok((params, dtype.unwrap_or_default()))
}

/// The values of a tensor as `f32`, and the dtype they had.
fn to_f32(view: &TensorView<'_>) -> std::result::Result<(Vec<f32>, WeightDtype), String> {
    let dtype = match view.dtype() {
        Dtype::F32 => WeightDtype::F32,
        Dtype::BF16 => WeightDtype::Bf16,
        Dtype::F16 => WeightDtype::F16,
        other => {
            return Err(format!(
                "dtype {other:?} is not supported (f32, bf16 or f16)"
            ));
        }
    };
    let mut values = Vec::new();
    dtype.decode_into(view.data(), &mut values);
    Ok((values, dtype))
}

/// Writes `params` as a complete checkpoint directory: `config.json`, `model.safetensors` (in
/// the config's dtype) and, from `source` when given, the tokenizer and generation files.
pub fn save(dir: &Path, params: &Params, eos: &[u32], source: Option<&Path>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e.to_string()))?;
    let config = params.config();
    let encoded: BTreeMap<&str, (Vec<u8>, &[usize])> = params
        .tensors()
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                (t.encode(config.dtype), t.shape.as_slice()),
            )
        })
        .collect();
    let dtype = match config.dtype {
        WeightDtype::F32 => Dtype::F32,
        WeightDtype::Bf16 => Dtype::BF16,
        WeightDtype::F16 => Dtype::F16,
    };
    let views = encoded
        .iter()
        .map(|(name, (bytes, shape))| {
            TensorView::new(dtype, shape.to_vec(), bytes).map(|v| (*name, v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| err(dir, e.to_string()))?;
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let weights = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(metadata), &weights)
        .map_err(|e| err(&weights, e.to_string()))?;
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config_to_json(config, eos)).expect("JSON value");
    std::fs::write(&config_path, text).map_err(|e| err(&config_path, e.to_string()))?;
    if let Some(source) = source {
        for name in COPIED_FILES {
            let from = source.join(name);
            if from.is_file() {
                std::fs::copy(&from, dir.join(name)).map_err(|e| err(&from, e.to_string()))?;
            }
        }
    }
    Ok(())
}
