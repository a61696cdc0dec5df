//! Parity with transformers on the committed tiny checkpoints (scripts/model_fixtures.py):
//! per-token log-probs, the loss and every parameter's gradient, for Llama (GQA, biases, Llama 3
//! RoPE, sharded, transformers 4 config layout), Qwen2 (q/k/v biases, tied, padded vocabulary),
//! Qwen3 (QK norms, explicit head_dim) and Qwen2 stored in bf16.

use std::path::{Path, PathBuf};

use flywheel_model::hf::{self, Checkpoint};
use flywheel_model::{
    Architecture, CpuBackend, Model, ModelError, Products, SampleConfig, Sampler, Sequence,
    WeightDtype,
};
use rand::SeedableRng;
use safetensors::SafeTensors;

/// f32 log-probs: max absolute error against transformers.
const LOGPROB_ATOL: f32 = 1e-4;
/// Gradients: max absolute error relative to the tensor's largest reference entry.
const GRAD_RTOL: f32 = 1e-3;
/// The same for the bf16-stored checkpoint (computed in f32 too; its rounded weights make a
/// few small gradients cancel more).
const BF16_GRAD_RTOL: f32 = 2e-3;
/// bf16 weights computed in f32 against transformers computing in bf16 (whose every matmul
/// rounds to 8 bits of mantissa): max absolute log-prob error.
const BF16_NATIVE_ATOL: f32 = 0.15;
/// bf16 products against f32 products on the same weights: max absolute log-prob change
/// (the tiny fixture moves by about 6e-4).
const BF16_PRODUCTS_ATOL: f32 = 5e-3;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

struct Reference {
    tokens: Vec<u32>,
    response_start: usize,
    loss: f32,
    bytes: Vec<u8>,
}

impl Reference {
    fn load(name: &str) -> Self {
        let info: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(name).join("reference.json")).unwrap(),
        )
        .unwrap();
        Reference {
            tokens: info["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect(),
            response_start: info["response_start"].as_u64().unwrap() as usize,
            loss: info["loss"].as_f64().unwrap() as f32,
            bytes: std::fs::read(fixture(name).join("reference.safetensors")).unwrap(),
        }
    }

    fn tensor(&self, name: &str) -> Option<Vec<f32>> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st.tensor(name).ok()?;
        Some(
            view.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Forward, loss and backward against the reference; returns the log-probs of `tokens[1..]`.
fn check_parity(name: &str, grad_rtol: f32) -> Vec<f32> {
    let ckpt = Checkpoint::open(&fixture(name), None).unwrap();
    let r = Reference::load(name);
    let model = Model::cpu(&ckpt.params).unwrap();

    let all = model
        .forward(&[Sequence {
            tokens: &r.tokens,
            response_start: 1,
        }])
        .unwrap();
    let want = r.tensor("logprobs").unwrap();
    let err = max_abs_diff(all.logprobs(), &want);
    assert!(err <= LOGPROB_ATOL, "{name}: log-prob error {err:e}");

    // L = −mean of the response log-probs, as the script computes it.
    let cache = model
        .forward(&[Sequence {
            tokens: &r.tokens,
            response_start: r.response_start,
        }])
        .unwrap();
    let n = cache.logprobs().len();
    let loss = -cache.logprobs().iter().sum::<f32>() / n as f32;
    assert!(
        (loss - r.loss).abs() <= LOGPROB_ATOL,
        "{name}: loss {loss} vs {}",
        r.loss
    );
    let mut grads = model.new_gradients().unwrap();
    model
        .backward(&cache, &vec![-1.0 / n as f32; n], None, &mut grads)
        .unwrap();
    let grads = model.gradients_to_params(&grads).unwrap();
    for g in grads.tensors() {
        let want = r
            .tensor(&format!("grad.{}", g.name))
            .unwrap_or_else(|| panic!("{name}: no reference gradient for {}", g.name));
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = max_abs_diff(&g.data, &want);
        assert!(
            err <= grad_rtol * scale,
            "{name}: gradient of {}: error {err:e} against a scale of {scale:e}",
            g.name
        );
    }
    all.logprobs().to_vec()
}

#[test]
fn llama_matches_transformers() {
    check_parity("llama", GRAD_RTOL);
    let ckpt = Checkpoint::open(&fixture("llama"), None).unwrap();
    let c = &ckpt.config;
    assert_eq!(c.architecture, Architecture::Llama);
    assert!(c.rope_llama3.is_some() && c.o_bias && c.mlp_bias && c.kv_heads() == 2);
}

#[test]
fn qwen2_matches_transformers() {
    check_parity("qwen2", GRAD_RTOL);
    let ckpt = Checkpoint::open(&fixture("qwen2"), None).unwrap();
    assert!(ckpt.config.tie_embeddings && ckpt.config.qkv_bias && !ckpt.config.o_bias);
    assert_eq!(ckpt.eos, vec![2, 0], "an eos_token_id list");
}

#[test]
fn qwen3_matches_transformers() {
    check_parity("qwen3", GRAD_RTOL);
    let ckpt = Checkpoint::open(&fixture("qwen3"), None).unwrap();
    assert!(ckpt.config.qk_norm);
    assert_eq!((ckpt.config.head_dim(), ckpt.config.d_model / 4), (16, 8));
    assert_eq!(ckpt.eos, vec![2], "an int eos_token_id");
}

#[test]
fn bf16_weights_match_transformers() {
    let lp = check_parity("qwen2-bf16", BF16_GRAD_RTOL);
    let ckpt = Checkpoint::open(&fixture("qwen2-bf16"), None).unwrap();
    assert_eq!(ckpt.config.dtype, WeightDtype::Bf16);
    let native = Reference::load("qwen2-bf16")
        .tensor("logprobs_bf16")
        .unwrap();
    let err = max_abs_diff(&lp, &native);
    assert!(err <= BF16_NATIVE_ATOL, "against bf16 arithmetic: {err}");
}

/// bf16 products (operands rounded to bf16, f32 accumulation; the CPU's exact emulation of
/// the GPU path) move the log-probs off the f32 ones, a little, and stay near transformers
/// computing everything in bf16.
#[test]
fn bf16_products_stay_near_f32_and_transformers_in_bf16() {
    let ckpt = Checkpoint::open(&fixture("qwen2-bf16"), None).unwrap();
    let r = Reference::load("qwen2-bf16");
    let seq = [Sequence {
        tokens: &r.tokens,
        response_start: 1,
    }];
    let f32_model = Model::cpu(&ckpt.params).unwrap();
    let bf16_model = Model::new(CpuBackend::new(Products::Bf16), &ckpt.params).unwrap();
    let f32_lp = f32_model.forward(&seq).unwrap().logprobs().to_vec();
    let bf16_lp = bf16_model.forward(&seq).unwrap().logprobs().to_vec();
    let native = r.tensor("logprobs_bf16").unwrap();
    let (moved, from_native, f32_from_native) = (
        max_abs_diff(&bf16_lp, &f32_lp),
        max_abs_diff(&bf16_lp, &native),
        max_abs_diff(&f32_lp, &native),
    );
    eprintln!(
        "bf16 products: {moved} from f32, {from_native} from transformers bf16 (f32: {f32_from_native})"
    );
    assert!(moved > 0.0, "bf16 products changed nothing");
    assert!(
        moved <= BF16_PRODUCTS_ATOL,
        "bf16 products moved the log-probs by {moved}"
    );
    assert!(
        from_native <= BF16_NATIVE_ATOL,
        "against bf16 arithmetic: {from_native}"
    );
}

/// The KV-cached sampler reproduces the training forward's log-probs on every architecture
/// (QK norms, GQA and RoPE at growing positions through the cache).
#[test]
fn sampling_matches_the_forward_pass() {
    for name in ["llama", "qwen2", "qwen3"] {
        let ckpt = Checkpoint::open(&fixture(name), None).unwrap();
        let model = Model::cpu(&ckpt.params).unwrap();
        let mut sampler = Sampler::new(&model).unwrap();
        let prompt = [1u32, 85, 91, 85];
        sampler.prefill(&model, &prompt).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (mut toks, mut lps) = (Vec::new(), Vec::new());
        sampler
            .generate(
                &model,
                &SampleConfig::default(),
                20,
                &[],
                &mut rng,
                &mut toks,
                &mut lps,
            )
            .unwrap();
        let seq = [&prompt[..], &toks].concat();
        let cache = model
            .forward(&[Sequence {
                tokens: &seq,
                response_start: prompt.len(),
            }])
            .unwrap();
        let err = max_abs_diff(cache.logprobs(), &lps);
        assert!(err < 1e-4, "{name}: sampler vs forward {err}");
    }
}

/// Both config.json layouts describe the same model.
#[test]
fn both_config_layouts_parse_alike() {
    let v5: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qwen2/config.json")).unwrap())
            .unwrap();
    let mut v4 = v5.clone();
    let rope = v4
        .as_object_mut()
        .unwrap()
        .remove("rope_parameters")
        .unwrap();
    v4["rope_theta"] = rope["rope_theta"].clone();
    v4["rope_scaling"] = serde_json::Value::Null;
    v4["torch_dtype"] = v4.as_object_mut().unwrap().remove("dtype").unwrap();
    let a = hf::config_from_json(&v5, None).unwrap();
    assert_eq!(a, hf::config_from_json(&v4, None).unwrap());
    assert_eq!(a.rope_theta, 1e6);
    // What Flywheel writes reads back as the same model.
    assert_eq!(
        hf::config_from_json(&hf::config_to_json(&a, &[2]), None).unwrap(),
        a
    );
    let llama = hf::read_config(&fixture("llama"), None).unwrap();
    assert_eq!(
        hf::config_from_json(&hf::config_to_json(&llama, &[]), None).unwrap(),
        llama
    );
}

fn config_error(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qwen3/config.json")).unwrap())
            .unwrap();
    edit(&mut v);
    hf::config_from_json(&v, None).unwrap_err().to_string()
}

#[test]
fn unsupported_configs_are_named() {
    use serde_json::json;
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: [(&str, Edit); 7] = [
        (
            "MistralForCausalLM",
            Box::new(|v| v["architectures"] = json!(["MistralForCausalLM"])),
        ),
        ("hidden_act", Box::new(|v| v["hidden_act"] = json!("gelu"))),
        (
            "rope type `yarn`",
            Box::new(|v| v["rope_parameters"]["rope_type"] = json!("yarn")),
        ),
        (
            "use_sliding_window",
            Box::new(|v| v["use_sliding_window"] = json!(true)),
        ),
        (
            "layer_types",
            Box::new(|v| v["layer_types"][1] = json!("sliding_attention")),
        ),
        (
            "quantization_config",
            Box::new(|v| v["quantization_config"] = json!({"bits": 4})),
        ),
        (
            "`hidden_size` is missing",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("hidden_size");
            }),
        ),
    ];
    for (needle, edit) in cases {
        let msg = config_error(edit);
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
}

/// A copy of a fixture directory whose weights the test may break.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

#[test]
fn weights_that_do_not_fit_the_config_are_named() {
    // Tensors the architecture does not have (a Qwen3's QK norms under a Qwen2 config.json).
    let dir = copy_fixture("qwen3");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    cfg["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    cfg["model_type"] = serde_json::json!("qwen2");
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let msg = Checkpoint::open(dir.path(), None).unwrap_err().to_string();
    assert!(
        msg.contains("_norm.weight` is not part of a Qwen2ForCausalLM"),
        "{msg}"
    );

    // A tensor the config needs and the files lack (an untied head in a tied checkpoint).
    let dir = copy_fixture("qwen2");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    cfg["tie_word_embeddings"] = serde_json::json!(false);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let msg = Checkpoint::open(dir.path(), None).unwrap_err().to_string();
    assert!(msg.contains("`lm_head.weight` is missing"), "{msg}");

    // A shape that disagrees with config.json.
    let dir = copy_fixture("qwen3");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    cfg["intermediate_size"] = serde_json::json!(65);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let msg = Checkpoint::open(dir.path(), None).unwrap_err().to_string();
    assert!(msg.contains("shape"), "{msg}");

    // A missing shard.
    let dir = copy_fixture("llama");
    std::fs::remove_file(dir.path().join("model-00003-of-00006.safetensors")).unwrap();
    let err = Checkpoint::open(dir.path(), None).unwrap_err();
    assert!(matches!(err, ModelError::Checkpoint { .. }), "{err}");

    // Not a checkpoint at all.
    let empty = tempfile::tempdir().unwrap();
    let msg = Checkpoint::open(empty.path(), None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("config.json"), "{msg}");
}

/// Saving and loading round-trips every architecture, in its own dtype.
#[test]
fn save_round_trips() {
    for name in ["llama", "qwen3", "qwen2-bf16"] {
        let ckpt = Checkpoint::open(&fixture(name), None).unwrap();
        let out = tempfile::tempdir().unwrap();
        hf::save(out.path(), &ckpt.params, &ckpt.eos, Some(&ckpt.dir)).unwrap();
        let back = Checkpoint::open(out.path(), None).unwrap();
        assert_eq!(back.config, ckpt.config, "{name}");
        assert_eq!(
            back.params, ckpt.params,
            "{name}: exact, in the stored dtype"
        );
        assert_eq!(back.eos, ckpt.eos);
        assert!(out.path().join("tokenizer.json").is_file());
    }
}

/// The tokenizer and chat template against transformers' own rendering and ids.
#[test]
fn tokenizer_and_chat_template_match_transformers() {
    use flywheel_model::{ChatMessage, HfTokenizer};
    let dir = fixture("tokenizer");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let tok = HfTokenizer::open(&dir).unwrap();
    assert_eq!(tok.vocab_size() as u64, r["vocab"].as_u64().unwrap());
    for (text, ids) in r["texts"].as_object().unwrap() {
        let want: Vec<u32> = serde_json::from_value(ids.clone()).unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
        assert_eq!(&tok.decode(&want).unwrap(), text);
    }
    let messages: Vec<ChatMessage> = serde_json::from_value(r["messages"].clone()).unwrap();
    assert_eq!(
        tok.render_chat(&messages, true).unwrap(),
        r["chat"].as_str().unwrap()
    );
    let want: Vec<u32> = serde_json::from_value(r["chat_ids"].clone()).unwrap();
    assert_eq!(tok.encode_chat(&messages).unwrap(), want);
    assert_eq!(tok.eos_id(), tok.token_id("<|im_end|>"));

    // The template inline in tokenizer_config.json (as on the hub), and Python string methods.
    let inline = copy_fixture("tokenizer");
    std::fs::remove_file(inline.path().join("chat_template.jinja")).unwrap();
    let cfg = serde_json::json!({
        "eos_token": {"content": "<|im_end|>"},
        "chat_template": "{% for m in messages %}{{ m.role.upper() }}:{{ m.content.strip() }}\n{% endfor %}",
    });
    std::fs::write(inline.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok = HfTokenizer::open(inline.path()).unwrap();
    assert_eq!(
        tok.render_chat(&messages, false).unwrap(),
        "USER:What is 7 * 6?\nASSISTANT:42\n"
    );
    assert_eq!(tok.eos_id(), tok.token_id("<|im_end|>"));

    // No template: a clear error.
    std::fs::write(inline.path().join("tokenizer_config.json"), "{}").unwrap();
    let err = HfTokenizer::open(inline.path())
        .unwrap()
        .render_chat(&messages, true)
        .unwrap_err();
    assert!(err.to_string().contains("no chat template"), "{err}");
}
