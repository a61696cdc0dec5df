//! `openai`: any OpenAI-compatible completions server (vLLM, SGLang, …) as an [`Engine`].
//!
//! # Request
//! `POST {base_url}/v1/completions` with
//! `{"model", "prompt": [prompt ids ++ committed ids], "max_tokens": S, "temperature",
//! "top_p", "logprobs": 0, "n": 1, "stream": false, "echo": false,
//! "return_token_ids": true, "return_tokens_as_token_ids": true, "skip_special_tokens": false,
//! "seed"?}` and then every key of `extra_body` (which may override any of these).
//! `logprobs: 0` asks for the sampled token's log-prob only; `return_token_ids` is vLLM ≥ 0.10.2,
//! `return_tokens_as_token_ids` older vLLM; servers ignore the flags they do not know.
//! With a sampling seed, each call gets `seed = f(seed, trajectory, committed length)`, so the
//! K samples of a group differ and a retried segment is resampled identically.
//!
//! # Response: exactly what is parsed from `choices[0]`
//! - sampled token ids: `token_ids` (an array of integers) when present and not null;
//!   otherwise `logprobs.tokens`, every entry of which must be a string `"token_id:<u32>"`.
//!   When both are present they must agree.
//! - log-probs: `logprobs.token_logprobs`, one number per token (null is an error; tiny
//!   positive rounding noise up to 1e-3 is clamped to 0).
//! - `finish_reason`: `"stop"` (end-of-sequence or a stop string) → [`FinishReason::Eos`];
//!   `"length"` → [`FinishReason::Length`] when the response cap is reached or the server
//!   stopped short of `max_tokens` (its context window is full: the trajectory cannot grow),
//!   otherwise [`FinishReason::None`]; `"abort"` → retryable [`EngineError::Unavailable`];
//!   anything else → [`EngineError::Protocol`].
//! - the policy version used: the `x-flywheel-policy-version` response header when the server
//!   (or a proxy in front of it) sets one, else the version asked for — the server is trusted
//!   to serve the weights the worker synchronised.
//!
//! Text is tokenised through vLLM's `POST {base_url}/tokenize` and detokenised through
//! `POST {base_url}/detokenize`.

use std::sync::Arc;

use async_trait::async_trait;
use flywheel_storage::FinishReason;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;

use super::{
    Engine, EngineError, SegmentOutput, SegmentRequest, acquire_slot, splitmix64, trajectory_key,
};
use crate::http::{HttpConfig, HttpFailure, post_json};

/// The response header through which a server may report the policy version it used.
pub const POLICY_VERSION_HEADER: &str = "x-flywheel-policy-version";

/// Configuration of the [`OpenAiEngine`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiConfig {
    /// The server's root, e.g. `http://127.0.0.1:8000` (without `/v1`).
    pub base_url: String,
    /// The served model name (`--served-model-name` in vLLM).
    pub model: String,
    /// Bearer token, when the server wants one.
    pub api_key: Option<String>,
    /// Requests in flight at once; the server batches them (continuous batching).
    pub slots: usize,
    /// Timeouts and retries of every request.
    pub http: HttpConfig,
    /// Extra top-level request fields, merged last (may override the defaults above).
    pub extra_body: Map<String, Value>,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "http://127.0.0.1:8000".to_owned(),
            model: "policy".to_owned(),
            api_key: None,
            slots: 256,
            http: HttpConfig::default(),
            extra_body: Map::new(),
        }
    }
}

/// An engine backed by an OpenAI-compatible completions server.
#[derive(Debug)]
pub struct OpenAiEngine {
    /// The validated configuration.
    config: OpenAiConfig,
    /// One client (one connection pool) for every request.
    client: reqwest::Client,
    /// `base_url` without a trailing slash.
    base: String,
    /// Bounds the requests in flight to `config.slots`.
    slots: Arc<Semaphore>,
}

impl OpenAiEngine {
    /// Validates `config` and builds the client (no request is sent yet).
    pub fn new(config: OpenAiConfig) -> Result<Self, EngineError> {
        let url = reqwest::Url::parse(&config.base_url).map_err(|e| {
            EngineError::Config(format!(
                "openai base_url `{}` is not a URL: {e}",
                config.base_url
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(EngineError::Config(format!(
                "openai base_url `{}` must be http:// or https://",
                config.base_url
            )));
        }
        if config.slots == 0 {
            return Err(EngineError::Config(
                "openai slots must be at least 1".to_owned(),
            ));
        }
        if config.model.is_empty() {
            return Err(EngineError::Config("openai model name is empty".to_owned()));
        }
        let client = config.http.client().map_err(EngineError::Config)?;
        Ok(OpenAiEngine {
            base: config.base_url.trim_end_matches('/').to_owned(),
            slots: Arc::new(Semaphore::new(config.slots)),
            client,
            config,
        })
    }

    /// POSTs to `{base}{path}` and decodes the JSON answer.
    async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<(reqwest::header::HeaderMap, T), EngineError> {
        let url = format!("{}{path}", self.base);
        let reply = post_json(
            &self.client,
            &self.config.http,
            &url,
            self.config.api_key.as_deref(),
            body,
        )
        .await
        .map_err(|failure| match failure {
            HttpFailure::Unavailable(message) => EngineError::Unavailable {
                engine: "openai".into(),
                message,
            },
            HttpFailure::Rejected { status, body } => EngineError::Rejected {
                engine: "openai".into(),
                status,
                message: format!("POST {url}: {body}"),
            },
        })?;
        let parsed = serde_json::from_slice(&reply.body).map_err(|e| EngineError::Protocol {
            engine: "openai".into(),
            message: format!("POST {url}: the response is not the expected JSON: {e}"),
        })?;
        Ok((reply.headers, parsed))
    }
}

/// The JSON body of a completions request for `req` (see the module docs): `stop` lists
/// token ids that end the sequence besides the server's own end-of-sequence.
pub(super) fn completion_body(
    model: &str,
    extra_body: &Map<String, Value>,
    req: &SegmentRequest,
    stop: &[u32],
) -> Value {
    let prompt: Vec<u32> = req
        .prompt
        .iter()
        .chain(req.committed.iter())
        .copied()
        .collect();
    let mut body = json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": req.max_new_tokens,
        "temperature": req.sampling.temperature,
        "top_p": req.sampling.top_p,
        "logprobs": 0,
        "n": 1,
        "stream": false,
        "echo": false,
        "return_token_ids": true,
        "return_tokens_as_token_ids": true,
        "skip_special_tokens": false,
    });
    let map = body.as_object_mut().expect("a JSON object literal");
    if req.sampling.top_k > 0 {
        map.insert("top_k".into(), json!(req.sampling.top_k));
    }
    if !stop.is_empty() {
        map.insert("stop_token_ids".into(), json!(stop));
    }
    if let Some(seed) = req.sampling.seed {
        map.insert("seed".to_owned(), json!(segment_seed(seed, req)));
    }
    for (k, v) in extra_body {
        map.insert(k.clone(), v.clone());
    }
    body
}

/// The seed of a segment: a fixed function of the base seed, the trajectory and its committed
/// length, so the K samples of a group differ and a retried segment is resampled identically.
/// Servers take a signed 64-bit seed: kept non-negative.
pub(super) fn segment_seed(seed: u64, req: &SegmentRequest) -> u64 {
    splitmix64(trajectory_key(seed, &req.trajectory) ^ req.committed.len() as u64) >> 1
}

/// The parts of a completions response that are read (see the module docs).
#[derive(Debug, Deserialize)]
pub(super) struct CompletionResponse {
    /// One choice per sample; `n` is 1, so only the first is read.
    pub(super) choices: Vec<Choice>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Choice {
    /// Sampled token ids (vLLM >= 0.10.2 with `return_token_ids`).
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
    /// The legacy completions log-probs object.
    #[serde(default)]
    logprobs: Option<ChoiceLogprobs>,
    /// `stop`, `length`, `abort`, …
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChoiceLogprobs {
    /// Sampled tokens; `"token_id:N"` with `return_tokens_as_token_ids`.
    #[serde(default)]
    tokens: Option<Vec<String>>,
    /// The log-prob of each sampled token.
    #[serde(default)]
    token_logprobs: Option<Vec<Option<f32>>>,
}

/// `"token_id:123"` → 123.
fn parse_token_string(s: &str) -> Option<u32> {
    s.strip_prefix("token_id:")?.parse().ok()
}

/// Turns a parsed response into a segment, per the rules of the module docs; `engine` names
/// the engine in errors.
pub(super) fn decode_choice(
    engine: &str,
    req: &SegmentRequest,
    choice: Choice,
    version: u64,
) -> Result<SegmentOutput, EngineError> {
    let protocol = |message: String| EngineError::Protocol {
        engine: engine.into(),
        message,
    };
    let logprobs = choice.logprobs.ok_or_else(|| {
        protocol("choices[0].logprobs is missing; the server must honour `logprobs: 0`".to_owned())
    })?;
    let from_strings = match &logprobs.tokens {
        Some(strings) => strings
            .iter()
            .map(|s| parse_token_string(s))
            .collect::<Option<Vec<u32>>>(),
        None => None,
    };
    let tokens = match (choice.token_ids, from_strings) {
        (Some(ids), Some(strings)) if ids != strings => {
            return Err(protocol(format!(
                "choices[0].token_ids {ids:?} disagree with logprobs.tokens {strings:?}"
            )));
        }
        (Some(ids), _) => ids,
        (None, Some(strings)) => strings,
        (None, None) => {
            return Err(protocol(
                "no sampled token ids: expected choices[0].token_ids (vLLM >= 0.10.2 with \
                 return_token_ids) or logprobs.tokens as \"token_id:N\" strings \
                 (return_tokens_as_token_ids)"
                    .to_owned(),
            ));
        }
    };
    let logprobs: Vec<f32> = logprobs
        .token_logprobs
        .ok_or_else(|| protocol("choices[0].logprobs.token_logprobs is missing".to_owned()))?
        .into_iter()
        .enumerate()
        .map(|(i, lp)| match lp {
            // Rounding noise can make a certain token's log-prob a hair above 0.
            Some(lp) if lp > 0.0 && lp <= 1e-3 => Ok(0.0),
            Some(lp) => Ok(lp),
            None => Err(protocol(format!("token_logprobs[{i}] is null"))),
        })
        .collect::<Result<_, _>>()?;
    let finish = match choice.finish_reason.as_deref() {
        Some("stop") => FinishReason::Eos,
        Some("length") if tokens.len() < req.max_new_tokens as usize => FinishReason::Length,
        Some("length") => req.finish_reason(tokens.len(), false),
        Some("abort") => {
            return Err(EngineError::Unavailable {
                engine: engine.into(),
                message: "the server aborted the request".to_owned(),
            });
        }
        other => return Err(protocol(format!("unexpected finish_reason {other:?}"))),
    };
    let out = SegmentOutput {
        tokens,
        logprobs,
        finish,
        version,
    };
    out.check(engine, req)?;
    Ok(out)
}

#[async_trait]
impl Engine for OpenAiEngine {
    fn name(&self) -> &str {
        "openai"
    }

    fn slots(&self) -> usize {
        self.config.slots
    }

    async fn generate(&self, req: SegmentRequest) -> Result<SegmentOutput, EngineError> {
        req.validate()?;
        let _permit = acquire_slot("openai", &self.slots).await?;
        let body = completion_body(&self.config.model, &self.config.extra_body, &req, &[]);
        let (headers, response): (_, CompletionResponse) =
            self.call("/v1/completions", &body).await?;
        let version = match headers.get(POLICY_VERSION_HEADER) {
            None => req.version,
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| EngineError::Protocol {
                    engine: "openai".into(),
                    message: format!(
                        "header {POLICY_VERSION_HEADER} is not a version number: {v:?}"
                    ),
                })?,
        };
        let choice = response
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| EngineError::Protocol {
                engine: "openai".into(),
                message: "the response has no choices".to_owned(),
            })?;
        decode_choice("openai", &req, choice, version)
    }

    async fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        #[derive(Deserialize)]
        struct Reply {
            tokens: Vec<u32>,
        }
        let body = json!({"model": self.config.model, "prompt": text, "add_special_tokens": true});
        let (_, reply): (_, Reply) = self.call("/tokenize", &body).await?;
        Ok(reply.tokens)
    }

    async fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError> {
        #[derive(Deserialize)]
        struct Reply {
            prompt: String,
        }
        let body = json!({"model": self.config.model, "tokens": tokens});
        let (_, reply): (_, Reply) = self.call("/detokenize", &body).await?;
        Ok(reply.prompt)
    }
}
