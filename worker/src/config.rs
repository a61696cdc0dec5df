//! The worker's own configuration section (`[worker]`), and [`ServiceConfig`]: what the
//! worker service runs with (the shared [`RunConfig`] sections plus `[worker]`).

use std::time::Duration;

use flywheel_service::{ConfigError, admin, member_id};
use flywheel_storage::config::RunConfig;
use serde::{Deserialize, Serialize};

use crate::engine::{EngineConfig, SamplingConfig};
use crate::verify::RewardServicesConfig;

/// The `[worker]` section: who this worker is, which engine it drives, how it scores, how it
/// shuts down and where it serves metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// This worker's id: the lease owner and heartbeat member name. Empty picks a unique one
    /// per process ([`member_id`]).
    pub id: String,
    /// The inference engine (`kind = "sim" | "openai"`).
    pub engine: EngineConfig,
    /// How segments are sampled.
    pub sampling: SamplingConfig,
    /// The HTTP reward services prompts may name.
    pub rewards: RewardServicesConfig,
    /// Trajectories generated at once. 0 means the engine's slot count, which keeps its
    /// batches full.
    pub slots: usize,
    /// After SIGTERM the worker exits within this many milliseconds: it stops claiming at
    /// once, lets segments in hand finish until 80% of it, then aborts them and releases
    /// every lease (a spot instance's notice is typically 30 s or 2 min).
    pub grace_period_ms: u64,
    /// How often an idle slot looks for work again, and how often the current version and
    /// budget are re-read, in milliseconds.
    pub poll_interval_ms: u64,
    /// The intake stops taking prompts from Kafka while this many trajectories are pending
    /// (registered, never claimed): the topic, not Redis, is where a backlog should wait.
    /// 0 disables the bound.
    pub max_pending_trajectories: u64,
    /// `host:port` of the HTTP server with `/metrics`, `/healthz` and `/readyz`; empty
    /// disables it.
    pub metrics_addr: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: String::new(),
            engine: EngineConfig::default(),
            sampling: SamplingConfig::default(),
            rewards: RewardServicesConfig::default(),
            slots: 0,
            grace_period_ms: 30_000,
            poll_interval_ms: 200,
            max_pending_trajectories: 4096,
            metrics_addr: "0.0.0.0:9101".into(),
        }
    }
}

impl WorkerConfig {
    /// Checks what can be checked without connecting anywhere.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id.len() > 200 {
            return Err(ConfigError::new("worker.id", "must be at most 200 bytes"));
        }
        if self.grace_period_ms < 100 {
            return Err(ConfigError::new(
                "worker.grace_period_ms",
                "must be at least 100 ms (the worker needs time to release its leases)",
            ));
        }
        if self.poll_interval_ms == 0 || self.poll_interval_ms > 60_000 {
            return Err(ConfigError::new(
                "worker.poll_interval_ms",
                "must be 1..=60000",
            ));
        }
        admin::check_addr("worker.metrics_addr", &self.metrics_addr, true)?;
        self.sampling
            .validate()
            .map_err(|e| ConfigError::new("worker.sampling", e.to_string()))
    }

    /// The worker id: the configured one, else a unique one per process.
    pub fn worker_id(&self) -> String {
        member_id("worker", &self.id)
    }

    /// The grace period as a duration.
    pub fn grace_period(&self) -> Duration {
        Duration::from_millis(self.grace_period_ms)
    }

    /// The poll interval as a duration.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
}

/// What the worker service runs with: the sections every service shares and `[worker]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceConfig {
    /// The sections every service shares (`rollout` matters here).
    pub run: RunConfig,
    /// This service's section.
    pub worker: WorkerConfig,
}

impl ServiceConfig {
    /// Validates every section the worker reads.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.run.validate()?;
        self.worker.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_typos_are_errors() {
        ServiceConfig::default().validate().unwrap();
        let config: WorkerConfig = serde_json::from_value(serde_json::json!({
            "id": "w1", "grace_period_ms": 5000, "engine": {"kind": "sim", "slots": 3},
        }))
        .unwrap();
        assert_eq!(config.worker_id(), "w1");
        assert_eq!(config.grace_period(), Duration::from_secs(5));
        let typo = serde_json::from_value::<WorkerConfig>(serde_json::json!({
            "grace_period": 5000,
        }));
        assert!(typo.is_err());
    }

    #[test]
    fn every_engine_kind_builds_for_a_run() {
        let blobs = flywheel_storage::blob::BlobStore::open("memory://").unwrap();
        for (kind, name) in [("sim", "sim"), ("builtin", "builtin")] {
            let config: WorkerConfig = serde_json::from_value(serde_json::json!({
                "engine": {"kind": kind, "slots": 3},
            }))
            .unwrap();
            let engine = config.engine.build_for_run(&blobs, "r").unwrap();
            assert_eq!((engine.name(), engine.slots()), (name, 3));
        }
        let builtin: WorkerConfig = serde_json::from_value(serde_json::json!({
            "engine": {"kind": "builtin"},
        }))
        .unwrap();
        // Without the run's object store the builtin engine cannot exist: a clear error.
        assert!(builtin.engine.build().is_err());
    }

    #[test]
    fn bad_values_name_the_field() {
        let mut config = WorkerConfig {
            metrics_addr: "nope".into(),
            ..WorkerConfig::default()
        };
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains("worker.metrics_addr"), "{e}");
        config.metrics_addr.clear();
        config.grace_period_ms = 0;
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains("worker.grace_period_ms"), "{e}");
    }
}
