//! Throughput of the built-in model on the CPU: training forward + backward (tokens/s) and
//! KV-cached sampling (tokens/s).
//!
//! Reproduce: `cargo bench -p flywheel-model --bench throughput` (optionally
//! `RAYON_NUM_THREADS=N`). Sizes: `THROUGHPUT_D_MODEL`, `THROUGHPUT_LAYERS`,
//! `THROUGHPUT_SEQ_LEN`, `THROUGHPUT_BATCH` (defaults: the demo-sized model).

use std::time::Instant;

use flywheel_model::{Model, ModelConfig, Params, SampleConfig, Sampler, Sequence};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let d = env("THROUGHPUT_D_MODEL", 64);
    let cfg = ModelConfig {
        vocab_size: 20,
        d_model: d,
        n_layers: env("THROUGHPUT_LAYERS", 2),
        n_heads: 4,
        d_ff: 4 * d,
        max_seq_len: 256,
        ..ModelConfig::tiny(20)
    };
    let seq_len = env("THROUGHPUT_SEQ_LEN", 40);
    let batch = env("THROUGHPUT_BATCH", 64);
    let params = Params::init(&cfg, 0).expect("valid config");
    let model = Model::cpu(&params).expect("model");
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let seqs: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..seq_len).map(|_| rng.random_range(0..20)).collect())
        .collect();
    let batch_in: Vec<Sequence<'_>> = seqs
        .iter()
        .map(|s| Sequence {
            tokens: s,
            response_start: 8.min(s.len()),
        })
        .collect();
    let mut grads = model.new_gradients().expect("grads");
    let iters = 5;
    let start = Instant::now();
    for _ in 0..iters {
        let cache = model.forward(&batch_in).expect("forward");
        let d_lp = vec![1.0; cache.logprobs().len()];
        model
            .backward(&cache, &d_lp, None, &mut grads)
            .expect("backward");
    }
    let secs = start.elapsed().as_secs_f64();
    let tokens = (iters * batch * seq_len) as f64;
    println!(
        "train fwd+bwd: d_model {d}, {} layers, {} params, batch {batch} x {seq_len}: {:.0} tokens/s ({:.1} ms/batch)",
        cfg.n_layers,
        params.num_elements(),
        tokens / secs,
        secs * 1e3 / iters as f64
    );

    let mut sampler = Sampler::new(&model).expect("sampler");
    let (mut toks, mut lps) = (Vec::with_capacity(256), Vec::with_capacity(256));
    let n_seq = 20;
    let new = 200;
    let start = Instant::now();
    for _ in 0..n_seq {
        sampler.prefill(&model, &seqs[0][..8]).expect("prefill");
        toks.clear();
        lps.clear();
        sampler
            .generate(
                &model,
                &SampleConfig::default(),
                new,
                &[],
                &mut rng,
                &mut toks,
                &mut lps,
            )
            .expect("generate");
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "sampling (one sequence, KV cache): {:.0} tokens/s",
        (n_seq * new) as f64 / secs
    );
}
