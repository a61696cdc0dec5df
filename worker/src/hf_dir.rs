//! A published weights version as a Hugging Face checkpoint directory: `config.json`,
//! `model.safetensors` (in the model's dtype), and the tokenizer and generation files (the
//! checkpoint's, or the built-in character tokenizer's). It is what `flywheel weights export`
//! writes, and what the vLLM and SGLang engines hand their servers to load.
//!
//! [`HfExporter`] keeps the version it wrote last, so the next one is fetched incrementally
//! (only the chunks that changed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flywheel_model::{ModelConfig, ModelError, Params, Tokenizer, hf};
use flywheel_storage::PolicyVersion;
use flywheel_storage::blob::BlobStore;
use flywheel_storage::weights::{
    self, HF_SOURCE_KEY, MODEL_CONFIG_KEY, WeightsConfig, WeightsError, WeightsManifest,
};

/// Where an export's tokenizer files come from.
#[derive(Clone, Debug, Default)]
pub struct ExportText {
    /// The run's checkpoint directory (`[trainer] hf_model`, localised); without it, the
    /// directory the version's metadata names.
    pub checkpoint: Option<PathBuf>,
    /// The character tokenizer of a built-in model (`[trainer] charset`).
    pub charset: String,
}

/// Why a version could not be written as a directory.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The run has no published version.
    #[error("run `{run}` has no published weights yet")]
    NoVersion {
        /// The run.
        run: String,
    },
    /// Fetching the version failed.
    #[error("fetching weights version {version}: {source}")]
    Fetch {
        /// The version.
        version: PolicyVersion,
        /// Why.
        #[source]
        source: WeightsError,
    },
    /// The version was not published by a Flywheel trainer (no model shape).
    #[error(
        "version {version} carries no `{MODEL_CONFIG_KEY}`: it was not published by a Flywheel \
         trainer"
    )]
    NotFlywheel {
        /// The version.
        version: PolicyVersion,
    },
    /// The tokenizer files are not here.
    #[error(
        "the run's checkpoint directory {} (its tokenizer files) is not readable here; export \
         where it is, or set [trainer] hf_model",
        dir.display()
    )]
    NoTokenizer {
        /// The directory that should hold them.
        dir: PathBuf,
    },
    /// The model could not be rebuilt or saved.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A file could not be written.
    #[error("writing {}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl ExportError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        ExportError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Writes published versions of a run as directories, fetching each incrementally against
/// the last one it wrote.
pub struct HfExporter {
    blobs: BlobStore,
    run: String,
    text: ExportText,
    weights: WeightsConfig,
    /// The last version fetched: its manifest and tensors.
    held: Option<(WeightsManifest, BTreeMap<String, Vec<u8>>)>,
}

impl HfExporter {
    /// An exporter of `run`'s versions in `blobs`.
    pub fn new(blobs: BlobStore, run: &str, text: ExportText, weights: WeightsConfig) -> Self {
        HfExporter {
            blobs,
            run: run.to_owned(),
            text,
            weights,
            held: None,
        }
    }

    /// The newest published version.
    pub async fn latest(&self) -> Result<PolicyVersion, ExportError> {
        weights::latest_version(&self.blobs, &self.run)
            .await
            .map_err(|source| ExportError::Fetch { version: 0, source })?
            .ok_or_else(|| ExportError::NoVersion {
                run: self.run.clone(),
            })
    }

    /// Writes `version` into `out` (created if missing; files in it are replaced). Returns the
    /// bytes fetched from the object store (only what changed since the last version).
    pub async fn write(&mut self, version: PolicyVersion, out: &Path) -> Result<u64, ExportError> {
        let have = self.held.as_ref().map(|(m, t)| (m, t));
        let fetched = weights::fetch(&self.blobs, &self.run, version, have, &self.weights)
            .await
            .map_err(|source| ExportError::Fetch { version, source })?;
        let meta = &fetched.manifest.metadata;
        let json = meta
            .get(MODEL_CONFIG_KEY)
            .ok_or(ExportError::NotFlywheel { version })?;
        let model: ModelConfig = serde_json::from_str(json).map_err(|e| {
            ModelError::InvalidConfig(format!("`{MODEL_CONFIG_KEY}` of version {version}: {e}"))
        })?;
        let params = Params::from_bytes_map(&model, &fetched.tensors)?;
        let source = self
            .text
            .checkpoint
            .clone()
            .or_else(|| meta.get(HF_SOURCE_KEY).map(PathBuf::from));
        if let Some(dir) = &source
            && !dir.join("tokenizer.json").is_file()
        {
            return Err(ExportError::NoTokenizer { dir: dir.clone() });
        }
        let eos = match &source {
            Some(dir) => hf::eos_tokens(dir)?,
            None => Vec::new(),
        };
        hf::save(out, &params, &eos, source.as_deref())?;
        if source.is_none() {
            // The built-in model: its character tokenizer as Hugging Face files.
            let charset = &self.text.charset;
            let chars = Tokenizer::new(charset)
                .map_err(|e| ModelError::InvalidConfig(format!("charset {charset:?}: {e}")))?;
            for (name, text) in chars.hf_files() {
                let path = out.join(name);
                std::fs::write(&path, text).map_err(|e| ExportError::io(&path, e))?;
            }
        }
        let bytes_fetched = fetched.bytes_fetched;
        self.held = Some((fetched.manifest, fetched.tensors));
        Ok(bytes_fetched)
    }

    /// Writes `version` into `out` so that `out` appears only once complete: into a sibling
    /// directory first, renamed into place (a server never reads a half-written version).
    pub async fn write_atomically(
        &mut self,
        version: PolicyVersion,
        out: &Path,
    ) -> Result<u64, ExportError> {
        if out.join("config.json").is_file() {
            return Ok(0);
        }
        let partial = out.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        let fetched = self.write(version, &partial).await?;
        std::fs::rename(&partial, out).map_err(|e| ExportError::io(out, e))?;
        Ok(fetched)
    }
}

/// Writes `version` (default the newest) of `run` to `out`; returns the version written.
pub async fn export(
    blobs: &BlobStore,
    run: &str,
    version: Option<PolicyVersion>,
    text: &ExportText,
    out: &Path,
) -> Result<PolicyVersion, ExportError> {
    let mut exporter = HfExporter::new(blobs.clone(), run, text.clone(), Default::default());
    let version = match version {
        Some(v) => v,
        None => exporter.latest().await?,
    };
    exporter.write(version, out).await?;
    Ok(version)
}
