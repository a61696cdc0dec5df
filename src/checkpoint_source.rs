//! Where a run's Hugging Face checkpoint comes from: a local directory, or an object-store URL
//! (`s3://bucket/prefix?…`, `file:///…`) whose files are downloaded once into a local cache
//! folder that the model code then reads like any directory.

use std::path::PathBuf;

use anyhow::{Context, bail};
use flywheel_storage::blob::BlobStore;
use sha2::{Digest, Sha256};

/// Whether `source` names an object-store URL rather than a directory.
pub fn is_url(source: &str) -> bool {
    source.contains("://")
}

/// The folder downloaded checkpoints are kept in: `FLYWHEEL_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/flywheel` or `$HOME/.cache/flywheel`, else the temporary directory.
fn cache_root() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("FLYWHEEL_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("flywheel")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/flywheel")))
        .unwrap_or_else(|| std::env::temp_dir().join("flywheel-cache"))
}

/// The local directory of `source`: itself when it is a path; for a URL, the cache folder it
/// was downloaded to (downloading it first unless an earlier call completed it). The folder
/// is named after the URL without its query (which may hold credentials) and appears only
/// once complete, so concurrent processes never read half a checkpoint.
pub async fn local_dir(source: &str) -> anyhow::Result<PathBuf> {
    if !is_url(source) {
        return Ok(PathBuf::from(source));
    }
    let public = source.split('?').next().unwrap_or_default();
    let digest = Sha256::digest(public.as_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let dir = cache_root().join("checkpoints").join(name);
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    let store = BlobStore::open(source)?;
    let files = store
        .list("")
        .await
        .with_context(|| format!("listing the checkpoint at {public}"))?;
    // A checkpoint directory is flat; sub-folders (e.g. Llama's `original/`) are not needed.
    let files: Vec<_> = files.into_iter().filter(|f| !f.key.contains('/')).collect();
    if !files.iter().any(|f| f.key == "config.json") {
        bail!("{public} holds no config.json: is it a Hugging Face checkpoint directory?");
    }
    let parent = dir.parent().expect("the cache folder has a parent");
    std::fs::create_dir_all(parent)
        .with_context(|| format!("creating the checkpoint cache {}", parent.display()))?;
    let partial = tempfile::tempdir_in(parent)?;
    for f in &files {
        let bytes = store
            .get(&f.key)
            .await
            .with_context(|| format!("downloading {} of {public}", f.key))?;
        if bytes.len() as u64 != f.size {
            bail!(
                "{} of {public}: {} bytes arrived, {} listed",
                f.key,
                bytes.len(),
                f.size
            );
        }
        std::fs::write(partial.path().join(&f.key), &bytes)?;
    }
    let partial = partial.keep();
    if let Err(e) = std::fs::rename(&partial, &dir) {
        // Another process finished first: use its copy.
        let _ = std::fs::remove_dir_all(&partial);
        if !dir.join("config.json").is_file() {
            return Err(e).with_context(|| format!("moving the checkpoint into {}", dir.display()));
        }
    }
    tracing::info!(source = %public, dir = %dir.display(), files = files.len(), "downloaded the checkpoint");
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `file://` URL is downloaded into the cache once; the copy loads like the original.
    #[tokio::test]
    async fn a_url_checkpoint_is_downloaded_once_into_the_cache() {
        let fixture =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("model/tests/fixtures/hf/qwen2");
        let cache = tempfile::tempdir().unwrap();
        // SAFETY: this is the only test of the binary that reads FLYWHEEL_CACHE_DIR.
        unsafe { std::env::set_var("FLYWHEEL_CACHE_DIR", cache.path()) };
        let url = format!("file://{}", fixture.display());
        let dir = local_dir(&url).await.unwrap();
        assert!(dir.starts_with(cache.path()));
        let original = flywheel_model::Checkpoint::open(&fixture, None).unwrap();
        let copy = flywheel_model::Checkpoint::open(&dir, None).unwrap();
        assert_eq!(copy.params, original.params);
        assert!(dir.join("tokenizer.json").is_file());
        assert_eq!(
            local_dir(&url).await.unwrap(),
            dir,
            "the second call uses the cache"
        );

        let empty = tempfile::tempdir().unwrap();
        let err = local_dir(&format!("file://{}", empty.path().display()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no config.json"), "{err}");
        assert_eq!(
            local_dir("/some/dir").await.unwrap(),
            PathBuf::from("/some/dir")
        );
    }
}
