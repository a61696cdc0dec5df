//! The admin HTTP server every service runs: `/metrics`, `/healthz` and `/readyz`, plus any
//! routes of the service's own (the coordinator's `/v1/*`).
//!
//! `/healthz` answers 200 while the process runs (liveness). `/readyz` has one meaning for
//! every service: the service has started and is not draining ([`Readiness::set_serving`]),
//! and every dependency it needs answers ([`Readiness::add_check`], each bounded by
//! [`CHECK_TIMEOUT`]); otherwise 503 with the reason.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;

/// How long one dependency check of `/readyz` may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// How long [`AdminServer::stop`] waits for requests in flight.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

type Check = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// What `/readyz` reports. Cloning shares it: the service flips it, the server reads it.
#[derive(Clone, Default)]
pub struct Readiness {
    inner: Arc<ReadinessInner>,
}

#[derive(Default)]
struct ReadinessInner {
    /// Started and not draining.
    serving: AtomicBool,
    /// Named dependency checks, all of which must pass.
    checks: RwLock<Vec<(String, Check)>>,
}

impl Readiness {
    /// Not serving, no checks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a dependency that must answer for the service to be ready, e.g. a ping of the
    /// state store. `check` returns why it is not usable.
    pub fn add_check<F, Fut>(&self, name: impl Into<String>, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let check: Check = Arc::new(move || Box::pin(check()));
        self.inner
            .checks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.into(), check));
    }

    /// Says the service is serving (started) or not (starting, draining).
    pub fn set_serving(&self, serving: bool) {
        self.inner.serving.store(serving, Ordering::SeqCst);
    }

    /// Whether the service says it is serving.
    pub fn is_serving(&self) -> bool {
        self.inner.serving.load(Ordering::SeqCst)
    }

    /// Ready, or why not.
    pub async fn check(&self) -> Result<(), String> {
        if !self.is_serving() {
            return Err("not serving (starting up or shutting down)".into());
        }
        let checks: Vec<(String, Check)> = self
            .inner
            .checks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (name, check) in checks {
            match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                Ok(Ok(())) => {}
                Ok(Err(why)) => return Err(format!("{name}: {why}")),
                Err(_) => return Err(format!("{name}: no answer within {CHECK_TIMEOUT:?}")),
            }
        }
        Ok(())
    }
}

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot serve the admin API on {addr}: {source}; free the port or configure another address"
)]
pub struct AdminError {
    /// The address.
    pub addr: String,
    /// The bind error.
    #[source]
    pub source: std::io::Error,
}

/// Checks an admin address setting: `HOST:PORT`, or empty when `may_disable` (no server).
pub fn check_addr(field: &'static str, addr: &str, may_disable: bool) -> Result<(), ConfigError> {
    if addr.is_empty() && may_disable {
        return Ok(());
    }
    if addr.parse::<SocketAddr>().is_err() {
        let off = if may_disable {
            "; empty turns the server off"
        } else {
            ""
        };
        return Err(ConfigError::new(
            field,
            format!("= {addr:?} is not HOST:PORT (e.g. 0.0.0.0:9100){off}"),
        ));
    }
    Ok(())
}

/// What the handlers read.
#[derive(Clone)]
struct Admin {
    registry: Registry,
    readiness: Readiness,
}

async fn metrics(State(admin): State<Admin>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&admin.registry),
    )
        .into_response()
}

async fn readyz(State(admin): State<Admin>) -> Response {
    match admin.readiness.check().await {
        Ok(()) => "ready".into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

/// The admin router over `registry` and `readiness`, with `routes` merged in.
pub fn router(registry: Registry, readiness: Readiness, routes: Router) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Admin {
            registry,
            readiness,
        })
        .merge(routes)
}

/// A running admin server.
pub struct AdminServer {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    /// Binds `addr` (port 0 picks a free one) and serves [`router`] in the background.
    pub async fn start(
        addr: &str,
        registry: Registry,
        readiness: Readiness,
        routes: Router,
    ) -> Result<AdminServer, AdminError> {
        let bind_error = |source| AdminError {
            addr: addr.to_owned(),
            source,
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(bind_error)?;
        let bound = listener.local_addr().map_err(bind_error)?;
        let app = router(registry, readiness, routes);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "admin server stopped");
            }
        });
        tracing::info!(%bound, "serving /metrics, /healthz, /readyz");
        Ok(AdminServer {
            addr: bound,
            stop,
            task,
        })
    }

    /// [`AdminServer::start`] unless `addr` is empty (the server is off).
    pub async fn start_unless_empty(
        addr: &str,
        registry: Registry,
        readiness: Readiness,
    ) -> Result<Option<AdminServer>, AdminError> {
        if addr.is_empty() {
            return Ok(None);
        }
        Self::start(addr, registry, readiness, Router::new())
            .await
            .map(Some)
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in flight finish (bounded), and returns.
    pub async fn stop(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_err() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readyz_means_serving_and_every_dependency_answers() {
        let registry = Registry::new();
        crate::metrics::counter(&registry, "flywheel_test_requests_total", "Requests.").inc();
        let readiness = Readiness::new();
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        readiness.add_check("state store", move || {
            let ok = h.load(Ordering::SeqCst);
            async move {
                if ok {
                    Ok(())
                } else {
                    Err("connection refused".into())
                }
            }
        });
        let extra = Router::new().route("/v1/hello", get(|| async { "hi" }));
        let server = AdminServer::start("127.0.0.1:0", registry, readiness.clone(), extra)
            .await
            .unwrap();
        let base = format!("http://{}", server.local_addr());
        let get = |path: &str| {
            let url = format!("{base}{path}");
            async move {
                let r = reqwest::get(url).await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        };
        assert_eq!(get("/healthz").await, (200, "ok".into()));
        assert_eq!(get("/v1/hello").await, (200, "hi".into()));
        assert!(
            get("/metrics")
                .await
                .1
                .contains("flywheel_test_requests_total 1")
        );
        let (code, why) = get("/readyz").await;
        assert_eq!(code, 503);
        assert!(why.contains("not serving"), "{why}");
        readiness.set_serving(true);
        assert_eq!(get("/readyz").await, (200, "ready".into()));
        healthy.store(false, Ordering::SeqCst);
        let (code, why) = get("/readyz").await;
        assert_eq!(code, 503);
        assert!(why.contains("state store: connection refused"), "{why}");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_taken_port_is_a_clear_error() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let Err(e) =
            AdminServer::start(&addr, Registry::new(), Readiness::new(), Router::new()).await
        else {
            panic!("bound a taken port");
        };
        assert!(e.to_string().contains(&addr), "{e}");
        assert!(check_addr("worker.admin_addr", "nope", true).is_err());
        assert!(check_addr("worker.admin_addr", "", true).is_ok());
        assert!(check_addr("coordinator.bind", "", false).is_err());
    }
}
