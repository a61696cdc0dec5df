//! `vllm` and `sglang`: inference servers the worker keeps in step with the policy version it
//! generates under (DESIGN.md §6.5).
//!
//! # Weight sync
//! A segment asks for version v. Before a server generates for v, the engine makes it load v:
//! 1. v is written as a Hugging Face directory `weights_dir/v{v:010}` ([`crate::hf_dir`]),
//!    fetched from the run's object store incrementally (only the chunks that changed since
//!    the version written before) and renamed into place once complete; the `keep_versions`
//!    newest directories stay. The servers must see `weights_dir` at the same path (a shared
//!    volume).
//! 2. The server loads it:
//!    - SGLang: `POST /update_weights_from_disk {model_path, weight_version: "v",
//!      abort_all_requests, flush_cache: true}`, answered `{success, message}` (200, or 400 when
//!      it refuses);
//!    - vLLM (its dev-mode routes, `VLLM_SERVER_DEV_MODE=1`; written against vLLM 0.11–0.13):
//!      `POST /pause?mode=abort|wait` → `POST /collective_rpc {method: reload_method, kwargs:
//!      {weights_path}}` → `POST /reset_prefix_cache` → `POST /update_weight_version
//!      {new_version: "v"}` → `POST /resume` (resumed whatever happened in between).
//! 3. The engine reads back the version the server reports (SGLang `GET /get_weight_version`,
//!    vLLM `GET /weight_info`, both `{"weight_version": "v"}`). Only a server that reports v is
//!    used for v. A server that refuses v, or reports another version, is not asked to load v
//!    again; one that times out or cannot be reached is marked down.
//!
//! # Which version generated a segment
//! SGLang reports it in every response (`meta_info.weight_version`): the segment records that
//! (a response from a server whose version is not one of the run's, after a restart with its
//! initial weights, is discarded and the server synced again). vLLM's completions carry no
//! version: the engine sends nothing to a server while it reloads, and the pause aborts (or
//! waits out) the requests in flight, so a response comes from the version the server
//! reported after its last reload.
//!
//! # Several servers
//! Segments go round-robin to the servers that are up and synced to their version (syncing
//! one when needed). Every `health_interval_ms` each server is checked (`GET /health`) and its
//! reported version read: a server that is down, or reports a version other than the one it
//! was synced to (it restarted with its initial weights), is synced again before its next
//! use. A server that fails mid-segment costs that attempt only: it is marked down and the
//! segment goes to the next server. When no server can take a segment, it waits up to
//! `server_wait_ms` for one to come back, then fails (retryably: the trajectory is tried
//! again later).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use flywheel_model::{TextCodec, Tokenizer};
use flywheel_storage::blob::BlobStore;
use flywheel_storage::weights::{self, WeightsConfig};
use flywheel_storage::{FinishReason, PolicyVersion};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::{Mutex, Semaphore};
use tracing::{info, warn};

use super::openai::{CompletionResponse, completion_body, decode_choice, segment_seed};
use super::{
    Engine, EngineError, EngineLimits, SegmentOutput, SegmentRequest, acquire_slot, run_limits,
};
use crate::hf_dir::{ExportText, HfExporter};
use crate::http::{HttpConfig, HttpFailure, HttpReply, get, post_json};

/// Which server protocol a [`RemoteEngine`] speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// vLLM: `/v1/completions`, reloads through its dev-mode routes.
    Vllm,
    /// SGLang: its native `/generate`, reloads with `/update_weights_from_disk`.
    Sglang,
}

impl ServerKind {
    fn name(self) -> &'static str {
        match self {
            ServerKind::Vllm => "vllm",
            ServerKind::Sglang => "sglang",
        }
    }
}

/// Settings of the `vllm` and `sglang` engines (`[worker.engine]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteConfig {
    /// The servers' roots, e.g. `http://127.0.0.1:8000` (without `/v1`).
    pub servers: Vec<String>,
    /// vLLM: the served model name (`--served-model-name`). SGLang ignores it.
    pub model: String,
    /// Bearer token, when the servers want one (vLLM `--api-key`; it guards `/v1` only).
    pub api_key: Option<String>,
    /// Segment requests in flight at once over all servers (they batch them).
    pub slots: usize,
    /// The Hugging Face checkpoint the run trains: its tokenizer reads prompts and writes
    /// responses, and its tokenizer files go with every version. Empty takes `[trainer]
    /// hf_model`; a built-in model uses `charset`.
    pub hf_model: String,
    /// The built-in model's characters (with no `hf_model`).
    pub charset: String,
    /// Where versions are written for the servers to load (the servers see the same path).
    pub weights_dir: String,
    /// Version directories kept in `weights_dir`, the newest.
    pub keep_versions: usize,
    /// Chunking and concurrency of the weight fetches.
    pub weights: WeightsConfig,
    /// How long a segment waits for its version to be published, in ms.
    pub weights_wait_ms: u64,
    /// Timeouts and retries of the generation requests (per server).
    pub http: HttpConfig,
    /// Time a server may take to load a version (each sync request), in ms.
    pub sync_timeout_ms: u64,
    /// How often each server is checked, in ms.
    pub health_interval_ms: u64,
    /// How long a segment waits for a server to come back when none can take it, in ms.
    pub server_wait_ms: u64,
    /// Abort the requests in flight when a server loads a version (SGLang
    /// `abort_all_requests`; vLLM `/pause?mode=abort`), instead of letting them finish first
    /// (vLLM `mode=wait`).
    pub abort_in_flight: bool,
    /// vLLM: the worker method `/collective_rpc` calls to reload from a directory, with the
    /// keyword argument `weights_path` (its name and signature vary with vLLM's version).
    pub reload_method: String,
    /// Extra top-level fields of every generation request (may override the defaults).
    pub extra_body: Map<String, Value>,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            servers: vec!["http://127.0.0.1:8000".into()],
            model: "policy".into(),
            api_key: None,
            slots: 256,
            hf_model: String::new(),
            charset: Tokenizer::ARITHMETIC_CHARSET.to_owned(),
            weights_dir: "/weights".into(),
            keep_versions: 2,
            weights: WeightsConfig::default(),
            weights_wait_ms: 600_000,
            http: HttpConfig {
                max_attempts: 2,
                ..HttpConfig::default()
            },
            sync_timeout_ms: 600_000,
            health_interval_ms: 2_000,
            server_wait_ms: 120_000,
            abort_in_flight: true,
            reload_method: "reload_weights".into(),
            extra_body: Map::new(),
        }
    }
}

/// One server and what the engine knows of it.
struct Server {
    base: String,
    state: Mutex<ServerState>,
}

#[derive(Debug)]
struct ServerState {
    /// Reachable at the last check or request.
    up: bool,
    /// The version it reported after the engine's last sync.
    synced: Option<PolicyVersion>,
    /// A version it refused (or loaded as something else): not asked again.
    refused: Option<(PolicyVersion, String)>,
}

/// Why a server cannot serve a version now.
enum Unready {
    /// Down or failing: may come back.
    Down(String),
    /// It refused the version: will not serve it.
    Refused(String),
}

/// Version directories written for the servers.
struct Written {
    exporter: HfExporter,
    /// Versions on disk, oldest first.
    versions: Vec<PolicyVersion>,
}

/// A `vllm` or `sglang` engine over one or more servers (see the module docs).
pub struct RemoteEngine {
    kind: ServerKind,
    config: RemoteConfig,
    /// Generation requests.
    client: reqwest::Client,
    /// Sync requests (the long timeout).
    sync_client: reqwest::Client,
    /// The sync requests' HTTP settings (one attempt: a reload is not blindly repeated).
    sync_http: HttpConfig,
    servers: Arc<Vec<Server>>,
    written: Mutex<Written>,
    blobs: BlobStore,
    run: String,
    tokenizer: TextCodec,
    permits: Semaphore,
    next: AtomicUsize,
    /// The model's vocabulary and context, read once.
    limits: tokio::sync::OnceCell<EngineLimits>,
    /// The health checks; stopped with the engine.
    health: tokio::task::JoinHandle<()>,
}

impl Drop for RemoteEngine {
    fn drop(&mut self) {
        self.health.abort();
    }
}

impl RemoteEngine {
    /// Validates `config` and starts the health checks (no server is contacted before).
    pub fn new(
        kind: ServerKind,
        blobs: BlobStore,
        run: &str,
        config: RemoteConfig,
    ) -> Result<Self, EngineError> {
        let name = kind.name();
        let bad = |m: String| Err(EngineError::Config(format!("{name} engine: {m}")));
        if config.servers.is_empty() {
            return bad("`servers` is empty: list the servers' URLs".into());
        }
        for url in &config.servers {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => return bad(format!("server `{url}` is not an http(s) URL")),
            }
        }
        if config.slots == 0 || config.keep_versions == 0 || config.health_interval_ms == 0 {
            return bad("slots, keep_versions and health_interval_ms must be at least 1".into());
        }
        if config.weights_dir.is_empty() {
            return bad("`weights_dir` is empty: name a directory the servers can read".into());
        }
        let client = config.http.client().map_err(EngineError::Config)?;
        let sync_http = HttpConfig {
            request_timeout_ms: config.sync_timeout_ms,
            max_attempts: 1,
            ..config.http.clone()
        };
        let sync_client = sync_http.client().map_err(EngineError::Config)?;
        let tokenizer = TextCodec::open(&config.hf_model, &config.charset)
            .map_err(|e| EngineError::Config(format!("{name} engine: {e}")))?;
        let text = ExportText {
            checkpoint: (!config.hf_model.is_empty()).then(|| PathBuf::from(&config.hf_model)),
            charset: config.charset.clone(),
        };
        let exporter = HfExporter::new(blobs.clone(), run, text, config.weights.clone());
        let servers: Arc<Vec<Server>> = Arc::new(
            config
                .servers
                .iter()
                .map(|url| Server {
                    base: url.trim_end_matches('/').to_owned(),
                    state: Mutex::new(ServerState {
                        up: true,
                        synced: None,
                        refused: None,
                    }),
                })
                .collect(),
        );
        let health = tokio::spawn(check_health(
            kind,
            servers.clone(),
            client.clone(),
            config.clone(),
        ));
        Ok(RemoteEngine {
            kind,
            permits: Semaphore::new(config.slots),
            written: Mutex::new(Written {
                exporter,
                versions: Vec::new(),
            }),
            config,
            client,
            sync_client,
            sync_http,
            servers,
            blobs,
            run: run.to_owned(),
            tokenizer,
            next: AtomicUsize::new(0),
            limits: tokio::sync::OnceCell::new(),
            health,
        })
    }

    fn unavailable(&self, message: String) -> EngineError {
        EngineError::Unavailable {
            engine: self.kind.name().to_owned(),
            message,
        }
    }

    /// `version` as a directory the servers can load (written if it is not there yet).
    async fn materialize(&self, version: PolicyVersion) -> Result<PathBuf, EngineError> {
        let dir = Path::new(&self.config.weights_dir).join(format!("v{version:010}"));
        let mut written = self.written.lock().await;
        if dir.join("config.json").is_file() {
            return Ok(dir);
        }
        self.wait_published(version).await?;
        std::fs::create_dir_all(&self.config.weights_dir).map_err(|e| {
            EngineError::Config(format!(
                "{} engine: cannot create weights_dir {}: {e}",
                self.kind.name(),
                self.config.weights_dir
            ))
        })?;
        let fetched = written
            .exporter
            .write_atomically(version, &dir)
            .await
            .map_err(|e| self.unavailable(format!("writing version {version}: {e}")))?;
        info!(version, dir = %dir.display(), bytes_fetched = fetched, "weights written for the servers");
        written.versions.push(version);
        written.versions.sort_unstable();
        while written.versions.len() > self.config.keep_versions {
            let old = written.versions.remove(0);
            let old_dir = Path::new(&self.config.weights_dir).join(format!("v{old:010}"));
            if let Err(e) = std::fs::remove_dir_all(&old_dir) {
                warn!(dir = %old_dir.display(), error = %e, "cannot delete an old version's directory");
            }
        }
        Ok(dir)
    }

    /// Waits (bounded by `weights_wait_ms`) until `version` is published.
    async fn wait_published(&self, version: PolicyVersion) -> Result<(), EngineError> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.config.weights_wait_ms);
        loop {
            match weights::exists(&self.blobs, &self.run, version).await {
                Ok(true) => return Ok(()),
                Ok(false) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(false) => {
                    return Err(self.unavailable(format!(
                        "weights version {version} of run `{}` are not published after {} ms",
                        self.run, self.config.weights_wait_ms
                    )));
                }
                Err(e) => return Err(self.unavailable(e.to_string())),
            }
        }
    }

    /// Makes `server` serve `version`, syncing it if needed.
    async fn ready(&self, server: &Server, version: PolicyVersion) -> Result<(), Unready> {
        let mut state = server.state.lock().await;
        if !state.up {
            return Err(Unready::Down("down since its last check".into()));
        }
        if state.synced == Some(version) {
            return Ok(());
        }
        if let Some((v, why)) = &state.refused
            && *v == version
        {
            return Err(Unready::Refused(why.clone()));
        }
        state.synced = None;
        let dir = self
            .materialize(version)
            .await
            .map_err(|e| Unready::Down(e.to_string()))?;
        info!(server = %server.base, version, "loading a version");
        let loaded = match self.kind {
            ServerKind::Sglang => self.load_sglang(server, version, &dir).await,
            ServerKind::Vllm => self.load_vllm(server, version, &dir).await,
        };
        let checked = match loaded {
            Ok(()) => match reported_version(self.kind, &self.client, &self.config, server).await {
                Ok(Some(v)) if v == version => Ok(()),
                Ok(reported) => Err(Unready::Refused(format!(
                    "it loaded version {version} but reports {reported:?}"
                ))),
                Err(why) => Err(Unready::Down(why)),
            },
            Err(e) => Err(e),
        };
        match checked {
            Ok(()) => {
                info!(server = %server.base, version, "server serves the version");
                state.synced = Some(version);
                state.refused = None;
                Ok(())
            }
            Err(Unready::Refused(why)) => {
                warn!(server = %server.base, version, %why, "server did not take the version; it is not used for it");
                state.refused = Some((version, why.clone()));
                Err(Unready::Refused(why))
            }
            Err(Unready::Down(why)) => {
                warn!(server = %server.base, version, %why, "server failed while loading a version; marked down");
                state.up = false;
                Err(Unready::Down(why))
            }
        }
    }

    /// SGLang's reload from disk.
    async fn load_sglang(
        &self,
        server: &Server,
        version: PolicyVersion,
        dir: &Path,
    ) -> Result<(), Unready> {
        let body = json!({
            "model_path": dir,
            "weight_version": version.to_string(),
            "abort_all_requests": self.config.abort_in_flight,
            "flush_cache": true,
        });
        let url = format!("{}/update_weights_from_disk", server.base);
        match self.post_sync(&url, &body).await {
            Ok(reply) => {
                let answer: Value = serde_json::from_slice(&reply.body).unwrap_or_default();
                if answer["success"] == Value::Bool(true) {
                    Ok(())
                } else {
                    Err(Unready::Refused(format!("POST {url}: {answer}")))
                }
            }
            Err(HttpFailure::Rejected { status, body }) => Err(Unready::Refused(format!(
                "POST {url}: HTTP {status}: {body}"
            ))),
            Err(HttpFailure::Unavailable(why)) => Err(Unready::Down(why)),
        }
    }

    /// vLLM's reload through its dev-mode routes; resumes whatever happened after the pause.
    async fn load_vllm(
        &self,
        server: &Server,
        version: PolicyVersion,
        dir: &Path,
    ) -> Result<(), Unready> {
        let mode = if self.config.abort_in_flight {
            "abort"
        } else {
            "wait"
        };
        let base = &server.base;
        self.vllm_step(&format!("{base}/pause?mode={mode}"), &json!({}))
            .await?;
        let steps = async {
            let reload = json!({
                "method": self.config.reload_method,
                "kwargs": {"weights_path": dir},
            });
            self.vllm_step(&format!("{base}/collective_rpc"), &reload)
                .await?;
            self.vllm_step(&format!("{base}/reset_prefix_cache"), &json!({}))
                .await?;
            let label = json!({"new_version": version.to_string()});
            self.vllm_step(&format!("{base}/update_weight_version"), &label)
                .await
        };
        let result = steps.await;
        let resumed = self.vllm_step(&format!("{base}/resume"), &json!({})).await;
        result.and(resumed)
    }

    async fn vllm_step(&self, url: &str, body: &Value) -> Result<(), Unready> {
        match self.post_sync(url, body).await {
            Ok(_) => Ok(()),
            Err(HttpFailure::Rejected { status, body }) => Err(Unready::Refused(format!(
                "POST {url}: HTTP {status}: {body}"
            ))),
            Err(HttpFailure::Unavailable(why)) => Err(Unready::Down(why)),
        }
    }

    async fn post_sync(&self, url: &str, body: &Value) -> Result<HttpReply, HttpFailure> {
        post_json(
            &self.sync_client,
            &self.sync_http,
            url,
            self.config.api_key.as_deref(),
            body,
        )
        .await
    }

    /// One generation request to `server`, which serves `version`.
    async fn generate_on(
        &self,
        server: &Server,
        version: PolicyVersion,
        req: &SegmentRequest,
    ) -> Result<SegmentOutput, EngineError> {
        let name = self.kind.name();
        let stop = self.tokenizer.stop_tokens();
        let (path, body) = match self.kind {
            ServerKind::Vllm => (
                "/v1/completions",
                completion_body(&self.config.model, &self.config.extra_body, req, stop),
            ),
            ServerKind::Sglang => ("/generate", self.sglang_body(req, stop)),
        };
        let url = format!("{}{path}", server.base);
        let reply = post_json(
            &self.client,
            &self.config.http,
            &url,
            self.config.api_key.as_deref(),
            &body,
        )
        .await
        .map_err(|failure| match failure {
            HttpFailure::Unavailable(message) => self.unavailable(message),
            HttpFailure::Rejected { status, body } => EngineError::Rejected {
                engine: name.into(),
                status,
                message: format!("POST {url}: {body}"),
            },
        })?;
        let protocol = |message: String| EngineError::Protocol {
            engine: name.into(),
            message: format!("POST {url}: {message}"),
        };
        match self.kind {
            ServerKind::Vllm => {
                let response: CompletionResponse = serde_json::from_slice(&reply.body)
                    .map_err(|e| protocol(format!("not a completions response: {e}")))?;
                let choice = response
                    .choices
                    .into_iter()
                    .next()
                    .ok_or_else(|| protocol("no choices".into()))?;
                decode_choice(name, req, choice, version)
            }
            ServerKind::Sglang => {
                let response: SglangResponse = serde_json::from_slice(&reply.body)
                    .map_err(|e| protocol(format!("not a /generate response: {e}")))?;
                let served = response.meta_info.weight_version.as_deref();
                let Some(served) = served.and_then(|v| v.parse::<PolicyVersion>().ok()) else {
                    // Not one of the run's versions: it restarted with its initial weights.
                    server.state.lock().await.synced = None;
                    return Err(self.unavailable(format!(
                        "{} serves weight version {served:?}, not one of the run's; syncing it \
                         again",
                        server.base
                    )));
                };
                decode_sglang(name, req, response.meta_info, served)
            }
        }
    }

    /// The body of an SGLang `/generate` request.
    fn sglang_body(&self, req: &SegmentRequest, stop: &[u32]) -> Value {
        let input_ids: Vec<u32> = req
            .prompt
            .iter()
            .chain(req.committed.iter())
            .copied()
            .collect();
        let mut sampling = json!({
            "max_new_tokens": req.max_new_tokens,
            "temperature": req.sampling.temperature,
            "top_p": req.sampling.top_p,
            // SGLang's "no top-k" is -1.
            "top_k": if req.sampling.top_k > 0 { req.sampling.top_k as i64 } else { -1 },
            "stop_token_ids": stop,
            "skip_special_tokens": false,
            "no_stop_trim": true,
        });
        if let Some(seed) = req.sampling.seed {
            sampling["sampling_seed"] = json!(segment_seed(seed, req));
        }
        let mut body = json!({
            "input_ids": input_ids,
            "sampling_params": sampling,
            "return_logprob": true,
            "logprob_start_len": -1,
            "stream": false,
        });
        let map = body.as_object_mut().expect("a JSON object literal");
        for (k, v) in &self.config.extra_body {
            map.insert(k.clone(), v.clone());
        }
        body
    }
}

/// The parts of an SGLang `/generate` response that are read.
#[derive(Debug, Deserialize)]
struct SglangResponse {
    meta_info: SglangMeta,
}

#[derive(Debug, Deserialize)]
struct SglangMeta {
    /// `[[logprob, token_id, token_text], …]`, one per generated token.
    #[serde(default)]
    output_token_logprobs: Option<Vec<Vec<Value>>>,
    /// `{"type": "stop" | "length" | "abort", …}`.
    #[serde(default)]
    finish_reason: Option<Value>,
    /// The version of the weights that generated it.
    #[serde(default)]
    weight_version: Option<String>,
}

/// Turns an SGLang answer into a segment generated by `version`.
fn decode_sglang(
    name: &str,
    req: &SegmentRequest,
    meta: SglangMeta,
    version: PolicyVersion,
) -> Result<SegmentOutput, EngineError> {
    let protocol = |message: String| EngineError::Protocol {
        engine: name.into(),
        message,
    };
    let entries = meta.output_token_logprobs.ok_or_else(|| {
        protocol("meta_info.output_token_logprobs is missing: send return_logprob".into())
    })?;
    let mut tokens = Vec::with_capacity(entries.len());
    let mut logprobs = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let (Some(lp), Some(id)) = (
            entry.first().and_then(Value::as_f64),
            entry.get(1).and_then(Value::as_u64),
        ) else {
            return Err(protocol(format!(
                "output_token_logprobs[{i}] is {entry:?}, not [logprob, token_id, …]"
            )));
        };
        let id = u32::try_from(id)
            .map_err(|_| protocol(format!("output_token_logprobs[{i}]: token id {id}")))?;
        tokens.push(id);
        // Rounding noise can make a certain token's log-prob a hair above 0.
        let lp = lp as f32;
        logprobs.push(if lp > 0.0 && lp <= 1e-3 { 0.0 } else { lp });
    }
    let kind = meta
        .finish_reason
        .as_ref()
        .and_then(|f| f.get("type"))
        .and_then(Value::as_str);
    let finish = match kind {
        Some("stop") => FinishReason::Eos,
        Some("length") if tokens.len() < req.max_new_tokens as usize => FinishReason::Length,
        Some("length") => req.finish_reason(tokens.len(), false),
        Some("abort") => {
            return Err(EngineError::Unavailable {
                engine: name.into(),
                message: "the server aborted the request".into(),
            });
        }
        _ => {
            return Err(protocol(format!(
                "unexpected finish_reason {:?}",
                meta.finish_reason
            )));
        }
    };
    let out = SegmentOutput {
        tokens,
        logprobs,
        finish,
        version,
    };
    out.check(name, req)?;
    Ok(out)
}

/// The weight version a server reports (`None` when it is not a number: not one of the
/// run's).
async fn reported_version(
    kind: ServerKind,
    client: &reqwest::Client,
    config: &RemoteConfig,
    server: &Server,
) -> Result<Option<PolicyVersion>, String> {
    let path = match kind {
        ServerKind::Sglang => "/get_weight_version",
        ServerKind::Vllm => "/weight_info",
    };
    let url = format!("{}{path}", server.base);
    let reply = get(client, &config.http, &url, config.api_key.as_deref())
        .await
        .map_err(|f| match f {
            HttpFailure::Unavailable(why) => why,
            HttpFailure::Rejected { status, body } => format!("GET {url}: HTTP {status}: {body}"),
        })?;
    let answer: Value =
        serde_json::from_slice(&reply.body).map_err(|e| format!("GET {url}: not JSON: {e}"))?;
    Ok(match &answer["weight_version"] {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    })
}

/// The health checks (module docs): every `health_interval_ms`, each server's `/health` and
/// reported version. A server busy loading a version is left alone.
async fn check_health(
    kind: ServerKind,
    servers: Arc<Vec<Server>>,
    client: reqwest::Client,
    config: RemoteConfig,
) {
    let check = HttpConfig {
        max_attempts: 1,
        request_timeout_ms: config.health_interval_ms.max(1_000),
        ..config.http.clone()
    };
    let config = RemoteConfig {
        http: check.clone(),
        ..config
    };
    loop {
        tokio::time::sleep(Duration::from_millis(config.health_interval_ms)).await;
        for server in servers.iter() {
            let healthy = get(
                &client,
                &check,
                &format!("{}/health", server.base),
                config.api_key.as_deref(),
            )
            .await
            .is_ok();
            let reported = if healthy {
                reported_version(kind, &client, &config, server).await.ok()
            } else {
                None
            };
            let Ok(mut state) = server.state.try_lock() else {
                continue;
            };
            match (healthy, state.up) {
                (true, false) => {
                    info!(server = %server.base, "server is back; it is synced again before use")
                }
                (false, true) => warn!(server = %server.base, "server is down"),
                _ => {}
            }
            if !healthy {
                state.synced = None;
            }
            if let (Some(synced), Some(reported)) = (state.synced, reported)
                && reported != Some(synced)
            {
                warn!(server = %server.base, synced, ?reported, "server reports another version (restarted?); it is synced again before use");
                state.synced = None;
            }
            state.up = healthy;
        }
    }
}

#[async_trait]
impl Engine for RemoteEngine {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn slots(&self) -> usize {
        self.config.slots
    }

    async fn generate(&self, req: SegmentRequest) -> Result<SegmentOutput, EngineError> {
        req.validate()?;
        let _permit = acquire_slot(self.kind.name(), &self.permits).await?;
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.config.server_wait_ms);
        let n = self.servers.len();
        loop {
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            let mut why = BTreeMap::new();
            let mut may_come_back = false;
            for i in 0..n {
                let server = &self.servers[(start + i) % n];
                match self.ready(server, req.version).await {
                    Ok(()) => {}
                    Err(Unready::Down(w)) => {
                        may_come_back = true;
                        why.insert(server.base.clone(), w);
                        continue;
                    }
                    Err(Unready::Refused(w)) => {
                        why.insert(server.base.clone(), format!("refused: {w}"));
                        continue;
                    }
                }
                match self.generate_on(server, req.version, &req).await {
                    Ok(out) => return Ok(out),
                    Err(e) if e.is_retryable() => {
                        warn!(server = %server.base, error = %e, "segment failed on this server; trying the next");
                        let mut state = server.state.lock().await;
                        state.up = false;
                        state.synced = None;
                        may_come_back = true;
                        why.insert(server.base.clone(), e.to_string());
                    }
                    Err(e) => return Err(e),
                }
            }
            let reasons: Vec<String> = why.iter().map(|(s, w)| format!("{s}: {w}")).collect();
            if !may_come_back || tokio::time::Instant::now() >= deadline {
                return Err(self.unavailable(format!(
                    "no server generated version {}: {}",
                    req.version,
                    reasons.join("; ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(self.config.health_interval_ms)).await;
        }
    }

    async fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenizer
            .encode_prompt(text)
            .map_err(|e| EngineError::InvalidRequest(e.to_string()))
    }

    async fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError> {
        self.tokenizer
            .decode(tokens)
            .map_err(|e| EngineError::InvalidRequest(e.to_string()))
    }

    async fn limits(&self) -> Result<EngineLimits, EngineError> {
        let name = self.kind.name();
        let limits = self
            .limits
            .get_or_try_init(|| run_limits(name, &self.blobs, &self.run));
        limits.await.copied()
    }
}
