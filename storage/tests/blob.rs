//! The blob conformance suite against every backend: `memory://`, `file://` (a temporary
//! directory) and a real S3-compatible server (s3s-fs), plus URL handling and retry bounds.
//!
//! The S3 tests need the server of `scripts/services.sh`: s3s-fs on
//! `FLYWHEEL_TEST_S3_ENDPOINT` (default `http://127.0.0.1:8014`) with access key
//! `FLYWHEEL_TEST_S3_ACCESS_KEY` (default `flywheel`), secret `FLYWHEEL_TEST_S3_SECRET_KEY`
//! (default `flywheel-secret`) and bucket `FLYWHEEL_TEST_S3_BUCKET` (default `flywheel-test`).

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::Bytes;
use flywheel_storage::blob::{BlobError, BlobStore, PutOutcome, RetryPolicy, conformance};
use url::Url;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// The test server's URL for a fresh prefix, with endpoint and credentials as query
/// parameters (so the test does not depend on, or change, the process environment).
fn s3_url(extra: &[(&str, &str)]) -> String {
    let endpoint = env_or("FLYWHEEL_TEST_S3_ENDPOINT", "http://127.0.0.1:8014");
    let bucket = env_or("FLYWHEEL_TEST_S3_BUCKET", "flywheel-test");
    require_s3(&endpoint, &bucket);
    let mut url = Url::parse(&format!(
        "s3://{bucket}/{}",
        conformance::unique_namespace("test")
    ))
    .unwrap();
    url.query_pairs_mut()
        .append_pair("endpoint", &endpoint)
        .append_pair("region", "us-east-1")
        .append_pair(
            "access_key_id",
            &env_or("FLYWHEEL_TEST_S3_ACCESS_KEY", "flywheel"),
        )
        .append_pair(
            "secret_access_key",
            &env_or("FLYWHEEL_TEST_S3_SECRET_KEY", "flywheel-secret"),
        );
    for (k, v) in extra {
        url.query_pairs_mut().append_pair(k, v);
    }
    url.to_string()
}

/// Fails (never skips) when the S3 server is not listening, naming it and how to start it.
fn require_s3(endpoint: &str, bucket: &str) {
    let url = Url::parse(endpoint)
        .unwrap_or_else(|e| panic!("FLYWHEEL_TEST_S3_ENDPOINT={endpoint} is not a URL: {e}"));
    let addr = format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port_or_known_default().unwrap_or(80)
    );
    let reachable = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)).is_ok());
    assert!(
        reachable,
        "the S3-compatible test server (s3s-fs) is not reachable at {endpoint}: start it with \
         scripts/services.sh (it serves bucket `{bucket}`), or point FLYWHEEL_TEST_S3_ENDPOINT at one"
    );
}

/// Opens an S3 store and checks its bucket exists, failing with what to do if not.
async fn open_s3(extra: &[(&str, &str)]) -> BlobStore {
    let store = BlobStore::open(&s3_url(extra)).expect("open the S3 test store");
    if let Err(e) = store.list("").await {
        panic!(
            "the S3 test server answered but listing {store} failed: {e}\n(does the bucket exist? \
             scripts/services.sh creates it; for s3s-fs a bucket is a directory under its root)"
        );
    }
    store
}

#[tokio::test]
async fn memory_conformance() {
    conformance::run_all(&BlobStore::open("memory://").unwrap()).await;
}

#[tokio::test]
async fn file_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("not/yet/there").display());
    let store = BlobStore::open(&url).unwrap();
    assert!(
        dir.path().join("not/yet/there").is_dir(),
        "file:// must create its directory"
    );
    conformance::run_all(&store).await;
}

/// Without fsync the local store is the same store (only a machine crash tells them apart).
#[tokio::test]
async fn file_conformance_without_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}?fsync=false", dir.path().display());
    conformance::run_all(&BlobStore::open(&url).unwrap()).await;
}

/// s3s-fs 0.14.1 honours `If-None-Match: *` but checks existence and then writes (see its
/// `put_object`), so concurrent creators can all succeed: the race check expects atomicity
/// only when `FLYWHEEL_TEST_S3_ATOMIC_CREATE=1` (set it against AWS S3 or MinIO).
#[tokio::test]
async fn s3_conformance() {
    let store = open_s3(&[]).await;
    assert!(store.atomic_create(), "conditional put is on by default");
    let atomic = std::env::var("FLYWHEEL_TEST_S3_ATOMIC_CREATE").is_ok_and(|v| v == "1");
    conformance::run_all_with(
        &store,
        conformance::Guarantees {
            atomic_create: atomic,
        },
    )
    .await;
}

#[tokio::test]
async fn s3_without_conditional_put_falls_back_to_check_then_put() {
    let store = open_s3(&[("conditional_put", "disabled")]).await;
    assert!(!store.atomic_create());
    conformance::run_all(&store).await;
}

#[tokio::test]
async fn file_store_persists_across_opens() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    BlobStore::open(&url)
        .unwrap()
        .put("runs/r1/manifest", Bytes::from_static(b"m"))
        .await
        .unwrap();
    let again = BlobStore::open(&url).unwrap();
    assert_eq!(
        again.get("runs/r1/manifest").await.unwrap(),
        Bytes::from_static(b"m")
    );
    assert!(dir.path().join("runs/r1/manifest").is_file());
}

#[tokio::test]
async fn s3_prefix_isolates_stores() {
    let a = open_s3(&[]).await;
    let b = open_s3(&[]).await;
    a.put("same/key", Bytes::from_static(b"a")).await.unwrap();
    assert!(
        !b.exists("same/key").await.unwrap(),
        "two prefixes must not see each other's keys"
    );
    assert_eq!(a.list("").await.unwrap().len(), 1);
    a.delete("same/key").await.unwrap();
}

#[tokio::test]
async fn memory_stores_are_independent() {
    let a = BlobStore::open("memory://").unwrap();
    let b = BlobStore::open("memory://").unwrap();
    a.put("k", Bytes::from_static(b"v")).await.unwrap();
    assert!(!b.exists("k").await.unwrap());
    // Clones share.
    assert!(a.clone().exists("k").await.unwrap());
}

#[test]
fn unknown_scheme_lists_the_supported_ones() {
    let err = BlobStore::open("gs://bucket/x").unwrap_err();
    assert!(matches!(err, BlobError::UnsupportedScheme { ref scheme, .. } if scheme == "gs"));
    let msg = err.to_string();
    for scheme in ["s3://", "file://", "memory://"] {
        assert!(msg.contains(scheme), "{msg}");
    }
}

#[test]
fn malformed_urls_are_explained() {
    let cases = [
        ("not a url", "expected one of"),
        ("file://relative/path", "absolute path"),
        ("file:///tmp/x?opt=1", "only the `fsync` parameter"),
        ("file:///tmp/x?fsync=maybe", "`true` or `false`"),
        ("s3:///prefix", "no bucket"),
        (
            "s3://bucket?no_such_option=1",
            "unknown S3 option `no_such_option`",
        ),
    ];
    for (url, needle) in cases {
        let err = BlobStore::open(url).unwrap_err();
        assert!(
            matches!(err, BlobError::InvalidUrl { .. }),
            "{url}: {err:?}"
        );
        assert!(err.to_string().contains(needle), "{url}: {err}");
    }
}

#[test]
fn credentials_in_the_url_never_reach_messages() {
    let store = BlobStore::open(
        "s3://bucket/p?access_key_id=AKIA1&secret_access_key=hunter2&region=us-east-1",
    )
    .unwrap();
    assert_eq!(store.to_string(), "s3://bucket/p");
    assert!(!format!("{store:?}").contains("hunter2"));
    let err = BlobStore::open("s3://bucket?secret_access_key=hunter2&bogus=1").unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[test]
fn unwritable_directory_is_reported() {
    let file = tempfile::NamedTempFile::new().unwrap();
    // A directory cannot be created inside a regular file.
    let url = format!("file://{}/sub", file.path().display());
    let err = BlobStore::open(&url).unwrap_err();
    assert!(matches!(err, BlobError::CreateDir { .. }), "{err:?}");
}

/// Against a port nobody listens on, requests fail after the bounded retries with an error
/// that says to check the store, instead of hanging or retrying forever.
#[tokio::test]
async fn unreachable_s3_fails_after_bounded_retries() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener); // Now nothing listens there.
    let policy = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(20),
        total_timeout: Duration::from_secs(10),
    };
    let url = format!(
        "s3://bucket/p?endpoint=http://127.0.0.1:{port}&access_key_id=a&secret_access_key=b"
    );
    let store = BlobStore::open_with(&url, policy).unwrap();
    let err = store.get("k").await.unwrap_err();
    assert!(matches!(err, BlobError::Unavailable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("reachable") && msg.contains("s3://bucket/p"),
        "{msg}"
    );
    // put_if_absent does not mistake the outage for "already exists".
    let err = store
        .put_if_absent("k", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::Unavailable { .. }), "{err:?}");
}

#[tokio::test]
async fn put_if_absent_on_memory_reports_both_outcomes() {
    let store = BlobStore::open("memory:///").unwrap();
    assert_eq!(
        store
            .put_if_absent("m", Bytes::from_static(b"1"))
            .await
            .unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        store
            .put_if_absent("m", Bytes::from_static(b"2"))
            .await
            .unwrap(),
        PutOutcome::AlreadyExists
    );
}

#[tokio::test]
async fn s3_wrong_credentials_say_to_check_them() {
    let store = BlobStore::open(&s3_url(&[("secret_access_key", "not-the-secret")])).unwrap();
    let err = store.put("k", Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(err, BlobError::AccessDenied { .. }), "{err:?}");
    assert!(err.to_string().contains("check the credentials"), "{err}");
}

#[test]
fn userinfo_credentials_never_reach_messages() {
    let store =
        BlobStore::open("s3://AKIA1:hunter2@bucket/p?access_key_id=a&secret_access_key=b").unwrap();
    assert_eq!(store.to_string(), "s3://bucket/p");
}
