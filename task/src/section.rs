//! The `[task]` section of a run's config: the shape of the built-in task's problems and the
//! group size, read by every process of a distributed run so that the prompts
//! (`flywheel ingest --demo-task N`), the warm start (`flywheel trainer --warm-start-steps N`)
//! and the model's context agree.
//!
//! ```toml
//! [task]             # the built-in addition task (see `flywheel_task::problems`)
//! min_terms = 2
//! max_terms = 6
//! max_term = 9
//! tail_exponent = 2.0
//! group_size = 8     # K of every ingested prompt
//! ```
//!
//! Prompts name the task's reward service ([`crate::rewards`], `flywheel rewards`).

use flywheel_model::ModelConfig;
use flywheel_storage::Prompt;
use serde::{Deserialize, Serialize};

use crate::problems::{ProblemStream, Split, TaskConfig, TaskError};
use crate::rewards;

/// `[task]`: the shape of the built-in addition task's problems and the group size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskSection {
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

impl Default for TaskSection {
    fn default() -> Self {
        let t = TaskConfig::default();
        TaskSection {
            min_terms: t.min_terms,
            max_terms: t.max_terms,
            max_term: t.max_term,
            tail_exponent: t.tail_exponent,
            group_size: 8,
        }
    }
}

impl TaskSection {
    /// The task's configuration, validated.
    pub fn task(&self) -> Result<TaskConfig, TaskError> {
        let t = TaskConfig {
            min_terms: self.min_terms,
            max_terms: self.max_terms,
            max_term: self.max_term,
            tail_exponent: self.tail_exponent,
        };
        t.validate()?;
        if self.group_size < 2 {
            return Err(TaskError::InvalidConfig(format!(
                "[task] group_size = {} must be at least 2 (GRPO compares a prompt's samples)",
                self.group_size
            )));
        }
        Ok(t)
    }

    /// Most response tokens a reference needs (its characters and EOS): a lower bound for
    /// `[rollout] max_response_tokens`.
    pub fn reference_tokens(&self) -> Result<usize, TaskError> {
        Ok(self.task()?.max_response_chars() + 1)
    }

    /// Checks that `model` has room for BOS, the task's prompt and its longest reference
    /// with EOS; the error says which `max_seq_len` is needed.
    pub fn check_model(&self, model: &ModelConfig) -> Result<(), TaskError> {
        let task = self.task()?;
        let needed = 1 + task.prompt_chars() + self.reference_tokens()?;
        if model.max_seq_len < needed {
            return Err(TaskError::InvalidConfig(format!(
                "[trainer.model] max_seq_len = {} is too short for the [task]: BOS, a prompt of \
                 {} characters and a reference of up to {} tokens need {needed}",
                model.max_seq_len,
                task.prompt_chars(),
                self.reference_tokens()?
            )));
        }
        Ok(())
    }

    /// `count` training prompts of the task, reproducible from `seed`. Ids are
    /// `task-<seed>-<index>`, so ingesting the same seed twice sends the same prompts (the
    /// ledger accepts each once) and different seeds never collide.
    pub fn prompts(&self, count: usize, seed: u64) -> Result<Vec<Prompt>, TaskError> {
        let config = self.task()?;
        let stream = ProblemStream::new(config.clone(), Split::Train, seed)?;
        let out: Vec<Prompt> = stream
            .take(count)
            .enumerate()
            .map(|(i, p)| {
                rewards::prompt(&config, &p, &format!("task-{seed}-{i:06}"), self.group_size)
            })
            .collect();
        if out.len() < count {
            return Err(TaskError::InvalidConfig(
                "the [task] yields (almost) no training problems: raise max_terms or max_term"
                    .into(),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problems::Problem;
    use flywheel_model::Tokenizer;
    use flywheel_storage::{PromptInput, VerifierSpec};

    #[test]
    fn prompts_are_reproducible_valid_and_uniquely_named() {
        let task = TaskSection {
            max_terms: 6,
            ..TaskSection::default()
        };
        let a = task.prompts(50, 3).unwrap();
        assert_eq!(a, task.prompts(50, 3).unwrap());
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
        let err = TaskSection {
            group_size: 1,
            ..TaskSection::default()
        }
        .task()
        .unwrap_err();
        assert!(err.to_string().contains("group_size"), "{err}");
        let err = TaskSection {
            min_terms: 0,
            ..TaskSection::default()
        }
        .task()
        .unwrap_err();
        assert!(err.to_string().contains("min_terms"), "{err}");
        let small = ModelConfig {
            max_seq_len: 16,
            ..ModelConfig::tiny(Tokenizer::arithmetic().vocab_size())
        };
        let err = TaskSection::default().check_model(&small).unwrap_err();
        assert!(err.to_string().contains("max_seq_len"), "{err}");
    }
}
