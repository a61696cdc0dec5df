//! JSON over HTTP with bounded timeouts and retries, shared by the engines that call servers
//! (`openai`, `vllm`, `sglang`) and the reward-service verifier.
//!
//! Retried: connection failures, timeouts, broken response bodies, HTTP 5xx and 429 (a rate
//! limit says "later", not "never"). Not retried: any other 4xx, which says the request is
//! wrong and would be refused again. Backoff doubles from `backoff_initial_ms` up to
//! `backoff_max_ms`, with jitter so that many workers do not retry in lockstep.

use std::time::Duration;

use flywheel_service::Backoff;
use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};

/// Timeouts and retries of one HTTP client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Time allowed to open a connection, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Time allowed for one whole attempt (send + receive), in milliseconds.
    pub request_timeout_ms: u64,
    /// Attempts in total, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Wait before the first retry, in milliseconds; doubled for each further one.
    pub backoff_initial_ms: u64,
    /// Longest wait between two attempts, in milliseconds.
    pub backoff_max_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            connect_timeout_ms: 5_000,
            request_timeout_ms: 300_000,
            max_attempts: 4,
            backoff_initial_ms: 200,
            backoff_max_ms: 5_000,
        }
    }
}

impl HttpConfig {
    /// Checks the values and builds a client with these timeouts (rustls; the usual
    /// `HTTPS_PROXY`/`NO_PROXY` environment variables apply).
    pub fn client(&self) -> Result<reqwest::Client, String> {
        if self.max_attempts == 0 {
            return Err("http max_attempts must be at least 1".to_owned());
        }
        if self.connect_timeout_ms == 0 || self.request_timeout_ms == 0 {
            return Err("http timeouts must be at least 1 ms".to_owned());
        }
        if self.backoff_initial_ms > self.backoff_max_ms {
            return Err(format!(
                "http backoff_initial_ms ({}) exceeds backoff_max_ms ({})",
                self.backoff_initial_ms, self.backoff_max_ms
            ));
        }
        reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(self.connect_timeout_ms))
            .timeout(Duration::from_millis(self.request_timeout_ms))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    }

    /// The waits between attempts.
    fn backoff(&self) -> Backoff {
        Backoff::new(
            Duration::from_millis(self.backoff_initial_ms),
            Duration::from_millis(self.backoff_max_ms),
        )
    }
}

/// Why a request did not produce a successful response.
#[derive(Debug)]
pub(crate) enum HttpFailure {
    /// Still failing transiently after every attempt; the message describes the last one.
    Unavailable(String),
    /// The server refused the request with a 4xx: retrying cannot help.
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The start of the response body, the server's explanation.
        body: String,
    },
}

/// A successful (2xx) response.
pub(crate) struct HttpReply {
    /// The response headers.
    pub headers: HeaderMap,
    /// The raw response body.
    pub body: Vec<u8>,
}

/// The first 512 characters of a body, for error messages.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match text.char_indices().nth(512) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.into_owned(),
    }
}

/// POSTs `body` as JSON to `url`, retrying transient failures as [`HttpConfig`] says.
pub(crate) async fn post_json(
    client: &reqwest::Client,
    config: &HttpConfig,
    url: &str,
    bearer: Option<&str>,
    body: &serde_json::Value,
) -> Result<HttpReply, HttpFailure> {
    request_json(client, config, url, bearer, Some(body)).await
}

/// GETs `url`, retrying transient failures as [`HttpConfig`] says.
pub(crate) async fn get(
    client: &reqwest::Client,
    config: &HttpConfig,
    url: &str,
    bearer: Option<&str>,
) -> Result<HttpReply, HttpFailure> {
    request_json(client, config, url, bearer, None).await
}

/// A POST of `body` (a GET without one), with the retries of [`HttpConfig`].
async fn request_json(
    client: &reqwest::Client,
    config: &HttpConfig,
    url: &str,
    bearer: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Result<HttpReply, HttpFailure> {
    let method = if body.is_some() { "POST" } else { "GET" };
    let mut attempt = 1;
    loop {
        let last_error = match try_once(client, url, bearer, body).await {
            Ok(reply) => return Ok(reply),
            Err(Attempt::Fatal(failure)) => return Err(failure),
            Err(Attempt::Transient(message)) => message,
        };
        if attempt >= config.max_attempts {
            return Err(HttpFailure::Unavailable(format!(
                "{method} {url}: {last_error} (gave up after {attempt} attempt(s))"
            )));
        }
        let wait = config.backoff().delay(attempt);
        tracing::debug!(url, attempt, error = %last_error, ?wait, "retrying HTTP request");
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

/// The outcome of one failed attempt.
enum Attempt {
    /// Worth another try; the message says what went wrong.
    Transient(String),
    /// Final: hand this failure to the caller.
    Fatal(HttpFailure),
}

async fn try_once(
    client: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Result<HttpReply, Attempt> {
    let mut request = match body {
        Some(body) => client.post(url).json(body),
        None => client.get(url),
    };
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| Attempt::Transient(describe(&e)))?;
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| Attempt::Transient(describe(&e)))?;
    if status.is_success() {
        return Ok(HttpReply {
            headers,
            body: bytes.to_vec(),
        });
    }
    if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        return Err(Attempt::Transient(format!(
            "HTTP {status}: {}",
            excerpt(&bytes)
        )));
    }
    Err(Attempt::Fatal(HttpFailure::Rejected {
        status: status.as_u16(),
        body: excerpt(&bytes),
    }))
}

/// A reqwest error in words a person can act on.
fn describe(e: &reqwest::Error) -> String {
    // reqwest's own message omits the cause; walk the chain so the reason is visible.
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    if e.is_timeout() {
        format!("timed out ({chain})")
    } else if e.is_connect() {
        format!("cannot connect ({chain}); is the server running and the URL right?")
    } else {
        chain
    }
}
