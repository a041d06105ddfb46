//! KV block bookkeeping for the paged KV cache: which block holds which
//! tokens, who references it, and which free blocks may be reused.
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

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

/// Default number of token slots per block: small enough that prefix sharing
/// and tail waste stay fine-grained, large enough that block tables stay short.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Index of one KV block in the engine's preallocated storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl BlockId {
    /// The reserved block: never handed out, used as a padding target.
    pub const RESERVED: BlockId = BlockId(0);

    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Content hash of a full block, chained over all blocks before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u64);

/// Hash of a full block: `parent` is the previous block's hash (None for the
/// first block, which mixes in `salt` instead).
pub fn hash_block(parent: Option<BlockHash>, salt: Option<&str>, token_ids: &[u32]) -> BlockHash {
    let mut hasher = DefaultHasher::new();
    match parent {
        Some(parent) => {
            1u8.hash(&mut hasher);
            parent.0.hash(&mut hasher);
        }
        None => {
            0u8.hash(&mut hasher);
            salt.hash(&mut hasher);
        }
    }
    token_ids.hash(&mut hasher);
    BlockHash(hasher.finish())
}

/// Where one token's K/V lives: block and offset inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub block: BlockId,
    pub offset: usize,
}

impl Slot {
    /// Flat slot index into storage laid out as `(num_blocks, block_size, ...)`.
    pub fn flat(self, block_size: usize) -> usize {
        self.block.index() * block_size + self.offset
    }
}

/// The blocks of one sequence, in position order, and the hashes of the
/// leading full blocks that have been registered for prefix caching.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    block_ids: Vec<BlockId>,
    hashes: Vec<BlockHash>,
}

impl BlockTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn block_ids(&self) -> &[BlockId] {
        &self.block_ids
    }

    pub fn num_blocks(&self) -> usize {
        self.block_ids.len()
    }

    /// Number of leading blocks whose content hash is registered.
    pub fn num_hashed_blocks(&self) -> usize {
        self.hashes.len()
    }

    /// Token slots this table can hold.
    pub fn capacity(&self, block_size: usize) -> usize {
        self.block_ids.len() * block_size
    }

    /// The slot of token `position`; `None` if the table does not reach it.
    pub fn slot(&self, position: usize, block_size: usize) -> Option<Slot> {
        let block = *self.block_ids.get(position / block_size)?;
        Some(Slot {
            block,
            offset: position % block_size,
        })
    }
}

/// Sizes of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockPoolConfig {
    /// Total blocks including the reserved block 0.
    pub num_blocks: usize,
    pub block_size: usize,
}

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct BlockMeta {
    ref_count: u32,
    hash: Option<BlockHash>,
    prev: u32,
    next: u32,
    on_free_list: bool,
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
    head: u32,
    tail: u32,
    num_free: usize,
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
                    prev: NIL,
                    next: NIL,
                    on_free_list: false,
                };
                config.num_blocks
            ],
            head: NIL,
            tail: NIL,
            num_free: 0,
            cached: HashMap::new(),
        };
        for id in 1..config.num_blocks as u32 {
            pool.push_back(id);
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
        self.num_free
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_used_blocks(&self) -> usize {
        self.config.num_blocks - 1 - self.num_free
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
        if self.head == NIL {
            return None;
        }
        let id = self.head;
        self.unlink(id);
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
                self.push_back(block.0);
            } else {
                self.push_front(block.0);
            }
        }
    }

    /// Takes a reference on the cached block with this hash, if any.
    fn acquire_cached(&mut self, hash: BlockHash) -> Option<BlockId> {
        let block = *self.cached.get(&hash)?;
        if self.blocks[block.index()].ref_count == 0 {
            self.unlink(block.0);
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
        if needed > self.num_free {
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

    fn push_back(&mut self, id: u32) {
        let meta = &mut self.blocks[id as usize];
        debug_assert!(!meta.on_free_list);
        meta.on_free_list = true;
        meta.prev = self.tail;
        meta.next = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.blocks[self.tail as usize].next = id;
        }
        self.tail = id;
        self.num_free += 1;
    }

    fn push_front(&mut self, id: u32) {
        let meta = &mut self.blocks[id as usize];
        debug_assert!(!meta.on_free_list);
        meta.on_free_list = true;
        meta.prev = NIL;
        meta.next = self.head;
        if self.head == NIL {
            self.tail = id;
        } else {
            self.blocks[self.head as usize].prev = id;
        }
        self.head = id;
        self.num_free += 1;
    }

    fn unlink(&mut self, id: u32) {
        let (prev, next) = {
            let meta = &mut self.blocks[id as usize];
            debug_assert!(meta.on_free_list);
            meta.on_free_list = false;
            (meta.prev, meta.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        self.num_free -= 1;
    }

    /// Free block ids in eviction order (head first). For tests and metrics.
    pub fn free_list(&self) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(self.num_free);
        let mut id = self.head;
        while id != NIL {
            out.push(BlockId(id));
            id = self.blocks[id as usize].next;
        }
        out
    }

    /// Checks every invariant in the module docs against `tables`, the block
    /// tables of all live sequences. Returns a description of the first
    /// violation.
    pub fn check_invariants(&self, tables: &[&BlockTable]) -> Result<(), String> {
        let free = self.free_list();
        if free.len() != self.num_free {
            return Err(format!("free count {} but list has {}", self.num_free, free.len()));
        }
        let mut expected_refs = vec![0u32; self.config.num_blocks];
        for table in tables {
            for b in &table.block_ids {
                expected_refs[b.index()] += 1;
            }
        }
        if expected_refs[0] != 0 || self.blocks[0].on_free_list || free.contains(&BlockId::RESERVED) {
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
            if (meta.ref_count == 0) != seen[i] || meta.on_free_list != seen[i] {
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

    fn pool(num_blocks: usize, block_size: usize) -> BlockPool {
        BlockPool::new(BlockPoolConfig { num_blocks, block_size })
    }

    fn ids(v: &[u32]) -> Vec<BlockId> {
        v.iter().map(|&i| BlockId(i)).collect()
    }

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
    fn slot_mapping_follows_the_block_table() {
        let mut p = pool(8, 4);
        let mut other = BlockTable::new();
        p.allocate_slots(&mut other, 4).unwrap();
        let mut t = BlockTable::new();
        p.allocate_slots(&mut t, 10).unwrap();
        assert_eq!(t.block_ids(), ids(&[2, 3, 4]));
        assert_eq!(
            t.slot(0, 4),
            Some(Slot {
                block: BlockId(2),
                offset: 0
            })
        );
        assert_eq!(
            t.slot(5, 4),
            Some(Slot {
                block: BlockId(3),
                offset: 1
            })
        );
        assert_eq!(t.slot(9, 4).unwrap().flat(4), 4 * 4 + 1);
        assert_eq!(t.slot(12, 4), None);
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
    fn hash_chain_depends_on_the_whole_prefix() {
        let h1 = hash_block(None, None, &[1, 2]);
        let h2 = hash_block(None, None, &[9, 2]);
        assert_ne!(hash_block(Some(h1), None, &[3, 4]), hash_block(Some(h2), None, &[3, 4]));
        assert_eq!(hash_block(Some(h1), None, &[3, 4]), hash_block(Some(h1), None, &[3, 4]));
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

    /// xorshift64*: a seeded generator so the randomized test is reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
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
