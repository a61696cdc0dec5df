//! The backward pass against central finite differences, for every parameter tensor.

use flywheel_model::{Architecture, Llama3Rope, Model, ModelConfig, Params, Sequence};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The flags of each architecture of the family, at a size where finite differences are cheap.
fn config(arch: Architecture) -> ModelConfig {
    let base = ModelConfig {
        vocab_size: 7,
        d_model: 8,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        d_ff: 12,
        max_seq_len: 8,
        norm_eps: 1e-5,
        rope_theta: 100.0,
        ..ModelConfig::tiny(7)
    };
    match arch {
        // Qwen2: q/k/v biases, grouped-query attention.
        Architecture::Qwen2 => base,
        // Llama: biases everywhere, Llama 3 RoPE scaling, multi-head attention.
        Architecture::Llama => ModelConfig {
            architecture: arch,
            n_kv_heads: None,
            n_heads: 2,
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            rope_llama3: Some(Llama3Rope {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 16.0,
            }),
            ..base
        },
        // Qwen3: QK norms, a head width that is not d_model / n_heads, tied embeddings.
        Architecture::Qwen3 => ModelConfig {
            architecture: arch,
            head_dim: Some(6),
            qkv_bias: false,
            qk_norm: true,
            tie_embeddings: true,
            ..base
        },
    }
}

/// Parameters with large random weights and randomised norm scales/biases, so every
/// gradient is generic (the default init would make some of them vanish or coincide).
fn params(cfg: &ModelConfig, seed: u64) -> Params {
    let mut p = Params::init_scaled(cfg, seed, 15.0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    for t in p.tensors_mut() {
        if t.name.contains("norm") || t.name.ends_with("bias") {
            for v in &mut t.data {
                *v += rng.random_range(-0.5..0.5);
            }
        }
    }
    p
}

/// L = Σ a_k·logprob_k + Σ b_k·entropy_k, accumulated in f64.
fn loss(model: &Model, seqs: &[Sequence<'_>], a: &[f32], b: &[f32]) -> f64 {
    let cache = model.forward(seqs).unwrap();
    let lp = cache.logprobs();
    let ent = cache.entropies();
    lp.iter()
        .zip(a)
        .map(|(&x, &w)| x as f64 * w as f64)
        .sum::<f64>()
        + ent
            .iter()
            .zip(b)
            .map(|(&x, &w)| x as f64 * w as f64)
            .sum::<f64>()
}

fn check_gradients(arch: Architecture, with_entropy: bool) {
    let cfg = config(arch);
    let base = params(&cfg, 7);
    let mut model = Model::cpu(&base).unwrap();
    let s1 = [1u32, 3, 4, 5, 6, 2, 3];
    let s2 = [1u32, 4, 4, 6];
    let seqs = [
        Sequence {
            tokens: &s1,
            response_start: 3,
        },
        Sequence {
            tokens: &s2,
            response_start: 1,
        },
    ];
    let cache = model.forward(&seqs).unwrap();
    let n = cache.logprobs().len();
    assert_eq!(n, 4 + 3);
    assert_eq!(cache.sequence_range(0), Some(0..4));
    assert_eq!(cache.sequence_range(1), Some(4..7));
    assert_eq!(cache.sequence_range(2), None);
    assert_eq!(cache.sequence_logprobs(1).unwrap(), &cache.logprobs()[4..]);
    assert_eq!(
        cache.sequence_entropies(0).unwrap(),
        &cache.entropies()[..4]
    );
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let a: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let b: Vec<f32> = if with_entropy {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    } else {
        vec![0.0; n]
    };
    let mut grads = model.new_gradients().unwrap();
    model
        .backward(&cache, &a, with_entropy.then_some(&b[..]), &mut grads)
        .unwrap();
    let analytic = model.gradients_to_params(&grads).unwrap();

    let eps = 1e-2f32;
    let mut checked = 0;
    for (ti, g) in analytic.tensors().iter().enumerate() {
        let g_norm: f64 = g
            .data
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            g_norm > 1e-3,
            "gradient of `{}` is (almost) zero: {g_norm}",
            g.name
        );
        // The largest entry plus a few random ones.
        let largest = (0..g.data.len())
            .max_by(|&i, &j| g.data[i].abs().total_cmp(&g.data[j].abs()))
            .unwrap();
        let mut picks = vec![largest];
        picks.extend((0..5).map(|_| rng.random_range(0..g.data.len())));
        for &i in &picks {
            let mut p = base.clone();
            let orig = p.tensors()[ti].data[i];
            p.tensors_mut()[ti].data[i] = orig + eps;
            model.load_params(&p).unwrap();
            let up = loss(&model, &seqs, &a, &b);
            p.tensors_mut()[ti].data[i] = orig - eps;
            model.load_params(&p).unwrap();
            let down = loss(&model, &seqs, &a, &b);
            let fd = (up - down) / (2.0 * eps as f64);
            let an = g.data[i] as f64;
            let tol = 2e-3 + 3e-2 * fd.abs().max(an.abs());
            assert!(
                (fd - an).abs() <= tol,
                "{arch:?} entropy={with_entropy}: d/d {}[{i}]: finite difference {fd:.6}, \
                 backward {an:.6}",
                g.name
            );
            checked += 1;
        }
    }
    assert_eq!(checked, analytic.tensors().len() * 6);
}

#[test]
fn qwen2_gradients_match_finite_differences() {
    check_gradients(Architecture::Qwen2, false);
}

#[test]
fn llama_gradients_match_finite_differences() {
    check_gradients(Architecture::Llama, false);
}

#[test]
fn qwen3_gradients_match_finite_differences() {
    check_gradients(Architecture::Qwen3, false);
}

#[test]
fn entropy_gradients_match_finite_differences() {
    check_gradients(Architecture::Qwen2, true);
}

#[test]
fn backward_accumulates_across_calls() {
    let cfg = config(Architecture::Qwen2);
    let model = Model::cpu(&params(&cfg, 3)).unwrap();
    let toks = [1u32, 3, 4, 5];
    let seqs = [Sequence {
        tokens: &toks,
        response_start: 2,
    }];
    let cache = model.forward(&seqs).unwrap();
    let d = vec![1.0; cache.logprobs().len()];
    let mut once = model.new_gradients().unwrap();
    model.backward(&cache, &d, None, &mut once).unwrap();
    let mut twice = model.new_gradients().unwrap();
    model.backward(&cache, &d, None, &mut twice).unwrap();
    model.backward(&cache, &d, None, &mut twice).unwrap();
    let (once, twice) = (
        model.gradients_to_params(&once).unwrap(),
        model.gradients_to_params(&twice).unwrap(),
    );
    for (a, b) in once.tensors().iter().zip(twice.tensors()) {
        for (x, y) in a.data.iter().zip(&b.data) {
            assert!((2.0 * x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{}", a.name);
        }
    }
    // A batch of the same sequence twice gives twice the gradient of one.
    let cache2 = model.forward(&[seqs[0], seqs[0]]).unwrap();
    let mut batch = model.new_gradients().unwrap();
    model
        .backward(
            &cache2,
            &vec![1.0; cache2.logprobs().len()],
            None,
            &mut batch,
        )
        .unwrap();
    let batch = model.gradients_to_params(&batch).unwrap();
    for (a, b) in twice.tensors().iter().zip(batch.tensors()) {
        for (x, y) in a.data.iter().zip(&b.data) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{}", a.name);
        }
    }
}

/// Checkpoint restores must be bit-identical, so the same batch must give bit-identical
/// log-probs and gradients every time, whatever the threads do (large enough to take the
/// parallel paths).
#[test]
fn forward_and_backward_are_deterministic() {
    let cfg = ModelConfig::tiny(30);
    let model = Model::cpu(&Params::init(&cfg, 5).unwrap()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let seqs: Vec<Vec<u32>> = (0..6)
        .map(|i| (0..60 + 10 * i).map(|_| rng.random_range(0..30)).collect())
        .collect();
    let batch: Vec<Sequence<'_>> = seqs
        .iter()
        .map(|s| Sequence {
            tokens: s,
            response_start: 5,
        })
        .collect();
    let run = || {
        let cache = model.forward(&batch).unwrap();
        let d: Vec<f32> = (0..cache.logprobs().len())
            .map(|i| (i % 7) as f32 - 3.0)
            .collect();
        let mut g = model.new_gradients().unwrap();
        model.backward(&cache, &d, Some(&d), &mut g).unwrap();
        (
            cache.logprobs().to_vec(),
            model.gradients_to_params(&g).unwrap(),
        )
    };
    let (lp1, g1) = run();
    let (lp2, g2) = run();
    assert_eq!(lp1, lp2);
    assert_eq!(g1, g2);
}

#[test]
fn an_empty_batch_scores_nothing() {
    let cfg = config(Architecture::Qwen2);
    let model = Model::cpu(&params(&cfg, 1)).unwrap();
    let cache = model.forward(&[]).unwrap();
    assert_eq!(cache.num_sequences(), 0);
    assert!(cache.logprobs().is_empty());
    let mut g = model.new_gradients().unwrap();
    model.backward(&cache, &[], None, &mut g).unwrap();
    let g = model.gradients_to_params(&g).unwrap();
    assert!(g.tensors().iter().all(|t| t.data.iter().all(|&x| x == 0.0)));
}
