//! Helpers the crate's unit tests share: small pools, id lists and a seeded
//! generator (so randomized tests are reproducible without a dependency).

use crate::block::BlockId;
use crate::pool::{BlockPool, BlockPoolConfig};

pub(crate) fn pool(num_blocks: usize, block_size: usize) -> BlockPool {
    BlockPool::new(BlockPoolConfig { num_blocks, block_size })
}

pub(crate) fn ids(v: &[u32]) -> Vec<BlockId> {
    v.iter().map(|&i| BlockId(i)).collect()
}

/// xorshift64*: a seeded generator.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
