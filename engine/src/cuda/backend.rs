//! The kernels' interface: one method per kernel of `kernels.cu`, over
//! a device's own buffers, plus the copies and the graph capture around
//! them. [`super::Gpu`] implements it on CUDA, the tests' emulator on the
//! CPU; the forward (`forward`, `layer`) and the draft head are written
//! against it alone.
//!
//! Invariant: every method computes each output row from its own inputs
//! in an order that depends on no row count (what keeps a token's bits
//! the same alone and in any batch).

use super::{AttentionShape, KSplit};
use crate::error::Result;

/// A device the forward runs on: its buffers and the kernels of
/// `kernels.cu`, one method per kernel (row-major; weights `(out, in)`).
pub trait Backend: Send + Sync + 'static {
    /// The device the kernels run on.
    fn device(&self) -> crate::Device;
    /// A buffer of f32 on the device.
    type Floats: Send + Sync + 'static;
    /// A buffer of i32 on the device.
    type Ints: Send + Sync;
    /// A buffer of bf16 on the device (weight matrices).
    type Halves: Send + Sync;

    fn upload(&self, host: &[f32]) -> Result<Self::Floats>;
    fn upload_ints(&self, host: &[i32]) -> Result<Self::Ints>;
    /// `host` rounded to bf16 (nearest even, [`super::bf16_bits`]) on the device.
    fn upload_bf16(&self, host: &[f32]) -> Result<Self::Halves>;
    /// `len` synthetic bf16 weights made on the device
    /// ([`super::synthetic::value`] of `seed`, index and `scale`).
    fn synthetic_bf16(&self, len: usize, seed: u64, scale: f32) -> Result<Self::Halves>;
    fn zeros(&self, len: usize) -> Result<Self::Floats>;
    /// The first `len` floats, after all work queued before.
    fn download(&self, buf: &Self::Floats, len: usize) -> Result<Vec<f32>>;
    /// The first `len` ints, after all work queued before.
    fn download_ints(&self, buf: &Self::Ints, len: usize) -> Result<Vec<i32>>;
    /// Per row of `logits (rows, vocab)`: the first largest value's index
    /// into `ids`, its logprob into `logprobs`.
    fn greedy_rows(
        &self,
        logits: &Self::Floats,
        ids: &mut Self::Ints,
        logprobs: &mut Self::Floats,
        rows_vocab: (usize, usize),
    ) -> Result<()>;
    /// Per row of `logits (rows, vocab)`: its `m` largest entries, largest
    /// first (the lower index first among equals), their indices into
    /// `ids (rows, m)` (-1 past the row's end) and logprobs into `logprobs`.
    fn top_rows(
        &self,
        logits: &Self::Floats,
        ids: &mut Self::Ints,
        logprobs: &mut Self::Floats,
        rows_vocab_m: (usize, usize, usize),
    ) -> Result<()>;
    /// How this device splits an `(n, k)` GEMM along k ([`KSplit`]).
    fn k_split(&self, n: usize, k: usize) -> KSplit;
    /// Floats of partial sums an `(m, n, k)` GEMM keeps (at least 1).
    fn split_len(&self, (m, n, k): (usize, usize, usize)) -> usize {
        match self.k_split(n, k).grid_splits(m, n) {
            1 => 1,
            splits => splits * m * n,
        }
    }
    /// `c (m, n) = a (m, k) . w (n, k)^T`, or `c +=` that: `a` rounded
    /// to bf16, the sums in f32, in the same order for every row count
    /// (each of [`Backend::k_split`]'s chunks in k order, the chunks'
    /// sums added in order, then added to `c`). `part` holds the partial
    /// sums: [`Backend::split_len`] floats at least.
    fn matmul_in(
        &self,
        a: &Self::Floats,
        w: &Self::Halves,
        c: &mut Self::Floats,
        part: &mut Self::Floats,
        mnk: (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()>;
    /// [`Backend::matmul_in`] with partial sums of its own.
    fn matmul(
        &self,
        a: &Self::Floats,
        w: &Self::Halves,
        c: &mut Self::Floats,
        mnk: (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        let mut part = self.zeros(self.split_len(mnk))?;
        self.matmul_in(a, w, c, &mut part, mnk, accumulate)
    }
    /// Row-wise RMSNorm of `(rows, dim)` into `out`.
    fn rms_norm(
        &self,
        x: &Self::Floats,
        weight: &Self::Floats,
        out: &mut Self::Floats,
        rows_dim: (usize, usize),
        eps: f32,
    ) -> Result<()>;
    /// RoPE on `x (tokens, heads, 2 half)` with tables `(tokens, half)`.
    fn rope(
        &self,
        x: &mut Self::Floats,
        cos: &Self::Floats,
        sin: &Self::Floats,
        tokens_heads_half: (usize, usize, usize),
    ) -> Result<()>;
    /// `gate <- silu(gate) * up` on `len` floats.
    fn silu_mul(&self, gate: &mut Self::Floats, up: &Self::Floats, len: usize) -> Result<()>;
    /// `out[r] = x[rows[r]]`, `count` rows of `dim`.
    fn gather_rows(
        &self,
        x: &Self::Floats,
        rows: &Self::Ints,
        out: &mut Self::Floats,
        count_dim: (usize, usize),
    ) -> Result<()>;
    /// `out[r] = table[ids[r]]` widened to f32, `count` rows of `dim`.
    fn embed_rows(
        &self,
        table: &Self::Halves,
        ids: &Self::Ints,
        out: &mut Self::Floats,
        count_dim: (usize, usize),
    ) -> Result<()>;
    /// `cache[slots[r]] = rows[r]`, `count` rows of `dim`.
    fn scatter_rows(
        &self,
        cache: &mut Self::Floats,
        rows: &Self::Floats,
        slots: &Self::Ints,
        count_dim: (usize, usize),
    ) -> Result<()>;
    /// `host` into the start of `buf` (which holds at least as many).
    fn write(&self, buf: &mut Self::Floats, host: &[f32]) -> Result<()>;
    /// `host` into the start of `buf` (which holds at least as many).
    fn write_ints(&self, buf: &mut Self::Ints, host: &[i32]) -> Result<()>;
    /// A new buffer holding the first `len` floats of `buf`.
    fn duplicate(&self, buf: &Self::Floats, len: usize) -> Result<Self::Floats>;
    /// Kernel launches recorded once and replayed (a CUDA graph).
    type Graph: Send;
    /// Records the kernels `launches` queues, in order, without running
    /// them. While it records, nothing may be allocated, copied or waited
    /// for (those fail): the launches name buffers that outlive the graph.
    fn capture(&self, launches: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph>;
    /// Queues the recorded launches again, on what their buffers hold now.
    fn replay(&self, graph: &Self::Graph) -> Result<()>;
    /// Paged attention of `q (tokens, heads, head_dim)` into `out` over one
    /// layer's K/V, each token's keys as [`super::AttentionKeys`] lists them
    /// (uploaded: keys, tables, lists, run slots).
    fn attention(
        &self,
        q: &Self::Floats,
        kv: (&Self::Floats, &Self::Floats),
        out: &mut Self::Floats,
        keys: &[Self::Ints; 4],
        shape: AttentionShape,
    ) -> Result<()>;
}
