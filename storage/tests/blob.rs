//! The blob conformance suite against every backend: `memory://`, `file://` (a temporary
//! directory) and a real S3-compatible server (s3s-fs), plus URL handling and retry bounds.
//!
//! The S3 tests need the server of `scripts/services.sh`: s3s-fs on
//! `FLYWHEEL_TEST_S3_ENDPOINT` (default `http://127.0.0.1:8014`) with access key
//! `FLYWHEEL_TEST_S3_ACCESS_KEY` (default `flywheel`), secret `FLYWHEEL_TEST_S3_SECRET_KEY`
//! (default `flywheel-secret`) and bucket `FLYWHEEL_TEST_S3_BUCKET` (default `flywheel-test`).

use std::time::Duration;

use bytes::Bytes;
use flywheel_storage::blob::conformance::Fixture;
use flywheel_storage::blob::{BlobError, BlobStore, PutOutcome, RetryPolicy};
use flywheel_storage::testkit::{S3Server, unique_id};

/// The test server's URL for a fresh prefix, with `extra` query parameters.
fn s3_url(extra: &[(&str, &str)]) -> String {
    let mut url = url::Url::parse(&S3Server::from_env().url(&unique_id("test"))).unwrap();
    for (k, v) in extra {
        url.query_pairs_mut().append_pair(k, v);
    }
    url.to_string()
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

mod memory {
    use super::*;
    flywheel_storage::blob_store_conformance!(Fixture::new(BlobStore::open("memory://").unwrap()));
}

mod file {
    use super::*;
    flywheel_storage::blob_store_conformance!(Fixture::temp_dir(""));
}

/// Without fsync the local store is the same store (only a machine crash tells them apart).
mod file_without_fsync {
    use super::*;
    flywheel_storage::blob_store_conformance!(Fixture::temp_dir("?fsync=false"));
}

/// s3s-fs 0.14.1 honours `If-None-Match: *` but checks existence and then writes (see its
/// `put_object`), so concurrent creators can all succeed: the race check expects atomicity
/// only when `FLYWHEEL_TEST_S3_ATOMIC_CREATE=1` (set it against AWS S3 or MinIO).
mod s3 {
    use super::*;

    fn fixture() -> Fixture {
        let store = BlobStore::open(&s3_url(&[])).unwrap();
        assert!(store.atomic_create(), "conditional put is on by default");
        let mut fixture = Fixture::new(store);
        fixture.atomic_create =
            std::env::var("FLYWHEEL_TEST_S3_ATOMIC_CREATE").is_ok_and(|v| v == "1");
        fixture
    }

    flywheel_storage::blob_store_conformance!(fixture());
}

/// Without conditional put the S3 store falls back to check-then-put.
mod s3_without_conditional_put {
    use super::*;

    fn fixture() -> Fixture {
        let store = BlobStore::open(&s3_url(&[("conditional_put", "disabled")])).unwrap();
        assert!(!store.atomic_create());
        Fixture::new(store)
    }

    flywheel_storage::blob_store_conformance!(fixture());
}

#[test]
fn file_stores_create_their_directory() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("not/yet/there").display());
    BlobStore::open(&url).unwrap();
    assert!(
        dir.path().join("not/yet/there").is_dir(),
        "file:// must create its directory"
    );
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
    assert!(store.to_string().starts_with("s3://bucket/p"), "{store}");
    assert!(!store.to_string().contains("hunter2"), "{store}");
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
    assert!(!store.to_string().contains("hunter2"), "{store}");
}
