//! Versioned, content-addressed policy weights in the object store (DESIGN.md §6.5).
//!
//! Version v of a run's weights is a [`WeightsManifest`] at
//! [`keys::weights_manifest`]`(run, v)`: for each tensor its name, shape, dtype and the list of
//! chunks that hold its bytes. A chunk is stored once, under the SHA-256 of its content
//! ([`keys::chunk`]`(run, hash)`), so a chunk that did not change since another version costs
//! nothing to publish and nothing to fetch:
//!
//! - [`publish`] splits each tensor into chunks of [`WeightsConfig::chunk_bytes`] aligned at
//!   the start of the tensor (a tensor never shares a chunk with another, so an unchanged
//!   tensor — a frozen embedding, a norm without gradient — is always reused whole), uploads
//!   only chunks that are new, and writes the manifest last with create-if-absent: a manifest
//!   that exists names only chunks that exist. Re-publishing the same version with the same
//!   bytes (a finisher that crashed after the manifest and is redone) is a no-op; with other
//!   bytes it is a [`WeightsError::VersionConflict`].
//! - [`fetch`] reads a version, copying every chunk it already holds (from the version it has)
//!   and downloading the others concurrently, each verified against its hash.
//! - [`collect_garbage`] deletes the manifests of versions not kept and every chunk that no
//!   remaining manifest references.
//!
//! # What incremental publication saves
//!
//! Content addressing saves exactly the chunks whose bytes are identical. For f32 weights after
//! an AdamW step with lr > 0 that is *only* the regions whose update was exactly zero: rows
//! with zero gradient and zero moments and no weight decay (embedding rows of tokens never
//! seen, positions never reached, tensors that are frozen). Every other element changes in its
//! low mantissa bits, so its chunk is new. Smaller chunks find more such regions at the cost of
//! more objects; per-tensor alignment guarantees that whole unchanged tensors are reused.
//! Delta encoding (XOR against v−1 plus compression) would save more on dense updates and is
//! not implemented.
//!
//! # Garbage collection and concurrency
//!
//! Publication and collection are meant to run from one process at a time (the trainer that
//! finishes a step): collecting while another process is between uploading chunks and writing
//! their manifest could delete chunks that manifest is about to name. [`collect_garbage`]
//! derives the referenced set from every manifest still present after deleting the unkept
//! ones, so a version another party still needs must be in `keep`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::blob::{BlobError, BlobStore, PutOutcome};
use crate::keys;
use crate::types::PolicyVersion;

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// The [`WeightsManifest::metadata`] key holding the model's config as JSON (the trainer
/// writes `flywheel_model::ModelConfig` there; the builtin engine builds its model from it).
pub const MODEL_CONFIG_KEY: &str = "model_config";

/// Default chunk size: 256 KiB.
pub const DEFAULT_CHUNK_BYTES: u64 = 256 * 1024;

/// Largest chunk size accepted (bounds what one forged manifest entry can make us allocate).
pub const MAX_CHUNK_BYTES: u64 = 64 * 1024 * 1024;

/// Errors of weight publication and loading.
#[derive(Debug, Error)]
pub enum WeightsError {
    /// The object store failed.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// No manifest for this version (not published yet, or collected).
    #[error("weights version {version} of run `{run}` not found: not published yet, or collected")]
    VersionNotFound {
        /// The run.
        run: String,
        /// The version asked for.
        version: PolicyVersion,
    },
    /// A manifest that cannot be read or violates its own invariants.
    #[error("corrupt weights manifest `{key}`: {reason}")]
    CorruptManifest {
        /// The manifest's key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A chunk whose content does not match its hash or length. It is never loaded.
    #[error("corrupt weights chunk `{key}`: {reason}; delete it and re-publish the version")]
    CorruptChunk {
        /// The chunk's key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The version was already published with different content.
    #[error(
        "weights version `{key}` already exists with different content: two trainers published \
         different weights for the same version (non-deterministic training or a split run id)"
    )]
    VersionConflict {
        /// The manifest's key.
        key: String,
    },
    /// The caller's tensors or configuration are unusable.
    #[error("invalid weights input: {0}")]
    InvalidInput(String),
}

/// The element type of a tensor's bytes (little-endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    /// IEEE 754 single precision, 4 bytes.
    #[default]
    F32,
    /// bfloat16, 2 bytes.
    Bf16,
    /// IEEE 754 half precision, 2 bytes.
    F16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }
}

/// One content-addressed chunk of a tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Lowercase hex SHA-256 of the chunk's bytes; also its key suffix.
    pub hash: String,
    /// Its length in bytes.
    pub len: u64,
}

/// One tensor of a version: where its bytes are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Stable name (the model's parameter name).
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<u64>,
    /// Element type.
    pub dtype: Dtype,
    /// Total bytes (`product(shape) · dtype.size()`).
    pub bytes: u64,
    /// The chunks, in order; their lengths sum to `bytes`.
    pub chunks: Vec<ChunkRef>,
}

/// The manifest of one weights version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightsManifest {
    /// [`MANIFEST_FORMAT`] when written.
    pub format: u32,
    /// The policy version these weights are.
    pub version: PolicyVersion,
    /// The chunk size used to split tensors (the last chunk of a tensor may be shorter).
    pub chunk_bytes: u64,
    /// Sum of the tensors' bytes.
    pub total_bytes: u64,
    /// The tensors, in the publisher's order (the model's stable parameter order).
    pub tensors: Vec<TensorEntry>,
    /// Free-form facts about the weights set by the publisher, e.g. `model_config` (the
    /// trainer stores the model's JSON config there, so a worker can build the model from the
    /// published weights alone).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

impl WeightsManifest {
    /// The entry of tensor `name`, if any.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Every chunk hash the manifest references.
    pub fn chunk_hashes(&self) -> BTreeSet<&str> {
        self.tensors
            .iter()
            .flat_map(|t| t.chunks.iter().map(|c| c.hash.as_str()))
            .collect()
    }

    /// Checks the manifest's internal invariants (lengths, hashes, unique names).
    fn validate(&self, key: &str) -> Result<(), WeightsError> {
        let bad = |reason: String| WeightsError::CorruptManifest {
            key: key.to_owned(),
            reason,
        };
        if self.format != MANIFEST_FORMAT {
            return Err(bad(format!(
                "format {} (this build reads {MANIFEST_FORMAT}); upgrade the reader",
                self.format
            )));
        }
        if self.chunk_bytes == 0 || self.chunk_bytes > MAX_CHUNK_BYTES {
            return Err(bad(format!("chunk size {} out of range", self.chunk_bytes)));
        }
        let mut names = BTreeSet::new();
        let mut total = 0u64;
        for t in &self.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(bad(format!("tensor `{}` listed twice", t.name)));
            }
            let numel = t
                .shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("tensor `{}`: shape overflows", t.name)))?;
            if numel.checked_mul(t.dtype.size()) != Some(t.bytes) {
                return Err(bad(format!(
                    "tensor `{}`: {} bytes do not match shape {:?} of {:?}",
                    t.name, t.bytes, t.shape, t.dtype
                )));
            }
            let mut sum = 0u64;
            for c in &t.chunks {
                if !is_hex_digest(&c.hash) {
                    return Err(bad(format!(
                        "tensor `{}`: bad chunk hash `{}`",
                        t.name, c.hash
                    )));
                }
                if c.len == 0 || c.len > self.chunk_bytes {
                    return Err(bad(format!(
                        "tensor `{}`: chunk length {} out of range",
                        t.name, c.len
                    )));
                }
                sum += c.len;
            }
            if sum != t.bytes {
                return Err(bad(format!(
                    "tensor `{}`: chunks hold {sum} bytes, tensor has {}",
                    t.name, t.bytes
                )));
            }
            total = total
                .checked_add(t.bytes)
                .ok_or_else(|| bad("total size overflows".into()))?;
        }
        if total != self.total_bytes {
            return Err(bad(format!(
                "tensors hold {total} bytes, manifest says {}",
                self.total_bytes
            )));
        }
        Ok(())
    }
}

/// One tensor to publish: name, shape, dtype and its little-endian bytes.
#[derive(Clone, Copy, Debug)]
pub struct TensorBytes<'a> {
    /// Stable name.
    pub name: &'a str,
    /// Dimensions, outermost first.
    pub shape: &'a [usize],
    /// Element type of `bytes`.
    pub dtype: Dtype,
    /// The values, little-endian.
    pub bytes: &'a [u8],
}

/// How weights are chunked and transferred.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WeightsConfig {
    /// Chunk size in bytes (smaller finds more unchanged regions, but makes more objects).
    pub chunk_bytes: u64,
    /// Chunks uploaded or downloaded at once.
    pub concurrency: usize,
}

impl Default for WeightsConfig {
    fn default() -> Self {
        WeightsConfig {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            concurrency: 16,
        }
    }
}

impl WeightsConfig {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), WeightsError> {
        if self.chunk_bytes == 0 || self.chunk_bytes > MAX_CHUNK_BYTES {
            return Err(WeightsError::InvalidInput(format!(
                "chunk_bytes = {} must be in 1..={MAX_CHUNK_BYTES}",
                self.chunk_bytes
            )));
        }
        if self.concurrency == 0 {
            return Err(WeightsError::InvalidInput(
                "concurrency must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// What [`publish`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct PublishReport {
    /// The manifest of the published version (pass it as `previous` to the next publish).
    pub manifest: WeightsManifest,
    /// Bytes of chunks uploaded.
    pub bytes_written: u64,
    /// Size of the whole version.
    pub bytes_total: u64,
    /// Chunks uploaded (new content).
    pub chunks_written: u64,
    /// Chunk references satisfied without an upload (known from `previous`, repeated within
    /// this version, or already present in the store).
    pub chunks_reused: u64,
    /// Whether this call created the manifest (false: the same version was already there).
    pub manifest_created: bool,
}

/// What [`fetch`] returned.
#[derive(Clone, Debug, PartialEq)]
pub struct FetchedWeights {
    /// The version's manifest.
    pub manifest: WeightsManifest,
    /// Each tensor's bytes, by name.
    pub tensors: BTreeMap<String, Vec<u8>>,
    /// Bytes downloaded.
    pub bytes_fetched: u64,
    /// Chunks downloaded (each distinct hash once).
    pub chunks_fetched: u64,
    /// Chunk references filled from the bytes the caller already had.
    pub chunks_reused: u64,
}

/// What [`collect_garbage`] deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Manifests of versions not kept, deleted.
    pub manifests_deleted: u64,
    /// Chunks no remaining manifest references, deleted.
    pub chunks_deleted: u64,
    /// Their bytes.
    pub bytes_deleted: u64,
    /// Chunks still referenced.
    pub chunks_kept: u64,
}

/// Lowercase hex SHA-256 of `data`.
pub fn content_hash(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        s.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
    }
    s
}

/// Whether `s` looks like a [`content_hash`] (so it is safe to put in a key).
fn is_hex_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Publishes `tensors` as version `version` of `run`, uploading only chunks that are not
/// already known from `previous` (the manifest of a version that still exists, typically
/// v−1) or present in the store. The manifest is written last, create-if-absent.
pub async fn publish(
    blob: &BlobStore,
    run: &str,
    version: PolicyVersion,
    tensors: &[TensorBytes<'_>],
    previous: Option<&WeightsManifest>,
    config: &WeightsConfig,
) -> Result<PublishReport, WeightsError> {
    publish_with_metadata(
        blob,
        run,
        version,
        tensors,
        previous,
        &BTreeMap::new(),
        config,
    )
    .await
}

/// [`publish`] with [`WeightsManifest::metadata`] set to `metadata`.
pub async fn publish_with_metadata(
    blob: &BlobStore,
    run: &str,
    version: PolicyVersion,
    tensors: &[TensorBytes<'_>],
    previous: Option<&WeightsManifest>,
    metadata: &BTreeMap<String, String>,
    config: &WeightsConfig,
) -> Result<PublishReport, WeightsError> {
    config.validate()?;
    let known: BTreeSet<&str> = previous.map(|m| m.chunk_hashes()).unwrap_or_default();
    let mut seen_names = BTreeSet::new();
    let mut entries = Vec::with_capacity(tensors.len());
    // Distinct new hashes → the bytes to upload.
    let mut uploads: BTreeMap<String, &[u8]> = BTreeMap::new();
    let (mut refs, mut total) = (0u64, 0u64);
    for t in tensors {
        if !seen_names.insert(t.name) {
            return Err(WeightsError::InvalidInput(format!(
                "tensor `{}` given twice",
                t.name
            )));
        }
        let numel: u64 = t.shape.iter().map(|&d| d as u64).product();
        if numel * t.dtype.size() != t.bytes.len() as u64 {
            return Err(WeightsError::InvalidInput(format!(
                "tensor `{}`: {} bytes do not match shape {:?} of {:?}",
                t.name,
                t.bytes.len(),
                t.shape,
                t.dtype
            )));
        }
        let chunks = t
            .bytes
            .chunks(config.chunk_bytes as usize)
            .map(|c| {
                let hash = content_hash(c);
                if !known.contains(hash.as_str()) {
                    uploads.entry(hash.clone()).or_insert(c);
                }
                ChunkRef {
                    hash,
                    len: c.len() as u64,
                }
            })
            .collect::<Vec<_>>();
        refs += chunks.len() as u64;
        total += t.bytes.len() as u64;
        entries.push(TensorEntry {
            name: t.name.to_owned(),
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            dtype: t.dtype,
            bytes: t.bytes.len() as u64,
            chunks,
        });
    }
    let manifest = WeightsManifest {
        format: MANIFEST_FORMAT,
        version,
        chunk_bytes: config.chunk_bytes,
        total_bytes: total,
        tensors: entries,
        metadata: metadata.clone(),
    };

    // Owned keys and bytes: the upload futures borrow nothing (they stay `Send` for any
    // caller, see rust-lang/rust#102211).
    let uploads: Vec<(String, Bytes)> = uploads
        .into_iter()
        .map(|(hash, data)| (keys::chunk(run, &hash), Bytes::copy_from_slice(data)))
        .collect();
    let results: Vec<(u64, bool)> = futures::stream::iter(uploads)
        .map(|(key, data)| {
            let blob = blob.clone();
            async move {
                let len = data.len() as u64;
                let outcome = blob.put_if_absent(&key, data).await?;
                Ok::<_, WeightsError>((len, outcome == PutOutcome::Created))
            }
        })
        .buffer_unordered(config.concurrency)
        .try_collect()
        .await?;
    let chunks_written = results.iter().filter(|(_, created)| *created).count() as u64;
    let bytes_written = results
        .iter()
        .filter(|(_, created)| *created)
        .map(|(n, _)| n)
        .sum();

    let key = keys::weights_manifest(run, version);
    let body = serde_json::to_vec(&manifest)
        .map_err(|e| WeightsError::InvalidInput(format!("cannot encode the manifest: {e}")))?;
    let manifest_created = match blob.put_if_absent(&key, Bytes::from(body)).await? {
        PutOutcome::Created => true,
        PutOutcome::AlreadyExists => {
            if load_manifest(blob, run, version).await? != manifest {
                return Err(WeightsError::VersionConflict { key });
            }
            false
        }
    };
    Ok(PublishReport {
        manifest,
        bytes_written,
        bytes_total: total,
        chunks_written,
        chunks_reused: refs - chunks_written,
        manifest_created,
    })
}

/// Reads and validates the manifest of `version`.
pub async fn load_manifest(
    blob: &BlobStore,
    run: &str,
    version: PolicyVersion,
) -> Result<WeightsManifest, WeightsError> {
    let key = keys::weights_manifest(run, version);
    let body = match blob.get(&key).await {
        Ok(b) => b,
        Err(BlobError::NotFound { .. }) => {
            return Err(WeightsError::VersionNotFound {
                run: run.to_owned(),
                version,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let manifest: WeightsManifest =
        serde_json::from_slice(&body).map_err(|e| WeightsError::CorruptManifest {
            key: key.clone(),
            reason: e.to_string(),
        })?;
    manifest.validate(&key)?;
    if manifest.version != version {
        return Err(WeightsError::CorruptManifest {
            key,
            reason: format!("it describes version {}", manifest.version),
        });
    }
    Ok(manifest)
}

/// Whether version `version` of `run` has been published.
pub async fn exists(
    blob: &BlobStore,
    run: &str,
    version: PolicyVersion,
) -> Result<bool, WeightsError> {
    Ok(blob.exists(&keys::weights_manifest(run, version)).await?)
}

/// Every published version of `run`, ascending.
pub async fn list_versions(
    blob: &BlobStore,
    run: &str,
) -> Result<Vec<PolicyVersion>, WeightsError> {
    let mut versions: Vec<_> = blob
        .list(&keys::weights_prefix(run))
        .await?
        .iter()
        .filter_map(|m| keys::parse_weights_manifest(run, &m.key))
        .collect();
    versions.sort_unstable();
    Ok(versions)
}

/// The newest published version of `run`, if any.
pub async fn latest_version(
    blob: &BlobStore,
    run: &str,
) -> Result<Option<PolicyVersion>, WeightsError> {
    Ok(list_versions(blob, run).await?.last().copied())
}

/// Fetches version `version`. `have` is a version the caller holds (its manifest and its
/// tensors' bytes by name): every chunk of it that reappears is copied instead of downloaded.
/// The caller's bytes are trusted (they were verified when fetched); downloaded chunks are
/// verified against their hash and length.
pub async fn fetch(
    blob: &BlobStore,
    run: &str,
    version: PolicyVersion,
    have: Option<(&WeightsManifest, &BTreeMap<String, Vec<u8>>)>,
    config: &WeightsConfig,
) -> Result<FetchedWeights, WeightsError> {
    config.validate()?;
    let manifest = load_manifest(blob, run, version).await?;

    // hash → a slice of the caller's bytes holding it.
    let mut local: HashMap<&str, &[u8]> = HashMap::new();
    if let Some((m, bytes)) = have {
        for t in &m.tensors {
            let Some(data) = bytes.get(&t.name) else {
                continue;
            };
            if data.len() as u64 != t.bytes {
                continue; // not the bytes that manifest describes: do not trust them
            }
            let mut off = 0usize;
            for c in &t.chunks {
                let end = off + c.len as usize;
                local.entry(c.hash.as_str()).or_insert(&data[off..end]);
                off = end;
            }
        }
    }

    let missing: BTreeMap<&str, u64> = manifest
        .tensors
        .iter()
        .flat_map(|t| &t.chunks)
        .filter(|c| !local.contains_key(c.hash.as_str()))
        .map(|c| (c.hash.as_str(), c.len))
        .collect();
    let missing: Vec<(String, String, u64)> = missing
        .into_iter()
        .map(|(hash, len)| (hash.to_owned(), keys::chunk(run, hash), len))
        .collect();
    let downloaded: HashMap<String, Bytes> = futures::stream::iter(missing)
        .map(|(hash, key, len)| {
            let blob = blob.clone();
            async move {
                let data = match blob.get(&key).await {
                    Ok(d) => d,
                    Err(BlobError::NotFound { .. }) => {
                        return Err(WeightsError::CorruptChunk {
                            key,
                            reason: "missing (collected while still referenced?)".into(),
                        });
                    }
                    Err(e) => return Err(e.into()),
                };
                if data.len() as u64 != len {
                    return Err(WeightsError::CorruptChunk {
                        key,
                        reason: format!("{} bytes, the manifest says {len}", data.len()),
                    });
                }
                let actual = content_hash(&data);
                if actual != hash {
                    return Err(WeightsError::CorruptChunk {
                        key,
                        reason: format!("content hashes to {actual}"),
                    });
                }
                Ok((hash, data))
            }
        })
        .buffer_unordered(config.concurrency)
        .try_collect()
        .await?;

    let mut tensors = BTreeMap::new();
    let mut chunks_reused = 0u64;
    for t in &manifest.tensors {
        let mut data = Vec::with_capacity(t.bytes as usize);
        for c in &t.chunks {
            if let Some(src) = local.get(c.hash.as_str()) {
                chunks_reused += 1;
                data.extend_from_slice(src);
            } else if let Some(src) = downloaded.get(c.hash.as_str()) {
                data.extend_from_slice(src);
            }
        }
        tensors.insert(t.name.clone(), data);
    }
    let bytes_fetched = downloaded.values().map(|d| d.len() as u64).sum();
    let chunks_fetched = downloaded.len() as u64;
    Ok(FetchedWeights {
        manifest,
        tensors,
        bytes_fetched,
        chunks_fetched,
        chunks_reused,
    })
}

/// Deletes the manifests of every version of `run` not in `keep`, then every chunk that no
/// remaining manifest references. Run it only from the (single) publisher; see the module docs.
pub async fn collect_garbage(
    blob: &BlobStore,
    run: &str,
    keep: &[PolicyVersion],
) -> Result<GcReport, WeightsError> {
    let mut report = GcReport::default();
    for v in list_versions(blob, run).await? {
        if !keep.contains(&v) {
            blob.delete(&keys::weights_manifest(run, v)).await?;
            report.manifests_deleted += 1;
        }
    }
    let mut referenced = BTreeSet::new();
    for v in list_versions(blob, run).await? {
        let m = load_manifest(blob, run, v).await?;
        referenced.extend(m.chunk_hashes().into_iter().map(str::to_owned));
    }
    let prefix = keys::chunks_prefix(run);
    for meta in blob.list(&prefix).await? {
        let hash = meta.key.strip_prefix(&prefix).unwrap_or(&meta.key);
        if referenced.contains(hash) {
            report.chunks_kept += 1;
        } else {
            blob.delete(&meta.key).await?;
            report.chunks_deleted += 1;
            report.bytes_deleted += meta.size;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three f32 tensors; `emb` is 8 KiB, so with 1 KiB chunks it has 8 chunks.
    fn weights(seed: f32) -> Vec<(String, Vec<usize>, Vec<u8>)> {
        let mk = |n: usize, f: &dyn Fn(usize) -> f32| -> Vec<u8> {
            (0..n).flat_map(|i| f(i).to_le_bytes()).collect()
        };
        vec![
            (
                "emb".into(),
                vec![64, 32],
                mk(2048, &|i| i as f32 * 0.01 + seed),
            ),
            ("norm".into(), vec![32], mk(32, &|_| 1.0)),
            ("head".into(), vec![32, 16], mk(512, &|i| (i as f32).sin())),
        ]
    }

    fn view(w: &[(String, Vec<usize>, Vec<u8>)]) -> Vec<TensorBytes<'_>> {
        w.iter()
            .map(|(name, shape, bytes)| TensorBytes {
                name,
                shape,
                dtype: Dtype::F32,
                bytes,
            })
            .collect()
    }

    fn small_chunks() -> WeightsConfig {
        WeightsConfig {
            chunk_bytes: 1024,
            concurrency: 4,
        }
    }

    fn as_map(w: &[(String, Vec<usize>, Vec<u8>)]) -> BTreeMap<String, Vec<u8>> {
        w.iter().map(|(n, _, b)| (n.clone(), b.clone())).collect()
    }

    /// Changes one f32 of `emb` at element `i` (touching exactly one 1 KiB chunk).
    fn bump(w: &mut [(String, Vec<usize>, Vec<u8>)], i: usize) {
        let b = &mut w[0].2[i * 4..i * 4 + 4];
        let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]) + 0.5;
        b.copy_from_slice(&v.to_le_bytes());
    }

    #[tokio::test]
    async fn second_publish_writes_only_changed_chunks_and_fetch_reads_only_those() {
        let blob = BlobStore::open("memory://").unwrap();
        let cfg = small_chunks();
        let w0 = weights(0.0);
        let r0 = publish(&blob, "r", 0, &view(&w0), None, &cfg)
            .await
            .unwrap();
        // 8 + 1 + 2 chunks, all new.
        assert_eq!((r0.chunks_written, r0.bytes_written), (11, r0.bytes_total));
        assert!(r0.manifest_created);

        let mut w1 = w0.clone();
        bump(&mut w1, 300); // chunk 1 of emb
        let r1 = publish(&blob, "r", 1, &view(&w1), Some(&r0.manifest), &cfg)
            .await
            .unwrap();
        assert_eq!(r1.chunks_written, 1);
        assert_eq!(r1.bytes_written, 1024);
        assert_eq!(r1.chunks_reused, 10);
        assert!(r1.bytes_written * 10 < r1.bytes_total);

        let f = fetch(&blob, "r", 1, Some((&r0.manifest, &as_map(&w0))), &cfg)
            .await
            .unwrap();
        assert_eq!((f.chunks_fetched, f.bytes_fetched), (1, 1024));
        assert_eq!(f.chunks_reused, 10);
        assert_eq!(f.tensors, as_map(&w1));
        assert_eq!(f.manifest, r1.manifest);

        // Without a previous version everything is downloaded, with the same result.
        let full = fetch(&blob, "r", 1, None, &cfg).await.unwrap();
        assert_eq!(full.tensors, as_map(&w1));
        assert_eq!(full.bytes_fetched, r1.bytes_total);
    }

    #[tokio::test]
    async fn chunks_present_in_the_store_are_not_rewritten_without_previous() {
        let blob = BlobStore::open("memory://").unwrap();
        let cfg = small_chunks();
        let w = weights(0.0);
        publish(&blob, "r", 0, &view(&w), None, &cfg).await.unwrap();
        let r = publish(&blob, "r", 1, &view(&w), None, &cfg).await.unwrap();
        assert_eq!((r.chunks_written, r.bytes_written), (0, 0));
    }

    #[tokio::test]
    async fn corrupt_and_missing_chunks_are_detected_never_loaded() {
        let blob = BlobStore::open("memory://").unwrap();
        let cfg = small_chunks();
        let w = weights(0.0);
        let r = publish(&blob, "r", 0, &view(&w), None, &cfg).await.unwrap();
        let c = &r.manifest.tensors[2].chunks[1];
        let key = keys::chunk("r", &c.hash);
        let mut bytes = blob.get(&key).await.unwrap().to_vec();
        bytes[17] ^= 1;
        blob.put(&key, Bytes::from(bytes)).await.unwrap();
        match fetch(&blob, "r", 0, None, &cfg).await {
            Err(WeightsError::CorruptChunk { key: k, .. }) => assert_eq!(k, key),
            other => panic!("expected a corrupt chunk, got {other:?}"),
        }
        blob.put(&key, Bytes::from_static(b"short")).await.unwrap();
        assert!(matches!(
            fetch(&blob, "r", 0, None, &cfg).await,
            Err(WeightsError::CorruptChunk { .. })
        ));
        blob.delete(&key).await.unwrap();
        assert!(matches!(
            fetch(&blob, "r", 0, None, &cfg).await,
            Err(WeightsError::CorruptChunk { .. })
        ));
    }

    #[tokio::test]
    async fn corrupt_manifest_and_missing_version_are_typed_errors() {
        let blob = BlobStore::open("memory://").unwrap();
        let cfg = small_chunks();
        assert!(matches!(
            fetch(&blob, "r", 3, None, &cfg).await,
            Err(WeightsError::VersionNotFound { version: 3, .. })
        ));
        blob.put(
            &keys::weights_manifest("r", 3),
            Bytes::from_static(b"{nope"),
        )
        .await
        .unwrap();
        assert!(matches!(
            load_manifest(&blob, "r", 3).await,
            Err(WeightsError::CorruptManifest { .. })
        ));
        // A manifest whose chunk lengths do not add up.
        let w = weights(0.0);
        let mut m = publish(&blob, "r", 4, &view(&w), None, &cfg)
            .await
            .unwrap()
            .manifest;
        m.tensors[0].chunks.pop();
        blob.put(
            &keys::weights_manifest("r", 4),
            Bytes::from(serde_json::to_vec(&m).unwrap()),
        )
        .await
        .unwrap();
        assert!(matches!(
            load_manifest(&blob, "r", 4).await,
            Err(WeightsError::CorruptManifest { .. })
        ));
    }

    #[tokio::test]
    async fn republishing_is_idempotent_and_conflicts_are_refused() {
        let blob = BlobStore::open("memory://").unwrap();
        let cfg = small_chunks();
        let w = weights(0.0);
        publish(&blob, "r", 0, &view(&w), None, &cfg).await.unwrap();
        let again = publish(&blob, "r", 0, &view(&w), None, &cfg).await.unwrap();
        assert!(!again.manifest_created);
        let mut other = w.clone();
        bump(&mut other, 0);
        assert!(matches!(
            publish(&blob, "r", 0, &view(&other), None, &cfg).await,
            Err(WeightsError::VersionConflict { .. })
        ));
    }

    #[tokio::test]
    async fn metadata_round_trips_and_is_part_of_the_version() {
        let blob = BlobStore::open("memory://").unwrap();
        let cfg = small_chunks();
        let w = weights(0.0);
        let meta: BTreeMap<String, String> = [("model_config".to_owned(), "{}".to_owned())].into();
        publish_with_metadata(&blob, "r", 0, &view(&w), None, &meta, &cfg)
            .await
            .unwrap();
        assert_eq!(load_manifest(&blob, "r", 0).await.unwrap().metadata, meta);
        assert!(matches!(
            publish(&blob, "r", 0, &view(&w), None, &cfg).await,
            Err(WeightsError::VersionConflict { .. })
        ));
    }

    #[tokio::test]
    async fn bad_input_is_refused() {
        let blob = BlobStore::open("memory://").unwrap();
        let cfg = small_chunks();
        let t = TensorBytes {
            name: "x",
            shape: &[3],
            dtype: Dtype::F32,
            bytes: &[0; 8],
        };
        assert!(matches!(
            publish(&blob, "r", 0, &[t], None, &cfg).await,
            Err(WeightsError::InvalidInput(_))
        ));
        let ok = TensorBytes {
            bytes: &[0; 12],
            ..t
        };
        assert!(matches!(
            publish(&blob, "r", 0, &[ok, ok], None, &cfg).await,
            Err(WeightsError::InvalidInput(_))
        ));
        let zero = WeightsConfig {
            chunk_bytes: 0,
            ..cfg
        };
        assert!(publish(&blob, "r", 0, &[ok], None, &zero).await.is_err());
    }

    #[tokio::test]
    async fn versions_are_listed_and_gc_keeps_what_kept_versions_reference() {
        let blob = BlobStore::open("memory://").unwrap();
        let cfg = small_chunks();
        assert_eq!(latest_version(&blob, "r").await.unwrap(), None);
        let mut w = weights(0.0);
        let mut prev: Option<WeightsManifest> = None;
        for v in 0..3u64 {
            if v > 0 {
                bump(&mut w, 300 * v as usize);
            }
            let r = publish(&blob, "r", v, &view(&w), prev.as_ref(), &cfg)
                .await
                .unwrap();
            prev = Some(r.manifest);
        }
        // Another run's objects are never touched.
        publish(&blob, "other", 0, &view(&w), None, &cfg)
            .await
            .unwrap();
        assert_eq!(latest_version(&blob, "r").await.unwrap(), Some(2));
        assert!(exists(&blob, "r", 1).await.unwrap());

        let all_chunks = blob.list(&keys::chunks_prefix("r")).await.unwrap().len();
        assert_eq!(all_chunks, 11 + 1 + 1);
        let gc = collect_garbage(&blob, "r", &[2]).await.unwrap();
        assert_eq!(gc.manifests_deleted, 2);
        // v0's original chunk 1 and v1's chunk 2 are gone; v2's 11 chunks stay.
        assert_eq!((gc.chunks_deleted, gc.chunks_kept), (2, 11));
        assert_eq!(list_versions(&blob, "r").await.unwrap(), vec![2]);
        let f = fetch(&blob, "r", 2, None, &cfg).await.unwrap();
        assert_eq!(f.tensors, as_map(&w));
        assert!(exists(&blob, "other", 0).await.unwrap());
        assert_eq!(
            blob.list(&keys::chunks_prefix("other"))
                .await
                .unwrap()
                .len(),
            11
        );
    }
}
