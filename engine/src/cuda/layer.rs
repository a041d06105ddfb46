//! One llama decoder layer on a [`Backend`], shared by the target's forward
//! and a draft head's: the inputs every layer of one forward reads (RoPE
//! tables, KV slots, attention key lists), the forward's scratch buffers,
//! and the layer itself.
//!
//! Invariant: a layer's output row depends on that row and the K/V it
//! attends to alone (every kernel is row-independent, see `kernels.cu`).

use std::ops::RangeInclusive;

use super::{int, AttentionKeys, AttentionShape, Backend, KEY_FIELDS};
use crate::batch::RaggedBatch;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::ops::RopeTable;

/// One layer's weights: norms in f32 (`F`), matrices in bf16 (`H`).
pub(super) struct DeviceLayer<F, H> {
    /// `None`: the attention reads the layer's input as it is (a draft
    /// head's first layer, whose input is `fc`'s output).
    pub attn_norm: Option<F>,
    pub wq: H,
    pub wk: H,
    pub wv: H,
    pub wo: H,
    pub ffn_norm: F,
    pub w_gate: H,
    pub w_up: H,
    pub w_down: H,
}

/// A forward's inputs on the host: its tokens' ids, RoPE tables, KV slots
/// and key lists, built from the batch, then perhaps padded.
#[derive(Clone)]
pub(super) struct HostInputs {
    ids: Vec<i32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    slots: Vec<i32>,
    keys: AttentionKeys,
    half: usize,
}

impl HostInputs {
    pub fn new(batch: &RaggedBatch, c: &ModelConfig) -> Self {
        let positions = batch.seqs.iter().flat_map(|s| s.positions.iter().copied());
        let table = RopeTable::for_model(
            positions,
            c.head_dim,
            c.rope_theta,
            c.rope_freq_factors.as_deref(),
            false,
        );
        HostInputs {
            ids: batch
                .seqs
                .iter()
                .flat_map(|s| s.token_ids.iter().map(|&t| t as i32))
                .collect(),
            cos: table.cos,
            sin: table.sin,
            slots: batch
                .seqs
                .iter()
                .flat_map(|s| s.slots.iter().map(|&v| int(v)))
                .collect(),
            keys: AttentionKeys::new(batch),
            half: c.head_dim / 2,
        }
    }

    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// Ints of the block tables and of the extra key lists.
    pub fn key_lens(&self) -> (usize, usize) {
        (self.keys.tables.len(), self.keys.lists.len())
    }

    /// Pads to `tokens` with rows that change no other row: token 0, a
    /// zero rotation, slot -1 (its K/V written nowhere), no keys.
    pub fn pad_to(&mut self, tokens: usize) {
        let pad = tokens.saturating_sub(self.tokens());
        self.ids.extend(std::iter::repeat_n(0, pad));
        self.cos.extend(std::iter::repeat_n(0.0, pad * self.half));
        self.sin.extend(std::iter::repeat_n(0.0, pad * self.half));
        self.slots.extend(std::iter::repeat_n(-1, pad));
        self.keys.keys.extend(std::iter::repeat_n(0, pad * KEY_FIELDS));
    }
}

/// What every layer of one forward reads: the tokens' ids, RoPE tables,
/// KV slots and the keys each attends to, on the device.
pub(super) struct StepInputs<B: Backend> {
    ids: B::Ints,
    cos: B::Floats,
    sin: B::Floats,
    slots: B::Ints,
    keys: [B::Ints; 4],
    /// `tokens` is the launches' token count (a graph's bucket).
    pub shape: AttentionShape,
    /// Ints the block-table and key-list buffers hold.
    lens: (usize, usize),
}

impl<B: Backend> StepInputs<B> {
    /// `host`, uploaded.
    pub fn upload(b: &B, host: &HostInputs, c: &ModelConfig, block_size: usize) -> Result<Self> {
        Ok(StepInputs {
            ids: b.upload_ints(&host.ids)?,
            cos: b.upload(&host.cos)?,
            sin: b.upload(&host.sin)?,
            slots: b.upload_ints(&host.slots)?,
            keys: [
                b.upload_ints(&host.keys.keys)?,
                b.upload_ints(&host.keys.tables)?,
                b.upload_ints(&host.keys.lists)?,
                b.upload_ints(&host.keys.run_slots)?,
            ],
            shape: attention_shape(c, host.tokens(), block_size),
            lens: host.key_lens(),
        })
    }

    /// Buffers for up to `tokens` tokens whose block tables and key lists
    /// take up to `lens` ints, filled by [`StepInputs::write`].
    pub fn reserve(b: &B, c: &ModelConfig, block_size: usize, tokens: usize, lens: (usize, usize)) -> Result<Self> {
        let half = c.head_dim / 2;
        let ints = |n: usize| b.upload_ints(&vec![0; n]);
        Ok(StepInputs {
            ids: ints(tokens)?,
            cos: b.zeros(tokens * half)?,
            sin: b.zeros(tokens * half)?,
            slots: ints(tokens)?,
            keys: [ints(tokens * KEY_FIELDS)?, ints(lens.0)?, ints(lens.1)?, ints(tokens)?],
            shape: attention_shape(c, tokens, block_size),
            lens,
        })
    }

    /// Ints the block-table and key-list buffers hold.
    pub fn lens(&self) -> (usize, usize) {
        self.lens
    }

    /// Whether `host`'s key lists fit these buffers.
    pub fn fits(&self, host: &HostInputs) -> bool {
        let (tables, lists) = host.key_lens();
        tables <= self.lens.0 && lists <= self.lens.1
    }

    /// `host` into these buffers (sized by [`StepInputs::reserve`] for
    /// at least its tokens, and [`StepInputs::fits`]).
    pub fn write(&mut self, b: &B, host: &HostInputs) -> Result<()> {
        b.write_ints(&mut self.ids, &host.ids)?;
        b.write(&mut self.cos, &host.cos)?;
        b.write(&mut self.sin, &host.sin)?;
        b.write_ints(&mut self.slots, &host.slots)?;
        let k = &host.keys;
        for (buf, host) in self.keys.iter_mut().zip([&k.keys, &k.tables, &k.lists, &k.run_slots]) {
            b.write_ints(buf, host)?;
        }
        Ok(())
    }

    /// The tokens' embeddings `(tokens, h)` into `x`, gathered from `table`
    /// (ids already checked against the vocabulary).
    pub fn embed(&self, b: &B, table: &B::Halves, x: &mut B::Floats, h: usize) -> Result<()> {
        b.embed_rows(table, &self.ids, x, (self.shape.tokens, h))
    }
}

fn attention_shape(c: &ModelConfig, tokens: usize, block_size: usize) -> AttentionShape {
    AttentionShape {
        tokens,
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        block_size,
    }
}

/// A forward's working buffers, sized for its tokens.
pub(super) struct Scratch<B: Backend> {
    pub normed: B::Floats,
    q: B::Floats,
    k: B::Floats,
    v: B::Floats,
    attn: B::Floats,
    gate: B::Floats,
    up: B::Floats,
    /// The layer GEMMs' partial sums.
    part: B::Floats,
}

impl<B: Backend> Scratch<B> {
    /// Buffers for a forward of `tokens` tokens.
    pub fn new(b: &B, tokens: usize, c: &ModelConfig) -> Result<Self> {
        Self::sized(b, tokens, c, tokens..=tokens)
    }

    /// Buffers for forwards of any count of tokens up to `tokens` (whose
    /// GEMMs may split along k where more rows do not).
    pub fn up_to(b: &B, tokens: usize, c: &ModelConfig) -> Result<Self> {
        Self::sized(b, tokens, c, 1..=tokens)
    }

    fn sized(b: &B, tokens: usize, c: &ModelConfig, counts: RangeInclusive<usize>) -> Result<Self> {
        let (h, qs, kvs, ff) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
        let shapes = [(qs, h), (kvs, h), (h, qs), (ff, h), (h, ff)];
        Ok(Scratch {
            normed: b.zeros(tokens * h)?,
            q: b.zeros(tokens * qs)?,
            k: b.zeros(tokens * kvs)?,
            v: b.zeros(tokens * kvs)?,
            attn: b.zeros(tokens * qs)?,
            gate: b.zeros(tokens * ff)?,
            up: b.zeros(tokens * ff)?,
            part: b.zeros(split_len(b, counts, &shapes))?,
        })
    }
}

/// The most partial sums a GEMM of one of the row `counts` and one of
/// the `(n, k)` shapes keeps.
pub(super) fn split_len<B: Backend>(b: &B, counts: RangeInclusive<usize>, shapes: &[(usize, usize)]) -> usize {
    counts
        .flat_map(|m| shapes.iter().map(move |&(n, k)| b.split_len((m, n, k))))
        .max()
        .unwrap_or(1)
}

/// Runs `layer` (of a model shaped as `c`) on the residual stream `x`
/// `(tokens, hidden)`, writing the tokens' K/V into `kv` at their slots.
pub(super) fn run_layer<B: Backend>(
    b: &B,
    c: &ModelConfig,
    layer: &DeviceLayer<B::Floats, B::Halves>,
    x: &mut B::Floats,
    s: &mut Scratch<B>,
    step: &StepInputs<B>,
    (keys, values): (&mut B::Floats, &mut B::Floats),
) -> Result<()> {
    let n = step.shape.tokens;
    let (h, qs, kvs, ff) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
    let (eps, half) = (c.rms_norm_eps, c.head_dim / 2);
    let input = match &layer.attn_norm {
        Some(w) => {
            b.rms_norm(x, w, &mut s.normed, (n, h), eps)?;
            &s.normed
        }
        None => &*x,
    };
    b.matmul_in(input, &layer.wq, &mut s.q, &mut s.part, (n, qs, h), false)?;
    b.matmul_in(input, &layer.wk, &mut s.k, &mut s.part, (n, kvs, h), false)?;
    b.matmul_in(input, &layer.wv, &mut s.v, &mut s.part, (n, kvs, h), false)?;
    b.rope(&mut s.q, &step.cos, &step.sin, (n, c.num_heads, half))?;
    b.rope(&mut s.k, &step.cos, &step.sin, (n, c.num_kv_heads, half))?;
    b.scatter_rows(keys, &s.k, &step.slots, (n, kvs))?;
    b.scatter_rows(values, &s.v, &step.slots, (n, kvs))?;
    b.attention(&s.q, (keys, values), &mut s.attn, &step.keys, step.shape)?;
    b.matmul_in(&s.attn, &layer.wo, x, &mut s.part, (n, h, qs), true)?;
    b.rms_norm(x, &layer.ffn_norm, &mut s.normed, (n, h), eps)?;
    b.matmul_in(&s.normed, &layer.w_gate, &mut s.gate, &mut s.part, (n, ff, h), false)?;
    b.matmul_in(&s.normed, &layer.w_up, &mut s.up, &mut s.part, (n, ff, h), false)?;
    b.silu_mul(&mut s.gate, &s.up, n * ff)?;
    b.matmul_in(&s.gate, &layer.w_down, x, &mut s.part, (n, h, ff), true)
}
