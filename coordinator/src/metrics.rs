//! The coordinator's Prometheus metrics, named `flywheel_coordinator_<what>_<unit>`.

use flywheel_service::metrics::{
    counter, counter_vec, exponential_buckets, float_gauge, gauge, gauge_vec, histogram,
};
use flywheel_storage::ledger::DropReason;
use flywheel_storage::state::MemberRole;
use prometheus::{Gauge, Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

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
    /// Times a spent version that could complete no group had its budget widened.
    pub budget_widenings: IntCounter,
    /// Times this process found the state store empty and rebuilt it.
    pub state_rebuilds: IntCounter,
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
    /// The current version's rollout budget (Φ_r, or as widened).
    pub budget_total: IntGauge,
    /// Tokens of it not reserved yet.
    pub budget_remaining: IntGauge,
    /// The run's trajectories by status, as the leader last read them.
    pub trajectories: IntGaugeVec,
    /// The newest step committed (−1 before the first).
    pub step_committed: IntGauge,
    /// The newest step the trainers finished (−1 before the first).
    pub step_finished: IntGauge,
    /// Mean reward of the trajectories of the last committed step.
    pub step_reward: Gauge,
    /// Fraction of those trajectories with the full reward (solved).
    pub step_accuracy: Gauge,
}

impl Metrics {
    /// Fresh metrics in a fresh registry.
    pub fn new() -> Self {
        let r = Registry::new();
        Metrics {
            steps_cut: counter(
                &r,
                "flywheel_coordinator_steps_cut_total",
                "Optimizer steps committed by this coordinator.",
            ),
            step_tokens: histogram(
                &r,
                "flywheel_coordinator_step_tokens",
                "Trained tokens per committed step.",
                exponential_buckets(1024.0, 2.0, 14),
            ),
            batch_cut_latency: histogram(
                &r,
                "flywheel_coordinator_batch_cut_latency_seconds",
                "Time from the cut decision to the step's announcement.",
                exponential_buckets(0.001, 2.0, 14),
            ),
            partition_imbalance: gauge(
                &r,
                "flywheel_coordinator_partition_imbalance_permille",
                "Rank load imbalance of the last step: (max/mean − 1) × 1000.",
            ),
            staleness: histogram(
                &r,
                "flywheel_coordinator_trained_token_staleness_versions",
                "Versions between the policy that generated a trained token and the step.",
                vec![0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0],
            ),
            groups_dropped: counter_vec(
                &r,
                "flywheel_coordinator_groups_dropped_total",
                "Groups dropped (or regenerated), by reason.",
                &["reason"],
            ),
            budget_widenings: counter(
                &r,
                "flywheel_coordinator_budget_widenings_total",
                "Spent version budgets widened because no group could complete.",
            ),
            state_rebuilds: counter(
                &r,
                "flywheel_coordinator_state_rebuilds_total",
                "Times the state store was found empty (Redis lost) and rebuilt from the ledger \
                 and the object store.",
            ),
            members_alive: gauge_vec(
                &r,
                "flywheel_coordinator_members_alive",
                "Members with a live heartbeat, by role.",
                &["role"],
            ),
            is_leader: gauge(
                &r,
                "flywheel_coordinator_leader_state",
                "1 while this coordinator holds the leader lock.",
            ),
            version: gauge(
                &r,
                "flywheel_coordinator_policy_version",
                "The current policy version.",
            ),
            groups_waiting: gauge(
                &r,
                "flywheel_coordinator_groups_waiting",
                "Complete groups waiting for a step.",
            ),
            waiting_tokens: gauge(
                &r,
                "flywheel_coordinator_waiting_tokens",
                "Tokens of the complete groups waiting for a step.",
            ),
            budget_total: gauge(
                &r,
                "flywheel_coordinator_budget_total_tokens",
                "The current version's rollout budget.",
            ),
            budget_remaining: gauge(
                &r,
                "flywheel_coordinator_budget_remaining_tokens",
                "Tokens of the current version's budget not reserved yet.",
            ),
            trajectories: gauge_vec(
                &r,
                "flywheel_coordinator_trajectories",
                "The run's trajectories by status, as the leader last read them.",
                &["status"],
            ),
            step_committed: gauge(
                &r,
                "flywheel_coordinator_step_committed",
                "The newest committed step (-1 before the first).",
            ),
            step_finished: gauge(
                &r,
                "flywheel_coordinator_step_finished",
                "The newest step the trainers finished (-1 before the first).",
            ),
            step_reward: float_gauge(
                &r,
                "flywheel_coordinator_step_reward_mean",
                "Mean reward of the trajectories of the last committed step.",
            ),
            step_accuracy: float_gauge(
                &r,
                "flywheel_coordinator_step_accuracy_ratio",
                "Fraction of the last committed step's trajectories with the full reward.",
            ),
            registry: r,
        }
        .with_known_labels()
    }

    /// Creates every label value known in advance, so each series is exported (at 0) from
    /// the start: dashboards and alerts see a rate of 0, not a missing series.
    fn with_known_labels(self) -> Self {
        for reason in DropReason::ALL {
            self.groups_dropped.with_label_values(&[reason.as_str()]);
        }
        self.groups_dropped
            .with_label_values(&["purged_regenerated"]);
        for role in [MemberRole::Worker, MemberRole::Trainer] {
            self.members_alive.with_label_values(&[role.as_str()]);
        }
        self
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
