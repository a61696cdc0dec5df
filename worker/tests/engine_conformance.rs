//! The engine conformance suite on every engine: `sim`, `builtin` (the run's own policy from
//! weights published in an object store) and `openai` (against a local OpenAI-compatible
//! server that generates, tokenizes and detokenizes like vLLM's).

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use flywheel_worker::engine::Engine;
use flywheel_worker::engine::conformance::EngineFactory;

mod sim {
    use super::*;
    use flywheel_worker::engine::sim::{LengthDistribution, SimConfig, SimEngine};

    struct Sim;

    #[async_trait]
    impl EngineFactory for Sim {
        async fn engine(&self) -> Arc<dyn Engine> {
            Arc::new(
                SimEngine::new(SimConfig {
                    seed: 3,
                    slots: 4,
                    decode_tokens_per_s: 0.0,
                    lengths: LengthDistribution::Uniform { lo: 1, hi: 40 },
                    ..SimConfig::default()
                })
                .unwrap(),
            )
        }

        fn prompt(&self) -> &str {
            "What is 6 times 7?"
        }
    }

    flywheel_worker::engine_conformance!(Sim);
}

mod builtin {
    use super::*;

    use flywheel_model::{ModelConfig, Params, Tokenizer};
    use flywheel_storage::RunStores;
    use flywheel_storage::config::RunConfig;
    use flywheel_trainer::TrainerConfig;
    use flywheel_trainer::warm_start::publish_initial;
    use flywheel_worker::engine::builtin::{BuiltinConfig, BuiltinEngine};

    struct Builtin;

    #[async_trait]
    impl EngineFactory for Builtin {
        /// Version 0 published by the trainer's own publication, on embedded stores.
        async fn engine(&self) -> Arc<dyn Engine> {
            let mut run = RunConfig::default();
            run.storage.run_id = "run".into();
            run.storage.state_url = "memory://".into();
            run.storage.blob_url = "memory://".into();
            run.storage.ledger_url = "sqlite::memory:".into();
            let stores = RunStores::open(&run).await.unwrap();
            let model = ModelConfig {
                d_model: 16,
                n_layers: 1,
                n_heads: 2,
                d_ff: 32,
                max_seq_len: 64,
                ..ModelConfig::tiny(Tokenizer::arithmetic().vocab_size())
            };
            let trainer = TrainerConfig {
                model: model.clone(),
                metrics_addr: String::new(),
                ..TrainerConfig::default()
            };
            let params = Params::init(&model, 1).unwrap();
            assert!(publish_initial(&stores, &trainer, params).await.unwrap());
            let config = BuiltinConfig {
                slots: 2,
                ..BuiltinConfig::default()
            };
            Arc::new(BuiltinEngine::new(stores.blobs, "run", config).unwrap())
        }

        fn prompt(&self) -> &str {
            "3+4+5="
        }
    }

    flywheel_worker::engine_conformance!(Builtin);

    /// The segment's top-k reaches the sampler: with k = 1 every token is the most likely one,
    /// a point mass (log-prob 0), whatever the trajectory's random stream.
    #[tokio::test]
    async fn top_k_one_samples_the_most_likely_token() {
        use flywheel_storage::{PromptId, TrajectoryId};
        use flywheel_worker::engine::{SamplingConfig, SegmentRequest};
        let engine = Builtin.engine().await;
        let prompt = engine.tokenize(Builtin.prompt()).await.unwrap();
        let mut outputs = Vec::new();
        for sample in 0..2 {
            let req = SegmentRequest {
                trajectory: TrajectoryId {
                    prompt: PromptId("top-k".into()),
                    sample,
                },
                prompt: prompt.clone().into(),
                committed: Vec::new().into(),
                max_new_tokens: 8,
                max_response_tokens: 24,
                version: 0,
                sampling: SamplingConfig {
                    top_k: 1,
                    ..SamplingConfig::default()
                },
            };
            let out = engine.generate(req).await.unwrap();
            assert!(
                out.logprobs.iter().all(|&lp| lp == 0.0),
                "{:?}",
                out.logprobs
            );
            outputs.push(out.tokens);
        }
        assert_eq!(outputs[0], outputs[1], "two random streams, one argmax");
    }

    /// The intake's admission against the builtin engine: the model's vocabulary and context
    /// (read from the published version) and its tokenizer decide what can run.
    #[tokio::test]
    async fn admission_checks_prompts_against_the_model() {
        use flywheel_storage::ledger::DropReason;
        use flywheel_storage::{Prompt, PromptId, PromptInput, VerifierSpec};
        use flywheel_worker::intake::Admission;
        use flywheel_worker::verify::{RewardServicesConfig, VerifierFactory};
        let admission = Admission {
            engine: Builtin.engine().await,
            verifiers: VerifierFactory::new(&RewardServicesConfig::default()).unwrap(),
        };
        let vocab = Tokenizer::arithmetic().vocab_size() as u32;
        let prompt = |input| Prompt {
            id: PromptId("p".into()),
            input,
            verifier: VerifierSpec::ExactMatch { answer: "7".into() },
            group_size: 2,
            metadata: Default::default(),
        };
        let verdict = |p: Prompt| {
            let admission = admission.clone();
            async move {
                admission
                    .check(&p)
                    .await
                    .unwrap()
                    .map(|r| (r.reason, r.kind, r.detail))
            }
        };
        assert_eq!(
            verdict(prompt(PromptInput::Text("3+4=".into()))).await,
            None
        );
        let (reason, kind, detail) = verdict(prompt(PromptInput::Text("3+x=".into())))
            .await
            .unwrap();
        assert_eq!(
            (reason, kind),
            (DropReason::Malformed, "tokenizer"),
            "{detail}"
        );
        let (reason, kind, _) = verdict(prompt(PromptInput::Tokens(vec![1, vocab])))
            .await
            .unwrap();
        assert_eq!((reason, kind), (DropReason::Malformed, "vocabulary"));
        // The model's context is 64 tokens: a 64-token prompt leaves no room for a response.
        assert_eq!(
            verdict(prompt(PromptInput::Tokens(vec![1; 63]))).await,
            None
        );
        let (reason, kind, _) = verdict(prompt(PromptInput::Tokens(vec![1; 64])))
            .await
            .unwrap();
        assert_eq!((reason, kind), (DropReason::Oversized, "context"));
        let mut unknown = prompt(PromptInput::Text("3+4=".into()));
        unknown.verifier = VerifierSpec::Service {
            name: "nowhere".into(),
        };
        let (reason, kind, _) = verdict(unknown).await.unwrap();
        assert_eq!((reason, kind), (DropReason::Malformed, "verifier"));
    }
}

mod openai {
    use super::*;
    use axum::Router;
    use axum::routing::post;
    use flywheel_worker::engine::openai::{OpenAiConfig, OpenAiEngine};
    use serde_json::{Value, json};

    /// The server's end-of-sequence token.
    const EOS: u32 = 0;

    /// Byte tokens; the continuation of a context is a fixed function of it: the next byte
    /// after the last, EOS once the context holds 60 tokens.
    fn continuation(context: &[u32], max_tokens: usize) -> (Vec<u32>, &'static str) {
        let mut out = Vec::new();
        let mut last = context.last().copied().unwrap_or(b'a'.into());
        while out.len() < max_tokens {
            if context.len() + out.len() + 1 == 60 {
                out.push(EOS);
                return (out, "stop");
            }
            last = b'a' as u32 + (last + 1) % 26;
            out.push(last);
        }
        (out, "length")
    }

    async fn completions(axum::Json(req): axum::Json<Value>) -> axum::Json<Value> {
        let prompt: Vec<u32> = serde_json::from_value(req["prompt"].clone()).unwrap();
        let max_tokens = req["max_tokens"].as_u64().unwrap() as usize;
        let (tokens, finish) = continuation(&prompt, max_tokens);
        let logprobs: Vec<f64> = tokens.iter().map(|&t| -0.001 * f64::from(t)).collect();
        let strings: Vec<String> = tokens.iter().map(|t| format!("token_id:{t}")).collect();
        axum::Json(json!({"choices": [{
            "index": 0,
            "text": "",
            "token_ids": tokens,
            "logprobs": {"tokens": strings, "token_logprobs": logprobs},
            "finish_reason": finish,
        }]}))
    }

    async fn tokenize(axum::Json(req): axum::Json<Value>) -> axum::Json<Value> {
        let text = req["prompt"].as_str().unwrap();
        let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
        axum::Json(json!({"count": tokens.len(), "max_model_len": 4096, "tokens": tokens}))
    }

    async fn detokenize(axum::Json(req): axum::Json<Value>) -> axum::Json<Value> {
        let tokens: Vec<u8> = serde_json::from_value::<Vec<u32>>(req["tokens"].clone())
            .unwrap()
            .into_iter()
            .filter(|&t| t != EOS)
            .map(|t| t as u8)
            .collect();
        axum::Json(json!({"prompt": String::from_utf8_lossy(&tokens)}))
    }

    struct OpenAi;

    #[async_trait]
    impl EngineFactory for OpenAi {
        async fn engine(&self) -> Arc<dyn Engine> {
            let router = Router::new()
                .route("/v1/completions", post(completions))
                .route("/tokenize", post(tokenize))
                .route("/detokenize", post(detokenize));
            let base_url = common::serve(router).await;
            let config = OpenAiConfig {
                base_url,
                slots: 4,
                ..OpenAiConfig::default()
            };
            Arc::new(OpenAiEngine::new(config).unwrap())
        }

        fn prompt(&self) -> &str {
            "What is 6 times 7?"
        }
    }

    flywheel_worker::engine_conformance!(OpenAi);
}
