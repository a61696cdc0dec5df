//! Rewards: scoring a finished trajectory's response.
//!
//! A prompt names its [`VerifierSpec`]; [`VerifierFactory::build`] turns it into a
//! [`Verifier`]:
//! - [`ExactMatch`]: 1 when the trimmed response equals the trimmed reference, else 0;
//! - [`MathVerifier`]: 1 when the response's final answer (the content of its last
//!   `\boxed{…}`, else its last number) equals the reference numerically, else 0;
//! - [`RewardService`]: asks an HTTP reward service registered by name in the config:
//!   `POST {url}` with `{"prompt", "response", "metadata"}`, answer `{"reward": <number>}`,
//!   with bounded timeouts and retries (see [`crate::http`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use flywheel_storage::VerifierSpec;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::http::{HttpConfig, HttpFailure, post_json};

/// What a verifier scores: the prompt and the response as text, and the prompt's metadata.
#[derive(Clone, Copy, Debug)]
pub struct VerifyInput<'a> {
    /// The prompt text (detokenised when the prompt came as token ids).
    pub prompt: &'a str,
    /// The whole response text (all segments, detokenised together).
    pub response: &'a str,
    /// The prompt's free-form metadata, passed on to reward services.
    pub metadata: &'a BTreeMap<String, String>,
}

/// Why a response could not be scored.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A prompt names a reward service the config does not define.
    #[error(
        "unknown reward service `{name}`: define it under the reward services of the config \
         (defined: {known})"
    )]
    UnknownService {
        /// The name the prompt asked for.
        name: String,
        /// The names the config defines, comma-separated.
        known: String,
    },
    /// The reward-service configuration is invalid.
    #[error("invalid reward service configuration: {0}")]
    Config(String),
    /// The service cannot answer right now, even after bounded retries; score again later.
    #[error("reward service `{name}` is unavailable: {message}")]
    Unavailable {
        /// The service's name.
        name: String,
        /// What happened on the last attempt.
        message: String,
    },
    /// The service refused the request (an HTTP 4xx).
    #[error("reward service `{name}` rejected the request (HTTP {status}): {message}")]
    Rejected {
        /// The service's name.
        name: String,
        /// The HTTP status.
        status: u16,
        /// The service's explanation.
        message: String,
    },
    /// The service's answer is not `{"reward": <finite number>}`.
    #[error("reward service `{name}` sent an invalid answer: {message}")]
    Protocol {
        /// The service's name.
        name: String,
        /// What is wrong with it.
        message: String,
    },
}

impl VerifyError {
    /// Whether scoring the same response again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, VerifyError::Unavailable { .. })
    }
}

/// Scores responses.
#[async_trait]
pub trait Verifier: Send + Sync + std::fmt::Debug {
    /// A short description for logs (`exact_match`, `math`, `service:<name>`).
    fn name(&self) -> String;

    /// The reward of `input.response`.
    async fn score(&self, input: &VerifyInput<'_>) -> Result<f32, VerifyError>;
}

/// Reward 1 when the trimmed response equals the trimmed reference answer, else 0.
#[derive(Clone, Debug)]
pub struct ExactMatch {
    /// The reference answer, trimmed.
    answer: String,
}

impl ExactMatch {
    /// A verifier against `answer`.
    pub fn new(answer: &str) -> Self {
        ExactMatch {
            answer: answer.trim().to_owned(),
        }
    }
}

#[async_trait]
impl Verifier for ExactMatch {
    fn name(&self) -> String {
        "exact_match".to_owned()
    }

    async fn score(&self, input: &VerifyInput<'_>) -> Result<f32, VerifyError> {
        Ok(if input.response.trim() == self.answer {
            1.0
        } else {
            0.0
        })
    }
}

/// Reward 1 when the response's final answer equals the reference, numerically when both are
/// numbers ("1,000" = "1000", "3.50" = "3.5", "1/2" = "\frac{1}{2}" = "0.5"), else as
/// normalised strings; 0 otherwise, including when the response has no answer at all.
#[derive(Clone, Debug)]
pub struct MathVerifier {
    /// The reference answer as given.
    answer: String,
}

impl MathVerifier {
    /// A verifier against `answer`.
    pub fn new(answer: &str) -> Self {
        MathVerifier {
            answer: answer.to_owned(),
        }
    }
}

#[async_trait]
impl Verifier for MathVerifier {
    fn name(&self) -> String {
        "math".to_owned()
    }

    async fn score(&self, input: &VerifyInput<'_>) -> Result<f32, VerifyError> {
        let correct =
            extract_answer(input.response).is_some_and(|got| answers_equal(&got, &self.answer));
        Ok(if correct { 1.0 } else { 0.0 })
    }
}

/// The final answer of a math response: the content of its last well-formed `\boxed{…}`
/// (nested braces allowed), else its last number (see [`last_number`]).
pub fn extract_answer(text: &str) -> Option<String> {
    last_boxed(text).or_else(|| last_number(text))
}

/// The content of the last `\boxed{…}` whose braces balance.
fn last_boxed(text: &str) -> Option<String> {
    let mut best = None;
    let mut from = 0;
    while let Some(found) = text[from..].find("\\boxed") {
        let start = from + found + "\\boxed".len();
        from = start;
        let rest = text[start..].trim_start();
        let Some(inner) = rest.strip_prefix('{') else {
            continue;
        };
        let mut depth = 1usize;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        best = Some(inner[..i].trim().to_owned());
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    best
}

/// The last number written in `text`: an optional minus sign (only where it cannot be a
/// subtraction), digits with optional thousands commas (`1,000`), an optional decimal part,
/// and an optional `/denominator` (a fraction). `"3-2"` holds 3 and 2; `"1, 2"` holds 1 and 2.
pub fn last_number(text: &str) -> Option<String> {
    let chars: Vec<char> = text
        .chars()
        .map(|c| if c == '−' { '-' } else { c })
        .collect();
    let digits_at = |i: usize| chars.get(i).is_some_and(|c| c.is_ascii_digit());
    let mut last = None;
    let mut i = 0;
    while i < chars.len() {
        if !digits_at(i) || (i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '.')) {
            i += 1;
            continue;
        }
        let negative = i > 0
            && chars[i - 1] == '-'
            && (i < 2 || !(chars[i - 2].is_alphanumeric() || chars[i - 2] == ')'));
        let start = if negative { i - 1 } else { i };
        let mut j = i;
        while digits_at(j) {
            j += 1;
        }
        // Thousands groups: a comma followed by exactly three digits.
        while chars.get(j) == Some(&',') && (1..=3).all(|k| digits_at(j + k)) && !digits_at(j + 4) {
            j += 4;
        }
        if chars.get(j) == Some(&'.') && digits_at(j + 1) {
            j += 1;
            while digits_at(j) {
                j += 1;
            }
        }
        if chars.get(j) == Some(&'/') && digits_at(j + 1) {
            j += 1;
            while digits_at(j) {
                j += 1;
            }
        }
        last = Some(chars[start..j].iter().collect::<String>());
        i = j;
    }
    last
}

/// Removes LaTeX and formatting noise that does not change an answer's value.
fn normalize(s: &str) -> String {
    let mut s = s.trim().replace('−', "-");
    // `\text{cm}` → `cm` (and friends): keep the words, drop the command.
    for cmd in ["\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\mbox"] {
        while let Some(at) = s.find(&format!("{cmd}{{")) {
            let open = at + cmd.len();
            let Some(close) = s[open..].find('}') else {
                break;
            };
            let inner = s[open + 1..open + close].to_owned();
            s.replace_range(at..open + close + 1, &inner);
        }
    }
    for noise in [
        "\\left",
        "\\right",
        "\\displaystyle",
        "\\!",
        "\\,",
        "\\;",
        "\\:",
        "\\ ",
        "^\\circ",
        "^{\\circ}",
        "°",
        "\\%",
        "%",
        "\\$",
        "$",
        "~",
    ] {
        s = s.replace(noise, "");
    }
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac");
    s.retain(|c| !c.is_whitespace());
    let s = s.trim_end_matches('.');
    // `x=5` → `5`: a single-letter variable assignment.
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (Some(v), Some('=')) if v.is_ascii_alphabetic() => chars.as_str().to_owned(),
        _ => s.to_owned(),
    }
}

/// The value of a decimal written `[-+]d[,ddd…][.d…][e±d]` or `.d…`.
fn parse_decimal(s: &str) -> Option<f64> {
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (int, rest) = body.split_at(
        body.find(|c: char| !(c.is_ascii_digit() || c == ','))
            .unwrap_or(body.len()),
    );
    let mut groups = int.split(',');
    let first = groups.next().unwrap_or("");
    let grouped = int.contains(',');
    if grouped && (first.is_empty() || first.len() > 3 || groups.any(|g| g.len() != 3)) {
        return None;
    }
    if int.is_empty() && !rest.starts_with('.') {
        return None;
    }
    let cleaned: String = s.chars().filter(|&c| c != ',').collect();
    if !cleaned
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'))
    {
        return None;
    }
    cleaned.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// The numeric value of an answer, if it is a number: a decimal (`1,000`, `-3.50`, `.5`,
/// `1e3`), a fraction (`1/2`, `-\frac{3}{4}`, `\frac12`), a percentage (`50\%` = 50), or a
/// number followed only by a unit word (`5\text{ cm}` = 5).
pub fn parse_number(answer: &str) -> Option<f64> {
    let s = normalize(answer);
    let (sign, body) = match s.strip_prefix('-') {
        Some(rest) if rest.starts_with("\\frac") => (-1.0, rest),
        _ => (1.0, s.as_str()),
    };
    if let Some(frac) = body.strip_prefix("\\frac") {
        let (num, den) = split_frac_args(frac)?;
        let (n, d) = (parse_decimal(&num)?, parse_decimal(&den)?);
        return (d != 0.0).then(|| sign * n / d);
    }
    if let Some((num, den)) = s.split_once('/') {
        let (n, d) = (parse_decimal(num)?, parse_decimal(den)?);
        return (d != 0.0).then(|| n / d);
    }
    if let Some(v) = parse_decimal(&s) {
        return Some(v);
    }
    // A number with a unit: the leading number, if everything after it is letters.
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = s.split_at(split);
    if unit.chars().all(|c| c.is_ascii_alphabetic()) && !unit.starts_with(['e', 'E']) {
        parse_decimal(number)
    } else {
        None
    }
}

/// `{a}{b}` or `ab` (single characters) after `\frac`.
fn split_frac_args(s: &str) -> Option<(String, String)> {
    fn arg(s: &str) -> Option<(String, &str)> {
        if let Some(inner) = s.strip_prefix('{') {
            let close = inner.find('}')?;
            Some((inner[..close].to_owned(), &inner[close + 1..]))
        } else {
            let c = s.chars().next()?;
            Some((c.to_string(), &s[c.len_utf8()..]))
        }
    }
    let (num, rest) = arg(s)?;
    let (den, rest) = arg(rest)?;
    rest.is_empty().then_some((num, den))
}

/// Whether two answers are the same: numerically (relative tolerance 1e-6) when both are
/// numbers, else as normalised strings.
pub fn answers_equal(got: &str, reference: &str) -> bool {
    match (parse_number(got), parse_number(reference)) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0),
        (None, None) => {
            let (a, b) = (normalize(got), normalize(reference));
            !a.is_empty() && a == b
        }
        _ => false,
    }
}

/// Configuration of the HTTP reward services prompts may name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardServicesConfig {
    /// Service name → the URL its requests are POSTed to.
    pub services: BTreeMap<String, String>,
    /// Timeouts and retries of every service call.
    pub http: HttpConfig,
}

impl Default for RewardServicesConfig {
    fn default() -> Self {
        RewardServicesConfig {
            services: BTreeMap::new(),
            // Scoring one response should be quick; a stuck service must not hold a worker.
            http: HttpConfig {
                request_timeout_ms: 30_000,
                ..HttpConfig::default()
            },
        }
    }
}

/// A reward computed by an HTTP service (see the module docs for the protocol).
#[derive(Debug)]
pub struct RewardService {
    /// The service's name in the config.
    name: String,
    /// Where requests go.
    url: String,
    /// Shared client (connection pool) of all services.
    client: reqwest::Client,
    /// Timeouts and retries.
    http: HttpConfig,
}

#[async_trait]
impl Verifier for RewardService {
    fn name(&self) -> String {
        format!("service:{}", self.name)
    }

    async fn score(&self, input: &VerifyInput<'_>) -> Result<f32, VerifyError> {
        #[derive(Deserialize)]
        struct Answer {
            reward: f32,
        }
        let body = json!({
            "prompt": input.prompt,
            "response": input.response,
            "metadata": input.metadata,
        });
        let name = self.name.clone();
        let reply = post_json(&self.client, &self.http, &self.url, None, &body)
            .await
            .map_err(|failure| match failure {
                HttpFailure::Unavailable(message) => VerifyError::Unavailable {
                    name: name.clone(),
                    message,
                },
                HttpFailure::Rejected { status, body } => VerifyError::Rejected {
                    name: name.clone(),
                    status,
                    message: body,
                },
            })?;
        let answer: Answer =
            serde_json::from_slice(&reply.body).map_err(|e| VerifyError::Protocol {
                name: name.clone(),
                message: format!("expected {{\"reward\": <number>}}: {e}"),
            })?;
        if !answer.reward.is_finite() {
            return Err(VerifyError::Protocol {
                name,
                message: format!("reward {} is not finite", answer.reward),
            });
        }
        Ok(answer.reward)
    }
}

/// Builds the verifier a prompt's [`VerifierSpec`] asks for.
#[derive(Clone, Debug)]
pub struct VerifierFactory {
    /// The configured reward services, by name.
    services: BTreeMap<String, Arc<RewardService>>,
}

impl VerifierFactory {
    /// Validates the services' URLs and builds one shared HTTP client for them.
    pub fn new(config: &RewardServicesConfig) -> Result<Self, VerifyError> {
        let client = config.http.client().map_err(VerifyError::Config)?;
        let mut services = BTreeMap::new();
        for (name, url) in &config.services {
            let parsed = reqwest::Url::parse(url).map_err(|e| {
                VerifyError::Config(format!("service `{name}`: `{url}` is not a URL: {e}"))
            })?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(VerifyError::Config(format!(
                    "service `{name}`: `{url}` must be http(s)"
                )));
            }
            let service = RewardService {
                name: name.clone(),
                url: url.clone(),
                client: client.clone(),
                http: config.http.clone(),
            };
            services.insert(name.clone(), Arc::new(service));
        }
        Ok(VerifierFactory { services })
    }

    /// The verifier for `spec`; a service name the config does not define is an error.
    pub fn build(&self, spec: &VerifierSpec) -> Result<Arc<dyn Verifier>, VerifyError> {
        Ok(match spec {
            VerifierSpec::ExactMatch { answer } => Arc::new(ExactMatch::new(answer)),
            VerifierSpec::Math { answer } => Arc::new(MathVerifier::new(answer)),
            VerifierSpec::Service { name } => match self.services.get(name) {
                Some(service) => service.clone(),
                None => {
                    let known: Vec<&str> = self.services.keys().map(String::as_str).collect();
                    return Err(VerifyError::UnknownService {
                        name: name.clone(),
                        known: if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        },
                    });
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(response: &str) -> VerifyInput<'_> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        VerifyInput {
            prompt: "q",
            response,
            metadata: &EMPTY,
        }
    }

    #[test]
    fn extracts_the_last_boxed_answer() {
        let cases = [
            ("so the answer is \\boxed{42}.", Some("42")),
            ("\\boxed{1} then \\boxed{2}", Some("2")),
            ("\\boxed{\\frac{1}{2}}", Some("\\frac{1}{2}")),
            ("\\boxed {  7 }", Some("7")),
            ("nested \\boxed{a_{1} + {b}}", Some("a_{1} + {b}")),
            ("\\boxed{3} and an unclosed \\boxed{4", Some("3")),
            ("no box, 12 apples and 15 pears", Some("15")),
            ("nothing here", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(extract_answer(text).as_deref(), want, "{text:?}");
        }
    }

    #[test]
    fn finds_the_last_number() {
        let cases = [
            ("the total is 1,000", Some("1,000")),
            ("values 1, 2, 3", Some("3")),
            ("1,2345", Some("2345")),
            ("costs 3.50 dollars.", Some("3.50")),
            ("x = -7", Some("-7")),
            ("5-3", Some("3")),
            ("(2)-3", Some("3")),
            ("half is 1/2", Some("1/2")),
            ("a temperature of −4", Some("-4")),
            ("version v2 has 10 items", Some("10")),
            ("abc123", None),
            ("end.", None),
            ("3.", Some("3")),
            ("1,000,000 and more", Some("1,000,000")),
        ];
        for (text, want) in cases {
            assert_eq!(last_number(text).as_deref(), want, "{text:?}");
        }
    }

    #[test]
    fn parses_numbers_in_many_formats() {
        let cases: [(&str, Option<f64>); 24] = [
            ("42", Some(42.0)),
            ("-42", Some(-42.0)),
            ("+3", Some(3.0)),
            ("1,000", Some(1000.0)),
            ("1,234,567.5", Some(1_234_567.5)),
            ("3.50", Some(3.5)),
            (".5", Some(0.5)),
            ("1e3", Some(1000.0)),
            ("1/2", Some(0.5)),
            ("-3/4", Some(-0.75)),
            ("\\frac{1}{2}", Some(0.5)),
            ("\\dfrac{3}{4}", Some(0.75)),
            ("-\\frac{3}{4}", Some(-0.75)),
            ("\\frac12", Some(0.5)),
            ("50\\%", Some(50.0)),
            ("$1,000$", Some(1000.0)),
            ("5 \\text{ cm}", Some(5.0)),
            ("x = 5", Some(5.0)),
            ("90^\\circ", Some(90.0)),
            ("12.", Some(12.0)),
            ("1/0", None),
            ("1,00", None),
            ("abc", None),
            ("\\sqrt{2}", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_number(text), want, "{text:?}");
        }
    }

    #[test]
    fn compares_answers() {
        let equal = [
            ("1000", "1,000"),
            ("3.5", "3.50"),
            ("0.5", "1/2"),
            ("\\frac{1}{2}", "0.5"),
            ("-2", "−2"),
            ("x=3", "3"),
            ("\\sqrt{2}", "\\sqrt{2}"),
            ("\\text{yes}", "yes"),
            ("0.3333333", "0.33333331"),
        ];
        for (a, b) in equal {
            assert!(answers_equal(a, b), "{a:?} should equal {b:?}");
        }
        let different = [
            ("3", "4"),
            ("0.5", "0.51"),
            ("1000", "100"),
            ("\\sqrt{2}", "2"),
            ("", ""),
        ];
        for (a, b) in different {
            assert!(!answers_equal(a, b), "{a:?} should differ from {b:?}");
        }
    }

    proptest::proptest! {
        /// No input makes the answer parsers panic (they slice strings by byte offsets).
        #[test]
        fn parsers_never_panic(text in "\\PC{0,80}", tail in "[0-9,./\\\\{}a-z$%=-]{0,30}") {
            let joined = format!("{text}{tail}");
            for s in [&text, &tail, &joined] {
                let _ = extract_answer(s);
                let _ = parse_number(s);
                let _ = answers_equal(s, &tail);
            }
        }

        /// Every integer written with or without thousands commas, or as a decimal with a
        /// trailing zero, reads back as itself.
        #[test]
        fn integers_round_trip(n in -10_000_000i64..10_000_000) {
            let plain = n.to_string();
            let digits = n.unsigned_abs().to_string();
            let mut grouped = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i) % 3 == 0 {
                    grouped.push(',');
                }
                grouped.push(c);
            }
            let grouped = if n < 0 { format!("-{grouped}") } else { grouped };
            let want = n as f64;
            proptest::prop_assert_eq!(parse_number(&plain), Some(want));
            proptest::prop_assert_eq!(parse_number(&grouped), Some(want));
            proptest::prop_assert_eq!(parse_number(&format!("{plain}.0")), Some(want));
            let boxed = format!("so the answer is \\boxed{{{grouped}}}.");
            proptest::prop_assert!(answers_equal(&extract_answer(&boxed).unwrap(), &plain));
            let sentence = format!("the total is {grouped}.");
            proptest::prop_assert!(answers_equal(&extract_answer(&sentence).unwrap(), &plain));
        }
    }

    #[tokio::test]
    async fn math_and_exact_match_scores() {
        let math = MathVerifier::new("1,000");
        assert_eq!(
            math.score(&input("... so \\boxed{1000}")).await.unwrap(),
            1.0
        );
        assert_eq!(math.score(&input("the sum is 1000.")).await.unwrap(), 1.0);
        assert_eq!(
            math.score(&input("\\boxed{999} but 1000")).await.unwrap(),
            0.0,
            "box wins"
        );
        assert_eq!(math.score(&input("no idea")).await.unwrap(), 0.0);
        let exact = ExactMatch::new(" Paris ");
        assert_eq!(exact.score(&input("Paris\n")).await.unwrap(), 1.0);
        assert_eq!(exact.score(&input("paris")).await.unwrap(), 0.0);
    }

    #[test]
    fn factory_builds_per_spec_and_names_unknown_services() {
        let mut config = RewardServicesConfig::default();
        config
            .services
            .insert("judge".into(), "http://127.0.0.1:1/score".into());
        let factory = VerifierFactory::new(&config).unwrap();
        let spec = VerifierSpec::Math { answer: "2".into() };
        assert_eq!(factory.build(&spec).unwrap().name(), "math");
        let spec = VerifierSpec::ExactMatch { answer: "2".into() };
        assert_eq!(factory.build(&spec).unwrap().name(), "exact_match");
        let spec = VerifierSpec::Service {
            name: "judge".into(),
        };
        assert_eq!(factory.build(&spec).unwrap().name(), "service:judge");
        let err = factory
            .build(&VerifierSpec::Service {
                name: "nope".into(),
            })
            .unwrap_err();
        assert!(matches!(err, VerifyError::UnknownService { .. }));
        assert!(
            err.to_string().contains("`nope`") && err.to_string().contains("judge"),
            "{err}"
        );

        config.services.insert("bad".into(), "not a url".into());
        assert!(matches!(
            VerifierFactory::new(&config),
            Err(VerifyError::Config(_))
        ));
    }
}
