//! The demo's RL phase: the services of a deployment started in this process on one
//! [`RunStores`], the prompts fed through the embedded Kafka queue, and one
//! [`StepMetrics`] recorded per step for the report.
//!
//! The coordinator and the trainer are their services' own `run_until`; the workers are
//! [`Worker::start`] with the builtin engine (the demo reads their token counters). The
//! task's reward service is served on loopback, and the workers score every finished
//! response over HTTP with it, as a deployment scores with its own reward service.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use flywheel_coordinator::CoordinatorConfig;
use flywheel_model::Params;
use flywheel_storage::config::RunConfig;
use flywheel_storage::queue::PromptProducer;
use flywheel_storage::state::StateStore;
use flywheel_storage::{BatchManifest, RunStores};
use flywheel_task::{Problem, ProblemStream, Split, mix, rewards};
use flywheel_trainer::{StepObserver, StepOutcome, Trainer, TrainerConfig};
use flywheel_worker::engine::EngineConfig;
use flywheel_worker::engine::builtin::BuiltinConfig;
use flywheel_worker::verify::RewardServicesConfig;
use flywheel_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

use super::args::{DemoArgs, Setup};
use super::progress::DemoProgress;
use super::report::StepMetrics;
use super::run::evaluate;

/// What the RL phase produced.
pub struct RlOutcome {
    /// One record per step the trainer finished.
    pub steps: Vec<StepMetrics>,
    /// Prompts sent to the queue.
    pub sent: u64,
}

/// Held-out evaluation during RL.
pub struct Evaluation {
    /// The run's setup.
    pub setup: Setup,
    /// The held-out problems.
    pub problems: Arc<Vec<Problem>>,
    /// Seed of their sampling streams.
    pub seed: u64,
    /// Evaluate after every this many steps (0: never during RL).
    pub every: u64,
}

/// Runs RL until `a.steps` steps are fed and everything accepted is trained or dropped, then
/// stops the services.
pub async fn reinforce(
    stores: &RunStores,
    run: &RunConfig,
    trainer: TrainerConfig,
    a: &DemoArgs,
    eval: Evaluation,
    progress: Arc<DemoProgress>,
    started: Instant,
) -> Result<RlOutcome> {
    let stop = CancellationToken::new();
    let coordinator = {
        let config = flywheel_coordinator::ServiceConfig {
            run: run.clone(),
            coordinator: CoordinatorConfig {
                bind: "127.0.0.1:0".into(),
                candidate_id: "demo-coordinator".into(),
                tick_ms: 50,
                leader_ttl_ms: 3_000,
                ..CoordinatorConfig::default()
            },
        };
        tokio::spawn(flywheel_coordinator::run_until(
            stores.clone(),
            config,
            stop.clone().cancelled_owned(),
        ))
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the task's reward service to a loopback port")?;
    let reward_url = rewards::url(listener.local_addr()?);
    tokio::spawn(rewards::serve(listener, stop.clone().cancelled_owned()));
    let workers = start_workers(stores, run, a, reward_url, &trainer.hf_model).await?;
    let counters: Vec<_> = workers
        .iter()
        .map(|w| w.metrics.tokens_generated.clone())
        .collect();
    let generated = Arc::new(move || counters.iter().map(|c| c.get()).sum::<u64>());
    let setup = eval.setup.clone();
    let observer = Recorder {
        state: stores.state.clone(),
        eval,
        progress,
        generated: generated.clone(),
        started,
        last_step: Instant::now(),
        generated_before: generated(),
        purged_before: 0,
        steps: Vec::new(),
        error: None,
    };
    let trainer_task = {
        let config = flywheel_trainer::ServiceConfig {
            run: run.clone(),
            trainer,
            resume: false,
        };
        let (stores, stop) = (stores.clone(), stop.clone());
        tokio::spawn(async move {
            let mut observer = observer;
            let ran = flywheel_trainer::run_observed(
                stores,
                config,
                stop.cancelled_owned(),
                &mut observer,
            )
            .await;
            (observer, ran)
        })
    };
    let fed = feed(stores, run, a, &setup, || trainer_task.is_finished()).await;

    stop.cancel();
    let (observer, trained) = trainer_task.await.context("the trainer task panicked")?;
    for w in workers {
        w.shutdown().await;
    }
    coordinator
        .await
        .context("the coordinator task panicked")??;
    let sent = fed?;
    trained?;
    if let Some(e) = observer.error {
        return Err(e.context("recording a step for the report"));
    }
    Ok(RlOutcome {
        steps: observer.steps,
        sent,
    })
}

/// The workers: each a consumer-group member with its own builtin engine (reading text with
/// the tokenizer of `hf_model` when it names a checkpoint).
async fn start_workers(
    stores: &RunStores,
    run: &RunConfig,
    a: &DemoArgs,
    reward_url: String,
    hf_model: &str,
) -> Result<Vec<Worker>> {
    let rewards = RewardServicesConfig {
        services: BTreeMap::from([(rewards::SERVICE_NAME.to_owned(), reward_url)]),
        ..RewardServicesConfig::default()
    };
    let mut workers = Vec::new();
    for i in 0..a.workers {
        let config = flywheel_worker::ServiceConfig {
            run: run.clone(),
            worker: WorkerConfig {
                id: format!("demo-worker-{i}"),
                engine: EngineConfig::Builtin(BuiltinConfig {
                    slots: a.slots,
                    seed: mix(&[a.seed, 6, i as u64]),
                    hf_model: hf_model.to_owned(),
                    weight_noise: a.engine_weight_noise,
                    ..BuiltinConfig::default()
                }),
                rewards: rewards.clone(),
                slots: a.slots,
                grace_period_ms: 5_000,
                poll_interval_ms: 50,
                metrics_addr: String::new(),
                ..WorkerConfig::default()
            },
        };
        let engine = config
            .worker
            .engine
            .build_for_run(&stores.blobs, &stores.run_id)?;
        workers.push(Worker::start(stores.clone(), config, engine).await?);
    }
    Ok(workers)
}

/// Feeds prompts until `a.steps` steps are (nearly) trained, then waits until every prompt
/// sent is trained or dropped and the trainer finished the last committed step. Returns the
/// prompts sent; fails when the trainer stops, when nothing moves for `--stall-secs`, or when
/// no step is trained for that long while prompts are fed (dropped prompts are movement, but
/// a run that drops every group would otherwise feed for ever).
async fn feed(
    stores: &RunStores,
    run: &RunConfig,
    a: &DemoArgs,
    setup: &Setup,
    trainer_stopped: impl Fn() -> bool,
) -> Result<u64> {
    let (state, ledger, run_id) = (&stores.state, &stores.ledger, &stores.run_id);
    let producer = PromptProducer::new(&run.kafka)?;
    let mut stream = ProblemStream::new(setup.task.clone(), Split::Train, mix(&[a.seed, 5]))?;
    // Prompts sent but not yet trained or dropped are kept to about three versions' budgets
    // (responses average ~20 tokens). Fewer starve the workers between feeder polls, and the
    // coordinator then cuts undersized steps (it cuts whatever is waiting once nothing is
    // pending, generating or parked); more only lengthen the drain at the end.
    let backlog = (3 * a.version_budget / (u64::from(a.group_size) * 20)).max(4);
    let drain_steps = (backlog * u64::from(a.group_size) * 20).div_ceil(a.token_budget);
    let mut sent = 0u64;
    let stall = Duration::from_secs(a.stall_secs);
    let mut last_progress = (Instant::now(), 0u64, 0u64);
    let mut last_step = (Instant::now(), 0u64);
    loop {
        if trainer_stopped() {
            bail!("the trainer stopped before the run drained; see the log above");
        }
        let finished = state.finished_step().await?.map_or(0, |s| s + 1);
        let counts = ledger.prompt_counts(run_id).await?;
        let feeding = finished + drain_steps.min(a.steps - 1) < a.steps;
        if feeding {
            let in_flight = sent.saturating_sub(counts.total()) + counts.pending;
            for _ in in_flight..backlog {
                let p = stream
                    .next()
                    .context("the task yields no training problems")?;
                let prompt = rewards::prompt(&setup.task, &p, &format!("p{sent:06}"), a.group_size);
                producer.send(&prompt).await?;
                sent += 1;
            }
        } else if counts.pending == 0 && counts.total() >= sent {
            // Drained: every prompt sent is accepted and trained or dropped. Wait for the
            // trainer to finish the last committed step.
            if ledger.last_step(run_id).await? == state.finished_step().await? {
                return Ok(sent);
            }
        }
        let marker = (finished, counts.trained + counts.dropped);
        if marker != (last_progress.1, last_progress.2) {
            last_progress = (Instant::now(), marker.0, marker.1);
        } else if last_progress.0.elapsed() > stall {
            bail!(
                "the run made no progress for {} s (step {finished}, {} prompts pending, {} \
                 trained, {} dropped); see the log above",
                a.stall_secs,
                counts.pending,
                counts.trained,
                counts.dropped
            );
        }
        if finished != last_step.1 {
            last_step = (Instant::now(), finished);
        } else if feeding && last_step.0.elapsed() > stall {
            bail!(
                "no step was trained for {} s while prompts were fed (step {finished}; {} \
                 prompts trained, {} dropped: most likely every group had one reward for all \
                 its samples and was filtered, i.e. the policy never solves the task; start \
                 from a stronger warm start or lower --engine-weight-noise)",
                a.stall_secs,
                counts.trained,
                counts.dropped
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records one [`StepMetrics`] per finished step (and evaluates held-out accuracy every
/// `eval.every` steps) while the trainer service runs.
struct Recorder {
    state: Arc<dyn StateStore>,
    eval: Evaluation,
    progress: Arc<DemoProgress>,
    /// Tokens the workers generated so far.
    generated: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// When the demo started.
    started: Instant,
    /// When the previous step finished.
    last_step: Instant,
    generated_before: u64,
    purged_before: u64,
    steps: Vec<StepMetrics>,
    /// The first failure to record a step; the demo fails with it at the end.
    error: Option<anyhow::Error>,
}

#[async_trait]
impl StepObserver for Recorder {
    async fn step_finished(
        &mut self,
        outcome: &StepOutcome,
        manifest: &BatchManifest,
        trainer: &Trainer,
    ) {
        if self.error.is_none()
            && let Err(e) = self.record(outcome, manifest, trainer.params()).await
        {
            self.error = Some(e);
        }
    }
}

impl Recorder {
    async fn record(
        &mut self,
        outcome: &StepOutcome,
        manifest: &BatchManifest,
        params: &Params,
    ) -> Result<()> {
        let (reward_mean, staleness) = step_rewards(&self.state, manifest).await?;
        let counts = self.state.counts().await?;
        let generated = (self.generated)();
        let step_secs = self.last_step.elapsed().as_secs_f64().max(1e-9);
        let number = outcome.step + 1;
        let held_out_accuracy = if self.eval.every > 0 && number.is_multiple_of(self.eval.every) {
            let e = &self.eval;
            Some(evaluate(&e.setup, params, &e.problems, e.seed).await?)
        } else {
            None
        };
        let m = &outcome.metrics;
        let train_secs = m.step_time.as_secs_f64().min(step_secs);
        let metrics = StepMetrics {
            step: number,
            policy_version: outcome.version,
            elapsed_secs: self.started.elapsed().as_secs_f64(),
            reward_mean,
            held_out_accuracy,
            tokens_trained: m.tokens_trained,
            tokens_generated: generated - self.generated_before,
            rollout_tokens_per_sec: (generated - self.generated_before) as f64 / step_secs,
            staleness_tokens: staleness,
            icepop_masked_fraction: m.masked_fraction,
            mean_abs_log_k: m.mean_abs_log_k,
            grad_norm: m.grad_norm,
            entropy: m.entropy,
            loss: m.loss,
            rollout_wait_secs: step_secs - train_secs,
            train_secs,
            parked_trajectories: counts.parked,
            purged_trajectories: counts.purged.saturating_sub(self.purged_before),
        };
        self.purged_before = counts.purged;
        self.generated_before = generated;
        self.last_step = Instant::now();
        self.progress.step(&metrics);
        self.steps.push(metrics);
        Ok(())
    }
}

/// The mean reward of the trajectories a step trains, and its trained tokens by staleness.
async fn step_rewards(
    state: &Arc<dyn StateStore>,
    manifest: &BatchManifest,
) -> Result<(f64, BTreeMap<u64, u64>)> {
    let (mut sum, mut n) = (0.0f64, 0u64);
    for entry in manifest.ranks.iter().flatten().flat_map(|mb| &mb.entries) {
        if let Some(t) = state.trajectory(&entry.trajectory).await?
            && let Some(r) = t.reward
        {
            sum += f64::from(r);
            n += 1;
        }
    }
    Ok((sum / n.max(1) as f64, trained_staleness(manifest)))
}

/// A step's trained tokens by staleness (versions between the segment's policy and
/// θ_old = version `step`).
pub fn trained_staleness(manifest: &BatchManifest) -> BTreeMap<u64, u64> {
    let mut staleness = BTreeMap::new();
    for entry in manifest.ranks.iter().flatten().flat_map(|mb| &mb.entries) {
        let mut pos = 0u32;
        for seg in &entry.segments {
            let (lo, hi) = (
                pos.max(entry.train_start),
                (pos + seg.tokens).min(entry.train_end),
            );
            if hi > lo {
                *staleness
                    .entry(manifest.step.saturating_sub(seg.version))
                    .or_insert(0) += u64::from(hi - lo);
            }
            pos += seg.tokens;
        }
    }
    staleness
}
