//! heterospec's router side: text in and out (tokenizer, chat template,
//! incremental detokenization, stop conditions). The router never sees
//! tensors; the engine never sees text.

pub mod discovery;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod openai;
pub mod output;
pub mod scheduler;
pub mod security;
pub mod server;
pub mod service;
pub mod tokenizer;
pub mod validate;

pub use error::{Result, RouterError};
pub use output::{FinishReason, IncrementalDecoder, OutputDelta, OutputStream, StopCriteria};
pub use tokenizer::{ChatMessage, TextTokenizer};
