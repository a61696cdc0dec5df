//! The built-in task: add a list of small numbers, writing the running total after
//! each term, then the answer.
//!
//! A prompt is the terms joined by `+`, padded with spaces to a fixed width and closed by `=`;
//! the reference response writes the running total after every term, separated by `,`, then
//! `;` and the final answer. With the defaults (up to 20 terms of 0..=9):
//!
//! ```text
//! prompt    3+9+7                                =
//! response  003,012,019;19      (then EOS)
//! ```
//!
//! Fixed layout is what makes the task learnable in minutes on a CPU by a small transformer
//! with learned absolute positions: every prompt has the same length
//! ([`TaskConfig::prompt_chars`]) and the running totals are zero-padded to the width of the
//! largest possible sum ([`TaskConfig::total_width`]), so the k-th term and the k-th total
//! always sit at the same positions, and finding the term to add is a fixed positional
//! lookup instead of counting commas. The final answer is written plainly.
//!
//! The number of terms is drawn from a truncated power law, P(n) ∝ n^(−tail_exponent) on
//! `min_terms..=max_terms`, so most responses are short and a few are about ten times
//! longer: the long-tailed lengths that make partial rollouts matter.
//!
//! **Reward** ([`Problem::reward`]): 1 when the text after the response's first `;` is exactly
//! the answer in decimal (no sign, no leading zeros, no spaces, nothing after it; the
//! response ends at EOS, which the caller strips), else 0. The running totals are not scored:
//! they are the model's scratchpad, and a wrong one that still ends in the right answer is
//! fine. No shaping: the reward is exactly verifiable and binary.
//!
//! **Splits**: whether a problem belongs to the held-out set is a fixed function of its terms
//! ([`Split::of`], a hash), so the training stream and the held-out set are disjoint for
//! every seed, by construction.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Why a task configuration or a prompt is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// The configuration is unusable; the message names the field and the fix.
    #[error("invalid task config: {0}")]
    InvalidConfig(String),
    /// A prompt is not of the form `a+b+…=` with terms in the task's range.
    #[error("not a prompt of the addition task: {0}")]
    BadPrompt(String),
}

/// The shape of the problems: how many terms and how large.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskConfig {
    /// Fewest terms in a problem (≥ 1).
    pub min_terms: usize,
    /// Most terms in a problem; the longest responses are about this many times longer than
    /// one-term ones.
    pub max_terms: usize,
    /// Largest term; terms are drawn uniformly from `0..=max_term`.
    pub max_term: u32,
    /// Exponent a of the length distribution P(n) ∝ n^(−a): larger means more short problems.
    pub tail_exponent: f64,
}

impl Default for TaskConfig {
    fn default() -> Self {
        // Calibrated with examples/demo_recipe.rs: responses of 11 to 84 tokens (with EOS),
        // 60% of the problems with two or three terms, 6% with ten or more.
        Self {
            min_terms: 2,
            max_terms: 20,
            max_term: 9,
            tail_exponent: 2.0,
        }
    }
}

/// Largest accepted term and number of terms, so that answers fit comfortably in a `u64`
/// and prompts in the model's context.
const MAX_TERM_LIMIT: u32 = 1_000_000;
const MAX_TERMS_LIMIT: usize = 1_000;

impl TaskConfig {
    /// Checks that the values make sense; the error names the field and the valid range.
    pub fn validate(&self) -> Result<(), TaskError> {
        let invalid = |msg: String| Err(TaskError::InvalidConfig(msg));
        if self.min_terms == 0 || self.min_terms > self.max_terms {
            return invalid(format!(
                "min_terms = {} must be in 1..=max_terms (max_terms = {})",
                self.min_terms, self.max_terms
            ));
        }
        if self.max_terms > MAX_TERMS_LIMIT {
            return invalid(format!(
                "max_terms = {} must be at most {MAX_TERMS_LIMIT}",
                self.max_terms
            ));
        }
        if self.max_term == 0 || self.max_term > MAX_TERM_LIMIT {
            return invalid(format!(
                "max_term = {} must be in 1..={MAX_TERM_LIMIT}",
                self.max_term
            ));
        }
        if !self.tail_exponent.is_finite() || self.tail_exponent < 0.0 {
            return invalid(format!(
                "tail_exponent = {} must be a finite number ≥ 0 (0 is uniform lengths)",
                self.tail_exponent
            ));
        }
        Ok(())
    }

    /// The probability of each number of terms, `min_terms..=max_terms` in order.
    pub fn length_probabilities(&self) -> Vec<f64> {
        let weights: Vec<f64> = (self.min_terms..=self.max_terms)
            .map(|n| (n as f64).powf(-self.tail_exponent))
            .collect();
        let total: f64 = weights.iter().sum();
        weights.into_iter().map(|w| w / total).collect()
    }

    /// Length in characters of every prompt: room for `max_terms` terms of the widest kind,
    /// their `+`s, and `=`.
    pub fn prompt_chars(&self) -> usize {
        self.max_terms * (digits(u64::from(self.max_term)) + 1)
    }

    /// The prompt of `problem`: its terms joined by `+`, spaces up to
    /// [`prompt_chars`](Self::prompt_chars) − 1 characters, then `=`.
    pub fn prompt(&self, problem: &Problem) -> String {
        let mut s = problem.text();
        let pad = self.prompt_chars().saturating_sub(s.len() + 1);
        s.extend(std::iter::repeat_n(' ', pad));
        s.push('=');
        s
    }

    /// The reference response of `problem` (without EOS): the supervised target, e.g.
    /// `003,012,019;19`.
    pub fn reference(&self, problem: &Problem) -> String {
        problem.reference(self.total_width())
    }

    /// Digits of the largest possible sum: the width running totals are padded to.
    pub fn total_width(&self) -> usize {
        digits(u64::from(self.max_term) * self.max_terms as u64)
    }

    /// Length in characters of the longest possible reference response.
    pub fn max_response_chars(&self) -> usize {
        let width = self.total_width();
        // Each running total and its separator, then the answer.
        self.max_terms * (width + 1) + width
    }
}

/// Number of decimal digits of `x`.
fn digits(x: u64) -> usize {
    x.checked_ilog10().map_or(1, |d| d as usize + 1)
}

/// Which side of the train/held-out split a prompt is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Prompts the policy trains on.
    Train,
    /// Prompts kept for evaluation only.
    HeldOut,
}

impl Split {
    /// One problem in this many (by hash) is held out.
    pub const HELD_OUT_ONE_IN: u64 = 8;

    /// The split `problem` belongs to: a fixed hash of its terms ([`Problem::text`], FNV-1a
    /// then mixed), the same in every process, for every seed and every prompt layout.
    pub fn of(problem: &Problem) -> Split {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in problem.text().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // FNV's low bits are weak: finish with SplitMix64's mixer before taking the modulus.
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
        if h.is_multiple_of(Self::HELD_OUT_ONE_IN) {
            Split::HeldOut
        } else {
            Split::Train
        }
    }
}

/// One problem: the terms to add.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Problem {
    /// The terms, in order (at least one).
    pub terms: Vec<u32>,
}

impl Problem {
    /// The terms joined by `+`, e.g. `3+9+7`: the problem's identity (the prompt is this,
    /// padded, then `=`; see [`TaskConfig::prompt`]).
    pub fn text(&self) -> String {
        self.terms
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join("+")
    }

    /// The correct answer: the sum of the terms.
    pub fn answer(&self) -> u64 {
        self.terms.iter().map(|&t| u64::from(t)).sum()
    }

    /// The reference response (without EOS) with running totals zero-padded to `width`
    /// digits, e.g. `003,012,019;19` for width 3 ([`TaskConfig::reference`] passes the
    /// task's width).
    pub fn reference(&self, width: usize) -> String {
        let mut total = 0u64;
        let running: Vec<String> = self
            .terms
            .iter()
            .map(|&t| {
                total += u64::from(t);
                format!("{total:0width$}")
            })
            .collect();
        format!("{};{}", running.join(","), total)
    }

    /// Parses a prompt of the form `a+b+…=` (decimal terms, optionally followed by spaces
    /// before the `=`) back into a problem, so a verifier that only sees the prompt text can
    /// score responses.
    pub fn from_prompt(prompt: &str) -> Result<Problem, TaskError> {
        let body = prompt
            .strip_suffix('=')
            .ok_or_else(|| TaskError::BadPrompt(format!("{prompt:?} does not end with '='")))?
            .trim_end_matches(' ');
        let terms = body
            .split('+')
            .map(|t| {
                if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(TaskError::BadPrompt(format!(
                        "{prompt:?}: term {t:?} is not a decimal number"
                    )));
                }
                t.parse::<u32>()
                    .ok()
                    .filter(|&v| v <= MAX_TERM_LIMIT)
                    .ok_or_else(|| {
                        TaskError::BadPrompt(format!(
                            "{prompt:?}: term {t} exceeds the largest term {MAX_TERM_LIMIT}"
                        ))
                    })
            })
            .collect::<Result<Vec<u32>, TaskError>>()?;
        if terms.len() > MAX_TERMS_LIMIT {
            return Err(TaskError::BadPrompt(format!(
                "{} terms; at most {MAX_TERMS_LIMIT} are accepted",
                terms.len()
            )));
        }
        Ok(Problem { terms })
    }

    /// The reward of `response` (the response text without EOS): 1 when the text after its
    /// first `;` is exactly the answer in decimal, else 0. See the module docs.
    pub fn reward(&self, response: &str) -> f32 {
        match response.split_once(';') {
            Some((_, answer)) if answer == self.answer().to_string() => 1.0,
            _ => 0.0,
        }
    }
}

/// A seeded, endless stream of problems from one side of the split.
#[derive(Debug, Clone)]
pub struct ProblemStream {
    config: TaskConfig,
    /// Cumulative probabilities of the lengths `min_terms..=max_terms`.
    cumulative: Vec<f64>,
    split: Split,
    rng: ChaCha8Rng,
}

impl ProblemStream {
    /// A stream of `split`'s problems, reproducible from `seed`.
    ///
    /// Problems of the other split are skipped, so the stream never yields a held-out prompt
    /// when `split` is [`Split::Train`] (and vice versa).
    pub fn new(config: TaskConfig, split: Split, seed: u64) -> Result<Self, TaskError> {
        config.validate()?;
        let mut acc = 0.0;
        let cumulative = config
            .length_probabilities()
            .into_iter()
            .map(|p| {
                acc += p;
                acc
            })
            .collect();
        Ok(Self {
            config,
            cumulative,
            split,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// Draws one problem of either split.
    fn draw(&mut self) -> Problem {
        let u: f64 = self.rng.random();
        let idx = self
            .cumulative
            .iter()
            .position(|&c| u < c)
            .unwrap_or(self.cumulative.len() - 1);
        let n = self.config.min_terms + idx;
        let terms = (0..n)
            .map(|_| self.rng.random_range(0..=self.config.max_term))
            .collect();
        Problem { terms }
    }
}

impl Iterator for ProblemStream {
    type Item = Problem;

    /// The next problem of the stream's split; `None` only when the config has (almost)
    /// no problems on that side (e.g. a handful of one-term prompts that all hash to the
    /// other split), detected as a million draws in a row from the other side.
    fn next(&mut self) -> Option<Problem> {
        for _ in 0..MAX_CONSECUTIVE_REJECTIONS {
            let p = self.draw();
            if Split::of(&p) == self.split {
                return Some(p);
            }
        }
        None
    }
}

/// Draws from the wrong split in a row after which a stream gives up (one in eight prompts is
/// held out, so a healthy config needs a handful).
const MAX_CONSECUTIVE_REJECTIONS: usize = 1_000_000;

/// The held-out evaluation set: the first `n` problems of the held-out stream seeded by
/// `seed`.
///
/// Repeats are kept, so the set has the same distribution of lengths as the training stream
/// (short problems have few distinct prompts; removing repeats would leave mostly long ones).
pub fn held_out_set(config: &TaskConfig, seed: u64, n: usize) -> Result<Vec<Problem>, TaskError> {
    let out: Vec<Problem> = ProblemStream::new(config.clone(), Split::HeldOut, seed)?
        .take(n)
        .collect();
    if out.len() < n {
        return Err(TaskError::InvalidConfig(
            "the config has (almost) no held-out problems: raise max_terms or max_term".into(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_model::Tokenizer;

    fn problem(terms: &[u32]) -> Problem {
        Problem {
            terms: terms.to_vec(),
        }
    }

    #[test]
    fn prompt_reference_and_answer_have_the_documented_format() {
        let p = problem(&[3, 9, 7]);
        assert_eq!(p.text(), "3+9+7");
        let config = TaskConfig {
            max_terms: 4,
            ..TaskConfig::default()
        };
        assert_eq!(config.prompt(&p), "3+9+7  =");
        assert_eq!(config.prompt_chars(), 8);
        assert_eq!(config.total_width(), 2);
        assert_eq!(config.reference(&p), "03,12,19;19");
        assert_eq!(p.answer(), 19);
        assert_eq!(p.reference(3), "003,012,019;19");
        assert_eq!(p.reference(1), "3,12,19;19");
        assert_eq!(problem(&[0]).reference(2), "00;0");
    }

    #[test]
    fn the_reference_earns_reward_one() {
        let config = TaskConfig::default();
        for p in ProblemStream::new(config.clone(), Split::Train, 3)
            .unwrap()
            .take(500)
        {
            assert_eq!(p.reward(&config.reference(&p)), 1.0, "{p:?}");
        }
    }

    #[test]
    fn reward_checks_only_the_final_answer_exactly() {
        let p = problem(&[3, 9, 7]);
        assert_eq!(p.reward("003,012,019;19"), 1.0);
        // Wrong scratchpad, right answer: still correct.
        assert_eq!(p.reward("003,011,018;19"), 1.0);
        assert_eq!(p.reward(";19"), 1.0);
        // Wrong, padded, signed, spaced, trailing or missing answers score 0.
        for bad in [
            "003,012,019;18",
            "003,012,019;019",
            "003,012,019;+19",
            "003,012,019; 19",
            "003,012,019;19 ",
            "003,012,019;19;19",
            "003,012,019;1",
            "003,012,019;",
            "003,012,019",
            "19",
            "",
        ] {
            assert_eq!(p.reward(bad), 0.0, "{bad:?}");
        }
    }

    #[test]
    fn prompts_parse_back_into_their_problem() {
        let config = TaskConfig::default();
        for p in ProblemStream::new(config.clone(), Split::Train, 9)
            .unwrap()
            .take(200)
        {
            assert_eq!(Problem::from_prompt(&config.prompt(&p)).unwrap(), p);
            assert_eq!(Problem::from_prompt(&format!("{}=", p.text())).unwrap(), p);
        }
    }

    #[test]
    fn malformed_prompts_are_rejected_with_a_reason() {
        for (bad, needle) in [
            ("3+4", "does not end with '='"),
            ("=", "not a decimal number"),
            ("3++4=", "not a decimal number"),
            ("3+a=", "not a decimal number"),
            ("3+-4=", "not a decimal number"),
            ("3 +4=", "not a decimal number"),
            ("99999999999=", "exceeds the largest term"),
        ] {
            let err = Problem::from_prompt(bad).unwrap_err();
            assert!(matches!(err, TaskError::BadPrompt(_)));
            assert!(err.to_string().contains(needle), "{bad:?}: {err}");
        }
    }

    #[test]
    fn train_and_held_out_streams_are_disjoint() {
        let config = TaskConfig::default();
        let train: std::collections::HashSet<String> =
            ProblemStream::new(config.clone(), Split::Train, 1)
                .unwrap()
                .take(5000)
                .map(|p| p.text())
                .collect();
        let held: Vec<Problem> = held_out_set(&config, 2, 2000).unwrap();
        assert_eq!(held.len(), 2000);
        for p in &held {
            assert_eq!(Split::of(p), Split::HeldOut);
            assert!(!train.contains(&p.text()), "{p:?} is in both splits");
        }
        assert!(
            train.iter().all(
                |t| Split::of(&Problem::from_prompt(&format!("{t}=")).unwrap()) == Split::Train
            )
        );
    }

    #[test]
    fn roughly_one_prompt_in_eight_is_held_out() {
        let mut stream = ProblemStream {
            split: Split::Train,
            ..ProblemStream::new(TaskConfig::default(), Split::Train, 4).unwrap()
        };
        let n = 20_000;
        let held = (0..n)
            .filter(|_| Split::of(&stream.draw()) == Split::HeldOut)
            .count();
        let expected = n / Split::HELD_OUT_ONE_IN as usize;
        assert!(
            held.abs_diff(expected) < expected / 5,
            "{held} of {n} held out, expected about {expected}"
        );
    }

    #[test]
    fn streams_are_reproducible_from_their_seed() {
        let config = TaskConfig::default();
        let take = |seed| -> Vec<Problem> {
            ProblemStream::new(config.clone(), Split::Train, seed)
                .unwrap()
                .take(50)
                .collect()
        };
        assert_eq!(take(5), take(5));
        assert_ne!(take(5), take(6));
    }

    #[test]
    fn lengths_are_long_tailed() {
        let config = TaskConfig::default();
        let probs = config.length_probabilities();
        assert_eq!(probs.len(), config.max_terms - config.min_terms + 1);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(probs.windows(2).all(|w| w[0] > w[1]), "{probs:?}");

        let lens: Vec<usize> = ProblemStream::new(config.clone(), Split::Train, 7)
            .unwrap()
            .take(20_000)
            .map(|p| config.reference(&p).len() + 1) // + EOS
            .collect();
        let mut sorted = lens.clone();
        sorted.sort_unstable();
        let (shortest, median, longest) = (
            sorted[0],
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1],
        );
        // Most responses are short; a few are about ten times longer than the shortest.
        assert!(
            median <= 2 * shortest,
            "median {median}, shortest {shortest}"
        );
        assert!(
            longest >= 7 * shortest,
            "longest {longest}, shortest {shortest}"
        );
        let long = lens.iter().filter(|&&l| l >= 5 * shortest).count();
        assert!(
            long > 0 && long < lens.len() / 5,
            "{long} of {} responses are long",
            lens.len()
        );
        // The empirical length frequencies follow the configured distribution.
        let mut counts = vec![0usize; probs.len()];
        for p in ProblemStream::new(config.clone(), Split::Train, 8)
            .unwrap()
            .take(20_000)
        {
            counts[p.terms.len() - config.min_terms] += 1;
        }
        for (n, (&c, &p)) in counts.iter().zip(&probs).enumerate() {
            let f = c as f64 / 20_000.0;
            assert!(
                (f - p).abs() < 0.02,
                "{} terms: frequency {f}, probability {p}",
                n + config.min_terms
            );
        }
    }

    #[test]
    fn prompts_and_references_fit_the_tokenizer_and_the_size_bounds() {
        let tok = Tokenizer::arithmetic();
        let config = TaskConfig::default();
        let width = config.total_width();
        let longest = Problem {
            terms: vec![config.max_term; config.max_terms],
        };
        assert_eq!(config.prompt(&longest).len(), config.prompt_chars());
        assert_eq!(
            config.reference(&longest).len(),
            config.max_response_chars()
        );
        assert_eq!(width, 3);
        for p in ProblemStream::new(config.clone(), Split::HeldOut, 11)
            .unwrap()
            .take(500)
        {
            tok.encode_prompt(&config.prompt(&p)).unwrap();
            tok.encode(&config.reference(&p)).unwrap();
            assert_eq!(config.prompt(&p).len(), config.prompt_chars());
            assert!(config.reference(&p).len() <= config.max_response_chars());
            assert!(p.terms.iter().all(|&t| t <= config.max_term));
        }
    }

    #[test]
    fn invalid_configs_are_rejected_with_the_field_named() {
        let base = TaskConfig::default();
        for (config, needle) in [
            (
                TaskConfig {
                    min_terms: 0,
                    ..base.clone()
                },
                "min_terms",
            ),
            (
                TaskConfig {
                    min_terms: 5,
                    max_terms: 4,
                    ..base.clone()
                },
                "min_terms",
            ),
            (
                TaskConfig {
                    max_terms: 5000,
                    ..base.clone()
                },
                "max_terms",
            ),
            (
                TaskConfig {
                    max_term: 0,
                    ..base.clone()
                },
                "max_term",
            ),
            (
                TaskConfig {
                    tail_exponent: f64::NAN,
                    ..base.clone()
                },
                "tail_exponent",
            ),
            (
                TaskConfig {
                    tail_exponent: -1.0,
                    ..base.clone()
                },
                "tail_exponent",
            ),
        ] {
            let err = ProblemStream::new(config.clone(), Split::Train, 0).unwrap_err();
            assert!(err.to_string().contains(needle), "{config:?}: {err}");
        }
    }

    #[test]
    fn a_split_without_problems_is_an_error_not_a_hang() {
        // One-term problems over {0, 1}: two prompts, whose split the hash decides.
        let config = TaskConfig {
            min_terms: 1,
            max_terms: 1,
            max_term: 1,
            tail_exponent: 0.0,
        };
        let any_held_out = [0, 1]
            .iter()
            .any(|&t| Split::of(&problem(&[t])) == Split::HeldOut);
        let result = held_out_set(&config, 0, 3);
        assert_eq!(result.is_ok(), any_held_out, "{result:?}");
        if let Ok(set) = result {
            assert!(set.iter().all(|p| Split::of(p) == Split::HeldOut));
        }
    }
}
