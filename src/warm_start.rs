//! The built-in task's warm start: the supervised phase on the task's reference responses
//! ([`flywheel_trainer::warm_start`]) that `flywheel demo` and `flywheel trainer
//! --warm-start-steps` run before RL, and its publication as version 0.

use anyhow::{Context, Result};
use flywheel_model::{Params, TextCodec};
use flywheel_storage::RunStores;
use flywheel_task::{Problem, ProblemStream, Split, TaskConfig, TaskSection, accuracy, mix};
use flywheel_trainer::TrainerConfig;
use flywheel_trainer::step::SupervisedExample;
use flywheel_trainer::warm_start::{WarmStart, publish_initial, warm_start};

/// How the warm start on the task runs.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskWarmStart {
    /// The most supervised steps.
    pub steps: usize,
    /// Problems per step.
    pub batch: usize,
    /// Learning rate.
    pub lr: f64,
    /// Seed of the problem stream and the target check (the initial weights come from the
    /// trainer's config).
    pub seed: u64,
    /// Stop once the policy solves this fraction of a fixed set of training problems
    /// (checked every [`CHECK_EVERY`] steps at temperature 1), so that it is mediocre by
    /// design whatever the seed; 0 runs all `steps`.
    pub target_accuracy: f64,
}

/// Steps between two checks of the target accuracy.
pub const CHECK_EVERY: usize = 25;

/// Training problems the target accuracy is checked on.
const CHECK_PROBLEMS: usize = 256;

/// One supervised example: the task's prompt, then its reference response and EOS.
fn example(task: &TaskConfig, tok: &TextCodec, p: &Problem) -> Result<SupervisedExample> {
    Ok(SupervisedExample::from_text(
        tok,
        &task.prompt(p),
        &task.reference(p),
    )?)
}

/// Warm-starts `initial` on `task`'s reference responses, read and written with `tok`;
/// `max_response` bounds the responses sampled for the target check.
pub fn warm_start_on_task(
    task: &TaskConfig,
    initial: Params,
    tok: &TextCodec,
    settings: &TaskWarmStart,
    max_response: usize,
) -> Result<Params> {
    let mut stream = ProblemStream::new(task.clone(), Split::Train, mix(&[settings.seed, 1]))?;
    let mut failed = None;
    let mut batches = std::iter::from_fn(|| {
        let batch: Result<Vec<_>> = stream
            .by_ref()
            .take(settings.batch)
            .map(|p| example(task, tok, &p))
            .collect();
        batch.map_err(|e| failed = Some(e)).ok()
    });
    let check: Vec<Problem> =
        ProblemStream::new(task.clone(), Split::Train, mix(&[settings.seed, 7]))?
            .take(CHECK_PROBLEMS)
            .collect();
    let check_seed = mix(&[settings.seed, 8]);
    let mut done = |step: usize, model: &flywheel_model::Model| {
        let due = settings.target_accuracy > 0.0 && step > 0 && step.is_multiple_of(CHECK_EVERY);
        Ok(due
            && accuracy(task, model, tok, &check, max_response, check_seed)?
                >= settings.target_accuracy)
    };
    let trainer_settings = WarmStart {
        steps: settings.steps,
        lr: settings.lr,
    };
    let (params, _) = warm_start(initial, &trainer_settings, &mut batches, &mut done)?;
    if let Some(e) = failed {
        return Err(e.context("building the warm start's examples"));
    }
    Ok(params)
}

/// `flywheel trainer --warm-start-steps N`: unless the run has a version 0 already, warm-start
/// `[trainer.model]` on the `[task]` and publish the result as version 0. Returns whether
/// this call published it.
pub async fn publish_task_warm_start(
    stores: &RunStores,
    trainer: &TrainerConfig,
    task: &TaskSection,
    settings: &TaskWarmStart,
) -> Result<bool> {
    trainer.validate()?;
    let mut resolved = trainer.clone();
    resolved.resolve_hf_model()?;
    task.check_model(&resolved.model)?;
    if flywheel_storage::weights::exists(&stores.blobs, &stores.run_id, 0).await? {
        tracing::info!(run = %stores.run_id, "version 0 exists already; no warm start");
        return Ok(false);
    }
    let initial = trainer.initial_params()?;
    let tok = trainer.text_codec()?;
    let (task_config, s) = (task.task()?, settings.clone());
    let max_response = task.reference_tokens()?;
    tracing::info!(steps = s.steps, batch = s.batch, "supervised warm start");
    let params = tokio::task::spawn_blocking(move || {
        warm_start_on_task(&task_config, initial, &tok, &s, max_response)
    })
    .await
    .context("the warm start panicked")??;
    Ok(publish_initial(stores, trainer, params).await?)
}
