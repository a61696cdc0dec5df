//! The KV-cached sampler against the training forward pass, and resuming partial responses.

use flywheel_model::{
    Model, ModelConfig, ModelError, Params, SampleConfig, Sampler, Sequence, StopReason,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn config(max_seq_len: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 11,
        d_model: 16,
        n_layers: 2,
        n_heads: 4,
        d_ff: 32,
        n_kv_heads: Some(2),
        max_seq_len,
        norm_eps: 1e-5,
        ..ModelConfig::tiny(11)
    }
}

/// A model whose next-token distributions are far from uniform.
fn model(cfg: &ModelConfig, seed: u64) -> Model {
    Model::cpu(&Params::init_scaled(cfg, seed, 20.0).unwrap()).unwrap()
}

fn generate(
    model: &Model,
    sampler: &mut Sampler<flywheel_model::CpuBackend>,
    max_new: usize,
    stop: &[u32],
    rng: &mut ChaCha8Rng,
) -> (Vec<u32>, Vec<f32>, StopReason) {
    let (mut toks, mut lps) = (Vec::new(), Vec::new());
    let stop = sampler
        .generate(
            model,
            &SampleConfig::default(),
            max_new,
            stop,
            rng,
            &mut toks,
            &mut lps,
        )
        .unwrap();
    (toks, lps, stop)
}

#[test]
fn sampled_logprobs_equal_training_logprobs() {
    for (max_seq, prompt_len) in [(48, 5), (120, 70)] {
        // The second case prefills more than one chunk.
        let cfg = config(max_seq);
        let model = model(&cfg, 1);
        let prompt: Vec<u32> = (0..prompt_len).map(|i| (i * 7 % 11) as u32).collect();
        let mut sampler = Sampler::new(&model).unwrap();
        sampler.prefill(&model, &prompt).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (toks, lps, stop) = generate(&model, &mut sampler, 40, &[], &mut rng);
        assert_eq!(stop, StopReason::MaxNewTokens);
        assert_eq!(toks.len(), 40);
        // The sampled tokens are not all the same (the test would be weak otherwise).
        assert!(toks.iter().any(|&t| t != toks[0]));
        let full: Vec<u32> = prompt.iter().chain(&toks).copied().collect();
        assert_eq!(sampler.tokens(), &full[..]);
        let cache = model
            .forward(&[Sequence {
                tokens: &full,
                response_start: prompt.len(),
            }])
            .unwrap();
        for (i, (a, b)) in lps.iter().zip(cache.logprobs()).enumerate() {
            assert!(
                (a - b).abs() < 1e-4,
                "token {i}: sampler {a} vs training forward {b}"
            );
        }
    }
}

#[test]
fn continuing_after_prefill_matches_uninterrupted_generation() {
    let cfg = config(64);
    let model = model(&cfg, 2);
    let prompt = [1u32, 4, 5, 6];
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut sampler = Sampler::new(&model).unwrap();
    sampler.prefill(&model, &prompt).unwrap();
    let (all, all_lp, _) = generate(&model, &mut sampler, 30, &[], &mut rng);

    // Another worker: 12 tokens, then a fresh sampler re-prefills prompt + committed tokens.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut first = Sampler::new(&model).unwrap();
    first.prefill(&model, &prompt).unwrap();
    let (head, head_lp, _) = generate(&model, &mut first, 12, &[], &mut rng);
    let mut resumed = Sampler::new(&model).unwrap();
    let committed: Vec<u32> = prompt.iter().chain(&head).copied().collect();
    resumed.prefill(&model, &committed).unwrap();
    let (tail, tail_lp, _) = generate(&model, &mut resumed, 18, &[], &mut rng);
    assert_eq!([head.clone(), tail.clone()].concat(), all);
    for (a, b) in head_lp.iter().chain(&tail_lp).zip(&all_lp) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }

    // The same sampler, generating in two calls.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut same = Sampler::new(&model).unwrap();
    same.prefill(&model, &prompt).unwrap();
    let (a, _, _) = generate(&model, &mut same, 7, &[], &mut rng);
    let (b, _, _) = generate(&model, &mut same, 23, &[], &mut rng);
    assert_eq!([a, b].concat(), all);
}

#[test]
fn stops_at_eos_and_at_full_context() {
    let cfg = config(16);
    let model = model(&cfg, 3);
    let mut sampler = Sampler::new(&model).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    sampler.prefill(&model, &[1, 2, 3]).unwrap();
    let (toks, _, stop) = generate(&model, &mut sampler, 100, &[], &mut rng);
    assert_eq!(stop, StopReason::ContextFull);
    assert_eq!(toks.len(), 13);
    assert_eq!(sampler.tokens().len(), 16);

    // Pick as EOS a token that the unconstrained run sampled; generation stops right there.
    let eos = toks[4];
    let stop_at = toks.iter().position(|&t| t == eos).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    sampler.prefill(&model, &[1, 2, 3]).unwrap();
    let (toks2, lps2, stop) = generate(&model, &mut sampler, 100, &[eos], &mut rng);
    assert_eq!(stop, StopReason::Eos);
    assert_eq!(toks2, toks[..=stop_at]);
    assert_eq!(lps2.len(), toks2.len());
}

#[test]
fn sample_frequencies_follow_reported_probabilities() {
    let cfg = config(8);
    let model = model(&cfg, 4);
    let mut sampler = Sampler::new(&model).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let n = 4000;
    let mut counts = vec![0usize; cfg.vocab_size];
    let mut prob = vec![0.0f64; cfg.vocab_size];
    for _ in 0..n {
        sampler.prefill(&model, &[1, 5]).unwrap();
        let (t, lp, _) = generate(&model, &mut sampler, 1, &[], &mut rng);
        counts[t[0] as usize] += 1;
        prob[t[0] as usize] = (lp[0] as f64).exp();
    }
    // The tokens seen carry (almost) all the probability mass.
    assert!(prob.iter().sum::<f64>() > 0.99, "{prob:?}");
    for (c, p) in counts.iter().zip(&prob) {
        let freq = *c as f64 / n as f64;
        // 5 standard deviations of a binomial proportion, plus slack.
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        assert!((freq - p).abs() <= 5.0 * sd + 1e-3, "freq {freq} vs p {p}");
    }
}

#[test]
fn temperature_and_top_p() {
    let cfg = config(32);
    let model = model(&cfg, 5);
    let mut sampler = Sampler::new(&model).unwrap();
    let greedy = SampleConfig {
        temperature: 0.0,
        top_p: 1.0,
        ..SampleConfig::default()
    };
    let tiny_nucleus = SampleConfig {
        temperature: 1.0,
        top_p: 1e-6,
        ..SampleConfig::default()
    };
    let top_1 = SampleConfig {
        top_k: 1,
        ..SampleConfig::default()
    };
    let mut outs = Vec::new();
    for sc in [greedy, tiny_nucleus, top_1] {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        sampler.prefill(&model, &[1, 7]).unwrap();
        let (mut t, mut lp) = (Vec::new(), Vec::new());
        sampler
            .generate(&model, &sc, 10, &[], &mut rng, &mut t, &mut lp)
            .unwrap();
        // A point mass: log-prob 0.
        assert!(lp.iter().all(|&x| x.abs() < 1e-6), "{lp:?}");
        outs.push(t);
    }
    // top-p → 0 and top-k = 1 keep only the most likely token: the greedy choice.
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
    // Greedy decoding picks the argmax: every token's training log-prob is the row maximum,
    // so it is at least log(1/vocab).
    let full: Vec<u32> = [1, 7].iter().chain(&outs[0]).copied().collect();
    let cache = model
        .forward(&[Sequence {
            tokens: &full,
            response_start: 2,
        }])
        .unwrap();
    let floor = -(cfg.vocab_size as f32).ln();
    assert!(cache.logprobs().iter().all(|&lp| lp >= floor));

    // The reported log-prob is that of the temperature-scaled distribution: at a huge
    // temperature it is uniform, whatever the model's own probabilities.
    let hot = SampleConfig {
        temperature: 1e6,
        top_p: 1.0,
        ..SampleConfig::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    sampler.prefill(&model, &[1, 7]).unwrap();
    let (mut t, mut lp) = (Vec::new(), Vec::new());
    sampler
        .generate(&model, &hot, 10, &[], &mut rng, &mut t, &mut lp)
        .unwrap();
    for x in lp {
        assert!((x - floor).abs() < 1e-3, "{x} vs uniform {floor}");
    }
}

/// With top-k, every sampled token is among the k most likely under the training forward, and
/// its reported log-prob is renormalised over those k.
#[test]
fn top_k_samples_only_the_k_most_likely() {
    let cfg = config(40);
    let model = model(&cfg, 8);
    let mut sampler = Sampler::new(&model).unwrap();
    let top_3 = SampleConfig {
        top_k: 3,
        ..SampleConfig::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    sampler.prefill(&model, &[1, 2]).unwrap();
    let (mut t, mut lp) = (Vec::new(), Vec::new());
    sampler
        .generate(&model, &top_3, 30, &[], &mut rng, &mut t, &mut lp)
        .unwrap();
    let mut context = vec![1u32, 2];
    for (&tok, &reported) in t.iter().zip(&lp) {
        // Score every candidate next token after the context.
        let scores: Vec<f32> = (0..cfg.vocab_size as u32)
            .map(|c| {
                let seq = [context.as_slice(), &[c]].concat();
                let cache = model
                    .forward(&[Sequence {
                        tokens: &seq,
                        response_start: seq.len() - 1,
                    }])
                    .unwrap();
                cache.logprobs()[0]
            })
            .collect();
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        assert!(
            order[..3].contains(&(tok as usize)),
            "{tok} not in the top 3 {order:?}"
        );
        let kept: f64 = order[..3].iter().map(|&i| (scores[i] as f64).exp()).sum();
        let want = scores[tok as usize] as f64 - kept.ln();
        assert!(
            (reported as f64 - want).abs() < 1e-4,
            "{reported} vs {want}"
        );
        context.push(tok);
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let cfg = config(8);
    let model = model(&cfg, 6);
    let mut sampler = Sampler::new(&model).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (mut t, mut lp) = (Vec::new(), Vec::new());
    let err = sampler
        .generate(
            &model,
            &SampleConfig::default(),
            3,
            &[],
            &mut rng,
            &mut t,
            &mut lp,
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
    assert!(matches!(
        sampler.prefill(&model, &[1, 99]),
        Err(ModelError::InvalidInput(_))
    ));
    assert!(matches!(
        sampler.prefill(&model, &[1; 9]),
        Err(ModelError::InvalidInput(_))
    ));
    sampler.prefill(&model, &[1]).unwrap();
    for bad in [
        SampleConfig {
            temperature: -1.0,
            top_p: 1.0,
            ..SampleConfig::default()
        },
        SampleConfig {
            temperature: 1.0,
            top_p: 0.0,
            ..SampleConfig::default()
        },
        SampleConfig {
            temperature: f32::NAN,
            top_p: 1.0,
            ..SampleConfig::default()
        },
    ] {
        let err = sampler
            .generate(&model, &bad, 3, &[], &mut rng, &mut t, &mut lp)
            .unwrap_err();
        assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
    }
    // A sampler refuses a model of another config.
    let other = Model::cpu(&Params::init(&config(16), 0).unwrap()).unwrap();
    assert!(matches!(
        sampler.prefill(&other, &[1]),
        Err(ModelError::InvalidConfig(_))
    ));
}
