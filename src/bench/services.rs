//! What the benches that run the platform share: a fresh run on the configured services, its
//! coordinator, `sim`-engine workers and the small model its trainer trains.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use flywheel_coordinator::CoordinatorConfig;
use flywheel_model::{ModelConfig, Params};
use flywheel_storage::RunStores;
use flywheel_storage::config::{RunConfig, StorageConfig};
use flywheel_storage::queue::ensure_topics;
use flywheel_storage::types::{Prompt, PromptId, PromptInput, VerifierSpec};
use flywheel_trainer::warm_start::publish_initial;
use flywheel_trainer::{AdamWConfig, TrainerConfig};
use flywheel_worker::engine::EngineConfig;
use flywheel_worker::engine::sim::{SimConfig, SimEngine};
use flywheel_worker::{Worker, WorkerConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Tokens of every prompt (the sim engine ignores their content).
pub const PROMPT_TOKENS: usize = 16;
/// The sim engine's vocabulary (bytes) and the trained model's.
pub const VOCAB: u32 = 256;

/// The run config of `config` (default: Redis, PostgreSQL and Kafka on 127.0.0.1); without a
/// `blob_url` of its own, the object store is `blob_dir`.
pub fn services_run(config: Option<&Path>, blob_dir: &Path) -> anyhow::Result<RunConfig> {
    let mut run = crate::config::load(config)?.run();
    if run.storage.blob_url == StorageConfig::default().blob_url {
        run.storage.blob_url = format!("file://{}?fsync=false", blob_dir.display());
    }
    Ok(run)
}

/// `base` as a new run of its own: run id, topic and consumer group named after `label`.
pub fn fresh_run(base: &RunConfig, label: &str) -> RunConfig {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let run_id = format!("bench-{label}-{}-{ms}", std::process::id());
    let mut run = base.clone();
    run.kafka.topic = format!("{run_id}.prompts");
    run.kafka.group_id = format!("{run_id}.workers");
    run.storage.run_id = run_id;
    run
}

/// Creates the run's topic, opens its stores and publishes version 0 of the small model (for
/// responses up to `max_response` tokens, initialised from `seed`); returns the stores and the
/// config of the trainer that trains that model.
pub async fn open_run(
    run: &RunConfig,
    max_response: u32,
    seed: u64,
) -> anyhow::Result<(RunStores, TrainerConfig)> {
    run.validate()?;
    ensure_topics(&run.kafka, 2, 1).await?;
    let stores = RunStores::open(run).await?;
    let trainer = trainer_config(&run.storage.run_id, seed, max_response)?;
    publish_initial(&stores, &trainer, Params::init(&trainer.model, seed)?).await?;
    Ok((stores, trainer))
}

/// The trainer of the small model over the sim engine's vocabulary.
fn trainer_config(run_id: &str, seed: u64, max_response: u32) -> anyhow::Result<TrainerConfig> {
    let config = TrainerConfig {
        id: format!("{run_id}-trainer"),
        seed,
        model: ModelConfig {
            max_seq_len: PROMPT_TOKENS + max_response as usize + 1,
            ..ModelConfig::tiny(VOCAB as usize)
        },
        optimizer: AdamWConfig {
            lr: 1e-4,
            ..AdamWConfig::default()
        },
        checkpoint_every: 1_000_000,
        poll_ms: 20,
        metrics_addr: String::new(),
        ..TrainerConfig::default()
    };
    config.validate()?;
    Ok(config)
}

/// The run's coordinator service until `stop`.
pub fn start_coordinator(
    stores: &RunStores,
    run: &RunConfig,
    stop: &CancellationToken,
) -> JoinHandle<Result<(), flywheel_coordinator::CoordinatorError>> {
    tokio::spawn(flywheel_coordinator::run_until(
        stores.clone(),
        flywheel_coordinator::ServiceConfig {
            run: run.clone(),
            coordinator: CoordinatorConfig {
                bind: "127.0.0.1:0".into(),
                candidate_id: format!("{}-coordinator", run.storage.run_id),
                tick_ms: 20,
                ..CoordinatorConfig::default()
            },
        },
        stop.clone().cancelled_owned(),
    ))
}

/// `n` workers, each with its own sim engine of `sim` (returned too, for its counters).
pub async fn start_sim_workers(
    stores: &RunStores,
    run: &RunConfig,
    n: usize,
    sim: &SimConfig,
) -> anyhow::Result<(Vec<Worker>, Vec<Arc<SimEngine>>)> {
    let (mut workers, mut engines) = (Vec::new(), Vec::new());
    for i in 0..n {
        let engine = Arc::new(SimEngine::new(sim.clone())?);
        let config = flywheel_worker::ServiceConfig {
            run: run.clone(),
            worker: WorkerConfig {
                id: format!("{}-worker-{i}", run.storage.run_id),
                engine: EngineConfig::Sim(sim.clone()),
                slots: sim.slots,
                poll_interval_ms: 20,
                metrics_addr: String::new(),
                ..WorkerConfig::default()
            },
        };
        workers.push(Worker::start(stores.clone(), config, engine.clone()).await?);
        engines.push(engine);
    }
    Ok((workers, engines))
}

/// Prompt number `n`: tokens only (the sim engine ignores them), K samples.
pub fn prompt(n: u64, group_size: u32) -> Prompt {
    Prompt {
        id: PromptId(format!("p{n:07}")),
        input: PromptInput::Tokens((1..=PROMPT_TOKENS as u32).collect()),
        verifier: VerifierSpec::ExactMatch { answer: "-".into() },
        group_size,
        metadata: BTreeMap::new(),
    }
}
