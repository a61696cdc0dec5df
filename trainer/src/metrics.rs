//! The trainer's Prometheus metrics (`flywheel_trainer_<what>_<unit>`) and its small HTTP
//! server: `/metrics`, `/healthz` (the process is up) and `/readyz` (weights loaded and on the
//! step board; 503 before that and once shutdown began).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, Registry, TextEncoder,
};

use crate::service::StepOutcome;

/// Every metric the trainer exports, registered in its own registry.
#[derive(Clone)]
pub struct TrainerMetrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Ranks this trainer computed and wrote.
    pub ranks_computed: IntCounter,
    /// Rank or finish attempts that failed (retried later).
    pub errors: IntCounter,
    /// Steps this trainer finished (as the finisher).
    pub steps_finished: IntCounter,
    /// Loss of the last step this trainer finished.
    pub loss: Gauge,
    /// Global gradient norm (before clipping) of that step.
    pub grad_norm: Gauge,
    /// Mean entropy over its trained tokens.
    pub entropy: Gauge,
    /// Fraction of its trained tokens IcePop masked.
    pub masked_ratio: Gauge,
    /// Mean |log k| over its trained tokens.
    pub abs_log_k: Gauge,
    /// Tokens trained in the steps this trainer finished.
    pub tokens_trained: IntCounter,
    /// Seconds per finished step (first rank claimed by this trainer to publication).
    pub step_seconds: Histogram,
    /// Bytes uploaded publishing weights.
    pub weights_bytes_written: IntCounter,
    /// Full size of the versions published (compare with the bytes written).
    pub weights_bytes_published: IntCounter,
    /// The weights version this trainer holds.
    pub version: IntGauge,
}

impl TrainerMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone()))
                .expect("metric names are unique and valid");
            m
        }
        let counter =
            |name: &str, help: &str| reg(&registry, IntCounter::new(name, help).expect("valid"));
        let gauge = |name: &str, help: &str| reg(&registry, Gauge::new(name, help).expect("valid"));
        TrainerMetrics {
            ranks_computed: counter(
                "flywheel_trainer_ranks_computed_total",
                "Ranks computed and written by this trainer.",
            ),
            errors: counter(
                "flywheel_trainer_errors_total",
                "Rank or finish attempts that failed (retried later).",
            ),
            steps_finished: counter(
                "flywheel_trainer_steps_finished_total",
                "Steps this trainer finished as the finisher.",
            ),
            loss: gauge("flywheel_trainer_loss", "Loss of the last finished step."),
            grad_norm: gauge(
                "flywheel_trainer_grad_norm",
                "Global gradient norm before clipping of the last finished step.",
            ),
            entropy: gauge(
                "flywheel_trainer_entropy_nats",
                "Mean entropy over the trained tokens of the last finished step.",
            ),
            masked_ratio: gauge(
                "flywheel_trainer_masked_token_ratio",
                "Fraction of trained tokens IcePop masked in the last finished step.",
            ),
            abs_log_k: gauge(
                "flywheel_trainer_abs_log_k_mean",
                "Mean |log k| (training/inference discrepancy) in the last finished step.",
            ),
            tokens_trained: counter(
                "flywheel_trainer_tokens_trained_total",
                "Tokens trained in the steps this trainer finished.",
            ),
            step_seconds: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "flywheel_trainer_step_seconds",
                        "Seconds per finished step.",
                    )
                    .buckets(prometheus::exponential_buckets(0.01, 2.0, 18).expect("valid")),
                )
                .expect("valid"),
            ),
            weights_bytes_written: counter(
                "flywheel_trainer_weights_bytes_written_total",
                "Bytes uploaded publishing weights versions.",
            ),
            weights_bytes_published: counter(
                "flywheel_trainer_weights_bytes_published_total",
                "Full size of the weights versions published.",
            ),
            version: reg(
                &registry,
                IntGauge::new(
                    "flywheel_trainer_weights_version",
                    "The weights version this trainer holds.",
                )
                .expect("valid"),
            ),
            registry,
        }
    }

    /// Records a finished step.
    pub fn observe_step(&self, o: &StepOutcome) {
        let m = &o.metrics;
        self.steps_finished.inc();
        self.loss.set(m.loss);
        self.grad_norm.set(m.grad_norm);
        self.entropy.set(m.entropy);
        self.masked_ratio.set(m.masked_fraction);
        self.abs_log_k.set(m.mean_abs_log_k);
        self.tokens_trained.inc_by(m.tokens_trained);
        self.step_seconds.observe(m.step_time.as_secs_f64());
        self.weights_bytes_written.inc_by(o.publish.bytes_written);
        self.weights_bytes_published.inc_by(o.publish.bytes_total);
        self.version.set(o.version as i64);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for TrainerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What the HTTP handlers read.
#[derive(Clone)]
struct Http {
    metrics: TrainerMetrics,
    ready: Arc<AtomicBool>,
}

async fn render_metrics(State(http): State<Http>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        http.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(http): State<Http>) -> (StatusCode, &'static str) {
    if http.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Binds `addr` and serves the endpoints until the returned task is aborted. Returns the
/// bound address (port 0 picks a free one) and the server task.
pub async fn serve(
    addr: SocketAddr,
    metrics: TrainerMetrics,
    ready: Arc<AtomicBool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Http { metrics, ready });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::PublishStats;
    use crate::step::StepMetrics;

    #[test]
    fn a_finished_step_shows_in_the_exposition() {
        let m = TrainerMetrics::new();
        m.observe_step(&StepOutcome {
            step: 6,
            version: 7,
            metrics: StepMetrics {
                loss: -0.5,
                grad_norm: 2.0,
                masked_fraction: 0.25,
                tokens_trained: 40,
                ..StepMetrics::default()
            },
            publish: PublishStats {
                bytes_written: 100,
                bytes_total: 400,
                ..PublishStats::default()
            },
            checkpointed: false,
        });
        let text = m.render();
        for line in [
            "flywheel_trainer_loss -0.5",
            "flywheel_trainer_grad_norm 2",
            "flywheel_trainer_masked_token_ratio 0.25",
            "flywheel_trainer_tokens_trained_total 40",
            "flywheel_trainer_weights_bytes_written_total 100",
            "flywheel_trainer_weights_bytes_published_total 400",
            "flywheel_trainer_weights_version 7",
            "flywheel_trainer_steps_finished_total 1",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
    }
}
