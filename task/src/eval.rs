//! Sampling responses to the task's prompts, and held-out accuracy: how often one
//! temperature-1 sample of a model solves a problem.

use flywheel_model::{CpuBackend, Model, ModelError, SampleConfig, Sampler, StopReason, TextCodec};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::mix;
use crate::problems::{Problem, TaskConfig};

/// One sampled response: its tokens (EOS included when it stopped there) and their log-probs.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    /// The sampled tokens.
    pub tokens: Vec<u32>,
    /// The sampler's log-prob of each.
    pub logprobs: Vec<f32>,
    /// Whether it ended at EOS (a response cut by the length limit has no final answer).
    pub finished: bool,
}

impl Response {
    /// The task's reward of the response to `problem`: 0 unless it finished.
    pub fn reward(&self, problem: &Problem, tok: &TextCodec) -> f32 {
        match tok.decode(&self.tokens) {
            Ok(text) if self.finished => problem.reward(&text),
            _ => 0.0,
        }
    }
}

/// Samples one response of `model` to the token ids `prompt`, at most `max_new` tokens, until
/// one of the `stop` tokens, from the random stream `seed`.
pub fn respond(
    sampler: &mut Sampler<CpuBackend>,
    model: &Model,
    prompt: &[u32],
    sample: &SampleConfig,
    stop: &[u32],
    max_new: usize,
    seed: u64,
) -> Result<Response, ModelError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    sampler.prefill(model, prompt)?;
    let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
    let reason = sampler.generate(
        model,
        sample,
        max_new,
        stop,
        &mut rng,
        &mut tokens,
        &mut logprobs,
    )?;
    Ok(Response {
        tokens,
        logprobs,
        finished: reason == StopReason::Eos,
    })
}

/// The fraction of `problems` of `task` one temperature-1 sample of `model` (reading and
/// writing text with `tok`) solves (the
/// task's exact reward; a response longer than `max_new` tokens or cut by the model's context
/// scores 0). Problem i uses its own fixed random stream from `seed`, so two models are
/// compared on the same draws.
pub fn accuracy(
    task: &TaskConfig,
    model: &Model,
    tok: &TextCodec,
    problems: &[Problem],
    max_new: usize,
    seed: u64,
) -> Result<f64, ModelError> {
    let invalid = |e: &dyn std::fmt::Display| ModelError::InvalidInput(e.to_string());
    let correct: f32 = problems
        .par_iter()
        .enumerate()
        .map_init(
            || Sampler::new(model),
            |sampler, (i, p)| -> Result<f32, ModelError> {
                let sampler = sampler.as_mut().map_err(|e| invalid(&*e))?;
                let prompt = tok.encode_prompt(&task.prompt(p))?;
                let seed = mix(&[seed, 2, i as u64]);
                let r = respond(
                    sampler,
                    model,
                    &prompt,
                    &SampleConfig::default(),
                    tok.stop_tokens(),
                    max_new,
                    seed,
                )?;
                Ok(r.reward(p, tok))
            },
        )
        .sum::<Result<f32, ModelError>>()?;
    Ok(f64::from(correct) / problems.len().max(1) as f64)
}
