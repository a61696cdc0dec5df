//! Versioned, content-addressed policy weights in the object store (DESIGN.md §6.5).
//!
//! Version v of a run's weights is a [`WeightsManifest`] at
//! [`keys::weights_manifest`]`(run, v)`: for each tensor its name, shape, dtype and the list of
//! chunks that hold its bytes. Every stored object lives under the SHA-256 of its own bytes
//! ([`keys::chunk`]`(run, hash)`), so an object that another version already stored costs
//! nothing to publish and nothing to fetch. A chunk is stored in one of two ways:
//!
//! - **whole**: its bytes, under their hash;
//! - **as a delta chain** ([`DeltaChain`]): a whole *base* chunk plus up to
//!   [`WeightsConfig::max_delta_chain`] deltas, each turning the previous version's bytes of
//!   the same chunk into the next one's. A delta ([`DeltaEncoding::XorPlanesDeflate`]) is the
//!   XOR of the little-endian bytes, grouped by byte plane (every element's most significant
//!   byte first, then the next, …) and DEFLATE-compressed. A small-LR optimizer step keeps the
//!   sign, the exponent and the high mantissa bits of nearly every value, so the high planes
//!   are runs of zeros and the delta is a fraction of the chunk even though almost every value
//!   changed (content addressing alone saves nothing there). Each link records the hash of its
//!   *result*, so a reconstruction is verified, not trusted.
//!
//! Operations:
//!
//! - [`publish`] splits each tensor into chunks of [`WeightsConfig::chunk_bytes`] aligned at
//!   the start of the tensor (a tensor never shares a chunk with another, so an unchanged
//!   tensor is always reused whole). A chunk whose hash `previous` already describes reuses
//!   that description; a changed chunk is stored as a delta against the same chunk of
//!   `previous` when the delta is at most [`WeightsConfig::delta_max_percent`] of the chunk and
//!   the chain is shorter than [`WeightsConfig::max_delta_chain`], and whole otherwise (so a
//!   whole chunk comes back at least every `max_delta_chain + 1` versions, which bounds both
//!   what a fetch from scratch downloads and what collection must keep). The manifest is
//!   written last with create-if-absent: a manifest that exists names only objects that exist.
//!   Re-publishing the same version with the same bytes is a no-op; with other bytes it is a
//!   [`WeightsError::VersionConflict`]. [`publish`] reads the previous version's bytes of the
//!   changed chunks from the store; [`publish_with_base`] takes them from the caller (the
//!   trainer holds them) and reads nothing.
//! - [`fetch`] reads a version, copying every chunk it already holds (from the version it has),
//!   applying deltas to the chunks it has an older version of, and resolving the whole chain
//!   for the others; everything downloaded is verified against its hash.
//! - [`collect_garbage`] deletes the manifests of versions not kept and every object that no
//!   remaining manifest references (a kept delta references its base and every earlier link).
//!
//! # Manifest formats
//!
//! Format 1 knows only whole chunks; format 2 adds [`ChunkRef::delta`]. A manifest without
//! deltas is still written as format 1, so it is byte-for-byte what earlier builds wrote and
//! read; this build reads both.
//!
//! # Garbage collection and concurrency
//!
//! Publication and collection are meant to run from one process at a time (the trainer that
//! finishes a step): collecting while another process is between uploading objects and writing
//! their manifest could delete objects that manifest is about to name. [`collect_garbage`]
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

/// The newest manifest format this build writes and reads (format 2: delta chains).
pub const MANIFEST_FORMAT: u32 = 2;

/// The format of manifests without deltas, written whenever no chunk is a delta (readers
/// built before deltas existed read it).
pub const MANIFEST_FORMAT_WHOLE_CHUNKS: u32 = 1;

/// The [`WeightsManifest::metadata`] key holding the model's config as JSON (the trainer
/// writes `flywheel_model::ModelConfig` there; the builtin engine builds its model from it).
pub const MODEL_CONFIG_KEY: &str = "model_config";

/// The [`WeightsManifest::metadata`] key holding the Hugging Face checkpoint directory the run
/// started from (tokenizer files for exports); absent for the built-in model.
pub const HF_SOURCE_KEY: &str = "hf_source";

/// Default chunk size: 256 KiB.
pub const DEFAULT_CHUNK_BYTES: u64 = 256 * 1024;

/// Largest chunk size accepted (bounds what one forged manifest entry can make us allocate).
pub const MAX_CHUNK_BYTES: u64 = 64 * 1024 * 1024;

/// Default longest delta chain: a chunk is stored whole at least every 9 versions.
pub const DEFAULT_MAX_DELTA_CHAIN: u32 = 8;

/// Longest delta chain accepted in a config or a manifest (bounds a fetch from scratch).
pub const MAX_DELTA_CHAIN: u32 = 64;

/// Default [`WeightsConfig::delta_max_percent`]: a delta must save at least 10%.
pub const DEFAULT_DELTA_MAX_PERCENT: u32 = 90;

/// DEFLATE level of deltas (miniz's default). The low byte planes are noise that no level
/// compresses and the high ones are zero runs that any level squeezes, so the level matters
/// little; the default is as fast as the lowest.
const DELTA_DEFLATE_LEVEL: u8 = 6;

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
    /// A stored object (chunk or delta) whose content does not match its hash or length, or a
    /// delta whose reconstruction does not match the hash of its result. It is never loaded.
    #[error("corrupt weights chunk `{key}`: {reason}; delete it and re-publish the version")]
    CorruptChunk {
        /// The object's key.
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
    /// Encoding or decoding work was cancelled because the async runtime is shutting down.
    #[error("weights encoding cancelled: the runtime is shutting down")]
    Cancelled,
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

/// One chunk of a tensor: its content and how it is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Lowercase hex SHA-256 of the chunk's bytes; for a whole chunk also its key suffix.
    pub hash: String,
    /// Its length in bytes.
    pub len: u64,
    /// `None`: stored whole under `hash`. `Some`: rebuilt from a delta chain (format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaChain>,
}

impl ChunkRef {
    /// The hashes of the stored objects this chunk needs (what collection must keep).
    pub fn object_hashes(&self) -> impl Iterator<Item = &str> {
        let (whole, chain) = match &self.delta {
            None => (Some(self.hash.as_str()), None),
            Some(d) => (None, Some(d)),
        };
        whole.into_iter().chain(chain.into_iter().flat_map(|d| {
            std::iter::once(d.base.as_str()).chain(d.links.iter().map(|l| l.object.as_str()))
        }))
    }

    /// Deltas applied to rebuild the chunk from its base (0 for a whole chunk).
    pub fn chain_len(&self) -> usize {
        self.delta.as_ref().map_or(0, |d| d.links.len())
    }
}

/// How a chunk is rebuilt from a whole base chunk and the deltas of later versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaChain {
    /// Content hash of the whole chunk the chain starts from (stored under its hash; it has
    /// the chunk's length).
    pub base: String,
    /// The deltas, oldest first: link i turns the result of link i−1 (the base for i = 0)
    /// into its `result`; the last link's result is the chunk ([`ChunkRef::hash`]).
    pub links: Vec<DeltaLink>,
}

/// One delta of a [`DeltaChain`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaLink {
    /// Hash of the encoded delta object; it is stored under this hash like any chunk.
    pub object: String,
    /// The object's length in bytes.
    pub object_len: u64,
    /// Content hash of the chunk this delta produces: a reconstruction is checked against it.
    pub result: String,
    /// How the object encodes the delta.
    #[serde(default)]
    pub encoding: DeltaEncoding,
    /// Bytes per element of the byte-plane grouping (the tensor's dtype size when written).
    pub element_bytes: u32,
}

/// The encoding of a delta object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaEncoding {
    /// XOR of the little-endian bytes of the new and the base chunk, grouped by byte plane
    /// (most significant byte of every element first; a trailing partial element last, as
    /// is), raw DEFLATE.
    #[default]
    XorPlanesDeflate,
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
    /// The format it was written in: [`MANIFEST_FORMAT_WHOLE_CHUNKS`] when no chunk is a
    /// delta, [`MANIFEST_FORMAT`] otherwise.
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

    /// Every chunk content hash of the version (the bytes it is made of).
    pub fn chunk_hashes(&self) -> BTreeSet<&str> {
        self.tensors
            .iter()
            .flat_map(|t| t.chunks.iter().map(|c| c.hash.as_str()))
            .collect()
    }

    /// Every stored object the manifest references: whole chunks, delta bases and deltas.
    pub fn object_hashes(&self) -> BTreeSet<&str> {
        self.tensors
            .iter()
            .flat_map(|t| t.chunks.iter().flat_map(ChunkRef::object_hashes))
            .collect()
    }

    /// Whether two manifests describe the same weights, however their chunks are stored
    /// (a publish that was redone may have chosen deltas differently).
    fn same_content(&self, other: &WeightsManifest) -> bool {
        /// Name, shape, dtype, bytes and chunk contents of one tensor.
        type Content<'a> = (&'a str, &'a [u64], Dtype, u64, Vec<(&'a str, u64)>);
        fn shape(m: &WeightsManifest) -> Vec<Content<'_>> {
            m.tensors
                .iter()
                .map(|t| {
                    let chunks: Vec<(&str, u64)> =
                        t.chunks.iter().map(|c| (c.hash.as_str(), c.len)).collect();
                    (
                        t.name.as_str(),
                        t.shape.as_slice(),
                        t.dtype,
                        t.bytes,
                        chunks,
                    )
                })
                .collect()
        }
        self.version == other.version
            && self.chunk_bytes == other.chunk_bytes
            && self.total_bytes == other.total_bytes
            && self.metadata == other.metadata
            && shape(self) == shape(other)
    }

    /// Checks the manifest's internal invariants (lengths, hashes, unique names, chains).
    fn validate(&self, key: &str) -> Result<(), WeightsError> {
        let bad = |reason: String| WeightsError::CorruptManifest {
            key: key.to_owned(),
            reason,
        };
        if !(MANIFEST_FORMAT_WHOLE_CHUNKS..=MANIFEST_FORMAT).contains(&self.format) {
            return Err(bad(format!(
                "format {} (this build reads {MANIFEST_FORMAT_WHOLE_CHUNKS}..={MANIFEST_FORMAT}); \
                 upgrade the reader",
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
                if let Some(chain) = &c.delta {
                    if self.format < MANIFEST_FORMAT {
                        return Err(bad(format!(
                            "tensor `{}`: a delta chunk in a format {} manifest",
                            t.name, self.format
                        )));
                    }
                    validate_chain(c, chain)
                        .map_err(|reason| bad(format!("tensor `{}`: {reason}", t.name)))?;
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

/// Checks one delta chain against its chunk.
fn validate_chain(c: &ChunkRef, chain: &DeltaChain) -> Result<(), String> {
    if !is_hex_digest(&chain.base) {
        return Err(format!("bad delta base hash `{}`", chain.base));
    }
    if chain.links.is_empty() || chain.links.len() > MAX_DELTA_CHAIN as usize {
        return Err(format!(
            "delta chain of {} links (1..={MAX_DELTA_CHAIN} allowed)",
            chain.links.len()
        ));
    }
    for l in &chain.links {
        if !is_hex_digest(&l.object) || !is_hex_digest(&l.result) {
            return Err(format!("bad delta hashes `{}` / `{}`", l.object, l.result));
        }
        // A delta is stored only when it is smaller than its chunk.
        if l.object_len == 0 || l.object_len > c.len {
            return Err(format!(
                "delta of {} bytes for a chunk of {}",
                l.object_len, c.len
            ));
        }
        if !matches!(l.element_bytes, 1 | 2 | 4 | 8) {
            return Err(format!("delta element size {}", l.element_bytes));
        }
    }
    if chain.links.last().map(|l| l.result.as_str()) != Some(c.hash.as_str()) {
        return Err(format!(
            "the delta chain of chunk {} does not end at it",
            c.hash
        ));
    }
    Ok(())
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

/// How weights are chunked, delta-encoded and transferred.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WeightsConfig {
    /// Chunk size in bytes (smaller finds more unchanged regions, but makes more objects).
    pub chunk_bytes: u64,
    /// Chunks uploaded or downloaded at once.
    pub concurrency: usize,
    /// Longest delta chain: after this many deltas in a row a chunk is stored whole again.
    /// It bounds what a fetch from scratch downloads and what collection keeps; 0 disables
    /// deltas (only content addressing).
    pub max_delta_chain: u32,
    /// A delta is stored only when it is at most this percentage of the chunk's size
    /// (1..=100); otherwise the chunk is stored whole, which starts a fresh chain.
    pub delta_max_percent: u32,
}

impl Default for WeightsConfig {
    fn default() -> Self {
        WeightsConfig {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            concurrency: 16,
            max_delta_chain: DEFAULT_MAX_DELTA_CHAIN,
            delta_max_percent: DEFAULT_DELTA_MAX_PERCENT,
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
        if self.max_delta_chain > MAX_DELTA_CHAIN {
            return Err(WeightsError::InvalidInput(format!(
                "max_delta_chain = {} must be in 0..={MAX_DELTA_CHAIN}",
                self.max_delta_chain
            )));
        }
        if !(1..=100).contains(&self.delta_max_percent) {
            return Err(WeightsError::InvalidInput(format!(
                "delta_max_percent = {} must be in 1..=100",
                self.delta_max_percent
            )));
        }
        Ok(())
    }
}

/// What [`publish`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct PublishReport {
    /// The manifest of the published version (pass it as `previous` to the next publish).
    /// When the version already existed with the same content, the stored manifest.
    pub manifest: WeightsManifest,
    /// Bytes of objects uploaded (whole chunks and deltas).
    pub bytes_written: u64,
    /// Size of the whole version.
    pub bytes_total: u64,
    /// Objects uploaded (new whole chunks and deltas).
    pub chunks_written: u64,
    /// Chunk references satisfied without an upload (known from `previous`, repeated within
    /// this version, or already present in the store).
    pub chunks_reused: u64,
    /// Of `chunks_written`, the deltas.
    pub deltas_written: u64,
    /// Bytes of the previous version read from the store to compute deltas (0 with
    /// [`publish_with_base`] given the previous bytes).
    pub bytes_read: u64,
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
    /// Objects downloaded (whole chunks, delta bases and deltas).
    pub chunks_fetched: u64,
    /// Chunk references filled from the bytes the caller already had.
    pub chunks_reused: u64,
    /// Deltas applied to rebuild chunks.
    pub deltas_applied: u64,
}

/// What [`collect_garbage`] deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Manifests of versions not kept, deleted.
    pub manifests_deleted: u64,
    /// Objects (chunks and deltas) no remaining manifest references, deleted.
    pub chunks_deleted: u64,
    /// Their bytes.
    pub bytes_deleted: u64,
    /// Objects still referenced.
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

/// Encodes `new` against `base` ([`DeltaEncoding::XorPlanesDeflate`]); same lengths.
fn encode_delta(base: &[u8], new: &[u8], width: usize) -> Vec<u8> {
    let n = new.len();
    let elems = n / width;
    let mut planes = vec![0u8; n];
    for e in 0..elems {
        for p in 0..width {
            // Plane p holds byte `width - 1 - p` (little-endian: most significant first).
            let i = e * width + width - 1 - p;
            planes[p * elems + e] = new[i] ^ base[i];
        }
    }
    for i in elems * width..n {
        planes[i] = new[i] ^ base[i];
    }
    miniz_oxide::deflate::compress_to_vec(&planes, DELTA_DEFLATE_LEVEL)
}

/// Applies a delta object made by [`encode_delta`] to `current`, in place.
fn apply_delta(current: &mut [u8], object: &[u8], width: usize) -> Result<(), String> {
    let n = current.len();
    let planes = miniz_oxide::inflate::decompress_to_vec_with_limit(object, n)
        .map_err(|e| format!("does not inflate: {e}"))?;
    if planes.len() != n {
        return Err(format!(
            "inflates to {} bytes, the chunk has {n}",
            planes.len()
        ));
    }
    let elems = n / width;
    for e in 0..elems {
        for p in 0..width {
            current[e * width + width - 1 - p] ^= planes[p * elems + e];
        }
    }
    for i in elems * width..n {
        current[i] ^= planes[i];
    }
    Ok(())
}

/// Runs CPU-bound work (hashing, DEFLATE) on the blocking pool: chunks then encode and decode
/// in parallel, and the runtime's other tasks keep running meanwhile.
async fn on_cpu<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, WeightsError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(v) => Ok(v),
        // A panic is a bug in this module: surface it where it happened.
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(WeightsError::Cancelled),
    }
}

/// Downloads stored object `hash` and checks its length and hash.
async fn get_object(
    blob: &BlobStore,
    run: &str,
    hash: &str,
    len: u64,
) -> Result<Bytes, WeightsError> {
    let key = keys::chunk(run, hash);
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
    Ok(data)
}

/// Where [`rebuild_chunk`] starts: `(i, bytes)` when the caller holds the input of link `i`
/// (the base for 0, else link i−1's result); `None` to start from the base in the store.
type ChainStart = Option<(usize, Vec<u8>)>;

/// What a new chunk may be delta-encoded against: the previous version's chunk at the same
/// position, with its bytes when the caller gave them.
type DeltaBase = Option<(ChunkRef, Option<Bytes>)>;

/// A chunk rebuilt by [`rebuild_chunk`], with what it cost.
struct Rebuilt {
    /// The chunk's bytes (verified against its hash).
    bytes: Vec<u8>,
    /// Bytes downloaded.
    downloaded: u64,
    /// Objects downloaded.
    objects: u64,
    /// Deltas applied.
    deltas: u64,
}

/// Rebuilds `chunk` from the store. `start` is `(i, bytes)` when the caller already holds the
/// input of link `i` (the base for 0, else link i−1's result): only links from `i` on are
/// downloaded. Owns its inputs so the future is `Send` for any caller.
async fn rebuild_chunk(
    blob: BlobStore,
    run: String,
    chunk: ChunkRef,
    start: ChainStart,
) -> Result<Rebuilt, WeightsError> {
    let Some(chain) = &chunk.delta else {
        let data = get_object(&blob, &run, &chunk.hash, chunk.len).await?;
        return Ok(Rebuilt {
            downloaded: chunk.len,
            objects: 1,
            deltas: 0,
            bytes: data.to_vec(),
        });
    };
    let (mut downloaded, mut objects) = (0u64, 0u64);
    let (from, mut current) = match start {
        Some(s) => s,
        None => {
            let base = get_object(&blob, &run, &chain.base, chunk.len).await?;
            downloaded += chunk.len;
            objects += 1;
            (0, base.to_vec())
        }
    };
    let links = chain.links.get(from..).unwrap_or_default();
    for link in links {
        let object = get_object(&blob, &run, &link.object, link.object_len).await?;
        downloaded += link.object_len;
        objects += 1;
        let corrupt = |reason: String| WeightsError::CorruptChunk {
            key: keys::chunk(&run, &link.object),
            reason,
        };
        let width = link.element_bytes as usize;
        let (applied, actual);
        (current, applied, actual) = on_cpu(move || {
            let applied = apply_delta(&mut current, &object, width);
            let actual = content_hash(&current);
            (current, applied, actual)
        })
        .await?;
        applied.map_err(corrupt)?;
        if actual != link.result {
            return Err(corrupt(format!(
                "applying this delta gives content hashing to {actual}, the manifest says {}",
                link.result
            )));
        }
    }
    Ok(Rebuilt {
        bytes: current,
        downloaded,
        objects,
        deltas: links.len() as u64,
    })
}

/// Publishes `tensors` as version `version` of `run`, uploading only what is not already known
/// from `previous` (the manifest of a version that still exists, typically v−1) or present in
/// the store; changed chunks become deltas against `previous` where that pays (the previous
/// bytes of those chunks are read from the store; see [`publish_with_base`] to avoid that).
/// The manifest is written last, create-if-absent.
pub async fn publish(
    blob: &BlobStore,
    run: &str,
    version: PolicyVersion,
    tensors: &[TensorBytes<'_>],
    previous: Option<&WeightsManifest>,
    config: &WeightsConfig,
) -> Result<PublishReport, WeightsError> {
    publish_with_base(
        blob,
        run,
        version,
        tensors,
        previous,
        &[],
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
    publish_with_base(blob, run, version, tensors, previous, &[], metadata, config).await
}

/// A chunk of the new version that no known object holds.
struct NewChunk<'a> {
    /// Its bytes.
    data: &'a [u8],
    /// Bytes per element of its tensor.
    width: usize,
    /// The same chunk of the previous version to encode a delta against, with its bytes when
    /// the caller gave them (checked against the hash).
    base: Option<(ChunkRef, Option<&'a [u8]>)>,
}

/// How [`publish_with_base`] stored one new chunk.
struct Stored {
    /// Its manifest entry.
    chunk: ChunkRef,
    /// Bytes uploaded (0 when the object already existed).
    written: u64,
    /// Whether an object was created.
    created: bool,
    /// Bytes of the previous version read to compute the delta.
    read: u64,
}

/// What a publication has to do: the new version's tensor entries (chunk references, those
/// of new chunks still without their delta) and the distinct new chunks to store.
struct Plan<'a> {
    entries: Vec<TensorEntry>,
    /// Distinct new hashes → what to store.
    new_chunks: BTreeMap<String, NewChunk<'a>>,
    /// Chunk references of the version.
    refs: u64,
    /// Bytes of the version.
    total: u64,
}

/// Splits `tensors` into chunks and finds, for each, a known object of `previous` or a
/// delta base in it.
fn plan<'a>(
    tensors: &[TensorBytes<'a>],
    previous: Option<&WeightsManifest>,
    previous_tensors: &[TensorBytes<'a>],
    config: &WeightsConfig,
) -> Result<Plan<'a>, WeightsError> {
    // Content hash → how `previous` stores it: reusing that costs nothing.
    let mut recipes: HashMap<&str, &ChunkRef> = HashMap::new();
    let mut previous_entries: HashMap<&str, &TensorEntry> = HashMap::new();
    if let Some(m) = previous {
        for t in &m.tensors {
            previous_entries.insert(t.name.as_str(), t);
            for c in &t.chunks {
                recipes.entry(c.hash.as_str()).or_insert(c);
            }
        }
    }
    let previous_bytes: HashMap<&str, &[u8]> =
        previous_tensors.iter().map(|t| (t.name, t.bytes)).collect();
    let mut seen_names = BTreeSet::new();
    let mut plan = Plan {
        entries: Vec::with_capacity(tensors.len()),
        new_chunks: BTreeMap::new(),
        refs: 0,
        total: 0,
    };
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
        // The same tensor in `previous`, if deltas against it are possible.
        let base_entry = previous_entries
            .get(t.name)
            .filter(|e| config.max_delta_chain > 0 && e.dtype == t.dtype);
        let base_bytes = previous_bytes
            .get(t.name)
            .filter(|b| base_entry.is_some_and(|e| e.bytes == b.len() as u64));
        let mut chunks = Vec::new();
        for (i, c) in t.bytes.chunks(config.chunk_bytes as usize).enumerate() {
            let hash = content_hash(c);
            let len = c.len() as u64;
            if let Some(known) = recipes.get(hash.as_str()) {
                chunks.push((*known).clone());
                continue;
            }
            if !plan.new_chunks.contains_key(&hash) {
                // Same position, same length, chain not at its bound: a delta candidate.
                let base = base_entry
                    .and_then(|e| e.chunks.get(i))
                    .filter(|b| b.len == len && b.chain_len() < config.max_delta_chain as usize)
                    .map(|b| {
                        let off = i * config.chunk_bytes as usize;
                        let bytes = base_bytes.and_then(|d| d.get(off..off + c.len()));
                        (b.clone(), bytes)
                    });
                let new = NewChunk {
                    data: c,
                    width: t.dtype.size() as usize,
                    base,
                };
                plan.new_chunks.insert(hash.clone(), new);
            }
            // Filled in once stored.
            chunks.push(ChunkRef {
                hash,
                len,
                delta: None,
            });
        }
        plan.refs += chunks.len() as u64;
        plan.total += t.bytes.len() as u64;
        plan.entries.push(TensorEntry {
            name: t.name.to_owned(),
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            dtype: t.dtype,
            bytes: t.bytes.len() as u64,
            chunks,
        });
    }
    Ok(plan)
}

/// Stores the new chunks, `config.concurrency` at a time; returns how each was stored.
async fn store_new_chunks(
    blob: &BlobStore,
    run: &str,
    new_chunks: BTreeMap<String, NewChunk<'_>>,
    config: &WeightsConfig,
) -> Result<HashMap<String, Stored>, WeightsError> {
    // Owned inputs: the futures borrow nothing (they stay `Send` for any caller, see
    // rust-lang/rust#102211). Encoding runs inside them.
    let jobs: Vec<(String, Bytes, usize, DeltaBase)> = new_chunks
        .into_iter()
        .map(|(hash, n)| {
            let base = n.base.map(|(c, b)| (c, b.map(Bytes::copy_from_slice)));
            (hash, Bytes::copy_from_slice(n.data), n.width, base)
        })
        .collect();
    let delta_max_percent = u64::from(config.delta_max_percent);
    futures::stream::iter(jobs)
        .map(|(hash, data, width, base)| {
            let blob = blob.clone();
            let run = run.to_owned();
            async move {
                let stored =
                    store_chunk(&blob, &run, &hash, data, width, base, delta_max_percent).await?;
                Ok::<_, WeightsError>((hash, stored))
            }
        })
        .buffer_unordered(config.concurrency)
        .try_collect()
        .await
}

/// Writes `manifest` create-if-absent; an existing manifest of the same content stands (a
/// redone publish), one of other content is a [`WeightsError::VersionConflict`]. Returns the
/// manifest in the store and whether this call created it.
async fn write_manifest(
    blob: &BlobStore,
    run: &str,
    manifest: WeightsManifest,
) -> Result<(WeightsManifest, bool), WeightsError> {
    let version = manifest.version;
    let key = keys::weights_manifest(run, version);
    let body = serde_json::to_vec(&manifest)
        .map_err(|e| WeightsError::InvalidInput(format!("cannot encode the manifest: {e}")))?;
    match blob.put_if_absent(&key, Bytes::from(body)).await? {
        PutOutcome::Created => Ok((manifest, true)),
        PutOutcome::AlreadyExists => {
            // A redone publish may have stored the same bytes differently: what counts is the
            // content, and the stored manifest is the one later versions build on.
            let existing = load_manifest(blob, run, version).await?;
            if !existing.same_content(&manifest) {
                return Err(WeightsError::VersionConflict { key });
            }
            Ok((existing, false))
        }
    }
}

/// [`publish_with_metadata`] given the bytes of `previous` too: `previous_tensors` holds
/// (some of) its tensors, by name, and the bases of deltas are taken from them instead of
/// read from the store. A base whose bytes do not hash to what `previous` says is read from
/// the store instead, so wrong bytes cost reads, never a wrong delta.
#[allow(clippy::too_many_arguments)] // mirrors publish_with_metadata plus one argument
pub async fn publish_with_base(
    blob: &BlobStore,
    run: &str,
    version: PolicyVersion,
    tensors: &[TensorBytes<'_>],
    previous: Option<&WeightsManifest>,
    previous_tensors: &[TensorBytes<'_>],
    metadata: &BTreeMap<String, String>,
    config: &WeightsConfig,
) -> Result<PublishReport, WeightsError> {
    config.validate()?;
    let Plan {
        mut entries,
        new_chunks,
        refs,
        total,
    } = plan(tensors, previous, previous_tensors, config)?;
    let stored = store_new_chunks(blob, run, new_chunks, config).await?;
    let (mut chunks_written, mut bytes_written, mut deltas_written, mut bytes_read) =
        (0u64, 0u64, 0u64, 0u64);
    for s in stored.values() {
        bytes_read += s.read;
        if s.created {
            chunks_written += 1;
            bytes_written += s.written;
            deltas_written += u64::from(s.chunk.delta.is_some());
        }
    }
    for c in entries.iter_mut().flat_map(|t| t.chunks.iter_mut()) {
        if let Some(s) = stored.get(&c.hash) {
            c.clone_from(&s.chunk);
        }
    }
    let has_deltas = entries
        .iter()
        .any(|t| t.chunks.iter().any(|c| c.delta.is_some()));
    let manifest = WeightsManifest {
        format: if has_deltas {
            MANIFEST_FORMAT
        } else {
            MANIFEST_FORMAT_WHOLE_CHUNKS
        },
        version,
        chunk_bytes: config.chunk_bytes,
        total_bytes: total,
        tensors: entries,
        metadata: metadata.clone(),
    };
    let (manifest, manifest_created) = write_manifest(blob, run, manifest).await?;
    Ok(PublishReport {
        manifest,
        bytes_written,
        bytes_total: total,
        chunks_written,
        chunks_reused: refs - chunks_written,
        deltas_written,
        bytes_read,
        manifest_created,
    })
}

/// Stores one new chunk: as a delta against `base` when that pays, else whole.
async fn store_chunk(
    blob: &BlobStore,
    run: &str,
    hash: &str,
    data: Bytes,
    width: usize,
    base: DeltaBase,
    delta_max_percent: u64,
) -> Result<Stored, WeightsError> {
    let len = data.len() as u64;
    let mut read = 0u64;
    if let Some((base_ref, given)) = base {
        // The caller's bytes are used only if they are what `previous` says they are.
        let given = match given {
            Some(b) => {
                let expected = base_ref.hash.clone();
                on_cpu(move || (content_hash(&b) == expected).then(|| b.to_vec())).await?
            }
            None => None,
        };
        let base_bytes = match given {
            Some(b) => Some(b),
            None => match rebuild_chunk(blob.clone(), run.to_owned(), base_ref.clone(), None).await
            {
                Ok(r) => {
                    read = r.downloaded;
                    Some(r.bytes)
                }
                // Without its base no delta can be made; the chunk is still publishable whole.
                Err(e) => {
                    tracing::warn!(error = %e, chunk = hash, "delta base unreadable; storing the chunk whole");
                    None
                }
            },
        };
        if let Some(base_bytes) = base_bytes {
            let new = data.clone();
            let (object, object_hash) = on_cpu(move || {
                let object = encode_delta(&base_bytes, &new, width);
                let hash = content_hash(&object);
                (object, hash)
            })
            .await?;
            if (object.len() as u64) * 100 <= len * delta_max_percent {
                let object_len = object.len() as u64;
                let outcome = blob
                    .put_if_absent(&keys::chunk(run, &object_hash), Bytes::from(object))
                    .await?;
                let link = DeltaLink {
                    object: object_hash,
                    object_len,
                    result: hash.to_owned(),
                    encoding: DeltaEncoding::XorPlanesDeflate,
                    element_bytes: width as u32,
                };
                // The new chain continues the base's, or starts at the base when it is whole.
                let chain = match base_ref.delta {
                    Some(mut chain) => {
                        chain.links.push(link);
                        chain
                    }
                    None => DeltaChain {
                        base: base_ref.hash,
                        links: vec![link],
                    },
                };
                return Ok(Stored {
                    chunk: ChunkRef {
                        hash: hash.to_owned(),
                        len,
                        delta: Some(chain),
                    },
                    written: object_len,
                    created: outcome == PutOutcome::Created,
                    read,
                });
            }
        }
    }
    let outcome = blob.put_if_absent(&keys::chunk(run, hash), data).await?;
    Ok(Stored {
        chunk: ChunkRef {
            hash: hash.to_owned(),
            len,
            delta: None,
        },
        written: len,
        created: outcome == PutOutcome::Created,
        read,
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
/// tensors' bytes by name): every chunk of it that reappears is copied instead of downloaded,
/// and a chunk stored as a delta against one of its chunks is rebuilt by downloading only the
/// deltas since. The caller's bytes are trusted (they were verified when fetched); everything
/// downloaded is verified against its hash and every reconstruction against its result hash.
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

    // Each distinct missing chunk once, with the latest point of its chain the caller holds.
    let mut missing: BTreeMap<&str, (ChunkRef, ChainStart)> = BTreeMap::new();
    for c in manifest.tensors.iter().flat_map(|t| &t.chunks) {
        if local.contains_key(c.hash.as_str()) || missing.contains_key(c.hash.as_str()) {
            continue;
        }
        let start = c.delta.as_ref().and_then(|chain| {
            // Input of link i: the base for 0, else link i−1's result; prefer the latest.
            let inputs: Vec<&str> = std::iter::once(chain.base.as_str())
                .chain(chain.links.iter().map(|l| l.result.as_str()))
                .take(chain.links.len())
                .collect();
            inputs
                .iter()
                .enumerate()
                .rev()
                .find_map(|(i, h)| local.get(h).map(|b| (i, b.to_vec())))
        });
        missing.insert(c.hash.as_str(), (c.clone(), start));
    }
    let jobs: Vec<(String, ChunkRef, ChainStart)> = missing
        .into_iter()
        .map(|(hash, (c, start))| (hash.to_owned(), c, start))
        .collect();
    let rebuilt: HashMap<String, Rebuilt> =
        futures::stream::iter(jobs)
            .map(|(hash, chunk, start)| {
                let (blob, run) = (blob.clone(), run.to_owned());
                async move {
                    Ok::<_, WeightsError>((hash, rebuild_chunk(blob, run, chunk, start).await?))
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
            } else if let Some(src) = rebuilt.get(c.hash.as_str()) {
                data.extend_from_slice(&src.bytes);
            }
        }
        tensors.insert(t.name.clone(), data);
    }
    Ok(FetchedWeights {
        tensors,
        bytes_fetched: rebuilt.values().map(|r| r.downloaded).sum(),
        chunks_fetched: rebuilt.values().map(|r| r.objects).sum(),
        chunks_reused,
        deltas_applied: rebuilt.values().map(|r| r.deltas).sum(),
        manifest,
    })
}

/// Deletes the manifests of every version of `run` not in `keep`, then every object (whole
/// chunk, delta base, delta) that no remaining manifest references. Run it only from the
/// (single) publisher; see the module docs.
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
    // A kept delta chain names its base and every earlier delta, so they stay too.
    let mut referenced = BTreeSet::new();
    for v in list_versions(blob, run).await? {
        let m = load_manifest(blob, run, v).await?;
        referenced.extend(m.object_hashes().into_iter().map(str::to_owned));
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
            ..WeightsConfig::default()
        }
    }

    /// [`small_chunks`] with deltas off: content addressing alone.
    fn whole_chunks_only() -> WeightsConfig {
        WeightsConfig {
            max_delta_chain: 0,
            ..small_chunks()
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
        let cfg = whole_chunks_only();
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
        assert_eq!(r1.manifest.format, MANIFEST_FORMAT_WHOLE_CHUNKS);
    }

    #[tokio::test]
    async fn a_changed_chunk_becomes_a_delta_and_fetch_applies_it() {
        let blob = BlobStore::open("memory://").unwrap();
        let cfg = small_chunks();
        let w0 = weights(0.0);
        let r0 = publish(&blob, "r", 0, &view(&w0), None, &cfg)
            .await
            .unwrap();
        assert_eq!(r0.manifest.format, MANIFEST_FORMAT_WHOLE_CHUNKS);
        let mut w1 = w0.clone();
        bump(&mut w1, 300); // chunk 1 of emb
        let r1 = publish(&blob, "r", 1, &view(&w1), Some(&r0.manifest), &cfg)
            .await
            .unwrap();
        assert_eq!((r1.chunks_written, r1.deltas_written), (1, 1));
        assert!(
            r1.bytes_written < 100,
            "one changed f32: {}",
            r1.bytes_written
        );
        // The base was read back from the store to encode the delta.
        assert_eq!(r1.bytes_read, 1024);
        assert_eq!(r1.manifest.format, MANIFEST_FORMAT);
        let c = &r1.manifest.tensors[0].chunks[1];
        let chain = c.delta.as_ref().unwrap();
        assert_eq!(chain.base, r0.manifest.tensors[0].chunks[1].hash);

        let f = fetch(&blob, "r", 1, Some((&r0.manifest, &as_map(&w0))), &cfg)
            .await
            .unwrap();
        assert_eq!(f.tensors, as_map(&w1));
        assert_eq!((f.chunks_fetched, f.deltas_applied), (1, 1));
        assert_eq!(f.bytes_fetched, r1.bytes_written);
        let full = fetch(&blob, "r", 1, None, &cfg).await.unwrap();
        assert_eq!(full.tensors, as_map(&w1));
        assert_eq!(full.bytes_fetched, r1.bytes_total + r1.bytes_written);

        // Given the previous bytes, nothing is read and the manifest is the same.
        let blob2 = BlobStore::open("memory://").unwrap();
        let p0 = publish(&blob2, "r", 0, &view(&w0), None, &cfg)
            .await
            .unwrap();
        let p1 = publish_with_base(
            &blob2,
            "r",
            1,
            &view(&w1),
            Some(&p0.manifest),
            &view(&w0),
            &BTreeMap::new(),
            &cfg,
        )
        .await
        .unwrap();
        assert_eq!(p1.bytes_read, 0);
        assert_eq!(p1.manifest, r1.manifest);
        // Wrong "previous" bytes are detected by hash and read from the store instead.
        let blob3 = BlobStore::open("memory://").unwrap();
        let q0 = publish(&blob3, "r", 0, &view(&w0), None, &cfg)
            .await
            .unwrap();
        let q1 = publish_with_base(
            &blob3,
            "r",
            1,
            &view(&w1),
            Some(&q0.manifest),
            &view(&w1),
            &BTreeMap::new(),
            &cfg,
        )
        .await
        .unwrap();
        assert_eq!((q1.bytes_read, &q1.manifest), (1024, &r1.manifest));
        // Redoing the publish without `previous` stores the chunk whole: same content, so it
        // is not a conflict, and the stored manifest comes back.
        let again = publish(&blob, "r", 1, &view(&w1), None, &cfg)
            .await
            .unwrap();
        assert!(!again.manifest_created);
        assert_eq!(again.manifest, r1.manifest);
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
        let cfg = whole_chunks_only();
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

    /// `n` f32 weights ~ N(0, 0.02²), deterministic.
    fn init_weights(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                // Box–Muller.
                let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                0.02 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect()
    }

    /// One AdamW step (β = 0.9/0.999, ε = 1e-8, weight decay 0.01) with a fresh random
    /// gradient: `m` and `v` carry the moments, `t` is the 1-based step.
    fn adamw_step(w: &mut [f32], m: &mut [f32], v: &mut [f32], t: i32, lr: f32, seed: u64) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (b1, b2, eps, wd) = (0.9f32, 0.999f32, 1e-8f32, 0.01f32);
        for i in 0..w.len() {
            let g: f32 = (rng.random::<f32>() - 0.5) * 1e-2;
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let mh = m[i] / (1.0 - b1.powi(t));
            let vh = v[i] / (1.0 - b2.powi(t));
            w[i] -= lr * (mh / (vh.sqrt() + eps) + wd * w[i]);
        }
    }

    fn le_bytes(w: &[f32]) -> Vec<u8> {
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[tokio::test]
    async fn a_dense_small_lr_adamw_step_publishes_a_fraction_of_the_weights() {
        let blob = BlobStore::open("memory://").unwrap();
        let cfg = WeightsConfig::default(); // 256 KiB chunks
        let n = 1024 * 1024;
        let shape = [1024usize, 1024];
        let mut w = init_weights(n, 7);
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let mut prev: Option<(WeightsManifest, Vec<u8>)> = None;
        for step in 0..3u64 {
            if step > 0 {
                adamw_step(&mut w, &mut m, &mut v, step as i32, 1e-5, 100 + step);
            }
            let bytes = le_bytes(&w);
            let t = [TensorBytes {
                name: "w",
                shape: &shape,
                dtype: Dtype::F32,
                bytes: &bytes,
            }];
            let r = publish(&blob, "r", step, &t, prev.as_ref().map(|p| &p.0), &cfg)
                .await
                .unwrap();
            if let Some((pm, pb)) = &prev {
                let changed = bytes
                    .chunks(4)
                    .zip(pb.chunks(4))
                    .filter(|(a, b)| a != b)
                    .count();
                let ratio = r.bytes_written as f64 / r.bytes_total as f64;
                println!(
                    "version {step}: {:.1}% of values changed; wrote {} of {} bytes \
                     (ratio {ratio:.3}, {} deltas)",
                    100.0 * changed as f64 / n as f64,
                    r.bytes_written,
                    r.bytes_total,
                    r.deltas_written
                );
                // Nearly every value changed, so content addressing alone saves nothing …
                assert!(changed * 10 > n * 8, "{changed} of {n} changed");
                // … but the deltas are well below the full size.
                assert_eq!(r.deltas_written, 16);
                assert!(ratio < 0.6, "ratio {ratio}");

                // A worker holding v−1 downloads just the deltas and rebuilds v bit-exactly.
                let have = BTreeMap::from([("w".to_owned(), pb.clone())]);
                let f = fetch(&blob, "r", step, Some((pm, &have)), &cfg)
                    .await
                    .unwrap();
                assert_eq!(f.tensors["w"], bytes);
                assert_eq!((f.bytes_fetched, f.deltas_applied), (r.bytes_written, 16));
                // A worker with nothing resolves the chain from the base.
                let f = fetch(&blob, "r", step, None, &cfg).await.unwrap();
                assert_eq!(f.tensors["w"], bytes);
                assert_eq!(f.deltas_applied, 16 * step);
            }
            prev = Some((r.manifest, bytes));
        }

        // The same step in bf16 (the upper half of each f32): most values do not even change.
        let bf16 = |w: &[f32]| -> Vec<u8> {
            w.iter()
                .flat_map(|x| x.to_le_bytes()[2..].to_vec())
                .collect()
        };
        let before = bf16(&w);
        adamw_step(&mut w, &mut m, &mut v, 3, 1e-5, 103);
        let after = bf16(&w);
        let shape = [1024usize, 1024];
        let (b0, b1) = (before, after);
        let r0 = publish(
            &blob,
            "bf16",
            0,
            &[TensorBytes {
                name: "w",
                shape: &shape,
                dtype: Dtype::Bf16,
                bytes: &b0,
            }],
            None,
            &cfg,
        )
        .await
        .unwrap();
        let r1 = publish(
            &blob,
            "bf16",
            1,
            &[TensorBytes {
                name: "w",
                shape: &shape,
                dtype: Dtype::Bf16,
                bytes: &b1,
            }],
            Some(&r0.manifest),
            &cfg,
        )
        .await
        .unwrap();
        let changed = b1
            .chunks(2)
            .zip(b0.chunks(2))
            .filter(|(a, b)| a != b)
            .count();
        let ratio = r1.bytes_written as f64 / r1.bytes_total as f64;
        println!(
            "bf16: {:.1}% of values changed; wrote {} of {} bytes (ratio {ratio:.3}, {} deltas)",
            100.0 * changed as f64 / n as f64,
            r1.bytes_written,
            r1.bytes_total,
            r1.deltas_written
        );
        assert!(ratio < 0.3, "bf16 ratio {ratio}");
        let f = fetch(&blob, "bf16", 1, None, &cfg).await.unwrap();
        assert_eq!(f.tensors["w"], b1);
    }

    #[tokio::test]
    async fn delta_chains_are_bounded_and_gc_keeps_their_bases() {
        let blob = BlobStore::open("memory://").unwrap();
        let cfg = WeightsConfig {
            max_delta_chain: 2,
            ..small_chunks()
        };
        let mut w = weights(0.0);
        let mut all = Vec::new();
        let mut prev: Option<WeightsManifest> = None;
        for v in 0..6u64 {
            if v > 0 {
                bump(&mut w, 300); // always chunk 1 of emb
            }
            let r = publish(&blob, "r", v, &view(&w), prev.as_ref(), &cfg)
                .await
                .unwrap();
            all.push(as_map(&w));
            prev = Some(r.manifest);
        }
        let chain_len = |m: &WeightsManifest| m.tensors[0].chunks[1].chain_len();
        let mut lens = Vec::new();
        for v in 0..6u64 {
            lens.push(chain_len(&load_manifest(&blob, "r", v).await.unwrap()));
        }
        // Whole at least every max_delta_chain + 1 versions.
        assert_eq!(lens, vec![0, 1, 2, 0, 1, 2]);
        // From scratch, v2 is base(v0) + two deltas, bit-exact.
        let f = fetch(&blob, "r", 2, None, &cfg).await.unwrap();
        assert_eq!((&f.tensors, f.deltas_applied), (&all[2], 2));
        // A holder of v1 applies one delta; of v0 (the base), two.
        let m1 = load_manifest(&blob, "r", 1).await.unwrap();
        let f = fetch(&blob, "r", 2, Some((&m1, &all[1])), &cfg)
            .await
            .unwrap();
        assert_eq!(
            (&f.tensors, f.deltas_applied, f.chunks_fetched),
            (&all[2], 1, 1)
        );
        let m0 = load_manifest(&blob, "r", 0).await.unwrap();
        let f = fetch(&blob, "r", 2, Some((&m0, &all[0])), &cfg)
            .await
            .unwrap();
        assert_eq!(
            (&f.tensors, f.deltas_applied, f.chunks_fetched),
            (&all[2], 2, 2)
        );

        // Keep v2 and v4: v0's chunk 1 (v2's base), v1's delta, v3's chunk 1 (v4's base) stay;
        // only v5's delta goes.
        let before = blob.list(&keys::chunks_prefix("r")).await.unwrap().len();
        // 11 whole chunks of v0 + deltas v1, v2, v4, v5 + whole chunk 1 of v3.
        assert_eq!(before, 11 + 4 + 1);
        let gc = collect_garbage(&blob, "r", &[2, 4]).await.unwrap();
        assert_eq!(gc.manifests_deleted, 4);
        assert_eq!((gc.chunks_deleted, gc.chunks_kept), (1, 15));
        for v in [2u64, 4] {
            let f = fetch(&blob, "r", v, None, &cfg).await.unwrap();
            assert_eq!(f.tensors, all[v as usize]);
        }
        // Keeping only v4 frees v2's chain (v0's chunk 1, the deltas of v1 and v2) but keeps
        // v4's base, v3's whole chunk 1.
        let gc = collect_garbage(&blob, "r", &[4]).await.unwrap();
        assert_eq!((gc.chunks_deleted, gc.chunks_kept), (3, 12));
        let f = fetch(&blob, "r", 4, None, &cfg).await.unwrap();
        assert_eq!((&f.tensors, f.deltas_applied), (&all[4], 1));
    }

    #[tokio::test]
    async fn a_corrupt_delta_is_detected_never_loaded() {
        let blob = BlobStore::open("memory://").unwrap();
        let cfg = small_chunks();
        let w0 = weights(0.0);
        let r0 = publish(&blob, "r", 0, &view(&w0), None, &cfg)
            .await
            .unwrap();
        let mut w1 = w0.clone();
        bump(&mut w1, 300); // chunk 1
        bump(&mut w1, 600); // chunk 2
        let r1 = publish(&blob, "r", 1, &view(&w1), Some(&r0.manifest), &cfg)
            .await
            .unwrap();
        assert_eq!(r1.deltas_written, 2);
        let link = |c: usize| {
            r1.manifest.tensors[0].chunks[c]
                .delta
                .as_ref()
                .unwrap()
                .links[0]
                .clone()
        };
        let (l1, l2) = (link(1), link(2));

        // A delta object whose bytes were altered fails its own hash.
        let key = keys::chunk("r", &l1.object);
        let good = blob.get(&key).await.unwrap();
        let mut bad = good.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        blob.put(&key, Bytes::from(bad)).await.unwrap();
        let have = as_map(&w0);
        for h in [None, Some((&r0.manifest, &have))] {
            match fetch(&blob, "r", 1, h, &cfg).await {
                Err(WeightsError::CorruptChunk { key: k, .. }) => assert_eq!(k, key),
                other => panic!("expected a corrupt delta, got {other:?}"),
            }
        }
        blob.put(&key, good).await.unwrap();

        // An intact delta applied to the wrong chunk (a manifest pointing chunk 1 at chunk 2's
        // delta) is caught by the hash of the result.
        let mut m = r1.manifest.clone();
        let link1 = &mut m.tensors[0].chunks[1].delta.as_mut().unwrap().links[0];
        link1.object.clone_from(&l2.object);
        link1.object_len = l2.object_len;
        blob.put(
            &keys::weights_manifest("r", 1),
            Bytes::from(serde_json::to_vec(&m).unwrap()),
        )
        .await
        .unwrap();
        match fetch(&blob, "r", 1, None, &cfg).await {
            Err(WeightsError::CorruptChunk { key: k, reason }) => {
                assert_eq!(k, keys::chunk("r", &l2.object));
                assert!(reason.contains("the manifest says"), "{reason}");
            }
            other => panic!("expected a bad reconstruction, got {other:?}"),
        }
        // A chain that does not end at its chunk is a corrupt manifest.
        let mut m = r1.manifest.clone();
        m.tensors[0].chunks[1].delta.as_mut().unwrap().links[0].result = l2.result.clone();
        blob.put(
            &keys::weights_manifest("r", 1),
            Bytes::from(serde_json::to_vec(&m).unwrap()),
        )
        .await
        .unwrap();
        assert!(matches!(
            load_manifest(&blob, "r", 1).await,
            Err(WeightsError::CorruptManifest { .. })
        ));
        assert_ne!(l1.result, l2.result);
    }

    #[tokio::test]
    async fn an_old_format_manifest_still_loads_and_fetches() {
        let blob = BlobStore::open("memory://").unwrap();
        let cfg = small_chunks();
        let data: Vec<u8> = (0..1500u32)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        let (a, b) = data.split_at(1024);
        for c in [a, b] {
            blob.put(
                &keys::chunk("r", &content_hash(c)),
                Bytes::copy_from_slice(c),
            )
            .await
            .unwrap();
        }
        // Exactly what the format-1 writer produced (no delta fields anywhere).
        let json = format!(
            r#"{{"format":1,"version":0,"chunk_bytes":1024,"total_bytes":6000,"tensors":[{{"name":"x","shape":[1500],"dtype":"f32","bytes":6000,"chunks":[{{"hash":"{}","len":1024}},{{"hash":"{}","len":4976}}]}}]}}"#,
            content_hash(a),
            content_hash(b)
        );
        // 6000 bytes in 1024-byte chunks is 6 chunks; a 4976-byte chunk is out of range.
        blob.put(&keys::weights_manifest("r", 0), Bytes::from(json.clone()))
            .await
            .unwrap();
        assert!(matches!(
            load_manifest(&blob, "r", 0).await,
            Err(WeightsError::CorruptManifest { .. })
        ));
        let chunks: Vec<String> = data
            .chunks(1024)
            .map(|c| {
                let h = content_hash(c);
                format!(r#"{{"hash":"{h}","len":{}}}"#, c.len())
            })
            .collect();
        for c in data.chunks(1024) {
            blob.put(
                &keys::chunk("r", &content_hash(c)),
                Bytes::copy_from_slice(c),
            )
            .await
            .unwrap();
        }
        let json = format!(
            r#"{{"format":1,"version":0,"chunk_bytes":1024,"total_bytes":6000,"tensors":[{{"name":"x","shape":[1500],"dtype":"f32","bytes":6000,"chunks":[{}]}}]}}"#,
            chunks.join(",")
        );
        blob.put(&keys::weights_manifest("r", 0), Bytes::from(json.clone()))
            .await
            .unwrap();
        let m = load_manifest(&blob, "r", 0).await.unwrap();
        assert_eq!(m.format, 1);
        assert!(m.tensors[0].chunks.iter().all(|c| c.delta.is_none()));
        // It round-trips byte-for-byte: a delta-free manifest is still written as format 1.
        assert_eq!(serde_json::to_string(&m).unwrap(), json);
        let f = fetch(&blob, "r", 0, None, &cfg).await.unwrap();
        assert_eq!(f.tensors["x"], data);
        // The next version can build deltas on it.
        let mut next = data.clone();
        next[4] ^= 1;
        let t = [TensorBytes {
            name: "x",
            shape: &[1500],
            dtype: Dtype::F32,
            bytes: &next,
        }];
        let r = publish(&blob, "r", 1, &t, Some(&m), &cfg).await.unwrap();
        assert_eq!((r.deltas_written, r.manifest.format), (1, MANIFEST_FORMAT));
        let f = fetch(&blob, "r", 1, None, &cfg).await.unwrap();
        assert_eq!(f.tensors["x"], next);
        // A format from the future is refused with a typed error.
        let future = json.replacen(r#""format":1"#, r#""format":3"#, 1);
        blob.put(
            &keys::weights_manifest("r", 2),
            Bytes::from(future.replacen(r#""version":0"#, r#""version":2"#, 1)),
        )
        .await
        .unwrap();
        assert!(matches!(
            load_manifest(&blob, "r", 2).await,
            Err(WeightsError::CorruptManifest { .. })
        ));
    }

    #[test]
    fn delta_codec_round_trips_any_length_and_width() {
        for width in [1usize, 2, 4, 8] {
            for n in [1usize, 3, 7, 64, 1021] {
                let base: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
                let new: Vec<u8> = (0..n).map(|i| (i * 17 % 253) as u8).collect();
                let object = encode_delta(&base, &new, width);
                let mut cur = base.clone();
                apply_delta(&mut cur, &object, width).unwrap();
                assert_eq!(cur, new, "width {width}, len {n}");
                // A delta for a longer chunk does not fit (never allocates past the chunk).
                let mut short = base[..n / 2].to_vec();
                if n > 1 {
                    assert!(apply_delta(&mut short, &object, width).is_err());
                }
            }
        }
        assert!(apply_delta(&mut [0u8; 8], b"not deflate", 4).is_err());
    }

    #[test]
    fn delta_settings_are_bounded() {
        for bad in [
            WeightsConfig {
                max_delta_chain: MAX_DELTA_CHAIN + 1,
                ..WeightsConfig::default()
            },
            WeightsConfig {
                delta_max_percent: 0,
                ..WeightsConfig::default()
            },
            WeightsConfig {
                delta_max_percent: 101,
                ..WeightsConfig::default()
            },
        ] {
            assert!(matches!(bad.validate(), Err(WeightsError::InvalidInput(_))));
        }
        let toml_like: WeightsConfig = serde_json::from_str(r#"{"chunk_bytes":4096}"#).unwrap();
        assert_eq!(toml_like.max_delta_chain, DEFAULT_MAX_DELTA_CHAIN);
    }
}
