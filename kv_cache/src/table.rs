//! `BlockTable`: the blocks of one sequence in position order, and the
//! hashes of its leading full blocks registered for prefix caching.
//!
//! Invariants (kept by `BlockPool`, the only writer):
//! - `hashes.len() <= block_ids.len()`: only leading blocks are hashed, and
//!   only once they are full of computed tokens;
//! - `hashes[i]` is the chained hash of the tokens in `block_ids[i]`, so a
//!   table never gives back (truncates) a registered block.

use crate::block::{BlockHash, BlockId, Slot};

/// The blocks of one sequence, in position order, and the hashes of the
/// leading full blocks that have been registered for prefix caching.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    pub(crate) block_ids: Vec<BlockId>,
    pub(crate) hashes: Vec<BlockHash>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{ids, pool};

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
}
