//! The device boundary for a draft head: its weights as plain arrays
//! ([`HeadParts`], built by `spec::head` from a checkpoint) and the forward
//! a device runs over them ([`HeadBackend`]), so that a GPU target drafts on
//! the GPU (`cuda::DeviceHead`): a tree layer sends token ids and which
//! stored feature each row reads, and only each row's best few draft ids
//! come back to the host.
//!
//! Invariant: a head on a device computes what `spec::head::DraftHead`
//! computes on the CPU, to that device's rounding (bf16 weights on the
//! GPU); nothing here knows which device runs.

use crate::batch::RaggedBatch;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::features::Features;
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

/// A draft head whose weights, K/V and input features live on a device.
///
/// Its feature store holds one row per KV slot of its layout: a committed
/// slot's row is the target's state there ([`observe`](Self::observe)), a
/// drafted row's slot (a tree node's scratch slot, a root's slot until the
/// target's state arrives) holds the head's own prediction, written by the
/// forward that drafted it, where its children read it.
pub trait HeadBackend: Send + Sync {
    /// Empty KV storage on the head's device, a layer per head layer, and a
    /// zeroed feature store of a row per slot of `layout`.
    fn new_kv(&mut self, layout: KvLayout) -> Result<KvStorage>;

    /// Stores row `rows[i]` of `features` (`hidden` wide) at `slots[i]`
    /// (slots past the store are skipped). Rows a forward left on this
    /// device are copied there; others are uploaded.
    fn observe(&mut self, slots: &[usize], features: &Features, rows: &[usize]) -> Result<()>;

    /// Runs the head on `batch`: token `i` reads its token's embedding and
    /// the stored feature row `inputs[i]` (`None`: zeros); writes the
    /// head's K/V into `kv` and each logits row's predicted feature at
    /// that row's slot. Returns, per logits row, its best `m` draft ids.
    fn forward_top(
        &mut self,
        batch: &RaggedBatch,
        inputs: &[Option<usize>],
        kv: &mut KvStorage,
        m: usize,
    ) -> Result<Vec<TopRow>>;

    /// The stored feature rows of `slots`, `(slots, hidden)`.
    fn features_at(&self, slots: &[usize]) -> Result<Vec<f32>>;
}

/// The KV slot of each of `batch`'s logits rows, in row order.
pub fn logits_slots(batch: &RaggedBatch) -> Vec<usize> {
    batch
        .seqs
        .iter()
        .flat_map(|s| s.logits_rows.iter().map(|&r| s.slots[r]))
        .collect()
}
