//! The one configuration error of every service.

/// A configuration value that cannot work. The message names the field and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: `{field}` {problem}")]
pub struct ConfigError {
    /// Dotted path of the offending field, e.g. `rollout.segment_tokens`.
    pub field: &'static str,
    /// What is wrong and what to do about it.
    pub problem: String,
}

impl ConfigError {
    /// The error for `field`.
    pub fn new(field: &'static str, problem: impl Into<String>) -> Self {
        ConfigError {
            field,
            problem: problem.into(),
        }
    }
}
