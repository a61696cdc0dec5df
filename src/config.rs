//! One TOML file for every service, with `FLYWHEEL_*` environment overrides (DESIGN.md §8).
//!
//! [`FileConfig`] is the whole file: the sections every service shares (`[storage]`,
//! `[kafka]`, `[rollout]`, `[batch]`), each service's own (`[worker]`, `[coordinator]`,
//! `[trainer]`) and the built-in task's (`[task]`). Every process of a run reads the same
//! file and takes its part; a section or field the file does not know is an error that names
//! it.
//!
//! An override names a field by its path, sections joined by a double underscore:
//! `FLYWHEEL_STORAGE__STATE_URL=redis://10.0.0.5:6379` sets `[storage] state_url`, and
//! `FLYWHEEL_ROLLOUT__SEGMENT_TOKENS=128` sets `[rollout] segment_tokens`. Values are parsed
//! as TOML scalars when they can be (numbers, booleans), else taken as strings.

use std::path::Path;

use anyhow::{Context, bail};
use flywheel_coordinator::CoordinatorConfig;
use flywheel_storage::config::{BatchConfig, RolloutConfig, RunConfig, StorageConfig};
use flywheel_storage::queue::KafkaConfig;
use flywheel_task::TaskSection;
use flywheel_trainer::TrainerConfig;
use flywheel_worker::WorkerConfig;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "FLYWHEEL_";

/// The run's config file: every section any process of the run reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// `[storage]`: the run id and where state, objects and the ledger live.
    pub storage: StorageConfig,
    /// `[kafka]`: the prompt queue.
    pub kafka: KafkaConfig,
    /// `[rollout]`: the rollout protocol (budgets, segments, retention, leases).
    pub rollout: RolloutConfig,
    /// `[batch]`: how step batches are cut.
    pub batch: BatchConfig,
    /// `[worker]`.
    pub worker: WorkerConfig,
    /// `[coordinator]`.
    pub coordinator: CoordinatorConfig,
    /// `[trainer]`.
    pub trainer: TrainerConfig,
    /// `[task]`: the built-in task's prompts and warm start.
    pub task: TaskSection,
}

impl FileConfig {
    /// The sections every service shares.
    pub fn run(&self) -> RunConfig {
        RunConfig {
            storage: self.storage.clone(),
            kafka: self.kafka.clone(),
            rollout: self.rollout.clone(),
            batch: self.batch.clone(),
        }
    }

    /// Replaces checkpoints named by object-store URLs (`[trainer] hf_model`, the engine's
    /// `hf_model`) with their local copies ([`crate::checkpoint_source::local_dir`]).
    pub async fn localize_checkpoints(&mut self) -> anyhow::Result<()> {
        use crate::checkpoint_source::local_dir;
        if !self.trainer.hf_model.is_empty() {
            let dir = local_dir(&self.trainer.hf_model).await?;
            self.trainer.hf_model = dir.display().to_string();
        }
        if let Some(hf_model) = self.worker.engine.hf_model_mut()
            && !hf_model.is_empty()
        {
            *hf_model = local_dir(hf_model).await?.display().to_string();
        }
        Ok(())
    }

    /// What the worker service runs with. The engines that hold a tokenizer (builtin, vLLM,
    /// SGLang) read text with the one of `[trainer] hf_model` unless their own `hf_model` names
    /// one: the run's model is named once.
    pub fn worker(&self) -> flywheel_worker::ServiceConfig {
        let mut worker = self.worker.clone();
        if let Some(hf_model) = worker.engine.hf_model_mut()
            && hf_model.is_empty()
        {
            hf_model.clone_from(&self.trainer.hf_model);
        }
        flywheel_worker::ServiceConfig {
            run: self.run(),
            worker,
        }
    }

    /// What the coordinator service runs with.
    pub fn coordinator(&self) -> flywheel_coordinator::ServiceConfig {
        flywheel_coordinator::ServiceConfig {
            run: self.run(),
            coordinator: self.coordinator.clone(),
        }
    }

    /// What the trainer service runs with.
    pub fn trainer(&self, resume: bool) -> flywheel_trainer::ServiceConfig {
        flywheel_trainer::ServiceConfig {
            run: self.run(),
            trainer: self.trainer.clone(),
            resume,
        }
    }
}

/// Loads the run's config file (if any) with the environment's overrides; the shared
/// sections are validated.
pub fn load(path: Option<&Path>) -> anyhow::Result<FileConfig> {
    let config: FileConfig = load_with_env(path, std::env::vars())?;
    config.run().validate()?;
    Ok(config)
}

/// Parse `path` (or an empty document), apply the `FLYWHEEL_*` pairs of `env`, deserialise.
///
/// An override keeps its text as a string where the field is a string (so a numeric-looking
/// secret stays a secret), and is parsed as a TOML scalar where the field is a number or a
/// boolean; a field the defaults do not show (an unset option, a map entry) is tried as a
/// string first, then as a scalar.
pub fn load_with_env<T: DeserializeOwned + Serialize + Default>(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<T> {
    let mut table = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            text.parse::<Table>()
                .with_context(|| format!("config file {} is not valid TOML", path.display()))?
        }
        None => Table::new(),
    };
    let defaults = Table::try_from(T::default()).context("the default configuration")?;
    let mut untyped = Vec::new();
    for (key, raw) in env {
        let Some(field) = key.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        // Single-underscore names (FLYWHEEL_LOG, …) are not config fields.
        if !field.contains("__") {
            continue;
        }
        let path: Vec<String> = field.split("__").map(str::to_ascii_lowercase).collect();
        let value = match lookup(&defaults, &path) {
            Some(Value::String(_)) => Value::String(raw.clone()),
            Some(_) => parse_scalar(&raw),
            None => {
                untyped.push((path.clone(), raw.clone()));
                Value::String(raw.clone())
            }
        };
        set_path(&mut table, &path, value)
            .with_context(|| format!("environment override {key}"))?;
    }
    let origin = path.map_or("defaults".to_owned(), |p| p.display().to_string());
    let first = Value::Table(table.clone()).try_into::<T>();
    let parsed = match first {
        Err(_) if !untyped.is_empty() => {
            for (path, raw) in &untyped {
                set_path(&mut table, path, parse_scalar(raw))?;
            }
            Value::Table(table).try_into::<T>().or(first)
        }
        other => other,
    };
    parsed.with_context(|| {
        format!("invalid configuration ({origin} plus {ENV_PREFIX}* overrides): fix the field named above")
    })
}

/// The value at `path` in `table`, if there is one.
fn lookup<'a>(table: &'a Table, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let value = table.get(first)?;
    match (rest.is_empty(), value) {
        (true, v) => Some(v),
        (false, Value::Table(t)) => lookup(t, rest),
        (false, _) => None,
    }
}

fn parse_scalar(raw: &str) -> Value {
    // `x = <raw>` parses only when raw is a TOML value (number, boolean, quoted string…).
    match format!("x = {raw}").parse::<Table>() {
        Ok(mut t) => t
            .remove("x")
            .unwrap_or_else(|| Value::String(raw.to_owned())),
        Err(_) => Value::String(raw.to_owned()),
    }
}

fn set_path(table: &mut Table, path: &[String], value: Value) -> anyhow::Result<()> {
    let (last, sections) = path.split_last().expect("split of a non-empty string");
    let mut current = table;
    for section in sections {
        let entry = current
            .entry(section.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        current = match entry {
            Value::Table(t) => t,
            _ => bail!("`{section}` is a value, not a section"),
        };
    }
    current.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_storage::config::RolloutMode;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn file_then_env_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flywheel.toml");
        std::fs::write(
            &path,
            "[storage]\nrun_id = \"r1\"\n[rollout]\nmode = \"sync\"\n",
        )
        .unwrap();
        let config: FileConfig = load_with_env(
            Some(&path),
            env(&[
                ("FLYWHEEL_ROLLOUT__SEGMENT_TOKENS", "128"),
                ("FLYWHEEL_STORAGE__STATE_URL", "memory://"),
                ("FLYWHEEL_LOG", "debug"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(config.storage.run_id, "r1");
        assert_eq!(config.storage.state_url, "memory://");
        assert_eq!(config.rollout.mode, RolloutMode::Sync);
        assert_eq!(config.run().storage.run_id, "r1");
        assert_eq!(config.rollout.segment_tokens, 128);
        // Untouched fields keep their defaults.
        assert_eq!(
            config.batch,
            flywheel_storage::config::BatchConfig::default()
        );
    }

    #[test]
    fn numeric_looking_strings_stay_strings() {
        let config: FileConfig = load_with_env(
            None,
            env(&[
                ("FLYWHEEL_WORKER__ID", "12345"),
                ("FLYWHEEL_COORDINATOR__ADMIN_TOKEN", "007"),
                ("FLYWHEEL_STORAGE__RUN_ID", "2026"),
                ("FLYWHEEL_WORKER__SAMPLING__SEED", "42"),
                ("FLYWHEEL_WORKER__SLOTS", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(config.worker.id, "12345");
        assert_eq!(config.coordinator.admin_token.as_deref(), Some("007"));
        assert_eq!(config.storage.run_id, "2026");
        assert_eq!(config.worker.sampling.seed, Some(42));
        assert_eq!(config.worker.slots, 3);
    }

    #[test]
    fn bad_input_says_what_is_wrong() {
        let err =
            load_with_env::<FileConfig>(None, env(&[("FLYWHEEL_ROLLOUT__SEGMENT_TOKENS", "many")]))
                .unwrap_err();
        assert!(format!("{err:#}").contains("segment_tokens"), "{err:#}");

        let err =
            load_with_env::<FileConfig>(None, env(&[("FLYWHEEL_ROLLOUT__NO_SUCH_FIELD", "1")]))
                .unwrap_err();
        assert!(format!("{err:#}").contains("no_such_field"), "{err:#}");

        let err =
            load_with_env::<FileConfig>(None, env(&[("FLYWHEEL_WOKRER__ID", "w")])).unwrap_err();
        assert!(
            format!("{err:#}").contains("wokrer"),
            "an unknown section is named: {err:#}"
        );

        let err =
            load_with_env::<FileConfig>(Some(Path::new("/nonexistent/flywheel.toml")), env(&[]))
                .unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot read config file"),
            "{err:#}"
        );
    }
}
