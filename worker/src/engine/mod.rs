//! Inference engines: what turns a trajectory's tokens so far into its next segment.
//!
//! The worker generates every trajectory in segments of at most S tokens (DESIGN.md §6.1). An
//! [`Engine`] generates exactly one segment per call; between calls the worker commits the
//! segment, renews its lease and reserves budget. Because a trajectory can move between
//! workers and policy versions, every call carries the whole context (prompt + committed
//! response tokens): the engine re-prefills it, so an engine keeps no per-trajectory state.
//!
//! Engines batch internally (continuous batching is the engine's job). The worker keeps
//! [`Engine::slots`] calls in flight so that batching has something to work with.
//!
//! Implementations: [`sim::SimEngine`] (a seedable load generator),
//! [`builtin::BuiltinEngine`] (the run's own policy on the CPU), [`remote::RemoteEngine`]
//! (vLLM or SGLang servers kept in step with the policy version) and
//! [`openai::OpenAiEngine`] (any OpenAI-compatible completions server whose weights someone
//! else keeps in step); `conformance` (feature `testsuite`) is the suite all of them pass.

pub mod builtin;
#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;
pub mod openai;
pub mod remote;
pub mod sim;

use std::sync::Arc;

use async_trait::async_trait;
use flywheel_storage::{FinishReason, PolicyVersion, PromptInput, TrajectoryId};
use serde::{Deserialize, Serialize};

/// Sampling parameters of a segment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    /// Softmax temperature; 1.0 samples from the policy itself (what RL needs so that the
    /// recorded log-probs are the behaviour policy's).
    pub temperature: f32,
    /// Nucleus sampling mass; 1.0 disables it.
    pub top_p: f32,
    /// Keep only the k most likely tokens (before `top_p`); 0 disables it.
    pub top_k: usize,
    /// Optional base seed for engines that support seeded sampling.
    pub seed: Option<u64>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

impl SamplingConfig {
    /// Checks the ranges an engine relies on.
    pub fn validate(&self) -> Result<(), EngineError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(EngineError::InvalidRequest(format!(
                "sampling temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(EngineError::InvalidRequest(format!(
                "sampling top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// One segment to generate for one trajectory.
#[derive(Clone, Debug)]
pub struct SegmentRequest {
    /// The trajectory the segment belongs to (engines may key determinism or logging on it).
    pub trajectory: TrajectoryId,
    /// The prompt's token ids; shared, because every segment of a trajectory re-sends it.
    pub prompt: Arc<[u32]>,
    /// Response tokens already committed by earlier segments, re-prefilled on resume.
    pub committed: Arc<[u32]>,
    /// At most this many tokens are generated (the segment size S, already cut to what the
    /// budget reservation and the response cap allow). At least 1.
    pub max_new_tokens: u32,
    /// The maximum response length of a trajectory; reaching it finishes the trajectory with
    /// [`FinishReason::Length`]. `committed.len() + max_new_tokens` must not exceed it.
    pub max_response_tokens: u32,
    /// The policy version the caller expects the engine to generate with.
    pub version: PolicyVersion,
    /// How to sample.
    pub sampling: SamplingConfig,
}

impl SegmentRequest {
    /// Number of response tokens committed so far.
    pub fn committed_len(&self) -> u32 {
        // Validated against `max_response_tokens` (a u32) before any engine uses it.
        u32::try_from(self.committed.len()).unwrap_or(u32::MAX)
    }

    /// Checks the request's internal consistency; every engine calls this first.
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.max_new_tokens == 0 {
            return Err(EngineError::InvalidRequest(format!(
                "segment of {} asks for 0 new tokens; reserve at least 1 token before generating",
                self.trajectory
            )));
        }
        let committed = self.committed.len() as u64;
        if committed + u64::from(self.max_new_tokens) > u64::from(self.max_response_tokens) {
            return Err(EngineError::InvalidRequest(format!(
                "segment of {} would exceed the response cap: {committed} committed + {} new > {}",
                self.trajectory, self.max_new_tokens, self.max_response_tokens
            )));
        }
        self.sampling.validate()
    }

    /// The finish reason of a segment that produced `generated` tokens, `eos` telling whether
    /// its last token ended the sequence. One rule for every engine: end-of-sequence wins;
    /// otherwise reaching the response cap ends the trajectory with `Length`; otherwise only
    /// the segment budget was hit and the trajectory goes on.
    pub fn finish_reason(&self, generated: usize, eos: bool) -> FinishReason {
        if eos {
            FinishReason::Eos
        } else if self.committed.len() + generated >= self.max_response_tokens as usize {
            FinishReason::Length
        } else {
            FinishReason::None
        }
    }
}

/// What an engine produced for one [`SegmentRequest`].
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentOutput {
    /// Sampled token ids, at most `max_new_tokens` of them (may be empty only when the
    /// trajectory ended).
    pub tokens: Vec<u32>,
    /// The engine's log-probability of each sampled token, same length as `tokens`.
    pub logprobs: Vec<f32>,
    /// Why the segment ended.
    pub finish: FinishReason,
    /// The policy version the engine actually generated with (may differ from the requested
    /// one when weights moved underneath; the segment records this one).
    pub version: PolicyVersion,
}

impl SegmentOutput {
    /// Checks the invariants every engine must hold against the request that produced it;
    /// every engine calls this on its output before returning it.
    pub fn check(&self, engine: &str, req: &SegmentRequest) -> Result<(), EngineError> {
        let protocol = |message: String| EngineError::Protocol {
            engine: engine.to_owned(),
            message,
        };
        if self.tokens.len() != self.logprobs.len() {
            return Err(protocol(format!(
                "{} tokens but {} log-probs",
                self.tokens.len(),
                self.logprobs.len()
            )));
        }
        if self.tokens.len() > req.max_new_tokens as usize {
            return Err(protocol(format!(
                "{} tokens generated, more than the {} asked for",
                self.tokens.len(),
                req.max_new_tokens
            )));
        }
        if self.tokens.is_empty() && self.finish == FinishReason::None {
            return Err(protocol(
                "no token generated and the trajectory did not end (it would never progress)"
                    .to_owned(),
            ));
        }
        if let Some(bad) = self
            .logprobs
            .iter()
            .find(|lp| !(lp.is_finite() && **lp <= 0.0))
        {
            return Err(protocol(format!(
                "log-prob {bad} is not a finite number <= 0"
            )));
        }
        Ok(())
    }
}

/// Why an engine call failed. [`EngineError::is_retryable`] tells the worker whether trying
/// the same segment again (later, maybe elsewhere) can succeed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request itself is wrong (a caller bug or bad input); retrying cannot help.
    #[error("invalid segment request: {0}")]
    InvalidRequest(String),
    /// The engine's configuration is wrong; fix the config and restart.
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// The engine cannot serve right now (connection refused, timeout, 5xx, overloaded), even
    /// after its own bounded retries. Retry the segment later.
    #[error("engine `{engine}` is unavailable: {message}; the segment can be retried later")]
    Unavailable {
        /// Which engine.
        engine: String,
        /// What happened on the last attempt.
        message: String,
    },
    /// The engine refused the request (an HTTP 4xx): the request or the model setup is wrong.
    #[error("engine `{engine}` rejected the request (HTTP {status}): {message}")]
    Rejected {
        /// Which engine.
        engine: String,
        /// The HTTP status.
        status: u16,
        /// The server's explanation (its response body, truncated).
        message: String,
    },
    /// The engine answered something that breaks the protocol (malformed JSON, missing
    /// log-probs, mismatched lengths): the server is misconfigured or incompatible.
    #[error("engine `{engine}` sent an invalid response: {message}")]
    Protocol {
        /// Which engine.
        engine: String,
        /// What is wrong with the response.
        message: String,
    },
    /// The engine does not implement an optional operation (e.g. tokenising text).
    #[error("engine `{engine}` does not support {operation}")]
    Unsupported {
        /// Which engine.
        engine: String,
        /// The operation asked for.
        operation: &'static str,
    },
}

impl EngineError {
    /// Whether the same request may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, EngineError::Unavailable { .. })
    }
}

/// What a prompt must fit to run on an engine, where the engine knows it: the intake rejects
/// a prompt that does not fit before the run accepts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineLimits {
    /// Token ids must be below this (the model's vocabulary).
    pub vocab_size: Option<u32>,
    /// The model's context: a prompt must leave room for at least one response token.
    pub context_tokens: Option<u32>,
}

/// An inference engine generating one segment of one trajectory per call.
///
/// Calls are concurrent: the worker runs up to [`Engine::slots`] of them at once and the engine
/// batches them as it sees fit. An engine holds no per-trajectory state between calls.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Short name for logs, metrics and errors (`sim`, `openai`, `builtin`).
    fn name(&self) -> &str;

    /// How many segment calls the engine serves at once; more calls than this wait for a slot.
    fn slots(&self) -> usize;

    /// Generates one segment: at most `req.max_new_tokens` tokens continuing
    /// `req.prompt ++ req.committed`.
    async fn generate(&self, req: SegmentRequest) -> Result<SegmentOutput, EngineError>;

    /// Turns prompt text into token ids with the policy's tokenizer.
    async fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError>;

    /// Turns token ids back into text (for verifiers and reports).
    async fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError>;

    /// What a prompt must fit; nothing is known by default (a server that refuses a prompt
    /// then fails its attempts, which are bounded).
    async fn limits(&self) -> Result<EngineLimits, EngineError> {
        Ok(EngineLimits::default())
    }
}

/// Which engine a worker runs, and its settings: the `[engine]` table of the config,
/// selected by `kind = "sim" | "openai"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EngineConfig {
    /// The simulated load generator.
    Sim(sim::SimConfig),
    /// An OpenAI-compatible completions server.
    Openai(openai::OpenAiConfig),
    /// The built-in model with the run's published weights (built by
    /// [`EngineConfig::build_for_run`], which knows where the weights are).
    Builtin(builtin::BuiltinConfig),
    /// vLLM servers, loaded with each version the worker generates under.
    Vllm(remote::RemoteConfig),
    /// SGLang servers, loaded with each version the worker generates under.
    Sglang(remote::RemoteConfig),
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig::Sim(sim::SimConfig::default())
    }
}

impl EngineConfig {
    /// Validates the settings and builds the engine.
    pub fn build(&self) -> Result<Arc<dyn Engine>, EngineError> {
        Ok(match self {
            EngineConfig::Sim(config) => Arc::new(sim::SimEngine::new(config.clone())?),
            EngineConfig::Openai(config) => Arc::new(openai::OpenAiEngine::new(config.clone())?),
            EngineConfig::Builtin(_) | EngineConfig::Vllm(_) | EngineConfig::Sglang(_) => {
                return Err(EngineError::Config(
                    "this engine reads the run's weights: build it with \
                     EngineConfig::build_for_run"
                        .into(),
                ));
            }
        })
    }

    /// Validates the settings and builds the engine for run `run`, whose weights (for the
    /// builtin engine) are in `blobs`.
    pub fn build_for_run(
        &self,
        blobs: &flywheel_storage::blob::BlobStore,
        run: &str,
    ) -> Result<Arc<dyn Engine>, EngineError> {
        use remote::{RemoteEngine, ServerKind};
        let remote = |kind, config: &remote::RemoteConfig| {
            RemoteEngine::new(kind, blobs.clone(), run, config.clone())
                .map(|e| Arc::new(e) as Arc<dyn Engine>)
        };
        match self {
            EngineConfig::Builtin(config) => Ok(Arc::new(builtin::BuiltinEngine::new(
                blobs.clone(),
                run,
                config.clone(),
            )?)),
            EngineConfig::Vllm(config) => remote(ServerKind::Vllm, config),
            EngineConfig::Sglang(config) => remote(ServerKind::Sglang, config),
            other => other.build(),
        }
    }

    /// The Hugging Face checkpoint whose tokenizer the engine reads prompts with, for the
    /// engines that hold one (empty: the run's `[trainer] hf_model` is taken).
    pub fn hf_model_mut(&mut self) -> Option<&mut String> {
        match self {
            EngineConfig::Builtin(c) => Some(&mut c.hf_model),
            EngineConfig::Vllm(c) | EngineConfig::Sglang(c) => Some(&mut c.hf_model),
            EngineConfig::Sim(_) | EngineConfig::Openai(_) => None,
        }
    }
}

/// The model's shape, from a version's metadata (`engine` names the engine in errors).
pub(crate) fn model_config(
    engine: &str,
    manifest: &flywheel_storage::weights::WeightsManifest,
) -> Result<flywheel_model::ModelConfig, EngineError> {
    use flywheel_storage::weights::MODEL_CONFIG_KEY;
    let version = manifest.version;
    let protocol = |message: String| EngineError::Protocol {
        engine: engine.to_owned(),
        message,
    };
    let json = manifest.metadata.get(MODEL_CONFIG_KEY).ok_or_else(|| {
        protocol(format!(
            "weights version {version} carry no `{MODEL_CONFIG_KEY}` metadata: publish them \
             with the trainer"
        ))
    })?;
    serde_json::from_str(json)
        .map_err(|e| protocol(format!("`{MODEL_CONFIG_KEY}` of version {version}: {e}")))
}

/// The run's model's vocabulary and context, from its newest published version (every
/// version of a run has the same shape). Unavailable before the first version.
pub(crate) async fn run_limits(
    engine: &str,
    blobs: &flywheel_storage::blob::BlobStore,
    run: &str,
) -> Result<EngineLimits, EngineError> {
    use flywheel_storage::weights;
    let unavailable = |message: String| EngineError::Unavailable {
        engine: engine.to_owned(),
        message,
    };
    let latest = weights::latest_version(blobs, run)
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .ok_or_else(|| unavailable(format!("run `{run}` has no published weights yet")))?;
    let manifest = weights::load_manifest(blobs, run, latest)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let config = model_config(engine, &manifest)?;
    Ok(EngineLimits {
        vocab_size: u32::try_from(config.vocab_size).ok(),
        context_tokens: u32::try_from(config.max_seq_len).ok(),
    })
}

/// Waits for one of an engine's `slots` (a segment call in flight); an error once the engine
/// is closing.
pub(crate) async fn acquire_slot<'a>(
    engine: &str,
    slots: &'a tokio::sync::Semaphore,
) -> Result<tokio::sync::SemaphorePermit<'a>, EngineError> {
    slots.acquire().await.map_err(|_| EngineError::Unavailable {
        engine: engine.to_owned(),
        message: "the engine is shutting down".into(),
    })
}

/// The prompt's token ids: given ones as they are, text through the engine's tokenizer.
pub async fn prompt_tokens(
    engine: &dyn Engine,
    input: &PromptInput,
) -> Result<Arc<[u32]>, EngineError> {
    match input {
        PromptInput::Tokens(tokens) => Ok(tokens.as_slice().into()),
        PromptInput::Text(text) => Ok(engine.tokenize(text).await?.into()),
    }
}

/// SplitMix64's finaliser: a good, stable 64-bit mixer.
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable 64-bit key of `trajectory` under `seed`, the same in every process and Rust
/// version (unlike the standard library's hasher): engines derive per-trajectory randomness
/// from it, so a resumed trajectory sees the same randomness wherever it resumes.
pub(crate) fn trajectory_key(seed: u64, trajectory: &TrajectoryId) -> u64 {
    // FNV-1a over the prompt id, then mixed with the sample index and the seed.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in trajectory.prompt.0.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(h ^ splitmix64(u64::from(trajectory.sample) ^ splitmix64(seed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(committed: usize, max_new: u32, cap: u32) -> SegmentRequest {
        SegmentRequest {
            trajectory: TrajectoryId {
                prompt: "p".into(),
                sample: 0,
            },
            prompt: vec![1, 2, 3].into(),
            committed: vec![7; committed].into(),
            max_new_tokens: max_new,
            max_response_tokens: cap,
            version: 0,
            sampling: SamplingConfig::default(),
        }
    }

    #[test]
    fn validate_rejects_zero_tokens_and_cap_overflow() {
        assert!(request(0, 4, 8).validate().is_ok());
        assert!(request(4, 4, 8).validate().is_ok());
        assert!(matches!(
            request(0, 0, 8).validate(),
            Err(EngineError::InvalidRequest(_))
        ));
        let err = request(5, 4, 8).validate().unwrap_err();
        assert!(err.to_string().contains("exceed the response cap"), "{err}");
        let mut bad = request(0, 4, 8);
        bad.sampling.top_p = 0.0;
        assert!(bad.validate().is_err());
        bad.sampling = SamplingConfig {
            temperature: f32::NAN,
            ..SamplingConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn finish_reason_rule() {
        let req = request(4, 4, 8);
        assert_eq!(req.finish_reason(4, true), FinishReason::Eos);
        assert_eq!(req.finish_reason(4, false), FinishReason::Length);
        assert_eq!(req.finish_reason(3, false), FinishReason::None);
        assert_eq!(request(0, 4, 8).finish_reason(4, false), FinishReason::None);
    }

    #[test]
    fn output_check_catches_broken_engines() {
        let req = request(0, 2, 8);
        let ok = SegmentOutput {
            tokens: vec![1, 2],
            logprobs: vec![-0.1, 0.0],
            finish: FinishReason::None,
            version: 0,
        };
        assert!(ok.check("t", &req).is_ok());
        let mut bad = ok.clone();
        bad.logprobs.pop();
        assert!(bad.check("t", &req).is_err());
        let mut bad = ok.clone();
        bad.tokens.push(3);
        bad.logprobs.push(-1.0);
        assert!(bad.check("t", &req).is_err());
        let mut bad = ok.clone();
        bad.logprobs[0] = 0.5;
        assert!(bad.check("t", &req).is_err());
        let empty = SegmentOutput {
            tokens: vec![],
            logprobs: vec![],
            ..ok.clone()
        };
        assert!(empty.check("t", &req).is_err());
        let empty_eos = SegmentOutput {
            finish: FinishReason::Eos,
            ..empty
        };
        assert!(empty_eos.check("t", &req).is_ok());
    }

    #[test]
    fn engine_config_selects_by_kind() {
        let sim: EngineConfig = serde_json::from_str(
            r#"{"kind":"sim","seed":3,"slots":4,"lengths":{"kind":"fixed","tokens":9}}"#,
        )
        .unwrap();
        let engine = sim.build().unwrap();
        assert_eq!((engine.name(), engine.slots()), ("sim", 4));
        let openai: EngineConfig = serde_json::from_str(
            r#"{"kind":"openai","base_url":"http://127.0.0.1:9","model":"m","slots":2}"#,
        )
        .unwrap();
        let engine = openai.build().unwrap();
        assert_eq!((engine.name(), engine.slots()), ("openai", 2));
        // A misspelt field is an error, not a silent default.
        let typo = serde_json::from_str::<EngineConfig>(r#"{"kind":"sim","slot":4}"#);
        assert!(typo.is_err());
        let unknown = serde_json::from_str::<EngineConfig>(r#"{"kind":"tgi"}"#);
        assert!(unknown.is_err());
        let bad = EngineConfig::Sim(sim::SimConfig {
            slots: 0,
            ..sim::SimConfig::default()
        });
        assert!(matches!(bad.build(), Err(EngineError::Config(_))));
    }

    #[test]
    fn retryable_only_when_unavailable() {
        let e = EngineError::Unavailable {
            engine: "x".into(),
            message: "down".into(),
        };
        assert!(e.is_retryable());
        assert!(!EngineError::InvalidRequest("x".into()).is_retryable());
        let e = EngineError::Rejected {
            engine: "x".into(),
            status: 400,
            message: "bad".into(),
        };
        assert!(!e.is_retryable());
    }
}
