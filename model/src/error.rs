//! The error type of the model crate.

/// What can go wrong when building, loading or running the built-in model.
///
/// Every variant says what was wrong and, where it helps, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model configuration is inconsistent (for example `d_model` not divisible by
    /// `n_heads`).
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// An input to forward, backward or sampling is malformed (empty sequence, token id out of
    /// the vocabulary, sequence longer than `max_seq_len`, gradient slice of the wrong length).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A parameter tensor is missing, unexpected, or has the wrong shape or byte length.
    #[error("parameter `{name}`: {reason}")]
    BadParameter {
        /// The tensor's name, as in [`crate::Params`].
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint directory (or one of its files) cannot be read as a model of the family.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The directory or file at fault.
        path: std::path::PathBuf,
        /// What is wrong, and what to do about it.
        reason: String,
    },
    /// A tokenizer or chat template cannot be loaded or applied.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The compute backend failed (an out-of-bounds view is a bug in the caller of the
    /// backend; device errors come from accelerator backends).
    #[error("backend error: {0}")]
    Backend(String),
}

/// The result type of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
