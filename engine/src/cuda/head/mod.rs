//! A draft head on the device: its `fc`, decoder layers (the target's
//! layer kernels, [`run_layer`]) and sub-vocabulary output layer run where
//! the target runs; its K/V and its feature store (a row per KV slot, see
//! [`HeadBackend`]) live in device memory; its rows' embeddings come from
//! the target's own table there; and each output row's best few ids are
//! found there (`top_rows`). A tree layer uploads the batch's ids, slots,
//! key lists and which stored row each token reads, and brings back only
//! those ids and their logprobs.
//!
//! Invariant: the forward is `spec::head::DraftHead`'s (EAGLE: `fc` over
//! `[embedding | feature]`, here as the sum of its two halves' products,
//! the layers, the optional norm, the output layer), with weights and
//! embeddings rounded to bf16 as the target's. The target's states reach
//! the store where its verify forward left them ([`HeadBackend::observe`]
//! copies rows on the device).

use std::sync::Arc;

use super::layer::{run_layer, DeviceLayer, Scratch, StepInputs};
use super::{device_kv, int, Backend, DeviceKv, BLOCK_THREADS, MAX_GRID_Y};
use crate::batch::RaggedBatch;
use crate::config::ModelConfig;
use crate::device_head::{logits_slots, HeadBackend, HeadParts, TopRow};
use crate::error::{EngineError, Result};
use crate::features::Features;
use crate::kv::{KvLayout, KvStorage};

/// A draft head's weights on the device: matrices bf16, norms and the
/// `fc` bias f32; and its feature store.
pub struct DeviceHead<B: Backend> {
    backend: Arc<B>,
    config: ModelConfig,
    /// The target's token embeddings (shared, bf16).
    embeddings: Arc<B::Halves>,
    /// `fc`'s columns over the embedding and over the feature, `(h, h)` each.
    fc_embedding: B::Halves,
    fc_feature: B::Halves,
    /// `fc`'s bias, one row `(1, h)`.
    fc_bias: Option<B::Floats>,
    layers: Vec<DeviceLayer<B::Floats, B::Halves>>,
    output_norm: Option<B::Floats>,
    lm_head: B::Halves,
    draft_vocab: usize,
    /// `(slots + 1, h)`: a row per slot, then a row of zeros.
    store: Option<B::Floats>,
    slots: usize,
}

/// Columns `[from, from + width)` of the rows of `m` `(rows, cols)`.
fn columns(m: &[f32], cols: usize, from: usize, width: usize) -> Vec<f32> {
    m.chunks_exact(cols)
        .flat_map(|row| &row[from..from + width])
        .copied()
        .collect()
}

impl<B: Backend> DeviceHead<B> {
    pub fn new(backend: Arc<B>, p: &HeadParts, embeddings: Arc<B::Halves>) -> Result<Self> {
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
            fc_embedding: b.upload_bf16(&columns(&p.fc, 2 * h, 0, h))?,
            fc_feature: b.upload_bf16(&columns(&p.fc, 2 * h, h, h))?,
            fc_bias: p.fc_bias.as_deref().map(|w| b.upload(w)).transpose()?,
            layers,
            output_norm: p.output_norm.as_deref().map(|w| b.upload(w)).transpose()?,
            lm_head: b.upload_bf16(&p.lm_head)?,
            draft_vocab: p.draft_vocab,
            embeddings,
            store: None,
            slots: 0,
            config: c,
            backend,
        })
    }

    fn store(&mut self) -> Result<&mut B::Floats> {
        self.store
            .as_mut()
            .ok_or_else(|| EngineError::Config("the draft head's KV was not made (new_kv)".into()))
    }

    /// [`HeadBackend::forward_top`] over the head's device KV, once the
    /// store is made.
    fn forward_on(
        &mut self,
        batch: &RaggedBatch,
        inputs: &[Option<usize>],
        kv: &mut DeviceKv<B>,
        m: usize,
    ) -> Result<Vec<TopRow>> {
        let n = batch.num_tokens();
        let h = self.config.hidden_size;
        if inputs.len() != n || inputs.iter().flatten().any(|&s| s >= self.slots) {
            return Err(EngineError::Config(format!(
                "{n} tokens but {} feature rows, or a row past the store's {} slots",
                inputs.len(),
                self.slots
            )));
        }
        if n > MAX_GRID_Y {
            return Err(EngineError::Config(format!(
                "a GPU forward takes at most {MAX_GRID_Y} tokens, this one has {n}"
            )));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let zero_row = self.slots;
        let (b, c) = (&*self.backend, &self.config);
        let store = self.store.as_ref().expect("made before any forward");
        let step = StepInputs::new(b, batch, c, kv.block_size)?;
        let mut embedded = b.zeros(n * h)?;
        step.embed(b, &self.embeddings, &mut embedded, h)?;
        let rows: Vec<i32> = inputs.iter().map(|i| int(i.unwrap_or(zero_row))).collect();
        let mut features = b.zeros(n * h)?;
        b.gather_rows(store, &b.upload_ints(&rows)?, &mut features, (n, h))?;
        // The bias first, then both halves of `fc` added to it.
        let mut x = b.zeros(n * h)?;
        if let Some(bias) = &self.fc_bias {
            b.gather_rows(bias, &b.upload_ints(&vec![0; n])?, &mut x, (n, h))?;
        }
        b.matmul(&embedded, &self.fc_embedding, &mut x, (n, h, h), true)?;
        b.matmul(&features, &self.fc_feature, &mut x, (n, h, h), true)?;
        let mut scratch = Scratch::new(b, n, c)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let layer_kv = (&mut kv.keys[li], &mut kv.values[li]);
            run_layer(b, c, layer, &mut x, &mut scratch, &step, layer_kv)?;
        }
        let row_ids: Vec<i32> = batch.logits_token_rows().map(int).collect();
        let r = row_ids.len();
        if r == 0 {
            return Ok(Vec::new());
        }
        let mut hidden = b.zeros(r * h)?;
        b.gather_rows(&x, &b.upload_ints(&row_ids)?, &mut hidden, (r, h))?;
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
        let written: Vec<i32> = logits_slots(batch).into_iter().map(int).collect();
        let (b, store) = (&*self.backend, self.store.as_mut().expect("made before any forward"));
        b.scatter_rows(store, &hidden, &b.upload_ints(&written)?, (r, h))?;
        let m = m.min(self.draft_vocab);
        if m == 0 {
            return Ok(vec![Vec::new(); r]);
        }
        let mut ids = b.upload_ints(&vec![0; r * m])?;
        let mut logprobs = b.zeros(r * m)?;
        b.top_rows(&logits, &mut ids, &mut logprobs, (r, self.draft_vocab, m))?;
        let ids = b.download_ints(&ids, r * m)?;
        let logprobs = b.download(&logprobs, r * m)?;
        Ok(ids
            .chunks(m)
            .zip(logprobs.chunks(m))
            .map(|(ids, lps)| {
                ids.iter()
                    .zip(lps)
                    .filter(|(&i, _)| i >= 0)
                    .map(|(&i, &lp)| (i as u32, lp))
                    .collect()
            })
            .collect())
    }
}

impl<B: Backend> HeadBackend for DeviceHead<B> {
    fn new_kv(&mut self, layout: KvLayout) -> Result<KvStorage> {
        let kv = DeviceKv::new(self.backend.clone(), layout)?;
        self.slots = layout.num_slots();
        self.store = Some(self.backend.zeros((self.slots + 1) * self.config.hidden_size)?);
        Ok(KvStorage::on_device(layout, Box::new(kv)))
    }

    fn observe(&mut self, slots: &[usize], features: &Features, rows: &[usize]) -> Result<()> {
        let h = self.config.hidden_size;
        if slots.is_empty() && rows.is_empty() {
            return Ok(());
        }
        if rows.len() != slots.len() || features.width() != h {
            return Err(EngineError::Config(format!(
                "{} slots, {} feature rows of {} floats (the head's features have {h})",
                slots.len(),
                rows.len(),
                features.width()
            )));
        }
        features.check_rows(rows)?;
        let kept: Vec<usize> = (0..slots.len()).filter(|&i| slots[i] < self.slots).collect();
        if kept.is_empty() {
            return Ok(());
        }
        let b = self.backend.clone();
        let at = b.upload_ints(&kept.iter().map(|&i| int(slots[i])).collect::<Vec<_>>())?;
        let picks: Vec<usize> = kept.iter().map(|&i| rows[i]).collect();
        let on_device = match features {
            Features::Device { rows: d, .. } => super::features::on_backend(d.as_ref(), &b),
            Features::Host { .. } => None,
        };
        let values = match on_device {
            // Left here by the target's forward: gathered on the device.
            Some((values, len)) => {
                if picks.iter().any(|&p| (p + 1) * h > len) {
                    return Err(EngineError::Config(format!(
                        "feature rows past the {len} floats the forward left"
                    )));
                }
                let idx = b.upload_ints(&picks.iter().map(|&p| int(p)).collect::<Vec<_>>())?;
                let mut out = b.zeros(picks.len() * h)?;
                b.gather_rows(values, &idx, &mut out, (picks.len(), h))?;
                out
            }
            None => b.upload(&features.rows(&picks)?)?,
        };
        b.scatter_rows(self.store()?, &values, &at, (kept.len(), h))
    }

    fn forward_top(
        &mut self,
        batch: &RaggedBatch,
        inputs: &[Option<usize>],
        kv: &mut KvStorage,
        m: usize,
    ) -> Result<Vec<TopRow>> {
        let layout = kv.layout();
        self.store()?;
        if layout.num_slots() != self.slots {
            return Err(EngineError::Config(format!(
                "the draft head's store has {} slots, its KV {}: make both with new_kv",
                self.slots,
                layout.num_slots()
            )));
        }
        for seq in &batch.seqs {
            seq.validate(layout.block_size, layout.num_slots(), self.config.vocab_size)?;
        }
        self.forward_on(batch, inputs, device_kv(kv)?, m)
    }

    fn features_at(&self, slots: &[usize]) -> Result<Vec<f32>> {
        let h = self.config.hidden_size;
        let Some(store) = &self.store else {
            return Err(EngineError::Config("the draft head's KV was not made (new_kv)".into()));
        };
        let b = &*self.backend;
        let at: Vec<i32> = slots.iter().map(|&s| int(s.min(self.slots))).collect();
        let mut out = b.zeros(slots.len() * h)?;
        b.gather_rows(store, &b.upload_ints(&at)?, &mut out, (slots.len(), h))?;
        b.download(&out, slots.len() * h)
    }
}

#[cfg(test)]
mod tests;
