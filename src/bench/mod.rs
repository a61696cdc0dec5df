//! `flywheel bench`: measurements that print the command to reproduce them and compare
//! against a baseline run side by side.
//!
//! - `dataplane`: the platform's own ceiling beside each store's;
//! - `icepop`: IcePop against vanilla GRPO under a controlled training/inference
//!   mismatch;
//! - `modes`: `sync`, `partial` and `async` rollouts of one long-tailed workload;
//! - `trainer`: training-step and sampling throughput, beside PyTorch eager;
//! - `weights`: publishing a policy version incrementally against publishing it whole, and a
//!   worker loading it from the version it holds against loading it from scratch.

mod dataplane;
mod icepop;
mod modes;
mod services;
mod trainer;
mod weights;

use flywheel_model::{
    Architecture, Backend, CpuBackend, Model, ModelConfig, Params, Sequence, Tokenizer,
};
use flywheel_trainer::{AdamW, AdamWConfig, DeviceAdamW};
use rand::{Rng, SeedableRng};

pub use dataplane::DataplaneBench;
pub use icepop::IcepopBench;
pub use modes::ModesBench;
pub use trainer::TrainerBench;
pub use weights::WeightsBench;

/// What `flywheel bench` measures.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Tokens per second of a training step (forward, backward, AdamW) and of KV-cached
    /// sampling.
    Trainer(TrainerBench),
    /// The platform's own ceiling: segments through worker, object store and state store
    /// with an engine that costs nothing, and the coordinator's step cut, beside each store
    /// alone.
    Dataplane(DataplaneBench),
    /// `sync`, `partial` and `async` rollouts on the same long-tailed workload, side by side.
    Modes(ModesBench),
    /// Bytes and time to publish a policy version (incremental against whole) and to load it
    /// (from the previous version against from scratch).
    Weights(WeightsBench),
    /// IcePop against vanilla GRPO, several seeds each, with the engine sampling
    /// from perturbed weights (a controlled training/inference mismatch).
    Icepop(IcepopBench),
}

/// Runs a bench and prints its report.
pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Trainer(b) => trainer::run(&b),
        BenchCommand::Weights(b) => weights::run(&b).await,
        BenchCommand::Modes(b) => modes::run(&b).await,
        BenchCommand::Dataplane(b) => dataplane::run(&b).await,
        BenchCommand::Icepop(b) => icepop::run(&b).await,
    }
}

/// Models the benches build with random weights.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Preset {
    /// The demo's built-in model (a tiny Qwen2 over the arithmetic characters).
    Demo,
    /// A Qwen2-shaped model of about 100M parameters (hidden 768, 12 layers, vocab 32000).
    Qwen2_100m,
    /// Qwen2.5-0.5B's shape, about 494M parameters (hidden 896, 24 layers, vocab 151936).
    Qwen2_500m,
}

/// The preset's config with room for `context` tokens.
fn preset(p: Preset, context: usize) -> ModelConfig {
    match p {
        Preset::Demo => ModelConfig {
            max_seq_len: context,
            ..ModelConfig::tiny(Tokenizer::arithmetic().vocab_size())
        },
        Preset::Qwen2_100m => ModelConfig {
            architecture: Architecture::Qwen2,
            vocab_size: 32_000,
            d_model: 768,
            n_layers: 12,
            n_heads: 12,
            n_kv_heads: Some(2),
            d_ff: 2048,
            max_seq_len: context,
            tie_embeddings: true,
            rope_theta: 1e6,
            ..ModelConfig::tiny(32_000)
        },
        Preset::Qwen2_500m => ModelConfig {
            architecture: Architecture::Qwen2,
            vocab_size: 151_936,
            d_model: 896,
            n_layers: 24,
            n_heads: 14,
            n_kv_heads: Some(2),
            d_ff: 4864,
            max_seq_len: context,
            tie_embeddings: true,
            qkv_bias: true,
            rope_theta: 1e6,
            ..ModelConfig::tiny(151_936)
        },
    }
}

/// Real training steps (forward, backward, AdamW where the model runs, the new weights
/// downloaded) on a fixed batch of random tokens: what the trainer bench times, and what
/// changes the weights between the versions of the weights bench the way training does. The
/// gradient stays on the device, as in a one-rank step (the trainer's finisher also brings it
/// through the host).
struct TrainSteps<B: Backend = CpuBackend> {
    seqs: Vec<Vec<u32>>,
    model: Model<B>,
    optimizer: DeviceAdamW<B>,
    grads: flywheel_model::Gradients<B>,
}

impl TrainSteps {
    /// [`TrainSteps::on`] the CPU.
    fn new(params: &Params, batch: usize, seq_len: usize, lr: f64) -> anyhow::Result<TrainSteps> {
        TrainSteps::on(CpuBackend::default(), params, batch, seq_len, lr)
    }
}

impl<B: Backend> TrainSteps<B> {
    /// `batch` random sequences of `seq_len` tokens (seeded) for `params`' model on `backend`;
    /// AdamW at a constant learning rate `lr`, on f32 masters when the weights' dtype is
    /// narrower.
    fn on(
        backend: B,
        params: &Params,
        batch: usize,
        seq_len: usize,
        lr: f64,
    ) -> anyhow::Result<TrainSteps<B>> {
        let vocab = params.config().vocab_size as u32;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let seqs = (0..batch)
            .map(|_| (0..seq_len).map(|_| rng.random_range(0..vocab)).collect())
            .collect();
        let model = Model::new(backend, params)?;
        let grads = model.new_gradients()?;
        let dtype = params.config().dtype;
        if !DeviceAdamW::<B>::supports(dtype) {
            anyhow::bail!("the benches train f32 or bf16 weights, not {dtype:?}");
        }
        let host = AdamW::with_weight_dtype(
            AdamWConfig {
                lr,
                ..AdamWConfig::default()
            },
            dtype,
        )?;
        Ok(TrainSteps {
            seqs,
            optimizer: DeviceAdamW::new(host, &model)?,
            model,
            grads,
        })
    }

    /// One step: raises the log-likelihood of the batch and updates `params` and the model.
    fn step(&mut self, params: &mut Params) -> anyhow::Result<()> {
        let batch: Vec<Sequence<'_>> = self
            .seqs
            .iter()
            .map(|s| Sequence {
                tokens: s,
                response_start: 1,
            })
            .collect();
        self.model.zero_gradients(&mut self.grads)?;
        let cache = self.model.forward(&batch)?;
        let n = cache.logprobs().len();
        self.model
            .backward(&cache, &vec![-1.0 / n as f32; n], None, &mut self.grads)?;
        self.optimizer.step(&mut self.model, &self.grads)?;
        *params = self.model.to_params()?;
        Ok(())
    }
}

/// The median of `values` (NaN for none).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median and the spread (min..max) of `values`, as `"median (min–max)"` with `f`.
fn median_spread(values: &[f64], f: impl Fn(f64) -> String) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if values.is_empty() {
        return "-".to_owned();
    }
    format!("{} ({}–{})", f(median(values)), f(min), f(max))
}

/// The command line that ran this bench, to print as "reproduce:": credentials in URLs
/// redacted, arguments quoted for a POSIX shell where they need it.
fn reproduce() -> String {
    std::env::args()
        .map(|a| {
            let a = flywheel_service::redact_url(&a);
            let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c);
            if !a.is_empty() && a.chars().all(plain) {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
