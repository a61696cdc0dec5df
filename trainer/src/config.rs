//! The `[trainer]` section of the run's TOML file.
//!
//! ```toml
//! [trainer]
//! id = "trainer-a"          # unique per process; default: trainer-<pid>-<random>
//! seed = 0                  # initialisation of version 0
//! checkpoint_every = 10     # a ledger checkpoint every N steps
//! keep_checkpoints = 3
//! keep_versions = 4         # recent weight versions kept for the workers
//! keep_segment_steps = 8    # trained steps whose segments are kept for audit
//! metrics_addr = "0.0.0.0:9102"  # /metrics, /healthz, /readyz; "" turns it off
//!
//! [trainer.model]           # default: the tiny model of the arithmetic task
//! vocab_size = 20
//! d_model = 64
//! n_layers = 2
//! n_heads = 4
//! d_ff = 256
//! max_seq_len = 128
//!
//! [trainer.loss]            # IcePop α, β, PPO ε, KL (Φ comes from each step's manifest)
//! [trainer.optimizer]       # AdamW lr, betas, eps, weight_decay, max_grad_norm
//! [trainer.weights]         # chunk_bytes, concurrency of weight publication
//! ```

use flywheel_model::{
    Checkpoint, Device, ModelConfig, ModelError, Params, Products, TextCodec, Tokenizer,
};
use flywheel_service::{ConfigError, admin};
use flywheel_storage::config::RunConfig;
use flywheel_storage::weights::WeightsConfig;
use serde::{Deserialize, Serialize};

use crate::exchange::ExchangeKind;
use crate::loss::{LossConfig, LossMode};
use crate::optim::AdamWConfig;

/// The trainer's own configuration (the shared parts are in `flywheel_storage::config`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerConfig {
    /// This trainer's member id (heartbeats, rank claims). Empty picks a unique one per
    /// process ([`flywheel_service::member_id`]).
    pub id: String,
    /// Seed of the deterministic initialisation of version 0.
    pub seed: u64,
    /// The model's shape; every trainer and worker of a run must agree on it. Replaced by the
    /// checkpoint's when `hf_model` is set.
    pub model: ModelConfig,
    /// A Hugging Face checkpoint directory (Llama, Qwen2 or Qwen3) to train instead of the
    /// built-in model: its `config.json` is the model's shape and its weights are version 0.
    /// Empty trains the built-in model of `model`, initialised from `seed`.
    pub hf_model: String,
    /// Characters of the built-in character tokenizer (text prompts of the built-in model);
    /// BOS, EOS and PAD are added in front.
    pub charset: String,
    /// Where the forward and backward passes run: `auto` (the first GPU when CUDA is usable,
    /// else the CPU), `cpu`, `cuda` or `cuda:N`.
    pub device: Device,
    /// The precision of the matrix products' operands: `f32`, or `bf16` with f32
    /// accumulation (the weights stay the f32 masters; log-softmax, the IcePop ratio and the
    /// loss stay f32).
    pub products: Products,
    /// The training objective. Its `token_budget` is replaced by each step's manifest (Φ is
    /// decided by the coordinator).
    pub loss: LossConfig,
    /// AdamW and gradient clipping.
    pub optimizer: AdamWConfig,
    /// Chunking and transfer concurrency of weight publication.
    pub weights: WeightsConfig,
    /// Record a checkpoint in the ledger after every N-th step (N ≥ 1).
    pub checkpoint_every: u64,
    /// Checkpoints kept; older ones (their ledger rows and objects) are collected.
    pub keep_checkpoints: usize,
    /// Most recent weight versions kept besides checkpointed ones (workers may still be
    /// fetching them); older versions' manifests and unreferenced chunks are collected.
    pub keep_versions: u64,
    /// Trained steps whose segments are kept for audit; at each checkpoint the segments of
    /// older steps (trained, and covered by the checkpoint) are deleted, so storage stays
    /// bounded.
    pub keep_segment_steps: u64,
    /// How the ranks of a step bring their gradients together: `store` (each writes its
    /// gradient to the object store, the finisher sums them), `nccl` (the ranks' trainers
    /// sum them among their GPUs when each holds one rank; the object store is the fallback)
    /// or `in-process` (the same among trainers of one process).
    pub exchange: ExchangeKind,
    /// How long a collective exchange may take (rendezvous, forming the communicator, the
    /// sums), in ms; past it the step falls back to the object store.
    pub exchange_timeout_ms: u64,
    /// Lease of a claimed rank, in ms; renewed at a third of it while the rank is computed.
    pub rank_claim_ms: u64,
    /// Heartbeat lease of the trainer's membership, in ms.
    pub heartbeat_ms: u64,
    /// Pause between polls of the step board when there is nothing to do, in ms.
    pub poll_ms: u64,
    /// Segments fetched at once.
    pub fetch_concurrency: usize,
    /// `host:port` of the HTTP server with `/metrics`, `/healthz` and `/readyz`; empty turns
    /// it off.
    pub metrics_addr: String,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            id: String::new(),
            seed: 0,
            model: ModelConfig::tiny(Tokenizer::arithmetic().vocab_size()),
            hf_model: String::new(),
            charset: Tokenizer::ARITHMETIC_CHARSET.to_owned(),
            device: Device::Auto,
            products: Products::F32,
            loss: LossConfig::default(),
            optimizer: AdamWConfig::default(),
            weights: WeightsConfig::default(),
            checkpoint_every: 10,
            keep_checkpoints: 3,
            keep_versions: 4,
            keep_segment_steps: 8,
            exchange: ExchangeKind::Store,
            exchange_timeout_ms: 60_000,
            rank_claim_ms: 60_000,
            heartbeat_ms: 10_000,
            poll_ms: 200,
            fetch_concurrency: 16,
            metrics_addr: "0.0.0.0:9102".into(),
        }
    }
}

/// What the trainer service runs with: the sections every service shares, `[trainer]`, and
/// whether to restore the ledger's latest checkpoint first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceConfig {
    /// The sections every service shares.
    pub run: RunConfig,
    /// This service's section.
    pub trainer: TrainerConfig,
    /// Restore the ledger's latest checkpoint (weights and optimizer state) first
    /// (`flywheel trainer --resume`).
    pub resume: bool,
}

impl ServiceConfig {
    /// Validates every section the trainer reads.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.run.validate()?;
        self.trainer.validate()
    }
}

impl TrainerConfig {
    /// With `hf_model` set: replaces `model` with the checkpoint's architecture (its context
    /// capped at [`flywheel_model::hf::DEFAULT_MAX_SEQ_LEN`]) and returns the directory.
    pub fn resolve_hf_model(&mut self) -> Result<Option<&std::path::Path>, ConfigError> {
        let Some(model) = self.hf_model_config()? else {
            return Ok(None);
        };
        self.model = model;
        Ok(Some(std::path::Path::new(&self.hf_model)))
    }

    /// The architecture of the checkpoint `hf_model` names, if it names one.
    fn hf_model_config(&self) -> Result<Option<ModelConfig>, ConfigError> {
        if self.hf_model.is_empty() {
            return Ok(None);
        }
        flywheel_model::hf::read_config(std::path::Path::new(&self.hf_model), None)
            .map(Some)
            .map_err(|e| ConfigError::new("trainer.hf_model", e.to_string()))
    }

    /// The weights version 0 starts from: the checkpoint's when `hf_model` names one, else
    /// the built-in model of `model` initialised from `seed`.
    pub fn initial_params(&self) -> Result<Params, ModelError> {
        if self.hf_model.is_empty() {
            Params::init(&self.model, self.seed)
        } else {
            Ok(Checkpoint::open(std::path::Path::new(&self.hf_model), None)?.params)
        }
    }

    /// The tokenizer of text prompts: the checkpoint's (`hf_model`), else `charset`'s.
    pub fn text_codec(&self) -> Result<TextCodec, ConfigError> {
        let field = if self.hf_model.is_empty() {
            "trainer.charset"
        } else {
            "trainer.hf_model"
        };
        TextCodec::open(&self.hf_model, &self.charset)
            .map_err(|e| ConfigError::new(field, e.to_string()))
    }

    /// Checks every field; the error names the one to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: &'static str, problem: String| ConfigError::new(field, problem);
        // The model trained: the checkpoint's when `hf_model` names one.
        let (model, field) = match self.hf_model_config()? {
            Some(model) => (model, "trainer.hf_model"),
            None => {
                self.model
                    .validate()
                    .map_err(|e| err("trainer.model", e.to_string()))?;
                (self.model.clone(), "trainer.model.vocab_size")
            }
        };
        let tok = self.text_codec()?;
        if tok.vocab_size() > model.vocab_size {
            return Err(err(
                field,
                format!(
                    "the model's vocab_size = {} is smaller than the tokenizer's {} ids",
                    model.vocab_size,
                    tok.vocab_size()
                ),
            ));
        }
        self.loss
            .validate()
            .map_err(|e| err("trainer.loss", e.to_string()))?;
        if self.loss.mode == LossMode::Supervised {
            return Err(err(
                "trainer.loss.mode",
                "must be `icepop` (or `grpo`) for the trainer service; supervised warm-starts \
                 run through `flywheel_trainer::step::supervised_step`"
                    .into(),
            ));
        }
        self.optimizer
            .validate()
            .map_err(|e| err("trainer.optimizer", e.to_string()))?;
        self.weights
            .validate()
            .map_err(|e| err("trainer.weights", e.to_string()))?;
        if self.checkpoint_every == 0 {
            return Err(err("trainer.checkpoint_every", "must be at least 1".into()));
        }
        if self.keep_checkpoints == 0 {
            return Err(err("trainer.keep_checkpoints", "must be at least 1".into()));
        }
        if self.keep_versions == 0 {
            return Err(err("trainer.keep_versions", "must be at least 1".into()));
        }
        for (field, ms) in [
            ("trainer.rank_claim_ms", self.rank_claim_ms),
            ("trainer.exchange_timeout_ms", self.exchange_timeout_ms),
            ("trainer.heartbeat_ms", self.heartbeat_ms),
            ("trainer.poll_ms", self.poll_ms),
        ] {
            if ms == 0 || ms > 86_400_000 {
                return Err(err(field, format!("= {ms} must be between 1 ms and 24 h")));
            }
        }
        admin::check_addr("trainer.metrics_addr", &self.metrics_addr, true)?;
        if self.fetch_concurrency == 0 {
            return Err(err(
                "trainer.fetch_concurrency",
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_parse_from_toml() {
        TrainerConfig::default().validate().unwrap();
        let t: TrainerConfig =
            toml::from_str("seed = 3\ncheckpoint_every = 2\n[optimizer]\nlr = 0.001\n").unwrap();
        assert_eq!(t.seed, 3);
        assert_eq!(t.optimizer.lr, 0.001);
        assert!(toml::from_str::<TrainerConfig>("sede = 3\n").is_err());
        let t: TrainerConfig =
            toml::from_str("products = \"bf16\"\nexchange = \"nccl\"\n").unwrap();
        assert_eq!(
            (t.products, t.exchange),
            (Products::Bf16, ExchangeKind::Nccl)
        );
        let bad = toml::from_str::<TrainerConfig>("products = \"fp8\"\n").unwrap_err();
        assert!(bad.to_string().contains("bf16"), "{bad}");
    }

    #[test]
    fn errors_name_the_field() {
        let c = TrainerConfig {
            checkpoint_every: 0,
            ..TrainerConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("checkpoint_every")
        );
        let mut c = TrainerConfig::default();
        c.model.vocab_size = 5;
        assert!(c.validate().unwrap_err().to_string().contains("vocab_size"));
        let mut c = TrainerConfig::default();
        c.loss.mode = LossMode::Supervised;
        assert!(c.validate().unwrap_err().to_string().contains("loss.mode"));
    }
}
