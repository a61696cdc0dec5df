//! The one conformance suite every [`Engine`] must pass (DESIGN.md §9).
//!
//! Each `pub async fn` is one case; [`crate::engine_conformance!`] turns all of them into
//! `#[tokio::test]`s for an [`EngineFactory`]. The cases check the contract the segment loop
//! relies on, whatever the engine: a segment never exceeds what was asked, carries one
//! finite log-prob ≤ 0 per token, ends the trajectory exactly when the rule says, continues a
//! committed prefix, reports the version it generated with; bad requests are refused before
//! any work, and concurrent calls are served.

use std::sync::Arc;

use async_trait::async_trait;
use flywheel_storage::{FinishReason, PromptId, TrajectoryId};

use super::{Engine, EngineError, SamplingConfig, SegmentRequest};

/// Makes engines for the suite.
#[async_trait]
pub trait EngineFactory: Send + Sync {
    /// An engine ready to generate with policy version 0 (its weights published, its server
    /// up).
    async fn engine(&self) -> Arc<dyn Engine>;

    /// A prompt text its tokenizer encodes.
    fn prompt(&self) -> &str;
}

/// The response cap of the suite's requests.
const CAP: u32 = 24;

fn request(prompt: &[u32], committed: &[u32], max_new: u32, sample: u32) -> SegmentRequest {
    SegmentRequest {
        trajectory: TrajectoryId {
            prompt: PromptId("conformance".into()),
            sample,
        },
        prompt: prompt.into(),
        committed: committed.into(),
        max_new_tokens: max_new,
        max_response_tokens: CAP,
        version: 0,
        sampling: SamplingConfig::default(),
    }
}

async fn prompt_ids(engine: &dyn Engine, factory: &dyn EngineFactory) -> Vec<u32> {
    let ids = engine
        .tokenize(factory.prompt())
        .await
        .expect("the engine tokenizes its prompt");
    assert!(!ids.is_empty(), "a prompt has tokens");
    ids
}

/// A segment has at most `max_new_tokens` tokens, one log-prob each (finite, ≤ 0), passes
/// [`super::SegmentOutput::check`] and says which version generated it.
pub async fn segments_respect_the_request(factory: &dyn EngineFactory) {
    let engine = factory.engine().await;
    let prompt = prompt_ids(engine.as_ref(), factory).await;
    for max_new in [1, 5] {
        let req = request(&prompt, &[], max_new, 0);
        let out = engine.generate(req.clone()).await.expect("a segment");
        assert!(out.tokens.len() <= max_new as usize, "{out:?}");
        assert_eq!(out.tokens.len(), out.logprobs.len());
        assert!(
            out.logprobs.iter().all(|lp| lp.is_finite() && *lp <= 0.0),
            "{out:?}"
        );
        out.check(engine.name(), &req).unwrap();
        assert_eq!(out.version, 0, "generated with the version asked for");
        if out.finish == FinishReason::None {
            assert_eq!(out.tokens.len(), max_new as usize, "a cut segment is full");
        }
    }
}

/// A segment that reaches the response cap ends the trajectory; one that does not and did
/// not stop at EOS goes on.
pub async fn the_response_cap_ends_the_trajectory(factory: &dyn EngineFactory) {
    let engine = factory.engine().await;
    let prompt = prompt_ids(engine.as_ref(), factory).await;
    let mut committed = Vec::new();
    let mut sample = 0;
    // A committed prefix of CAP − 2 tokens (restarting after an early EOS).
    while committed.len() < CAP as usize - 2 {
        let want = (CAP as usize - 2 - committed.len()) as u32;
        let out = engine
            .generate(request(&prompt, &committed, want, sample))
            .await
            .expect("a segment");
        if out.finish == FinishReason::Eos {
            committed.clear();
            sample += 1;
            assert!(sample < 50, "the engine keeps stopping at once");
            continue;
        }
        committed.extend(out.tokens);
    }
    let out = engine
        .generate(request(&prompt, &committed, 2, sample))
        .await
        .expect("the last segment");
    assert!(out.finish.ends_trajectory(), "the cap ends it: {out:?}");
}

/// A request that continues committed tokens (a resumed trajectory) is served, and requests
/// that break the contract are refused as invalid (not retryable) before any work.
pub async fn continues_and_refuses_bad_requests(factory: &dyn EngineFactory) {
    let engine = factory.engine().await;
    let prompt = prompt_ids(engine.as_ref(), factory).await;
    let first = engine
        .generate(request(&prompt, &[], 4, 1))
        .await
        .expect("a first segment");
    if first.finish == FinishReason::None {
        let req = request(&prompt, &first.tokens, 4, 1);
        let next = engine
            .generate(req.clone())
            .await
            .expect("the next segment");
        next.check(engine.name(), &req).unwrap();
    }
    for bad in [
        request(&prompt, &[], 0, 0),
        request(&prompt, &prompt[..1], CAP, 0),
    ] {
        match engine.generate(bad).await {
            Err(e @ EngineError::InvalidRequest(_)) => assert!(!e.is_retryable()),
            other => panic!("a bad request must be refused as invalid, got {other:?}"),
        }
    }
}

/// Twice as many calls as the engine's slots (at most 8), at once, are all served.
pub async fn concurrent_calls_are_served(factory: &dyn EngineFactory) {
    let engine = factory.engine().await;
    let prompt = prompt_ids(engine.as_ref(), factory).await;
    let n = (2 * engine.slots()).min(8) as u32;
    let calls = (0..n).map(|i| {
        let engine = engine.clone();
        let req = request(&prompt, &[], 3, i);
        async move { engine.generate(req).await }
    });
    for out in futures::future::join_all(calls).await {
        out.expect("a concurrent segment");
    }
}

/// Detokenising the prompt's tokens gives its text back (special tokens aside).
pub async fn tokens_round_trip(factory: &dyn EngineFactory) {
    let engine = factory.engine().await;
    let ids = prompt_ids(engine.as_ref(), factory).await;
    let text = engine.detokenize(&ids).await.expect("detokenize");
    assert_eq!(text, factory.prompt());
}

/// Generates one `#[tokio::test]` per conformance case for the [`EngineFactory`] `$factory`.
#[macro_export]
macro_rules! engine_conformance {
    ($factory:expr) => {
        $crate::engine_conformance!(@cases $factory;
            segments_respect_the_request,
            the_response_cap_ends_the_trajectory,
            continues_and_refuses_bad_requests,
            concurrent_calls_are_served,
            tokens_round_trip,
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let factory = $factory;
                $crate::engine::conformance::$case(&factory).await;
            }
        )*
    };
}
