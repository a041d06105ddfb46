//! A ragged batch: several sequences, each with a run of new tokens, in one
//! forward pass.
//!
//! Each sequence brings `num_cached` tokens already in paged KV (read through
//! its block table) and `n` new tokens with their own positions and KV slots.
//! New token `i` attends to every cached position and to the new tokens `j`
//! its mask allows; without a mask that is `j <= i` (causal). A draft tree is
//! a run whose mask allows exactly each node's ancestors and itself, and whose
//! positions are `num_cached + depth`.
//!
//! ```text
//!   seq A: cached 0..5 | new t5 t6 t7      (prefill chunk or decode)
//!   seq B: cached 0..9 | new n0 n1 n2 n3   (tree: n1,n2 children of n0; n3 of n1)
//!          mask B:      n0 n1 n2 n3
//!                   n0 [ 1  0  0  0 ]
//!                   n1 [ 1  1  0  0 ]
//!                   n2 [ 1  0  1  0 ]
//!                   n3 [ 1  1  0  1 ]
//! ```

use heterospec_kv::{BlockId, BlockTable};

use crate::error::{EngineError, Result};

/// One sequence's share of a forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqRun {
    pub token_ids: Vec<u32>,
    /// RoPE position of each new token.
    pub positions: Vec<usize>,
    /// Tokens of this sequence already in KV (positions `0..num_cached`).
    pub num_cached: usize,
    pub block_table: Vec<BlockId>,
    /// Flat KV slot (`block * block_size + offset`) written by each new token.
    pub slots: Vec<usize>,
    /// Row-major `n x n`: `mask[i * n + j]` lets new token `i` see new token
    /// `j`. `None` means causal.
    pub mask: Option<Vec<bool>>,
    /// Per new token, KV slots outside this run it also sees (a draft node's
    /// ancestors written by earlier forwards). Empty means none for any.
    pub extra_slots: Vec<Vec<usize>>,
    /// Indices of new tokens whose logits are wanted, in output order.
    pub logits_rows: Vec<usize>,
}

impl SeqRun {
    /// A causal run of `token_ids` placed right after `num_cached` tokens,
    /// with logits for the last token only.
    pub fn causal(token_ids: Vec<u32>, num_cached: usize, block_table: &[BlockId], block_size: usize) -> Result<Self> {
        let n = token_ids.len();
        let positions: Vec<usize> = (num_cached..num_cached + n).collect();
        let slots = positions
            .iter()
            .map(|&p| {
                block_table
                    .get(p / block_size)
                    .map(|b| b.index() * block_size + p % block_size)
                    .ok_or_else(|| EngineError::Config(format!("block table too short for position {p}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SeqRun {
            token_ids,
            positions,
            num_cached,
            block_table: block_table.to_vec(),
            slots,
            mask: None,
            extra_slots: Vec::new(),
            logits_rows: if n > 0 { vec![n - 1] } else { vec![] },
        })
    }

    /// Same as [`SeqRun::causal`] from a `heterospec_kv` block table.
    pub fn causal_from_table(
        token_ids: Vec<u32>,
        num_cached: usize,
        table: &BlockTable,
        block_size: usize,
    ) -> Result<Self> {
        Self::causal(token_ids, num_cached, table.block_ids(), block_size)
    }

    pub fn with_all_logits(mut self) -> Self {
        self.logits_rows = (0..self.token_ids.len()).collect();
        self
    }

    /// The KV slot of position `pos` through the block table (a cached
    /// position, or one a step commits an accepted draft token into).
    #[inline]
    pub fn cached_slot(&self, pos: usize, block_size: usize) -> usize {
        self.block_table[pos / block_size].index() * block_size + pos % block_size
    }

    pub fn len(&self) -> usize {
        self.token_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.token_ids.is_empty()
    }

    /// May new token `i` attend new token `j`?
    #[inline]
    pub fn attends(&self, i: usize, j: usize) -> bool {
        match &self.mask {
            None => j <= i,
            Some(mask) => mask[i * self.token_ids.len() + j],
        }
    }

    /// Checks lengths, slot ranges and the block table against the storage.
    pub fn validate(&self, block_size: usize, num_slots: usize, vocab_size: usize) -> Result<()> {
        let n = self.token_ids.len();
        let bad = |reason: String| Err(EngineError::Config(reason));
        if self.positions.len() != n || self.slots.len() != n {
            return bad(format!(
                "{n} tokens but {} positions and {} slots",
                self.positions.len(),
                self.slots.len()
            ));
        }
        if let Some(mask) = &self.mask {
            if mask.len() != n * n {
                return bad(format!("mask has {} entries, expected {}", mask.len(), n * n));
            }
        }
        if !self.extra_slots.is_empty() && self.extra_slots.len() != n {
            return bad(format!("{n} tokens but {} extra slot lists", self.extra_slots.len()));
        }
        if let Some(s) = self.extra_slots.iter().flatten().find(|&&s| s >= num_slots) {
            return bad(format!("extra slot {s} is outside the KV storage"));
        }
        if self.block_table.len() * block_size < self.num_cached {
            return bad(format!(
                "block table of {} blocks cannot hold {} cached tokens",
                self.block_table.len(),
                self.num_cached
            ));
        }
        if let Some(b) = self
            .block_table
            .iter()
            .find(|b| (b.index() + 1) * block_size > num_slots)
        {
            return bad(format!("block {} is outside the KV storage", b.0));
        }
        if let Some(s) = self.slots.iter().find(|&&s| s >= num_slots) {
            return bad(format!("slot {s} is outside the KV storage"));
        }
        if let Some(t) = self.token_ids.iter().find(|&&t| t as usize >= vocab_size) {
            return bad(format!("token id {t} is outside the vocabulary of {vocab_size}"));
        }
        if let Some(r) = self.logits_rows.iter().find(|&&r| r >= n) {
            return bad(format!("logits row {r} but only {n} new tokens"));
        }
        Ok(())
    }
}

/// The sequences of one forward pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RaggedBatch {
    pub seqs: Vec<SeqRun>,
}

impl RaggedBatch {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(SeqRun::len).sum()
    }

    pub fn num_logits_rows(&self) -> usize {
        self.seqs.iter().map(|s| s.logits_rows.len()).sum()
    }

    /// Per token in batch order: (sequence index, index in its run).
    pub fn token_owners(&self) -> Vec<(usize, usize)> {
        self.seqs
            .iter()
            .enumerate()
            .flat_map(|(s, run)| (0..run.len()).map(move |i| (s, i)))
            .collect()
    }

    /// Token indices (in batch order) of the rows that want logits.
    pub fn logits_token_rows(&self) -> impl Iterator<Item = usize> + '_ {
        let mut offset = 0;
        self.seqs.iter().flat_map(move |seq| {
            let start = offset;
            offset += seq.len();
            seq.logits_rows.iter().map(move |&r| start + r)
        })
    }
}
