//! The router's one error type and its one mapping to gRPC status codes.
//!
//! Every status the router sends is built here: a bad field is
//! `INVALID_ARGUMENT` naming it, capacity is `RESOURCE_EXHAUSTED`, a lost or
//! absent engine (or a draining server) is `UNAVAILABLE`, a missing or wrong
//! bearer token is `UNAUTHENTICATED`, and our own broken invariants (and a
//! sequence the engine failed on its own) are `INTERNAL`. `error_type()` is
//! the stable label the `heterospec_requests_total{outcome}` metric uses.
//! `http_status` gives the OpenAI-compatible front the HTTP code and error
//! type of each gRPC status.

use tonic::{Code, Status};

#[derive(Debug, Clone, thiserror::Error)]
pub enum RouterError {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An OpenAI-style request names a model this router does not serve.
    #[error("the model `{asked}` does not exist here (this router serves `{served}`)")]
    ModelNotFound { asked: String, served: String },
    /// More requests in flight than `--max-concurrent-requests`.
    #[error("the server is at its limit of {max} concurrent requests")]
    TooManyRequests { max: usize },
    /// Prompts being tokenized already hold `--max-inflight-prompt-bytes`.
    #[error("prompts being tokenized already hold the limit of {max} bytes (--max-inflight-prompt-bytes)")]
    PromptBytesExhausted { max: usize },
    /// A request that needs more KV blocks than its engine has at all.
    #[error("the request needs more KV blocks than the engine has")]
    KvExhausted,
    /// The engine's submission queue is full.
    #[error("the engine's queue is full")]
    QueueFull,
    /// No engine to serve, or the request's engine was lost.
    #[error("{0}")]
    EngineUnavailable(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// No valid bearer token (the message never says which part failed).
    #[error("a valid bearer token is required (authorization: Bearer <token>)")]
    Unauthenticated,
    /// The engine refused a step or broke the step contract.
    #[error("{0}")]
    EngineContract(String),
    #[error("detokenizing the output failed: {0}")]
    Detokenize(String),
    /// The engine failed this request's sequence alone (the others of its
    /// step ran on).
    #[error("the engine failed this request: {0}")]
    SequenceFailed(String),
}

impl RouterError {
    /// Short stable label for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            RouterError::InvalidArgument { .. } => "invalid_argument",
            RouterError::Tokenizer(_) => "tokenizer",
            RouterError::ModelNotFound { .. } => "model_not_found",
            RouterError::TooManyRequests { .. } | RouterError::PromptBytesExhausted { .. } => "resource_exhausted",
            RouterError::KvExhausted => "kv_exhausted",
            RouterError::QueueFull | RouterError::EngineUnavailable(_) | RouterError::ShuttingDown => "unavailable",
            // The engine is failed for it, as for a lost one.
            RouterError::EngineContract(_) => "unavailable",
            RouterError::Detokenize(_) => "detokenize",
            RouterError::SequenceFailed(_) => "sequence_failed",
            RouterError::Unauthenticated => "unauthenticated",
        }
    }
}

impl From<RouterError> for Status {
    fn from(e: RouterError) -> Self {
        let message = e.to_string();
        match e {
            RouterError::InvalidArgument { .. } => Status::invalid_argument(message),
            RouterError::Unauthenticated => Status::unauthenticated(message),
            RouterError::ModelNotFound { .. } => Status::not_found(message),
            RouterError::TooManyRequests { .. }
            | RouterError::PromptBytesExhausted { .. }
            | RouterError::KvExhausted => Status::resource_exhausted(message),
            RouterError::QueueFull | RouterError::EngineUnavailable(_) | RouterError::ShuttingDown => {
                Status::unavailable(message)
            }
            RouterError::Tokenizer(_)
            | RouterError::EngineContract(_)
            | RouterError::Detokenize(_)
            | RouterError::SequenceFailed(_) => Status::internal(message),
        }
    }
}

/// The HTTP code and OpenAI error type that stand for a gRPC status code.
pub fn http_status(code: Code) -> (u16, &'static str) {
    match code {
        Code::InvalidArgument | Code::OutOfRange => (400, "invalid_request_error"),
        Code::Unauthenticated => (401, "authentication_error"),
        Code::PermissionDenied => (403, "permission_error"),
        Code::NotFound => (404, "not_found_error"),
        Code::ResourceExhausted => (429, "rate_limit_error"),
        Code::Unavailable => (503, "service_unavailable_error"),
        Code::DeadlineExceeded => (504, "timeout_error"),
        _ => (500, "internal_error"),
    }
}

pub type Result<T, E = RouterError> = std::result::Result<T, E>;
