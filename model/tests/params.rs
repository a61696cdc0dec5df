//! Parameter initialisation, serialisation, the tokenizer, and learning on one sequence.

use std::collections::BTreeMap;

use flywheel_model::{Model, ModelConfig, ModelError, Params, Sequence, Tokenizer, TokenizerError};

fn config() -> ModelConfig {
    ModelConfig {
        vocab_size: 20,
        d_model: 16,
        n_layers: 2,
        n_heads: 2,
        d_ff: 32,
        max_seq_len: 32,
        norm_eps: 1e-5,
        ..ModelConfig::tiny(20)
    }
}

#[test]
fn init_is_deterministic_and_ordered() {
    let cfg = config();
    let a = Params::init(&cfg, 42).unwrap();
    assert_eq!(a, Params::init(&cfg, 42).unwrap());
    assert_ne!(a, Params::init(&cfg, 43).unwrap());
    let names: Vec<&str> = a.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names[..3],
        [
            "model.embed_tokens.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_proj.weight"
        ]
    );
    assert_eq!(names.last(), Some(&"lm_head.weight"));
    // Qwen2: embedding, per block 2 norms + 4 projections + 3 q/k/v biases + 3 MLP
    // projections, final norm, untied head.
    assert_eq!(names.len(), 1 + 2 * 12 + 1 + 1);
    let (d, v, f) = (16, 20, 32);
    assert_eq!(
        a.num_elements(),
        v * d + 2 * (2 * d + 4 * d * d + 3 * d + 3 * d * f) + d + d * v
    );
    for t in a.tensors() {
        assert_eq!(t.data.len(), t.numel(), "{}", t.name);
    }
    let emb = a.get("model.embed_tokens.weight").unwrap();
    let std = (emb.data.iter().map(|x| x * x).sum::<f32>() / emb.data.len() as f32).sqrt();
    assert!((std - 0.02).abs() < 0.005, "std {std}");
    assert!(
        a.get("model.layers.1.post_attention_layernorm.weight")
            .unwrap()
            .data
            .iter()
            .all(|&x| x == 1.0)
    );
}

#[test]
fn bytes_map_round_trips_and_rejects_mismatches() {
    let cfg = config();
    let p = Params::init(&cfg, 1).unwrap();
    let map = p.to_bytes_map();
    assert_eq!(map["lm_head.weight"].len(), 16 * 20 * 4);
    assert_eq!(Params::from_bytes_map(&cfg, &map).unwrap(), p);

    let mut missing = map.clone();
    missing.remove("model.layers.1.mlp.up_proj.weight");
    let err = Params::from_bytes_map(&cfg, &missing).unwrap_err();
    assert!(
        matches!(&err, ModelError::BadParameter { name, .. } if name == "model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );

    let mut short = map.clone();
    short.get_mut("model.norm.weight").unwrap().pop();
    assert!(matches!(
        Params::from_bytes_map(&cfg, &short),
        Err(ModelError::BadParameter { .. })
    ));

    let mut extra = map.clone();
    extra.insert("model.layers.9.self_attn.o_proj.weight".into(), vec![0; 4]);
    assert!(matches!(
        Params::from_bytes_map(&cfg, &extra),
        Err(ModelError::BadParameter { .. })
    ));

    // Loading into a model of another config is refused.
    let mut other_cfg = cfg.clone();
    other_cfg.d_ff = 64;
    let mut model = Model::cpu(&Params::init(&other_cfg, 0).unwrap()).unwrap();
    assert!(model.load_params(&p).is_err());
    let empty: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    assert!(Params::from_bytes_map(&cfg, &empty).is_err());
}

#[test]
fn model_round_trips_parameters() {
    let p = Params::init(&config(), 3).unwrap();
    let mut model = Model::cpu(&p).unwrap();
    assert_eq!(model.to_params().unwrap(), p);
    assert_eq!(model.num_params(), p.num_elements());

    // Updating one tensor changes exactly that tensor.
    let mut q = p.clone();
    let t = q.get_mut("model.layers.1.self_attn.o_proj.weight").unwrap();
    t.data.iter_mut().for_each(|x| *x += 1.0);
    let new = t.data.clone();
    model
        .load_tensor("model.layers.1.self_attn.o_proj.weight", &new)
        .unwrap();
    assert_eq!(model.to_params().unwrap(), q);
    assert!(matches!(
        model.load_tensor("model.layers.1.self_attn.o_proj.weight", &new[1..]),
        Err(ModelError::BadParameter { .. })
    ));
    assert!(matches!(
        model.load_tensor("nope", &new),
        Err(ModelError::BadParameter { .. })
    ));
}

#[test]
fn invalid_configs_and_inputs_are_typed_errors() {
    let mut cfg = config();
    cfg.n_heads = 3;
    assert!(matches!(
        Params::init(&cfg, 0),
        Err(ModelError::InvalidConfig(_))
    ));
    let mut cfg = config();
    cfg.n_layers = 0;
    assert!(matches!(cfg.validate(), Err(ModelError::InvalidConfig(_))));
    let cfg: ModelConfig = serde_json::from_str(
        r#"{"vocab_size":20,"d_model":16,"n_layers":1,"n_heads":2,"d_ff":8,"max_seq_len":4}"#,
    )
    .unwrap();
    assert_eq!((cfg.head_dim(), cfg.kv_heads()), (8, 2));
    assert!(
        serde_json::from_str::<ModelConfig>(
            r#"{"vocab_size":20,"d_model":16,"n_layers":1,"n_heads":2,"d_ff":8,"max_seq_len":4,"typo":1}"#
        )
        .is_err()
    );

    let model = Model::cpu(&Params::init(&config(), 0).unwrap()).unwrap();
    let cases: [(&[u32], usize); 4] =
        [(&[], 0), (&[1, 2, 3], 0), (&[1, 2, 3], 4), (&[1, 20, 3], 1)];
    for (tokens, response_start) in cases {
        let err = model
            .forward(&[Sequence {
                tokens,
                response_start,
            }])
            .err()
            .unwrap();
        assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
    }
    let long = vec![1u32; 33];
    assert!(
        model
            .forward(&[Sequence {
                tokens: &long,
                response_start: 1
            }])
            .is_err()
    );
    let cache = model
        .forward(&[Sequence {
            tokens: &[1, 2, 3],
            response_start: 1,
        }])
        .unwrap();
    let mut g = model.new_gradients().unwrap();
    assert!(matches!(
        model.backward(&cache, &[1.0], None, &mut g),
        Err(ModelError::InvalidInput(_))
    ));
    assert!(matches!(
        model.backward(&cache, &[1.0, 1.0], Some(&[1.0]), &mut g),
        Err(ModelError::InvalidInput(_))
    ));
    // An empty response scores nothing, and is fine.
    let cache = model
        .forward(&[Sequence {
            tokens: &[1, 2, 3],
            response_start: 3,
        }])
        .unwrap();
    assert!(cache.logprobs().is_empty());
}

#[test]
fn tokenizer_round_trips_arithmetic_and_reports_unknown_characters() {
    let tok = Tokenizer::arithmetic();
    assert_eq!(
        tok.vocab_size(),
        3 + Tokenizer::ARITHMETIC_CHARSET.chars().count()
    );
    let prompt = tok.encode_prompt("3+14+7=").unwrap();
    assert_eq!(prompt[0], Tokenizer::BOS);
    assert_eq!(prompt.len(), 8);
    let mut ids = tok.encode("3,17,24;24").unwrap();
    ids.push(Tokenizer::EOS);
    assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
    assert_eq!(tok.decode(&ids).unwrap(), "3,17,24;24");
    assert_eq!(tok.decode(&prompt).unwrap(), "3+14+7=");

    let err = tok.encode("3+x").unwrap_err();
    assert!(matches!(
        err,
        TokenizerError::UnknownChar {
            ch: 'x',
            index: 2,
            ..
        }
    ));
    assert!(err.to_string().contains("'x'"), "{err}");
    let mut buf = vec![7];
    assert!(tok.encode_into("1a", &mut buf).is_err());
    assert_eq!(buf, [7], "a failed encode leaves the output untouched");
    assert!(matches!(
        tok.decode(&[99]),
        Err(TokenizerError::UnknownId { id: 99, .. })
    ));
    assert!(matches!(
        Tokenizer::new("abca"),
        Err(TokenizerError::InvalidCharset(_))
    ));
    assert!(Tokenizer::new("").is_err());
    let custom = Tokenizer::new("ab").unwrap();
    assert_eq!(custom.encode("ba").unwrap(), [4, 3]);
}

#[test]
fn sgd_steps_reduce_the_nll_of_a_sequence() {
    let tok = Tokenizer::arithmetic();
    let mut cfg = ModelConfig::tiny(tok.vocab_size());
    cfg.d_model = 32;
    cfg.d_ff = 64;
    let mut params = Params::init(&cfg, 0).unwrap();
    let mut model = Model::cpu(&params).unwrap();
    let mut tokens = tok.encode_prompt("3+14+7=").unwrap();
    let start = tokens.len();
    tok.encode_into("3,17,24;24", &mut tokens).unwrap();
    tokens.push(Tokenizer::EOS);
    let seq = [Sequence {
        tokens: &tokens,
        response_start: start,
    }];
    let nll = |m: &Model| -> f32 { -m.forward(&seq).unwrap().logprobs().iter().sum::<f32>() };
    let initial = nll(&model);
    // Near-uniform at init: about n·ln(vocab).
    assert!((initial / 11.0 - (tok.vocab_size() as f32).ln()).abs() < 0.2);
    let mut grads = model.new_gradients().unwrap();
    let mut last = initial;
    for _ in 0..30 {
        let cache = model.forward(&seq).unwrap();
        let d = vec![-1.0f32; cache.logprobs().len()]; // dNLL/dlogprob
        model.zero_gradients(&mut grads).unwrap();
        model.backward(&cache, &d, None, &mut grads).unwrap();
        let g = model.gradients_to_params(&grads).unwrap();
        for (p, g) in params.tensors_mut().iter_mut().zip(g.tensors()) {
            for (x, dx) in p.data.iter_mut().zip(&g.data) {
                *x -= 0.05 * dx;
            }
        }
        model.load_params(&params).unwrap();
        last = nll(&model);
    }
    assert!(last < 0.5 * initial, "NLL {initial} → {last}");
}
