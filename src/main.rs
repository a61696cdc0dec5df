//! The `flywheel` binary: one CLI for every component (DESIGN.md §8).
//!
//! Each service subcommand reads one TOML config (`--config`) with `FLYWHEEL_*` environment
//! overrides (see `flywheel::config`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use flywheel::warm_start::TaskWarmStart;
use flywheel_service::{redact_url, shutdown};
use flywheel_storage::RunStores;

mod ingest;

/// Elastic, crash-safe RL post-training: durable partial rollouts, token-budgeted batches,
/// IcePop.
#[derive(Parser)]
#[command(name = "flywheel", version, about)]
struct Cli {
    /// Log as JSON lines (for services) instead of human-readable text.
    #[arg(long, global = true, env = "FLYWHEEL_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send prompts from a JSON-lines file (one `Prompt` per line) to the run's prompt topic.
    #[command(group(clap::ArgGroup::new("dataset").args(["jsonl", "parquet"])))]
    Ingest {
        /// The run's config file (its `[kafka]` section names brokers and topic).
        #[arg(long)]
        config: Option<PathBuf>,
        /// JSON-lines file of prompts; `-` reads standard input.
        #[arg(required_unless_present_any = ["demo_task", "jsonl", "parquet"])]
        file: Option<PathBuf>,
        /// Instead of a file of prompts: a dataset file (GSM8K / MATH style JSON lines) whose
        /// `--prompt-field` and `--answer-field` become prompts; bad lines are reported by
        /// number and nothing is sent.
        #[arg(long, conflicts_with_all = ["file", "demo_task", "raw"], requires_all = ["prompt_field", "answer_field"])]
        jsonl: Option<PathBuf>,
        /// Like `--jsonl`, for a Parquet dataset file (snappy, zstd or uncompressed): each row
        /// is an object of its columns; bad rows are reported by number.
        #[arg(long, conflicts_with_all = ["file", "demo_task", "raw", "jsonl"], requires_all = ["prompt_field", "answer_field"])]
        parquet: Option<PathBuf>,
        /// The dataset field holding the question.
        #[arg(long, requires = "dataset")]
        prompt_field: Option<String>,
        /// The dataset field holding the answer (GSM8K's `#### N` and MATH's `\boxed{}` are
        /// reduced to the final answer).
        #[arg(long, requires = "dataset")]
        answer_field: Option<String>,
        /// The dataset field holding a unique id; default `<file stem>-<line number>`.
        #[arg(long, requires = "dataset")]
        id_field: Option<String>,
        /// How responses are scored.
        #[arg(long, value_enum, default_value = "math", requires = "dataset")]
        verifier: ingest::DatasetVerifier,
        /// Render each question as a user message through the chat template of `[trainer]
        /// hf_model` (the prompt then carries its token ids).
        #[arg(long, requires = "dataset")]
        chat_template: bool,
        /// K: samples per dataset prompt.
        #[arg(long, default_value_t = 8, requires = "dataset")]
        group_size: u32,
        /// Instead of a file: generate this many training prompts of the built-in addition
        /// task, shaped by the config's `[task]` section.
        #[arg(long, value_name = "COUNT", conflicts_with_all = ["file", "raw"])]
        demo_task: Option<usize>,
        /// Seed of the generated prompts (`--demo-task`); their ids are `task-<seed>-<i>`.
        #[arg(long, default_value_t = 0, requires = "demo_task")]
        seed: u64,
        /// Send lines that fail validation anyway (they will be dead-lettered by workers).
        #[arg(long)]
        raw: bool,
        /// Partitions of the prompt topic when it has to be created.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
    },
    /// Apply the ledger's migrations to the configured database and exit.
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the coordinator (leader or standby): versions, budgets, step batches, HTTP API.
    Coordinator {
        /// The run's config file (shared sections plus `[coordinator]`).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run a rollout worker: Kafka prompts → segmented generation → durable trajectories.
    Worker {
        /// The run's config file (shared sections plus `[worker]`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where the builtin engine samples (overrides `[worker.engine] device`): auto, cpu,
        /// cuda or cuda:N.
        #[arg(long)]
        device: Option<flywheel_model::Device>,
    },
    /// Run a trainer: claim ranks of announced steps, train them, and (as the finisher of a
    /// step) apply AdamW and publish the next weights version and checkpoints.
    Trainer {
        /// The run's config file (shared sections plus `[trainer]`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Restore the ledger's latest checkpoint (weights and optimizer state) first.
        #[arg(long)]
        resume: bool,
        /// Where the model trains (overrides `[trainer] device`): auto, cpu, cuda or cuda:N.
        #[arg(long)]
        device: Option<flywheel_model::Device>,
        /// Before serving: warm-start the model with this many supervised steps on the
        /// built-in task's reference responses (the config's `[task]`) and publish the result
        /// as version 0 — unless version 0 exists already (another trainer's warm start won).
        #[arg(long, default_value_t = 0, conflicts_with = "resume")]
        warm_start_steps: usize,
        /// Problems per warm-start step.
        #[arg(long, default_value_t = 32)]
        warm_start_batch: usize,
        /// Learning rate of the warm start.
        #[arg(long, default_value_t = 3e-3)]
        warm_start_lr: f64,
    },
    /// Serve the built-in addition task's exact reward over HTTP (`POST /reward`), the
    /// reward service its prompts name (`addition`), until interrupted.
    Rewards {
        /// Address to listen on; point `[worker.rewards.services] addition` at
        /// `http://<bind>/reward`.
        #[arg(long, default_value = "127.0.0.1:9470")]
        bind: String,
    },
    /// The main job: warm-start the built-in model, then train it with RL (partial rollouts,
    /// IcePop) through the queue, workers, coordinator and trainer in one process, and write
    /// a report with the held-out accuracy before and after.
    Demo(flywheel::demo::args::DemoArgs),
    /// Score or sample a Hugging Face checkpoint directory (Llama, Qwen2, Qwen3).
    #[command(subcommand)]
    Model(flywheel::model_cli::ModelCommand),
    /// Measure throughput (`bench trainer`: training step and sampling, beside PyTorch;
    /// `bench weights`: publishing and loading a policy version, incremental against whole).
    #[command(subcommand)]
    Bench(flywheel::bench::BenchCommand),
    /// Published weights: export a version as a Hugging Face checkpoint directory.
    #[command(subcommand)]
    Weights(flywheel::weights_cli::WeightsCommand),
    /// Check the run's accounting (ledger, object store, Redis, the prompt topic): every
    /// consumed prompt trained once, dropped with a reason or in flight; steps and versions
    /// without gaps; every trained segment verified; every checkpoint restorable. Exits 1 on
    /// any violation, listing them.
    Audit {
        /// The run's config file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show the run's state from the coordinator's `/v1/status`: live progress bars on a
    /// terminal, JSON otherwise or with `--json`.
    Status {
        /// Print one JSON report and exit.
        #[arg(long)]
        json: bool,
        /// The coordinator's base URL.
        #[arg(
            long,
            env = "FLYWHEEL_STATUS_URL",
            default_value = "http://127.0.0.1:9464"
        )]
        url: String,
    },
}

/// Logs to stderr at `FLYWHEEL_LOG`'s levels, else at `default`.
fn init_logging(json: bool, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLYWHEEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo's progress bars say what happens; its services' per-prompt and per-step info
    // lines would only tear them (FLYWHEEL_LOG=info brings them back).
    let default_level = match cli.command {
        Command::Demo(_) | Command::Model(_) | Command::Bench(_) => "warn",
        _ => "info",
    };
    init_logging(cli.log_json, default_level);
    match cli.command {
        Command::Ingest {
            config,
            file,
            demo_task,
            seed,
            raw,
            partitions,
            jsonl,
            parquet,
            prompt_field,
            answer_field,
            id_field,
            verifier,
            chat_template,
            group_size,
        } => {
            let mut config = flywheel::config::load(config.as_deref())?;
            let dataset = jsonl
                .map(ingest::DatasetFile::Jsonl)
                .or(parquet.map(ingest::DatasetFile::Parquet));
            if let Some(dataset) = dataset {
                let spec = ingest::DatasetSpec {
                    prompt_field: prompt_field.unwrap_or_default(),
                    answer_field: answer_field.unwrap_or_default(),
                    id_field,
                    verifier,
                    group_size,
                };
                let chat = if chat_template {
                    config.localize_checkpoints().await?;
                    if config.trainer.hf_model.is_empty() {
                        anyhow::bail!(
                            "--chat-template needs the run's checkpoint: set [trainer] hf_model"
                        );
                    }
                    Some(flywheel_model::HfTokenizer::open(Path::new(
                        &config.trainer.hf_model,
                    ))?)
                } else {
                    None
                };
                return ingest::run_dataset(
                    &config.kafka,
                    &dataset,
                    &spec,
                    chat.as_ref(),
                    partitions,
                )
                .await;
            }
            match (demo_task, file) {
                (Some(count), _) => {
                    let prompts = config.task.prompts(count, seed)?;
                    ingest::send_generated(&config.kafka, &prompts, partitions).await
                }
                (None, Some(file)) => ingest::run(&config.kafka, &file, raw, partitions).await,
                (None, None) => anyhow::bail!("name a prompts FILE or pass --demo-task COUNT"),
            }
        }
        Command::Migrate { config } => {
            let config = flywheel::config::load(config.as_deref())?;
            let run = config.run();
            let ledger = flywheel_storage::ledger::open(&run.storage.ledger_url).await?;
            ledger
                .create_run(&run.storage.run_id, &run.redacted_json())
                .await?;
            eprintln!(
                "ledger at {} is migrated",
                redact_url(&config.storage.ledger_url)
            );
            Ok(())
        }
        Command::Coordinator { config } => {
            let config = flywheel::config::load(config.as_deref())?;
            let stores = RunStores::open(&config.run()).await?;
            Ok(
                flywheel_coordinator::run_until(stores, config.coordinator(), shutdown::signal())
                    .await?,
            )
        }
        Command::Worker { config, device } => {
            let mut config = flywheel::config::load(config.as_deref())?;
            if let Some(device) = device {
                match &mut config.worker.engine {
                    flywheel_worker::engine::EngineConfig::Builtin(c) => c.device = device,
                    _ => anyhow::bail!(
                        "--device applies to the builtin engine; vLLM and SGLang choose their \
                         GPUs themselves"
                    ),
                }
            }
            config.localize_checkpoints().await?;
            let stores = RunStores::open(&config.run()).await?;
            Ok(flywheel_worker::run_until(stores, config.worker(), shutdown::signal()).await?)
        }
        Command::Trainer {
            config,
            resume,
            device,
            warm_start_steps,
            warm_start_batch,
            warm_start_lr,
        } => {
            let mut config = flywheel::config::load(config.as_deref())?;
            if let Some(device) = device {
                config.trainer.device = device;
            }
            config.localize_checkpoints().await?;
            let stores = RunStores::open(&config.run()).await?;
            if warm_start_steps > 0 {
                let settings = TaskWarmStart {
                    steps: warm_start_steps,
                    batch: warm_start_batch,
                    lr: warm_start_lr,
                    seed: config.trainer.seed,
                    target_accuracy: 0.0,
                };
                flywheel::warm_start::publish_task_warm_start(
                    &stores,
                    &config.trainer,
                    &config.task,
                    &settings,
                )
                .await?;
            }
            Ok(
                flywheel_trainer::run_until(stores, config.trainer(resume), shutdown::signal())
                    .await?,
            )
        }
        Command::Rewards { bind } => {
            let listener = tokio::net::TcpListener::bind(&bind)
                .await
                .with_context(|| {
                    format!("cannot listen on {bind}: free the port or pass another --bind")
                })?;
            let addr = listener.local_addr()?;
            tracing::info!(
                url = flywheel_task::rewards::url(addr),
                "serving the addition task's reward"
            );
            flywheel_task::rewards::serve(listener, shutdown::signal()).await?;
            Ok(())
        }
        Command::Demo(args) => flywheel::demo::run::run(args).await.map(|_| ()),
        Command::Model(command) => flywheel::model_cli::run(command),
        Command::Bench(command) => flywheel::bench::run(command).await,
        Command::Weights(command) => flywheel::weights_cli::run(command).await,
        Command::Audit { config } => {
            let config = flywheel::config::load(config.as_deref())?;
            let stores = RunStores::open(&config.run()).await?;
            let kafka = stores.queue.clone();
            let report =
                flywheel::audit::audit(&stores, kafka.as_ref(), &config.trainer.optimizer).await?;
            print!("{}", report.summary());
            if !report.violations.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Status { json, url } => Ok(flywheel_coordinator::run_status(&url, json).await?),
    }
}
