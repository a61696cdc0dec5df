//! The coordinator's HTTP API (axum), served beside `/metrics`, `/healthz` and `/readyz` by
//! the admin server of `flywheel_service`:
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/status` | [`crate::status::StatusReport`] as JSON |
//! | `POST /v1/pause` | admin: the leader stops opening versions and cutting steps |
//! | `POST /v1/resume` | admin: undo pause |
//! | `POST /v1/budget` | admin: `{"version_budget_tokens": N}` sets Φ_r of the versions opened from now on |
//!
//! Admin routes need `Authorization: Bearer <token>` with the configured admin token: a
//! missing or wrong token is 401 and changes nothing; with no token configured every admin
//! call is 401 too (admin is disabled). A change is written to the ledger by the leader
//! (fenced by its leader token) before it takes effect, so it survives a restart and a
//! failover; a standby answers 409 naming the leader; a leader still recovering the run and a
//! ledger failure answer 503 (nothing changed).

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use flywheel_storage::ledger::{EventKind, LedgerError, RunControls, RunEvent};

use crate::service::{Controls, LoopSnapshot};
use crate::status::StatusSources;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// Where reports come from.
    pub sources: StatusSources,
    /// The loop's run-time controls.
    pub controls: Arc<Controls>,
    /// The loop's published summary.
    pub snapshot: Arc<RwLock<LoopSnapshot>>,
    /// The admin bearer token; `None` disables admin calls.
    pub admin_token: Option<String>,
    /// The smallest Φ_r accepted (one segment, S).
    pub min_budget: u64,
    /// This coordinator's candidate id: it tells "holds the lock, still recovering" (try
    /// again) from "a standby" (ask the leader).
    pub id: String,
}

/// The router of the API's `/v1` routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/pause", post(pause))
        .route("/v1/resume", post(resume))
        .route("/v1/budget", post(budget))
        .with_state(state)
}

/// An error body: `{"error": "..."}`.
fn error(code: StatusCode, message: impl Into<String>) -> Response {
    #[derive(Serialize)]
    struct Body {
        error: String,
    }
    (
        code,
        Json(Body {
            error: message.into(),
        }),
    )
        .into_response()
}

async fn status(State(s): State<ApiState>) -> Response {
    let snapshot = s.snapshot.read().map(|g| g.clone()).unwrap_or_default();
    let paused = s.controls.paused.load(Ordering::SeqCst);
    match s.sources.report(&snapshot, paused).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Checks the bearer token in constant time; `Err` is the 401 to send (boxed: a response is
/// large).
fn authorize(s: &ApiState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(expected) = &s.admin_token else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "admin API disabled: set coordinator.admin_token or FLYWHEEL_COORDINATOR_ADMIN_TOKEN",
        )));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    if same {
        Ok(())
    } else {
        Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer <admin token>)",
        )))
    }
}

/// The answer of the admin calls: the controls after the call.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ControlsView {
    /// Whether the loop is paused.
    pub paused: bool,
    /// Φ_r of the versions opened from now on.
    pub version_budget_tokens: u64,
}

fn view(c: &Controls) -> Json<ControlsView> {
    Json(ControlsView {
        paused: c.paused.load(Ordering::SeqCst),
        version_budget_tokens: c.version_budget.load(Ordering::SeqCst),
    })
}

async fn pause(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return *r;
    }
    let version_budget_tokens = s.controls.version_budget.load(Ordering::SeqCst);
    change(&s, true, version_budget_tokens, "paused").await
}

async fn resume(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return *r;
    }
    let version_budget_tokens = s.controls.version_budget.load(Ordering::SeqCst);
    change(&s, false, version_budget_tokens, "resumed").await
}

/// A key part unique to each control change of a leader term (its token is the other part):
/// the time in ms and a counter for calls within the same millisecond.
fn change_id() -> String {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{ms}-{}", CALLS.fetch_add(1, Ordering::SeqCst))
}

/// Makes a control change durable (leader only), then applies it; answers the controls after.
async fn change(s: &ApiState, paused: bool, version_budget: u64, what: &str) -> Response {
    let token = s.controls.leader_token.load(Ordering::SeqCst);
    if token == 0 {
        let leader = match s.sources.state.leader().await {
            Ok(Some(l)) if l.holder == s.id => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "this coordinator took the leader lock and is still recovering the run; \
                     try again shortly",
                );
            }
            Ok(Some(l)) => format!("the leader is {}", l.holder),
            Ok(None) => "no coordinator leads right now; try again shortly".into(),
            Err(e) => format!("the leader cannot be read: {e}"),
        };
        return error(
            StatusCode::CONFLICT,
            format!(
                "this coordinator is a standby and changes nothing: send admin calls to the leader ({leader})"
            ),
        );
    }
    let controls = RunControls {
        paused,
        version_budget_tokens: (version_budget != s.controls.configured_budget)
            .then_some(version_budget),
    };
    let run = &s.sources.run;
    match s.sources.ledger.set_controls(run, &controls, token).await {
        Ok(()) => {}
        Err(e @ LedgerError::LeaderFenced { .. }) => {
            return error(
                StatusCode::CONFLICT,
                format!("this coordinator was deposed and changes nothing: {e}"),
            );
        }
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the ledger did not take the change, so nothing changed: {e}"),
            );
        }
    }
    s.controls.paused.store(paused, Ordering::SeqCst);
    s.controls
        .version_budget
        .store(version_budget, Ordering::SeqCst);
    let event = RunEvent {
        key: format!("controls/token-{token}/{}", change_id()),
        kind: EventKind::ControlsChanged,
        detail: format!(
            "{what} by the admin API: paused {paused}, version_budget_tokens {version_budget}"
        ),
    };
    if let Err(e) = s.sources.ledger.record_event(run, &event).await {
        tracing::warn!(error = %e, "cannot note the control change in the ledger");
    }
    tracing::info!(
        paused,
        version_budget_tokens = version_budget,
        "{what} by the admin API"
    );
    view(&s.controls).into_response()
}

/// The body of `POST /v1/budget`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetRequest {
    /// The new Φ_r.
    pub version_budget_tokens: u64,
}

async fn budget(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return *r;
    }
    let req: BudgetRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body must be {{\"version_budget_tokens\": N}}: {e}"),
            );
        }
    };
    let n = req.version_budget_tokens;
    if n < s.min_budget || n > flywheel_storage::state::MAX_TOKENS {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "version_budget_tokens must be between {} (one segment) and {}",
                s.min_budget,
                flywheel_storage::state::MAX_TOKENS
            ),
        );
    }
    let paused = s.controls.paused.load(Ordering::SeqCst);
    change(&s, paused, n, "budget set").await
}
