//! The coordinator's Prometheus metrics, named `flywheel_coordinator_<what>_<unit>`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the coordinator exports, registered in its own registry.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Steps committed (manifest, ledger, announcement) by this process.
    pub steps_cut: IntCounter,
    /// Trained tokens per committed step.
    pub step_tokens: Histogram,
    /// Time from the cut decision to the announcement, seconds.
    pub batch_cut_latency: Histogram,
    /// max/mean rank load of the last step, minus 1 (0 is perfect balance), in thousandths.
    pub partition_imbalance: IntGauge,
    /// Staleness of trained tokens in versions (step − generating version), one observation
    /// per token.
    pub staleness: Histogram,
    /// Groups dropped (or regenerated) by reason.
    pub groups_dropped: IntCounterVec,
    /// Live members by role (`worker`, `trainer`).
    pub members_alive: IntGaugeVec,
    /// 1 while this process leads.
    pub is_leader: IntGauge,
    /// The current policy version.
    pub version: IntGauge,
    /// Complete groups waiting for a step.
    pub groups_waiting: IntGauge,
    /// Tokens of the complete groups waiting.
    pub waiting_tokens: IntGauge,
}

impl Metrics {
    /// Fresh metrics in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let steps_cut = IntCounter::new(
            "flywheel_coordinator_steps_cut_total",
            "Optimizer steps committed by this coordinator.",
        )
        .expect("valid metric");
        let step_tokens = Histogram::with_opts(
            HistogramOpts::new(
                "flywheel_coordinator_step_tokens",
                "Trained tokens per committed step.",
            )
            .buckets(prometheus::exponential_buckets(1024.0, 2.0, 14).expect("valid buckets")),
        )
        .expect("valid metric");
        let batch_cut_latency = Histogram::with_opts(
            HistogramOpts::new(
                "flywheel_coordinator_batch_cut_latency_seconds",
                "Time from the cut decision to the step's announcement.",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.0, 14).expect("valid buckets")),
        )
        .expect("valid metric");
        let partition_imbalance = IntGauge::new(
            "flywheel_coordinator_partition_imbalance_permille",
            "Rank load imbalance of the last step: (max/mean − 1) × 1000.",
        )
        .expect("valid metric");
        let staleness = Histogram::with_opts(
            HistogramOpts::new(
                "flywheel_coordinator_trained_token_staleness_versions",
                "Versions between the policy that generated a trained token and the step.",
            )
            .buckets(vec![0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0]),
        )
        .expect("valid metric");
        let groups_dropped = IntCounterVec::new(
            Opts::new(
                "flywheel_coordinator_groups_dropped_total",
                "Groups dropped (or regenerated), by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let members_alive = IntGaugeVec::new(
            Opts::new(
                "flywheel_coordinator_members_alive_count",
                "Members with a live heartbeat, by role.",
            ),
            &["role"],
        )
        .expect("valid metric");
        let is_leader = IntGauge::new(
            "flywheel_coordinator_leader_state",
            "1 while this coordinator holds the leader lock.",
        )
        .expect("valid metric");
        let version = IntGauge::new(
            "flywheel_coordinator_policy_version",
            "The current policy version.",
        )
        .expect("valid metric");
        let groups_waiting = IntGauge::new(
            "flywheel_coordinator_groups_waiting_count",
            "Complete groups waiting for a step.",
        )
        .expect("valid metric");
        let waiting_tokens = IntGauge::new(
            "flywheel_coordinator_waiting_tokens",
            "Tokens of the complete groups waiting for a step.",
        )
        .expect("valid metric");
        for c in [
            Box::new(steps_cut.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(step_tokens.clone()),
            Box::new(batch_cut_latency.clone()),
            Box::new(partition_imbalance.clone()),
            Box::new(staleness.clone()),
            Box::new(groups_dropped.clone()),
            Box::new(members_alive.clone()),
            Box::new(is_leader.clone()),
            Box::new(version.clone()),
            Box::new(groups_waiting.clone()),
            Box::new(waiting_tokens.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            steps_cut,
            step_tokens,
            batch_cut_latency,
            partition_imbalance,
            staleness,
            groups_dropped,
            members_alive,
            is_leader,
            version,
            groups_waiting,
            waiting_tokens,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
