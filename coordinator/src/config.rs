//! The coordinator's own configuration section, `[coordinator]` in the run's TOML file (the
//! binary composes it with the shared [`flywheel_storage::config::RunConfig`]).

use std::time::Duration;

use flywheel_service::{ConfigError, admin};
use flywheel_storage::config::RunConfig;
use serde::{Deserialize, Serialize};

/// Environment variable that supplies the admin token when the file does not.
pub const ADMIN_TOKEN_ENV: &str = "FLYWHEEL_COORDINATOR_ADMIN_TOKEN";

/// `[coordinator]`: how the coordinator service runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address of the HTTP API (`/healthz`, `/readyz`, `/metrics`, `/v1/*`).
    pub bind: String,
    /// Bearer token of the admin endpoints (`/v1/pause`, `/v1/resume`, `/v1/budget`). Unset:
    /// read from `FLYWHEEL_COORDINATOR_ADMIN_TOKEN`; unset there too: admin calls are refused.
    pub admin_token: Option<String>,
    /// This candidate's id in the leader election; empty picks a unique one per process
    /// ([`flywheel_service::member_id`]).
    pub candidate_id: String,
    /// How often the loop runs (leadership renewal, stream reading, step cutting), ms.
    pub tick_ms: u64,
    /// Leader lock lifetime, ms: a standby takes over this long after the leader dies. Must
    /// be at least three ticks so a live leader renews it in time.
    pub leader_ttl_ms: u64,
    /// Finished-stream entries read per call.
    pub read_batch: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            bind: "0.0.0.0:9464".into(),
            admin_token: None,
            candidate_id: String::new(),
            tick_ms: 250,
            leader_ttl_ms: 3_000,
            read_batch: 1_000,
        }
    }
}

impl CoordinatorConfig {
    /// Checks the values at start-up.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, problem: String| Err(ConfigError::new(field, problem));
        admin::check_addr("coordinator.bind", &self.bind, false)?;
        if self.tick_ms == 0 || self.tick_ms > 60_000 {
            return bad("coordinator.tick_ms", "must be 1..=60000".into());
        }
        if self.leader_ttl_ms < 3 * self.tick_ms {
            return bad(
                "coordinator.leader_ttl_ms",
                format!("must be at least 3 × tick_ms ({})", 3 * self.tick_ms),
            );
        }
        if self.read_batch == 0 {
            return bad("coordinator.read_batch", "must be at least 1".into());
        }
        if self.admin_token.as_deref() == Some("") {
            return bad(
                "coordinator.admin_token",
                "is empty: leave it unset or set a secret".into(),
            );
        }
        Ok(())
    }

    /// The admin token: the file's, else the environment's, else none (admin disabled).
    pub fn resolved_admin_token(&self) -> Option<String> {
        self.admin_token.clone().or_else(|| {
            std::env::var(ADMIN_TOKEN_ENV)
                .ok()
                .filter(|t| !t.is_empty())
        })
    }

    /// The tick interval.
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms)
    }

    /// The leader lock lifetime.
    pub fn leader_ttl(&self) -> Duration {
        Duration::from_millis(self.leader_ttl_ms)
    }
}

/// What the coordinator service runs with: the sections every service shares and
/// `[coordinator]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceConfig {
    /// The sections every service shares (`rollout` and `batch` matter here).
    pub run: RunConfig,
    /// This service's section.
    pub coordinator: CoordinatorConfig,
}

impl ServiceConfig {
    /// Validates every section the coordinator reads.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.run.validate()?;
        self.coordinator.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_errors_name_the_field() {
        CoordinatorConfig::default().validate().unwrap();
        let c = CoordinatorConfig {
            leader_ttl_ms: 10,
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("leader_ttl_ms")
        );
        let c = CoordinatorConfig {
            bind: "nowhere".into(),
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("coordinator.bind")
        );
    }
}
