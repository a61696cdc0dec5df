//! The settings of `flywheel demo` and what they make: the task, the model, the run's
//! configuration on the embedded stores.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use flywheel_model::{ModelConfig, TextCodec, Tokenizer};
use flywheel_storage::config::{
    BatchConfig, PurgeAction, RolloutConfig, RolloutMode, RunConfig, StorageConfig,
};
use flywheel_storage::queue::{EmbeddedKafka, KafkaConfig};
use flywheel_task::TaskConfig;
use flywheel_trainer::{AdamWConfig, LossConfig, LossMode, TrainerConfig};

/// The settings of a demo run. The model, task, warm start, K and Φ follow
/// examples/demo_recipe.rs; the RL schedule is calibrated on the embedded loop itself:
///
/// - Φ_r = 2.5 Φ: about the tokens a step trains once zero-variance groups are dropped. A
///   smaller Φ_r cuts undersized steps when the version's budget is spent; a larger one lets
///   complete groups pile up and go stale.
/// - 1,200 steps with the learning rate falling linearly from 4e-4 to 4e-5: at a constant rate
///   held-out accuracy swings from one evaluation to the next; the decay steadies the last
///   weights.
///
/// What the defaults reach is in the README (and in every run's report).
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Report folder; default `runs/demo-<unix time>/`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// RL steps to feed prompts for (the run then drains what was accepted, which may add a
    /// step or two); also the length of the learning-rate decay.
    #[arg(long, default_value_t = 1200)]
    pub steps: u64,
    /// Seed of the model, the problem streams and the sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A tiny model and a few steps: checks the plumbing end to end in seconds (tests); it
    /// does not learn.
    #[arg(long)]
    pub quick: bool,
    /// Train this Hugging Face checkpoint directory (Llama, Qwen2 or Qwen3) instead of the
    /// built-in model: its tokenizer reads the task's text, its weights start the warm start
    /// (`--d-model`, `--layers` and `--heads` are then unused).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Width of the residual stream.
    #[arg(long, default_value_t = 64)]
    pub d_model: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Most supervised warm-start steps.
    #[arg(long, default_value_t = 600)]
    pub sft_steps: usize,
    /// The warm start stops as soon as the policy solves this fraction of a fixed set of
    /// training prompts (checked every 25 steps at temperature 1), so it is mediocre by design
    /// whatever the seed; 0 runs all `--sft-steps`.
    #[arg(long, default_value_t = 0.15)]
    pub sft_target: f64,
    /// Problems per supervised step.
    #[arg(long, default_value_t = 32)]
    pub sft_batch: usize,
    /// Learning rate of the warm start.
    #[arg(long, default_value_t = 3e-3)]
    pub sft_lr: f64,
    /// Learning rate of RL.
    #[arg(long, default_value_t = 4e-4)]
    pub rl_lr: f64,
    /// The RL learning rate falls linearly to this fraction of `--rl-lr` at `--steps`
    /// (1 keeps it constant).
    #[arg(long, default_value_t = 0.1)]
    pub rl_lr_final: f64,
    /// Noise on the weights the workers sample with, relative to each tensor's RMS (0: none):
    /// a controlled training/inference mismatch, for experiments (`flywheel bench icepop`).
    #[arg(long, default_value_t = 0.0)]
    pub engine_weight_noise: f32,
    /// Train vanilla GRPO instead of IcePop: every token counts with weight 1 whatever the
    /// training/inference mismatch (PPO's clip still applies), for comparison.
    #[arg(long)]
    pub vanilla_grpo: bool,
    /// GRPO group size K (samples per prompt).
    #[arg(long, default_value_t = 8)]
    pub group_size: u32,
    /// Φ: trained tokens per step (and the loss's constant normaliser).
    #[arg(long, default_value_t = 2048)]
    pub token_budget: u64,
    /// Φ_r: tokens each policy version may generate.
    #[arg(long, default_value_t = 5120)]
    pub version_budget: u64,
    /// S: tokens per segment (long responses span several segments and versions).
    #[arg(long, default_value_t = 32)]
    pub segment_tokens: u32,
    /// σ: version bumps a parked trajectory may survive.
    #[arg(long, default_value_t = 4)]
    pub retention: u32,
    /// In-process workers (each a consumer-group member with its own engine).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Sampling slots per worker.
    #[arg(long, default_value_t = 2)]
    pub slots: usize,
    /// Held-out problems evaluated before and after RL.
    #[arg(long, default_value_t = 400)]
    pub eval_size: usize,
    /// Also evaluate every this many steps (0: only before and after).
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Fail when no step is trained for this many seconds while prompts are fed (every group
    /// dropped, say, because the policy never solves the task).
    #[arg(long, default_value_t = 120)]
    pub stall_secs: u64,
    /// Most terms per problem.
    #[arg(long, default_value_t = TaskConfig::default().max_terms)]
    pub max_terms: usize,
}

impl DemoArgs {
    /// The settings with `--quick` applied.
    pub fn effective(&self) -> DemoArgs {
        if !self.quick {
            return self.clone();
        }
        DemoArgs {
            steps: self.steps.min(3),
            d_model: 16,
            layers: 1,
            heads: 2,
            sft_steps: 3,
            sft_target: 0.0,
            sft_batch: 8,
            group_size: 4,
            token_budget: 128,
            version_budget: 1024,
            segment_tokens: 8,
            workers: 2,
            slots: 1,
            eval_size: 16,
            eval_every: 0,
            max_terms: 6,
            ..self.clone()
        }
    }

    /// Rejects settings no run can use.
    pub fn check(&self) -> Result<()> {
        if self.steps == 0
            || self.group_size < 2
            || self.workers == 0
            || self.slots == 0
            || self.eval_size == 0
        {
            bail!(
                "--steps, --workers, --slots and --eval-size must be at least 1, --group-size at \
                 least 2"
            );
        }
        Ok(())
    }
}

/// The task, tokenizer and model shape of a run.
#[derive(Clone)]
pub struct Setup {
    /// The built-in task's shape.
    pub task: TaskConfig,
    /// How the task's text becomes tokens and back: the character tokenizer, or the
    /// checkpoint's.
    pub tok: TextCodec,
    /// The policy's shape.
    pub model: ModelConfig,
    /// The checkpoint trained (`--model`), if any.
    pub hf_model: Option<PathBuf>,
    /// Most response tokens (the longest reference, EOS, slack).
    pub max_response: u32,
}

impl Setup {
    /// The setup `a` describes.
    pub fn new(a: &DemoArgs) -> Result<Self> {
        let task = TaskConfig {
            max_terms: a.max_terms,
            ..TaskConfig::default()
        };
        task.validate()?;
        let max_response = (task.max_response_chars() + 1 + 8) as u32;
        // BOS, the prompt, the response and its EOS (characters bound a byte-level BPE's
        // tokens too).
        let context = 1 + task.prompt_chars() + max_response as usize;
        let (tok, model) = match &a.model {
            None => {
                let chars = Tokenizer::arithmetic();
                let model = ModelConfig {
                    d_model: a.d_model,
                    n_layers: a.layers,
                    n_heads: a.heads,
                    d_ff: 3 * a.d_model,
                    max_seq_len: context,
                    ..ModelConfig::tiny(chars.vocab_size())
                };
                (TextCodec::Chars(chars), model)
            }
            Some(dir) => {
                let model = flywheel_model::hf::read_config(dir, None)?;
                if model.max_seq_len < context {
                    bail!(
                        "{}: a context of {} tokens is too short for the task (it needs {context}); \
                         lower --max-terms",
                        dir.display(),
                        model.max_seq_len
                    );
                }
                (TextCodec::open(&dir.display().to_string(), "")?, model)
            }
        };
        model.validate()?;
        Ok(Setup {
            task,
            tok,
            model,
            hf_model: a.model.clone(),
            max_response,
        })
    }
}

/// The report folder: `out`, or `runs/<name>-<unix time>/`; created, absolute.
pub fn report_folder(out: Option<&Path>, name: &str) -> Result<PathBuf> {
    let out = match out {
        Some(p) => p.to_path_buf(),
        None => {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            PathBuf::from(format!("runs/{name}-{secs}"))
        }
    };
    std::fs::create_dir_all(&out)
        .with_context(|| format!("creating the report folder {}", out.display()))?;
    Ok(std::fs::canonicalize(&out)?)
}

/// The run's configuration on the embedded stores: state and blobs `memory://` (they die with
/// the process; a directory of files would cost the file system an inode created and freed
/// per segment, a fifth of the run's CPU), ledger `sqlite://<out>/ledger.db`, prompts on
/// `kafka`.
pub fn run_config(
    a: &DemoArgs,
    setup: &Setup,
    out: &Path,
    kafka: &EmbeddedKafka,
) -> Result<RunConfig> {
    let run_id = format!("demo-{:08x}", rand::random::<u32>());
    let kafka_config = KafkaConfig {
        brokers: kafka.bootstrap_servers(),
        topic: format!("{run_id}.prompts"),
        group_id: format!("{run_id}.workers"),
        client_id: "flywheel-demo".into(),
        ..KafkaConfig::default()
    };
    kafka.create_topics(&kafka_config, 2)?;
    let ledger_path = out.join("ledger.db");
    let _ = std::fs::remove_file(&ledger_path);
    let run = RunConfig {
        storage: StorageConfig {
            run_id,
            state_url: "memory://".into(),
            blob_url: "memory://".into(),
            ledger_url: format!("sqlite://{}?mode=rwc", ledger_path.display()),
        },
        kafka: kafka_config,
        rollout: RolloutConfig {
            mode: RolloutMode::Partial,
            version_budget_tokens: a.version_budget,
            segment_tokens: a.segment_tokens,
            max_response_tokens: setup.max_response,
            retention_limit: a.retention,
            purge_action: PurgeAction::Drop,
            lease_ms: 10_000,
            ..RolloutConfig::default()
        },
        batch: BatchConfig {
            token_budget: a.token_budget,
            micro_batch_tokens: 4096,
            // An untrained `--quick` model earns no reward, so every group would be dropped
            // for zero variance and no step would ever be cut; it trains them instead (their
            // advantages are 0: the plumbing runs, nothing is learnt).
            filter_zero_variance: !a.quick,
        },
    };
    run.validate()?;
    Ok(run)
}

/// The checkpoint directory of a `--model` run as the services' configs name it ("" for the
/// built-in model).
pub fn hf_model_string(setup: &Setup) -> String {
    setup
        .hf_model
        .as_ref()
        .map(|d| d.display().to_string())
        .unwrap_or_default()
}

/// The trainer of the run: IcePop (unless `--vanilla-grpo`), AdamW with the learning rate
/// decaying over the run.
pub fn trainer_config(a: &DemoArgs, setup: &Setup) -> Result<TrainerConfig> {
    let config = TrainerConfig {
        id: "demo-trainer".into(),
        seed: a.seed,
        model: setup.model.clone(),
        hf_model: hf_model_string(setup),
        loss: LossConfig {
            mode: if a.vanilla_grpo {
                LossMode::Grpo
            } else {
                LossMode::Icepop
            },
            ..LossConfig::default()
        },
        optimizer: AdamWConfig {
            lr: a.rl_lr,
            weight_decay: 0.0,
            decay_steps: a.steps,
            final_lr_fraction: a.rl_lr_final,
            ..AdamWConfig::default()
        },
        checkpoint_every: 10,
        poll_ms: 50,
        // The demo serves no admin endpoints.
        metrics_addr: String::new(),
        ..TrainerConfig::default()
    };
    config.validate()?;
    Ok(config)
}
