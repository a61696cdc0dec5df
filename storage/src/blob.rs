//! Object storage for segments, batch manifests, weights and checkpoints (DESIGN.md §5).
//!
//! [`BlobStore`] wraps an [`object_store`] backend chosen by URL:
//!
//! | URL                            | backend                                                    |
//! |--------------------------------|------------------------------------------------------------|
//! | `s3://bucket[/prefix]`         | Amazon S3 or any S3-compatible server (MinIO, s3s-fs, R2…) |
//! | `file:///abs/path`             | a local directory, created if missing; writes are fsynced  |
//! | `file:///abs/path?fsync=false` | the same without fsync (a throwaway run: `flywheel demo`)  |
//! | `memory://`                    | process memory; every `open` is a new, empty store         |
//!
//! Keys are relative, `/`-separated paths (`segments/run-1/p42/0/3`); an optional URL prefix
//! is prepended transparently, so one bucket can hold many runs.
//!
//! # Configuring S3
//!
//! Settings come from the standard AWS environment variables, read by
//! [`AmazonS3Builder::from_env`]: `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`), `AWS_REGION`
//! (default `us-east-1`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_ALLOW_HTTP`, … Any [`AmazonS3ConfigKey`] may also be given as a URL query parameter,
//! which wins over the environment:
//!
//! ```text
//! s3://flywheel/run-7?endpoint=http://127.0.0.1:8014&region=us-east-1&allow_http=true
//! ```
//!
//! An `http://` endpoint implies `allow_http=true` unless `allow_http` is set explicitly (the
//! endpoint already says plain HTTP is wanted). Requests go path-style unless
//! `virtual_hosted_style_request=true`. The URL is never logged with its query string, so
//! credentials passed that way do not leak into logs or errors.
//!
//! # Retries
//!
//! Transient failures are retried a bounded number of times with exponential backoff
//! ([`RetryPolicy`]). For S3 this is object_store's HTTP retry ([`RetryConfig`]), which knows
//! which requests and statuses are safe to retry; for the local and memory stores it is a
//! small loop here. Definite answers (not found, already exists, precondition failed, access
//! denied, invalid key) are never retried.
//!
//! # Create-if-absent
//!
//! [`BlobStore::put_if_absent`] is how manifests are written (DESIGN.md §6.3). It uses
//! [`PutMode::Create`]: an atomic create on the memory and local stores (a hard link) and
//! `If-None-Match: *` on S3 (atomic on AWS S3 and MinIO; the s3s-fs test server evaluates it
//! as check-then-write, so concurrent creators there can all succeed). For an S3-compatible
//! server without conditional writes, set `conditional_put=disabled`; `put_if_absent` then
//! falls back to check-then-put, which is *not* atomic (two racing writers may both see
//! [`PutOutcome::Created`], and the later write wins). That is acceptable for Flywheel's manifests only because they are deterministic and
//! the ledger transaction, not the manifest, is the commit point; [`BlobStore::atomic_create`]
//! tells callers which guarantee they have.

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flywheel_service::{Backoff, redact_url};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ClientConfigKey, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig,
};
use thiserror::Error;
use url::Url;

/// The URL schemes [`BlobStore::open`] understands, for error messages.
pub const SUPPORTED_SCHEMES: &str = "s3://bucket[/prefix], file:///absolute/path, memory://";

/// Errors of the blob store. Each says what went wrong and, where there is one, what to do.
#[derive(Debug, Error)]
pub enum BlobError {
    /// The URL's scheme is not one this build supports.
    #[error(
        "unsupported blob store URL scheme `{scheme}` in `{url}`: use one of {SUPPORTED_SCHEMES}"
    )]
    UnsupportedScheme {
        /// The URL as given (without its query string).
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// The URL is malformed or lacks a part its scheme needs.
    #[error("invalid blob store URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL as given (without its query string).
        url: String,
        /// What is wrong and how to write it.
        reason: String,
    },
    /// object_store rejected the configuration (a bad option value, missing credentials…).
    #[error("cannot configure blob store `{url}`: {source}")]
    Config {
        /// The URL as given (without its query string).
        url: String,
        /// object_store's explanation.
        #[source]
        source: Box<object_store::Error>,
    },
    /// The local directory of a `file://` store could not be created.
    #[error("cannot create the blob directory {}: {source}; check the path and its permissions", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A key is not a valid object path.
    #[error("invalid blob key `{key}`: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No object under this key.
    #[error("blob `{key}` not found in {store}")]
    NotFound {
        /// The store (URL without query string).
        store: String,
        /// The key.
        key: String,
    },
    /// The store refused the credentials or the permission.
    #[error(
        "{op} of blob `{key}` in {store} was refused: check the credentials \
         (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the bucket's permissions: {source}"
    )]
    AccessDenied {
        /// The store (URL without query string).
        store: String,
        /// The operation.
        op: &'static str,
        /// The key (or prefix, for a listing).
        key: String,
        /// object_store's error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// The operation kept failing with transient errors until the retries ran out.
    #[error(
        "{op} of blob `{key}` in {store} failed after {attempts} attempt(s): {source}; \
         check that the object store is reachable and healthy"
    )]
    Unavailable {
        /// The store (URL without query string).
        store: String,
        /// The operation.
        op: &'static str,
        /// The key (or prefix, for a listing).
        key: String,
        /// Attempts made (for S3, the HTTP layer's retries are within each attempt).
        attempts: u32,
        /// The last error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// Any other failure the store reported (not retried: retrying would not help).
    #[error("{op} of blob `{key}` in {store} failed: {source}")]
    Backend {
        /// The store (URL without query string).
        store: String,
        /// The operation.
        op: &'static str,
        /// The key (or prefix, for a listing).
        key: String,
        /// object_store's error.
        #[source]
        source: Box<object_store::Error>,
    },
}

/// Bounded retry with exponential backoff.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Wait before the first retry; doubled for each further one.
    pub initial_backoff: Duration,
    /// Cap on any one wait.
    pub max_backoff: Duration,
    /// For S3: give up retrying once this long has passed since the first request (bounds the
    /// time a request's signature must stay valid, too).
    pub total_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            total_timeout: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The waits between attempts.
    fn backoff(&self) -> Backoff {
        Backoff::new(self.initial_backoff, self.max_backoff)
    }

    /// The same policy for object_store's HTTP client.
    fn http_config(&self) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig {
                init_backoff: self.initial_backoff,
                max_backoff: self.max_backoff,
                base: 2.0,
            },
            max_retries: self.max_attempts.saturating_sub(1) as usize,
            retry_timeout: self.total_timeout,
        }
    }
}

/// What [`BlobStore::put_if_absent`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object did not exist and now holds the given bytes.
    Created,
    /// An object already existed under the key; it was left untouched.
    AlreadyExists,
}

/// An object's key (relative to the store's prefix) and size, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobMeta {
    /// The key, relative to the store's URL prefix.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// Which backend a store is: decides where retries happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Memory,
    Local,
    S3,
}

/// An object store opened from a URL. Cheap to clone; clones share the backend.
#[derive(Clone)]
pub struct BlobStore {
    /// The backend, already wrapped in the URL's prefix.
    inner: Arc<dyn ObjectStore>,
    /// The URL without its query string: safe to log.
    display: String,
    /// Which kind of backend, for the retry split.
    backend: Backend,
    /// Retry bounds.
    retry: RetryPolicy,
    /// Whether `PutMode::Create` is atomic here (false only for S3 with conditional puts
    /// disabled).
    atomic_create: bool,
    /// Warn once per store when falling back to non-atomic create.
    warned_fallback: Arc<AtomicBool>,
}

impl fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStore")
            .field("url", &self.display)
            .field("atomic_create", &self.atomic_create)
            .field("retry", &self.retry)
            .finish()
    }
}

impl fmt::Display for BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

/// Checks a key and turns it into an object path. The rules are the strictest of the
/// backends', applied everywhere so a key valid on one store is valid on all.
fn key_path(key: &str) -> Result<Path, BlobError> {
    let invalid = |reason: &str| BlobError::InvalidKey {
        key: key.to_owned(),
        reason: reason.into(),
    };
    if key.is_empty() {
        return Err(invalid("empty"));
    }
    if key.starts_with('/') || key.ends_with('/') {
        return Err(invalid(
            "keys are relative paths: no leading or trailing `/`",
        ));
    }
    let mut last = "";
    for part in key.split('/') {
        if part.is_empty() {
            return Err(invalid("empty path segment (`//`)"));
        }
        if part == "." || part == ".." {
            return Err(invalid("`.` and `..` segments are not allowed"));
        }
        if part.chars().any(|c| c.is_ascii_control()) {
            return Err(invalid("control characters are not allowed"));
        }
        last = part;
    }
    // The local store keeps in-progress uploads as `name#<digits>`.
    if let Some((_, suffix)) = last.rsplit_once('#')
        && !suffix.is_empty()
        && suffix.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(invalid(
            "the last segment may not end in `#<digits>` (reserved for uploads)",
        ));
    }
    Path::parse(key).map_err(|e| invalid(&e.to_string()))
}

/// A listing prefix: like a key, but empty means everything.
fn prefix_path(prefix: &str) -> Result<Option<Path>, BlobError> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if trimmed.is_empty() {
        Ok(None)
    } else {
        key_path(trimmed).map(Some)
    }
}

/// Whether an HTTP store's error is a transport failure (no usable response at all).
fn is_transport_error(e: &object_store::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        if err.is::<object_store::client::HttpError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Errors that say "try again later" rather than "no".
fn is_transient(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}

/// Runs `op` up to `policy.max_attempts` times while it fails transiently. Returns the result
/// and the number of attempts made.
async fn retry_transient<T, F, Fut>(
    policy: &RetryPolicy,
    mut op: F,
) -> (Result<T, object_store::Error>, u32)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, object_store::Error>>,
{
    let max = policy.max_attempts.max(1);
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if is_transient(&e) && attempt < max => {
                tracing::debug!(error = %e, attempt, "transient blob store error; retrying");
                tokio::time::sleep(policy.backoff().delay(attempt)).await;
                attempt += 1;
            }
            result => return (result, attempt),
        }
    }
}

impl BlobStore {
    /// Opens the store named by `url` with the default [`RetryPolicy`].
    pub fn open(url: &str) -> Result<BlobStore, BlobError> {
        BlobStore::open_with(url, RetryPolicy::default())
    }

    /// Opens the store named by `url` (see the module docs for the URL forms and S3 settings).
    pub fn open_with(url: &str, retry: RetryPolicy) -> Result<BlobStore, BlobError> {
        let parsed = Url::parse(url).map_err(|e| BlobError::InvalidUrl {
            url: url.split('?').next().unwrap_or_default().to_owned(),
            reason: format!("{e}; expected one of {SUPPORTED_SCHEMES}"),
        })?;
        let display = redact_url(url);
        let (inner, backend, atomic_create): (Arc<dyn ObjectStore>, Backend, bool) =
            match parsed.scheme() {
                "memory" => (Arc::new(InMemory::new()), Backend::Memory, true),
                "file" => (open_local(&parsed, &display)?, Backend::Local, true),
                "s3" | "s3a" => {
                    let (store, atomic) = open_s3(&parsed, &display, &retry)?;
                    (store, Backend::S3, atomic)
                }
                other => {
                    return Err(BlobError::UnsupportedScheme {
                        url: display,
                        scheme: other.to_owned(),
                    });
                }
            };
        Ok(BlobStore {
            inner,
            display,
            backend,
            retry,
            atomic_create,
            warned_fallback: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Whether [`put_if_absent`](Self::put_if_absent) is atomic against concurrent writers.
    pub fn atomic_create(&self) -> bool {
        self.atomic_create
    }

    /// The retry bounds in force.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Runs one object_store call with this store's retry policy and maps its error.
    async fn call<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> Result<T, BlobError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, object_store::Error>>,
    {
        let (result, attempts) = match self.backend {
            // object_store's HTTP client already retried what is safe to retry.
            Backend::S3 => {
                let mut f = f;
                (f().await, self.retry.max_attempts.max(1))
            }
            Backend::Memory | Backend::Local => retry_transient(&self.retry, f).await,
        };
        result.map_err(|e| self.map_err(op, key, attempts, e))
    }

    fn map_err(
        &self,
        op: &'static str,
        key: &str,
        attempts: u32,
        e: object_store::Error,
    ) -> BlobError {
        let store = self.display.clone();
        let key = key.to_owned();
        match e {
            object_store::Error::NotFound { .. } => BlobError::NotFound { store, key },
            object_store::Error::InvalidPath { source } => BlobError::InvalidKey {
                key,
                reason: source.to_string(),
            },
            e @ (object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }) => BlobError::AccessDenied {
                store,
                op,
                key,
                source: Box::new(e),
            },
            // On S3 only transport failures (connect, timeout, reset) mean "unreachable"; an
            // HTTP error status there was already retried or is definite, and says so itself.
            e if is_transient(&e) && (self.backend != Backend::S3 || is_transport_error(&e)) => {
                BlobError::Unavailable {
                    store,
                    op,
                    key,
                    attempts,
                    source: Box::new(e),
                }
            }
            e => BlobError::Backend {
                store,
                op,
                key,
                source: Box::new(e),
            },
        }
    }

    /// Writes `data` under `key`, replacing any existing object.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), BlobError> {
        let path = key_path(key)?;
        self.call("put", key, || {
            self.inner.put(&path, PutPayload::from(data.clone()))
        })
        .await
        .map(drop)
    }

    /// Writes `data` under `key` only if nothing is there yet (for manifests). See the module
    /// docs for when this is atomic. After a retried attempt, `AlreadyExists` may mean an
    /// earlier attempt of this very call landed: callers compare the existing content.
    pub async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, BlobError> {
        let path = key_path(key)?;
        let opts = || PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let result = self
            .call("put_if_absent", key, || {
                let (path, data) = (&path, data.clone());
                async move {
                    match self
                        .inner
                        .put_opts(path, PutPayload::from(data), opts())
                        .await
                    {
                        Ok(_) => Ok(PutOutcome::Created),
                        Err(object_store::Error::AlreadyExists { .. }) => {
                            Ok(PutOutcome::AlreadyExists)
                        }
                        Err(e) => Err(e),
                    }
                }
            })
            .await;
        match result {
            // The store said it cannot create conditionally (S3 with conditional_put=disabled).
            Err(BlobError::Backend { source, .. })
                if matches!(*source, object_store::Error::NotImplemented { .. }) =>
            {
                self.put_if_absent_fallback(key, data).await
            }
            other => other,
        }
    }

    /// Check-then-put for stores without conditional writes: not atomic (module docs).
    async fn put_if_absent_fallback(
        &self,
        key: &str,
        data: Bytes,
    ) -> Result<PutOutcome, BlobError> {
        if !self.warned_fallback.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                store = %self.display,
                "object store has no conditional put: create-if-absent falls back to a \
                 non-atomic check-then-put"
            );
        }
        if self.exists(key).await? {
            return Ok(PutOutcome::AlreadyExists);
        }
        self.put(key, data).await?;
        Ok(PutOutcome::Created)
    }

    /// Reads the whole object under `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes, BlobError> {
        let path = key_path(key)?;
        self.call("get", key, || async {
            self.inner.get(&path).await?.bytes().await
        })
        .await
    }

    /// Reads bytes `range` of the object under `key`. The range must lie within the object.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, BlobError> {
        let path = key_path(key)?;
        self.call("get_range", key, || {
            self.inner.get_range(&path, range.clone())
        })
        .await
    }

    /// The size of the object under `key`; [`BlobError::NotFound`] when there is none.
    pub async fn head(&self, key: &str) -> Result<BlobMeta, BlobError> {
        let path = key_path(key)?;
        let meta = self.call("head", key, || self.inner.head(&path)).await?;
        Ok(BlobMeta {
            key: key.to_owned(),
            size: meta.size,
        })
    }

    /// Whether an object exists under `key`.
    pub async fn exists(&self, key: &str) -> Result<bool, BlobError> {
        match self.head(key).await {
            Ok(_) => Ok(true),
            Err(BlobError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes the object under `key`. Deleting a missing object succeeds (S3 semantics on
    /// every backend), so a retried or repeated delete is harmless.
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        let path = key_path(key)?;
        match self.call("delete", key, || self.inner.delete(&path)).await {
            Err(BlobError::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    /// The objects at `keys`, read `concurrency` at a time; the results in the order of
    /// `keys`. The future owns what it reads from, so it is `Send` for any lifetime (a
    /// stream borrowing the keys is not, inside a spawned service future).
    pub async fn get_all(
        &self,
        keys: Vec<String>,
        concurrency: usize,
    ) -> Vec<Result<Bytes, BlobError>> {
        let reads: Vec<_> = keys
            .into_iter()
            .map(|key| {
                let store = self.clone();
                async move { store.get(&key).await }
            })
            .collect();
        futures::stream::iter(reads)
            .buffered(concurrency.max(1))
            .collect()
            .await
    }

    /// Every object whose key lies under `prefix`, sorted by key. Prefixes match whole path
    /// segments: `a/b` lists `a/b/c` and `a/b` itself, not `a/bc`. An empty prefix lists all.
    pub async fn list(&self, prefix: &str) -> Result<Vec<BlobMeta>, BlobError> {
        let path = prefix_path(prefix)?;
        let mut out: Vec<BlobMeta> = self
            .call("list", prefix, || {
                self.inner
                    .list(path.as_ref())
                    .map_ok(|m| BlobMeta {
                        key: m.location.to_string(),
                        size: m.size,
                    })
                    .try_collect::<Vec<_>>()
            })
            .await?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

/// `file:///abs/path[?fsync=false]`: the directory is created if missing.
fn open_local(url: &Url, display: &str) -> Result<Arc<dyn ObjectStore>, BlobError> {
    let invalid = |reason: String| BlobError::InvalidUrl {
        url: display.to_owned(),
        reason,
    };
    // Manifests and segments must survive a machine crash once `put` returns, unless the
    // run itself would not (an embedded demo keeps its state in memory): there the fsync of
    // every segment only costs time.
    let mut fsync = true;
    for (key, value) in url.query_pairs() {
        match (key.as_ref(), value.as_ref()) {
            ("fsync", "true") => fsync = true,
            ("fsync", "false") => fsync = false,
            ("fsync", other) => {
                return Err(invalid(format!(
                    "fsync must be `true` or `false`, not `{other}`"
                )));
            }
            (other, _) => {
                return Err(invalid(format!(
                    "file:// URLs take only the `fsync` parameter, not `{other}`"
                )));
            }
        }
    }
    let dir = url.to_file_path().map_err(|()| {
        invalid(
            "a file:// URL needs an absolute path and no host: write file:///absolute/path".into(),
        )
    })?;
    std::fs::create_dir_all(&dir).map_err(|source| BlobError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    let fs = LocalFileSystem::new_with_prefix(&dir).map_err(|e| BlobError::Config {
        url: display.to_owned(),
        source: Box::new(e),
    })?;
    Ok(Arc::new(fs.with_fsync(fsync).with_automatic_cleanup(true)))
}

/// `s3://bucket[/prefix][?key=value…]`. Returns the store and whether create is atomic.
fn open_s3(
    url: &Url,
    display: &str,
    retry: &RetryPolicy,
) -> Result<(Arc<dyn ObjectStore>, bool), BlobError> {
    let invalid = |reason: String| BlobError::InvalidUrl {
        url: display.to_owned(),
        reason,
    };
    let bucket = url
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| invalid("no bucket: write s3://bucket[/prefix]".into()))?;

    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let mut allow_http_set = std::env::var_os("AWS_ALLOW_HTTP").is_some();
    for (k, v) in url.query_pairs() {
        let key: AmazonS3ConfigKey = k.parse().map_err(|_| {
            invalid(format!(
                "unknown S3 option `{k}` in the query string; use object_store's S3 keys such as \
                 endpoint, region, access_key_id, secret_access_key, allow_http, conditional_put"
            ))
        })?;
        if key == AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp) {
            allow_http_set = true;
        }
        builder = builder.with_config(key, v.into_owned());
    }
    let http_endpoint = builder
        .get_config_value(&AmazonS3ConfigKey::Endpoint)
        .is_some_and(|e| e.starts_with("http://"));
    if http_endpoint && !allow_http_set {
        builder = builder.with_allow_http(true);
    }
    let atomic = builder
        .get_config_value(&AmazonS3ConfigKey::ConditionalPut)
        .is_none_or(|v| v.trim() != "disabled");
    let store = builder
        .with_retry(retry.http_config())
        .build()
        .map_err(|e| BlobError::Config {
            url: display.to_owned(),
            source: Box::new(e),
        })?;

    let prefix = url.path().trim_matches('/');
    let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
        Arc::new(store)
    } else {
        let prefix = key_path(prefix).map_err(|e| invalid(format!("bad prefix: {e}")))?;
        Arc::new(PrefixStore::new(store, prefix))
    };
    Ok((store, atomic))
}

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            total_timeout: Duration::from_secs(1),
        }
    }

    fn generic() -> object_store::Error {
        object_store::Error::Generic {
            store: "test",
            source: "connection reset".into(),
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let (r, attempts) = retry_transient(&fast(), || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(generic())
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!((attempts, calls.load(Ordering::SeqCst)), (3, 3));
    }

    #[tokio::test]
    async fn retries_are_bounded() {
        let calls = AtomicU32::new(0);
        let (r, attempts) = retry_transient(&fast(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(generic())
        })
        .await;
        assert!(r.is_err());
        assert_eq!((attempts, calls.load(Ordering::SeqCst)), (3, 3));
    }

    #[tokio::test]
    async fn definite_answers_are_not_retried() {
        let calls = AtomicU32::new(0);
        let (r, attempts) = retry_transient(&fast(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(object_store::Error::NotFound {
                path: "x".into(),
                source: "gone".into(),
            })
        })
        .await;
        assert!(matches!(r, Err(object_store::Error::NotFound { .. })));
        assert_eq!((attempts, calls.load(Ordering::SeqCst)), (1, 1));
    }
}
