//! Block ids, content hashes and slot math: the vocabulary every other
//! module speaks.
//!
//! Invariants:
//! - `BlockId::RESERVED` (block 0) is a padding target, never a sequence's;
//! - a `BlockHash` chains every block before it (and the salt, for the first
//!   block), so equal hashes mean equal whole prefixes;
//! - the slot of position `p` is `block_ids[p / block_size]` at offset
//!   `p % block_size`, flat index `block * block_size + offset`.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_chain_depends_on_the_whole_prefix() {
        let h1 = hash_block(None, None, &[1, 2]);
        let h2 = hash_block(None, None, &[9, 2]);
        assert_ne!(hash_block(Some(h1), None, &[3, 4]), hash_block(Some(h2), None, &[3, 4]));
        assert_eq!(hash_block(Some(h1), None, &[3, 4]), hash_block(Some(h1), None, &[3, 4]));
    }
}
