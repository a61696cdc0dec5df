//! The `openai` engine against a local OpenAI-compatible completions server (axum) that
//! implements the endpoint the way vLLM does: token-id prompts, `max_tokens`, log-probs,
//! `finish_reason`, and failure modes (503 while warming up, 400, a hang, broken JSON).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use flywheel_storage::{FinishReason, PromptInput, TrajectoryId};
use flywheel_worker::engine::openai::{OpenAiConfig, OpenAiEngine, POLICY_VERSION_HEADER};
use flywheel_worker::engine::{Engine, EngineError, SamplingConfig, SegmentRequest, prompt_tokens};
use flywheel_worker::http::HttpConfig;
use serde_json::{Value, json};

use common::{Hits, dead_url, serve};

/// The fake model's end-of-sequence token.
const EOS: u32 = 0;
/// The fake model emits EOS when the context (prompt + response) reaches this length.
const EOS_AT: usize = 30;
/// The fake server's context window.
const MAX_MODEL_LEN: usize = 100;

/// How the fake server behaves.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Behaviour {
    /// Answers like vLLM >= 0.10.2: `token_ids` and `logprobs.tokens` both present.
    Normal,
    /// Only `logprobs.tokens` as "token_id:N" strings (older vLLM).
    StringTokensOnly,
    /// 503 for the first n requests, then normal.
    FailFirst(usize),
    /// Always 400.
    BadRequest,
    /// Never answers in time.
    Hang,
    /// 200 with a truncated JSON body.
    Malformed,
    /// One log-prob fewer than tokens.
    WrongLengths,
    /// Normal, plus the policy-version header.
    VersionHeader(u64),
}

#[derive(Clone)]
struct Fake {
    behaviour: Behaviour,
    hits: Hits,
    /// The last request body, for checking what the engine sent.
    last: Arc<Mutex<Option<Value>>>,
}

/// The fake model: counts up from the last context token; EOS at `EOS_AT` context tokens.
fn fake_generate(context: &[u32], max_tokens: usize) -> (Vec<u32>, &'static str) {
    let mut out = Vec::new();
    let mut last = *context.last().unwrap_or(&1);
    while out.len() < max_tokens {
        let len = context.len() + out.len();
        if len >= MAX_MODEL_LEN {
            return (out, "length");
        }
        if len + 1 == EOS_AT {
            out.push(EOS);
            return (out, "stop");
        }
        last = last % 900 + 1;
        out.push(last);
    }
    (out, "length")
}

async fn completions(State(fake): State<Fake>, body: Bytes) -> Response {
    let n = fake.hits.hit();
    let req: Value = serde_json::from_slice(&body).expect("the engine sends JSON");
    *fake.last.lock().unwrap() = Some(req.clone());
    match fake.behaviour {
        Behaviour::FailFirst(k) if n < k => {
            return (StatusCode::SERVICE_UNAVAILABLE, "model is loading").into_response();
        }
        Behaviour::BadRequest => {
            return (
                StatusCode::BAD_REQUEST,
                r#"{"error":"This model's maximum context length is 100"}"#,
            )
                .into_response();
        }
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Behaviour::Malformed => return (StatusCode::OK, r#"{"choices": [{"tok"#).into_response(),
        _ => {}
    }
    let prompt: Vec<u32> = serde_json::from_value(req["prompt"].clone()).expect("token-id prompt");
    let max_tokens = req["max_tokens"].as_u64().expect("max_tokens") as usize;
    let (tokens, finish) = fake_generate(&prompt, max_tokens);
    let mut logprobs: Vec<f64> = tokens.iter().map(|&t| -0.01 * f64::from(t)).collect();
    if fake.behaviour == Behaviour::WrongLengths {
        logprobs.pop();
    }
    let strings: Vec<String> = tokens.iter().map(|t| format!("token_id:{t}")).collect();
    let mut choice = json!({
        "index": 0,
        "text": "ignored",
        "logprobs": {"tokens": strings, "token_logprobs": logprobs, "top_logprobs": null, "text_offset": []},
        "finish_reason": finish,
        "stop_reason": null,
    });
    if fake.behaviour != Behaviour::StringTokensOnly {
        choice["token_ids"] = json!(tokens);
    }
    let body = json!({"id": "cmpl-1", "object": "text_completion", "model": req["model"], "choices": [choice]});
    let mut response = axum::Json(body).into_response();
    if let Behaviour::VersionHeader(v) = fake.behaviour {
        response
            .headers_mut()
            .insert(POLICY_VERSION_HEADER, v.to_string().parse().unwrap());
    }
    response
}

async fn tokenize(body: Bytes) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap();
    let tokens: Vec<u32> = req["prompt"]
        .as_str()
        .unwrap()
        .bytes()
        .map(u32::from)
        .collect();
    axum::Json(json!({"count": tokens.len(), "max_model_len": MAX_MODEL_LEN, "tokens": tokens}))
        .into_response()
}

async fn detokenize(body: Bytes) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap();
    let tokens: Vec<u8> = serde_json::from_value(req["tokens"].clone()).unwrap();
    axum::Json(json!({"prompt": String::from_utf8(tokens).unwrap()})).into_response()
}

/// Starts a fake server; returns the engine pointed at it and the server's state.
async fn setup(behaviour: Behaviour, http: HttpConfig) -> (OpenAiEngine, Fake) {
    let fake = Fake {
        behaviour,
        hits: Hits::default(),
        last: Arc::default(),
    };
    let router = Router::new()
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .with_state(fake.clone());
    let base_url = serve(router).await;
    (engine_at(&base_url, http), fake)
}

fn engine_at(base_url: &str, http: HttpConfig) -> OpenAiEngine {
    OpenAiEngine::new(OpenAiConfig {
        base_url: format!("{base_url}/"),
        model: "tiny".into(),
        slots: 8,
        http,
        ..OpenAiConfig::default()
    })
    .unwrap()
}

/// Quick retries so the tests do not wait for production backoffs.
fn quick() -> HttpConfig {
    HttpConfig {
        connect_timeout_ms: 2_000,
        request_timeout_ms: 10_000,
        max_attempts: 4,
        backoff_initial_ms: 10,
        backoff_max_ms: 40,
    }
}

fn request(committed: &[u32], max_new: u32, cap: u32) -> SegmentRequest {
    SegmentRequest {
        trajectory: TrajectoryId {
            prompt: "p1".into(),
            sample: 2,
        },
        prompt: vec![10, 11, 12].into(),
        committed: committed.into(),
        max_new_tokens: max_new,
        max_response_tokens: cap,
        version: 5,
        sampling: SamplingConfig {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 0,
            seed: Some(42),
        },
    }
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    assert!(
        got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
        "{got:?} vs {want:?}"
    );
}

/// A set top-k goes to the server as `top_k` (vLLM's and SGLang's name).
#[tokio::test]
async fn top_k_is_sent_when_set() {
    let (engine, fake) = setup(Behaviour::Normal, quick()).await;
    let mut req = request(&[], 4, 1000);
    req.sampling.top_k = 5;
    engine.generate(req).await.unwrap();
    let sent = fake.last.lock().unwrap().clone().unwrap();
    assert_eq!(sent["top_k"], 5);
}

#[tokio::test]
async fn happy_path_segments_to_eos() {
    let (engine, fake) = setup(Behaviour::Normal, quick()).await;
    let out = engine.generate(request(&[], 4, 1000)).await.unwrap();
    assert_eq!(out.tokens, vec![13, 14, 15, 16]);
    assert_close(&out.logprobs, &[-0.13, -0.14, -0.15, -0.16]);
    assert_eq!(out.finish, FinishReason::None);
    assert_eq!(out.version, 5, "no header: the version asked for");

    // What went over the wire.
    let sent = fake.last.lock().unwrap().clone().unwrap();
    assert_eq!(sent["model"], "tiny");
    assert_eq!(sent["prompt"], json!([10, 11, 12]));
    assert_eq!(sent["max_tokens"], 4);
    assert_eq!(sent["logprobs"], 0);
    assert_eq!(sent["return_tokens_as_token_ids"], true);
    assert_eq!(sent["return_token_ids"], true);
    assert!((sent["temperature"].as_f64().unwrap() - 0.7).abs() < 1e-6);
    assert!((sent["top_p"].as_f64().unwrap() - 0.9).abs() < 1e-6);
    assert!(sent.get("top_k").is_none(), "top_k is sent only when set");
    let seed = sent["seed"].as_u64().unwrap();
    assert!(seed <= i64::MAX as u64, "a seed servers accept");

    // Resume: the committed tokens are re-sent after the prompt; segments run until EOS.
    let mut committed = out.tokens.clone();
    loop {
        let out = engine.generate(request(&committed, 8, 1000)).await.unwrap();
        committed.extend_from_slice(&out.tokens);
        let sent = fake.last.lock().unwrap().clone().unwrap();
        let sent_prompt: Vec<u32> = serde_json::from_value(sent["prompt"].clone()).unwrap();
        assert_eq!(sent_prompt.len(), 3 + committed.len() - out.tokens.len());
        assert_ne!(
            sent["seed"].as_u64().unwrap(),
            seed,
            "each position samples afresh"
        );
        if out.finish != FinishReason::None {
            assert_eq!(out.finish, FinishReason::Eos);
            break;
        }
    }
    assert_eq!(committed.len(), EOS_AT - 3);
    assert_eq!(*committed.last().unwrap(), EOS);
    let want: Vec<u32> = (13..13 + (EOS_AT as u32 - 4)).chain([EOS]).collect();
    assert_eq!(committed, want);
}

#[tokio::test]
async fn response_cap_and_context_window_finish_with_length() {
    let (engine, _fake) = setup(Behaviour::Normal, quick()).await;
    // The cap is reached exactly: "length" from the server means the trajectory is done.
    let out = engine.generate(request(&[], 6, 6)).await.unwrap();
    assert_eq!((out.tokens.len(), out.finish), (6, FinishReason::Length));
    // Stopped short of max_tokens with "length": the context window is full.
    let committed: Vec<u32> = vec![500; MAX_MODEL_LEN - 3 - 2];
    let out = engine
        .generate(request(&committed, 8, 10_000))
        .await
        .unwrap();
    assert_eq!((out.tokens.len(), out.finish), (2, FinishReason::Length));
}

#[tokio::test]
async fn reads_token_ids_from_logprob_strings() {
    let (engine, _fake) = setup(Behaviour::StringTokensOnly, quick()).await;
    let out = engine.generate(request(&[20], 3, 1000)).await.unwrap();
    assert_eq!(out.tokens, vec![21, 22, 23]);
    assert_close(&out.logprobs, &[-0.21, -0.22, -0.23]);
}

#[tokio::test]
async fn reports_the_servers_policy_version() {
    let (engine, _fake) = setup(Behaviour::VersionHeader(7), quick()).await;
    assert_eq!(
        engine.generate(request(&[], 2, 100)).await.unwrap().version,
        7
    );
}

#[tokio::test]
async fn retries_after_503() {
    let (engine, fake) = setup(Behaviour::FailFirst(2), quick()).await;
    let out = engine.generate(request(&[], 3, 100)).await.unwrap();
    assert_eq!(out.tokens, vec![13, 14, 15]);
    assert_eq!(fake.hits.get(), 3, "two 503s, then success");
}

#[tokio::test]
async fn gives_up_after_bounded_503s() {
    let (engine, fake) = setup(Behaviour::FailFirst(usize::MAX), quick()).await;
    let err = engine.generate(request(&[], 3, 100)).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(matches!(err, EngineError::Unavailable { .. }), "{err}");
    assert!(
        err.to_string().contains("503") && err.to_string().contains("4 attempt"),
        "{err}"
    );
    assert_eq!(fake.hits.get(), 4);
}

#[tokio::test]
async fn no_retry_on_400() {
    let (engine, fake) = setup(Behaviour::BadRequest, quick()).await;
    let err = engine.generate(request(&[], 3, 100)).await.unwrap_err();
    match &err {
        EngineError::Rejected {
            status, message, ..
        } => {
            assert_eq!(*status, 400);
            assert!(message.contains("maximum context length"), "{message}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(!err.is_retryable());
    assert_eq!(fake.hits.get(), 1, "a 4xx is not retried");
}

#[tokio::test]
async fn times_out_and_gives_up() {
    let http = HttpConfig {
        request_timeout_ms: 200,
        max_attempts: 2,
        ..quick()
    };
    let (engine, fake) = setup(Behaviour::Hang, http).await;
    let err = engine.generate(request(&[], 3, 100)).await.unwrap_err();
    assert!(matches!(err, EngineError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert_eq!(fake.hits.get(), 2, "each attempt timed out");
}

#[tokio::test]
async fn malformed_json_is_a_protocol_error() {
    let (engine, fake) = setup(Behaviour::Malformed, quick()).await;
    let err = engine.generate(request(&[], 3, 100)).await.unwrap_err();
    assert!(matches!(err, EngineError::Protocol { .. }), "{err}");
    assert!(err.to_string().contains("not the expected JSON"), "{err}");
    assert_eq!(fake.hits.get(), 1);
}

#[tokio::test]
async fn mismatched_logprobs_are_a_protocol_error() {
    let (engine, _fake) = setup(Behaviour::WrongLengths, quick()).await;
    let err = engine.generate(request(&[], 3, 100)).await.unwrap_err();
    assert!(matches!(err, EngineError::Protocol { .. }), "{err}");
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let engine = engine_at(
        &dead_url().await,
        HttpConfig {
            max_attempts: 2,
            ..quick()
        },
    );
    let err = engine.generate(request(&[], 3, 100)).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn tokenizes_through_the_server() {
    let (engine, _fake) = setup(Behaviour::Normal, quick()).await;
    let tokens = prompt_tokens(&engine, &PromptInput::Text("hi!".into()))
        .await
        .unwrap();
    assert_eq!(&*tokens, &[104, 105, 33]);
    let given = prompt_tokens(&engine, &PromptInput::Tokens(vec![1, 2]))
        .await
        .unwrap();
    assert_eq!(&*given, &[1, 2]);
    assert_eq!(engine.detokenize(&tokens).await.unwrap(), "hi!");
}

#[test]
fn bad_configs_are_rejected() {
    for config in [
        OpenAiConfig {
            base_url: "not a url".into(),
            ..OpenAiConfig::default()
        },
        OpenAiConfig {
            base_url: "ftp://x".into(),
            ..OpenAiConfig::default()
        },
        OpenAiConfig {
            slots: 0,
            ..OpenAiConfig::default()
        },
        OpenAiConfig {
            model: String::new(),
            ..OpenAiConfig::default()
        },
        OpenAiConfig {
            http: HttpConfig {
                max_attempts: 0,
                ..HttpConfig::default()
            },
            ..OpenAiConfig::default()
        },
    ] {
        assert!(matches!(
            OpenAiEngine::new(config),
            Err(EngineError::Config(_))
        ));
    }
}
