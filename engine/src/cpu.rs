//! The CPU backend: the target's layers, final norm and output layer in
//! host memory, run over host KV storage with our batched GEMM and paged
//! attention. Loaded from the shared weights description.
//!
//! Invariant: only rows that need logits go through the output layer (a
//! fifth of the default model's weights); a forward allocates its
//! activations once and every layer reuses them.

use crate::backend::{copy_layer_taps, FeatureTap, ModelBackend};
use crate::batch::RaggedBatch;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv::{KvLayout, KvStorage};
use crate::layer::{BlockParts, ForwardContext, Layer};
use crate::linear::{Linear, LinearInput, WeightFormat};
use crate::ops::rms_norm_rows;
use crate::weights::{LayerTensor, ModelTensors, OUTPUT_NORM};

/// The target's weights on the CPU.
pub struct CpuModel {
    config: ModelConfig,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    lm_head: Linear,
}

impl CpuModel {
    /// Takes every tensor it needs out of `t` (shapes checked).
    pub fn new(t: &mut ModelTensors, format: WeightFormat) -> Result<Self> {
        crate::heap::keep_freed_buffers();
        let config = t.config.clone();
        let h = config.hidden_size;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let mut vector = |part: LayerTensor| -> Result<Vec<f32>> {
                let v = t.get_f32(&part.name(i), &part.shape(&config))?;
                t.tensors.remove(&part.name(i));
                Ok(v)
            };
            let attn_norm = vector(LayerTensor::AttnNorm)?;
            let ffn_norm = vector(LayerTensor::FfnNorm)?;
            let qkv_bias = match config.block.qkv_bias {
                true => Some([
                    vector(LayerTensor::QBias)?,
                    vector(LayerTensor::KBias)?,
                    vector(LayerTensor::VBias)?,
                ]),
                false => None,
            };
            let qk_norm = match config.block.qk_norm {
                true => Some([vector(LayerTensor::QNorm)?, vector(LayerTensor::KNorm)?]),
                false => None,
            };
            let post_norms = match config.block.post_norms {
                true => Some([vector(LayerTensor::PostAttnNorm)?, vector(LayerTensor::PostFfnNorm)?]),
                false => None,
            };
            let block = BlockParts {
                qkv_bias,
                qk_norm,
                post_norms,
                gelu: config.block.gelu,
                window: config.layer_window(i),
                local_rope: config.layer_rope_theta(i) != config.rope_theta,
            };
            let [q, k, v, o, gate, up, down] =
                LayerTensor::MATRICES.map(|part| t.take(&part.name(i), &part.shape(&config)));
            let matrices = [q?, k?, v?, o?, gate?, up?, down?];
            layers.push(Layer::from_parts(Some(attn_norm), ffn_norm, matrices, format)?.with_block(block));
        }
        let output_norm = t.get_f32(OUTPUT_NORM, &[h])?;
        let lm_head = t.take(t.output_name(), &[config.vocab_size, h])?;
        Ok(CpuModel {
            lm_head: Linear::new(lm_head, format)?,
            config,
            layers,
            output_norm,
        })
    }
}

impl ModelBackend for CpuModel {
    fn device(&self) -> crate::Device {
        crate::Device::Cpu
    }

    fn config(&self) -> &crate::config::ModelConfig {
        &self.config
    }

    fn new_kv(&self, layout: KvLayout) -> Result<KvStorage> {
        Ok(KvStorage::new(layout))
    }

    fn logits_from_features(&self, features: &[f32]) -> Result<Vec<f32>> {
        let rows = features.len() / self.config.hidden_size;
        if rows == 0 {
            return Ok(Vec::new());
        }
        self.lm_head.forward(&LinearInput::new(features, rows))
    }

    fn forward(
        &self,
        x: Vec<f32>,
        batch: &RaggedBatch,
        kv: &mut KvStorage,
        num_layers: usize,
        tap: Option<&FeatureTap>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        if kv.is_on_device() {
            return Err(EngineError::Config(
                "a CPU model cannot use KV storage in device memory".into(),
            ));
        }
        crate::par::on_pool(|| self.forward_on_pool(x, batch, kv, num_layers, tap))
    }
}

impl CpuModel {
    fn forward_on_pool(
        &self,
        mut x: Vec<f32>,
        batch: &RaggedBatch,
        kv: &mut KvStorage,
        num_layers: usize,
        tap: Option<&FeatureTap>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let c = &self.config;
        let (n, h) = (batch.num_tokens(), c.hidden_size);
        let ctx = ForwardContext::new(batch, c, kv.layout().block_size);
        // Layer taps: each token's states entering the listed layers.
        let taps: &[usize] = match tap {
            Some(FeatureTap::Layers(l)) => l,
            _ => &[],
        };
        let mut tapped = vec![0.0; if taps.is_empty() { 0 } else { n * taps.len() * h }];
        for (li, layer) in self.layers.iter().take(num_layers).enumerate() {
            copy_layer_taps(&mut tapped, taps, &x, li, h);
            layer.forward(&mut x, &ctx, batch, kv, li)?;
        }
        copy_layer_taps(&mut tapped, taps, &x, num_layers, h);

        let mut rows = Vec::with_capacity(batch.num_logits_rows() * h);
        let features = if tap == Some(&FeatureTap::Final) {
            let mut all = vec![0.0; n * h];
            rms_norm_rows(&x, &self.output_norm, c.rms_norm_eps, &mut all);
            for r in batch.logits_token_rows() {
                rows.extend_from_slice(&all[r * h..(r + 1) * h]);
            }
            all
        } else {
            let mut selected = Vec::with_capacity(rows.capacity());
            for r in batch.logits_token_rows() {
                selected.extend_from_slice(&x[r * h..(r + 1) * h]);
            }
            rows.resize(selected.len(), 0.0);
            rms_norm_rows(&selected, &self.output_norm, c.rms_norm_eps, &mut rows);
            tapped // empty without layer taps
        };
        debug_assert_eq!(self.lm_head.out_features, c.vocab_size);
        Ok((self.logits_from_features(&rows)?, features)) // (rows, vocab)
    }
}
