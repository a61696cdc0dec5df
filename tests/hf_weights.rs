//! A run of a Hugging Face checkpoint: the trainer publishes the checkpoint's weights as
//! version 0 in their dtype (with its EOS and tokenizer source), and `flywheel weights export` writes them back
//! as a checkpoint directory with the same model, tokenizer and EOS. (scripts/model_fixtures.py
//! `--check-export DIR qwen2` checks such a directory in transformers.)

use std::path::PathBuf;

use flywheel::weights_cli::ExportText;
use flywheel_model::Checkpoint;
use flywheel_storage::RunStores;
use flywheel_storage::config::{RunConfig, StorageConfig};
use flywheel_trainer::{Trainer, TrainerConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("model/tests/fixtures/hf")
        .join(name)
}

async fn stores(blob_dir: &std::path::Path) -> RunStores {
    let run = RunConfig {
        storage: StorageConfig {
            run_id: "hf-weights".into(),
            state_url: "memory://".into(),
            blob_url: format!("file://{}", blob_dir.display()),
            ledger_url: "sqlite::memory:".into(),
        },
        ..RunConfig::default()
    };
    RunStores::open(&run).await.unwrap()
}

#[tokio::test]
async fn a_checkpoint_run_publishes_and_exports_the_checkpoint() {
    for name in ["qwen2", "qwen2-bf16", "llama"] {
        let blobs = tempfile::tempdir().unwrap();
        let stores = stores(blobs.path()).await;
        let config = TrainerConfig {
            hf_model: fixture(name).display().to_string(),
            metrics_addr: String::new(),
            ..TrainerConfig::default()
        };
        let trainer = Trainer::start(stores.clone(), config).await.unwrap();
        assert_eq!(trainer.version(), 0);
        let original = Checkpoint::open(&fixture(name), None).unwrap();
        let manifest = flywheel_storage::weights::load_manifest(&stores.blobs, "hf-weights", 0)
            .await
            .unwrap();
        let bytes_per_value = original.config.dtype.size() as u64;
        let values = original.params.num_elements() as u64;
        assert_eq!(
            manifest.total_bytes,
            values * bytes_per_value,
            "{name}: published in the checkpoint's dtype"
        );

        let out = tempfile::tempdir().unwrap();
        let text = ExportText::default();
        let v = flywheel::weights_cli::export(&stores.blobs, "hf-weights", None, &text, out.path())
            .await
            .unwrap();
        assert_eq!(v, 0);
        let exported = Checkpoint::open(out.path(), None).unwrap();
        assert_eq!(exported.config, original.config, "{name}");
        assert_eq!(
            exported.params, original.params,
            "{name}: same weights, same dtype"
        );
        assert_eq!(exported.eos, original.eos);
        for file in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert!(out.path().join(file).is_file(), "{name}: {file}");
        }
    }
}

#[tokio::test]
async fn a_missing_version_or_checkpoint_is_explained() {
    let blobs = tempfile::tempdir().unwrap();
    let stores = stores(blobs.path()).await;
    let out = tempfile::tempdir().unwrap();
    let text = ExportText::default();
    let err = flywheel::weights_cli::export(&stores.blobs, "hf-weights", None, &text, out.path())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no published weights"), "{err}");

    let config = TrainerConfig {
        hf_model: "/nonexistent/model".into(),
        metrics_addr: String::new(),
        ..TrainerConfig::default()
    };
    let err = Trainer::start(stores, config)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("trainer.hf_model") && err.contains("config.json"),
        "{err}"
    );
}

/// A built-in run exports with its character tokenizer as Hugging Face files, which encode
/// and decode exactly as the character tokenizer does.
#[tokio::test]
async fn a_builtin_run_exports_with_its_tokenizer() {
    use flywheel_model::{HfTokenizer, Tokenizer};
    let blobs = tempfile::tempdir().unwrap();
    let stores = stores(blobs.path()).await;
    let config = TrainerConfig {
        metrics_addr: String::new(),
        ..TrainerConfig::default()
    };
    let charset = config.charset.clone();
    Trainer::start(stores.clone(), config).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let text = ExportText {
        checkpoint: None,
        charset: charset.clone(),
    };
    flywheel::weights_cli::export(&stores.blobs, "hf-weights", None, &text, out.path())
        .await
        .unwrap();
    let exported = Checkpoint::open(out.path(), None).unwrap();
    assert_eq!(exported.eos, vec![Tokenizer::EOS]);
    let hf = HfTokenizer::open(out.path()).unwrap();
    let chars = Tokenizer::new(&charset).unwrap();
    assert_eq!(hf.vocab_size(), chars.vocab_size());
    for text in ["3+14+7=", "003,017,024;24", "1 2"] {
        assert_eq!(
            hf.encode(text, true).unwrap(),
            chars.encode_prompt(text).unwrap(),
            "{text}"
        );
        let ids = chars.encode(text).unwrap();
        assert_eq!(hf.decode(&ids).unwrap(), text);
    }
    assert_eq!(hf.eos_id(), Some(Tokenizer::EOS));
    assert!(
        hf.encode("x", true).is_err(),
        "a character outside the charset is an error"
    );
}
