//! The device boundary for a draft head: its weights as plain arrays
//! ([`HeadParts`], built by `spec::head` from a checkpoint) and the forward
//! a device runs over them ([`HeadBackend`]), so that a GPU target drafts on
//! the GPU (`cuda::DeviceHead`) and only each row's best few draft ids come
//! back to the host.
//!
//! Invariant: a head on a device computes what `spec::head::DraftHead`
//! computes on the CPU, to that device's rounding (bf16 weights on the
//! GPU); nothing here knows which device runs.

use crate::batch::RaggedBatch;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv::{KvLayout, KvStorage};

/// One decoder layer of a head, row-major `(out, in)` matrices with query
/// and key rows in the engine's interleaved RoPE order.
#[derive(Debug, Clone)]
pub struct HeadLayerParts {
    /// `None`: the layer reads its input unnormed.
    pub attn_norm: Option<Vec<f32>>,
    /// `[q, k, v, o, gate, up, down]`.
    pub matrices: [Vec<f32>; 7],
    pub ffn_norm: Vec<f32>,
}

/// An EAGLE head's weights: `fc` over `[embedding | feature]`, its decoder
/// layers (shaped as `layer_config`), an optional norm and the output layer
/// over the draft vocabulary `(draft_vocab, hidden)`.
#[derive(Debug, Clone)]
pub struct HeadParts {
    pub layer_config: ModelConfig,
    /// `(hidden, 2 hidden)`.
    pub fc: Vec<f32>,
    pub fc_bias: Option<Vec<f32>>,
    pub layers: Vec<HeadLayerParts>,
    pub output_norm: Option<Vec<f32>>,
    pub lm_head: Vec<f32>,
    pub draft_vocab: usize,
}

/// The best `m` draft-vocabulary ids of one output row, best first, with
/// their logprobs over the draft vocabulary.
pub type TopRow = Vec<(u32, f32)>;

/// A draft head whose weights live on a device.
pub trait HeadBackend: Send + Sync {
    /// Empty KV storage on the head's device, a layer per head layer.
    fn new_kv(&self, layout: KvLayout) -> Result<KvStorage>;

    /// Runs the head on `batch`: row `i` reads `embedded` row `i` (the
    /// token's target embedding) and `features` row `i`, both `(tokens,
    /// hidden)`; writes the head's K/V into `kv`. Returns, per logits row,
    /// its best `m` draft ids, and those rows' predicted features
    /// `(rows, hidden)` (before the output norm).
    fn forward_top(
        &self,
        batch: &RaggedBatch,
        embedded: &[f32],
        features: &[f32],
        kv: &mut KvStorage,
        m: usize,
    ) -> Result<(Vec<TopRow>, Vec<f32>)>;
}
