//! Held-out accuracy: how often one temperature-1 sample of a model solves a problem.

use flywheel_model::{Model, ModelError, SampleConfig, Sampler, StopReason, Tokenizer};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::mix;
use crate::problems::{Problem, TaskConfig};

/// The fraction of `problems` of `task` one temperature-1 sample of `model` solves (the
/// task's exact reward; a response longer than `max_new` tokens or cut by the model's context
/// scores 0). Problem i uses its own fixed random stream from `seed`, so two models are
/// compared on the same draws.
pub fn accuracy(
    task: &TaskConfig,
    model: &Model,
    problems: &[Problem],
    max_new: usize,
    seed: u64,
) -> Result<f64, ModelError> {
    let tok = Tokenizer::arithmetic();
    let invalid = |e: &dyn std::fmt::Display| ModelError::InvalidInput(e.to_string());
    let correct: f32 = problems
        .par_iter()
        .enumerate()
        .map_init(
            || Sampler::new(model),
            |sampler, (i, p)| -> Result<f32, ModelError> {
                let sampler = sampler.as_mut().map_err(|e| invalid(&*e))?;
                let mut rng = ChaCha8Rng::seed_from_u64(mix(&[seed, 2, i as u64]));
                let prompt = tok
                    .encode_prompt(&task.prompt(p))
                    .map_err(|e| invalid(&e))?;
                sampler.prefill(model, &prompt)?;
                let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
                let stop = sampler.generate(
                    model,
                    &SampleConfig::default(),
                    max_new,
                    Some(Tokenizer::EOS),
                    &mut rng,
                    &mut tokens,
                    &mut logprobs,
                )?;
                if stop != StopReason::Eos {
                    return Ok(0.0);
                }
                let text = tok.decode(&tokens).map_err(|e| invalid(&e))?;
                Ok(p.reward(&text))
            },
        )
        .sum::<Result<f32, ModelError>>()?;
    Ok(f64::from(correct) / problems.len().max(1) as f64)
}
