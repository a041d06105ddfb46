//! Synthetic models: a known architecture's shapes with weights made on the
//! device from a hash (no file), so the kernels can be measured at sizes no
//! GGUF here can carry (`bench forward --device cuda --synthetic NAME`).
//!
//! Weight `i` of tensor `t` is `value(seed_of(seed, t), i, scale)` on the
//! device and on the host alike, so a host model of the same weights
//! ([`host_tensors`]) checks the device forward. Norm weights are 1; the
//! token embeddings are a table of their own (untied).

use std::sync::Arc;

use super::{Backend, DeviceLayer, GpuModel};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::weights::LayerTensor;

/// The shapes `--synthetic` knows, by name.
pub const SHAPES: [&str; 3] = ["llama-3-8b", "llama-3-1b", "smollm2-135m"];

/// The shapes of a known architecture (Llama 3 8B and 3.2 1B, SmolLM2
/// 135M: layers, widths, heads, vocabulary, RoPE base), as their GGUF
/// metadata gives them; every one untied (its own output layer), without
/// RoPE frequency factors, 8192 positions.
pub fn config(name: &str) -> Result<ModelConfig> {
    // (layers, hidden, ffn, heads, kv heads, head dim, vocab, rope theta)
    let (num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim, vocab_size, rope_theta) =
        match name {
            "llama-3-8b" => (32, 4096, 14336, 32, 8, 128, 128_256, 500_000.0),
            "llama-3-1b" => (16, 2048, 8192, 32, 8, 64, 128_256, 500_000.0),
            "smollm2-135m" => (30, 576, 1536, 9, 3, 64, 49_152, 100_000.0),
            other => {
                return Err(EngineError::Config(format!(
                    "unknown synthetic shape `{other}`: one of {}",
                    SHAPES.join(", ")
                )))
            }
        };
    Ok(ModelConfig {
        num_layers,
        hidden_size,
        intermediate_size,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        max_context: 8192,
        rope_theta,
        rms_norm_eps: 1e-5,
        block: Default::default(),
        rope_freq_factors: None,
        sliding_window: None,
        attn_scale_dim: head_dim,
    })
}

/// In `[-1, 1)`, from a hash of `(seed, i)` (what `synthetic_unit` in
/// `kernels.cu` computes).
pub fn unit(seed: u64, i: u64) -> f32 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i);
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x >> 40) as f32 * (1.0 / 8_388_608.0) - 1.0
}

/// Synthetic weight `i` of a tensor: `scale * unit` rounded to bf16.
pub fn value(seed: u64, i: u64, scale: f32) -> f32 {
    half::bf16::from_f32(scale * unit(seed, i)).to_f32()
}

/// Each matrix of a layer, its shape and scale (`1 / sqrt(inputs)`, as a
/// trained model's are roughly), with a seed of its own.
fn matrices(c: &ModelConfig) -> [(LayerTensor, f32); 7] {
    let (h, q, ff) = (c.hidden_size as f32, c.q_size() as f32, c.intermediate_size as f32);
    [
        (LayerTensor::Q, 1.0 / h.sqrt()),
        (LayerTensor::K, 1.0 / h.sqrt()),
        (LayerTensor::V, 1.0 / h.sqrt()),
        (LayerTensor::O, 1.0 / q.sqrt()),
        (LayerTensor::Gate, 1.0 / h.sqrt()),
        (LayerTensor::Up, 1.0 / h.sqrt()),
        (LayerTensor::Down, 1.0 / ff.sqrt()),
    ]
}

fn seed_of(seed: u64, layer: usize, matrix: usize) -> u64 {
    seed.wrapping_mul(1_000_003).wrapping_add((layer * 16 + matrix) as u64)
}

/// The token embeddings' seed (their scale is 1).
fn embeddings_seed(c: &ModelConfig, seed: u64) -> u64 {
    seed_of(seed, c.num_layers, 1)
}

/// The output layer's seed and scale.
fn output(c: &ModelConfig, seed: u64) -> (u64, f32) {
    (seed_of(seed, c.num_layers, 0), 1.0 / (c.hidden_size as f32).sqrt())
}

impl<B: Backend> GpuModel<B> {
    /// A model of `config`'s shapes whose weights are made on the device
    /// from `seed` (nothing is read or uploaded but the norms' ones).
    pub fn synthetic(backend: Arc<B>, config: ModelConfig, seed: u64) -> Result<Self> {
        super::refuse_other_blocks(&config)?;
        let h = config.hidden_size;
        let ones = |n: usize| backend.upload(&vec![1.0; n]);
        let layers = (0..config.num_layers)
            .map(|l| {
                let made = matrices(&config)
                    .into_iter()
                    .enumerate()
                    .map(|(i, (part, scale))| {
                        backend.synthetic_bf16(part.shape(&config).iter().product(), seed_of(seed, l, i), scale)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let Ok([wq, wk, wv, wo, w_gate, w_up, w_down]) = <[B::Halves; 7]>::try_from(made) else {
                    unreachable!("seven matrices per layer")
                };
                Ok(DeviceLayer {
                    attn_norm: Some(ones(h)?),
                    wq,
                    wk,
                    wv,
                    wo,
                    ffn_norm: ones(h)?,
                    w_gate,
                    w_up,
                    w_down,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (out_seed, out_scale) = output(&config, seed);
        Ok(GpuModel {
            output_norm: ones(h)?,
            lm_head: Arc::new(backend.synthetic_bf16(config.vocab_size * h, out_seed, out_scale)?),
            token_embd: Some(Arc::new(backend.synthetic_bf16(
                config.vocab_size * h,
                embeddings_seed(&config, seed),
                1.0,
            )?)),
            backend,
            config,
            layers,
            graphs: std::sync::Mutex::new(super::graphs::Graphs::new(true)),
        })
    }
}

/// A one-layer model of head dimension 64 and `vocab` tokens, small
/// enough for the emulator, for tests.
#[cfg(test)]
pub fn tiny_config(vocab: usize) -> ModelConfig {
    ModelConfig {
        num_layers: 1,
        hidden_size: 64,
        intermediate_size: 96,
        num_heads: 2,
        num_kv_heads: 1,
        vocab_size: vocab,
        ..config("smollm2-135m").expect("a known shape")
    }
}

/// The weights [`GpuModel::synthetic`] makes, token embeddings included,
/// on the host (f32 tensors of the same bf16 values): a CPU model of the
/// same model, for tests.
#[cfg(test)]
pub fn host_tensors(config: &ModelConfig, seed: u64) -> crate::weights::ModelTensors {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let tensor = |shape: &[usize], values: Vec<f32>| {
        let t = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
        QTensor::quantize(&t, GgmlDType::F32).unwrap()
    };
    let filled = |shape: &[usize], seed: u64, scale: f32| {
        let n: usize = shape.iter().product();
        tensor(shape, (0..n as u64).map(|i| value(seed, i, scale)).collect())
    };
    let h = config.hidden_size;
    let mut tensors = std::collections::HashMap::new();
    for l in 0..config.num_layers {
        for (i, (part, scale)) in matrices(config).into_iter().enumerate() {
            tensors.insert(part.name(l), filled(&part.shape(config), seed_of(seed, l, i), scale));
        }
        for part in [LayerTensor::AttnNorm, LayerTensor::FfnNorm] {
            tensors.insert(part.name(l), tensor(&[h], vec![1.0; h]));
        }
    }
    let (out_seed, out_scale) = output(config, seed);
    tensors.insert(crate::weights::OUTPUT_NORM.to_string(), tensor(&[h], vec![1.0; h]));
    tensors.insert(
        "output.weight".to_string(),
        filled(&[config.vocab_size, h], out_seed, out_scale),
    );
    tensors.insert(
        "token_embd.weight".to_string(),
        filled(&[config.vocab_size, h], embeddings_seed(config, seed), 1.0),
    );
    crate::weights::ModelTensors {
        config: config.clone(),
        tensors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{RaggedBatch, SeqRun};
    use crate::cuda::{DeviceKv, Emulator};
    use crate::kv::{KvLayout, KvStorage};
    use crate::{Model, WeightFormat};
    use heterospec_kv::BlockId;

    /// The named shapes are the real models' (Llama 3 8B: 8.0 G weights
    /// with its untied output layer); an unknown name lists the known.
    #[test]
    fn the_named_shapes_are_the_models() {
        let c = config("llama-3-8b").unwrap();
        let (h, q, kv, ff) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
        let weights = c.num_layers * (2 * h * q + 2 * h * kv + 3 * h * ff) + 2 * c.vocab_size * h;
        assert!((7_900_000_000..8_100_000_000).contains(&weights), "{weights}");
        for name in SHAPES {
            config(name).unwrap();
        }
        let err = config("llama-9").unwrap_err().to_string();
        assert!(err.contains("llama-9") && err.contains("smollm2-135m"), "{err}");
    }

    /// The device makes the host's values to the bit, whatever the grid
    /// (a length past one grid-stride pass), within `[-scale, scale]`,
    /// centred, and different for another seed.
    #[test]
    fn emulated_synthetic_weights_are_the_hosts() {
        let n = 8192 * 256 + 77;
        let got = Emulator.synthetic_bf16(n, 42, 0.5).unwrap();
        let want: Vec<u16> = (0..n as u64)
            .map(|i| half::bf16::from_f32(value(42, i, 0.5)).to_bits())
            .collect();
        assert_eq!(got, want);
        let values: Vec<f32> = (0..n as u64).map(|i| value(42, i, 0.5)).collect();
        assert!(values.iter().all(|v| v.abs() <= 0.5));
        let mean = values.iter().sum::<f32>() / n as f32;
        assert!(mean.abs() < 0.01, "{mean}");
        assert_ne!(value(43, 5, 0.5), value(42, 5, 0.5));
    }

    /// A synthetic model made on the emulated device is the llama of its
    /// weights: its logits are the CPU model's of the same values (built
    /// on the host), up to the device's bf16 activations.
    #[test]
    fn a_synthetic_model_on_the_emulated_gpu_is_the_host_model() {
        let c = ModelConfig {
            num_layers: 2,
            hidden_size: 128,
            intermediate_size: 192,
            num_heads: 2,
            num_kv_heads: 1,
            vocab_size: 100,
            ..config("smollm2-135m").unwrap()
        };
        let device = GpuModel::synthetic(Arc::new(Emulator), c.clone(), 7).unwrap();
        let cpu = Model::from_tensors(host_tensors(&c, 7), WeightFormat::F32).unwrap();
        let layout = KvLayout {
            num_blocks: 8,
            block_size: 16,
            num_layers: c.num_layers,
            kv_size: c.kv_size(),
            scratch_slots: 0,
        };
        let ids: Vec<u32> = (0..20).map(|i| i * 7 % 100).collect();
        // (the embeddings, too, are gathered on the device)
        let table: Vec<BlockId> = (1..=2).map(BlockId).collect();
        let batch = RaggedBatch {
            seqs: vec![SeqRun::causal(ids.clone(), 0, &table, 16).unwrap().with_all_logits()],
        };
        let rows: Vec<usize> = batch.logits_token_rows().collect();
        let mut kv = DeviceKv::new(device.backend().clone(), layout).unwrap();
        let (got, _) = device.forward_on(&batch, &mut kv, c.num_layers, None, &rows).unwrap();
        let want = cpu.forward(&batch, &mut KvStorage::new(layout)).unwrap();
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        let largest = want.iter().map(|x| x.abs()).fold(0.0, f32::max);
        assert!(largest > 0.1, "{largest}");
        assert!(
            worst <= 5e-3 * largest.max(1.0),
            "max abs diff {worst}, largest {largest}"
        );
    }
}
