//! KV block bookkeeping for the paged KV cache: which block holds which
//! tokens, who references it, and which free blocks may be reused.
//!
//! The crate also holds the scheduling core (`schedule`): one state machine for every driver of an engine.
//!
//! This crate owns no tensors. The engine preallocates `num_blocks` blocks of
//! `block_size` token slots per layer; this pool hands out their ids.
//!
//! Invariants (checked by `BlockPool::check_invariants` in tests):
//! - block 0 is reserved (a padding target) and never handed out;
//! - a block is on the free list exactly when its ref count is 0;
//! - a block with a content hash is findable through the hash map until it is
//!   evicted, i.e. handed out again by `allocate`;
//! - the free list is ordered for eviction: blocks without cached content
//!   first, then cached blocks from least to most recently freed.
//!
//! Every operation is O(1) per block (the free list is an intrusive doubly
//! linked list over the block array; removal from the middle is O(1)).
//!
//! Prefix caching: a full block's hash chains its parent's hash, an optional
//! per-request salt and its token ids, so two sequences share a block only if
//! their whole prefixes up to that block are equal (and their salts are).
//!
//! ```text
//!  block table of one sequence (block_size 4), 10 tokens:
//!  position:   0 1 2 3 | 4 5 6 7 | 8 9 . .
//!  block id:   [  17   ] [  3    ] [  42   ]
//!  hash:        h0=H(salt,t0..t3)  h1=H(h0,t4..t7)  (partial: none)
//!  slot of position p = block_ids[p / 4] * 4 + p % 4
//! ```

mod block;
mod free_list;
mod pool;
pub mod schedule;
mod table;
#[cfg(test)]
mod test_util;

pub use block::{hash_block, BlockHash, BlockId, Slot, DEFAULT_BLOCK_SIZE};
pub use pool::{BlockPool, BlockPoolConfig, PrefixHit};
pub use schedule::SeqId;
pub use table::BlockTable;
