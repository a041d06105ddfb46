//! The router's one error type.

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl RouterError {
    /// Short stable label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            RouterError::InvalidArgument { .. } => "invalid_argument",
            RouterError::Tokenizer(_) => "tokenizer",
        }
    }
}

pub type Result<T, E = RouterError> = std::result::Result<T, E>;
