//! A draft head on the device: its `fc`, decoder layers (the target's
//! layer kernels, [`run_layer`]) and sub-vocabulary output layer run where
//! the target runs, its K/V live in device memory ([`DeviceKv`]), and each
//! output row's best few ids are found there (`top_rows`), so a tree layer
//! brings back those ids, their logprobs and the rows' predicted features,
//! not the logits.
//!
//! Invariant: the forward is `spec::head::DraftHead`'s (EAGLE: `fc` over
//! `[embedding | feature]`, the layers, the optional norm, the output
//! layer), with weights rounded to bf16 as the target's.
//! Still on the host: the tokens' embeddings and input features (uploaded
//! with the batch, `hidden` floats a row) and each drafted node's predicted
//! feature (copied back for its children).

use std::sync::Arc;

use super::layer::{run_layer, DeviceLayer, Scratch, StepInputs};
use super::{device_kv, int, Backend, DeviceKv, BLOCK_THREADS, MAX_GRID_Y};
use crate::batch::RaggedBatch;
use crate::config::ModelConfig;
use crate::device_head::{HeadBackend, HeadParts, TopRow};
use crate::error::{EngineError, Result};
use crate::kv::{KvLayout, KvStorage};

/// A draft head's weights on the device: matrices bf16, norms and the
/// `fc` bias f32.
pub struct DeviceHead<B: Backend> {
    backend: Arc<B>,
    config: ModelConfig,
    fc: B::Halves,
    fc_bias: Option<Vec<f32>>,
    layers: Vec<DeviceLayer<B::Floats, B::Halves>>,
    output_norm: Option<B::Floats>,
    lm_head: B::Halves,
    draft_vocab: usize,
}

impl<B: Backend> DeviceHead<B> {
    pub fn new(backend: Arc<B>, p: &HeadParts) -> Result<Self> {
        let c = p.layer_config.clone();
        let h = c.hidden_size;
        if c.head_dim > BLOCK_THREADS as usize {
            return Err(EngineError::Config(format!(
                "the GPU path supports head dimensions up to {BLOCK_THREADS}, the draft head has {}",
                c.head_dim
            )));
        }
        let sizes_ok = p.fc.len() == 2 * h * h
            && p.lm_head.len() == p.draft_vocab * h
            && p.fc_bias.as_ref().is_none_or(|b| b.len() == h);
        if !sizes_ok {
            return Err(EngineError::Config("draft head parts of the wrong sizes".into()));
        }
        let b = &*backend;
        let layers = p
            .layers
            .iter()
            .map(|l| {
                let [wq, wk, wv, wo, w_gate, w_up, w_down] = &l.matrices;
                Ok(DeviceLayer {
                    attn_norm: l.attn_norm.as_deref().map(|w| b.upload(w)).transpose()?,
                    wq: b.upload_bf16(wq)?,
                    wk: b.upload_bf16(wk)?,
                    wv: b.upload_bf16(wv)?,
                    wo: b.upload_bf16(wo)?,
                    ffn_norm: b.upload(&l.ffn_norm)?,
                    w_gate: b.upload_bf16(w_gate)?,
                    w_up: b.upload_bf16(w_up)?,
                    w_down: b.upload_bf16(w_down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceHead {
            fc: b.upload_bf16(&p.fc)?,
            fc_bias: p.fc_bias.clone(),
            layers,
            output_norm: p.output_norm.as_deref().map(|w| b.upload(w)).transpose()?,
            lm_head: b.upload_bf16(&p.lm_head)?,
            draft_vocab: p.draft_vocab,
            config: c,
            backend,
        })
    }

    /// [`HeadBackend::forward_top`] over the head's device KV.
    pub fn forward_on(
        &self,
        batch: &RaggedBatch,
        embedded: &[f32],
        features: &[f32],
        kv: &mut DeviceKv<B>,
        m: usize,
    ) -> Result<(Vec<TopRow>, Vec<f32>)> {
        let (b, c) = (&*self.backend, &self.config);
        let (n, h) = (batch.num_tokens(), c.hidden_size);
        if embedded.len() != n * h || features.len() != n * h {
            return Err(EngineError::Config(format!(
                "{n} tokens but {} embedding and {} feature values",
                embedded.len(),
                features.len()
            )));
        }
        if n > MAX_GRID_Y {
            return Err(EngineError::Config(format!(
                "a GPU forward takes at most {MAX_GRID_Y} tokens, this one has {n}"
            )));
        }
        let rows: Vec<usize> = batch.logits_token_rows().collect();
        if n == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut input = Vec::with_capacity(2 * n * h);
        for (e, f) in embedded.chunks_exact(h).zip(features.chunks_exact(h)) {
            input.extend_from_slice(e);
            input.extend_from_slice(f);
        }
        let input = b.upload(&input)?;
        // The bias first, then `fc` added to it (as the CPU adds it after).
        let mut x = match &self.fc_bias {
            Some(bias) => b.upload(&bias.repeat(n))?,
            None => b.zeros(n * h)?,
        };
        b.matmul(&input, &self.fc, &mut x, (n, h, 2 * h), true)?;
        let step = StepInputs::new(b, batch, c, kv.block_size)?;
        let mut scratch = Scratch::new(b, n, c)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let layer_kv = (&mut kv.keys[li], &mut kv.values[li]);
            run_layer(b, c, layer, &mut x, &mut scratch, &step, layer_kv)?;
        }
        if rows.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let r = rows.len();
        let row_ids = b.upload_ints(&rows.iter().map(|&i| int(i)).collect::<Vec<_>>())?;
        let mut hidden = b.zeros(r * h)?;
        b.gather_rows(&x, &row_ids, &mut hidden, (r, h))?;
        let normed = match &self.output_norm {
            Some(w) => {
                let mut out = b.zeros(r * h)?;
                b.rms_norm(&hidden, w, &mut out, (r, h), c.rms_norm_eps)?;
                Some(out)
            }
            None => None,
        };
        let mut logits = b.zeros(r * self.draft_vocab)?;
        b.matmul(
            normed.as_ref().unwrap_or(&hidden),
            &self.lm_head,
            &mut logits,
            (r, self.draft_vocab, h),
            false,
        )?;
        let m = m.min(self.draft_vocab);
        let mut ids = b.upload_ints(&vec![0; r * m])?;
        let mut logprobs = b.zeros(r * m)?;
        b.top_rows(&logits, &mut ids, &mut logprobs, (r, self.draft_vocab, m))?;
        let ids = b.download_ints(&ids, r * m)?;
        let logprobs = b.download(&logprobs, r * m)?;
        let top = ids
            .chunks(m.max(1))
            .zip(logprobs.chunks(m.max(1)))
            .map(|(ids, lps)| {
                ids.iter()
                    .zip(lps)
                    .filter(|(&i, _)| i >= 0)
                    .map(|(&i, &lp)| (i as u32, lp))
                    .collect()
            })
            .collect();
        Ok((top, b.download(&hidden, r * h)?))
    }
}

impl<B: Backend> HeadBackend for DeviceHead<B> {
    fn new_kv(&self, layout: KvLayout) -> Result<KvStorage> {
        let kv = DeviceKv::new(self.backend.clone(), layout)?;
        Ok(KvStorage::on_device(layout, Box::new(kv)))
    }

    fn forward_top(
        &self,
        batch: &RaggedBatch,
        embedded: &[f32],
        features: &[f32],
        kv: &mut KvStorage,
        m: usize,
    ) -> Result<(Vec<TopRow>, Vec<f32>)> {
        let layout = kv.layout();
        for seq in &batch.seqs {
            seq.validate(layout.block_size, layout.num_slots(), self.config.vocab_size)?;
        }
        self.forward_on(batch, embedded, features, device_kv(kv)?, m)
    }
}

#[cfg(test)]
mod tests;
