//! The `vllm` and `sglang` engines against local HTTP servers that implement each server's
//! documented contract exactly (request fields, response shapes, error codes, the weight
//! version they report): the engine conformance suite on both, and the weight sync — a
//! version loaded before a server generates under it, the segment labelled with what the
//! server served, a server that refuses an update, one that times out, one that restarts with
//! its initial weights, one that dies mid-segment.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use flywheel_model::{ModelConfig, Params, Tokenizer};
use flywheel_storage::RunStores;
use flywheel_storage::config::RunConfig;
use flywheel_storage::weights;
use flywheel_storage::{PromptId, TrajectoryId};
use flywheel_trainer::TrainerConfig;
use flywheel_trainer::warm_start::publish_initial;
use flywheel_worker::engine::remote::{RemoteConfig, RemoteEngine, ServerKind};
use flywheel_worker::engine::{Engine, EngineError, SamplingConfig, SegmentRequest};
use serde_json::{Value, json};

/// A mock server's behaviour when asked to load a version.
#[derive(Clone, Copy, Debug, PartialEq)]
enum OnLoad {
    /// Loads it.
    Load,
    /// Refuses it (SGLang: 400 `{success: false}`; vLLM: 400 from `/collective_rpc`).
    Refuse,
    /// Takes this long (past the engine's sync timeout).
    Stall(Duration),
}

/// What a mock server holds and saw.
#[derive(Debug)]
struct Mock {
    kind: ServerKind,
    on_load: OnLoad,
    /// The weight version it reports (`"default"` as SGLang starts, none for vLLM).
    weight_version: Option<String>,
    /// vLLM: paused by `/pause`.
    paused: bool,
    /// Every route called, in order (`/generate`, `/v1/completions` and `/health` left out).
    calls: Vec<String>,
    /// The directories it loaded.
    loaded: Vec<PathBuf>,
    /// Generation requests served.
    generated: usize,
    /// Its engine died: every generation fails with 503 from now on (its HTTP front still
    /// answers, as a server whose GPU worker crashed mid-segment does).
    dead: bool,
}

type Shared = Arc<Mutex<Mock>>;

fn mock(kind: ServerKind, on_load: OnLoad) -> Shared {
    Arc::new(Mutex::new(Mock {
        kind,
        on_load,
        weight_version: (kind == ServerKind::Sglang).then(|| "default".into()),
        paused: false,
        calls: Vec::new(),
        loaded: Vec::new(),
        generated: 0,
        dead: false,
    }))
}

/// The continuation of a context, a fixed function of it: the next of the arithmetic
/// tokenizer's non-special ids after the last, EOS once the context holds 60 tokens.
fn continuation(context: &[u32], max_new: usize) -> (Vec<u32>, bool) {
    let vocab = Tokenizer::arithmetic().vocab_size() as u32;
    let mut last = context.last().copied().unwrap_or(3);
    let mut out = Vec::new();
    while out.len() < max_new {
        if context.len() + out.len() + 1 >= 60 {
            out.push(Tokenizer::EOS);
            return (out, true);
        }
        last = 3 + (last + 1) % (vocab - 3);
        out.push(last);
    }
    (out, false)
}

fn bad_request(message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": message.into()})),
    )
        .into_response()
}

/// A directory the engine wrote: a Hugging Face checkpoint a server could load.
fn check_checkpoint(dir: &str) -> Result<PathBuf, String> {
    let dir = PathBuf::from(dir);
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        if !dir.join(file).is_file() {
            return Err(format!("{} has no {file}", dir.display()));
        }
    }
    Ok(dir)
}

async fn health(State(m): State<Shared>) -> StatusCode {
    let _ = m;
    StatusCode::OK
}

// --- SGLang ---

async fn sglang_version(State(m): State<Shared>) -> axum::Json<Value> {
    let m = m.lock().unwrap();
    axum::Json(json!({"weight_version": m.weight_version}))
}

/// `POST /update_weights_from_disk {model_path, weight_version, abort_all_requests,
/// flush_cache}` → `{success, message, num_paused_requests}`, 400 when it fails.
async fn sglang_load(State(m): State<Shared>, axum::Json(body): axum::Json<Value>) -> Response {
    let on_load = {
        let mut m = m.lock().unwrap();
        m.calls.push("/update_weights_from_disk".into());
        m.on_load
    };
    let Some(path) = body["model_path"].as_str() else {
        return bad_request("model_path is required");
    };
    let version = body["weight_version"].as_str().map(str::to_owned);
    if let OnLoad::Stall(d) = on_load {
        tokio::time::sleep(d).await;
    }
    let refuse = |message: String| {
        let body = json!({"success": false, "message": message, "num_paused_requests": 0});
        (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
    };
    if on_load == OnLoad::Refuse {
        return refuse("Failed to update weights: shapes do not match the served model".into());
    }
    let dir = match check_checkpoint(path) {
        Ok(dir) => dir,
        Err(why) => return refuse(why),
    };
    let mut m = m.lock().unwrap();
    m.loaded.push(dir);
    if version.is_some() {
        m.weight_version = version;
    }
    axum::Json(json!({"success": true, "message": "Succeeded to update model weights.", "num_paused_requests": 0}))
        .into_response()
}

/// `POST /generate {input_ids, sampling_params, return_logprob}` → `{text, meta_info:
/// {output_token_logprobs, finish_reason, weight_version}}`.
async fn sglang_generate(State(m): State<Shared>, axum::Json(body): axum::Json<Value>) -> Response {
    let input: Option<Vec<u32>> = serde_json::from_value(body["input_ids"].clone()).ok();
    let max_new = body["sampling_params"]["max_new_tokens"].as_u64();
    let (Some(input), Some(max_new)) = (input, max_new) else {
        return bad_request("input_ids and sampling_params.max_new_tokens are required");
    };
    if body["return_logprob"] != Value::Bool(true) {
        return bad_request("this test server wants return_logprob");
    }
    let version = {
        let mut m = m.lock().unwrap();
        if m.dead {
            return (StatusCode::SERVICE_UNAVAILABLE, "the scheduler died").into_response();
        }
        m.generated += 1;
        m.weight_version.clone()
    };
    let (tokens, eos) = continuation(&input, max_new as usize);
    let logprobs: Vec<Value> = tokens
        .iter()
        .map(|&t| json!([-0.01 * f64::from(t), t, null]))
        .collect();
    let finish = if eos {
        json!({"type": "stop", "matched": Tokenizer::EOS})
    } else {
        json!({"type": "length", "length": tokens.len()})
    };
    axum::Json(json!({
        "text": "",
        "meta_info": {
            "id": "r",
            "finish_reason": finish,
            "prompt_tokens": input.len(),
            "completion_tokens": tokens.len(),
            "output_token_logprobs": logprobs,
            "weight_version": version,
        }
    }))
    .into_response()
}

fn sglang_router(m: Shared) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/get_weight_version", get(sglang_version))
        .route("/update_weights_from_disk", post(sglang_load))
        .route("/generate", post(sglang_generate))
        .with_state(m)
}

// --- vLLM ---

async fn vllm_weight_info(State(m): State<Shared>) -> axum::Json<Value> {
    let m = m.lock().unwrap();
    axum::Json(json!({"weight_version": m.weight_version}))
}

/// `POST /pause?mode=abort|wait|keep` → `{"status": "paused"}`.
async fn vllm_pause(
    State(m): State<Shared>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let mode = q.get("mode").map(String::as_str).unwrap_or("abort");
    if !matches!(mode, "abort" | "wait" | "keep") {
        return bad_request(format!("invalid mode {mode}"));
    }
    let mut m = m.lock().unwrap();
    m.calls.push(format!("/pause?mode={mode}"));
    m.paused = true;
    axum::Json(json!({"status": "paused"})).into_response()
}

async fn vllm_resume(State(m): State<Shared>) -> axum::Json<Value> {
    let mut m = m.lock().unwrap();
    m.calls.push("/resume".into());
    m.paused = false;
    axum::Json(json!({"status": "resumed"}))
}

/// `POST /collective_rpc {method, args, kwargs, timeout}` → `{"results": [...]}`.
async fn vllm_rpc(State(m): State<Shared>, axum::Json(body): axum::Json<Value>) -> Response {
    let on_load = {
        let mut m = m.lock().unwrap();
        m.calls.push(format!("/collective_rpc {}", body["method"]));
        m.on_load
    };
    if body["method"] != json!("reload_weights") {
        return bad_request("Missing 'method' in request body");
    }
    if let OnLoad::Stall(d) = on_load {
        tokio::time::sleep(d).await;
    }
    if on_load == OnLoad::Refuse {
        return bad_request("reload_weights: the checkpoint does not match the model");
    }
    let dir = match body["kwargs"]["weights_path"]
        .as_str()
        .map(check_checkpoint)
    {
        Some(Ok(dir)) => dir,
        Some(Err(why)) => return bad_request(why),
        None => return bad_request("kwargs.weights_path is required"),
    };
    m.lock().unwrap().loaded.push(dir);
    axum::Json(json!({"results": [null]})).into_response()
}

async fn vllm_simple(State(m): State<Shared>, uri: axum::http::Uri) -> axum::Json<Value> {
    m.lock().unwrap().calls.push(uri.path().to_owned());
    axum::Json(json!({}))
}

async fn vllm_label(State(m): State<Shared>, axum::Json(body): axum::Json<Value>) -> Response {
    let Some(v) = body["new_version"].as_str() else {
        return bad_request("new_version is required");
    };
    let mut m = m.lock().unwrap();
    m.calls.push("/update_weight_version".into());
    m.weight_version = Some(v.to_owned());
    axum::Json(json!({"success": true, "new_version": v})).into_response()
}

/// `POST /v1/completions` with token ids, `logprobs: 0` and `return_token_ids`; aborted while
/// paused.
async fn vllm_completions(
    State(m): State<Shared>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let prompt: Option<Vec<u32>> = serde_json::from_value(body["prompt"].clone()).ok();
    let (Some(prompt), Some(max_tokens)) = (prompt, body["max_tokens"].as_u64()) else {
        return bad_request("prompt (token ids) and max_tokens are required");
    };
    {
        let mut m = m.lock().unwrap();
        if m.dead {
            return (StatusCode::SERVICE_UNAVAILABLE, "EngineDeadError").into_response();
        }
        if m.paused {
            let abort = json!({"choices": [{"index": 0, "text": "", "token_ids": [], "logprobs": {"tokens": [], "token_logprobs": []}, "finish_reason": "abort"}]});
            return axum::Json(abort).into_response();
        }
        m.generated += 1;
    }
    let (tokens, eos) = continuation(&prompt, max_tokens as usize);
    let logprobs: Vec<f64> = tokens.iter().map(|&t| -0.01 * f64::from(t)).collect();
    axum::Json(json!({"choices": [{
        "index": 0,
        "text": "",
        "token_ids": tokens,
        "logprobs": {"token_logprobs": logprobs},
        "finish_reason": if eos { "stop" } else { "length" },
    }]}))
    .into_response()
}

fn vllm_router(m: Shared) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/weight_info", get(vllm_weight_info))
        .route("/pause", post(vllm_pause))
        .route("/resume", post(vllm_resume))
        .route("/collective_rpc", post(vllm_rpc))
        .route("/reset_prefix_cache", post(vllm_simple))
        .route("/update_weight_version", post(vllm_label))
        .route("/v1/completions", post(vllm_completions))
        .with_state(m)
}

fn router(m: Shared) -> Router {
    let kind = m.lock().unwrap().kind;
    match kind {
        ServerKind::Sglang => sglang_router(m),
        ServerKind::Vllm => vllm_router(m),
    }
}

/// A mock server on a fixed port that can be stopped and started again (a restart).
struct Running {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(m: Shared, addr: &str) -> Running {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(m);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Running { addr, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops it (connections refused) and starts it again fresh, with its initial weights.
    async fn restart(&mut self, kind: ServerKind) -> Shared {
        self.task.abort();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let fresh = mock(kind, OnLoad::Load);
        *self = Running::start(fresh.clone(), &self.addr.to_string()).await;
        fresh
    }
}

/// A run whose versions 0.. are published in a memory object store.
struct Run {
    stores: RunStores,
    model: ModelConfig,
    weights_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Run {
    async fn new() -> Run {
        let mut run = RunConfig::default();
        run.storage.run_id = "run".into();
        run.storage.state_url = "memory://".into();
        run.storage.blob_url = "memory://".into();
        run.storage.ledger_url = "sqlite::memory:".into();
        let stores = RunStores::open(&run).await.unwrap();
        let model = ModelConfig {
            d_model: 16,
            n_layers: 1,
            n_heads: 2,
            d_ff: 32,
            max_seq_len: 64,
            ..ModelConfig::tiny(Tokenizer::arithmetic().vocab_size())
        };
        let trainer = TrainerConfig {
            model: model.clone(),
            metrics_addr: String::new(),
            ..TrainerConfig::default()
        };
        let params = Params::init(&model, 1).unwrap();
        assert!(publish_initial(&stores, &trainer, params).await.unwrap());
        let dir = tempfile::tempdir().unwrap();
        Run {
            stores,
            model,
            weights_dir: dir.path().join("weights"),
            _dir: dir,
        }
    }

    /// Publishes `version` (v0's weights with one value changed), as a trainer would.
    async fn publish(&self, version: u64) {
        let blobs = &self.stores.blobs;
        let previous = weights::load_manifest(blobs, "run", version - 1)
            .await
            .unwrap();
        let fetched = weights::fetch(blobs, "run", version - 1, None, &Default::default())
            .await
            .unwrap();
        let mut params = Params::from_bytes_map(&self.model, &fetched.tensors).unwrap();
        params.tensors_mut()[0].data[0] += 0.5;
        flywheel_trainer::publish_params(
            blobs,
            "run",
            version,
            &params,
            Some(&previous),
            &previous.metadata,
            &Default::default(),
        )
        .await
        .unwrap();
    }

    fn engine(&self, kind: ServerKind, servers: Vec<String>) -> RemoteEngine {
        let config = RemoteConfig {
            servers,
            slots: 4,
            weights_dir: self.weights_dir.display().to_string(),
            health_interval_ms: 100,
            server_wait_ms: 5_000,
            sync_timeout_ms: 1_000,
            weights_wait_ms: 1_000,
            ..RemoteConfig::default()
        };
        RemoteEngine::new(kind, self.stores.blobs.clone(), "run", config).unwrap()
    }
}

fn request(version: u64, sample: u32) -> SegmentRequest {
    SegmentRequest {
        trajectory: TrajectoryId {
            prompt: PromptId("p".into()),
            sample,
        },
        prompt: vec![1, 5, 6].into(),
        committed: Vec::new().into(),
        max_new_tokens: 4,
        max_response_tokens: 24,
        version,
        sampling: SamplingConfig::default(),
    }
}

const KINDS: [ServerKind; 2] = [ServerKind::Sglang, ServerKind::Vllm];

/// Each version is written as a directory and loaded before the server generates under it;
/// the segment records the version the server reports; old directories are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_version_is_loaded_before_the_server_generates_under_it() {
    for kind in KINDS {
        let run = Run::new().await;
        let m = mock(kind, OnLoad::Load);
        let server = Running::start(m.clone(), "127.0.0.1:0").await;
        let engine = run.engine(kind, vec![server.url()]);
        let out = engine.generate(request(0, 0)).await.unwrap();
        assert_eq!(out.version, 0, "{kind:?}");
        for v in 1..=3 {
            run.publish(v).await;
            let out = engine.generate(request(v, 0)).await.unwrap();
            assert_eq!(out.version, v, "{kind:?}");
            assert_eq!(out.tokens.len(), 4);
        }
        let m = m.lock().unwrap();
        let loaded: Vec<String> = m
            .loaded
            .iter()
            .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            loaded,
            ["v0000000000", "v0000000001", "v0000000002", "v0000000003"],
            "{kind:?}"
        );
        assert_eq!(m.generated, 4, "{kind:?}");
        if kind == ServerKind::Vllm {
            // pause → reload → reset the prefix cache → label → resume, per version.
            assert_eq!(
                &m.calls[..5],
                [
                    "/pause?mode=abort",
                    "/collective_rpc \"reload_weights\"",
                    "/reset_prefix_cache",
                    "/update_weight_version",
                    "/resume"
                ],
                "{:?}",
                m.calls
            );
        }
        // keep_versions = 2: the two newest directories are left.
        let mut left: Vec<String> = std::fs::read_dir(&run.weights_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["v0000000002", "v0000000003"], "{kind:?}");
    }
}

/// A server that refuses a version is not used for it: the other server serves it; with no
/// other server the segment fails, retryably, naming the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_a_version_is_not_used_for_it() {
    for kind in KINDS {
        let run = Run::new().await;
        let refusing = mock(kind, OnLoad::Refuse);
        let good = mock(kind, OnLoad::Load);
        let a = Running::start(refusing.clone(), "127.0.0.1:0").await;
        let b = Running::start(good.clone(), "127.0.0.1:0").await;
        let engine = run.engine(kind, vec![a.url(), b.url()]);
        for sample in 0..6 {
            let out = engine.generate(request(0, sample)).await.unwrap();
            assert_eq!(out.version, 0);
        }
        assert_eq!(refusing.lock().unwrap().generated, 0, "{kind:?}");
        assert_eq!(good.lock().unwrap().generated, 6, "{kind:?}");
        let load_attempts = refusing
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| c.contains("update_weights_from_disk") || c.contains("collective_rpc"))
            .count();
        assert_eq!(load_attempts, 1, "{kind:?}: asked once for the version");
        if kind == ServerKind::Vllm {
            assert!(
                !refusing.lock().unwrap().paused,
                "resumed after the refusal"
            );
        }

        let alone = run.engine(kind, vec![a.url()]);
        match alone.generate(request(0, 0)).await {
            Err(e @ EngineError::Unavailable { .. }) => {
                assert!(e.to_string().contains("refused"), "{e}");
            }
            other => panic!("{kind:?}: expected unavailable, got {other:?}"),
        }
    }
}

/// A server whose load times out is marked down; the other one serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_times_out_loading_is_passed_over() {
    for kind in KINDS {
        let run = Run::new().await;
        let slow = mock(kind, OnLoad::Stall(Duration::from_secs(3)));
        let good = mock(kind, OnLoad::Load);
        let a = Running::start(slow.clone(), "127.0.0.1:0").await;
        let b = Running::start(good.clone(), "127.0.0.1:0").await;
        let engine = run.engine(kind, vec![a.url(), b.url()]);
        let out = engine.generate(request(0, 0)).await.unwrap();
        assert_eq!(out.version, 0);
        assert_eq!(slow.lock().unwrap().generated, 0, "{kind:?}");
        assert_eq!(good.lock().unwrap().generated, 1, "{kind:?}");
    }
}

/// A server that restarts with its initial weights is synced again before it generates, and
/// no segment is labelled with a version it did not serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_with_old_weights_is_synced_again_before_use() {
    for kind in KINDS {
        let run = Run::new().await;
        let m = mock(kind, OnLoad::Load);
        let mut server = Running::start(m, "127.0.0.1:0").await;
        let engine = run.engine(kind, vec![server.url()]);
        run.publish(1).await;
        assert_eq!(engine.generate(request(1, 0)).await.unwrap().version, 1);
        let fresh = server.restart(kind).await;
        // The engine notices (its health check, or SGLang's reported version) and loads
        // version 1 again before generating.
        let out = engine.generate(request(1, 1)).await.unwrap();
        assert_eq!(out.version, 1, "{kind:?}");
        let fresh = fresh.lock().unwrap();
        let names: Vec<String> = fresh
            .loaded
            .iter()
            .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["v0000000001"], "{kind:?}: synced again");
        assert_eq!(fresh.generated, 1, "{kind:?}");
    }
}

/// A server that dies mid-segment costs that attempt only: the segment is generated on the
/// other server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dying_mid_segment_costs_only_that_attempt() {
    for kind in KINDS {
        let run = Run::new().await;
        let dying = mock(kind, OnLoad::Load);
        let good = mock(kind, OnLoad::Load);
        let a = Running::start(dying.clone(), "127.0.0.1:0").await;
        let b = Running::start(good.clone(), "127.0.0.1:0").await;
        let engine = run.engine(kind, vec![a.url(), b.url()]);
        // Both synced to version 0 first.
        for sample in 0..2 {
            engine.generate(request(0, sample)).await.unwrap();
        }
        assert_eq!(dying.lock().unwrap().generated, 1, "{kind:?}");
        dying.lock().unwrap().dead = true;
        for sample in 2..6 {
            let out = engine.generate(request(0, sample)).await.unwrap();
            assert_eq!(out.version, 0);
            assert!(!out.tokens.is_empty());
        }
        assert_eq!(dying.lock().unwrap().generated, 1, "{kind:?}");
        assert_eq!(
            good.lock().unwrap().generated,
            5,
            "{kind:?}: the other server took every segment"
        );
    }
}

/// The conformance suite on both engines, each over one mock server.
mod conformance {
    use super::*;
    use async_trait::async_trait;
    use flywheel_worker::engine::conformance::EngineFactory;

    struct Remote(ServerKind);

    #[async_trait]
    impl EngineFactory for Remote {
        async fn engine(&self) -> Arc<dyn Engine> {
            let run = Box::leak(Box::new(Run::new().await));
            let server = Running::start(mock(self.0, OnLoad::Load), "127.0.0.1:0").await;
            let url = server.url();
            std::mem::forget(server);
            Arc::new(run.engine(self.0, vec![url]))
        }

        fn prompt(&self) -> &str {
            "3+4+5="
        }
    }

    mod sglang {
        use super::*;
        flywheel_worker::engine_conformance!(Remote(ServerKind::Sglang));
    }

    mod vllm {
        use super::*;
        flywheel_worker::engine_conformance!(Remote(ServerKind::Vllm));
    }
}
