//! An EAGLE-style draft head: one or more decoder layers that predict the target's
//! next final-layer feature from the current feature and the embedding of
//! the token that follows it, with an output layer over a frequent-token
//! sub-vocabulary.
//!
//! Row `q` of the head reads `fc([embed(token_q) | feature_{q-1}])`, runs the
//! decoder layers (layer `i`'s K/V live in layer `i` of the head's own paged
//! KV, addressed by the target's block tables) and outputs `f̂_q`, a guess of the target's feature
//! at `q`; `lm_head(f̂_q)` ranks token `q + 1`. The target's real features
//! come from the verify forward (no extra target work); deeper tree nodes
//! feed the head its own guesses.
//!
//! Checkpoints use the EAGLE layout (safetensors with Hugging Face names plus
//! a `config.json`): `fc.weight` `(h, 2h)`, optional `fc.bias`, for each
//! layer `i < num_hidden_layers` (default 1)
//! `layers.{i}.self_attn.{q,k,v,o}_proj.weight`, `layers.{i}.mlp.{gate,up,down}_proj.weight`,
//! `layers.{i}.post_attention_layernorm.weight` and
//! `layers.{i}.input_layernorm.weight` (optional for `i = 0`, whose input
//! is `fc`'s output), and optionally a sub-vocabulary
//! output: `lm_head.weight` `(draft_vocab, h)` with `d2t` (EAGLE-3's map:
//! target id = draft id + `d2t[draft id]`) and a `norm.weight` before it.
//! Without `lm_head.weight` the target's own output layer is used (EAGLE-1).
//! Query and key rows are stored in Hugging Face's half-split RoPE order and
//! permuted to the engine's interleaved order at load.
//!
//! EAGLE-3 heads (`midlayer.*`) read the target's hidden states entering
//! three layers (low, middle, high; `eagle_config.eagle_aux_hidden_state_layer_ids`,
//! default 2, L/2, L-3), fused by `fc` `(h, 3h)` into the row's input `x`;
//! the layer's attention reads `[input_layernorm(embed) | hidden_norm(x)]`
//! (`q/k/v_proj` take `2h` columns) and adds to `x`. Deeper tree nodes feed
//! the head its own output in place of `x`. `t2d` (a boolean map) is not
//! needed and not read.

use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::backend::FeatureTap;
use crate::batch::RaggedBatch;
use crate::config::ModelConfig;
use crate::device_head::{logits_slots, HeadBackend, TopRow};
use crate::error::{EngineError, Result};
use crate::features::Features;
use crate::kv::KvStorage;
use crate::layer::{ForwardContext, Layer};
use crate::linear::{Linear, WeightFormat};
use crate::model::Model;
use crate::ops::{rms_norm_rows, top_logprobs};

mod checkpoint;
mod device;
pub use checkpoint::*;

/// Row `t` of the result is row `t` of `a` then row `t` of `b`, both
/// `(rows, width)`.
fn concat_rows(a: &[f32], b: &[f32], width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    for (ra, rb) in a.chunks_exact(width).zip(b.chunks_exact(width)) {
        out.extend_from_slice(ra);
        out.extend_from_slice(rb);
    }
    out
}

/// A loaded head, ready to draft.
pub struct DraftHead {
    config: HeadConfig,
    tap: FeatureTap,
    /// EAGLE-3 (`None`: EAGLE): `input_layernorm` of the embedding and
    /// `hidden_norm` of `x`, before attention.
    eagle3_norms: Option<(Vec<f32>, Vec<f32>)>,
    layer_config: ModelConfig,
    fc: Linear,
    fc_bias: Option<Vec<f32>>,
    /// Layer `i` reads and writes KV layer `i` (EAGLE-3: one layer).
    layers: Vec<Layer>,
    output_norm: Option<Vec<f32>>,
    /// `None`: the target's output layer.
    lm_head: Option<Linear>,
    draft_to_target: Vec<u32>,
    /// The checkpoint's weights until [`DraftHead::place_on`] has decided
    /// where the head runs (then dropped).
    weights: Option<HeadWeights>,
    /// Where the head runs beside a GPU target ([`DraftHead::place_on`]);
    /// `None`: here, on the CPU.
    device: Option<Box<dyn HeadBackend>>,
    /// On the CPU, the feature store of [`HeadBackend`]: `(slots, hidden)`,
    /// sized by [`DraftHead::new_kv`].
    store: Vec<f32>,
}

impl DraftHead {
    pub fn load(path: &Path, target: &ModelConfig, format: WeightFormat) -> Result<Self> {
        Self::new(&HeadWeights::load(path, target)?, target, format)
    }

    pub fn new(weights: &HeadWeights, target: &ModelConfig, format: WeightFormat) -> Result<Self> {
        weights
            .check(target)
            .map_err(|e| EngineError::Config(format!("draft head: {e}")))?;
        let c = &weights.config;
        let layer_config = c.layer_config(target);
        let get = |name: &str| -> Result<Tensor> { Ok(weights.tensors[name].clone()) };
        let vector = |name: &str| -> Result<Option<Vec<f32>>> {
            weights.tensors.get(name).map(|t| Ok(t.to_vec1::<f32>()?)).transpose()
        };
        // `Native` keeps the head's matrices at 4 bits (Q4_0 blocks; half the
        // bytes a few-row forward streams), `Q8_0` at 8.
        let matrix = |t: Tensor| -> Result<QTensor> {
            let four_bit = format == WeightFormat::Native && t.dim(1)? % GgmlDType::Q4_0.block_size() == 0;
            Ok(QTensor::quantize(
                &t,
                if four_bit { GgmlDType::Q4_0 } else { GgmlDType::F32 },
            )?)
        };
        let rope_rows = |name: &str, heads: usize| -> Result<QTensor> {
            let t = get(name)?;
            let (rows, cols) = t.dims2()?;
            let w = half_split_to_interleaved(&t.flatten_all()?.to_vec1::<f32>()?, heads, c.head_dim(), cols);
            matrix(Tensor::from_vec(w, (rows, cols), &Device::Cpu)?)
        };
        let kind = weights.kind();
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let names = kind.layer_names(i);
            let m = &names.matrices;
            let parts = [
                rope_rows(&m[0], c.num_attention_heads)?,
                rope_rows(&m[1], c.num_key_value_heads)?,
                matrix(get(&m[2])?)?,
                matrix(get(&m[3])?)?,
                matrix(get(&m[4])?)?,
                matrix(get(&m[5])?)?,
                matrix(get(&m[6])?)?,
            ];
            let post_norm = vector(&names.post_norm)?.expect("checked");
            // EAGLE-3's input norm applies to the embedding half, outside the layer.
            let attn_norm = match kind {
                HeadKind::Eagle => vector(&names.input_norm)?,
                HeadKind::Eagle3 => None,
            };
            layers.push(Layer::from_parts(attn_norm, post_norm, parts, format)?);
        }
        let eagle3_norms = match kind {
            HeadKind::Eagle => None,
            HeadKind::Eagle3 => Some((
                vector(EAGLE3_INPUT_NORM)?.expect("checked"),
                vector(EAGLE3_HIDDEN_NORM)?.expect("checked"),
            )),
        };
        // EAGLE-3's fc reads raw residual streams, whose outliers would
        // swamp 8-bit activation blocks: it stays f32 (it runs once per
        // committed token).
        let fc = match kind {
            HeadKind::Eagle => Linear::new(matrix(get(FC)?)?, format)?,
            HeadKind::Eagle3 => Linear::new(QTensor::quantize(&get(FC)?, GgmlDType::F32)?, WeightFormat::F32)?,
        };
        Ok(DraftHead {
            fc,
            fc_bias: vector(FC_BIAS)?,
            layers,
            output_norm: vector(OUTPUT_NORM)?,
            lm_head: weights
                .tensors
                .get(LM_HEAD)
                .map(|t| Linear::new(matrix(t.clone())?, format))
                .transpose()?,
            draft_to_target: weights.draft_to_target()?,
            tap: weights.feature_tap(target.num_layers),
            eagle3_norms,
            config: c.clone(),
            layer_config,
            weights: Some(weights.clone()),
            device: None,
            store: Vec::new(),
        })
    }

    pub fn kind(&self) -> HeadKind {
        match self.eagle3_norms {
            Some(_) => HeadKind::Eagle3,
            None => HeadKind::Eagle,
        }
    }

    /// The target states this head reads.
    pub fn feature_tap(&self) -> &FeatureTap {
        &self.tap
    }

    /// `fc` (and its bias) on `rows` of `input`.
    fn fc(&self, input: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut x = self.fc.apply(input, rows)?;
        if let Some(bias) = &self.fc_bias {
            for row in x.chunks_exact_mut(self.hidden_size()) {
                for (a, b) in row.iter_mut().zip(bias) {
                    *a += b;
                }
            }
        }
        Ok(x)
    }

    /// The per-token input the head keeps for the target's states of its
    /// tap, `(tokens, tap width)`: the final feature itself (EAGLE), or the
    /// fused `fc` of the three layers' states (EAGLE-3). `(tokens, hidden)`.
    pub fn input_features(&self, target_states: Vec<f32>) -> Result<Vec<f32>> {
        if target_states.is_empty() {
            return Ok(Vec::new());
        }
        match self.kind() {
            HeadKind::Eagle => Ok(target_states),
            HeadKind::Eagle3 => {
                let width = self.tap.width(self.hidden_size());
                self.fc(&target_states, target_states.len() / width)
            }
        }
    }

    pub fn config(&self) -> &HeadConfig {
        &self.config
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Floats of K (and of V) per token of the head's KV.
    pub fn kv_size(&self) -> usize {
        self.layer_config.kv_size()
    }

    /// Decoder layers (and so layers of the head's KV).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes per KV block: every layer's K/V and the target feature of each slot.
    pub fn bytes_per_block(&self, block_size: usize) -> usize {
        (2 * self.num_layers() * self.kv_size() + self.hidden_size()) * block_size * std::mem::size_of::<f32>()
    }

    /// Target id of an output row's column.
    pub fn target_token(&self, column: u32) -> u32 {
        if self.draft_to_target.is_empty() {
            column
        } else {
            self.draft_to_target[column as usize]
        }
    }

    /// Empty KV storage for the head, where it runs, a layer per head
    /// layer, and a zeroed feature store of a row per slot of `layout`.
    pub fn new_kv(&mut self, layout: crate::kv::KvLayout) -> Result<KvStorage> {
        match &mut self.device {
            Some(d) => d.new_kv(layout),
            None => {
                self.store = vec![0.0; layout.num_slots() * self.hidden_size()];
                Ok(KvStorage::new(layout))
            }
        }
    }

    /// Stores the head's input for the target's state in row `rows[i]` of
    /// `features` (of its feature tap) at `slots[i]` (slots past the store
    /// are skipped). A head on a device takes an EAGLE head's rows where
    /// the target's forward left them.
    pub fn observe(&mut self, slots: &[usize], features: &Features, rows: &[usize]) -> Result<()> {
        let h = self.hidden_size();
        if slots.len() != rows.len() {
            return Err(EngineError::Config(format!(
                "{} slots but {} feature rows",
                slots.len(),
                rows.len()
            )));
        }
        // Only EAGLE heads are placed on a device (`place_on`): their input
        // is the target's state as it is.
        if let Some(d) = &mut self.device {
            return d.observe(slots, features, rows);
        }
        let values = self.input_features(features.rows(rows)?)?;
        if values.len() != slots.len() * h {
            return Err(EngineError::Config(format!(
                "{} slots but {} feature values",
                slots.len(),
                values.len()
            )));
        }
        self.store_rows(slots.iter().copied(), &values);
        Ok(())
    }

    /// Writes `values` `(slots, hidden)` into the CPU store at `slots`
    /// (slots past it are skipped).
    fn store_rows(&mut self, slots: impl IntoIterator<Item = usize>, values: &[f32]) {
        let h = self.hidden_size();
        for (slot, row) in slots.into_iter().zip(values.chunks_exact(h)) {
            if let Some(dst) = self.store.get_mut(slot * h..(slot + 1) * h) {
                dst.copy_from_slice(row);
            }
        }
    }

    /// [`forward`](Self::forward) where the head runs, token `i` reading
    /// the stored feature row `inputs[i]` (`None`: zeros); each logits
    /// row's predicted feature is stored at its slot (its children's
    /// input), and its best `m` draft ids and their logprobs come back
    /// ([`top_logprobs`]; a head on a device finds them there).
    pub fn forward_top(
        &mut self,
        target: &Model,
        batch: &RaggedBatch,
        inputs: &[Option<usize>],
        kv: &mut KvStorage,
        m: usize,
    ) -> Result<Vec<TopRow>> {
        if let Some(d) = &mut self.device {
            return d.forward_top(batch, inputs, kv, m);
        }
        let h = self.hidden_size();
        let slots = self.store.len() / h;
        if let Some(bad) = inputs.iter().flatten().find(|&&s| s >= slots) {
            return Err(EngineError::Config(format!(
                "feature row {bad} is past the store's {slots} slots"
            )));
        }
        let mut features = Vec::with_capacity(inputs.len() * h);
        for i in inputs {
            match i {
                Some(s) => features.extend_from_slice(&self.store[s * h..(s + 1) * h]),
                None => features.extend(std::iter::repeat_n(0.0, h)),
            }
        }
        let (logits, hidden) = self.forward(target, batch, &features, kv)?;
        self.store_rows(logits_slots(batch), &hidden);
        let rows = hidden.len() / h;
        let width = logits.len() / rows.max(1);
        Ok(logits
            .chunks(width.max(1))
            .take(rows)
            .map(|r| top_logprobs(r, m))
            .collect())
    }

    /// The stored feature rows of `slots`, `(slots, hidden)` (zeros past
    /// the store).
    pub fn features_at(&self, slots: &[usize]) -> Result<Vec<f32>> {
        if let Some(d) = &self.device {
            return d.features_at(slots);
        }
        let h = self.hidden_size();
        Ok(slots
            .iter()
            .flat_map(|&s| self.store.get(s * h..(s + 1) * h).map_or(vec![0.0; h], <[f32]>::to_vec))
            .collect())
    }

    /// Runs the head on `batch` (tokens are target ids) whose row `i` reads
    /// row `i` of `features` `(tokens, hidden)`: an [`DraftHead::input_features`]
    /// row or the head's own output for a deeper node. Writes the head's
    /// K/V and returns, for the logits rows, the output logits (over the
    /// draft vocabulary) and the predicted features.
    pub fn forward(
        &self,
        target: &Model,
        batch: &RaggedBatch,
        features: &[f32],
        kv: &mut KvStorage,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        crate::par::on_pool(|| self.forward_on_pool(target, batch, features, kv))
    }

    fn forward_on_pool(
        &self,
        target: &Model,
        batch: &RaggedBatch,
        features: &[f32],
        kv: &mut KvStorage,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let layout = kv.layout();
        for seq in &batch.seqs {
            seq.validate(layout.block_size, layout.num_slots(), self.layer_config.vocab_size)?;
        }
        let n = batch.num_tokens();
        let h = self.hidden_size();
        if features.len() != n * h {
            return Err(EngineError::Config(format!(
                "{n} tokens but {} feature values",
                features.len()
            )));
        }
        if n == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let embedded = target.embed(batch.seqs.iter().flat_map(|s| s.token_ids.iter().copied()));
        let ctx = ForwardContext::new(batch, &self.layer_config, layout.block_size);
        let mut x;
        match &self.eagle3_norms {
            None => {
                x = self.fc(&concat_rows(&embedded, features, h), n)?;
                for (i, layer) in self.layers.iter().enumerate() {
                    layer.forward(&mut x, &ctx, batch, kv, i)?;
                }
            }
            Some((input_norm, hidden_norm)) => {
                let eps = self.config.rms_norm_eps;
                let (mut e, mut f) = (vec![0.0; n * h], vec![0.0; n * h]);
                rms_norm_rows(&embedded, input_norm, eps, &mut e);
                rms_norm_rows(features, hidden_norm, eps, &mut f);
                x = features.to_vec();
                self.layers[0].forward_from(&mut x, Some(&concat_rows(&e, &f, h)), &ctx, batch, kv, 0)?;
            }
        }
        let mut hidden = Vec::with_capacity(batch.num_logits_rows() * h);
        for r in batch.logits_token_rows() {
            hidden.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let rows = hidden.len() / h;
        let normed = match &self.output_norm {
            Some(w) => {
                let mut out = vec![0.0; hidden.len()];
                rms_norm_rows(&hidden, w, self.config.rms_norm_eps, &mut out);
                out
            }
            None => hidden.clone(),
        };
        let logits = match &self.lm_head {
            Some(l) if rows > 0 => l.apply(&normed, rows)?,
            Some(_) => Vec::new(),
            None => target.logits_from_features(&normed)?,
        };
        Ok((logits, hidden))
    }
}

#[cfg(test)]
mod tests;
