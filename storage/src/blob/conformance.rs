//! The one conformance suite every [`BlobStore`] backend must pass (DESIGN.md §9).
//!
//! Each `pub async fn` is one case; [`crate::blob_store_conformance!`] turns all of them into
//! `#[tokio::test]`s for a [`Fixture`]. Each case works under a fresh, unique key namespace,
//! so runs against a shared bucket do not see each other, and removes what it wrote when it
//! passes. Failures panic with a message naming the check, as a test does.

use bytes::Bytes;
use tempfile::TempDir;

use super::{BlobError, BlobStore, PutOutcome};
use crate::codec::{self, CodecError};
use crate::testkit::unique_id;
use crate::types::{FinishReason, PromptId, Segment, TrajectoryId};

/// A store under test and what it promises beyond what [`BlobStore`] itself can tell.
pub struct Fixture {
    /// The store.
    pub store: BlobStore,
    /// Concurrent [`BlobStore::put_if_absent`] calls on one key: exactly one is `Created`.
    /// True of the memory and local stores and of S3 proper (If-None-Match is atomic there);
    /// false of a server that checks existence and then writes (s3s-fs 0.14.1).
    pub atomic_create: bool,
    /// The directory of a `file://` store, removed after the test.
    _dir: Option<TempDir>,
}

impl Fixture {
    /// `store`, expecting what its configuration promises.
    pub fn new(store: BlobStore) -> Fixture {
        Fixture {
            atomic_create: store.atomic_create(),
            store,
            _dir: None,
        }
    }

    /// A `file://` store in a fresh temporary directory, the URL ending in `query`.
    pub fn temp_dir(query: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!("file://{}{query}", dir.path().display());
        Fixture {
            _dir: Some(dir),
            ..Fixture::new(BlobStore::open(&url).expect("a file:// store"))
        }
    }

    /// Runs `case` in a namespace of its own, then deletes what it wrote.
    pub async fn run<'a, F, Fut>(&'a self, case: F)
    where
        F: FnOnce(&'a Fixture, String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let ns = unique_id("conformance");
        case(self, ns.clone()).await;
        let store = &self.store;
        for meta in store
            .list(&ns)
            .await
            .expect("list the namespace for cleanup")
        {
            store
                .delete(&meta.key)
                .await
                .expect("clean up the namespace");
        }
        assert!(
            store.list(&ns).await.unwrap().is_empty(),
            "cleanup left objects behind"
        );
    }
}

/// Generates one `#[tokio::test]` per conformance case on the [`Fixture`] `$fixture` makes.
///
/// ```text
/// flywheel_storage::blob_store_conformance!(Fixture::new(BlobStore::open("memory://").unwrap()));
/// ```
#[macro_export]
macro_rules! blob_store_conformance {
    ($fixture:expr) => {
        $crate::blob_store_conformance!(@cases $fixture;
            put_get_overwrite,
            missing_objects,
            head_and_ranges,
            list_by_prefix,
            delete_is_idempotent,
            put_if_absent,
            put_if_absent_race,
            invalid_keys,
            large_object,
            segment_through_store,
        );
    };
    (@cases $fixture:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $fixture;
                fixture
                    .run($crate::blob::conformance::$case)
                    .await;
            }
        )*
    };
}

/// Put, get back the same bytes; a second put replaces the first.
pub async fn put_get_overwrite(fixture: &Fixture, ns: String) {
    let store = &fixture.store;
    let key = format!("{ns}/a/object.bin");
    store.put(&key, Bytes::from_static(b"first")).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), Bytes::from_static(b"first"));
    store
        .put(&key, Bytes::from_static(b"second, longer"))
        .await
        .unwrap();
    assert_eq!(
        store.get(&key).await.unwrap(),
        Bytes::from_static(b"second, longer")
    );
    // An empty object is an object.
    let empty = format!("{ns}/empty");
    store.put(&empty, Bytes::new()).await.unwrap();
    assert_eq!(store.get(&empty).await.unwrap(), Bytes::new());
    assert!(store.exists(&empty).await.unwrap());
}

/// Reading, heading or range-reading a missing key is `NotFound`, never another error.
pub async fn missing_objects(fixture: &Fixture, ns: String) {
    let store = &fixture.store;
    let key = format!("{ns}/never-written");
    assert!(
        matches!(store.get(&key).await, Err(BlobError::NotFound { .. })),
        "get of a missing key"
    );
    assert!(
        matches!(store.head(&key).await, Err(BlobError::NotFound { .. })),
        "head of a missing key"
    );
    assert!(
        matches!(
            store.get_range(&key, 0..1).await,
            Err(BlobError::NotFound { .. })
        ),
        "get_range of a missing key"
    );
    assert!(!store.exists(&key).await.unwrap());
    let msg = store.get(&key).await.unwrap_err().to_string();
    assert!(
        msg.contains("not found") && msg.contains(&key),
        "unhelpful message: {msg}"
    );
}

/// `head` reports the size; `get_range` returns exactly the asked bytes.
pub async fn head_and_ranges(fixture: &Fixture, ns: String) {
    let store = &fixture.store;
    let key = format!("{ns}/digits");
    let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    store.put(&key, Bytes::from(data.clone())).await.unwrap();
    let meta = store.head(&key).await.unwrap();
    assert_eq!((meta.key.as_str(), meta.size), (key.as_str(), 1000));
    for range in [0..1, 0..1000, 10..20, 999..1000, 256..768] {
        let got = store.get_range(&key, range.clone()).await.unwrap();
        assert_eq!(
            &got[..],
            &data[range.start as usize..range.end as usize],
            "range {range:?}"
        );
    }
}

/// Listing matches whole path segments, recurses, and returns keys relative to the store.
pub async fn list_by_prefix(fixture: &Fixture, ns: String) {
    let store = &fixture.store;
    for (key, len) in [
        ("a/1", 1),
        ("a/2", 2),
        ("a/sub/3", 3),
        ("ab/4", 4),
        ("b", 5),
    ] {
        store
            .put(&format!("{ns}/{key}"), Bytes::from(vec![b'x'; len]))
            .await
            .unwrap();
    }
    let keys = |v: Vec<super::BlobMeta>| v.into_iter().map(|m| (m.key, m.size)).collect::<Vec<_>>();
    let a = keys(store.list(&format!("{ns}/a")).await.unwrap());
    assert_eq!(
        a,
        [
            (format!("{ns}/a/1"), 1),
            (format!("{ns}/a/2"), 2),
            (format!("{ns}/a/sub/3"), 3)
        ],
        "list of `a` (must not include `ab/4`)"
    );
    // A trailing slash means the same directory.
    assert_eq!(keys(store.list(&format!("{ns}/a/")).await.unwrap()), a);
    assert_eq!(keys(store.list(&ns).await.unwrap()).len(), 5);
    assert!(
        store
            .list(&format!("{ns}/nothing-here"))
            .await
            .unwrap()
            .is_empty()
    );
    // The empty prefix lists the whole store, ours included.
    let all = store.list("").await.unwrap();
    assert!(
        all.iter().any(|m| m.key == format!("{ns}/ab/4")),
        "empty prefix must list everything"
    );
}

/// Delete removes; deleting again (or a never-written key) succeeds.
pub async fn delete_is_idempotent(fixture: &Fixture, ns: String) {
    let store = &fixture.store;
    let key = format!("{ns}/doomed");
    store.put(&key, Bytes::from_static(b"x")).await.unwrap();
    store.delete(&key).await.unwrap();
    assert!(!store.exists(&key).await.unwrap());
    store.delete(&key).await.unwrap();
    store.delete(&format!("{ns}/never")).await.unwrap();
}

/// Create-if-absent creates once, then reports `AlreadyExists` and leaves the object alone.
pub async fn put_if_absent(fixture: &Fixture, ns: String) {
    let store = &fixture.store;
    let key = format!("{ns}/manifest.json");
    let first = Bytes::from_static(b"{\"step\":1}");
    assert_eq!(
        store.put_if_absent(&key, first.clone()).await.unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        store
            .put_if_absent(&key, Bytes::from_static(b"{\"step\":999}"))
            .await
            .unwrap(),
        PutOutcome::AlreadyExists
    );
    assert_eq!(
        store.get(&key).await.unwrap(),
        first,
        "the existing object must be untouched"
    );
    // An object written by plain put counts as present too.
    let plain = format!("{ns}/plain");
    store.put(&plain, Bytes::from_static(b"p")).await.unwrap();
    assert_eq!(
        store
            .put_if_absent(&plain, Bytes::from_static(b"q"))
            .await
            .unwrap(),
        PutOutcome::AlreadyExists
    );
    assert_eq!(store.get(&plain).await.unwrap(), Bytes::from_static(b"p"));
}

/// Concurrent creators of one key: each gets an answer, the stored bytes are a winner's, and
/// where the fixture promises atomic creates, exactly one wins.
pub async fn put_if_absent_race(fixture: &Fixture, ns: String) {
    let store = &fixture.store;
    const RACERS: usize = 8;
    for round in 0..5 {
        let key = format!("{ns}/round-{round}");
        let tasks: Vec<_> = (0..RACERS)
            .map(|i| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(async move {
                    let outcome = store
                        .put_if_absent(&key, Bytes::from(format!("racer {i}")))
                        .await;
                    (i, outcome)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            let (i, outcome) = task.await.expect("racer task panicked");
            if outcome.unwrap() == PutOutcome::Created {
                winners.push(i);
            }
        }
        let stored = store.get(&key).await.unwrap();
        if fixture.atomic_create {
            assert_eq!(
                winners.len(),
                1,
                "round {round}: {winners:?} all created the same key"
            );
            assert_eq!(
                stored,
                Bytes::from(format!("racer {}", winners[0])),
                "round {round}"
            );
        } else {
            assert!(!winners.is_empty(), "round {round}: nobody created the key");
            assert!(
                winners
                    .iter()
                    .any(|i| stored == format!("racer {i}").as_bytes()),
                "round {round}: stored bytes come from no winner"
            );
        }
    }
}

/// Keys that are not relative object paths are refused before reaching the backend.
pub async fn invalid_keys(fixture: &Fixture, _ns: String) {
    let store = &fixture.store;
    for key in [
        "",
        "/abs",
        "trailing/",
        "a//b",
        "a/../b",
        "./a",
        "a/\u{1}b",
        "a/b#12",
    ] {
        assert!(
            matches!(
                store.put(key, Bytes::new()).await,
                Err(BlobError::InvalidKey { .. })
            ),
            "key {key:?} was accepted"
        );
        assert!(
            matches!(store.get(key).await, Err(BlobError::InvalidKey { .. })),
            "get {key:?}"
        );
    }
}

/// A multi-megabyte object (a weights chunk) round-trips intact.
pub async fn large_object(fixture: &Fixture, ns: String) {
    let store = &fixture.store;
    let key = format!("{ns}/chunk");
    let data: Vec<u8> = (0..6 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    store.put(&key, Bytes::from(data.clone())).await.unwrap();
    let back = store.get(&key).await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "large object came back different");
}

/// An encoded segment survives the store; a truncated read of it is caught by the codec.
pub async fn segment_through_store(fixture: &Fixture, ns: String) {
    let store = &fixture.store;
    let segment = Segment {
        trajectory: TrajectoryId {
            prompt: PromptId::from("conformance/prompt"),
            sample: 2,
        },
        seq: 4,
        version: 9,
        lease_epoch: 3,
        tokens: (0..512).collect(),
        logprobs: (0..512).map(|i| -(i as f32) / 100.0).collect(),
        finish: FinishReason::Length,
    };
    let key = format!("{ns}/seg");
    let bytes = codec::encode(&segment).unwrap();
    store.put(&key, bytes.clone()).await.unwrap();
    assert_eq!(
        codec::decode(&store.get(&key).await.unwrap()).unwrap(),
        segment
    );
    let cut = store
        .get_range(&key, 0..bytes.len() as u64 - 1)
        .await
        .unwrap();
    assert!(matches!(
        codec::decode(&cut),
        Err(CodecError::Truncated { .. })
    ));
}
