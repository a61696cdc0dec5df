//! The stores of a run, opened in one place from its configuration: what every service's
//! `run_until(stores, config, shutdown)` works on.

use std::sync::Arc;

use flywheel_service::{ConfigError, Readiness, redact_url};

use crate::blob::{BlobError, BlobStore};
use crate::config::RunConfig;
use crate::ledger::{self, Ledger, LedgerError};
use crate::queue::KafkaConfig;
use crate::state::{self, StateError, StateStore};

/// Why the run's stores could not be opened; each names the setting to check.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state store (`storage.state_url`) could not be opened.
    #[error("opening the state store (storage.state_url): {0}")]
    State(#[from] StateError),
    /// The object store (`storage.blob_url`) could not be opened.
    #[error("opening the object store (storage.blob_url): {0}")]
    Blob(#[from] BlobError),
    /// The ledger (`storage.ledger_url`) could not be opened or the run recorded.
    #[error("opening the ledger (storage.ledger_url): {0}")]
    Ledger(#[from] LedgerError),
}

/// A run's state store, ledger, object store and prompt queue. Cloning shares them: the
/// embedded mode runs every service on one `RunStores` (its memory state exists once).
#[derive(Clone)]
pub struct RunStores {
    /// The run: every key, object and ledger row is under it.
    pub run_id: String,
    /// Trajectory index, leases, budgets, versions, the step board, membership.
    pub state: Arc<dyn StateStore>,
    /// The durable record: prompts, steps, drops, checkpoints.
    pub ledger: Arc<dyn Ledger>,
    /// Segments, manifests, weights, checkpoints.
    pub blobs: BlobStore,
    /// Where prompts come from; `None` for a process that takes none (a worker then runs its
    /// segment loop on prompts registered by others).
    pub queue: Option<KafkaConfig>,
}

impl RunStores {
    /// Opens the stores `config.storage` names and records the run in the ledger (with its
    /// configuration, credentials redacted) unless it is there already.
    pub async fn open(config: &RunConfig) -> Result<RunStores, OpenError> {
        config.validate()?;
        let s = &config.storage;
        let stores = RunStores {
            run_id: s.run_id.clone(),
            state: state::open(&s.state_url, &s.run_id).await?,
            ledger: ledger::open(&s.ledger_url).await?,
            blobs: BlobStore::open(&s.blob_url)?,
            queue: Some(config.kafka.clone()),
        };
        stores
            .ledger
            .create_run(&s.run_id, &config.redacted_json())
            .await?;
        Ok(stores)
    }

    /// Adds the checks `/readyz` needs: the state store and the ledger answer.
    pub fn add_readiness_checks(&self, readiness: &Readiness) {
        let state = self.state.clone();
        readiness.add_check("state store", move || {
            let state = state.clone();
            async move { state.leader().await.map(|_| ()).map_err(|e| e.to_string()) }
        });
        let (ledger, run) = (self.ledger.clone(), self.run_id.clone());
        readiness.add_check("ledger", move || {
            let (ledger, run) = (ledger.clone(), run.clone());
            async move {
                ledger
                    .last_step(&run)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        });
    }
}

impl RunConfig {
    /// The configuration as JSON with every credential replaced by `***`: what the ledger
    /// keeps and logs may show.
    pub fn redacted_json(&self) -> serde_json::Value {
        let mut c = self.clone();
        for url in [
            &mut c.storage.state_url,
            &mut c.storage.blob_url,
            &mut c.storage.ledger_url,
        ] {
            *url = redact_url(url);
        }
        for (key, value) in &mut c.kafka.librdkafka {
            let key = key.to_ascii_lowercase();
            if ["password", "secret", "key", "token", "jaas"]
                .iter()
                .any(|s| key.contains(s))
            {
                *value = "***".into();
            }
        }
        serde_json::to_value(&c).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recorded_config_holds_no_secret() {
        let mut c = RunConfig::default();
        c.storage.ledger_url = "postgres://flywheel:pg-secret@db:5432/runs".into();
        c.storage.state_url = "redis://:redis-secret@cache:6379".into();
        c.storage.blob_url = "s3://b/p?secret_access_key=s3-secret&region=eu".into();
        c.kafka
            .librdkafka
            .insert("sasl.password".into(), "kafka-secret".into());
        c.kafka
            .librdkafka
            .insert("security.protocol".into(), "SASL_SSL".into());
        let text = c.redacted_json().to_string();
        for secret in ["pg-secret", "redis-secret", "s3-secret", "kafka-secret"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(
            text.contains("SASL_SSL") && text.contains("region=eu"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn embedded_stores_open_and_record_the_run() {
        let mut c = RunConfig::default();
        c.storage.run_id = "stores-test".into();
        c.storage.state_url = "memory://".into();
        c.storage.blob_url = "memory://".into();
        c.storage.ledger_url = "sqlite::memory:".into();
        let stores = RunStores::open(&c).await.unwrap();
        assert!(stores.ledger.run("stores-test").await.unwrap().is_some());
        let readiness = Readiness::new();
        stores.add_readiness_checks(&readiness);
        readiness.set_serving(true);
        readiness.check().await.unwrap();
        c.storage.state_url = "ftp://nowhere".into();
        let Err(e) = RunStores::open(&c).await else {
            panic!("opened a bad state URL");
        };
        assert!(e.to_string().contains("storage.state_url"), "{e}");
    }
}
