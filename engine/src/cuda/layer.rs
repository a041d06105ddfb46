//! One llama decoder layer on a [`Backend`], shared by the target's forward
//! and a draft head's: the inputs every layer of one forward reads (RoPE
//! tables, KV slots, attention key lists), the forward's scratch buffers,
//! and the layer itself.
//!
//! Invariant: a layer's output row depends on that row and the K/V it
//! attends to alone (every kernel is row-independent, see `kernels.cu`).

use super::{int, AttentionKeys, AttentionShape, Backend};
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

/// What every layer of one forward reads: the tokens' RoPE tables, their
/// KV slots and the keys each attends to, uploaded once.
pub(super) struct StepInputs<B: Backend> {
    cos: B::Floats,
    sin: B::Floats,
    slots: B::Ints,
    keys: [B::Ints; 4],
    shape: AttentionShape,
}

impl<B: Backend> StepInputs<B> {
    pub fn new(b: &B, batch: &RaggedBatch, c: &ModelConfig, block_size: usize) -> Result<Self> {
        let positions = batch.seqs.iter().flat_map(|s| s.positions.iter().copied());
        let table = RopeTable::for_model(
            positions,
            c.head_dim,
            c.rope_theta,
            c.rope_freq_factors.as_deref(),
            false,
        );
        let slots: Vec<i32> = batch
            .seqs
            .iter()
            .flat_map(|s| s.slots.iter().map(|&v| int(v)))
            .collect();
        let keys = AttentionKeys::new(batch);
        Ok(StepInputs {
            cos: b.upload(&table.cos)?,
            sin: b.upload(&table.sin)?,
            slots: b.upload_ints(&slots)?,
            keys: [
                b.upload_ints(&keys.keys)?,
                b.upload_ints(&keys.tables)?,
                b.upload_ints(&keys.lists)?,
                b.upload_ints(&keys.run_slots)?,
            ],
            shape: AttentionShape {
                tokens: batch.num_tokens(),
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                block_size,
            },
        })
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
}

impl<B: Backend> Scratch<B> {
    pub fn new(b: &B, tokens: usize, c: &ModelConfig) -> Result<Self> {
        let (h, qs, kvs, ff) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
        Ok(Scratch {
            normed: b.zeros(tokens * h)?,
            q: b.zeros(tokens * qs)?,
            k: b.zeros(tokens * kvs)?,
            v: b.zeros(tokens * kvs)?,
            attn: b.zeros(tokens * qs)?,
            gate: b.zeros(tokens * ff)?,
            up: b.zeros(tokens * ff)?,
        })
    }
}

/// The embeddings of `batch`'s tokens `(tokens, h)`, gathered on the
/// device from `table` (ids already checked against the vocabulary).
pub(super) fn embed_batch<B: Backend>(b: &B, table: &B::Halves, batch: &RaggedBatch, h: usize) -> Result<B::Floats> {
    let ids: Vec<i32> = batch
        .seqs
        .iter()
        .flat_map(|s| s.token_ids.iter().map(|&t| t as i32))
        .collect();
    let mut x = b.zeros(ids.len() * h)?;
    b.embed_rows(table, &b.upload_ints(&ids)?, &mut x, (ids.len(), h))?;
    Ok(x)
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
    b.matmul(input, &layer.wq, &mut s.q, (n, qs, h), false)?;
    b.matmul(input, &layer.wk, &mut s.k, (n, kvs, h), false)?;
    b.matmul(input, &layer.wv, &mut s.v, (n, kvs, h), false)?;
    b.rope(&mut s.q, &step.cos, &step.sin, (n, c.num_heads, half))?;
    b.rope(&mut s.k, &step.cos, &step.sin, (n, c.num_kv_heads, half))?;
    b.scatter_rows(keys, &s.k, &step.slots, (n, kvs))?;
    b.scatter_rows(values, &s.v, &step.slots, (n, kvs))?;
    b.attention(&s.q, (keys, values), &mut s.attn, &step.keys, step.shape)?;
    b.matmul(&s.attn, &layer.wo, x, (n, h, qs), true)?;
    b.rms_norm(x, &layer.ffn_norm, &mut s.normed, (n, h), eps)?;
    b.matmul(&s.normed, &layer.w_gate, &mut s.gate, (n, ff, h), false)?;
    b.matmul(&s.normed, &layer.w_up, &mut s.up, (n, ff, h), false)?;
    b.silu_mul(&mut s.gate, &s.up, n * ff)?;
    b.matmul(&s.gate, &layer.w_down, x, (n, h, ff), true)
}
