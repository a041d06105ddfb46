//! One llama-family decoder layer on the CPU: RMSNorm, q/k/v projections
//! (with the architecture's biases and per-head q/k norms, see
//! `config::BlockSpec`), RoPE, paged attention over KV storage (within the
//! layer's sliding window, if any), the output projection and the gated MLP
//! (SiLU or GELU), each residual (with post-norms where the block has
//! them). The target's layers and a draft head's share it.
//!
//! Invariant: the layer writes the K/V of exactly the context's slots and
//! reads KV only through the batch's block tables and masks.

use crate::attention::{paged_attention, HeadShape};
use crate::batch::RaggedBatch;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv::KvStorage;
use crate::linear::{forward_many_into, Linear, LinearInput, WeightFormat};
use crate::ops::{gelu_mul, rms_norm_in_place, rms_norm_rows, silu_mul, RopeTable};
use candle_core::quantized::QTensor;

/// One decoder layer.
pub(crate) struct Layer {
    /// `None`: the layer reads its input unnormalised (an EAGLE head's
    /// first layer, whose input is already a projected feature).
    attn_norm: Option<Vec<f32>>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
    /// What the architecture adds to the llama block.
    block: BlockParts,
}

/// A layer's share of what its architecture adds to the llama block (see
/// `config::BlockSpec`).
#[derive(Default)]
pub(crate) struct BlockParts {
    /// Biases of q, k and v (Qwen2).
    pub(crate) qkv_bias: Option<[Vec<f32>; 3]>,
    /// RMSNorm weights over each head of q and of k (Qwen3, Gemma 3).
    pub(crate) qk_norm: Option<[Vec<f32>; 2]>,
    /// RMSNorm weights of the attention's and the MLP's outputs (Gemma).
    pub(crate) post_norms: Option<[Vec<f32>; 2]>,
    /// GELU (tanh) gating instead of SiLU (Gemma).
    pub(crate) gelu: bool,
    /// The layer's sliding window, if it has one.
    pub(crate) window: Option<usize>,
    /// The layer rotates with the windowed layers' RoPE base.
    pub(crate) local_rope: bool,
}

/// What every layer of one forward shares: token owners, KV slots, RoPE.
pub(crate) struct ForwardContext {
    n: usize,
    token_owner: Vec<(usize, usize)>,
    slots: Vec<usize>,
    rope: RopeTable,
    /// The windowed layers' RoPE, where their base differs.
    local_rope: Option<RopeTable>,
    shape: HeadShape,
    eps: f32,
    /// Per-forward buffers every layer reuses.
    buffers: std::cell::RefCell<Buffers>,
}

/// The activations of one layer, `(tokens, width)` each, sized by the
/// first layer of a forward and reused by the others (no allocation or
/// zeroing per product).
#[derive(Default)]
struct Buffers {
    /// Normed input `(tokens, hidden)`.
    normed: Vec<f32>,
    /// Attention output `(tokens, heads * head_dim)`.
    attn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

/// `buf` as `len` values: grown (with zeros) only when it is too short,
/// so a buffer of the right size is handed back as it is.
fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

impl ForwardContext {
    pub(crate) fn new(batch: &RaggedBatch, c: &ModelConfig, block_size: usize) -> Self {
        let rope = |theta| {
            RopeTable::for_model(
                batch.seqs.iter().flat_map(|s| s.positions.iter().copied()),
                c.head_dim,
                theta,
                c.rope_freq_factors.as_deref(),
                c.block.rope_neox,
            )
        };
        ForwardContext {
            n: batch.num_tokens(),
            token_owner: batch.token_owners(),
            slots: batch.seqs.iter().flat_map(|s| s.slots.iter().copied()).collect(),
            rope: rope(c.rope_theta),
            local_rope: c
                .block
                .local_rope_theta
                .filter(|_| c.sliding_window.is_some())
                .map(rope),
            shape: HeadShape {
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                block_size,
                scale: 1.0 / (c.attn_scale_dim as f32).sqrt(),
                window: None,
            },
            eps: c.rms_norm_eps,
            buffers: std::cell::RefCell::new(Buffers {
                normed: vec![0.0; batch.num_tokens() * c.hidden_size],
                attn: vec![0.0; batch.num_tokens() * c.q_size()],
                ..Buffers::default()
            }),
        }
    }
}

impl Layer {
    /// Weights `[q, k, v, o, gate, up, down]` (out, in) and norms.
    pub(crate) fn from_parts(
        attn_norm: Option<Vec<f32>>,
        ffn_norm: Vec<f32>,
        [wq, wk, wv, wo, w_gate, w_up, w_down]: [QTensor; 7],
        format: WeightFormat,
    ) -> Result<Self> {
        Ok(Layer {
            attn_norm,
            wq: Linear::new(wq, format)?,
            wk: Linear::new(wk, format)?,
            wv: Linear::new(wv, format)?,
            wo: Linear::new(wo, format)?,
            ffn_norm,
            w_gate: Linear::new(w_gate, format)?,
            w_up: Linear::new(w_up, format)?,
            w_down: Linear::new(w_down, format)?,
            block: BlockParts::default(),
        })
    }

    /// The layer with its architecture's additions to the llama block.
    pub(crate) fn with_block(mut self, block: BlockParts) -> Self {
        self.block = block;
        self
    }

    /// Attention (writing this layer's K/V at the context's slots into
    /// `kv` layer `kv_layer`) and the gated MLP, both residual, on `x`
    /// `(tokens, hidden)`.
    pub(crate) fn forward(
        &self,
        x: &mut [f32],
        ctx: &ForwardContext,
        batch: &RaggedBatch,
        kv: &mut KvStorage,
        kv_layer: usize,
    ) -> Result<()> {
        self.forward_from(x, None, ctx, batch, kv, kv_layer)
    }

    /// [`Layer::forward`] whose attention projections read `attn_input`
    /// `(tokens, in)` instead of the (normed) residual stream: EAGLE-3's
    /// layer attends over `[embedding | feature]` of width `2 * hidden`.
    pub(crate) fn forward_from(
        &self,
        x: &mut [f32],
        attn_input: Option<&[f32]>,
        ctx: &ForwardContext,
        batch: &RaggedBatch,
        kv: &mut KvStorage,
        kv_layer: usize,
    ) -> Result<()> {
        let n = ctx.n;
        let block = &self.block;
        let shape = HeadShape {
            window: block.window,
            ..ctx.shape
        };
        // Extra slots (a draft node's ancestors) hold positions from
        // `num_cached` on: all within the window while the node is.
        if let Some(w) = block.window {
            let beyond = |s: &crate::batch::SeqRun| {
                (s.extra_slots.iter().zip(&s.positions))
                    .any(|(e, &p)| !e.is_empty() && (p + 1).saturating_sub(w) > s.num_cached)
            };
            if batch.seqs.iter().any(beyond) {
                return Err(EngineError::Config(format!(
                    "a draft tree deeper than the {w}-token sliding window"
                )));
            }
        }
        let kvs = shape.num_kv_heads * shape.head_dim;
        let mut buffers = ctx.buffers.borrow_mut();
        let Buffers {
            normed,
            attn,
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
        } = &mut *buffers;
        let input = match (attn_input, &self.attn_norm) {
            (Some(a), _) => LinearInput::new(a, n),
            (None, Some(w)) => {
                rms_norm_rows(x, w, ctx.eps, normed);
                LinearInput::new(normed, n)
            }
            (None, None) => LinearInput::new(x, n),
        };
        // q (tokens, heads, head_dim); k, v (tokens, kv_heads, head_dim)
        let q = sized(q, n * self.wq.out_features);
        let k = sized(k, n * self.wk.out_features);
        let v = sized(v, n * self.wv.out_features);
        forward_many_into(&input, [&self.wq, &self.wk, &self.wv], [&mut *q, &mut *k, &mut *v])?;
        drop(input);
        if let Some(biases) = &block.qkv_bias {
            for (x, b) in [&mut *q, &mut *k, &mut *v].into_iter().zip(biases) {
                for row in x.chunks_exact_mut(b.len()) {
                    add_into(row, b);
                }
            }
        }
        if let Some([q_norm, k_norm]) = &block.qk_norm {
            rms_norm_in_place(q, q_norm, ctx.eps);
            rms_norm_in_place(k, k_norm, ctx.eps);
        }
        let rope = match (&ctx.local_rope, block.local_rope) {
            (Some(local), true) => local,
            _ => &ctx.rope,
        };
        rope.apply(q, shape.num_heads);
        rope.apply(k, shape.num_kv_heads);
        for (t, &slot) in ctx.slots.iter().enumerate() {
            kv.write(kv_layer, slot, &k[t * kvs..(t + 1) * kvs], &v[t * kvs..(t + 1) * kvs]);
        }
        paged_attention(q, batch, &ctx.token_owner, kv.layer(kv_layer), shape, attn);
        let o = sized(o, n * self.wo.out_features);
        self.wo.forward_into(&LinearInput::new(attn, n), o)?;
        if let Some([post_attn, _]) = &block.post_norms {
            rms_norm_in_place(o, post_attn, ctx.eps);
        }
        add_into(x, o);

        rms_norm_rows(x, &self.ffn_norm, ctx.eps, normed);
        let input = LinearInput::new(normed, n);
        // (tokens, intermediate)
        let gate = sized(gate, n * self.w_gate.out_features);
        let up = sized(up, n * self.w_up.out_features);
        forward_many_into(&input, [&self.w_gate, &self.w_up], [&mut *gate, &mut *up])?;
        if block.gelu {
            gelu_mul(gate, up);
        } else {
            silu_mul(gate, up);
        }
        let down = sized(down, n * self.w_down.out_features);
        self.w_down.forward_into(&LinearInput::new(gate, n), down)?;
        if let Some([_, post_ffn]) = &block.post_norms {
            rms_norm_in_place(down, post_ffn, ctx.eps);
        }
        add_into(x, down);
        Ok(())
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
