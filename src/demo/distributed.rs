//! The demo's task for a distributed run: the `[task]` section of the run's TOML file, the
//! prompts `flywheel ingest --demo-task N` sends, and the supervised warm start
//! `flywheel trainer --warm-start-steps N` publishes as version 0 (`scripts/distributed.sh`,
//! `tests/distributed.rs`).
//!
//! ```toml
//! [task]             # the built-in addition task (see `flywheel::demo::task`)
//! min_terms = 2
//! max_terms = 6
//! max_term = 9
//! tail_exponent = 2.0
//! group_size = 8     # K of every ingested prompt
//! ```
//!
//! Every process reads the same file, so the prompts, the warm start and the model's
//! context (`[trainer.model] max_seq_len`, checked by [`TaskSection::check_model`]) agree.
//! Prompts name the task's reward service ([`super::rewards`], `flywheel rewards`), as in
//! `flywheel demo`.

use anyhow::{Context, Result, bail};
use flywheel_model::{Model, ModelConfig, Params, Tokenizer};
use flywheel_storage::Prompt;
use flywheel_storage::config::RunConfig;
use flywheel_storage::weights;
use flywheel_trainer::step::{SupervisedExample, supervised_step};
use flywheel_trainer::{AdamW, AdamWConfig, Services, Trainer, TrainerConfig};
use serde::{Deserialize, Serialize};

use super::rewards;
use super::task::{Problem, ProblemStream, Split, TaskConfig};

/// What a service reads of the run's file for the demo task: the `[task]` table, the rest
/// ignored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskSection {
    /// The `[task]` table.
    #[serde(default)]
    pub task: TaskFileConfig,
}

/// `[task]`: the shape of the built-in addition task's problems and the group size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskFileConfig {
    /// Fewest terms in a problem.
    pub min_terms: usize,
    /// Most terms in a problem.
    pub max_terms: usize,
    /// Largest term.
    pub max_term: u32,
    /// Exponent of the long-tailed length distribution.
    pub tail_exponent: f64,
    /// K: samples per prompt (GRPO group size).
    pub group_size: u32,
}

impl Default for TaskFileConfig {
    fn default() -> Self {
        let t = TaskConfig::default();
        TaskFileConfig {
            min_terms: t.min_terms,
            max_terms: t.max_terms,
            max_term: t.max_term,
            tail_exponent: t.tail_exponent,
            group_size: 8,
        }
    }
}

impl TaskFileConfig {
    /// The task's configuration, validated.
    pub fn task(&self) -> Result<TaskConfig> {
        let t = TaskConfig {
            min_terms: self.min_terms,
            max_terms: self.max_terms,
            max_term: self.max_term,
            tail_exponent: self.tail_exponent,
        };
        t.validate().context("[task]")?;
        if self.group_size < 2 {
            bail!(
                "[task] group_size = {} must be at least 2 (GRPO compares a prompt's samples)",
                self.group_size
            );
        }
        Ok(t)
    }

    /// Most response tokens a reference needs (its characters and EOS): a lower bound for
    /// `[rollout] max_response_tokens`.
    pub fn reference_tokens(&self) -> Result<usize> {
        Ok(self.task()?.max_response_chars() + 1)
    }
}

impl TaskSection {
    /// Checks that `model` has room for BOS, the task's prompt and its longest reference
    /// with EOS; the error says which `max_seq_len` is needed.
    pub fn check_model(&self, model: &ModelConfig) -> Result<()> {
        let task = self.task.task()?;
        let needed = 1 + task.prompt_chars() + self.task.reference_tokens()?;
        if model.max_seq_len < needed {
            bail!(
                "[trainer.model] max_seq_len = {} is too short for the [task]: BOS, a prompt of \
                 {} characters and a reference of up to {} tokens need {needed}",
                model.max_seq_len,
                task.prompt_chars(),
                self.task.reference_tokens()?
            );
        }
        Ok(())
    }
}

/// `count` training prompts of the task, reproducible from `seed`. Ids are
/// `task-<seed>-<index>`, so ingesting the same seed twice sends the same prompts (the ledger
/// accepts each once) and different seeds never collide.
pub fn prompts(task: &TaskFileConfig, count: usize, seed: u64) -> Result<Vec<Prompt>> {
    let config = task.task()?;
    let stream = ProblemStream::new(config.clone(), Split::Train, seed)?;
    let out: Vec<Prompt> = stream
        .take(count)
        .enumerate()
        .map(|(i, p)| rewards::prompt(&config, &p, &format!("task-{seed}-{i:06}"), task.group_size))
        .collect();
    if out.len() < count {
        bail!("the [task] yields (almost) no training problems: raise max_terms or max_term");
    }
    Ok(out)
}

/// Settings of the supervised warm start.
#[derive(Clone, Debug, PartialEq)]
pub struct WarmStart {
    /// Supervised steps (short on purpose: the warm start should be mediocre).
    pub steps: usize,
    /// Problems per step.
    pub batch: usize,
    /// Learning rate.
    pub lr: f64,
    /// Seed of the initial weights and of the problem stream.
    pub seed: u64,
}

/// The supervised warm start on the task's reference responses (prompt, reference, EOS; the
/// loss on the response only) through [`supervised_step`], from `Params::init(model, seed)`:
/// returns the weights and each step's loss. The problems come from the training split.
pub fn warm_start(
    task: &TaskConfig,
    tok: &Tokenizer,
    model: &ModelConfig,
    settings: &WarmStart,
) -> Result<(Params, Vec<f64>)> {
    let mut losses = Vec::with_capacity(settings.steps);
    let mut params = Params::init(model, settings.seed)?;
    let mut cpu = Model::cpu(&params)?;
    let mut opt = AdamW::new(AdamWConfig {
        lr: settings.lr,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    })?;
    // A stream apart from the ingested prompts' (seeded by the ingest's own seed).
    let mut stream = ProblemStream::new(task.clone(), Split::Train, settings.seed ^ 0x5f7)?;
    for _ in 0..settings.steps {
        let examples = stream
            .by_ref()
            .take(settings.batch)
            .map(|p| reference_example(task, tok, &p))
            .collect::<Result<Vec<_>>>()?;
        let metrics = supervised_step(&mut cpu, &mut params, &mut opt, &examples, usize::MAX)?;
        losses.push(metrics.loss);
    }
    Ok((params, losses))
}

/// One supervised example of the warm start: BOS + prompt, then the reference response and EOS
/// (the response the RL reward accepts, in the layout the policy must learn).
pub fn reference_example(
    task: &TaskConfig,
    tok: &Tokenizer,
    p: &Problem,
) -> Result<SupervisedExample> {
    let mut tokens = tok.encode_prompt(&task.prompt(p))?;
    let response_start = tokens.len();
    tok.encode_into(&task.reference(p), &mut tokens)?;
    tokens.push(Tokenizer::EOS);
    Ok(SupervisedExample {
        tokens,
        response_start,
    })
}

/// `flywheel trainer --warm-start-steps N`: unless the run already has a version 0, warm-start
/// the `[trainer.model]` on the `[task]` and publish the result as version 0 the way the
/// trainer publishes versions ([`Trainer::start_with`]). Returns whether this call published
/// it; when another trainer's version 0 won the race, this one's is discarded (every trainer
/// then starts from the same weights).
pub async fn publish_warm_start(
    run: &RunConfig,
    trainer: &TrainerConfig,
    task: &TaskSection,
    settings: &WarmStart,
) -> Result<bool> {
    trainer.validate()?;
    task.check_model(&trainer.model)?;
    let services = Services::open(run).await?;
    let run_id = run.storage.run_id.clone();
    if weights::exists(&services.blob, &run_id, 0).await? {
        tracing::info!(run = %run_id, "version 0 exists already; no warm start");
        return Ok(false);
    }
    let (task_config, tok, model, s) = (
        task.task.task()?,
        trainer.tokenizer()?,
        trainer.model.clone(),
        settings.clone(),
    );
    tracing::info!(steps = s.steps, batch = s.batch, "supervised warm start");
    let (params, losses) =
        tokio::task::spawn_blocking(move || warm_start(&task_config, &tok, &model, &s)).await??;
    tracing::info!(
        first_loss = losses.first().copied().unwrap_or(f64::NAN),
        last_loss = losses.last().copied().unwrap_or(f64::NAN),
        "warm start done"
    );
    match Trainer::start_with(services.clone(), trainer.clone(), Some(params)).await {
        Ok(_) => Ok(true),
        // Lost the race to another trainer's version 0: use that one.
        Err(e) if weights::exists(&services.blob, &run_id, 0).await? => {
            tracing::warn!(error = %e, "another trainer published version 0 first; using it");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_storage::{PromptInput, VerifierSpec};

    #[test]
    fn prompts_are_reproducible_valid_and_uniquely_named() {
        let task = TaskFileConfig {
            max_terms: 6,
            ..TaskFileConfig::default()
        };
        let a = prompts(&task, 50, 3).unwrap();
        assert_eq!(a, prompts(&task, 50, 3).unwrap());
        let ids: std::collections::HashSet<_> = a.iter().map(|p| p.id.clone()).collect();
        assert_eq!(ids.len(), 50);
        let config = task.task().unwrap();
        for p in &a {
            let PromptInput::Text(text) = &p.input else {
                panic!("text prompts")
            };
            assert_eq!(text.len(), config.prompt_chars());
            let problem = Problem::from_prompt(text).unwrap();
            assert_eq!(Split::of(&problem), Split::Train);
            assert_eq!(
                p.verifier,
                VerifierSpec::Service {
                    name: rewards::SERVICE_NAME.into()
                }
            );
            assert_eq!(p.group_size, 8);
        }
    }

    #[test]
    fn bad_task_sections_are_named() {
        let err = TaskFileConfig {
            group_size: 1,
            ..TaskFileConfig::default()
        }
        .task()
        .unwrap_err();
        assert!(err.to_string().contains("group_size"), "{err}");
        let err = TaskFileConfig {
            min_terms: 0,
            ..TaskFileConfig::default()
        }
        .task()
        .unwrap_err();
        assert!(format!("{err:#}").contains("min_terms"), "{err:#}");
        let section = TaskSection::default();
        let small = ModelConfig {
            max_seq_len: 16,
            ..ModelConfig::tiny(Tokenizer::arithmetic().vocab_size())
        };
        let err = section.check_model(&small).unwrap_err();
        assert!(err.to_string().contains("max_seq_len"), "{err}");
    }

    #[test]
    fn warm_start_lowers_the_supervised_loss() {
        let task = TaskConfig {
            max_terms: 3,
            ..TaskConfig::default()
        };
        let tok = Tokenizer::arithmetic();
        let model = ModelConfig {
            d_model: 16,
            n_layers: 1,
            n_heads: 2,
            d_ff: 64,
            max_seq_len: 32,
            ..ModelConfig::tiny(tok.vocab_size())
        };
        let settings = WarmStart {
            steps: 0,
            batch: 8,
            lr: 3e-3,
            seed: 1,
        };
        let (init, none) = warm_start(&task, &tok, &model, &settings).unwrap();
        assert!(none.is_empty());
        assert_eq!(
            init.tensors(),
            Params::init(&model, 1).unwrap().tensors(),
            "no steps: the seeded initialisation"
        );
        let (trained, losses) = warm_start(
            &task,
            &tok,
            &model,
            &WarmStart {
                steps: 30,
                ..settings
            },
        )
        .unwrap();
        assert_ne!(trained.tensors(), init.tensors());
        let first: f64 = losses[..5].iter().sum();
        let last: f64 = losses[losses.len() - 5..].iter().sum();
        assert!(last < first, "losses {losses:?}");
    }
}
