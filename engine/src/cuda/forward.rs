//! One target forward's launches over buffers it is handed ([`Buffers`]):
//! the embedding gather, the layers, the final norm and the output layer
//! on the rows that want logits. [`launch`] only queues kernels (it
//! allocates, copies and waits for nothing, unless a tap copies), so the
//! same launches run eagerly on buffers sized for one batch, or are
//! captured once into a graph over buffers sized for a bucket of batches
//! (`graphs`).
//!
//! Invariant: a row's logits and features depend on its own token's
//! inputs and the K/V it attends alone; a padding row (token 0, no keys,
//! slot -1) writes no K/V, and no other row reads it.

use std::ops::RangeInclusive;

use super::layer::{run_layer, split_len, Scratch, StepInputs};
use super::{Backend, DeviceKv, GpuModel};
use crate::config::ModelConfig;
use crate::error::Result;

/// What one sequence of launches runs: its token and logits-row counts
/// (a graph's bucket, or one batch's), its layers, and whether the final
/// norm runs on every token (a `Final` feature tap, into
/// `scratch.normed`) rather than on the logits rows alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Shape {
    pub tokens: usize,
    pub rows: usize,
    pub num_layers: usize,
    pub final_features: bool,
}

/// A forward's device buffers, for up to `tokens` tokens and `rows`
/// logits rows.
pub(super) struct Buffers<B: Backend> {
    pub step: StepInputs<B>,
    /// The tokens whose logits are computed (indices into the tokens).
    row_ids: B::Ints,
    x: B::Floats,
    pub scratch: Scratch<B>,
    picked: B::Floats,
    selected: B::Floats,
    /// `(rows, vocab)`: the logits rows, in `row_ids` order.
    pub logits: B::Floats,
    /// The output layer's partial sums.
    part: B::Floats,
    pub tokens: usize,
    pub rows: usize,
}

impl<B: Backend> Buffers<B> {
    /// Buffers for a forward of `tokens` tokens and `rows` logits rows.
    pub fn new(b: &B, c: &ModelConfig, step: StepInputs<B>, tokens: usize, rows: usize) -> Result<Self> {
        let scratch = Scratch::new(b, tokens, c)?;
        Self::with(b, c, (step, scratch), (tokens, rows), rows..=rows)
    }

    /// Buffers for forwards of up to `tokens` tokens and `rows` rows (a
    /// graph's, shared by every bucket).
    pub fn up_to(b: &B, c: &ModelConfig, step: StepInputs<B>, tokens: usize, rows: usize) -> Result<Self> {
        let scratch = Scratch::up_to(b, tokens, c)?;
        Self::with(b, c, (step, scratch), (tokens, rows), 1..=rows)
    }

    fn with(
        b: &B,
        c: &ModelConfig,
        (step, scratch): (StepInputs<B>, Scratch<B>),
        (tokens, rows): (usize, usize),
        row_counts: RangeInclusive<usize>,
    ) -> Result<Self> {
        let (h, vocab) = (c.hidden_size, c.vocab_size);
        Ok(Buffers {
            step,
            row_ids: b.upload_ints(&vec![0; rows])?,
            x: b.zeros(tokens * h)?,
            scratch,
            picked: b.zeros(rows * h)?,
            selected: b.zeros(rows * h)?,
            logits: b.zeros(rows * vocab)?,
            part: b.zeros(split_len(b, row_counts, &[(vocab, h)]))?,
            tokens,
            rows,
        })
    }

    /// The logits rows' token indices (at most `rows`).
    pub fn write_rows(&mut self, b: &B, rows: &[i32]) -> Result<()> {
        b.write_ints(&mut self.row_ids, rows)
    }
}

/// A tap on the residual stream: called with it before each layer `l`
/// (and with `l` = the layer count after the last).
pub(super) type Taps<'a, F> = &'a mut dyn FnMut(&F, usize) -> Result<()>;

/// Queues the forward of the tokens in `buf.step` at `shape`, writing
/// their K/V into `kv`; the logits rows end in `buf.logits`, and with
/// `final_features` every token's final-norm state in `buf.scratch.normed`.
pub(super) fn launch<B: Backend>(
    model: &GpuModel<B>,
    kv: &mut DeviceKv<B>,
    buf: &mut Buffers<B>,
    shape: Shape,
    mut taps: Option<Taps<'_, B::Floats>>,
) -> Result<()> {
    let (c, b) = (&model.config, &*model.backend);
    let (n, rows, h, eps) = (shape.tokens, shape.rows, c.hidden_size, c.rms_norm_eps);
    // Baked into a capture: this shape's token count, this KV's block size.
    buf.step.shape.tokens = n;
    buf.step.shape.block_size = kv.block_size;
    buf.step.embed(b, model.embeddings(), &mut buf.x, h)?;
    for (li, layer) in model.layers.iter().take(shape.num_layers).enumerate() {
        if let Some(tap) = taps.as_mut() {
            tap(&buf.x, li)?;
        }
        let layer_kv = (&mut kv.keys[li], &mut kv.values[li]);
        run_layer(b, c, layer, &mut buf.x, &mut buf.scratch, &buf.step, layer_kv)?;
    }
    if let Some(tap) = taps {
        tap(&buf.x, shape.num_layers)?;
    }
    if shape.final_features {
        b.rms_norm(&buf.x, &model.output_norm, &mut buf.scratch.normed, (n, h), eps)?;
    }
    if rows == 0 {
        return Ok(());
    }
    if shape.final_features {
        b.gather_rows(&buf.scratch.normed, &buf.row_ids, &mut buf.selected, (rows, h))?;
    } else {
        b.gather_rows(&buf.x, &buf.row_ids, &mut buf.picked, (rows, h))?;
        b.rms_norm(&buf.picked, &model.output_norm, &mut buf.selected, (rows, h), eps)?;
    }
    let mnk = (rows, c.vocab_size, h);
    b.matmul_in(
        &buf.selected,
        &model.lm_head,
        &mut buf.logits,
        &mut buf.part,
        mnk,
        false,
    )
}
