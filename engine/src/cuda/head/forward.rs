//! One tree layer of a draft head on the device, as launches over buffers
//! it is handed ([`HeadBuffers`]): the rows' embeddings and stored
//! features, `fc`, the layers, the optional norm, the output layer, the
//! new predictions into the store, and each row's best few ids. [`launch`]
//! only queues kernels, so the same launches run eagerly on buffers sized
//! for one layer, or are captured once into a graph over buffers sized for
//! a bucket (`graphs::GraphCache`).
//!
//! Invariant: a row's picks depend on its own token, the feature row it
//! reads and the K/V it attends alone; a padding token (token 0, the zero
//! feature row, no keys, slot -1) writes no K/V, and a padding logits row
//! (store slot -1) is stored nowhere.

use std::ops::RangeInclusive;

use super::super::layer::{run_layer, split_len, DeviceLayer, HostInputs, Scratch, StepInputs};
use super::super::{int, Backend, DeviceKv};
use crate::batch::RaggedBatch;
use crate::config::ModelConfig;
use crate::device_head::logits_slots;
use crate::error::Result;

/// A draft head's weights on the device: matrices bf16, norms and the
/// `fc` bias f32.
pub(super) struct Weights<B: Backend> {
    pub config: ModelConfig,
    /// The target's token embeddings (shared, bf16).
    pub embeddings: std::sync::Arc<B::Halves>,
    /// `fc`'s columns over the embedding and over the feature, `(h, h)` each.
    pub fc_embedding: B::Halves,
    pub fc_feature: B::Halves,
    /// `fc`'s bias, one row `(1, h)`.
    pub fc_bias: Option<B::Floats>,
    pub layers: Vec<DeviceLayer<B::Floats, B::Halves>>,
    pub output_norm: Option<B::Floats>,
    pub lm_head: B::Halves,
    pub draft_vocab: usize,
}

/// What one tree layer's launches run: tokens, logits rows, picks per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct HeadShape {
    pub tokens: usize,
    pub rows: usize,
    pub m: usize,
}

/// A tree layer's inputs on the host, perhaps padded.
#[derive(Clone)]
pub(super) struct HeadInputs {
    pub step: HostInputs,
    /// Per token, the store row it reads.
    reads: Vec<i32>,
    /// The tokens whose picks are wanted.
    rows: Vec<i32>,
    /// Per logits row, the store slot its prediction goes to.
    written: Vec<i32>,
}

impl HeadInputs {
    /// `inputs` per token: the store row it reads, `None` for `zero_row`.
    pub fn new(batch: &RaggedBatch, c: &ModelConfig, inputs: &[Option<usize>], zero_row: usize) -> Self {
        HeadInputs {
            step: HostInputs::new(batch, c),
            reads: inputs.iter().map(|i| int(i.unwrap_or(zero_row))).collect(),
            rows: batch.logits_token_rows().map(int).collect(),
            written: logits_slots(batch).into_iter().map(int).collect(),
        }
    }

    pub fn shape(&self, m: usize) -> HeadShape {
        HeadShape {
            tokens: self.reads.len(),
            rows: self.rows.len(),
            m,
        }
    }

    /// Pads to `shape`: tokens as `HostInputs::pad_to` does, reading
    /// `zero_row`; rows that read token 0 and are stored nowhere.
    pub fn pad_to(&mut self, shape: HeadShape, zero_row: usize) {
        self.step.pad_to(shape.tokens);
        self.reads.resize(shape.tokens, int(zero_row));
        self.rows.resize(shape.rows, 0);
        self.written.resize(shape.rows, -1);
    }
}

/// A tree layer's device buffers, for up to `tokens` tokens, `rows` rows
/// and `m` picks per row.
pub(super) struct HeadBuffers<B: Backend> {
    pub step: StepInputs<B>,
    reads: B::Ints,
    /// Zeros: every row reads the bias's one row.
    bias_rows: B::Ints,
    row_ids: B::Ints,
    written: B::Ints,
    embedded: B::Floats,
    features: B::Floats,
    x: B::Floats,
    scratch: Scratch<B>,
    hidden: B::Floats,
    normed: B::Floats,
    logits: B::Floats,
    /// `fc`'s and the output layer's partial sums.
    part: B::Floats,
    /// `(rows, m)`: each row's best ids, largest first, and logprobs.
    pub top_ids: B::Ints,
    pub top_logprobs: B::Floats,
    pub tokens: usize,
    pub rows: usize,
    pub m: usize,
}

impl<B: Backend> HeadBuffers<B> {
    /// Buffers for exactly `shape` (`step` for its tokens).
    pub fn new(b: &B, w: &Weights<B>, step: StepInputs<B>, shape: HeadShape) -> Result<Self> {
        let scratch = Scratch::new(b, shape.tokens, &w.config)?;
        let counts = (shape.tokens..=shape.tokens, shape.rows..=shape.rows);
        Self::with(b, w, (step, scratch), shape, counts)
    }

    /// Buffers for any shape up to `shape` (a graph's, shared by every
    /// bucket).
    pub fn up_to(b: &B, w: &Weights<B>, step: StepInputs<B>, shape: HeadShape) -> Result<Self> {
        let scratch = Scratch::up_to(b, shape.tokens, &w.config)?;
        Self::with(b, w, (step, scratch), shape, (1..=shape.tokens, 1..=shape.rows))
    }

    fn with(
        b: &B,
        w: &Weights<B>,
        (step, scratch): (StepInputs<B>, Scratch<B>),
        s: HeadShape,
        (token_counts, row_counts): (RangeInclusive<usize>, RangeInclusive<usize>),
    ) -> Result<Self> {
        let (h, v) = (w.config.hidden_size, w.draft_vocab);
        let ints = |n: usize| b.upload_ints(&vec![0; n]);
        let part = split_len(b, token_counts, &[(h, h)]).max(split_len(b, row_counts, &[(v, h)]));
        Ok(HeadBuffers {
            step,
            reads: ints(s.tokens)?,
            bias_rows: ints(s.tokens)?,
            row_ids: ints(s.rows)?,
            written: ints(s.rows)?,
            embedded: b.zeros(s.tokens * h)?,
            features: b.zeros(s.tokens * h)?,
            x: b.zeros(s.tokens * h)?,
            scratch,
            hidden: b.zeros(s.rows * h)?,
            normed: b.zeros(s.rows * h)?,
            logits: b.zeros(s.rows * v)?,
            part: b.zeros(part)?,
            top_ids: ints(s.rows * s.m)?,
            top_logprobs: b.zeros(s.rows * s.m)?,
            tokens: s.tokens,
            rows: s.rows,
            m: s.m,
        })
    }

    /// Whether these buffers hold `shape` and `inputs`' key lists.
    pub fn fits(&self, shape: HeadShape, inputs: &HeadInputs) -> bool {
        self.tokens >= shape.tokens && self.rows >= shape.rows && self.m >= shape.m && self.step.fits(&inputs.step)
    }

    /// `inputs` into these buffers.
    pub fn write(&mut self, b: &B, inputs: &HeadInputs) -> Result<()> {
        self.step.write(b, &inputs.step)?;
        self.write_rows(b, inputs)
    }

    /// `inputs`' feature reads, logits rows and store slots into these
    /// buffers (the step inputs are uploaded or written apart).
    pub fn write_rows(&mut self, b: &B, inputs: &HeadInputs) -> Result<()> {
        b.write_ints(&mut self.reads, &inputs.reads)?;
        b.write_ints(&mut self.row_ids, &inputs.rows)?;
        b.write_ints(&mut self.written, &inputs.written)
    }
}

/// Queues one tree layer at `shape` over `buf`: reads `store`'s rows,
/// writes the tokens' K/V into `kv` and the rows' predictions into
/// `store`, and leaves each row's best `m` ids and logprobs in
/// `buf.top_ids` and `buf.top_logprobs`.
pub(super) fn launch<B: Backend>(
    b: &B,
    w: &Weights<B>,
    store: &mut B::Floats,
    kv: &mut DeviceKv<B>,
    buf: &mut HeadBuffers<B>,
    s: HeadShape,
) -> Result<()> {
    let c = &w.config;
    let (n, r, h) = (s.tokens, s.rows, c.hidden_size);
    // Baked into a capture: this shape's token count, this KV's block size.
    buf.step.shape.tokens = n;
    buf.step.shape.block_size = kv.block_size;
    buf.step.embed(b, &w.embeddings, &mut buf.embedded, h)?;
    b.gather_rows(store, &buf.reads, &mut buf.features, (n, h))?;
    // The bias first, then both halves of `fc` added to it.
    let with_bias = match &w.fc_bias {
        Some(bias) => {
            b.gather_rows(bias, &buf.bias_rows, &mut buf.x, (n, h))?;
            true
        }
        None => false,
    };
    let mnk = (n, h, h);
    b.matmul_in(
        &buf.embedded,
        &w.fc_embedding,
        &mut buf.x,
        &mut buf.part,
        mnk,
        with_bias,
    )?;
    b.matmul_in(&buf.features, &w.fc_feature, &mut buf.x, &mut buf.part, mnk, true)?;
    for (li, layer) in w.layers.iter().enumerate() {
        let layer_kv = (&mut kv.keys[li], &mut kv.values[li]);
        run_layer(b, c, layer, &mut buf.x, &mut buf.scratch, &buf.step, layer_kv)?;
    }
    if r == 0 {
        return Ok(());
    }
    b.gather_rows(&buf.x, &buf.row_ids, &mut buf.hidden, (r, h))?;
    let out = match &w.output_norm {
        Some(norm) => {
            b.rms_norm(&buf.hidden, norm, &mut buf.normed, (r, h), c.rms_norm_eps)?;
            &buf.normed
        }
        None => &buf.hidden,
    };
    let mnk = (r, w.draft_vocab, h);
    b.matmul_in(out, &w.lm_head, &mut buf.logits, &mut buf.part, mnk, false)?;
    b.scatter_rows(store, &buf.hidden, &buf.written, (r, h))?;
    if s.m == 0 {
        return Ok(());
    }
    b.top_rows(
        &buf.logits,
        &mut buf.top_ids,
        &mut buf.top_logprobs,
        (r, w.draft_vocab, s.m),
    )
}
