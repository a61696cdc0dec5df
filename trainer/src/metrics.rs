//! The trainer's Prometheus metrics, `flywheel_trainer_<what>_<unit>` (served by the admin
//! server of `flywheel_service`).

use flywheel_service::metrics::{
    counter, counter_vec, exponential_buckets, float_gauge, gauge, histogram, histogram_vec,
};
use prometheus::{Gauge, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry};

use crate::service::{Exchanged, StepOutcome};

/// The `outcome` labels of `flywheel_trainer_rank_exchanges_total`.
const EXCHANGE_OUTCOMES: [&str; 4] = ["store", "fell_back", "formed", "kept"];

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
    /// Bytes each finished step wrote to the object store (gradients, weights and, at a
    /// checkpoint, the optimizer state).
    pub step_bytes_written: Histogram,
    /// Steps replayed to rebuild the optimizer state before a step (module
    /// `service`: only after a restart or another trainer's finish).
    pub steps_replayed: IntCounter,
    /// Seconds of each phase of finishing a step (the finisher's split of the step time).
    pub step_phase_seconds: HistogramVec,
    /// Seconds to compute one rank (fetch, forward, backward).
    pub rank_seconds: Histogram,
    /// How each computed rank's gradient went, by outcome: `store` (not exchanged),
    /// `fell_back` (an exchange failed), `formed` or `kept` (summed by an exchange, with a new
    /// or the kept communicator).
    pub rank_exchanges: IntCounterVec,
}

impl TrainerMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let r = Registry::new();
        TrainerMetrics {
            ranks_computed: counter(
                &r,
                "flywheel_trainer_ranks_computed_total",
                "Ranks computed and written by this trainer.",
            ),
            errors: counter(
                &r,
                "flywheel_trainer_errors_total",
                "Rank or finish attempts that failed (retried later).",
            ),
            steps_finished: counter(
                &r,
                "flywheel_trainer_steps_finished_total",
                "Steps this trainer finished as the finisher.",
            ),
            loss: float_gauge(
                &r,
                "flywheel_trainer_loss",
                "Loss of the last finished step.",
            ),
            grad_norm: float_gauge(
                &r,
                "flywheel_trainer_grad_norm",
                "Global gradient norm before clipping of the last finished step.",
            ),
            entropy: float_gauge(
                &r,
                "flywheel_trainer_entropy_nats",
                "Mean entropy over the trained tokens of the last finished step.",
            ),
            masked_ratio: float_gauge(
                &r,
                "flywheel_trainer_masked_token_ratio",
                "Fraction of trained tokens IcePop masked in the last finished step.",
            ),
            abs_log_k: float_gauge(
                &r,
                "flywheel_trainer_abs_log_k_mean",
                "Mean |log k| (training/inference discrepancy) in the last finished step.",
            ),
            tokens_trained: counter(
                &r,
                "flywheel_trainer_tokens_trained_total",
                "Tokens trained in the steps this trainer finished.",
            ),
            step_seconds: histogram(
                &r,
                "flywheel_trainer_step_seconds",
                "Seconds per finished step.",
                exponential_buckets(0.01, 2.0, 18),
            ),
            weights_bytes_written: counter(
                &r,
                "flywheel_trainer_weights_bytes_written_total",
                "Bytes uploaded publishing weights versions.",
            ),
            weights_bytes_published: counter(
                &r,
                "flywheel_trainer_weights_bytes_published_total",
                "Full size of the weights versions published.",
            ),
            version: gauge(
                &r,
                "flywheel_trainer_weights_version",
                "The weights version this trainer holds.",
            ),
            step_bytes_written: histogram(
                &r,
                "flywheel_trainer_step_bytes_written",
                "Bytes a finished step wrote to the object store.",
                exponential_buckets(1024.0, 4.0, 16),
            ),
            step_phase_seconds: histogram_vec(
                &r,
                "flywheel_trainer_step_phase_seconds",
                "Seconds of each phase of finishing a step, by phase.",
                &["phase"],
                exponential_buckets(0.001, 2.0, 20),
            ),
            rank_seconds: histogram(
                &r,
                "flywheel_trainer_rank_seconds",
                "Seconds to compute one rank of a step.",
                exponential_buckets(0.01, 2.0, 18),
            ),
            steps_replayed: counter(
                &r,
                "flywheel_trainer_steps_replayed_total",
                "Steps replayed from a checkpoint to rebuild the optimizer state.",
            ),
            rank_exchanges: counter_vec(
                &r,
                "flywheel_trainer_rank_exchanges_total",
                "Computed ranks by how their gradient went: store, fell_back, formed, kept.",
                &["outcome"],
            ),
            registry: r,
        }
        .with_known_labels()
    }

    /// Creates the phases' series (empty histograms) from the start, so dashboards see them
    /// before the first step.
    fn with_known_labels(self) -> Self {
        for phase in crate::service::STEP_PHASES {
            self.step_phase_seconds.with_label_values(&[phase]);
        }
        for outcome in EXCHANGE_OUTCOMES {
            self.rank_exchanges.with_label_values(&[outcome]);
        }
        self
    }

    /// Records how a computed rank's gradient went.
    pub fn observe_exchange(&self, exchanged: Exchanged) {
        let outcome = match exchanged {
            Exchanged::Store => "store",
            Exchanged::FellBack => "fell_back",
            Exchanged::Summed { formed: true } => "formed",
            Exchanged::Summed { formed: false } => "kept",
        };
        self.rank_exchanges.with_label_values(&[outcome]).inc();
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
        self.step_bytes_written.observe(o.bytes.total() as f64);
        self.steps_replayed.inc_by(o.replayed);
        for (phase, took) in &o.phases {
            self.step_phase_seconds
                .with_label_values(&[phase])
                .observe(took.as_secs_f64());
        }
    }
}

impl Default for TrainerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{PublishStats, StepBytes};
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
            bytes: StepBytes {
                gradients: 30,
                weights: 100,
                optimizer: 0,
            },
            checkpointed: false,
            replayed: 2,
            phases: vec![("publish", std::time::Duration::from_millis(250))],
            exchange: Exchanged::Summed { formed: false },
        });
        m.observe_exchange(Exchanged::Summed { formed: true });
        let text = flywheel_service::metrics::render(&m.registry);
        for line in [
            "flywheel_trainer_loss -0.5",
            "flywheel_trainer_grad_norm 2",
            "flywheel_trainer_masked_token_ratio 0.25",
            "flywheel_trainer_tokens_trained_total 40",
            "flywheel_trainer_weights_bytes_written_total 100",
            "flywheel_trainer_weights_bytes_published_total 400",
            "flywheel_trainer_weights_version 7",
            "flywheel_trainer_steps_finished_total 1",
            "flywheel_trainer_step_bytes_written_sum 130",
            "flywheel_trainer_steps_replayed_total 2",
            r#"flywheel_trainer_step_phase_seconds_sum{phase="publish"} 0.25"#,
            r#"flywheel_trainer_rank_exchanges_total{outcome="formed"} 1"#,
            r#"flywheel_trainer_rank_exchanges_total{outcome="fell_back"} 0"#,
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
    }
}
