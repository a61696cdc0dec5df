//! The built-in engine: the run's own policy ([`flywheel_model::Model`]) sampled on `device`
//! (the CPU, or a GPU through [`flywheel_model::DeviceBackend`]).
//!
//! Weights come from the object store exactly as the trainer published them
//! ([`flywheel_storage::weights`]): version v is fetched when a segment asks for it, reusing
//! the chunks of a version already held (only changed tensors are downloaded). The model's
//! shape travels in the manifest's metadata (`model_config`, JSON of
//! [`flywheel_model::ModelConfig`]), so the engine needs no model settings of its own. The
//! engine keeps the two newest versions it was asked for, so slots straddling a version change
//! do not reload weights back and forth; it waits (bounded) for a version that is not
//! published yet.
//!
//! Every call re-prefills prompt + committed tokens into a [`Sampler`] from a pool (one per
//! slot, reused across versions of the same shape) and samples up to `max_new_tokens`
//! tokens, stopping at EOS (the run's text codec's: a checkpoint's, or the character tokenizer's). Text prompts are BOS + the character tokenizer's ids, exactly what
//! the trainer stitches ([`Tokenizer::encode_prompt`]). The randomness of a segment is a fixed
//! function of (seed, trajectory, committed length), so a resumed segment draws the same
//! stream wherever it runs. Sampling runs on tokio's blocking pool.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use flywheel_model::{
    Device, DeviceBackend, Model, Params, Products, SampleConfig, Sampler, StopReason, TextCodec,
    Tokenizer,
};
use flywheel_storage::blob::BlobStore;
use flywheel_storage::weights::{self, WeightsConfig, WeightsManifest};
use flywheel_storage::{FinishReason, PolicyVersion};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{
    Engine, EngineError, EngineLimits, SegmentOutput, SegmentRequest, acquire_slot, model_config,
    run_limits, splitmix64, trajectory_key,
};

/// The name this engine reports.
const NAME: &str = "builtin";

/// Settings of the built-in engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuiltinConfig {
    /// Segments sampled at once (each on a blocking thread with its own KV cache).
    pub slots: usize,
    /// Base seed of the per-trajectory sampling streams.
    pub seed: u64,
    /// Characters of the tokenizer of the built-in model (must match the trainer's
    /// `charset`).
    pub charset: String,
    /// The Hugging Face checkpoint directory whose tokenizer reads text prompts and writes
    /// responses (must match the trainer's `hf_model`); empty uses `charset`.
    pub hf_model: String,
    /// Chunking and transfer concurrency of weight fetches.
    pub weights: WeightsConfig,
    /// How long a segment waits for its version's weights to be published, in ms.
    pub weights_wait_ms: u64,
    /// Where the model runs: `auto` (the first GPU when CUDA is usable, else the CPU), `cpu`,
    /// `cuda` or `cuda:N`.
    pub device: Device,
    /// The precision of the matrix products' operands: `f32`, or `bf16` with f32
    /// accumulation (the weights and everything else stay f32).
    pub products: Products,
    /// Standard deviation of Gaussian noise added to every weight the engine samples with,
    /// relative to the RMS of the weight's tensor; 0 (the default) adds none. A controlled
    /// training/inference mismatch for experiments (`flywheel bench icepop`), never for a run
    /// that should learn its best. The noise of a version is the same on every worker.
    pub weight_noise: f32,
}

impl Default for BuiltinConfig {
    fn default() -> Self {
        BuiltinConfig {
            slots: 2,
            seed: 0,
            charset: Tokenizer::ARITHMETIC_CHARSET.to_owned(),
            hf_model: String::new(),
            weights: WeightsConfig::default(),
            weights_wait_ms: 60_000,
            device: Device::Auto,
            products: Products::F32,
            weight_noise: 0.0,
        }
    }
}

/// One version of the policy, loaded.
struct Loaded {
    /// The model with the version's weights.
    model: Arc<Model<DeviceBackend>>,
    /// Its manifest (for incremental fetches of the next version).
    manifest: WeightsManifest,
    /// Its tensors' bytes (idem).
    bytes: BTreeMap<String, Vec<u8>>,
}

/// The built-in engine (see the module docs).
pub struct BuiltinEngine {
    blobs: BlobStore,
    run: String,
    config: BuiltinConfig,
    tokenizer: TextCodec,
    /// Loaded versions (at most two, the newest kept).
    versions: tokio::sync::Mutex<BTreeMap<PolicyVersion, Arc<Loaded>>>,
    /// Samplers not in use, keyed by nothing: all versions of a run share one shape.
    samplers: Arc<Mutex<Vec<Sampler<DeviceBackend>>>>,
    /// Where the models run (shared by every version's model).
    backend: DeviceBackend,
    /// Bounds the segments sampled at once to `slots`.
    permits: Semaphore,
    /// The model's vocabulary and context, read once.
    limits: tokio::sync::OnceCell<EngineLimits>,
}

impl BuiltinEngine {
    /// An engine over run `run`'s weights in `blobs`.
    pub fn new(blobs: BlobStore, run: &str, config: BuiltinConfig) -> Result<Self, EngineError> {
        if config.slots == 0 {
            return Err(EngineError::Config(
                "builtin engine: slots must be at least 1".into(),
            ));
        }
        config
            .weights
            .validate()
            .map_err(|e| EngineError::Config(format!("builtin engine weights: {e}")))?;
        if !(config.weight_noise.is_finite() && config.weight_noise >= 0.0) {
            return Err(EngineError::Config(format!(
                "builtin engine: weight_noise = {} must be a finite number ≥ 0 (0: none)",
                config.weight_noise
            )));
        }
        let tokenizer = TextCodec::open(&config.hf_model, &config.charset)
            .map_err(|e| EngineError::Config(format!("builtin engine: {e}")))?;
        let (backend, device) = DeviceBackend::open(config.device, config.products)
            .map_err(|e| EngineError::Config(format!("builtin engine: {e}")))?;
        tracing::info!(%device, "builtin engine device");
        Ok(BuiltinEngine {
            backend,
            blobs,
            run: run.to_owned(),
            permits: Semaphore::new(config.slots),
            config,
            tokenizer,
            versions: tokio::sync::Mutex::new(BTreeMap::new()),
            samplers: Arc::new(Mutex::new(Vec::new())),
            limits: tokio::sync::OnceCell::new(),
        })
    }

    fn unavailable(message: String) -> EngineError {
        EngineError::Unavailable {
            engine: NAME.to_owned(),
            message,
        }
    }

    /// The model of `version`, fetched (incrementally) and built if not held.
    async fn model(&self, version: PolicyVersion) -> Result<Arc<Loaded>, EngineError> {
        let mut versions = self.versions.lock().await;
        if let Some(l) = versions.get(&version) {
            return Ok(l.clone());
        }
        // Wait (bounded) for the trainer to publish it.
        let poll = Duration::from_millis(100);
        let mut waited = Duration::ZERO;
        loop {
            match weights::exists(&self.blobs, &self.run, version).await {
                Ok(true) => break,
                Ok(false) if waited.as_millis() < u128::from(self.config.weights_wait_ms) => {
                    tokio::time::sleep(poll).await;
                    waited += poll;
                }
                Ok(false) => {
                    return Err(Self::unavailable(format!(
                        "weights version {version} of run `{}` are not published after {} ms",
                        self.run, self.config.weights_wait_ms
                    )));
                }
                Err(e) => return Err(Self::unavailable(e.to_string())),
            }
        }
        let have = versions.values().next_back().cloned();
        let fetched = weights::fetch(
            &self.blobs,
            &self.run,
            version,
            have.as_ref().map(|l| (&l.manifest, &l.bytes)),
            &self.config.weights,
        )
        .await
        .map_err(|e| Self::unavailable(e.to_string()))?;
        let protocol = |message: String| EngineError::Protocol {
            engine: NAME.to_owned(),
            message,
        };
        let model_config = model_config(NAME, &fetched.manifest)?;
        if model_config.vocab_size < self.tokenizer.vocab_size() {
            return Err(EngineError::Config(format!(
                "the model's vocabulary ({}) is smaller than the tokenizer's ({})",
                model_config.vocab_size,
                self.tokenizer.vocab_size()
            )));
        }
        let mut params = Params::from_bytes_map(&model_config, &fetched.tensors)
            .map_err(|e| protocol(format!("weights version {version}: {e}")))?;
        perturb(&mut params, self.config.weight_noise, version);
        let model =
            Model::new(self.backend.clone(), &params).map_err(|e| protocol(e.to_string()))?;
        let loaded = Arc::new(Loaded {
            model: Arc::new(model),
            manifest: fetched.manifest,
            bytes: fetched.tensors,
        });
        versions.insert(version, loaded.clone());
        while versions.len() > 2 {
            versions.pop_first();
        }
        Ok(loaded)
    }
}

/// Adds noise of standard deviation `sigma` × (the tensor's RMS) to every weight, drawn from a
/// stream fixed by `version` alone, so that every worker samples from the same perturbed
/// policy. `sigma = 0` leaves the weights as published.
fn perturb(params: &mut Params, sigma: f32, version: PolicyVersion) {
    if sigma == 0.0 {
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(splitmix64(version ^ 0x1ce9_0b5e));
    for t in params.tensors_mut() {
        let rms = (t.data.iter().map(|&w| f64::from(w).powi(2)).sum::<f64>()
            / t.data.len().max(1) as f64)
            .sqrt() as f32;
        for w in &mut t.data {
            *w += sigma * rms * rng.sample::<f32, _>(rand_distr::StandardNormal);
        }
    }
}

#[async_trait]
impl Engine for BuiltinEngine {
    fn name(&self) -> &str {
        NAME
    }

    fn slots(&self) -> usize {
        self.config.slots
    }

    async fn generate(&self, req: SegmentRequest) -> Result<SegmentOutput, EngineError> {
        req.validate()?;
        let loaded = self.model(req.version).await?;
        let _permit = acquire_slot(NAME, &self.permits).await?;
        let model = loaded.model.clone();
        let stop = self.tokenizer.stop_tokens().to_vec();
        let samplers = self.samplers.clone();
        let seed = trajectory_key(self.config.seed, &req.trajectory)
            ^ splitmix64(req.committed.len() as u64);
        let sample = SampleConfig {
            temperature: req.sampling.temperature,
            top_p: req.sampling.top_p,
            top_k: req.sampling.top_k,
        };
        let job = req.clone();
        let (tokens, logprobs, stop) = tokio::task::spawn_blocking(move || {
            let pooled = samplers.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let mut sampler = match pooled {
                Some(s) => s,
                None => Sampler::new(&model)?,
            };
            let mut context = Vec::with_capacity(job.prompt.len() + job.committed.len());
            context.extend_from_slice(&job.prompt);
            context.extend_from_slice(&job.committed);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
            let result = sampler.prefill(&model, &context).and_then(|()| {
                sampler.generate(
                    &model,
                    &sample,
                    job.max_new_tokens as usize,
                    &stop,
                    &mut rng,
                    &mut tokens,
                    &mut logprobs,
                )
            });
            samplers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(sampler);
            result.map(|stop| (tokens, logprobs, stop))
        })
        .await
        .map_err(|e| Self::unavailable(format!("sampling task failed: {e}")))?
        .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        let finish = match stop {
            // The model's context is full: the trajectory cannot go on.
            StopReason::ContextFull => FinishReason::Length,
            _ => req.finish_reason(tokens.len(), stop == StopReason::Eos),
        };
        let out = SegmentOutput {
            tokens,
            logprobs,
            finish,
            version: req.version,
        };
        out.check(NAME, &req)?;
        Ok(out)
    }

    async fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenizer
            .encode_prompt(text)
            .map_err(|e| EngineError::InvalidRequest(e.to_string()))
    }

    async fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError> {
        self.tokenizer
            .decode(tokens)
            .map_err(|e| EngineError::InvalidRequest(e.to_string()))
    }

    async fn limits(&self) -> Result<EngineLimits, EngineError> {
        let limits = self
            .limits
            .get_or_try_init(|| run_limits(NAME, &self.blobs, &self.run));
        limits.await.copied()
    }
}

#[cfg(test)]
mod tests {
    use flywheel_model::ModelConfig;

    use super::*;

    #[test]
    fn perturbation_is_relative_to_each_tensor_and_fixed_by_the_version() {
        let params = Params::init(&ModelConfig::tiny(20), 0).unwrap();
        let perturbed = |sigma: f32, version| {
            let mut p = params.clone();
            perturb(&mut p, sigma, version);
            p
        };
        assert_eq!(
            perturbed(0.0, 3),
            params,
            "no noise leaves the weights alone"
        );
        assert_eq!(
            perturbed(0.1, 3),
            perturbed(0.1, 3),
            "same version, same noise"
        );
        assert_ne!(perturbed(0.1, 3), perturbed(0.1, 4));
        let noisy = perturbed(0.1, 3);
        for (t, n) in params.tensors().iter().zip(noisy.tensors()) {
            let len = t.data.len() as f64;
            let rms = (t.data.iter().map(|&w| f64::from(w).powi(2)).sum::<f64>() / len).sqrt();
            let noise = (t.data.iter().zip(&n.data))
                .map(|(&a, &b)| f64::from(b - a).powi(2))
                .sum::<f64>()
                / len;
            let relative = noise.sqrt() / rms;
            if t.data.len() >= 1000 {
                assert!(
                    (0.08..0.12).contains(&relative),
                    "{}: noise is {relative:.3} of the RMS, not 0.1",
                    t.name
                );
            }
        }
    }
}
