//! `flywheel weights export`: a published version as a complete Hugging Face directory, which
//! transformers, vLLM and SGLang load.

use std::path::PathBuf;

use flywheel_storage::PolicyVersion;
use flywheel_storage::blob::BlobStore;
pub use flywheel_worker::hf_dir::{ExportText, export};

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
