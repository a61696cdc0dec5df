//! `flywheel demo`: the whole RL loop in one process, through the deployment's code paths
//! (DESIGN.md §8, embedded mode).
//!
//! ```text
//! warm start (supervised, short on purpose) ──► weights v0 ──► held-out accuracy (before)
//!   │
//!   ▼  RL in `partial` mode (C3PO++) with IcePop (module `rl`):
//!   feeder ──Kafka (librdkafka mock cluster)──► workers (intake → ledger + state; builtin engine
//!   segments → object store) ──► coordinator (versions, budgets, C3PO cuts, ledger commit,
//!   step board) ──► trainer (rank, IcePop loss, AdamW, publish v = s+1) ──► …
//!   │
//!   ▼  feeding stops after `--steps` steps; the run drains (every accepted prompt is trained
//!      or dropped with a reason) ──► held-out accuracy (after) ──► report in `--out`
//! ```
//!
//! **Held-out accuracy.** One response per held-out problem at temperature 1 (the policy RL
//! optimises), each with a fixed random stream, so numbers before and after RL differ only by
//! the weights (the same protocol as `examples/demo_recipe.rs`), scored with the task's exact
//! reward (the function its reward service uses).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use flywheel_model::{Model, Params};
use flywheel_storage::config::RunConfig;
use flywheel_storage::ledger::{Ledger, PromptCounts, PromptStatus};
use flywheel_storage::queue::EmbeddedKafka;
use flywheel_storage::{RunStores, weights};
use flywheel_task::{Problem, accuracy, held_out_set, mix};
use flywheel_trainer::warm_start::publish_initial;

use super::args::{DemoArgs, Setup, report_folder, run_config, trainer_config};
use super::progress::DemoProgress;
use super::report::{DemoSummary, PhaseTiming, StepMetrics, write_report};
use super::rl::{Evaluation, reinforce};
use crate::audit::{AuditReport, audit};
use crate::warm_start::{TaskWarmStart, warm_start_on_task};

/// What a demo run produced.
#[derive(Debug, Clone)]
pub struct DemoOutcome {
    /// The report folder.
    pub out: PathBuf,
    /// The run's summary (both accuracies).
    pub summary: DemoSummary,
    /// One record per RL step.
    pub steps: Vec<StepMetrics>,
    /// The run id (ledger rows, object keys).
    pub run_id: String,
    /// The ledger URL (for inspection after the run).
    pub ledger_url: String,
    /// Prompts sent to the queue.
    pub prompts_sent: u64,
    /// The run's audit, taken once it stopped (no violation, or the demo fails).
    pub audit: AuditReport,
}

/// The phases of a run, shown as they start and timed for the report.
struct Phases {
    progress: Arc<DemoProgress>,
    timings: Vec<PhaseTiming>,
}

impl Phases {
    /// Runs `work` as the phase `name`.
    async fn run<T>(&mut self, name: &str, work: impl Future<Output = Result<T>>) -> Result<T> {
        self.progress.phase(name);
        let started = Instant::now();
        let out = work.await?;
        self.timings.push(PhaseTiming {
            name: name.to_owned(),
            secs: started.elapsed().as_secs_f64(),
        });
        Ok(out)
    }
}

/// Runs the demo: warm start, RL through the services, evaluation, report.
pub async fn run(args: DemoArgs) -> Result<DemoOutcome> {
    let started = Instant::now();
    let a = args.effective();
    a.check()?;
    let setup = Setup::new(&a)?;
    let out = report_folder(a.out.as_deref(), "demo")?;
    let progress = Arc::new(DemoProgress::new(a.steps));
    let mut phases = Phases {
        progress: progress.clone(),
        timings: Vec::new(),
    };
    // The embedded cluster is neither Send nor Sync: it stays on this task, and the clients
    // go before it.
    let kafka = EmbeddedKafka::start(1)?;
    let run = run_config(&a, &setup, &out, &kafka)?;
    let stores = RunStores::open(&run).await?;
    let trainer = trainer_config(&a, &setup)?;
    let optimizer = trainer.optimizer.clone();

    let params = phases
        .run("warm-start", warm_start_v0(&stores, &trainer, &setup, &a))
        .await?;
    let held_out = Arc::new(held_out_set(&setup.task, mix(&[a.seed, 4]), a.eval_size)?);
    let warm_accuracy = phases
        .run(
            "evaluation (warm start)",
            evaluate(&setup, &params, &held_out, a.seed),
        )
        .await?;
    progress.message(&format!(
        "warm-start held-out accuracy: {:.1}% ({} problems)",
        100.0 * warm_accuracy,
        held_out.len()
    ));
    let eval = Evaluation {
        setup: setup.clone(),
        problems: held_out.clone(),
        seed: a.seed,
        every: a.eval_every,
    };
    let rl = phases
        .run(
            "RL (partial rollouts)",
            reinforce(&stores, &run, trainer, &a, eval, progress.clone(), started),
        )
        .await?;
    let audit = phases
        .run("audit", audit(&stores, stores.queue.as_ref(), &optimizer))
        .await?;
    if !audit.violations.is_empty() {
        bail!("the run's audit found violations:\n{}", audit.summary());
    }
    drop(kafka);
    let final_params = latest_weights(&stores, &setup).await?;
    let final_accuracy = phases
        .run(
            "evaluation (after RL)",
            evaluate(&setup, &final_params, &held_out, a.seed),
        )
        .await?;

    let counts = stores.ledger.prompt_counts(&stores.run_id).await?;
    let summary = DemoSummary {
        warm_start_accuracy: warm_accuracy,
        final_accuracy,
        total_wall_secs: started.elapsed().as_secs_f64(),
        config: summary_config(&a, &setup, &run, &counts, rl.sent, rl.steps.len()),
        phases: phases.timings,
    };
    let files = write_report(&out, &summary, &rl.steps)?;
    // The run's objects (segments, weights, checkpoints) served the run and go with the
    // process; the report folder keeps the report and the ledger.
    let run_id = stores.run_id.clone();
    drop(stores);
    progress.finish(&summary);
    println!(
        "held-out accuracy ({} problems): warm start {:.1}%  →  after RL {:.1}%  ({:+.1} points); \
         {} RL steps, {:.0} s in all",
        held_out.len(),
        100.0 * warm_accuracy,
        100.0 * final_accuracy,
        summary.gain_points(),
        rl.steps.len(),
        summary.total_wall_secs
    );
    println!(
        "prompts: {} sent, {} trained, {} dropped; report: {}",
        rl.sent,
        counts.trained,
        counts.dropped,
        files.html.display()
    );
    Ok(DemoOutcome {
        out,
        summary,
        steps: rl.steps,
        run_id,
        ledger_url: run.storage.ledger_url.clone(),
        prompts_sent: rl.sent,
        audit,
    })
}

/// The supervised warm start, published as version 0 of the fresh run.
async fn warm_start_v0(
    stores: &RunStores,
    trainer: &flywheel_trainer::TrainerConfig,
    setup: &Setup,
    a: &DemoArgs,
) -> Result<Params> {
    let settings = TaskWarmStart {
        steps: a.sft_steps,
        batch: a.sft_batch,
        lr: a.sft_lr,
        seed: a.seed,
        target_accuracy: a.sft_target,
    };
    let initial = trainer.initial_params()?;
    let (task, tok, max_response) = (
        setup.task.clone(),
        setup.tok.clone(),
        setup.max_response as usize,
    );
    let params = tokio::task::spawn_blocking(move || {
        warm_start_on_task(&task, initial, &tok, &settings, max_response)
    })
    .await
    .context("the warm start panicked")??;
    if !publish_initial(stores, trainer, params.clone()).await? {
        bail!(
            "weights version 0 of run {} already exist; use a fresh --out folder",
            stores.run_id
        );
    }
    Ok(params)
}

/// The newest published weights of the run.
async fn latest_weights(stores: &RunStores, setup: &Setup) -> Result<Params> {
    let version = weights::latest_version(&stores.blobs, &stores.run_id)
        .await?
        .context("the run published no weights")?;
    let fetched = weights::fetch(
        &stores.blobs,
        &stores.run_id,
        version,
        None,
        &Default::default(),
    )
    .await?;
    Ok(Params::from_bytes_map(&setup.model, &fetched.tensors)?)
}

/// Held-out accuracy of `params`: one temperature-1 sample per problem, scored exactly.
pub async fn evaluate(
    setup: &Setup,
    params: &Params,
    problems: &Arc<Vec<Problem>>,
    seed: u64,
) -> Result<f64> {
    let (task, params, problems) = (setup.task.clone(), params.clone(), problems.clone());
    let (tok, max_new) = (setup.tok.clone(), setup.max_response as usize);
    Ok(tokio::task::spawn_blocking(move || {
        accuracy(&task, &Model::cpu(&params)?, &tok, &problems, max_new, seed)
    })
    .await??)
}

/// The settings shown in the report.
fn summary_config(
    a: &DemoArgs,
    s: &Setup,
    run: &RunConfig,
    counts: &PromptCounts,
    sent: u64,
    steps: usize,
) -> BTreeMap<String, String> {
    let mut c = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        c.insert(k.to_owned(), v);
    };
    put("seed", a.seed.to_string());
    put("quick", a.quick.to_string());
    put(
        "model",
        format!(
            "d_model {} × {} layers, {} heads, max_seq_len {}",
            s.model.d_model, s.model.n_layers, s.model.n_heads, s.model.max_seq_len
        ),
    );
    put(
        "task",
        format!(
            "{}..={} terms of 0..={}, tail exponent {}",
            s.task.min_terms, s.task.max_terms, s.task.max_term, s.task.tail_exponent
        ),
    );
    put(
        "warm start",
        format!(
            "{} steps × {} problems, lr {}",
            a.sft_steps, a.sft_batch, a.sft_lr
        ),
    );
    let loss = if a.vanilla_grpo {
        "vanilla GRPO (no IcePop)"
    } else {
        "IcePop"
    };
    put("mode", format!("partial (C3PO++), {loss}"));
    if a.engine_weight_noise > 0.0 {
        put(
            "engine weight noise",
            format!("{} × each tensor's RMS", a.engine_weight_noise),
        );
    }
    put(
        "rl lr",
        if a.rl_lr_final == 1.0 {
            a.rl_lr.to_string()
        } else {
            format!("{} → {} (linear)", a.rl_lr, a.rl_lr * a.rl_lr_final)
        },
    );
    put("K (group size)", a.group_size.to_string());
    put("Φ (token budget)", run.batch.token_budget.to_string());
    put(
        "Φ_r (version budget)",
        run.rollout.version_budget_tokens.to_string(),
    );
    put("S (segment tokens)", run.rollout.segment_tokens.to_string());
    put("σ (retention)", run.rollout.retention_limit.to_string());
    put("workers × slots", format!("{} × {}", a.workers, a.slots));
    put("steps (fed / trained)", format!("{} / {steps}", a.steps));
    put(
        "prompts",
        format!(
            "{sent} sent, {} trained, {} dropped",
            counts.trained, counts.dropped
        ),
    );
    put(
        "stores",
        format!(
            "state {}, blobs {}, ledger {}, queue: embedded Kafka",
            run.storage.state_url, run.storage.blob_url, run.storage.ledger_url
        ),
    );
    c
}

/// Every prompt the ledger accepted for `run` is trained in exactly one step or dropped with a
/// reason: returns (trained, dropped), or an error naming the first prompt that is not.
pub async fn check_accounting(ledger: &dyn Ledger, run: &str) -> Result<(u64, u64)> {
    let counts = ledger.prompt_counts(run).await?;
    if counts.pending > 0 {
        let pending = ledger.pending_prompts(run).await?;
        bail!(
            "{} prompts are neither trained nor dropped (e.g. {:?})",
            counts.pending,
            pending.first().map(|p| p.id.clone())
        );
    }
    let mut seen = std::collections::HashSet::new();
    for summary in ledger.steps(run).await? {
        let record = ledger
            .step(run, summary.step)
            .await?
            .with_context(|| format!("step {} is listed but has no record", summary.step))?;
        for p in record.prompts {
            if !seen.insert(p.clone()) {
                bail!("prompt {p} was trained in more than one step");
            }
            match ledger.prompt_status(run, &p).await? {
                Some(PromptStatus::Trained { step }) if step == summary.step => {}
                other => bail!(
                    "prompt {p} is in step {} but its status is {other:?}",
                    summary.step
                ),
            }
        }
    }
    if seen.len() as u64 != counts.trained {
        bail!(
            "the steps train {} prompts but the ledger counts {} trained",
            seen.len(),
            counts.trained
        );
    }
    Ok((counts.trained, counts.dropped))
}
