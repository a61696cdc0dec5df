//! The supervised warm start: a short cross-entropy phase on reference responses that gives
//! RL a policy to start from, and its publication as version 0. `flywheel demo` and
//! `flywheel trainer --warm-start-steps` both go through here.

use flywheel_model::{Model, ModelError, Params};
use flywheel_storage::RunStores;
use flywheel_storage::weights;

use crate::config::TrainerConfig;
use crate::optim::{AdamW, AdamWConfig};
use crate::service::{Trainer, TrainerError};
use crate::step::{StepError, SupervisedExample, supervised_step};

/// Settings of a warm start.
#[derive(Clone, Debug, PartialEq)]
pub struct WarmStart {
    /// The most supervised steps (short on purpose: the warm start should be mediocre).
    pub steps: usize,
    /// Learning rate (AdamW, no weight decay).
    pub lr: f64,
}

/// Why a warm start failed.
#[derive(Debug, thiserror::Error)]
pub enum WarmStartError {
    /// A supervised step failed.
    #[error(transparent)]
    Step(#[from] StepError),
    /// The model could not be built, or the stopping check failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Trains `initial` with one AdamW step per batch of `batches`, for at most
/// `settings.steps` steps. Before each step `done(step, model)` may end it early (a target
/// accuracy reached). Returns the weights and each step's loss.
pub fn warm_start(
    initial: Params,
    settings: &WarmStart,
    batches: &mut dyn Iterator<Item = Vec<SupervisedExample>>,
    done: &mut dyn FnMut(usize, &Model) -> Result<bool, ModelError>,
) -> Result<(Params, Vec<f64>), WarmStartError> {
    let mut params = initial;
    let mut cpu = Model::cpu(&params)?;
    let mut optimizer = AdamW::new(AdamWConfig {
        lr: settings.lr,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    })
    .map_err(StepError::from)?;
    let mut losses = Vec::with_capacity(settings.steps);
    for step in 0..settings.steps {
        if done(step, &cpu)? {
            tracing::info!(step, "warm start reached its target");
            break;
        }
        let Some(examples) = batches.next() else {
            break;
        };
        let metrics =
            supervised_step(&mut cpu, &mut params, &mut optimizer, &examples, usize::MAX)?;
        losses.push(metrics.loss);
    }
    Ok((params, losses))
}

/// Publishes `params` as version 0 of the run the way the trainer publishes versions, unless
/// the run has a version 0 already. Returns whether this call published it; when another
/// trainer's version 0 won a race, that one stands (every trainer then starts from it).
pub async fn publish_initial(
    stores: &RunStores,
    config: &TrainerConfig,
    params: Params,
) -> Result<bool, TrainerError> {
    if weights::exists(&stores.blobs, &stores.run_id, 0).await? {
        tracing::info!(run = %stores.run_id, "version 0 exists already");
        return Ok(false);
    }
    match Trainer::start_with(stores.clone(), config.clone(), Some(params)).await {
        Ok(_) => Ok(true),
        Err(e) if weights::exists(&stores.blobs, &stores.run_id, 0).await? => {
            tracing::warn!(error = %e, "another trainer published version 0 first; using it");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_model::{ModelConfig, TextCodec, Tokenizer};

    fn batches(tok: &TextCodec) -> impl Iterator<Item = Vec<SupervisedExample>> + '_ {
        (0u32..).map(move |i| {
            (0..8)
                .map(|j| {
                    let (a, b) = ((i + j) % 7, (i * 3 + j) % 5);
                    let prompt = format!("{a}+{b}=");
                    SupervisedExample::from_text(tok, &prompt, &(a + b).to_string()).unwrap()
                })
                .collect()
        })
    }

    #[test]
    fn warm_start_lowers_the_supervised_loss_and_stops_when_told() {
        let chars = Tokenizer::arithmetic();
        let tok = TextCodec::Chars(chars.clone());
        let model = ModelConfig {
            d_model: 16,
            n_layers: 1,
            n_heads: 2,
            d_ff: 64,
            max_seq_len: 32,
            ..ModelConfig::tiny(chars.vocab_size())
        };
        let settings = WarmStart {
            steps: 30,
            lr: 3e-3,
        };
        let init = || Params::init(&model, 1).unwrap();
        let never = &mut |_: usize, _: &Model| Ok(false);
        let (trained, losses) = warm_start(init(), &settings, &mut batches(&tok), never).unwrap();
        assert_eq!(losses.len(), 30);
        assert_ne!(
            trained.tensors(),
            Params::init(&model, 1).unwrap().tensors()
        );
        let first: f64 = losses[..5].iter().sum();
        let last: f64 = losses[losses.len() - 5..].iter().sum();
        assert!(last < first, "losses {losses:?}");

        let at_ten = &mut |step: usize, _: &Model| Ok(step == 10);
        let (_, losses) = warm_start(init(), &settings, &mut batches(&tok), at_ten).unwrap();
        assert_eq!(losses.len(), 10);
        let (unchanged, none) = warm_start(
            init(),
            &WarmStart {
                steps: 0,
                ..settings
            },
            &mut batches(&tok),
            never,
        )
        .unwrap();
        assert!(none.is_empty());
        assert_eq!(unchanged, init(), "the initial weights");
    }
}
