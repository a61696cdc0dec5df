//! `sim`: a seedable load generator standing in for a GPU inference engine.
//!
//! It reproduces the *shape* of a rollout workload, not its content: each trajectory gets a
//! target response length drawn from a configurable distribution (fixed, uniform, or
//! log-normal with a cap, for long-tailed reasoning workloads), tokens come out at a
//! configurable per-sequence decode rate (real sleeping), and at most `slots` sequences decode
//! at once. Everything is a pure function of `(seed, trajectory id, position)`: the target
//! length, every token and every log-prob. So a trajectory resumed anywhere, by any worker,
//! continues exactly as if it had never stopped, which is what resume tests compare against.
//!
//! Tokenisation is byte-level: text becomes its UTF-8 bytes (ids 0..256).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use flywheel_storage::TrajectoryId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{
    Engine, EngineError, EngineLimits, SegmentOutput, SegmentRequest, acquire_slot, splitmix64,
    trajectory_key,
};

/// How long a trajectory's response is (in tokens, the final end-of-sequence token included).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LengthDistribution {
    /// Every response has exactly `tokens` tokens.
    Fixed {
        /// The length, at least 1.
        tokens: u32,
    },
    /// Uniform over `lo..=hi`.
    Uniform {
        /// Shortest length, at least 1.
        lo: u32,
        /// Longest length, at least `lo`.
        hi: u32,
    },
    /// `round(exp(N(mu, sigma²)))`, clamped to `1..=cap`: most responses short, a long tail.
    /// The median is `exp(mu)`.
    LogNormal {
        /// Mean of the underlying normal (log of the median length).
        mu: f64,
        /// Standard deviation of the underlying normal (the tail's weight), at least 0.
        sigma: f64,
        /// Longest length, at least 1.
        cap: u32,
    },
}

impl Default for LengthDistribution {
    fn default() -> Self {
        // Median 256 tokens, a tail of a few thousand: roughly a reasoning workload.
        LengthDistribution::LogNormal {
            mu: 256f64.ln(),
            sigma: 1.0,
            cap: 8192,
        }
    }
}

/// The sampler a validated [`LengthDistribution`] becomes.
#[derive(Clone, Debug)]
enum LengthSampler {
    /// Always this length.
    Fixed(u32),
    /// Uniform over `lo..=hi`.
    Uniform(u32, u32),
    /// The distribution and the cap.
    LogNormal(LogNormal<f64>, u32),
}

impl LengthSampler {
    fn new(dist: &LengthDistribution) -> Result<Self, EngineError> {
        let bad = |message: String| EngineError::Config(format!("sim lengths: {message}"));
        match *dist {
            LengthDistribution::Fixed { tokens } if tokens >= 1 => Ok(LengthSampler::Fixed(tokens)),
            LengthDistribution::Fixed { tokens } => Err(bad(format!("fixed length {tokens} < 1"))),
            LengthDistribution::Uniform { lo, hi } if lo >= 1 && lo <= hi => {
                Ok(LengthSampler::Uniform(lo, hi))
            }
            LengthDistribution::Uniform { lo, hi } => Err(bad(format!(
                "uniform needs 1 <= lo <= hi, got lo={lo} hi={hi}"
            ))),
            LengthDistribution::LogNormal { mu, sigma, cap } => {
                if cap < 1 {
                    return Err(bad("log-normal cap must be at least 1".to_owned()));
                }
                if !mu.is_finite() || !sigma.is_finite() || sigma < 0.0 {
                    return Err(bad(format!(
                        "log-normal needs a finite mu and a finite sigma >= 0, got mu={mu} sigma={sigma}"
                    )));
                }
                let dist = LogNormal::new(mu, sigma).map_err(|e| bad(e.to_string()))?;
                Ok(LengthSampler::LogNormal(dist, cap))
            }
        }
    }

    fn sample(&self, rng: &mut StdRng) -> u32 {
        match *self {
            LengthSampler::Fixed(n) => n,
            LengthSampler::Uniform(lo, hi) => rng.random_range(lo..=hi),
            LengthSampler::LogNormal(dist, cap) => {
                let x = dist.sample(rng).round();
                // `as` saturates on overflow and infinity; the clamp applies the cap.
                (x as u32).clamp(1, cap)
            }
        }
    }
}

/// Configuration of the [`SimEngine`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Seed of every pseudo-random choice: the same seed gives the same workload.
    pub seed: u64,
    /// Sequences decoding at once (the engine's batch slots); further calls wait.
    pub slots: usize,
    /// Tokens per second per sequence while decoding; 0 means no delay (fast tests).
    pub decode_tokens_per_s: f64,
    /// Tokens per second of (re-)prefilling prompt + committed tokens; 0 means free.
    pub prefill_tokens_per_s: f64,
    /// Distribution of trajectories' total response lengths.
    pub lengths: LengthDistribution,
    /// Synthetic tokens are drawn from `0..vocab_size`.
    pub vocab_size: u32,
    /// The end-of-sequence token, emitted as the last token of every trajectory.
    pub eos_token_id: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 0,
            slots: 64,
            decode_tokens_per_s: 50.0,
            prefill_tokens_per_s: 0.0,
            lengths: LengthDistribution::default(),
            vocab_size: 32_000,
            eos_token_id: 2,
        }
    }
}

/// Counters of what the sim engine has done, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Segments being decoded right now.
    pub in_flight: usize,
    /// The most segments ever decoding at once (never above the slots).
    pub peak_in_flight: usize,
    /// Segments generated in total.
    pub segments: u64,
    /// Tokens generated in total.
    pub tokens: u64,
}

/// The simulated engine. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct SimEngine {
    /// The validated configuration.
    config: SimConfig,
    /// `config.lengths`, ready to sample.
    lengths: LengthSampler,
    /// One permit per decoding slot.
    slots: Arc<Semaphore>,
    /// Segments decoding now.
    in_flight: AtomicUsize,
    /// The most segments ever decoding at once.
    peak_in_flight: AtomicUsize,
    /// Segments generated so far.
    segments: AtomicU64,
    /// Tokens generated so far.
    tokens: AtomicU64,
}

impl SimEngine {
    /// Validates `config` and builds the engine.
    pub fn new(config: SimConfig) -> Result<Self, EngineError> {
        if config.slots == 0 {
            return Err(EngineError::Config(
                "sim slots must be at least 1".to_owned(),
            ));
        }
        for (name, rate) in [
            ("decode_tokens_per_s", config.decode_tokens_per_s),
            ("prefill_tokens_per_s", config.prefill_tokens_per_s),
        ] {
            if !rate.is_finite() || rate < 0.0 {
                return Err(EngineError::Config(format!(
                    "sim {name} must be a finite number >= 0 (0 = no delay), got {rate}"
                )));
            }
        }
        if config.vocab_size < 2 || config.eos_token_id >= config.vocab_size {
            return Err(EngineError::Config(format!(
                "sim needs vocab_size >= 2 and eos_token_id < vocab_size, got {} and {}",
                config.vocab_size, config.eos_token_id
            )));
        }
        let lengths = LengthSampler::new(&config.lengths)?;
        Ok(SimEngine {
            slots: Arc::new(Semaphore::new(config.slots)),
            lengths,
            config,
            in_flight: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
            segments: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
        })
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// The total response length (end-of-sequence included) of `trajectory`: a pure function
    /// of the seed and the trajectory id.
    pub fn target_length(&self, trajectory: &TrajectoryId) -> u32 {
        let mut rng = StdRng::seed_from_u64(trajectory_key(self.config.seed, trajectory));
        self.lengths.sample(&mut rng)
    }

    /// The token and log-prob at response position `pos` of a trajectory whose stable key is
    /// `key`, when it is not the final token.
    fn token_at(&self, key: u64, pos: u32) -> (u32, f32) {
        let h = splitmix64(key ^ splitmix64(u64::from(pos).wrapping_add(0x5151)));
        let mut token = (h % u64::from(self.config.vocab_size)) as u32;
        if token == self.config.eos_token_id {
            token = (token + 1) % self.config.vocab_size;
        }
        (token, logprob_from(h))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        SimStats {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            peak_in_flight: self.peak_in_flight.load(Ordering::Relaxed),
            segments: self.segments.load(Ordering::Relaxed),
            tokens: self.tokens.load(Ordering::Relaxed),
        }
    }

    /// How long the segment takes on a real engine: re-prefill plus decode.
    fn latency(&self, context: usize, generated: usize) -> Duration {
        let mut secs = 0.0;
        if self.config.prefill_tokens_per_s > 0.0 {
            secs += context as f64 / self.config.prefill_tokens_per_s;
        }
        if self.config.decode_tokens_per_s > 0.0 {
            secs += generated as f64 / self.config.decode_tokens_per_s;
        }
        Duration::from_secs_f64(secs)
    }
}

/// A plausible sampled-token log-prob from 64 random bits: `0.7·ln(u)`, u uniform in (0, 1],
/// so most tokens are confident (mean −0.7) with an occasional unlikely one, floored at −20.
fn logprob_from(h: u64) -> f32 {
    let u = ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    ((0.7 * u.ln()).max(-20.0)) as f32
}

/// Decrements the in-flight gauge however the call ends (even if the future is dropped).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl Engine for SimEngine {
    fn name(&self) -> &str {
        "sim"
    }

    fn slots(&self) -> usize {
        self.config.slots
    }

    async fn generate(&self, req: SegmentRequest) -> Result<SegmentOutput, EngineError> {
        req.validate()?;
        let _permit = acquire_slot("sim", &self.slots).await?;
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        let _guard = InFlight(&self.in_flight);
        self.peak_in_flight.fetch_max(now, Ordering::Relaxed);

        let key = trajectory_key(self.config.seed, &req.trajectory);
        let committed = req.committed_len();
        // A trajectory already at or past its target (possible only if the seed or the
        // distribution changed since it was committed) ends with its next token.
        let end = self.target_length(&req.trajectory).max(committed + 1);
        let n = req.max_new_tokens.min(end - committed);
        let mut tokens = Vec::with_capacity(n as usize);
        let mut logprobs = Vec::with_capacity(n as usize);
        for pos in committed..committed + n {
            let (token, lp) = self.token_at(key, pos);
            let token = if pos + 1 == end {
                self.config.eos_token_id
            } else {
                token
            };
            tokens.push(token);
            logprobs.push(lp);
        }
        let eos = committed + n == end;

        let context = req.prompt.len() + req.committed.len();
        let latency = self.latency(context, tokens.len());
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }

        self.segments.fetch_add(1, Ordering::Relaxed);
        self.tokens.fetch_add(u64::from(n), Ordering::Relaxed);
        let out = SegmentOutput {
            finish: req.finish_reason(tokens.len(), eos),
            tokens,
            logprobs,
            version: req.version,
        };
        out.check("sim", &req)?;
        Ok(out)
    }

    async fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        Ok(text.bytes().map(u32::from).collect())
    }

    async fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError> {
        // Byte tokens become text; synthetic tokens above the byte range render as `<id>`.
        let mut out = String::new();
        let mut bytes = Vec::new();
        for &t in tokens {
            if let Ok(b) = u8::try_from(t) {
                bytes.push(b);
            } else {
                out.push_str(&String::from_utf8_lossy(&bytes));
                bytes.clear();
                out.push_str(&format!("<{t}>"));
            }
        }
        out.push_str(&String::from_utf8_lossy(&bytes));
        Ok(out)
    }

    async fn limits(&self) -> Result<EngineLimits, EngineError> {
        Ok(EngineLimits {
            vocab_size: Some(self.config.vocab_size),
            context_tokens: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use flywheel_storage::FinishReason;

    use super::*;
    use crate::engine::SamplingConfig;

    fn traj(prompt: &str, sample: u32) -> TrajectoryId {
        TrajectoryId {
            prompt: prompt.into(),
            sample,
        }
    }

    fn fast(lengths: LengthDistribution, seed: u64) -> SimEngine {
        SimEngine::new(SimConfig {
            seed,
            decode_tokens_per_s: 0.0,
            lengths,
            ..SimConfig::default()
        })
        .unwrap()
    }

    fn request(t: &TrajectoryId, committed: &[u32], max_new: u32, cap: u32) -> SegmentRequest {
        SegmentRequest {
            trajectory: t.clone(),
            prompt: vec![1, 2, 3].into(),
            committed: committed.into(),
            max_new_tokens: max_new,
            max_response_tokens: cap,
            version: 3,
            sampling: SamplingConfig::default(),
        }
    }

    /// Generates a whole trajectory in segments of `s` tokens; returns the segments.
    async fn run_to_end(
        engine: &SimEngine,
        t: &TrajectoryId,
        s: u32,
        cap: u32,
    ) -> Vec<SegmentOutput> {
        let mut committed = Vec::new();
        let mut segments = Vec::new();
        loop {
            let max_new = s.min(cap - committed.len() as u32);
            let out = engine
                .generate(request(t, &committed, max_new, cap))
                .await
                .unwrap();
            committed.extend_from_slice(&out.tokens);
            let done = out.finish.ends_trajectory();
            segments.push(out);
            if done {
                return segments;
            }
            assert!(segments.len() < 100_000, "trajectory never ended");
        }
    }

    fn lengths(engine: &SimEngine, n: u32) -> Vec<u32> {
        let mut v: Vec<u32> = (0..n)
            .map(|i| engine.target_length(&traj(&format!("p{i}"), i % 7)))
            .collect();
        v.sort_unstable();
        v
    }

    fn quantile(sorted: &[u32], q: f64) -> f64 {
        f64::from(sorted[((sorted.len() - 1) as f64 * q).round() as usize])
    }

    #[test]
    fn log_normal_shape_matches_theory() {
        let (mu, sigma) = (5.0f64, 1.0f64);
        let engine = fast(
            LengthDistribution::LogNormal {
                mu,
                sigma,
                cap: 1_000_000,
            },
            7,
        );
        let v = lengths(&engine, 20_000);
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let want_median = mu.exp(); // ≈ 148
        let want_mean = (mu + sigma * sigma / 2.0).exp(); // ≈ 245
        let want_p90 = (mu + 1.281_551_6 * sigma).exp(); // ≈ 535
        let rel = |got: f64, want: f64| (got - want).abs() / want;
        assert!(
            rel(quantile(&v, 0.5), want_median) < 0.05,
            "median {}",
            quantile(&v, 0.5)
        );
        assert!(rel(mean, want_mean) < 0.05, "mean {mean} want {want_mean}");
        assert!(
            rel(quantile(&v, 0.9), want_p90) < 0.07,
            "p90 {}",
            quantile(&v, 0.9)
        );
        // A long tail: the longest is many times the median.
        assert!(f64::from(*v.last().unwrap()) > 20.0 * want_median);
    }

    #[test]
    fn log_normal_cap_is_respected() {
        let cap = 300;
        let engine = fast(
            LengthDistribution::LogNormal {
                mu: 5.0,
                sigma: 1.0,
                cap,
            },
            11,
        );
        let v = lengths(&engine, 20_000);
        assert!(v.iter().all(|&x| (1..=cap).contains(&x)));
        // P(X > 300) = 1 − Φ((ln 300 − 5) / 1) ≈ 0.241: that mass piles up at the cap.
        let at_cap = v.iter().filter(|&&x| x == cap).count() as f64 / v.len() as f64;
        assert!((at_cap - 0.241).abs() < 0.02, "fraction at cap {at_cap}");
    }

    #[test]
    fn uniform_and_fixed() {
        let engine = fast(LengthDistribution::Uniform { lo: 10, hi: 20 }, 1);
        let v = lengths(&engine, 5_000);
        assert_eq!(
            (v[0], *v.last().unwrap()),
            (10, 20),
            "both ends reached, nothing outside"
        );
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        assert!((mean - 15.0).abs() < 0.3, "mean {mean}");
        let engine = fast(LengthDistribution::Fixed { tokens: 42 }, 1);
        assert!(lengths(&engine, 100).iter().all(|&x| x == 42));
    }

    #[test]
    fn invalid_configs_are_rejected() {
        for lengths in [
            LengthDistribution::Fixed { tokens: 0 },
            LengthDistribution::Uniform { lo: 0, hi: 3 },
            LengthDistribution::Uniform { lo: 5, hi: 3 },
            LengthDistribution::LogNormal {
                mu: 1.0,
                sigma: -1.0,
                cap: 10,
            },
            LengthDistribution::LogNormal {
                mu: f64::NAN,
                sigma: 1.0,
                cap: 10,
            },
            LengthDistribution::LogNormal {
                mu: 1.0,
                sigma: 1.0,
                cap: 0,
            },
        ] {
            let err = SimEngine::new(SimConfig {
                lengths: lengths.clone(),
                ..SimConfig::default()
            });
            assert!(
                matches!(err, Err(EngineError::Config(_))),
                "{lengths:?} accepted"
            );
        }
        let bad = [
            SimConfig {
                slots: 0,
                ..SimConfig::default()
            },
            SimConfig {
                decode_tokens_per_s: -1.0,
                ..SimConfig::default()
            },
            SimConfig {
                prefill_tokens_per_s: f64::INFINITY,
                ..SimConfig::default()
            },
            SimConfig {
                vocab_size: 10,
                eos_token_id: 10,
                ..SimConfig::default()
            },
        ];
        for config in bad {
            assert!(
                SimEngine::new(config.clone()).is_err(),
                "{config:?} accepted"
            );
        }
        // The TOML/JSON form is tagged by `kind`.
        let parsed: LengthDistribution =
            serde_json::from_str(r#"{"kind":"uniform","lo":1,"hi":2}"#).unwrap();
        assert_eq!(parsed, LengthDistribution::Uniform { lo: 1, hi: 2 });
    }

    #[tokio::test]
    async fn deterministic_per_seed_and_trajectory() {
        let dist = LengthDistribution::LogNormal {
            mu: 3.0,
            sigma: 1.0,
            cap: 500,
        };
        let (a, b, c) = (fast(dist.clone(), 5), fast(dist.clone(), 5), fast(dist, 6));
        let ids: Vec<_> = (0..50).map(|i| traj("prompt", i)).collect();
        let la: Vec<_> = ids.iter().map(|t| a.target_length(t)).collect();
        let lb: Vec<_> = ids.iter().map(|t| b.target_length(t)).collect();
        let lc: Vec<_> = ids.iter().map(|t| c.target_length(t)).collect();
        assert_eq!(la, lb);
        assert_ne!(la, lc, "another seed gives another workload");
        let t = traj("prompt", 3);
        let (sa, sb) = (
            run_to_end(&a, &t, 8, 1000).await,
            run_to_end(&b, &t, 8, 1000).await,
        );
        assert_eq!(sa, sb);
        assert_eq!(
            sa[0].version, 3,
            "the sim generates with the version asked for"
        );
    }

    #[tokio::test]
    async fn segments_sum_to_target_and_resume_is_seamless() {
        let engine = fast(LengthDistribution::Uniform { lo: 1, hi: 200 }, 9);
        for i in 0..40 {
            let t = traj("q", i);
            let target = engine.target_length(&t);
            let segments = run_to_end(&engine, &t, 7, 10_000).await;
            let total: usize = segments.iter().map(|s| s.tokens.len()).sum();
            assert_eq!(total, target as usize, "{t}");
            let (last, rest) = segments.split_last().unwrap();
            assert_eq!(last.finish, FinishReason::Eos);
            assert!(
                rest.iter()
                    .all(|s| s.finish == FinishReason::None && s.tokens.len() == 7)
            );
            let tokens: Vec<u32> = segments.iter().flat_map(|s| s.tokens.clone()).collect();
            let eos = engine.config().eos_token_id;
            assert_eq!(
                tokens.iter().position(|&x| x == eos),
                Some(tokens.len() - 1)
            );
            assert!(
                segments
                    .iter()
                    .flat_map(|s| &s.logprobs)
                    .all(|lp| (-20.0..=0.0).contains(lp))
            );
            // One big segment yields exactly what the many small ones did.
            let whole = run_to_end(&engine, &t, 10_000, 10_000).await;
            assert_eq!(whole.len(), 1);
            assert_eq!(whole[0].tokens, tokens);
            let lps: Vec<f32> = segments.iter().flat_map(|s| s.logprobs.clone()).collect();
            assert_eq!(whole[0].logprobs, lps);
        }
    }

    #[tokio::test]
    async fn response_cap_finishes_with_length() {
        let engine = fast(LengthDistribution::Fixed { tokens: 100 }, 0);
        let t = traj("long", 0);
        let segments = run_to_end(&engine, &t, 16, 40).await;
        assert_eq!(segments.iter().map(|s| s.tokens.len()).sum::<usize>(), 40);
        assert_eq!(segments.last().unwrap().finish, FinishReason::Length);
        let out = engine.generate(request(&t, &[5; 39], 2, 40)).await;
        assert!(
            matches!(out, Err(EngineError::InvalidRequest(_))),
            "cap overflow is refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_never_exceeds_slots() {
        // Paused time: sleeps complete only when every task is blocked, so all 12 calls are
        // waiting on the semaphore together and the peak is exactly the slot count.
        let engine = Arc::new(
            SimEngine::new(SimConfig {
                slots: 3,
                decode_tokens_per_s: 100.0,
                lengths: LengthDistribution::Fixed { tokens: 1000 },
                ..SimConfig::default()
            })
            .unwrap(),
        );
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    engine
                        .generate(request(&traj("c", i), &[], 10, 1000))
                        .await
                        .unwrap()
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().tokens.len(), 10);
        }
        let stats = engine.stats();
        assert_eq!(stats.peak_in_flight, 3);
        assert_eq!(stats.in_flight, 0);
        assert_eq!((stats.segments, stats.tokens), (12, 120));
        assert_eq!(engine.slots(), 3);
    }

    #[tokio::test]
    async fn byte_level_tokenizer_round_trips() {
        let engine = fast(LengthDistribution::Fixed { tokens: 1 }, 0);
        let text = "2 + 2 = \\boxed{4} ✓";
        let tokens = engine.tokenize(text).await.unwrap();
        assert_eq!(tokens.len(), text.len());
        assert_eq!(engine.detokenize(&tokens).await.unwrap(), text);
        assert_eq!(
            engine.detokenize(&[104, 105, 3000, 33]).await.unwrap(),
            "hi<3000>!"
        );
    }
}
