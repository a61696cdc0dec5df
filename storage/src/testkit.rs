//! Test support for the workspace's tests (feature `testsuite`): where the real services
//! are, a check that fails (never skips) when one is unreachable, bounded waits, and
//! builders of prompts and run ids.
//!
//! The services are those `scripts/services.sh` starts; each address can be pointed
//! elsewhere with its variable.

use std::future::Future;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::types::{Prompt, PromptId, PromptInput, TrajectoryId, VerifierSpec};

/// Variable naming the Redis server the tests use.
pub const REDIS_URL_ENV: &str = "FLYWHEEL_TEST_REDIS_URL";
/// Variable naming the PostgreSQL server the tests use.
pub const POSTGRES_URL_ENV: &str = "FLYWHEEL_TEST_POSTGRES_URL";
/// Variable naming the Kafka brokers the tests use.
pub const KAFKA_BROKERS_ENV: &str = "FLYWHEEL_TEST_KAFKA_BROKERS";
/// Variable naming the S3 endpoint the tests use.
pub const S3_ENDPOINT_ENV: &str = "FLYWHEEL_TEST_S3_ENDPOINT";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// The Redis URL of the tests.
pub fn redis_url() -> String {
    env_or(REDIS_URL_ENV, "redis://127.0.0.1:6379")
}

/// The PostgreSQL URL of the tests.
pub fn postgres_url() -> String {
    env_or(
        POSTGRES_URL_ENV,
        "postgres://postgres@127.0.0.1:5432/postgres",
    )
}

/// A state store of run `run` on the tests' Redis, initialised as the run's first leader
/// would ([`StateStore::mark_initialised`](crate::state::StateStore::mark_initialised)); fails
/// the test, naming Redis, when it is unreachable.
pub async fn redis_state(run: &str) -> crate::state::RedisStateStore {
    use crate::state::StateStore;
    let store = redis_connect(run).await;
    store.mark_initialised().await.unwrap();
    store
}

/// A handle on run `run`'s state on the tests' Redis, as another process joining the run
/// opens it (nothing written); fails the test, naming Redis, when it is unreachable.
pub async fn redis_connect(run: &str) -> crate::state::RedisStateStore {
    let url = redis_url();
    crate::state::RedisStateStore::connect(&url, run)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "Redis at {url} ({REDIS_URL_ENV}) is unreachable: {e}. Start it with \
                 scripts/services.sh."
            )
        })
}

/// The Kafka bootstrap servers of the tests, after checking the first one answers.
pub fn kafka_brokers() -> String {
    let brokers = env_or(KAFKA_BROKERS_ENV, "127.0.0.1:9092");
    let first = brokers.split(',').next().unwrap_or_default();
    require("Kafka", KAFKA_BROKERS_ENV, first);
    brokers
}

/// The S3-compatible server of the tests and its credentials.
#[derive(Clone, Debug)]
pub struct S3Server {
    /// `http://host:port`.
    pub endpoint: String,
    /// The bucket the tests write to.
    pub bucket: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
}

impl S3Server {
    /// The server named by the environment (`FLYWHEEL_TEST_S3_*`), after checking it answers.
    pub fn from_env() -> S3Server {
        let s3 = S3Server {
            endpoint: env_or(S3_ENDPOINT_ENV, "http://127.0.0.1:8014"),
            bucket: env_or("FLYWHEEL_TEST_S3_BUCKET", "flywheel-test"),
            access_key: env_or("FLYWHEEL_TEST_S3_ACCESS_KEY", "flywheel"),
            secret_key: env_or("FLYWHEEL_TEST_S3_SECRET_KEY", "flywheel-secret"),
        };
        require_url("S3 (s3s-fs)", S3_ENDPOINT_ENV, &s3.endpoint);
        s3
    }

    /// A blob URL under `prefix` of the test bucket, with the endpoint and credentials as
    /// query parameters (so nothing depends on, or changes, the process environment).
    pub fn url(&self, prefix: &str) -> String {
        let mut url = url::Url::parse(&format!("s3://{}/{prefix}", self.bucket))
            .expect("a bucket and prefix make a URL");
        url.query_pairs_mut()
            .append_pair("endpoint", &self.endpoint)
            .append_pair("region", "us-east-1")
            .append_pair("access_key_id", &self.access_key)
            .append_pair("secret_access_key", &self.secret_key);
        url.to_string()
    }
}

/// Fails the test unless `addr` (`host:port`) accepts a TCP connection, naming the service,
/// its variable and how to start it.
pub fn require(service: &str, var: &str, addr: &str) {
    let reachable = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)).ok())
        .is_some();
    assert!(
        reachable,
        "{service} at {addr} ({var}) is unreachable: start it with scripts/services.sh or point \
         {var} at a running server"
    );
}

/// [`require`] for a service named by URL (`redis://…`, `postgres://…`, `http://…`).
pub fn require_url(service: &str, var: &str, url: &str) {
    let parsed = url::Url::parse(url).unwrap_or_else(|e| panic!("{var}={url} is not a URL: {e}"));
    let addr = format!(
        "{}:{}",
        parsed.host_str().unwrap_or("127.0.0.1"),
        parsed.port_or_known_default().unwrap_or(80)
    );
    require(service, var, &addr);
}

/// Polls `check` every 20 ms until it holds; panics naming `what` once `deadline` passed.
pub async fn wait_for<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The committed segments of trajectory `id`, read back from `blobs` and checked against
/// their index entries.
pub async fn committed_segments(
    state: &dyn crate::state::StateStore,
    blobs: &crate::blob::BlobStore,
    id: &TrajectoryId,
) -> Vec<(crate::SegmentRef, crate::Segment)> {
    let t = state
        .trajectory(id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{id} is registered"));
    let mut out = Vec::new();
    for r in t.segments {
        let s = crate::codec::decode(&blobs.get(&r.key).await.unwrap()).unwrap();
        assert_eq!((s.seq, s.tokens.len()), (r.seq, r.tokens as usize), "{id}");
        out.push((r, s));
    }
    out
}

/// A run id no other test (process, or call in this process) uses, starting with `label`.
pub fn unique_id(label: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{label}-{}-{:x}-{n}", std::process::id(), nanos % (1 << 40))
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A text prompt `id` with `k` samples and an exact-match answer.
pub fn prompt(id: &str, k: u32) -> Prompt {
    Prompt {
        id: PromptId(id.to_owned()),
        input: PromptInput::Text(format!("What is {id}?")),
        verifier: VerifierSpec::ExactMatch {
            answer: "42".into(),
        },
        group_size: k,
        metadata: [("source".to_owned(), "test".to_owned())].into(),
    }
}

/// The trajectory (`prompt`, `sample`).
pub fn trajectory(prompt: &str, sample: u32) -> TrajectoryId {
    TrajectoryId {
        prompt: PromptId(prompt.to_owned()),
        sample,
    }
}
