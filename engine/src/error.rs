//! The engine's one error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file {path} does not exist (run `heterospec fetch-model` or pass --model PATH)")]
    ModelNotFound { path: PathBuf },
    #[error("cannot read model file {path}: {source}")]
    ModelRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid GGUF file: {reason}")]
    InvalidGguf { path: PathBuf, reason: String },
    #[error("unsupported model architecture `{architecture}` (supported: llama, qwen2, qwen3)")]
    UnsupportedArchitecture { architecture: String },
    #[error("GGUF metadata key `{key}` is missing or has the wrong type")]
    MissingMetadata { key: String },
    #[error("tensor `{name}`: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("step refused: {0}")]
    BadStep(String),
    #[error("sequence {seq_id}: {reason}")]
    BadSequence { seq_id: u64, reason: String },
    #[error(transparent)]
    Schedule(#[from] heterospec_kv::schedule::ScheduleError),
    #[error("GPU: {0}")]
    Device(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The engine thread panicked; the process is exiting (crash-only).
    #[error("the engine failed ({0}) and is restarting")]
    Panicked(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
