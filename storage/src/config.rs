//! Configuration shared by every component: where state lives, and the rollout and batch
//! protocol parameters that workers and the coordinator must agree on (DESIGN.md §6.1, §6.3).
//!
//! Each struct deserialises from one TOML section with defaults for every field, and
//! [`validate`](RunConfig::validate) rejects inconsistent values at start-up with a message
//! that names the field and says what to do.

use flywheel_service::ConfigError;
use serde::{Deserialize, Serialize};

use crate::queue::KafkaConfig;

/// Where the run's state lives (DESIGN.md §5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Names the run: prefixes every Redis key, object key and ledger row.
    pub run_id: String,
    /// `redis://host:port[/db]`, or `memory://` for the embedded mode.
    pub state_url: String,
    /// Object store URL: `s3://bucket[/prefix]`, `file:///abs/path` or `memory://`.
    pub blob_url: String,
    /// Ledger URL: `postgres://…` or `sqlite://path?mode=rwc` / `sqlite::memory:`.
    pub ledger_url: String,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            run_id: "flywheel".into(),
            state_url: "redis://127.0.0.1:6379".into(),
            blob_url: "file:///var/lib/flywheel/blobs".into(),
            ledger_url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
        }
    }
}

impl StorageConfig {
    /// Check the values that can be checked without connecting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let id_ok = !self.run_id.is_empty()
            && self.run_id.len() <= 64
            && self
                .run_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !id_ok {
            return Err(ConfigError::new(
                "storage.run_id",
                "must be 1–64 characters of [A-Za-z0-9_-] (it prefixes keys and object paths)",
            ));
        }
        for (field, value) in [
            ("storage.state_url", &self.state_url),
            ("storage.blob_url", &self.blob_url),
            ("storage.ledger_url", &self.ledger_url),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::new(
                    field,
                    "is empty: set it in the config file or environment",
                ));
            }
        }
        Ok(())
    }
}

/// How rollouts relate to policy versions (DESIGN.md §6.1). One code path, three policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutMode {
    /// Baseline: every trajectory of a step runs to the end under one version.
    Sync,
    /// C3PO++: a per-version token budget; unfinished trajectories are parked and continued
    /// by the next version, purged after σ version bumps.
    Partial,
    /// Workers never wait for a started trajectory; starting new ones is bounded by a budget
    /// of (η + 1) · Φ_r tokens per version, and a trajectory more than η versions behind the
    /// current one is abandoned (its group dropped).
    Async,
}

/// What happens to a group one of whose trajectories outlived the retention limit σ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PurgeAction {
    /// Drop the whole group; the ledger records the prompt as dropped.
    Drop,
    /// Regenerate the trajectory from scratch under the current version (recorded too).
    Regenerate,
}

/// The rollout protocol: budgets, segments, retention, leases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    pub mode: RolloutMode,
    /// Φ_r: tokens each policy version may generate before the policy is updated (in `async`
    /// mode versions open with (η + 1) · Φ_r).
    pub version_budget_tokens: u64,
    /// S: the most tokens generated per segment (one reservation, one object, one index write).
    pub segment_tokens: u32,
    /// Longest response a trajectory may reach; it finishes with `length` there.
    pub max_response_tokens: u32,
    /// σ: version bumps a parked trajectory may survive before it is purged.
    pub retention_limit: u32,
    /// What a purge does to the group.
    pub purge_action: PurgeAction,
    /// η (async mode): the most versions between a trajectory's first version and the current
    /// one; a trajectory further behind is abandoned, and each version admits (η + 1) · Φ_r
    /// tokens of new work.
    pub max_lag: u32,
    /// How long a lease lasts without renewal; another worker may steal it afterwards.
    pub lease_ms: u64,
    /// Failed attempts (engine or verifier errors, counted per trajectory over every worker)
    /// after which a trajectory whose last error cannot succeed on a retry (a rejected
    /// request, an unknown reward service, a prompt the tokenizer refuses) gives up and its
    /// group is dropped (`generation_failed`).
    pub max_failures: u32,
    /// The same bound when the last error may pass (an engine or reward service unavailable or
    /// timing out, an object-store failure): larger, so an outage does not drop the prompts
    /// it meets, but finite, so a prompt that always times out cannot loop.
    pub max_transient_failures: u32,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            mode: RolloutMode::Partial,
            version_budget_tokens: 409_600,
            segment_tokens: 256,
            max_response_tokens: 8192,
            retention_limit: 4,
            purge_action: PurgeAction::Drop,
            max_lag: 2,
            lease_ms: 10_000,
            max_failures: 3,
            max_transient_failures: 20,
        }
    }
}

impl RolloutConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.segment_tokens == 0 {
            return Err(ConfigError::new(
                "rollout.segment_tokens",
                "must be at least 1",
            ));
        }
        if self.max_response_tokens < self.segment_tokens {
            return Err(ConfigError::new(
                "rollout.max_response_tokens",
                format!(
                    "must be at least rollout.segment_tokens ({})",
                    self.segment_tokens
                ),
            ));
        }
        if self.version_budget_tokens < u64::from(self.segment_tokens) {
            return Err(ConfigError::new(
                "rollout.version_budget_tokens",
                format!(
                    "must be at least rollout.segment_tokens ({}) or no segment fits in a version",
                    self.segment_tokens
                ),
            ));
        }
        if self.lease_ms < 100 {
            return Err(ConfigError::new(
                "rollout.lease_ms",
                "must be at least 100 ms",
            ));
        }
        if self.max_failures == 0 || self.max_transient_failures < self.max_failures {
            return Err(ConfigError::new(
                "rollout.max_failures",
                format!(
                    "must be at least 1, and rollout.max_transient_failures ({}) at least as \
                     large",
                    self.max_transient_failures
                ),
            ));
        }
        Ok(())
    }
}

/// How step batches are cut (DESIGN.md §6.3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Φ: tokens trained per optimizer step, and the constant loss normaliser.
    pub token_budget: u64,
    /// M: the most tokens in one micro-batch (one forward/backward pass of one rank).
    pub micro_batch_tokens: u64,
    /// Drop groups whose rewards are all equal: they carry no learning signal.
    pub filter_zero_variance: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            token_budget: 409_600,
            micro_batch_tokens: 16_384,
            filter_zero_variance: true,
        }
    }
}

impl BatchConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.token_budget == 0 {
            return Err(ConfigError::new("batch.token_budget", "must be at least 1"));
        }
        if self.micro_batch_tokens == 0 {
            return Err(ConfigError::new(
                "batch.micro_batch_tokens",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The parts of the configuration every service reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunConfig {
    pub storage: StorageConfig,
    /// The prompt queue (brokers, topic, consumer group, limits).
    pub kafka: KafkaConfig,
    pub rollout: RolloutConfig,
    pub batch: BatchConfig,
}

impl RunConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.storage.validate()?;
        self.kafka
            .validate()
            .map_err(|e| ConfigError::new("kafka", format!("is not usable: {e}")))?;
        self.rollout.validate()?;
        self.batch.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        RunConfig::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let mut config = RunConfig::default();
        config.rollout.segment_tokens = 0;
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("rollout.segment_tokens"), "{message}");

        let mut config = RunConfig::default();
        config.storage.run_id = "has spaces".into();
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("storage.run_id"), "{message}");

        let mut config = RunConfig::default();
        config.rollout.version_budget_tokens = 10;
        config.rollout.segment_tokens = 64;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("version_budget_tokens")
        );
    }
}
