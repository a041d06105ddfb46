//! The device boundary, at the model level: what a device must do to run
//! the target (build its KV storage, run a ragged forward over it, apply the
//! output layer to features). `cpu::CpuModel` implements it with our GEMM
//! and paged attention, `cuda::GpuModel` with the GPU kernels (under CUDA,
//! or under the tests' CPU emulation of CUDA). Each is loaded from the one
//! weights description in `weights`.
//!
//! Invariant: nothing above this trait knows which device runs; nothing
//! below it imports `Model`. A token's logits are the same bits alone and
//! in any batch on every implementation (DESIGN §8).

use crate::batch::RaggedBatch;
use crate::device_head::{HeadBackend, HeadParts};
use crate::error::Result;
use crate::features::Features;
use crate::kv::{KvLayout, KvStorage};

/// A device that runs the target model's forward.
pub trait ModelBackend: Send + Sync {
    /// Where the forward runs.
    fn device(&self) -> crate::Device;

    /// Empty KV storage this backend's forward reads and writes.
    fn new_kv(&self, layout: KvLayout) -> Result<KvStorage>;

    /// Whether [`forward`](Self::forward) gathers the new tokens'
    /// embeddings itself (from the batch's token ids, on its device); then
    /// its `x` is empty.
    fn embeds_tokens(&self) -> bool {
        false
    }

    /// Runs the first `num_layers` layers over `x`, the batch's new tokens'
    /// embeddings `(tokens, hidden)`, writing their K/V into `kv` at their
    /// slots; then the output norm and layer on the batch's logits rows.
    /// Returns logits `(rows, vocab)` and every token's features of `tap`
    /// (empty without a tap).
    fn forward(
        &self,
        x: Vec<f32>,
        batch: &RaggedBatch,
        kv: &mut KvStorage,
        num_layers: usize,
        tap: Option<&FeatureTap>,
    ) -> Result<(Vec<f32>, Vec<f32>)>;

    /// [`forward`](Self::forward) for verification: each logits row `r`
    /// with `pickable[r]` may come back as its greedy pick (the first
    /// largest logit and its logprob) rather than as the row, which a
    /// device that finds the picks itself need not copy back; and the
    /// features may stay on the device ([`Features::Device`]). By default
    /// every row comes back whole and the features on the host.
    fn forward_rows(
        &self,
        x: Vec<f32>,
        batch: &RaggedBatch,
        kv: &mut KvStorage,
        tap: Option<&FeatureTap>,
        pickable: &[bool],
    ) -> Result<(Rows, Features)> {
        let _ = pickable;
        let c = self.config();
        let (vocab, num_layers, hidden) = (c.vocab_size, c.num_layers, c.hidden_size);
        let (logits, features) = self.forward(x, batch, kv, num_layers, tap)?;
        let width = tap.map_or(0, |t| t.width(hidden));
        Ok((Rows::whole(logits, vocab), Features::host(features, width)))
    }

    /// A draft head's weights moved onto this backend's device, to run
    /// beside the target; `None` where heads run on the host (the CPU).
    fn head_on_device(&self, parts: &HeadParts) -> Result<Option<Box<dyn HeadBackend>>> {
        let _ = parts;
        Ok(None)
    }

    /// Whether forwards of frequent shapes replay captured launches (CUDA
    /// graphs) rather than queue each kernel; a backend without them (the
    /// CPU) runs every forward as it is either way.
    fn set_graphs(&self, on: bool) {
        let _ = on;
    }

    /// The model this backend runs.
    fn config(&self) -> &crate::config::ModelConfig;

    /// The output layer on rows that are already normed, `(rows, vocab)`.
    fn logits_from_features(&self, features: &[f32]) -> Result<Vec<f32>>;
}

/// One logits row of a forward, as verification reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Row<'a> {
    /// The row's logits.
    Whole(&'a [f32]),
    /// Only its greedy pick: the first largest logit's token and logprob.
    Picked { token_id: u32, logprob: f32 },
}

/// A forward's logits rows, each whole or picked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    vocab: usize,
    /// The whole rows, `vocab` wide, in row order.
    logits: Vec<f32>,
    /// Per row: `Ok(i)` for whole row `i`, `Err((token, logprob))` for a pick.
    rows: Vec<std::result::Result<usize, (u32, f32)>>,
}

impl Rows {
    /// Every row whole: `logits` is `(rows, vocab)`.
    pub fn whole(logits: Vec<f32>, vocab: usize) -> Self {
        let n = logits.len().checked_div(vocab).unwrap_or(0);
        Rows {
            vocab,
            logits,
            rows: (0..n).map(Ok).collect(),
        }
    }

    /// Rows in order: each `Some(pick)`, or `None` for the next whole
    /// row of `logits` (`vocab` wide, the whole rows in order).
    pub fn mixed(vocab: usize, logits: Vec<f32>, picks: impl IntoIterator<Item = Option<(u32, f32)>>) -> Self {
        let mut whole = 0;
        let rows = picks
            .into_iter()
            .map(|p| match p {
                Some(pick) => Err(pick),
                None => {
                    whole += 1;
                    Ok(whole - 1)
                }
            })
            .collect();
        debug_assert_eq!(whole * vocab, logits.len());
        Rows { vocab, logits, rows }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn get(&self, r: usize) -> Row<'_> {
        match self.rows[r] {
            Ok(i) => Row::Whole(&self.logits[i * self.vocab..(i + 1) * self.vocab]),
            Err((token_id, logprob)) => Row::Picked { token_id, logprob },
        }
    }
}

/// Which target hidden states a draft head reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeatureTap {
    /// The final hidden state after the output norm (EAGLE, EAGLE-2).
    Final,
    /// The hidden states entering each listed layer, concatenated in order
    /// (EAGLE-3's low, middle and high layers); index `num_layers` is the
    /// last layer's output before the output norm.
    Layers(Vec<usize>),
}

impl FeatureTap {
    /// Floats per token.
    pub fn width(&self, hidden: usize) -> usize {
        match self {
            FeatureTap::Final => hidden,
            FeatureTap::Layers(l) => l.len() * hidden,
        }
    }

    /// EAGLE-3's default layers for a target of `num_layers`: 2, the
    /// middle one and the third from last (clamped for tiny models).
    pub fn eagle3_default(num_layers: usize) -> Self {
        let mut layers = vec![2.min(num_layers), num_layers / 2, num_layers.saturating_sub(3)];
        layers.sort_unstable();
        FeatureTap::Layers(layers)
    }
}

/// Copies the states `x (tokens, hidden)` entering layer `at` into their
/// places in `tapped (tokens, taps, hidden)`, for each tap that names `at`.
pub(crate) fn copy_layer_taps(tapped: &mut [f32], taps: &[usize], x: &[f32], at: usize, h: usize) {
    for (j, _) in taps.iter().enumerate().filter(|(_, &l)| l == at) {
        for (t, row) in x.chunks_exact(h).enumerate() {
            let dst = (t * taps.len() + j) * h;
            tapped[dst..dst + h].copy_from_slice(row);
        }
    }
}
