//! `flywheel bench modes`: the same long-tailed workload in `sync`, `partial` (C3PO++) and
//! `async` mode, one after the other, on the services of a run config (Redis, PostgreSQL,
//! Kafka, the object store).
//!
//! Each mode is a fresh run in this process through the deployment's code: the coordinator
//! and the trainer are their services' `run_until`, the workers are [`Worker::start`] with the
//! `sim` engine (seeded log-normal response lengths with a cap, real sleeping at a fixed decode
//! rate per sequence, a fixed number of slots), and prompts go through Kafka. The trainer is the
//! real CPU trainer of a small model over the sim engine's byte vocabulary, so its step time
//! grows with the tokens it trains. Steps after the first are measured (the first includes
//! the start of every service).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use flywheel_model::ModelConfig;
use flywheel_storage::BatchManifest;
use flywheel_storage::config::{RolloutMode, RunConfig};
use flywheel_storage::queue::PromptProducer;
use flywheel_storage::types::TrajectoryStatus;
use flywheel_trainer::{StepObserver, StepOutcome, Trainer};
use flywheel_worker::engine::sim::{LengthDistribution, SimConfig};
use tokio_util::sync::CancellationToken;

use super::services::{
    VOCAB, fresh_run, open_run, prompt, services_run, start_coordinator, start_sim_workers,
};
use super::{median, median_spread};
use crate::demo::report::{RunSeries, plot_runs};
use crate::demo::rl::trained_staleness;

/// Options of `flywheel bench modes`.
#[derive(clap::Args, Debug)]
pub struct ModesBench {
    /// A run config naming the services (`[storage]`, `[kafka]`); the default config uses
    /// Redis, PostgreSQL and Kafka on 127.0.0.1 (`scripts/services.sh` starts them). Run id,
    /// topic, rollout and batch settings are the bench's own; without a `blob_url` in the
    /// file, the object store is a temporary directory.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The modes to run, in order.
    #[arg(long, value_delimiter = ',', default_value = "sync,partial,async")]
    pub modes: Vec<Mode>,
    /// Steps measured per mode (after one warm-up step).
    #[arg(long, default_value_t = 8)]
    pub steps: u64,
    /// Rollout workers.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Engine slots per worker (sequences decoding at once).
    #[arg(long, default_value_t = 16)]
    pub slots: usize,
    /// Decode speed of one sequence, tokens per second.
    #[arg(long, default_value_t = 400.0)]
    pub decode_tokens_per_s: f64,
    /// Median response length (log-normal), tokens.
    #[arg(long, default_value_t = 96.0)]
    pub length_median: f64,
    /// σ of the log-normal response lengths (the tail's weight).
    #[arg(long, default_value_t = 1.0)]
    pub length_sigma: f64,
    /// Longest response, tokens.
    #[arg(long, default_value_t = 1024)]
    pub length_cap: u32,
    /// Samples per prompt (K).
    #[arg(long, default_value_t = 4)]
    pub group_size: u32,
    /// Trained tokens per step (Φ).
    #[arg(long, default_value_t = 4096)]
    pub token_budget: u64,
    /// Generated tokens per policy version (Φ_r); default Φ, so that `sync` generates one
    /// step's worth per version (a synchronous baseline) and every mode the same per version.
    #[arg(long)]
    pub version_budget: Option<u64>,
    /// Tokens per segment (S).
    #[arg(long, default_value_t = 64)]
    pub segment_tokens: u32,
    /// Seed of the workload (lengths, tokens) and of the model.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also draw the measured steps' times, a line per mode, as `step_time.png` and
    /// `rollout_time.png` in this folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A rollout mode, as the command line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Every trajectory of a step runs to its end under one version.
    Sync,
    /// C3PO++: a token budget per version, unfinished trajectories parked and continued.
    Partial,
    /// Workers never wait for a started trajectory; staleness bounded by η.
    Async,
}

impl Mode {
    fn rollout(self) -> RolloutMode {
        match self {
            Mode::Sync => RolloutMode::Sync,
            Mode::Partial => RolloutMode::Partial,
            Mode::Async => RolloutMode::Async,
        }
    }
}

/// What one mode measured.
struct ModeResult {
    mode: Mode,
    /// Seconds between consecutive finished steps (the measured ones).
    step_secs: Vec<f64>,
    /// Of each, the seconds the trainer did not train (waiting for rollouts).
    rollout_secs: Vec<f64>,
    /// Tokens trained in the measured steps.
    tokens_trained: u64,
    /// Seconds the measured steps took.
    measured_secs: f64,
    /// Mean fraction of the engine slots decoding, sampled over the measured steps.
    slot_utilisation: f64,
    /// Trained tokens by staleness (versions behind the step).
    staleness: BTreeMap<u64, u64>,
    /// Trajectories purged past the retention limit or dropped with their group.
    purged: u64,
    /// Their tokens.
    purged_tokens: u64,
    /// Tokens the engines generated per token trained.
    generated_per_trained: f64,
}

/// Runs the bench and prints its report.
pub async fn run(b: &ModesBench) -> anyhow::Result<()> {
    if b.steps == 0 || b.workers == 0 || b.slots == 0 || b.group_size < 2 {
        bail!("--steps, --workers and --slots must be at least 1, --group-size at least 2");
    }
    let blob_dir = tempfile::tempdir()?;
    let run = services_run(b.config.as_deref(), blob_dir.path())?;
    let mu = b.length_median.ln();
    let version_budget = b.version_budget.unwrap_or(b.token_budget);
    println!(
        "workload: response lengths log-normal (median {}, sigma {}, cap {}), K = {}, {} workers x {} slots at {} tokens/s per sequence, Φ = {} trained tokens per step, Φ_r = {} generated tokens per version, S = {}, seed {}",
        b.length_median,
        b.length_sigma,
        b.length_cap,
        b.group_size,
        b.workers,
        b.slots,
        b.decode_tokens_per_s,
        b.token_budget,
        version_budget,
        b.segment_tokens,
        b.seed
    );
    println!(
        "trainer: the CPU trainer of a {}-layer model (d_model {}) over {VOCAB} tokens; {} measured steps per mode after one warm-up step",
        ModelConfig::tiny(VOCAB as usize).n_layers,
        ModelConfig::tiny(VOCAB as usize).d_model,
        b.steps
    );
    let lengths = LengthDistribution::LogNormal {
        mu,
        sigma: b.length_sigma,
        cap: b.length_cap,
    };
    let mut results = Vec::new();
    for &mode in &b.modes {
        let r = run_mode(b, &run, mode, &lengths, version_budget)
            .await
            .with_context(|| format!("mode {mode:?}"))?;
        print_mode(&r);
        results.push(r);
    }
    if let Some(sync) = results.iter().find(|r| r.mode == Mode::Sync) {
        for r in results.iter().filter(|r| r.mode != Mode::Sync) {
            println!(
                "{:?}/sync: trained tokens/s {:.2}x; end-to-end time per step {:.2}x, rollout time per step {:.2}x (a sync step is its version's whole batch, which may exceed Φ)",
                r.mode,
                throughput(r) / throughput(sync),
                median(&r.step_secs) / median(&sync.step_secs),
                median(&r.rollout_secs) / median(&sync.rollout_secs),
            );
        }
    }
    if let Some(dir) = &b.out {
        plot(dir, &results)?;
        println!("wrote {}: step_time.png, rollout_time.png", dir.display());
    }
    println!("reproduce: {}", super::reproduce());
    Ok(())
}

/// The measured steps' end-to-end and rollout times, a line per mode.
fn plot(dir: &Path, results: &[ModeResult]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let series = |secs: fn(&ModeResult) -> &[f64]| -> Vec<RunSeries> {
        results
            .iter()
            .map(|r| RunSeries {
                label: format!("{:?}", r.mode).to_lowercase(),
                arm: r.mode as usize,
                points: (secs(r).iter().enumerate())
                    .map(|(i, &s)| (i as f64 + 1.0, s))
                    .collect(),
            })
            .collect()
    };
    plot_runs(
        &dir.join("step_time.png"),
        "End-to-end time per step",
        "seconds",
        false,
        series(|r| &r.step_secs),
    )?;
    plot_runs(
        &dir.join("rollout_time.png"),
        "Rollout phase per step (the trainer waiting)",
        "seconds",
        false,
        series(|r| &r.rollout_secs),
    )?;
    Ok(())
}

/// One mode: a fresh run (its own run id and topic), measured, then stopped.
async fn run_mode(
    b: &ModesBench,
    base: &RunConfig,
    mode: Mode,
    lengths: &LengthDistribution,
    version_budget: u64,
) -> anyhow::Result<ModeResult> {
    let mut run = fresh_run(base, &format!("{mode:?}").to_lowercase());
    let run_id = run.storage.run_id.clone();
    run.rollout.mode = mode.rollout();
    run.rollout.version_budget_tokens = version_budget;
    run.rollout.segment_tokens = b.segment_tokens;
    run.rollout.max_response_tokens = b.length_cap;
    run.batch.token_budget = b.token_budget;
    // The sim engine's responses earn no reward; the workload is their shape, so every group
    // is trained.
    run.batch.filter_zero_variance = false;
    let (stores, trainer) = open_run(&run, b.length_cap, b.seed).await?;
    let stop = CancellationToken::new();
    let coordinator = start_coordinator(&stores, &run, &stop);
    let sim = SimConfig {
        seed: b.seed,
        slots: b.slots,
        decode_tokens_per_s: b.decode_tokens_per_s,
        lengths: lengths.clone(),
        vocab_size: VOCAB,
        eos_token_id: 0,
        ..SimConfig::default()
    };
    let (workers, engines) = start_sim_workers(&stores, &run, b.workers, &sim).await?;
    let steps = Arc::new(Mutex::new(Vec::<Finished>::new()));
    let trainer_task = {
        let config = flywheel_trainer::ServiceConfig {
            run: run.clone(),
            trainer,
            resume: false,
        };
        let mut observer = Recorder {
            steps: steps.clone(),
            last: Instant::now(),
        };
        let (stores, stop) = (stores.clone(), stop.clone());
        tokio::spawn(async move {
            flywheel_trainer::run_observed(stores, config, stop.cancelled_owned(), &mut observer)
                .await
        })
    };

    // Feed prompts (enough to keep every slot busy and a few versions ahead) until the
    // measured steps are finished, sampling how many slots decode.
    let producer = PromptProducer::new(&run.kafka)?;
    let slots_total = (b.workers * b.slots) as f64;
    let backlog = ((2 * b.workers * b.slots) as u64).div_ceil(u64::from(b.group_size))
        + 3 * version_budget / (u64::from(b.group_size) * b.length_median as u64).max(1);
    let (mut sent, mut busy, mut samples) = (0u64, 0.0f64, 0u64);
    let mut last_progress = (Instant::now(), 0usize);
    let ledger = &stores.ledger;
    loop {
        if trainer_task.is_finished() {
            bail!("the trainer stopped before the bench ended; see the log above");
        }
        let done = steps.lock().map_or(0, |s| s.len());
        if done as u64 > b.steps {
            break;
        }
        if done >= 1 {
            busy += engines.iter().map(|e| e.stats().in_flight).sum::<usize>() as f64;
            samples += 1;
        }
        if done != last_progress.1 {
            last_progress = (Instant::now(), done);
        } else if last_progress.0.elapsed() > Duration::from_secs(300) {
            bail!("no step finished for 5 minutes ({done} finished); see the log above");
        }
        let counts = ledger.prompt_counts(&run_id).await?;
        let in_flight = sent.saturating_sub(counts.total()) + counts.pending;
        for _ in in_flight..backlog {
            producer.send(&prompt(sent, b.group_size)).await?;
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The tokens of every trajectory purged or dropped (generated, never trained).
    let (mut purged, mut purged_tokens) = (0u64, 0u64);
    for n in 0..sent {
        for id in prompt(n, b.group_size).trajectory_ids() {
            if let Some(t) = stores.state.trajectory(&id).await?
                && matches!(
                    t.status,
                    TrajectoryStatus::Purged | TrajectoryStatus::Dropped
                )
            {
                purged += 1;
                purged_tokens += t.tokens;
            }
        }
    }
    let generated: u64 = engines.iter().map(|e| e.stats().tokens).sum();
    stop.cancel();
    trainer_task.await.context("the trainer task panicked")??;
    for w in workers {
        w.shutdown().await;
    }
    coordinator
        .await
        .context("the coordinator task panicked")??;
    let _ = stores.state.delete_run().await;

    let finished = steps.lock().map(|s| s.clone()).unwrap_or_default();
    let measured = &finished[1..=b.steps as usize];
    let mut staleness = BTreeMap::new();
    for f in measured {
        for (k, v) in &f.staleness {
            *staleness.entry(*k).or_insert(0) += v;
        }
    }
    let all_trained: u64 = finished.iter().map(|f| f.tokens_trained).sum();
    Ok(ModeResult {
        mode,
        step_secs: measured.iter().map(|f| f.step_secs).collect(),
        rollout_secs: measured
            .iter()
            .map(|f| (f.step_secs - f.train_secs).max(0.0))
            .collect(),
        tokens_trained: measured.iter().map(|f| f.tokens_trained).sum(),
        measured_secs: measured.iter().map(|f| f.step_secs).sum(),
        slot_utilisation: busy / samples.max(1) as f64 / slots_total,
        staleness,
        purged,
        purged_tokens,
        generated_per_trained: generated as f64 / all_trained.max(1) as f64,
    })
}

/// A step the trainer finished.
#[derive(Clone)]
struct Finished {
    /// Seconds since the previous step finished (since the trainer started, for the first).
    step_secs: f64,
    /// Seconds the trainer spent on it.
    train_secs: f64,
    tokens_trained: u64,
    staleness: BTreeMap<u64, u64>,
}

/// Records every finished step.
struct Recorder {
    steps: Arc<Mutex<Vec<Finished>>>,
    /// When the previous step finished (the trainer started, before the first).
    last: Instant,
}

#[async_trait]
impl StepObserver for Recorder {
    async fn step_finished(
        &mut self,
        outcome: &StepOutcome,
        manifest: &BatchManifest,
        _trainer: &Trainer,
    ) {
        let now = Instant::now();
        if let Ok(mut steps) = self.steps.lock() {
            steps.push(Finished {
                step_secs: (now - self.last).as_secs_f64(),
                train_secs: outcome.metrics.step_time.as_secs_f64(),
                tokens_trained: outcome.metrics.tokens_trained,
                staleness: trained_staleness(manifest),
            });
        }
        self.last = now;
    }
}

fn throughput(r: &ModeResult) -> f64 {
    r.tokens_trained as f64 / r.measured_secs
}

fn print_mode(r: &ModeResult) {
    let secs = |x: f64| format!("{x:.2}s");
    let trained: u64 = r.staleness.values().sum();
    let stale: u64 = r
        .staleness
        .iter()
        .filter(|(k, _)| **k > 0)
        .map(|(_, v)| v)
        .sum();
    let mean_staleness = r
        .staleness
        .iter()
        .map(|(k, v)| *k as f64 * *v as f64)
        .sum::<f64>()
        / trained.max(1) as f64;
    println!(
        "{:?}: end-to-end per step {}, rollout phase per step {}, {:.0} trained tokens per step, {:.0} trained tokens/s, slots busy {:.0}%, staleness: {:.0}% of trained tokens stale (mean {:.2} versions, {:?}), {} tokens purged or dropped ({} trajectories), {:.2} generated tokens per trained token",
        r.mode,
        median_spread(&r.step_secs, secs),
        median_spread(&r.rollout_secs, secs),
        r.tokens_trained as f64 / r.step_secs.len().max(1) as f64,
        throughput(r),
        100.0 * r.slot_utilisation,
        100.0 * stale as f64 / trained.max(1) as f64,
        mean_staleness,
        r.staleness,
        r.purged_tokens,
        r.purged,
        r.generated_per_trained,
    );
}
