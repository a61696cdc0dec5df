//! The HTTP reward-service verifier against a local reward service (axum).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use flywheel_storage::VerifierSpec;
use flywheel_worker::http::HttpConfig;
use flywheel_worker::verify::{RewardServicesConfig, VerifierFactory, VerifyError, VerifyInput};
use serde_json::{Value, json};

use common::{Hits, dead_url, serve};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Behaviour {
    /// Reward 1 when the response contains `metadata.answer`, else 0.
    Judge,
    /// 503 for the first n requests.
    FailFirst(usize),
    /// 422: the request is not understood.
    Unprocessable,
    /// Never answers in time.
    Hang,
    /// `{"reward": "high"}`.
    NotANumber,
}

#[derive(Clone)]
struct Service {
    behaviour: Behaviour,
    hits: Hits,
}

async fn score(State(service): State<Service>, body: Bytes) -> Response {
    let n = service.hits.hit();
    match service.behaviour {
        Behaviour::FailFirst(k) if n < k => {
            return (StatusCode::SERVICE_UNAVAILABLE, "judge overloaded").into_response();
        }
        Behaviour::Unprocessable => {
            return (StatusCode::UNPROCESSABLE_ENTITY, "missing field `rubric`").into_response();
        }
        Behaviour::Hang => tokio::time::sleep(Duration::from_secs(60)).await,
        Behaviour::NotANumber => return axum::Json(json!({"reward": "high"})).into_response(),
        _ => {}
    }
    let req: Value = serde_json::from_slice(&body).expect("JSON request");
    assert!(req["prompt"].is_string(), "prompt sent: {req}");
    let answer = req["metadata"]["answer"].as_str().unwrap_or("\u{0}");
    let reward = if req["response"].as_str().unwrap().contains(answer) {
        1.0
    } else {
        0.0
    };
    axum::Json(json!({"reward": reward})).into_response()
}

/// A factory whose service `judge` is a fresh local reward service.
async fn setup(behaviour: Behaviour, http: HttpConfig) -> (VerifierFactory, Hits) {
    let service = Service {
        behaviour,
        hits: Hits::default(),
    };
    let base = serve(
        Router::new()
            .route("/score", post(score))
            .with_state(service.clone()),
    )
    .await;
    let mut services = BTreeMap::new();
    services.insert("judge".to_owned(), format!("{base}/score"));
    let factory = VerifierFactory::new(&RewardServicesConfig { services, http }).unwrap();
    (factory, service.hits)
}

fn quick() -> HttpConfig {
    HttpConfig {
        connect_timeout_ms: 2_000,
        request_timeout_ms: 10_000,
        max_attempts: 3,
        backoff_initial_ms: 10,
        backoff_max_ms: 40,
    }
}

async fn judge(factory: &VerifierFactory, response: &str) -> Result<f32, VerifyError> {
    let verifier = factory.build(&VerifierSpec::Service {
        name: "judge".into(),
    })?;
    let metadata = BTreeMap::from([("answer".to_owned(), "Paris".to_owned())]);
    verifier
        .score(&VerifyInput {
            prompt: "Capital of France?",
            response,
            metadata: &metadata,
        })
        .await
}

#[tokio::test]
async fn scores_through_the_service() {
    let (factory, hits) = setup(Behaviour::Judge, quick()).await;
    assert_eq!(judge(&factory, "It is Paris.").await.unwrap(), 1.0);
    assert_eq!(judge(&factory, "It is Lyon.").await.unwrap(), 0.0);
    assert_eq!(hits.get(), 2);
}

#[tokio::test]
async fn retries_after_503() {
    let (factory, hits) = setup(Behaviour::FailFirst(2), quick()).await;
    assert_eq!(judge(&factory, "Paris").await.unwrap(), 1.0);
    assert_eq!(hits.get(), 3);
}

#[tokio::test]
async fn gives_up_after_bounded_retries() {
    let (factory, hits) = setup(Behaviour::FailFirst(usize::MAX), quick()).await;
    let err = judge(&factory, "Paris").await.unwrap_err();
    assert!(
        err.is_retryable() && err.to_string().contains("judge"),
        "{err}"
    );
    assert_eq!(hits.get(), 3);
}

#[tokio::test]
async fn no_retry_on_4xx() {
    let (factory, hits) = setup(Behaviour::Unprocessable, quick()).await;
    let err = judge(&factory, "Paris").await.unwrap_err();
    assert!(
        matches!(err, VerifyError::Rejected { status: 422, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("missing field `rubric`"), "{err}");
    assert!(!err.is_retryable());
    assert_eq!(hits.get(), 1);
}

#[tokio::test]
async fn times_out() {
    let http = HttpConfig {
        request_timeout_ms: 200,
        max_attempts: 2,
        ..quick()
    };
    let (factory, hits) = setup(Behaviour::Hang, http).await;
    let err = judge(&factory, "Paris").await.unwrap_err();
    assert!(matches!(err, VerifyError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert_eq!(hits.get(), 2);
}

#[tokio::test]
async fn rejects_a_non_numeric_reward() {
    let (factory, _hits) = setup(Behaviour::NotANumber, quick()).await;
    let err = judge(&factory, "Paris").await.unwrap_err();
    assert!(matches!(err, VerifyError::Protocol { .. }), "{err}");
}

#[tokio::test]
async fn unreachable_service_is_retryable() {
    let services = BTreeMap::from([("judge".to_owned(), format!("{}/score", dead_url().await))]);
    let factory = VerifierFactory::new(&RewardServicesConfig {
        services,
        http: quick(),
    })
    .unwrap();
    let err = judge(&factory, "Paris").await.unwrap_err();
    assert!(
        err.is_retryable() && err.to_string().contains("cannot connect"),
        "{err}"
    );
}
