//! The training objectives: the IcePop + PPO-clip policy loss with the constant C3PO
//! normalizer (DESIGN.md §6.4), and a supervised cross-entropy loss for warm starts.
//!
//! Both work on token-level inputs (one entry per token, struct-of-arrays) and return the
//! loss together with `dL/d logπ_θ(y_t)` for every token: that gradient is what the model's
//! backward pass consumes, so this module never needs to know what the model is.
//!
//! Because the policy loss is normalised by the *constant* token budget Φ and not by the
//! number of tokens in the call, it is additive: the loss and gradients of a step are the sums
//! of those of its micro-batches and ranks. A trainer can therefore compute each micro-batch
//! on its own, accumulate gradients, and all-reduce them with a *sum*, never a mean.

use serde::{Deserialize, Serialize};

/// Which objective the trainer optimises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossMode {
    /// Reinforcement learning: the IcePop-masked PPO-clip loss of [`PolicyLoss`].
    #[default]
    Icepop,
    /// Reinforcement learning with the same PPO-clip loss and no correction for the
    /// training/inference mismatch: every token counts with weight 1, whatever k (vanilla
    /// GRPO, the baseline IcePop is measured against).
    Grpo,
    /// Supervised fine-tuning on reference solutions: [`supervised_loss`].
    Supervised,
}

/// Configuration of the training objective (a table of the trainer's config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Which objective to optimise.
    pub mode: LossMode,
    /// IcePop's lower bound α on k = π_train/π_infer: tokens with k < α are masked out.
    pub icepop_alpha: f64,
    /// IcePop's upper bound β on k: tokens with k > β are masked out.
    pub icepop_beta: f64,
    /// PPO's clip range ε: the ratio r is clipped to [1 − ε, 1 + ε].
    pub clip_epsilon: f64,
    /// C3PO's constant token budget Φ per optimizer step; the policy loss is divided by it,
    /// whatever the number of tokens actually present. It must equal the coordinator's Φ.
    pub token_budget: u64,
    /// Coefficient of the KL penalty toward θ_old (k3 estimator); 0 turns it off.
    pub kl_coef: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            mode: LossMode::Icepop,
            icepop_alpha: 0.5,
            icepop_beta: 5.0,
            clip_epsilon: 0.2,
            // The value of the C3PO paper.
            token_budget: 409_600,
            kl_coef: 0.0,
        }
    }
}

impl LossConfig {
    /// Checks that the values make sense; the error says which field to fix and how.
    pub fn validate(&self) -> Result<(), LossError> {
        let invalid = |msg: String| Err(LossError::InvalidConfig(msg));
        if !self.icepop_alpha.is_finite() || self.icepop_alpha < 0.0 {
            return invalid(format!(
                "icepop_alpha = {} must be a finite number ≥ 0 (default 0.5)",
                self.icepop_alpha
            ));
        }
        if !self.icepop_beta.is_finite() {
            return invalid(format!(
                "icepop_beta = {} must be a finite number (default 5)",
                self.icepop_beta
            ));
        }
        if self.icepop_alpha >= self.icepop_beta {
            return invalid(format!(
                "icepop_alpha = {} must be smaller than icepop_beta = {} (defaults 0.5 and 5)",
                self.icepop_alpha, self.icepop_beta
            ));
        }
        if !(self.clip_epsilon > 0.0 && self.clip_epsilon < 1.0) {
            return invalid(format!(
                "clip_epsilon = {} must lie strictly between 0 and 1 (default 0.2)",
                self.clip_epsilon
            ));
        }
        if self.token_budget == 0 {
            return invalid(
                "token_budget (Φ) must be > 0: set it to the coordinator's tokens per step"
                    .to_string(),
            );
        }
        if !self.kl_coef.is_finite() || self.kl_coef < 0.0 {
            return invalid(format!(
                "kl_coef = {} must be a finite number ≥ 0 (0 turns the KL penalty off)",
                self.kl_coef
            ));
        }
        Ok(())
    }
}

/// What can go wrong computing a loss.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LossError {
    /// The configuration is unusable; the message names the field and the fix.
    #[error("invalid loss config: {0}")]
    InvalidConfig(String),
    /// The per-token input slices do not all have the same length.
    #[error(
        "loss input `{field}` has {actual} entries but `new_logprobs` has {expected}: \
         pass exactly one entry per token"
    )]
    LengthMismatch {
        /// The slice whose length is wrong.
        field: &'static str,
        /// The number of tokens (length of `new_logprobs`).
        expected: usize,
        /// The length of `field`.
        actual: usize,
    },
    /// A trained token carries NaN or an infinity.
    #[error(
        "loss input `{field}`[{index}] is {value}, not a finite number: the log-probs or \
         advantages of a trained token are corrupt (check the model for divergence and the \
         segment for bad engine log-probs)"
    )]
    NonFinite {
        /// The slice holding the bad value.
        field: &'static str,
        /// The token index.
        index: usize,
        /// The value found.
        value: f32,
    },
    /// The supervised loss was asked to divide by zero tokens.
    #[error(
        "supervised loss normalizer must be > 0: pass the number of trained tokens in the step"
    )]
    ZeroNormalizer,
}

/// Per-token inputs of the policy loss, one entry per token of a micro-batch.
///
/// The caller broadcasts each trajectory's advantage over its tokens and flattens the
/// trajectories; positions that are not trained (the prompt, a cut group's masked tail) have
/// `trained = false` and are ignored entirely (their values need not even be finite).
#[derive(Debug, Clone, Copy)]
pub struct PolicyTokens<'a> {
    /// logπ_θ(y_t) under the weights being trained (the values the gradient is taken against).
    pub new_logprobs: &'a [f32],
    /// logπ_train(y_t | θ_old): recomputed by the trainer under the weights before this step.
    pub old_logprobs: &'a [f32],
    /// logπ_infer(y_t): the inference engine's log-prob, stored in the segment.
    pub infer_logprobs: &'a [f32],
    /// The advantage A_i of the token's trajectory.
    pub advantages: &'a [f32],
    /// Whether the token is trained; `false` tokens contribute nothing.
    pub trained: &'a [bool],
}

impl PolicyTokens<'_> {
    /// Checks lengths and the finiteness of every trained token's values; returns the length.
    fn validate(&self) -> Result<usize, LossError> {
        let n = self.new_logprobs.len();
        check_len("old_logprobs", n, self.old_logprobs.len())?;
        check_len("infer_logprobs", n, self.infer_logprobs.len())?;
        check_len("advantages", n, self.advantages.len())?;
        check_len("trained", n, self.trained.len())?;
        for (index, _) in self.trained.iter().enumerate().filter(|(_, t)| **t) {
            check_finite("new_logprobs", index, self.new_logprobs[index])?;
            check_finite("old_logprobs", index, self.old_logprobs[index])?;
            check_finite("infer_logprobs", index, self.infer_logprobs[index])?;
            check_finite("advantages", index, self.advantages[index])?;
        }
        Ok(n)
    }
}

/// Per-token inputs of the supervised loss.
#[derive(Debug, Clone, Copy)]
pub struct SupervisedTokens<'a> {
    /// logπ_θ(y_t) of the reference token under the weights being trained.
    pub new_logprobs: &'a [f32],
    /// Whether the token is trained (reference answer tokens: yes; prompt tokens: no).
    pub trained: &'a [bool],
}

/// Statistics of one loss computation. All fields are sums or counts, so the statistics of
/// micro-batches and ranks [`merge`](LossStats::merge) into those of the step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossStats {
    /// The loss contribution (already divided by the normalizer, so contributions add up).
    pub loss: f64,
    /// Tokens with `trained = true`.
    pub tokens_trained: u64,
    /// Trained tokens IcePop masked out (k outside [α, β]).
    pub tokens_masked: u64,
    /// Trained tokens whose gradient the PPO clip removed (ratio outside [1 − ε, 1 + ε] in
    /// the direction the advantage pushes it).
    pub tokens_clipped: u64,
    /// Σ |log k| over trained tokens: the training/inference discrepancy.
    pub sum_abs_log_k: f64,
    /// Σ of the k3 KL estimate toward θ_old over trained tokens (0 when the KL is off).
    pub sum_kl: f64,
}

impl LossStats {
    /// Adds another micro-batch's (or rank's) statistics to these.
    pub fn merge(&mut self, other: &LossStats) {
        self.loss += other.loss;
        self.tokens_trained += other.tokens_trained;
        self.tokens_masked += other.tokens_masked;
        self.tokens_clipped += other.tokens_clipped;
        self.sum_abs_log_k += other.sum_abs_log_k;
        self.sum_kl += other.sum_kl;
    }

    /// The fraction of trained tokens IcePop masked out (0 when nothing was trained).
    pub fn masked_fraction(&self) -> f64 {
        ratio(self.tokens_masked as f64, self.tokens_trained)
    }

    /// The fraction of trained tokens whose gradient the PPO clip removed.
    pub fn clip_fraction(&self) -> f64 {
        ratio(self.tokens_clipped as f64, self.tokens_trained)
    }

    /// The mean |log k| over trained tokens.
    pub fn mean_abs_log_k(&self) -> f64 {
        ratio(self.sum_abs_log_k, self.tokens_trained)
    }

    /// The mean k3 KL estimate toward θ_old over trained tokens.
    pub fn mean_kl(&self) -> f64 {
        ratio(self.sum_kl, self.tokens_trained)
    }
}

/// A loss value, its gradient with respect to each token's new log-prob, and statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput {
    /// `dL/d new_logprobs[t]` for every token (0 for tokens that are not trained).
    pub grad: Vec<f32>,
    /// The loss (in `stats.loss`) and the step statistics.
    pub stats: LossStats,
}

impl LossOutput {
    /// The loss value.
    pub fn loss(&self) -> f64 {
        self.stats.loss
    }
}

/// The IcePop + PPO-clip policy loss of DESIGN.md §6.4, with a validated configuration:
///
/// ```text
/// k_t = exp(logπ_train − logπ_infer)     M(k) = k if α ≤ k ≤ β else 0
/// r_t = exp(logπ_θ − logπ_train)
/// L   = −(1/Φ) Σ_t M(k_t) · min(r_t·A, clip(r_t, 1−ε, 1+ε)·A)  [+ (c/Φ) Σ_t KL3_t]
/// ```
#[derive(Debug, Clone)]
pub struct PolicyLoss {
    config: LossConfig,
    /// log α and log β rounded to f32, the precision of the log-prob inputs: the mask is
    /// decided in log space, so a k whose log is exactly log α (as an f32) is inside.
    log_alpha: f64,
    log_beta: f64,
}

impl PolicyLoss {
    /// Validates the configuration and builds the loss.
    pub fn new(config: LossConfig) -> Result<Self, LossError> {
        config.validate()?;
        let log_alpha = f64::from(config.icepop_alpha.ln() as f32);
        let log_beta = f64::from(config.icepop_beta.ln() as f32);
        Ok(Self {
            config,
            log_alpha,
            log_beta,
        })
    }

    /// The configuration this loss was built from.
    pub fn config(&self) -> &LossConfig {
        &self.config
    }

    /// IcePop's mask weight M(k) for a token with log k = `log_k`: k inside [α, β]
    /// (inclusive), 0 outside; always 1 in [`LossMode::Grpo`].
    pub fn icepop_weight(&self, log_k: f64) -> f64 {
        if self.config.mode == LossMode::Grpo {
            1.0
        } else if log_k >= self.log_alpha && log_k <= self.log_beta {
            log_k.exp()
        } else {
            0.0
        }
    }

    /// Computes the loss and its per-token gradient, allocating the gradient.
    pub fn compute(&self, tokens: &PolicyTokens<'_>) -> Result<LossOutput, LossError> {
        let mut grad = vec![0.0; tokens.new_logprobs.len()];
        let stats = self.compute_into(tokens, &mut grad)?;
        Ok(LossOutput { grad, stats })
    }

    /// Computes the loss, writing `dL/d new_logprobs[t]` into `grad` (overwritten, 0 for
    /// untrained tokens), so a training loop can reuse one buffer.
    pub fn compute_into(
        &self,
        tokens: &PolicyTokens<'_>,
        grad: &mut [f32],
    ) -> Result<LossStats, LossError> {
        let n = tokens.validate()?;
        check_len("grad", n, grad.len())?;
        let phi = self.config.token_budget as f64;
        let eps = self.config.clip_epsilon;
        let (lower, upper) = (1.0 - eps, 1.0 + eps);
        let kl_coef = self.config.kl_coef;

        let mut stats = LossStats::default();
        for (t, out) in grad.iter_mut().enumerate() {
            *out = 0.0;
            if !tokens.trained[t] {
                continue;
            }
            stats.tokens_trained += 1;
            let new = f64::from(tokens.new_logprobs[t]);
            let old = f64::from(tokens.old_logprobs[t]);
            let infer = f64::from(tokens.infer_logprobs[t]);
            let advantage = f64::from(tokens.advantages[t]);

            // IcePop: the training/inference discrepancy k decides whether the token counts.
            let log_k = old - infer;
            stats.sum_abs_log_k += log_k.abs();
            let weight = self.icepop_weight(log_k);
            let mut g = 0.0;
            if weight == 0.0 {
                stats.tokens_masked += 1;
            } else {
                let r = (new - old).exp();
                // min(r·A, clip(r)·A) picks the clipped term exactly when r has left the
                // trust region in the direction the advantage pushes it; there the objective
                // is flat in r and the token gives no gradient.
                let clipped = (advantage > 0.0 && r > upper) || (advantage < 0.0 && r < lower);
                if clipped {
                    stats.tokens_clipped += 1;
                    stats.loss -= weight * r.clamp(lower, upper) * advantage / phi;
                } else {
                    stats.loss -= weight * r * advantage / phi;
                    // d(r)/d(new) = r.
                    g -= weight * advantage * r / phi;
                }
            }
            if kl_coef > 0.0 {
                // k3 estimator of KL(π_θ ‖ π_old): e^d − d − 1 with d = logπ_old − logπ_θ;
                // unbiased, always ≥ 0, and its gradient w.r.t. logπ_θ is 1 − e^d.
                let d = old - new;
                let kl = d.exp() - d - 1.0;
                stats.sum_kl += kl;
                stats.loss += kl_coef * kl / phi;
                g += kl_coef * (1.0 - d.exp()) / phi;
            }
            *out = g as f32;
        }
        Ok(stats)
    }
}

/// The supervised (cross-entropy) loss `L = −(1/N) Σ_t logπ_θ(y_t)` over trained tokens, for
/// warm-starting a policy from reference solutions.
///
/// `normalizer` is N: pass the number of trained tokens in the whole step (all
/// micro-batches, all ranks) so that the per-call losses and gradients sum to the step's mean.
pub fn supervised_loss(
    tokens: &SupervisedTokens<'_>,
    normalizer: u64,
) -> Result<LossOutput, LossError> {
    if normalizer == 0 {
        return Err(LossError::ZeroNormalizer);
    }
    let n = tokens.new_logprobs.len();
    check_len("trained", n, tokens.trained.len())?;
    let scale = 1.0 / normalizer as f64;
    let mut grad = vec![0.0f32; n];
    let mut stats = LossStats::default();
    for t in (0..n).filter(|&t| tokens.trained[t]) {
        let lp = tokens.new_logprobs[t];
        check_finite("new_logprobs", t, lp)?;
        stats.tokens_trained += 1;
        stats.loss -= f64::from(lp) * scale;
        grad[t] = (-scale) as f32;
    }
    Ok(LossOutput { grad, stats })
}

fn check_len(field: &'static str, expected: usize, actual: usize) -> Result<(), LossError> {
    if expected == actual {
        Ok(())
    } else {
        Err(LossError::LengthMismatch {
            field,
            expected,
            actual,
        })
    }
}

fn check_finite(field: &'static str, index: usize, value: f32) -> Result<(), LossError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(LossError::NonFinite {
            field,
            index,
            value,
        })
    }
}

fn ratio(numerator: f64, denominator: u64) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator / denominator as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token's inputs, for building small hand-computed batches.
    #[derive(Debug, Clone, Copy)]
    struct Tok {
        new: f32,
        old: f32,
        infer: f32,
        adv: f32,
        trained: bool,
    }

    /// A trained token with k = 1 (old = infer) and ratio r (new = old + ln r).
    fn tok_r(r: f64, adv: f32) -> Tok {
        let old = -1.0f32;
        Tok {
            new: (f64::from(old) + r.ln()) as f32,
            old,
            infer: old,
            adv,
            trained: true,
        }
    }

    struct Batch {
        new: Vec<f32>,
        old: Vec<f32>,
        infer: Vec<f32>,
        adv: Vec<f32>,
        trained: Vec<bool>,
    }

    impl Batch {
        fn of(toks: &[Tok]) -> Self {
            Self {
                new: toks.iter().map(|t| t.new).collect(),
                old: toks.iter().map(|t| t.old).collect(),
                infer: toks.iter().map(|t| t.infer).collect(),
                adv: toks.iter().map(|t| t.adv).collect(),
                trained: toks.iter().map(|t| t.trained).collect(),
            }
        }

        fn tokens(&self) -> PolicyTokens<'_> {
            PolicyTokens {
                new_logprobs: &self.new,
                old_logprobs: &self.old,
                infer_logprobs: &self.infer,
                advantages: &self.adv,
                trained: &self.trained,
            }
        }
    }

    fn loss_with(phi: u64, kl_coef: f64) -> PolicyLoss {
        PolicyLoss::new(LossConfig {
            token_budget: phi,
            kl_coef,
            ..LossConfig::default()
        })
        .unwrap()
    }

    fn run(loss: &PolicyLoss, toks: &[Tok]) -> LossOutput {
        loss.compute(&Batch::of(toks).tokens()).unwrap()
    }

    fn assert_close(actual: f64, expected: f64, tol: f64) {
        assert!(
            (actual - expected).abs() <= tol * (1.0 + expected.abs()),
            "{actual} != {expected} (tol {tol})"
        );
    }

    // ---- the PPO clip -------------------------------------------------------------------

    #[test]
    fn ratio_above_upper_bound_with_positive_advantage_is_clipped() {
        // r = 1.5 > 1.2, A = 2: min(1.5·2, 1.2·2) = 2.4 → L = −2.4, flat in r.
        let out = run(&loss_with(1, 0.0), &[tok_r(1.5, 2.0)]);
        assert_close(out.loss(), -2.4, 1e-6);
        assert_eq!(out.grad, vec![0.0]);
        assert_eq!(out.stats.tokens_clipped, 1);
    }

    #[test]
    fn ratio_above_upper_bound_with_negative_advantage_is_not_clipped() {
        // r = 1.5, A = −2: min(−3, −2.4) = −3 → L = 3; dL/dnew = −A·r = 3.
        let out = run(&loss_with(1, 0.0), &[tok_r(1.5, -2.0)]);
        assert_close(out.loss(), 3.0, 1e-6);
        assert_close(f64::from(out.grad[0]), 3.0, 1e-6);
        assert_eq!(out.stats.tokens_clipped, 0);
    }

    #[test]
    fn ratio_below_lower_bound_with_negative_advantage_is_clipped() {
        // r = 0.5 < 0.8, A = −2: min(−1, −1.6) = −1.6 → L = 1.6, flat in r.
        let out = run(&loss_with(1, 0.0), &[tok_r(0.5, -2.0)]);
        assert_close(out.loss(), 1.6, 1e-6);
        assert_eq!(out.grad, vec![0.0]);
        assert_eq!(out.stats.tokens_clipped, 1);
    }

    #[test]
    fn ratio_below_lower_bound_with_positive_advantage_is_not_clipped() {
        // r = 0.5, A = 2: min(1, 1.6) = 1 → L = −1; dL/dnew = −A·r = −1.
        let out = run(&loss_with(1, 0.0), &[tok_r(0.5, 2.0)]);
        assert_close(out.loss(), -1.0, 1e-6);
        assert_close(f64::from(out.grad[0]), -1.0, 1e-6);
        assert_eq!(out.stats.tokens_clipped, 0);
    }

    #[test]
    fn ratio_inside_the_trust_region_is_the_plain_surrogate() {
        // r = 1.1, A = 1 and r = 0.9, A = −0.5, Φ = 4:
        // L = −(1.1 − 0.45)/4 = −0.1625; grads −1.1/4 and 0.45/4.
        let out = run(&loss_with(4, 0.0), &[tok_r(1.1, 1.0), tok_r(0.9, -0.5)]);
        assert_close(out.loss(), -0.1625, 1e-6);
        assert_close(f64::from(out.grad[0]), -0.275, 1e-6);
        assert_close(f64::from(out.grad[1]), 0.1125, 1e-6);
        assert_eq!(out.stats.clip_fraction(), 0.0);
    }

    #[test]
    fn clip_fraction_counts_clipped_tokens_among_trained_ones() {
        let toks = [
            tok_r(1.5, 2.0),
            tok_r(1.0, 1.0),
            tok_r(0.5, -1.0),
            tok_r(0.5, 1.0),
        ];
        let out = run(&loss_with(10, 0.0), &toks);
        assert_eq!(out.stats.tokens_clipped, 2);
        assert_eq!(out.stats.clip_fraction(), 0.5);
    }

    // ---- the IcePop mask ----------------------------------------------------------------

    /// A trained token with r = 1 whose log k = old − infer is exactly `log_k_f32`.
    fn tok_log_k(log_k: f32, adv: f32) -> Tok {
        // infer + log k must stay a valid log-prob (≤ 0) and the difference exact in f32:
        // with old = 0 or infer = 0 it is.
        let (old, infer) = if log_k <= 0.0 {
            (log_k, 0.0)
        } else {
            (0.0, -log_k)
        };
        Tok {
            new: old,
            old,
            infer,
            adv,
            trained: true,
        }
    }

    #[test]
    fn k_exactly_at_alpha_and_beta_is_kept() {
        let loss = loss_with(1, 0.0);
        let at_alpha = 0.5f64.ln() as f32;
        let at_beta = 5.0f64.ln() as f32;
        let out = run(&loss, &[tok_log_k(at_alpha, 1.0), tok_log_k(at_beta, 1.0)]);
        assert_eq!(out.stats.tokens_masked, 0);
        // r = 1, A = 1: L = −(k_α + k_β) ≈ −5.5, and each gradient is −k.
        assert_close(out.loss(), -5.5, 1e-6);
        assert_close(f64::from(out.grad[0]), -0.5, 1e-6);
        assert_close(f64::from(out.grad[1]), -5.0, 1e-6);
    }

    #[test]
    fn grpo_weighs_every_token_one_whatever_k() {
        let grpo = PolicyLoss::new(LossConfig {
            mode: LossMode::Grpo,
            token_budget: 1,
            ..LossConfig::default()
        })
        .unwrap();
        // k = 2 (IcePop: weight 2) and k = 10 (IcePop: masked); r = 1, A = 1.
        let toks = [tok_log_k(2.0f32.ln(), 1.0), tok_log_k(10.0f32.ln(), 1.0)];
        let out = run(&grpo, &toks);
        assert_eq!(out.stats.tokens_masked, 0);
        assert_close(out.loss(), -2.0, 1e-6);
        assert_eq!(out.grad, vec![-1.0, -1.0]);
        let icepop = run(&loss_with(1, 0.0), &toks);
        assert_eq!(icepop.stats.tokens_masked, 1);
        assert_close(f64::from(icepop.grad[0]), -2.0, 1e-6);
        // |log k| is measured either way.
        assert_eq!(out.stats.sum_abs_log_k, icepop.stats.sum_abs_log_k);
    }

    #[test]
    fn k_just_outside_the_bounds_is_masked() {
        let loss = loss_with(1, 0.0);
        let below_alpha = (0.5f64.ln() as f32).next_down();
        let above_beta = (5.0f64.ln() as f32).next_up();
        let out = run(
            &loss,
            &[tok_log_k(below_alpha, 1.0), tok_log_k(above_beta, -1.0)],
        );
        assert_eq!(out.stats.tokens_masked, 2);
        assert_eq!(out.stats.masked_fraction(), 1.0);
        assert_eq!(out.loss(), 0.0);
        assert_eq!(out.grad, vec![0.0, 0.0]);
    }

    #[test]
    fn k_is_computed_from_log_probs_and_weights_the_surrogate() {
        // Token 0: old = −1.0, infer = −1.0 − ln 2 → k = 2, kept, r = 1.1, A = 1:
        //   contribution −2·1.1 = −2.2, gradient −2·1·1.1 = −2.2.
        // Token 1: old = −2, infer = −1 → k = e^−1 ≈ 0.368 < 0.5, masked.
        // Token 2: old = −0.5, infer = −0.5 − ln 6 → k = 6 > 5, masked.
        // Φ = 2.
        let toks = [
            Tok {
                new: (-1.0 + 1.1f64.ln()) as f32,
                old: -1.0,
                infer: (-1.0 - 2.0f64.ln()) as f32,
                adv: 1.0,
                trained: true,
            },
            Tok {
                new: -2.0,
                old: -2.0,
                infer: -1.0,
                adv: 1.0,
                trained: true,
            },
            Tok {
                new: -0.5,
                old: -0.5,
                infer: (-0.5 - 6.0f64.ln()) as f32,
                adv: -3.0,
                trained: true,
            },
        ];
        let out = run(&loss_with(2, 0.0), &toks);
        assert_close(out.loss(), -1.1, 1e-6);
        assert_close(f64::from(out.grad[0]), -1.1, 1e-6);
        assert_eq!(&out.grad[1..], &[0.0, 0.0]);
        assert_eq!(out.stats.tokens_masked, 2);
        assert_close(out.stats.masked_fraction(), 2.0 / 3.0, 1e-12);
        // mean |log k| = (ln 2 + 1 + ln 6) / 3.
        let expected = (2.0f64.ln() + 1.0 + 6.0f64.ln()) / 3.0;
        assert_close(out.stats.mean_abs_log_k(), expected, 1e-6);
    }

    #[test]
    fn masked_tokens_still_count_as_trained() {
        let out = run(&loss_with(1, 0.0), &[tok_log_k(-3.0, 1.0)]);
        assert_eq!(out.stats.tokens_trained, 1);
        assert_eq!(out.stats.tokens_masked, 1);
        assert_close(out.stats.mean_abs_log_k(), 3.0, 1e-12);
    }

    // ---- the constant normalizer (C3PO) -------------------------------------------------

    fn sample_tokens() -> Vec<Tok> {
        vec![
            tok_r(1.1, 1.0),
            tok_r(0.95, -0.7),
            tok_r(1.3, 0.4),
            tok_r(1.05, -1.2),
        ]
    }

    #[test]
    fn doubling_the_tokens_with_phi_fixed_doubles_the_loss() {
        let loss = loss_with(1000, 0.0);
        let once = run(&loss, &sample_tokens());
        let twice_toks: Vec<Tok> = sample_tokens().into_iter().cycle().take(8).collect();
        let twice = run(&loss, &twice_toks);
        assert_close(twice.loss(), 2.0 * once.loss(), 1e-12);
        // The per-token gradient does not depend on how many tokens there are.
        assert_eq!(&twice.grad[..4], &once.grad[..]);
        assert_eq!(&twice.grad[4..], &once.grad[..]);
    }

    #[test]
    fn changing_phi_scales_loss_and_gradient_inversely() {
        let small = run(&loss_with(100, 0.0), &sample_tokens());
        let large = run(&loss_with(300, 0.0), &sample_tokens());
        assert_close(small.loss(), 3.0 * large.loss(), 1e-12);
        for (s, l) in small.grad.iter().zip(&large.grad) {
            assert_close(f64::from(*s), 3.0 * f64::from(*l), 1e-6);
        }
    }

    #[test]
    fn micro_batches_add_up_to_the_whole_batch() {
        let loss = loss_with(64, 0.1);
        let toks = sample_tokens();
        let whole = run(&loss, &toks);
        let mut merged = run(&loss, &toks[..1]).stats;
        merged.merge(&run(&loss, &toks[1..]).stats);
        assert_close(merged.loss, whole.loss(), 1e-12);
        assert_eq!(merged.tokens_trained, whole.stats.tokens_trained);
        assert_eq!(merged.tokens_clipped, whole.stats.tokens_clipped);
        assert_close(merged.sum_kl, whole.stats.sum_kl, 1e-12);
    }

    // ---- masked tails -------------------------------------------------------------------

    #[test]
    fn untrained_tail_tokens_contribute_nothing() {
        let loss = loss_with(16, 0.05);
        let head = sample_tokens();
        let prefix = run(&loss, &head);
        // The same head followed by a cut tail with extreme (even non-finite) values.
        let mut toks = head.clone();
        for (new, adv) in [(-0.01, 50.0), (f32::NAN, f32::INFINITY), (-30.0, -9.0)] {
            toks.push(Tok {
                new,
                old: -5.0,
                infer: -0.001,
                adv,
                trained: false,
            });
        }
        let out = run(&loss, &toks);
        assert_eq!(out.loss(), prefix.loss());
        assert_eq!(&out.grad[..head.len()], &prefix.grad[..]);
        assert_eq!(&out.grad[head.len()..], &[0.0, 0.0, 0.0]);
        assert_eq!(out.stats, prefix.stats);
        assert_eq!(out.stats.tokens_trained, 4);
    }

    // ---- gradients ----------------------------------------------------------------------

    /// Central finite difference of the loss w.r.t. `new_logprobs[t]`, using the step sizes
    /// actually representable in f32.
    fn finite_difference(loss: &PolicyLoss, toks: &[Tok], t: usize) -> f64 {
        let h = 1e-3f32;
        let mut plus = toks.to_vec();
        plus[t].new += h;
        let mut minus = toks.to_vec();
        minus[t].new -= h;
        let step = f64::from(plus[t].new) - f64::from(minus[t].new);
        (run(loss, &plus).loss() - run(loss, &minus).loss()) / step
    }

    fn gradient_check(loss: &PolicyLoss, toks: &[Tok]) {
        let out = run(loss, toks);
        for t in 0..toks.len() {
            let fd = finite_difference(loss, toks, t);
            let analytic = f64::from(out.grad[t]);
            assert!(
                (fd - analytic).abs() <= 1e-5 + 1e-3 * fd.abs(),
                "token {t}: analytic {analytic} vs finite difference {fd}"
            );
        }
    }

    /// Tokens at varied ratios (away from the clip kinks at 0.8 and 1.2), IcePop weights and
    /// advantages of both signs, including clipped, masked and untrained ones.
    fn varied_tokens() -> Vec<Tok> {
        let mut toks = Vec::new();
        for (i, (r, adv)) in [
            (0.9, 1.3),
            (1.1, -0.6),
            (0.6, 0.8),   // below the region, A > 0: active
            (1.5, -1.1),  // above the region, A < 0: active
            (1.6, 2.0),   // clipped: flat
            (0.5, -0.4),  // clipped: flat
            (1.02, 0.0),  // zero advantage
            (0.97, 0.25), // near 1
        ]
        .into_iter()
        .enumerate()
        {
            // Vary k over kept values (and one masked token below).
            let old = -0.3 - 0.4 * i as f64;
            let k = 0.6 + 0.5 * i as f64;
            toks.push(Tok {
                new: (old + f64::ln(r)) as f32,
                old: old as f32,
                infer: (old - k.ln()) as f32,
                adv: adv as f32,
                trained: true,
            });
        }
        toks.push(Tok {
            new: -1.0,
            old: -1.2,
            infer: -4.0, // k = e^2.8 ≈ 16: masked
            adv: 1.0,
            trained: true,
        });
        toks.push(Tok {
            new: -0.7,
            old: -0.9,
            infer: -0.9,
            adv: 1.0,
            trained: false,
        });
        toks
    }

    #[test]
    fn gradient_matches_finite_differences() {
        gradient_check(&loss_with(7, 0.0), &varied_tokens());
    }

    #[test]
    fn gradient_matches_finite_differences_with_the_kl_penalty() {
        gradient_check(&loss_with(7, 0.3), &varied_tokens());
    }

    #[test]
    fn gradient_is_zero_where_the_clip_is_flat() {
        let loss = loss_with(3, 0.0);
        let toks = varied_tokens();
        let out = run(&loss, &toks);
        for t in [4, 5, 8, 9] {
            assert_eq!(out.grad[t], 0.0, "token {t}");
            assert_eq!(finite_difference(&loss, &toks, t), 0.0, "token {t}");
        }
        assert_eq!(out.stats.tokens_clipped, 2);
        assert_eq!(out.stats.tokens_masked, 1);
        assert_eq!(out.stats.tokens_trained, 9);
    }

    /// A random trained token whose ratio and k stay away from the clip kinks (0.8, 1.2)
    /// and the mask bounds (0.5, 5), where the loss is not differentiable.
    fn smooth_token() -> impl proptest::strategy::Strategy<Value = Tok> {
        use proptest::prelude::*;
        let log_r = prop_oneof![-1.0f64..-0.25, -0.2..0.16, 0.21..1.0];
        let log_k = prop_oneof![-2.0f64..-0.72, -0.67..1.58, 1.64..3.0];
        (-6.0f64..-0.1, log_r, log_k, -3.0f32..3.0).prop_map(|(old, log_r, log_k, adv)| Tok {
            new: (old + log_r) as f32,
            old: old as f32,
            infer: (old - log_k) as f32,
            adv,
            trained: true,
        })
    }

    proptest::proptest! {
        #[test]
        fn gradient_matches_finite_differences_at_random_points(
            toks in proptest::collection::vec(smooth_token(), 1..12),
            kl in proptest::prop_oneof![proptest::strategy::Just(0.0f64), 0.01f64..1.0],
            phi in 1u64..1000,
        ) {
            gradient_check(&loss_with(phi, kl), &toks);
        }
    }

    // ---- the KL penalty -----------------------------------------------------------------

    #[test]
    fn kl_penalty_is_zero_at_theta_old_and_positive_away_from_it() {
        let loss = loss_with(1, 0.5);
        // new == old: r = 1, KL = 0, no KL gradient; only the surrogate −A.
        let at_old = run(&loss, &[tok_r(1.0, 1.0)]);
        assert_eq!(at_old.stats.sum_kl, 0.0);
        assert_close(at_old.loss(), -1.0, 1e-9);
        // r = 1.1, A = 0: KL3 = e^{−ln 1.1} + ln 1.1 − 1; loss = 0.5·KL3; grad = 0.5(1 − 1/1.1).
        let away = run(&loss, &[tok_r(1.1, 0.0)]);
        let kl = 1.0 / 1.1 + 1.1f64.ln() - 1.0;
        assert_close(away.stats.sum_kl, kl, 1e-6);
        assert_close(away.loss(), 0.5 * kl, 1e-6);
        assert_close(f64::from(away.grad[0]), 0.5 * (1.0 - 1.0 / 1.1), 1e-6);
        assert_close(away.stats.mean_kl(), kl, 1e-6);
    }

    #[test]
    fn kl_off_by_default() {
        let loss = PolicyLoss::new(LossConfig::default()).unwrap();
        let out = run(&loss, &[tok_r(1.1, 0.0)]);
        assert_eq!(out.stats.sum_kl, 0.0);
        assert_eq!(out.loss(), 0.0);
        assert_eq!(out.grad, vec![0.0]);
    }

    // ---- input validation ---------------------------------------------------------------

    #[test]
    fn mismatched_lengths_are_rejected() {
        let b = Batch::of(&sample_tokens());
        let short = [true; 3];
        let tokens = PolicyTokens {
            trained: &short,
            ..b.tokens()
        };
        let err = loss_with(1, 0.0).compute(&tokens).unwrap_err();
        assert_eq!(
            err,
            LossError::LengthMismatch {
                field: "trained",
                expected: 4,
                actual: 3
            }
        );
        let mut grad = vec![0.0; 2];
        let err = loss_with(1, 0.0)
            .compute_into(&b.tokens(), &mut grad)
            .unwrap_err();
        assert!(matches!(
            err,
            LossError::LengthMismatch { field: "grad", .. }
        ));
    }

    #[test]
    fn non_finite_trained_values_are_rejected() {
        let mut toks = sample_tokens();
        toks[2].infer = f32::NEG_INFINITY;
        let err = loss_with(1, 0.0)
            .compute(&Batch::of(&toks).tokens())
            .unwrap_err();
        assert!(matches!(
            err,
            LossError::NonFinite {
                field: "infer_logprobs",
                index: 2,
                ..
            }
        ));
        assert!(err.to_string().contains("infer_logprobs"));
    }

    // ---- configuration ------------------------------------------------------------------

    #[test]
    fn defaults_are_the_papers() {
        let c = LossConfig::default();
        assert_eq!(
            (c.icepop_alpha, c.icepop_beta, c.clip_epsilon, c.kl_coef),
            (0.5, 5.0, 0.2, 0.0)
        );
        assert_eq!(c.mode, LossMode::Icepop);
        c.validate().unwrap();
    }

    #[test]
    fn config_parses_from_toml_with_defaults() {
        let c: LossConfig =
            toml::from_str("mode = \"supervised\"\ntoken_budget = 4096\nkl_coef = 0.01").unwrap();
        assert_eq!(c.mode, LossMode::Supervised);
        assert_eq!(c.token_budget, 4096);
        assert_eq!(c.kl_coef, 0.01);
        assert_eq!(c.icepop_beta, 5.0);
        assert!(toml::from_str::<LossConfig>("icepop_gamma = 1.0").is_err());
    }

    #[test]
    fn invalid_configs_are_rejected_with_the_field_named() {
        let cases: [(LossConfig, &str); 7] = [
            (
                LossConfig {
                    icepop_alpha: 5.0,
                    icepop_beta: 5.0,
                    ..LossConfig::default()
                },
                "smaller than icepop_beta",
            ),
            (
                LossConfig {
                    icepop_alpha: 2.0,
                    icepop_beta: 1.0,
                    ..LossConfig::default()
                },
                "smaller than icepop_beta",
            ),
            (
                LossConfig {
                    icepop_alpha: -0.1,
                    ..LossConfig::default()
                },
                "icepop_alpha",
            ),
            (
                LossConfig {
                    clip_epsilon: 0.0,
                    ..LossConfig::default()
                },
                "clip_epsilon",
            ),
            (
                LossConfig {
                    clip_epsilon: f64::NAN,
                    ..LossConfig::default()
                },
                "clip_epsilon",
            ),
            (
                LossConfig {
                    token_budget: 0,
                    ..LossConfig::default()
                },
                "token_budget",
            ),
            (
                LossConfig {
                    kl_coef: -1.0,
                    ..LossConfig::default()
                },
                "kl_coef",
            ),
        ];
        for (config, needle) in cases {
            let err = PolicyLoss::new(config.clone()).unwrap_err();
            assert!(
                err.to_string().contains(needle),
                "{config:?}: `{err}` should mention {needle}"
            );
        }
    }

    // ---- the supervised loss ------------------------------------------------------------

    #[test]
    fn supervised_loss_is_the_mean_negative_log_likelihood() {
        let new = [-0.5f32, -2.0, -1.5, -9.0];
        let trained = [true, true, true, false];
        let out = supervised_loss(
            &SupervisedTokens {
                new_logprobs: &new,
                trained: &trained,
            },
            3,
        )
        .unwrap();
        assert_close(out.loss(), 4.0 / 3.0, 1e-9);
        let g = (-1.0f64 / 3.0) as f32;
        assert_eq!(out.grad, vec![g, g, g, 0.0]);
        assert_eq!(out.stats.tokens_trained, 3);
        // Gradient against finite differences of the loss.
        for t in 0..3 {
            let mut plus = new;
            plus[t] += 1e-3;
            let mut minus = new;
            minus[t] -= 1e-3;
            let f = |lp: &[f32]| {
                supervised_loss(
                    &SupervisedTokens {
                        new_logprobs: lp,
                        trained: &trained,
                    },
                    3,
                )
                .unwrap()
                .loss()
            };
            let fd = (f(&plus) - f(&minus)) / (f64::from(plus[t]) - f64::from(minus[t]));
            assert_close(fd, f64::from(g), 1e-5);
        }
    }

    #[test]
    fn supervised_loss_rejects_zero_normalizer_and_bad_lengths() {
        let new = [-0.5f32];
        let err = supervised_loss(
            &SupervisedTokens {
                new_logprobs: &new,
                trained: &[true],
            },
            0,
        )
        .unwrap_err();
        assert_eq!(err, LossError::ZeroNormalizer);
        let err = supervised_loss(
            &SupervisedTokens {
                new_logprobs: &new,
                trained: &[true, false],
            },
            1,
        )
        .unwrap_err();
        assert!(matches!(err, LossError::LengthMismatch { .. }));
    }
}
