//! Moving a draft head onto its target's device: the checkpoint's weights
//! as [`HeadParts`] (query and key rows in the engine's RoPE order, as the
//! CPU head loads them), handed to the target's backend.
//!
//! Invariant: a head is placed only where its device runs all of it; an
//! EAGLE-3 head, or one that reads the target's own output layer, stays on
//! the CPU (and says so), drafting exactly as before.

use super::{half_split_to_interleaved, DraftHead, HeadKind, HeadWeights, FC, FC_BIAS, LM_HEAD, OUTPUT_NORM};
use crate::device_head::{HeadLayerParts, HeadParts};
use crate::error::Result;
use crate::model::Model;

impl DraftHead {
    /// Whether the head runs on its target's device.
    pub fn on_device(&self) -> bool {
        self.device.is_some()
    }

    /// Moves the head onto `target`'s device when that device runs heads
    /// (a GPU) and the head is one it can run: returns whether it runs
    /// there (a head already placed stays). Drops the checkpoint's f32
    /// weights either way: the CPU head keeps its own copy.
    pub fn place_on(&mut self, target: &Model) -> Result<bool> {
        if self.device.is_some() {
            return Ok(true);
        }
        let Some(weights) = self.weights.take() else {
            return Ok(false); // placement was decided before: the CPU
        };
        if target.device() == crate::Device::Cpu {
            return Ok(false);
        }
        let why_not = match self.kind() {
            HeadKind::Eagle3 => Some("an EAGLE-3 head"),
            HeadKind::Eagle if self.lm_head.is_none() => Some("a head without its own output layer"),
            HeadKind::Eagle => None,
        };
        if let Some(why) = why_not {
            tracing::warn!("{why} drafts on the CPU beside a {} target", target.device());
            return Ok(false);
        }
        self.device = target.head_on_device(&self.device_parts(&weights)?)?;
        Ok(self.device.is_some())
    }

    /// The head's weights `w` as a device loads them.
    fn device_parts(&self, w: &HeadWeights) -> Result<HeadParts> {
        let c = &w.config;
        let f32s = |name: &str| -> Result<Vec<f32>> { Ok(w.tensors[name].flatten_all()?.to_vec1::<f32>()?) };
        let optional =
            |name: &str| -> Result<Option<Vec<f32>>> { w.tensors.contains_key(name).then(|| f32s(name)).transpose() };
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let names = HeadKind::Eagle.layer_names(i);
                let m = &names.matrices;
                let rope_rows = |name: &str, heads: usize| -> Result<Vec<f32>> {
                    let cols = w.tensors[name].dim(1)?;
                    Ok(half_split_to_interleaved(&f32s(name)?, heads, c.head_dim(), cols))
                };
                Ok(HeadLayerParts {
                    attn_norm: optional(&names.input_norm)?,
                    matrices: [
                        rope_rows(&m[0], c.num_attention_heads)?,
                        rope_rows(&m[1], c.num_key_value_heads)?,
                        f32s(&m[2])?,
                        f32s(&m[3])?,
                        f32s(&m[4])?,
                        f32s(&m[5])?,
                        f32s(&m[6])?,
                    ],
                    ffn_norm: f32s(&names.post_norm)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(HeadParts {
            layer_config: self.layer_config.clone(),
            fc: f32s(FC)?,
            fc_bias: optional(FC_BIAS)?,
            layers,
            output_norm: optional(OUTPUT_NORM)?,
            draft_vocab: w.tensors[LM_HEAD].dim(0)?,
            lm_head: f32s(LM_HEAD)?,
        })
    }
}
