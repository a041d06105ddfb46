//! A draft head on the device: its `fc`, decoder layers (the target's
//! layer kernels, `layer::run_layer`) and sub-vocabulary output layer run where
//! the target runs; its K/V and its feature store (a row per KV slot, see
//! [`HeadBackend`]) live in device memory; its rows' embeddings come from
//! the target's own table there; and each output row's best few ids are
//! found there (`top_rows`). A tree layer uploads the batch's ids, slots,
//! key lists and which stored row each token reads, and brings back only
//! those ids and their logprobs; one of up to `MAX_GRAPH_TOKENS` tokens
//! replays a CUDA graph of its padded shape (`forward`), as the target's
//! forward does.
//!
//! Invariant: the forward is `spec::head::DraftHead`'s (EAGLE: `fc` over
//! `[embedding | feature]`, here as the sum of its two halves' products,
//! the layers, the optional norm, the output layer), with weights and
//! embeddings rounded to bf16 as the target's. The target's states reach
//! the store where its verify forward left them ([`HeadBackend::observe`]
//! copies rows on the device).

use std::sync::{Arc, Mutex};

use super::graphs::{bucket, key_room, room, GraphCache};
use super::layer::{DeviceLayer, StepInputs};
use super::{device_kv, int, Backend, DeviceKv, BLOCK_THREADS, MAX_GRAPH_TOKENS, MAX_GRID_Y};
use crate::batch::RaggedBatch;
use crate::device_head::{HeadBackend, HeadParts, TopRow};
use crate::error::{EngineError, Result};
use crate::features::Features;
use crate::kv::{KvLayout, KvStorage};

/// A draft head on the device: its weights, its feature store, and its
/// tree layers captured as CUDA graphs.
pub struct DeviceHead<B: Backend> {
    backend: Arc<B>,
    weights: Weights<B>,
    /// `(slots + 1, h)`: a row per slot, then a row of zeros.
    store: Option<B::Floats>,
    slots: usize,
    /// Only reached through `&mut self` (`get_mut`): the mutex makes the
    /// head `Sync`, which a CUDA graph is not.
    graphs: Mutex<GraphCache<B, HeadShape>>,
    /// The graphs' buffers, sized for the largest bucket seen.
    shared: Option<HeadBuffers<B>>,
}

/// Columns `[from, from + width)` of the rows of `m` `(rows, cols)`.
fn columns(m: &[f32], cols: usize, from: usize, width: usize) -> Vec<f32> {
    m.chunks_exact(cols)
        .flat_map(|row| &row[from..from + width])
        .copied()
        .collect()
}

impl<B: Backend> DeviceHead<B> {
    /// The head of `p` on `backend`, its tree layers run from CUDA graphs
    /// where `graphs`.
    pub fn new(backend: Arc<B>, p: &HeadParts, embeddings: Arc<B::Halves>, graphs: bool) -> Result<Self> {
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
        let weights = Weights {
            fc_embedding: b.upload_bf16(&columns(&p.fc, 2 * h, 0, h))?,
            fc_feature: b.upload_bf16(&columns(&p.fc, 2 * h, h, h))?,
            fc_bias: p.fc_bias.as_deref().map(|w| b.upload(w)).transpose()?,
            layers,
            output_norm: p.output_norm.as_deref().map(|w| b.upload(w)).transpose()?,
            lm_head: b.upload_bf16(&p.lm_head)?,
            draft_vocab: p.draft_vocab,
            embeddings,
            config: c,
        };
        Ok(DeviceHead {
            weights,
            store: None,
            slots: 0,
            graphs: Mutex::new(GraphCache::new(graphs)),
            shared: None,
            backend,
        })
    }

    fn store(&mut self) -> Result<&mut B::Floats> {
        self.store
            .as_mut()
            .ok_or_else(|| EngineError::Config("the draft head's KV was not made (new_kv)".into()))
    }

    /// Graphs captured so far.
    #[cfg(test)]
    pub(super) fn graph_captures(&self) -> usize {
        self.graphs.lock().unwrap_or_else(|p| p.into_inner()).captures
    }

    /// [`HeadBackend::forward_top`] over the head's device KV, once the
    /// store is made: from a graph of the layer's padded shape where one
    /// serves, else launch by launch.
    fn forward_on(
        &mut self,
        batch: &RaggedBatch,
        inputs: &[Option<usize>],
        kv: &mut DeviceKv<B>,
        m: usize,
    ) -> Result<Vec<TopRow>> {
        let n = batch.num_tokens();
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
        let DeviceHead {
            backend,
            weights: w,
            store,
            graphs,
            shared,
            ..
        } = self;
        let graphs = graphs.get_mut().unwrap_or_else(|p| p.into_inner());
        let (b, c) = (&**backend, &w.config);
        let store = store.as_mut().expect("made before any forward");
        let host = HeadInputs::new(batch, c, inputs, zero_row);
        let shape = host.shape(m.min(w.draft_vocab));
        if graphs.enabled() && n <= MAX_GRAPH_TOKENS {
            graphs.tie_to(kv.id);
            let padded = HeadShape {
                tokens: bucket(shape.tokens),
                rows: bucket(shape.rows),
                m: shape.m,
            };
            let mut inputs = host.clone();
            inputs.pad_to(padded, zero_row);
            if !shared.as_ref().is_some_and(|s| s.fits(padded, &inputs)) {
                let old = shared.take();
                graphs.clear();
                let room = HeadShape {
                    tokens: room(padded.tokens, old.as_ref().map(|o| o.tokens)),
                    rows: room(padded.rows, old.as_ref().map(|o| o.rows)),
                    m: padded.m.max(old.as_ref().map_or(0, |o| o.m)),
                };
                let lens = key_room(&inputs.step, old.as_ref().map(|o| o.step.lens()));
                drop(old);
                let step = StepInputs::reserve(b, c, kv.block_size, room.tokens, lens)?;
                *shared = Some(HeadBuffers::up_to(b, w, step, room)?);
            }
            let buf = shared.as_mut().expect("made above");
            buf.write(b, &inputs)?;
            if graphs.replay(b, padded, &mut || launch(b, w, store, kv, buf, padded))? {
                return read_top(b, buf, shape);
            }
            *shared = None;
        }
        let step = StepInputs::upload(b, &host.step, c, kv.block_size)?;
        let mut buf = HeadBuffers::new(b, w, step, shape)?;
        buf.write_rows(b, &host)?;
        launch(b, w, store, kv, &mut buf, shape)?;
        read_top(b, &buf, shape)
    }
}

/// The picks a tree layer of `shape` left in `buf`: per logits row, its
/// best ids (up to `m`) and their logprobs.
fn read_top<B: Backend>(b: &B, buf: &HeadBuffers<B>, shape: HeadShape) -> Result<Vec<TopRow>> {
    let (r, m) = (shape.rows, shape.m);
    if r == 0 {
        return Ok(Vec::new());
    }
    if m == 0 {
        return Ok(vec![Vec::new(); r]);
    }
    let ids = b.download_ints(&buf.top_ids, r * m)?;
    let logprobs = b.download(&buf.top_logprobs, r * m)?;
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

impl<B: Backend> HeadBackend for DeviceHead<B> {
    fn new_kv(&mut self, layout: KvLayout) -> Result<KvStorage> {
        let kv = DeviceKv::new(self.backend.clone(), layout)?;
        let slots = layout.num_slots();
        let store = self.backend.zeros((slots + 1) * self.weights.config.hidden_size)?;
        // The graphs read and write the store about to be replaced.
        self.graphs.get_mut().unwrap_or_else(|p| p.into_inner()).clear();
        self.shared = None;
        (self.slots, self.store) = (slots, Some(store));
        Ok(KvStorage::on_device(layout, Box::new(kv)))
    }

    fn observe(&mut self, slots: &[usize], features: &Features, rows: &[usize]) -> Result<()> {
        let h = self.weights.config.hidden_size;
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
            seq.validate(layout.block_size, layout.num_slots(), self.weights.config.vocab_size)?;
        }
        self.forward_on(batch, inputs, device_kv(kv)?, m)
    }

    fn features_at(&self, slots: &[usize]) -> Result<Vec<f32>> {
        let h = self.weights.config.hidden_size;
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

mod forward;
#[cfg(test)]
#[path = "graphs/tests.rs"]
mod graph_tests;
#[cfg(test)]
mod tests;

use forward::{launch, HeadBuffers, HeadInputs, HeadShape, Weights};
