//! `flywheel bench trainer`: training-step and sampling throughput of the model on this
//! machine, beside PyTorch eager on the same model, batch and thread count.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use flywheel_model::{
    Backend, Checkpoint, Device, DeviceBackend, ModelConfig, Params, Products, SampleConfig,
    Sampler, hf,
};
use flywheel_trainer::AdamWConfig;
use rand::SeedableRng;

use super::{Preset, TrainSteps, preset};

/// Options of `flywheel bench trainer`.
#[derive(clap::Args, Debug)]
pub struct TrainerBench {
    /// A Hugging Face checkpoint directory; without it, `--preset` with random weights.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The model to build when no `--model` is given.
    #[arg(long, value_enum, default_value = "demo")]
    pub preset: Preset,
    /// Where to run: `auto` (the first GPU when CUDA is usable, else the CPU), `cpu`, `cuda` or
    /// `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// The precision of the matrix products' operands: `f32`, or `bf16` with f32
    /// accumulation.
    #[arg(long, default_value = "f32")]
    pub products: Products,
    /// Sequences per training step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// Timed training steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Tokens sampled after an 8-token prompt.
    #[arg(long, default_value_t = 64)]
    pub sample_tokens: usize,
    /// A Python with torch and transformers: also runs scripts/bench_torch.py on the same
    /// model, batch and thread count, and prints the ratios.
    #[arg(long)]
    pub torch: Option<PathBuf>,
}

/// Runs the bench and prints its report.
pub fn run(b: &TrainerBench) -> anyhow::Result<()> {
    // The device as the trainer opens it.
    let (backend, why) = DeviceBackend::open(b.device, b.products)?;
    println!("device: {why}");
    let device = backend.name();
    if b.seq_len < 2 || b.batch == 0 || b.iters == 0 {
        bail!("--seq-len must be at least 2, --batch and --iters at least 1");
    }
    let (params, label) = match &b.model {
        Some(dir) => (
            Checkpoint::open(dir, None)?.params,
            format!("checkpoint {}", dir.display()),
        ),
        None => {
            let config = preset(b.preset, b.seq_len.max(8 + b.sample_tokens));
            (Params::init(&config, 0)?, format!("{:?} preset", b.preset))
        }
    };
    let config = params.config().clone();
    if config.max_seq_len < b.seq_len.max(8 + b.sample_tokens) {
        bail!(
            "the model's context is {} tokens; lower --seq-len or --sample-tokens",
            config.max_seq_len
        );
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "model: {label}: {:?}, d_model {}, {} layers, {} heads ({} kv), d_ff {}, vocab {}, {:.1}M parameters",
        config.architecture,
        config.d_model,
        config.n_layers,
        config.n_heads,
        config.kv_heads(),
        config.d_ff,
        config.vocab_size,
        params.num_elements() as f64 / 1e6
    );
    println!(
        "batch {} x {} tokens, {} timed steps, {} sampled tokens, {threads} threads",
        b.batch, b.seq_len, b.iters, b.sample_tokens
    );
    let peak = match &backend {
        DeviceBackend::Cuda(gpu) => peak_flops(&gpu.device_name(), b.products),
        DeviceBackend::Cpu(_) => None,
    };
    let torch_device = match backend {
        DeviceBackend::Cuda(_) => "cuda",
        DeviceBackend::Cpu(_) => "cpu",
    };
    let (train, sample) = measure(backend, params, b)?;
    println!("flywheel ({device}): train {train:.0} tokens/s, sample {sample:.1} tokens/s");
    let flops = train * train_flops_per_token(&config, b.seq_len);
    match peak {
        Some(peak) => println!(
            "model FLOP/s (6 per matrix weight + attention, per trained token): {:.2} TFLOP/s, \
             MFU {:.1}% of the GPU's {:.1} TFLOP/s {} peak",
            flops / 1e12,
            100.0 * flops / peak,
            peak / 1e12,
            b.products
        ),
        None => println!(
            "model FLOP/s (6 per matrix weight + attention, per trained token): {:.2} GFLOP/s",
            flops / 1e9
        ),
    }
    if let Some(python) = &b.torch {
        let dir = tempfile::tempdir()?;
        let json = serde_json::to_string_pretty(&hf::config_to_json(&config, &[]))?;
        std::fs::write(dir.path().join("config.json"), json)?;
        // From the repository root (scripts/gpu_check.sh runs the binary on another machine),
        // else where this build's sources are.
        let script = [
            PathBuf::from("scripts/bench_torch.py"),
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_torch.py"),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .context("scripts/bench_torch.py not found: run from the repository root")?;
        let out = std::process::Command::new(python)
            .arg(&script)
            .arg("--config")
            .arg(dir.path())
            .args([
                "--batch",
                &b.batch.to_string(),
                "--seq-len",
                &b.seq_len.to_string(),
            ])
            .args(["--iters", &b.iters.to_string()])
            .args(["--sample-tokens", &b.sample_tokens.to_string()])
            .args(["--threads", &threads.to_string()])
            .args(["--device", torch_device])
            .args(["--products", &b.products.to_string()])
            .output()
            .with_context(|| format!("running {} {}", python.display(), script.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed:\n{}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(
            out.stdout
                .split(|&c| c == b'\n')
                .rfind(|l| !l.is_empty())
                .unwrap_or_default(),
        )
        .context("bench_torch.py printed no JSON line")?;
        let (t_train, t_sample) = (
            v["train_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            v["sample_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
        );
        println!(
            "pytorch eager ({device}): train {t_train:.0} tokens/s, sample {t_sample:.1} tokens/s"
        );
        println!(
            "ratio flywheel / pytorch: train {:.2}x, sample {:.2}x",
            train / t_train,
            sample / t_sample
        );
    }
    println!("reproduce: {}", super::reproduce());
    Ok(())
}

/// Model FLOPs of training on one token (forward and backward) in a sequence of `seq_len`:
/// 6 per weight of a matrix product (the attention and MLP projections, the LM head) and
/// 12 · layers · q_dim · seq_len for the attention scores and their use (PaLM's accounting,
/// appendix B).
fn train_flops_per_token(c: &ModelConfig, seq_len: usize) -> f64 {
    let (d, q, kv) = (c.d_model, c.q_dim(), c.kv_dim());
    let per_layer = d * q + 2 * d * kv + q * d + 3 * d * c.d_ff;
    let matrix_weights = c.n_layers * per_layer + c.vocab_size * d;
    (6 * matrix_weights + 12 * c.n_layers * q * seq_len) as f64
}

/// The dense peak of the GPUs Flywheel's trainers run on for products of `products`
/// operands (f32: without tensor cores; bf16: tensor cores, without sparsity), by the name
/// the driver reports (SXM figures); `None` for others.
fn peak_flops(name: &str, products: Products) -> Option<f64> {
    [
        ("H200", 67e12, 989e12),
        ("H100", 67e12, 989e12),
        ("A100", 19.5e12, 312e12),
    ]
    .into_iter()
    .find(|(model, _, _)| name.contains(model))
    .map(|(_, f32_peak, bf16_peak)| match products {
        Products::F32 => f32_peak,
        Products::Bf16 => bf16_peak,
    })
}

/// Training tokens/s (forward, backward, AdamW on `batch × (seq_len − 1)` scored tokens) and
/// sampling tokens/s.
fn measure<B: Backend>(
    backend: B,
    mut params: Params,
    b: &TrainerBench,
) -> anyhow::Result<(f64, f64)> {
    let lr = AdamWConfig::default().lr;
    let mut steps = TrainSteps::on(backend, &params, b.batch, b.seq_len, lr)?;
    steps.step(&mut params)?;
    let start = Instant::now();
    for _ in 0..b.iters {
        steps.step(&mut params)?;
    }
    let per_step = start.elapsed().as_secs_f64() / b.iters as f64;
    let train = (b.batch * (b.seq_len - 1)) as f64 / per_step;

    let (model, seqs) = (&steps.model, &steps.seqs);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut sampler = Sampler::new(model)?;
    let (mut toks, mut lps) = (Vec::new(), Vec::new());
    sampler.prefill(model, &seqs[0][..8])?;
    sampler.generate(
        model,
        &SampleConfig::default(),
        4,
        &[],
        &mut rng,
        &mut toks,
        &mut lps,
    )?;
    sampler.prefill(model, &seqs[0][..8])?;
    toks.clear();
    lps.clear();
    let start = Instant::now();
    sampler.generate(
        model,
        &SampleConfig::default(),
        b.sample_tokens,
        &[],
        &mut rng,
        &mut toks,
        &mut lps,
    )?;
    let sample = toks.len() as f64 / start.elapsed().as_secs_f64();
    Ok((train, sample))
}
