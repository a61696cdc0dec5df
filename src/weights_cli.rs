//! `flywheel weights export`: a published version as a complete Hugging Face directory, which
//! transformers, vLLM and SGLang load.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use flywheel_model::{ModelConfig, Params, Tokenizer, hf};
use flywheel_storage::PolicyVersion;
use flywheel_storage::blob::BlobStore;
use flywheel_storage::weights::{self, HF_SOURCE_KEY, MODEL_CONFIG_KEY};

/// What `flywheel weights` does.
#[derive(clap::Subcommand, Debug)]
pub enum WeightsCommand {
    /// Write weights version N as a Hugging Face checkpoint directory: config.json,
    /// model.safetensors (in the model's dtype) and the tokenizer and generation files (the
    /// checkpoint's, or the built-in character tokenizer's).
    Export {
        /// The run's config file (its `[storage]` names the object store).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The version to export; default the newest.
        #[arg(long)]
        version: Option<PolicyVersion>,
        /// The directory to write (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs a `flywheel weights` command.
pub async fn run(command: WeightsCommand) -> anyhow::Result<()> {
    match command {
        WeightsCommand::Export {
            config,
            version,
            out,
        } => {
            let mut config = crate::config::load(config.as_deref())?;
            config.localize_checkpoints().await?;
            let s = &config.storage;
            let blobs = BlobStore::open(&s.blob_url)?;
            let text = ExportText {
                checkpoint: (!config.trainer.hf_model.is_empty())
                    .then(|| PathBuf::from(&config.trainer.hf_model)),
                charset: config.trainer.charset.clone(),
            };
            let version = export(&blobs, &s.run_id, version, &text, &out).await?;
            println!(
                "exported version {version} of run `{}` to {}",
                s.run_id,
                out.display()
            );
            Ok(())
        }
    }
}

/// Where an export's tokenizer files come from.
#[derive(Clone, Debug, Default)]
pub struct ExportText {
    /// The run's checkpoint directory (the config's `[trainer] hf_model`, localised); without
    /// it, the directory the version's metadata names.
    pub checkpoint: Option<PathBuf>,
    /// The character tokenizer of a built-in model (`[trainer] charset`).
    pub charset: String,
}

/// Writes `version` (default the newest) of `run` to `out`; returns the version written.
pub async fn export(
    blobs: &BlobStore,
    run: &str,
    version: Option<PolicyVersion>,
    text: &ExportText,
    out: &Path,
) -> anyhow::Result<PolicyVersion> {
    let version = match version {
        Some(v) => v,
        None => weights::latest_version(blobs, run)
            .await?
            .with_context(|| format!("run `{run}` has no published weights yet"))?,
    };
    let fetched = weights::fetch(blobs, run, version, None, &Default::default())
        .await
        .with_context(|| format!("fetching weights version {version} of run `{run}`"))?;
    let meta = &fetched.manifest.metadata;
    let Some(json) = meta.get(MODEL_CONFIG_KEY) else {
        bail!(
            "version {version} carries no `{MODEL_CONFIG_KEY}`: it was not published by a Flywheel trainer"
        );
    };
    let model: ModelConfig = serde_json::from_str(json)
        .with_context(|| format!("`{MODEL_CONFIG_KEY}` of version {version}"))?;
    let params = Params::from_bytes_map(&model, &fetched.tensors)?;
    let source = text
        .checkpoint
        .clone()
        .or_else(|| meta.get(HF_SOURCE_KEY).map(PathBuf::from));
    if let Some(dir) = &source
        && !dir.join("tokenizer.json").is_file()
    {
        bail!(
            "the run's checkpoint directory {} (its tokenizer files) is not readable here; \
             export where it is",
            dir.display()
        );
    }
    let eos = match &source {
        Some(dir) => hf::eos_tokens(dir)?,
        None => Vec::new(),
    };
    hf::save(out, &params, &eos, source.as_deref())?;
    if source.is_none() {
        // The built-in model: its character tokenizer as Hugging Face files.
        let charset = &text.charset;
        let chars = Tokenizer::new(charset).with_context(|| format!("charset {charset:?}"))?;
        for (name, text) in chars.hf_files() {
            std::fs::write(out.join(name), text)
                .with_context(|| format!("writing {}", out.join(name).display()))?;
        }
    }
    Ok(version)
}
