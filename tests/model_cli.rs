//! `flywheel model logprobs|generate` on the committed tiny checkpoints.

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("model/tests/fixtures/hf")
        .join(name)
}

fn flywheel(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// The printed log-probs are transformers' (the reference the fixture script dumped).
#[test]
fn logprobs_prints_what_transformers_computes() {
    let dir = fixture("qwen3");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let tokens: Vec<String> = info["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let out = flywheel(&[
        "model",
        "logprobs",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &tokens.join(","),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"], info["tokens"]);
    let lps = v["logprobs"].as_array().unwrap();
    assert!(lps[0].is_null());
    assert_eq!(lps.len(), tokens.len());
    // The reference log-prob of the last token, from the fixture's safetensors (f32, little
    // endian; `logprobs` holds tokens[1..]).
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let want: Vec<f32> = st
        .tensor("logprobs")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    for (got, want) in lps[1..].iter().zip(&want) {
        assert!((got.as_f64().unwrap() as f32 - want).abs() < 1e-4);
    }

    // Text goes through the checkpoint's tokenizer.
    let out = flywheel(&[
        "model",
        "logprobs",
        "--model",
        dir.to_str().unwrap(),
        "--text",
        "What is 12 + 30?",
    ]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["tokens"].as_array().unwrap().len() > 3);
}

#[test]
fn generate_samples_within_the_family_and_bad_input_is_explained() {
    for name in ["llama", "qwen2", "qwen3"] {
        let dir = fixture(name);
        let out = flywheel(&[
            "model",
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "8",
            "--json",
            "--top-k",
            "5",
        ]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let n = v["tokens"].as_array().unwrap().len();
        assert!((1..=8).contains(&n), "{name}: {v}");
        assert_eq!(v["logprobs"].as_array().unwrap().len(), n);
    }
    let out = flywheel(&[
        "model",
        "logprobs",
        "--model",
        "/nonexistent",
        "--tokens",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
    let dir = fixture("qwen2");
    let out = flywheel(&[
        "model",
        "logprobs",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "1,x",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("`x` is not a token id"));
    let out = flywheel(&[
        "model",
        "logprobs",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "1,99999",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside the vocabulary"));
}
