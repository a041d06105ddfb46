//! `BlockPool`: ref counts, the LRU free list and the prefix cache over a
//! fixed array of blocks.
//!
//! Invariants (checked by `BlockPool::check_invariants` in tests):
//! - block 0 is reserved (a padding target) and never handed out;
//! - a block is on the free list exactly when its ref count is 0, and its
//!   ref count is the number of live block tables holding it;
//! - a block with a content hash is findable through the hash map until it is
//!   evicted, i.e. handed out again by `allocate`;
//! - the free list is ordered for eviction: blocks without cached content
//!   first, then cached blocks from least to most recently freed.

use std::collections::HashMap;

use crate::block::{hash_block, BlockHash, BlockId};
use crate::free_list::{FreeList, NIL};
use crate::table::BlockTable;

/// Sizes of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockPoolConfig {
    /// Total blocks including the reserved block 0.
    pub num_blocks: usize,
    pub block_size: usize,
}

#[derive(Debug, Clone)]
struct BlockMeta {
    ref_count: u32,
    hash: Option<BlockHash>,
}

/// Result of looking up a prompt in the prefix cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixHit {
    /// Number of tokens whose KV is already computed in the shared blocks.
    pub num_cached_tokens: usize,
}

/// The pool of KV blocks: ref counts, an LRU free list and the prefix cache.
#[derive(Debug)]
pub struct BlockPool {
    config: BlockPoolConfig,
    blocks: Vec<BlockMeta>,
    /// Free list: head is evicted first.
    free: FreeList,
    cached: HashMap<BlockHash, BlockId>,
}

impl BlockPool {
    /// A pool with every block but block 0 free. Panics if `num_blocks < 2`
    /// or `block_size == 0` (configuration is validated before this).
    pub fn new(config: BlockPoolConfig) -> Self {
        assert!(
            config.num_blocks >= 2,
            "a block pool needs block 0 plus at least one block"
        );
        assert!(config.num_blocks < NIL as usize, "too many blocks for u32 ids");
        assert!(config.block_size > 0, "block_size must be positive");
        let mut pool = BlockPool {
            config,
            blocks: vec![
                BlockMeta {
                    ref_count: 0,
                    hash: None,
                };
                config.num_blocks
            ],
            free: FreeList::new(config.num_blocks),
            cached: HashMap::new(),
        };
        for id in 1..config.num_blocks as u32 {
            pool.free.push_back(id);
        }
        pool
    }

    pub fn config(&self) -> BlockPoolConfig {
        self.config
    }

    pub fn block_size(&self) -> usize {
        self.config.block_size
    }

    /// Blocks that can be handed out (free, possibly holding cached content).
    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_used_blocks(&self) -> usize {
        self.config.num_blocks - 1 - self.free.len()
    }

    /// Blocks that can ever be handed out (all but block 0).
    pub fn num_usable_blocks(&self) -> usize {
        self.config.num_blocks - 1
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.blocks[block.index()].ref_count
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.config.block_size)
    }

    /// Hands out the least valuable free block, evicting its cached content.
    /// `None` when no block is free.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = self.free.head()?;
        self.free.unlink(id);
        let meta = &mut self.blocks[id as usize];
        if let Some(hash) = meta.hash.take() {
            if self.cached.get(&hash) == Some(&BlockId(id)) {
                self.cached.remove(&hash);
            }
        }
        meta.ref_count = 1;
        Some(BlockId(id))
    }

    /// Drops one reference; at zero the block goes on the free list, where its
    /// cached content (if any) stays findable until the block is evicted.
    pub fn free(&mut self, block: BlockId) {
        assert_ne!(block, BlockId::RESERVED, "block 0 is never allocated");
        let meta = &mut self.blocks[block.index()];
        assert!(meta.ref_count > 0, "double free of block {}", block.0);
        meta.ref_count -= 1;
        if meta.ref_count == 0 {
            if meta.hash.is_some() {
                self.free.push_back(block.0);
            } else {
                self.free.push_front(block.0);
            }
        }
    }

    /// Takes a reference on the cached block with this hash, if any.
    fn acquire_cached(&mut self, hash: BlockHash) -> Option<BlockId> {
        let block = *self.cached.get(&hash)?;
        if self.blocks[block.index()].ref_count == 0 {
            self.free.unlink(block.0);
        }
        self.blocks[block.index()].ref_count += 1;
        Some(block)
    }

    /// Number of leading full blocks of `token_ids` present in the cache,
    /// without taking references.
    pub fn num_cached_prefix_blocks(&self, token_ids: &[u32], salt: Option<&str>) -> usize {
        let mut parent = None;
        let mut n = 0;
        for chunk in token_ids.chunks_exact(self.config.block_size) {
            let hash = hash_block(parent, salt, chunk);
            if !self.cached.contains_key(&hash) {
                break;
            }
            parent = Some(hash);
            n += 1;
        }
        n
    }

    /// Fills an empty `table` with the cached blocks of the longest cached
    /// prefix of `token_ids`, taking a reference on each. At most
    /// `max_tokens` tokens are reused (callers keep at least the last prompt
    /// token to compute, so they get logits).
    pub fn attach_cached_prefix(
        &mut self,
        table: &mut BlockTable,
        token_ids: &[u32],
        salt: Option<&str>,
        max_tokens: usize,
    ) -> PrefixHit {
        assert!(table.block_ids.is_empty(), "prefix lookup needs an empty table");
        let bs = self.config.block_size;
        let max_blocks = max_tokens.min(token_ids.len()) / bs;
        let mut parent = None;
        for chunk in token_ids.chunks_exact(bs).take(max_blocks) {
            let hash = hash_block(parent, salt, chunk);
            let Some(block) = self.acquire_cached(hash) else {
                break;
            };
            table.block_ids.push(block);
            table.hashes.push(hash);
            parent = Some(hash);
        }
        PrefixHit {
            num_cached_tokens: table.block_ids.len() * bs,
        }
    }

    /// Grows `table` so that it holds `num_tokens` slots. All or nothing:
    /// `None` (and no change) when not enough blocks are free.
    pub fn allocate_slots(&mut self, table: &mut BlockTable, num_tokens: usize) -> Option<()> {
        let needed = self.blocks_for(num_tokens).saturating_sub(table.block_ids.len());
        if needed > self.free.len() {
            return None;
        }
        for _ in 0..needed {
            let block = self.allocate().expect("free count checked above");
            table.block_ids.push(block);
        }
        Some(())
    }

    /// Gives back the tail blocks of `table` beyond what `num_tokens` need
    /// (unused lookahead). Registered full blocks are never inside the tail.
    pub fn truncate(&mut self, table: &mut BlockTable, num_tokens: usize) {
        let keep = self.blocks_for(num_tokens);
        assert!(keep >= table.hashes.len(), "cannot truncate into registered blocks");
        while table.block_ids.len() > keep {
            let block = table.block_ids.pop().expect("len > keep");
            self.free(block);
        }
    }

    /// Registers the content hashes of the blocks of `table` that are full
    /// with computed tokens: `token_ids` are the sequence's computed tokens.
    /// If an equal block is already cached, this table keeps its own copy and
    /// the cache keeps pointing at the first one.
    pub fn register_full_blocks(&mut self, table: &mut BlockTable, token_ids: &[u32], salt: Option<&str>) {
        let bs = self.config.block_size;
        let num_full = (token_ids.len() / bs).min(table.block_ids.len());
        while table.hashes.len() < num_full {
            let i = table.hashes.len();
            let parent = table.hashes.last().copied();
            let hash = hash_block(parent, salt, &token_ids[i * bs..(i + 1) * bs]);
            let block = table.block_ids[i];
            let meta = &mut self.blocks[block.index()];
            if meta.hash.is_none() {
                meta.hash = Some(hash);
                self.cached.entry(hash).or_insert(block);
            }
            table.hashes.push(hash);
        }
    }

    /// Releases every block of `table` (last block first, so the tail of a
    /// sequence is evicted before its shared head) and empties it.
    pub fn free_table(&mut self, table: &mut BlockTable) {
        while let Some(block) = table.block_ids.pop() {
            self.free(block);
        }
        table.hashes.clear();
    }

    /// Free block ids in eviction order (head first). For tests and metrics.
    pub fn free_list(&self) -> Vec<BlockId> {
        self.free.iter().map(BlockId).collect()
    }

    /// Checks every invariant in the module docs against `tables`, the block
    /// tables of all live sequences. Returns a description of the first
    /// violation.
    pub fn check_invariants(&self, tables: &[&BlockTable]) -> Result<(), String> {
        let free = self.free_list();
        if free.len() != self.free.len() {
            return Err(format!("free count {} but list has {}", self.free.len(), free.len()));
        }
        let mut expected_refs = vec![0u32; self.config.num_blocks];
        for table in tables {
            for b in &table.block_ids {
                expected_refs[b.index()] += 1;
            }
        }
        if expected_refs[0] != 0 || self.free.contains(0) || free.contains(&BlockId::RESERVED) {
            return Err("block 0 was handed out".into());
        }
        let mut seen = vec![false; self.config.num_blocks];
        for b in &free {
            if seen[b.index()] {
                return Err(format!("block {} twice on the free list", b.0));
            }
            seen[b.index()] = true;
        }
        for (i, meta) in self.blocks.iter().enumerate().skip(1) {
            if meta.ref_count != expected_refs[i] {
                return Err(format!(
                    "block {i}: ref count {} but {} tables hold it",
                    meta.ref_count, expected_refs[i]
                ));
            }
            if (meta.ref_count == 0) != seen[i] || self.free.contains(i as u32) != seen[i] {
                return Err(format!(
                    "block {i}: ref count {} but free-list membership {}",
                    meta.ref_count, seen[i]
                ));
            }
        }
        for (hash, block) in &self.cached {
            if self.blocks[block.index()].hash != Some(*hash) {
                return Err(format!(
                    "cache maps a hash to block {} which holds other content",
                    block.0
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{ids, pool, Rng};

    #[test]
    fn block_zero_is_never_handed_out() {
        let mut p = pool(4, 2);
        assert_eq!(p.num_free_blocks(), 3);
        let got: Vec<_> = std::iter::from_fn(|| p.allocate()).collect();
        assert_eq!(got, ids(&[1, 2, 3]));
        assert_eq!(p.allocate(), None);
        assert_eq!(p.num_used_blocks(), 3);
    }

    #[test]
    fn allocate_slots_is_all_or_nothing() {
        let mut p = pool(4, 4);
        let mut t = BlockTable::new();
        assert_eq!(
            p.allocate_slots(&mut t, 13),
            None,
            "13 tokens need 4 blocks, only 3 exist"
        );
        assert_eq!(t.num_blocks(), 0);
        assert_eq!(p.num_free_blocks(), 3);
        p.allocate_slots(&mut t, 9).expect("3 blocks free");
        assert_eq!(t.block_ids(), ids(&[1, 2, 3]));
        p.allocate_slots(&mut t, 12).expect("already covered");
        assert_eq!(t.num_blocks(), 3);
    }

    #[test]
    fn freed_blocks_are_evicted_oldest_first_and_uncached_before_cached() {
        let mut p = pool(6, 2);
        let mut a = BlockTable::new();
        let mut b = BlockTable::new();
        p.allocate_slots(&mut a, 4).unwrap(); // blocks 1, 2
        p.allocate_slots(&mut b, 4).unwrap(); // blocks 3, 4
        p.register_full_blocks(&mut a, &[1, 2, 3, 4], None);
        p.register_full_blocks(&mut b, &[5, 6, 7, 8], None);
        p.free_table(&mut a); // 2 then 1 go to the tail
        p.free_table(&mut b); // 4 then 3
        assert_eq!(p.free_list(), ids(&[5, 2, 1, 4, 3]));
        // an uncached block freed later still goes first
        let mut c = BlockTable::new();
        p.allocate_slots(&mut c, 1).unwrap();
        assert_eq!(c.block_ids(), ids(&[5]));
        p.free_table(&mut c);
        assert_eq!(p.free_list(), ids(&[5, 2, 1, 4, 3]));
        // allocation evicts: block 2's content (tokens 3,4 after 1,2) is gone
        let mut d = BlockTable::new();
        p.allocate_slots(&mut d, 4).unwrap();
        assert_eq!(d.block_ids(), ids(&[5, 2]));
        assert_eq!(p.num_cached_prefix_blocks(&[1, 2, 3, 4], None), 1);
        assert_eq!(p.num_cached_prefix_blocks(&[5, 6, 7, 8], None), 2);
        p.check_invariants(&[&d]).unwrap();
    }

    #[test]
    fn equal_prefixes_share_blocks_by_ref_count() {
        let mut p = pool(10, 4);
        let prompt: Vec<u32> = (0..10).collect();
        let mut a = BlockTable::new();
        p.allocate_slots(&mut a, prompt.len()).unwrap();
        p.register_full_blocks(&mut a, &prompt, None);
        assert_eq!(a.num_hashed_blocks(), 2, "only full blocks are hashed");

        let mut b = BlockTable::new();
        let hit = p.attach_cached_prefix(&mut b, &prompt, None, prompt.len() - 1);
        assert_eq!(hit.num_cached_tokens, 8);
        assert_eq!(b.block_ids(), &a.block_ids()[..2]);
        assert_eq!(p.ref_count(a.block_ids()[0]), 2);
        p.allocate_slots(&mut b, prompt.len()).unwrap();
        assert_ne!(b.block_ids()[2], a.block_ids()[2], "partial blocks are never shared");

        // a cached block on the free list is revived by a hit
        p.free_table(&mut a);
        p.free_table(&mut b);
        assert_eq!(p.num_free_blocks(), 9);
        let mut c = BlockTable::new();
        let hit = p.attach_cached_prefix(&mut c, &prompt, None, prompt.len());
        assert_eq!(hit.num_cached_tokens, 8);
        assert_eq!(p.num_free_blocks(), 7);
        p.check_invariants(&[&c]).unwrap();
    }

    #[test]
    fn prefix_lookup_respects_max_tokens() {
        let mut p = pool(10, 4);
        let prompt: Vec<u32> = (0..8).collect();
        let mut a = BlockTable::new();
        p.allocate_slots(&mut a, 8).unwrap();
        p.register_full_blocks(&mut a, &prompt, None);
        let mut b = BlockTable::new();
        let hit = p.attach_cached_prefix(&mut b, &prompt, None, 7);
        assert_eq!(hit.num_cached_tokens, 4, "the last prompt token must stay uncached");
    }

    #[test]
    fn salt_isolates_prefixes() {
        let mut p = pool(10, 4);
        let prompt: Vec<u32> = (0..8).collect();
        let mut a = BlockTable::new();
        p.allocate_slots(&mut a, 8).unwrap();
        p.register_full_blocks(&mut a, &prompt, Some("tenant-a"));
        assert_eq!(p.num_cached_prefix_blocks(&prompt, Some("tenant-a")), 2);
        assert_eq!(p.num_cached_prefix_blocks(&prompt, Some("tenant-b")), 0);
        assert_eq!(p.num_cached_prefix_blocks(&prompt, None), 0);
    }

    #[test]
    fn truncate_returns_unused_lookahead() {
        let mut p = pool(10, 4);
        let mut t = BlockTable::new();
        p.allocate_slots(&mut t, 13).unwrap();
        assert_eq!(t.num_blocks(), 4);
        p.truncate(&mut t, 6);
        assert_eq!(t.block_ids(), ids(&[1, 2]));
        assert_eq!(p.free_list(), ids(&[3, 4, 5, 6, 7, 8, 9]));
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut p = pool(4, 4);
        let b = p.allocate().unwrap();
        p.free(b);
        p.free(b);
    }

    #[test]
    fn randomized_operations_keep_every_invariant() {
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let bs = 1 + rng.below(4);
            let mut p = pool(2 + rng.below(30), bs);
            // a few shared prompt families so prefix hits happen
            let families: Vec<Vec<u32>> = (0..3)
                .map(|f| (0..64).map(|i| (f * 1000 + i) as u32).collect())
                .collect();
            struct Seq {
                table: BlockTable,
                tokens: Vec<u32>,
                salt: Option<&'static str>,
            }
            let mut live: Vec<Seq> = Vec::new();
            for _ in 0..400 {
                match rng.below(5) {
                    0 | 1 => {
                        let fam = &families[rng.below(3)];
                        let salt = [None, Some("s")][rng.below(2)];
                        let len = 1 + rng.below(40);
                        let mut tokens = fam[..len].to_vec();
                        if rng.below(3) == 0 {
                            tokens[len - 1] = 7_777;
                        }
                        let mut table = BlockTable::new();
                        let hit = p.attach_cached_prefix(&mut table, &tokens, salt, len - 1);
                        assert!(hit.num_cached_tokens < len);
                        if p.allocate_slots(&mut table, len).is_some() {
                            p.register_full_blocks(&mut table, &tokens, salt);
                            live.push(Seq { table, tokens, salt });
                        } else {
                            p.free_table(&mut table);
                        }
                    }
                    2 if !live.is_empty() => {
                        let i = rng.below(live.len());
                        let mut s = live.swap_remove(i);
                        p.free_table(&mut s.table);
                    }
                    3 if !live.is_empty() => {
                        let i = rng.below(live.len());
                        let s = &mut live[i];
                        let extra = 1 + rng.below(6);
                        let target = s.tokens.len() + extra;
                        if p.allocate_slots(&mut s.table, target).is_some() {
                            for k in 0..extra {
                                s.tokens.push(50_000 + k as u32);
                            }
                            p.register_full_blocks(&mut s.table, &s.tokens, s.salt);
                        }
                    }
                    4 if !live.is_empty() => {
                        let i = rng.below(live.len());
                        let s = &mut live[i];
                        let lookahead = rng.below(9);
                        if p.allocate_slots(&mut s.table, s.tokens.len() + lookahead).is_some() {
                            p.truncate(&mut s.table, s.tokens.len());
                        }
                    }
                    _ => {}
                }
                let tables: Vec<&BlockTable> = live.iter().map(|s| &s.table).collect();
                p.check_invariants(&tables)
                    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                let used: usize = p.num_used_blocks();
                assert_eq!(used + p.num_free_blocks(), p.num_usable_blocks());
            }
            for mut s in live.drain(..) {
                p.free_table(&mut s.table);
            }
            assert_eq!(p.num_free_blocks(), p.num_usable_blocks(), "seed {seed}: blocks leaked");
            p.check_invariants(&[]).unwrap();
        }
    }
}
