//! Tiny random llama models built in code, for tests that need a real
//! forward pass but not real weights.

use std::collections::HashMap;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::{Model, ModelTensors, WeightFormat};

/// A seeded linear congruential generator: reproducible test data.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    /// Uniform in [-1, 1).
    pub fn f(&mut self) -> f32 {
        (self.next_u32() as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }
}

/// A small config: 2 layers, 4 heads over 2 kv heads, vocab 64.
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        num_layers: 2,
        hidden_size: 32,
        intermediate_size: 64,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        vocab_size: 64,
        max_context: 256,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        block: Default::default(),
        rope_freq_factors: None,
        sliding_window: None,
        attn_scale_dim: 8,
    }
}

/// Random f32 tensors named as in a llama GGUF (tied output layer).
pub fn random_tensors(config: &ModelConfig, seed: u64) -> Result<ModelTensors> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut tensor = |shape: &[usize], scale: f32, offset: f32| -> Result<QTensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                offset + scale * ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
            })
            .collect();
        Ok(QTensor::quantize(
            &Tensor::from_vec(data, shape, &Device::Cpu)?,
            GgmlDType::F32,
        )?)
    };
    let c = config;
    let (h, q, kv, ff) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
    let mut tensors = HashMap::new();
    tensors.insert("token_embd.weight".to_string(), tensor(&[c.vocab_size, h], 1.0, 0.0)?);
    tensors.insert("output_norm.weight".to_string(), tensor(&[h], 0.1, 1.0)?);
    for i in 0..c.num_layers {
        let w = 1.0 / (h as f32).sqrt();
        for (name, shape, scale, offset) in [
            ("attn_norm", vec![h], 0.1, 1.0),
            ("attn_q", vec![q, h], 2.0 * w, 0.0),
            ("attn_k", vec![kv, h], 2.0 * w, 0.0),
            ("attn_v", vec![kv, h], w, 0.0),
            ("attn_output", vec![h, q], w, 0.0),
            ("ffn_norm", vec![h], 0.1, 1.0),
            ("ffn_gate", vec![ff, h], w, 0.0),
            ("ffn_up", vec![ff, h], w, 0.0),
            ("ffn_down", vec![h, ff], 1.0 / (ff as f32).sqrt(), 0.0),
        ] {
            tensors.insert(format!("blk.{i}.{name}.weight"), tensor(&shape, scale, offset)?);
        }
    }
    Ok(ModelTensors {
        config: config.clone(),
        tensors,
    })
}

/// A tiny random model with f32 weights.
pub fn tiny_model(seed: u64) -> Result<Model> {
    Model::from_tensors(random_tensors(&tiny_config(), seed)?, WeightFormat::AsShipped)
}

/// The device the tests' target models run on: `HETEROSPEC_TEST_DEVICE`
/// (cpu, cuda, cuda:N), the CPU when unset.
pub fn test_device() -> crate::Device {
    match std::env::var("HETEROSPEC_TEST_DEVICE") {
        Ok(d) => d.parse().unwrap_or_else(|e| panic!("HETEROSPEC_TEST_DEVICE: {e}")),
        Err(_) => crate::Device::Cpu,
    }
}

/// [`tiny_model`] on [`test_device`]: a target model for engine tests.
pub fn tiny_target(seed: u64) -> Result<Model> {
    Model::from_tensors_on(
        random_tensors(&tiny_config(), seed)?,
        WeightFormat::AsShipped,
        test_device(),
    )
}

/// Greedy answers of the tiny target `seed` to 24 random prompts, with its
/// states of `tap`: training data for a tiny draft head.
pub fn tiny_training_data(seed: u64, tap: &crate::FeatureTap) -> Result<Vec<crate::spec::train::TrainSequence>> {
    use crate::runner::{Runner, TokenRequest};
    let target = tiny_model(seed)?;
    let mut engine = crate::Engine::new(
        tiny_model(seed)?,
        crate::EngineConfig {
            block_size: 4,
            kv_cache_bytes: 8 << 20,
        },
    )?;
    let mut rng = Lcg(seed ^ 77);
    let requests: Vec<TokenRequest> = (0..24)
        .map(|_| TokenRequest {
            prompt: (0..4 + rng.next_u32() as usize % 12)
                .map(|_| rng.next_u32() % 64)
                .collect(),
            sampling: crate::SamplingParams::greedy(),
            speculation: crate::spec::SpecMode::Off,
            max_new_tokens: 32,
            stop_token_ids: vec![],
        })
        .collect();
    let outputs = Runner::new(&mut engine).run(&requests, 8, 16)?;
    requests
        .iter()
        .zip(outputs)
        .map(|(r, o)| {
            let tokens = [&r.prompt[..], &o.token_ids].concat();
            Ok(crate::spec::train::TrainSequence {
                features: crate::spec::train::target_features(&target, &tokens, 64, tap)?,
                answer_start: r.prompt.len(),
                tokens,
            })
        })
        .collect()
}

/// A one-layer draft head of `kind` for the tiny target `seed`, trained
/// for a few seconds on its greedy answers (a sub-vocabulary of 48 of its
/// 64 tokens).
pub fn tiny_head(seed: u64, kind: crate::spec::head::HeadKind) -> Result<crate::spec::DraftHead> {
    tiny_head_with_layers(seed, kind, 1)
}

/// [`tiny_head`] with `layers` decoder layers.
pub fn tiny_head_with_layers(
    seed: u64,
    kind: crate::spec::head::HeadKind,
    layers: usize,
) -> Result<crate::spec::DraftHead> {
    use crate::spec::train::{frequent_tokens, train, HeadParams, TrainConfig};
    let target = tiny_model(seed)?;
    let tokens_only = tiny_training_data(seed, &crate::FeatureTap::Final)?;
    let (sub_vocab, _) = frequent_tokens(&tokens_only, 48, 64);
    let mut params = HeadParams::init(&target, sub_vocab, 1, candle_core::DType::F32, kind, layers)?;
    let data = tiny_training_data(seed, &params.tap)?;
    let cfg = TrainConfig {
        sub_vocab: 48,
        max_len: 64,
        batch_size: 8,
        epochs: 40,
        learning_rate: 3e-3,
        warmup_steps: 5,
        ..TrainConfig::default()
    };
    train(&target, &mut params, &data, &cfg, |_, _, _| {}, |_, _, _| Ok(()))?;
    crate::spec::DraftHead::new(&params.weights()?, target.config(), WeightFormat::AsShipped)
}
