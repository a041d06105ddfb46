//! heterospec's engine: the model runner over paged KV, sampling, draft
//! trees and their verification. It never sees text.

pub mod attention;
pub mod backend;
pub mod batch;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod device_head;
pub mod engine;
pub mod error;
pub mod features;
pub mod health;
pub mod heap;
pub mod kv;
pub(crate) mod layer;
pub mod lease;
pub mod linear;
pub mod loading;
pub mod metrics;
pub mod model;
pub mod ops;
mod par;
pub mod qgemm;
pub mod requantize;
pub mod runner;
pub mod sampler;
pub mod server;
pub mod spec;
pub mod step;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod weights;

pub use backend::{FeatureTap, ModelBackend};
pub use batch::{RaggedBatch, SeqRun};
pub use config::ModelConfig;
pub use device::Device;
pub use engine::{DrafterKind, Engine, EngineConfig, SeqId, SeqResult, SeqStep, SpecSetup, StepTimes};
pub use error::{EngineError, Result};
pub use kv::{KvLayout, KvStorage};
pub use model::{Model, ModelTensors, WeightFormat};
pub use sampler::{SampledToken, Sampler, SamplingParams};
