//! The task's exact reward as an HTTP reward service, the way a deployment scores with its
//! own service (the protocol of `flywheel_worker::verify::RewardService`:
//! `POST {"prompt", "response", "metadata"}` → `{"reward"}`).
//!
//! Prompts of the task name it [`SERVICE_NAME`]; `flywheel demo` serves it on a loopback port
//! inside its process, and a distributed run starts it as a process (`flywheel rewards`)
//! that the workers' `[worker.rewards.services]` point at. The prompt is parsed back into its
//! problem ([`Problem::from_prompt`]) and the response scored with [`Problem::reward`], the
//! function held-out accuracy uses too. (The generic `math` verifier would accept `019` for
//! 19, a format the policy drifts to from its zero-padded running totals.)

use std::collections::BTreeMap;
use std::future::Future;

use axum::http::StatusCode;
use flywheel_storage::{Prompt, PromptInput, VerifierSpec};
use serde::Deserialize;

use crate::problems::{Problem, TaskConfig};

/// The name prompts of the task give their verifier (`VerifierSpec::Service`).
pub const SERVICE_NAME: &str = "addition";

/// The path the service answers on.
pub const PATH: &str = "/reward";

/// The prompt `id` asking for `group_size` responses to `problem`, scored by this service.
pub fn prompt(task: &TaskConfig, problem: &Problem, id: &str, group_size: u32) -> Prompt {
    Prompt {
        id: id.into(),
        input: PromptInput::Text(task.prompt(problem)),
        verifier: VerifierSpec::Service {
            name: SERVICE_NAME.into(),
        },
        group_size,
        metadata: BTreeMap::from([("terms".into(), problem.terms.len().to_string())]),
    }
}

/// What the service reads of a request (the rest is ignored).
#[derive(Deserialize)]
struct ScoreRequest {
    /// The prompt's text, from which the problem is parsed back.
    prompt: String,
    /// The response's text, without EOS.
    response: String,
}

/// 200 with the reward, or 400 when the prompt is not one of the task's.
async fn score(
    axum::Json(req): axum::Json<ScoreRequest>,
) -> Result<axum::Json<serde_json::Value>, (StatusCode, String)> {
    // The error names the addition task and what is wrong with the prompt.
    let problem =
        Problem::from_prompt(&req.prompt).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(axum::Json(
        serde_json::json!({ "reward": problem.reward(&req.response) }),
    ))
}

/// Serves the reward on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(PATH, axum::routing::post(score));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The URL workers POST to for a service listening on `addr`.
pub fn url(addr: std::net::SocketAddr) -> String {
    format!("http://{addr}{PATH}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scores_over_http_and_explains_foreign_prompts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = url(listener.local_addr().unwrap());
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(serve(listener, stop.clone().cancelled_owned()));
        let task = TaskConfig::default();
        let problem = Problem {
            terms: vec![3, 9, 7],
        };
        let prompt = task.prompt(&problem);
        let client = reqwest::Client::new();
        let post = |response: &str, prompt: &str| {
            client
                .post(&url)
                .json(
                    &serde_json::json!({ "prompt": prompt, "response": response, "metadata": {} }),
                )
                .send()
        };
        for (response, want) in [("03,12,19;19", 1.0), ("03,12,19;019", 0.0), ("19", 0.0)] {
            let reply: serde_json::Value = post(response, &prompt)
                .await
                .unwrap()
                .error_for_status()
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(reply["reward"], want, "{response}");
        }
        let foreign = post("1", "What is 1+1?").await.unwrap();
        assert_eq!(foreign.status(), StatusCode::BAD_REQUEST.as_u16());
        assert!(foreign.text().await.unwrap().contains("addition task"));
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
