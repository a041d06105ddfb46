//! Launch geometry: each kernel's grid and block for a problem size
//! (every kernel runs 256-thread blocks), how a GEMM splits along k, and
//! one attention launch's shape.
//!
//! Invariant: nothing here depends on a GEMM's row count beyond the
//! number of row tiles, so a row's arithmetic is the same in any batch.

use super::{BLOCK_THREADS, TILE, TILE_K};

/// A kernel launch's grid and block dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

impl Grid {
    const BLOCK: (u32, u32, u32) = (BLOCK_THREADS, 1, 1);

    /// `matmul_bf16`: one block per 64 x 64 output tile, and per k chunk
    /// when the grid splits them ([`KSplit::grid_splits`]).
    pub(super) fn matmul(m: usize, n: usize, split: KSplit) -> Self {
        Grid {
            grid: (
                n.div_ceil(TILE) as u32,
                m.div_ceil(TILE) as u32,
                split.grid_splits(m, n) as u32,
            ),
            block: Self::BLOCK,
        }
    }

    /// `rms_norm`: one block per row.
    pub(super) fn rows(rows: usize) -> Self {
        Grid {
            grid: (rows as u32, 1, 1),
            block: Self::BLOCK,
        }
    }

    /// Element-wise kernels: one thread per element.
    pub(super) fn elements(n: usize) -> Self {
        Grid {
            grid: ((n as u32).div_ceil(BLOCK_THREADS).max(1), 1, 1),
            block: Self::BLOCK,
        }
    }

    /// `fill_synthetic_bf16`: a grid-stride loop over at most 8192 blocks.
    pub(super) fn synthetic(n: usize) -> Self {
        Grid {
            grid: (
                (n as u64).div_ceil(u64::from(BLOCK_THREADS)).clamp(1, 8192) as u32,
                1,
                1,
            ),
            block: Self::BLOCK,
        }
    }

    /// `paged_attention`: one block per (query head, token).
    pub(super) fn attention(heads: usize, tokens: usize) -> Self {
        Grid {
            grid: (heads as u32, tokens as u32, 1),
            block: Self::BLOCK,
        }
    }
}

/// How a GEMM sums k: `splits` chunks of `chunk` values (the last may be
/// shorter), each summed from zero, the chunks' sums then added in order:
/// by `reduce_splits` when each chunk has blocks of its own (a launch of
/// few tiles), else by each block as it goes. The same operations either
/// way, so which one runs may depend on m.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KSplit {
    pub splits: usize,
    pub chunk: usize,
    /// Blocks that fill the device (two per SM).
    fill: usize,
}

impl KSplit {
    /// Fewest k values a chunk sums (two k tiles).
    const MIN_CHUNK: usize = 2 * TILE_K;
    /// Most chunks (bounds the partial sums kept: splits x m x n floats).
    const MAX_SPLITS: usize = 16;
    /// Blocks per SM a launch of one row tile aims for.
    const BLOCKS_PER_SM: usize = 2;

    /// The split of an `(n, k)` GEMM on a device of `sms` multiprocessors:
    /// enough chunks that a launch of one row tile (a decode step) has
    /// about two blocks per SM, each chunk but the last a whole number of
    /// k tiles and at least two. It depends on n, k and the device, never
    /// on m.
    pub fn for_shape(n: usize, k: usize, sms: usize) -> Self {
        let tiles = n.div_ceil(TILE).max(1);
        let want = (Self::BLOCKS_PER_SM * sms)
            .div_ceil(tiles)
            .clamp(1, Self::MAX_SPLITS)
            .min((k / Self::MIN_CHUNK).max(1));
        let chunk = k.div_ceil(want).next_multiple_of(TILE_K).max(TILE_K);
        KSplit {
            splits: k.div_ceil(chunk).max(1),
            chunk,
            fill: Self::BLOCKS_PER_SM * sms,
        }
    }

    /// Chunks that get blocks of their own in an `(m, n)` launch: all of
    /// them when its tiles alone would not fill the device, else none (1:
    /// each block sums every chunk, and no partial sums are stored).
    pub fn grid_splits(&self, m: usize, n: usize) -> usize {
        match m.div_ceil(TILE) * n.div_ceil(TILE) < self.fill {
            true => self.splits,
            false => 1,
        }
    }
}

/// The geometry of one attention launch.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub tokens: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl AttentionShape {
    pub(super) fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::synthetic;

    #[test]
    fn k_splits_cover_k_in_whole_tiles_and_fill_the_device_for_a_decode() {
        for (n, k, sms) in [
            (1, 1, 1),
            (130, 200, 4),
            (64, 64, 132),
            (100_000, 4096, 132),
            (7, 33, 8),
        ] {
            let s = KSplit::for_shape(n, k, sms);
            assert!(s.splits >= 1 && s.splits <= KSplit::MAX_SPLITS, "{n} {k}: {s:?}");
            assert_eq!(s.chunk % TILE_K, 0, "{n} {k}: {s:?}");
            assert!(
                (s.splits - 1) * s.chunk < k.max(1) && s.splits * s.chunk >= k,
                "{n} {k}: {s:?}"
            );
        }
        // Llama 3 8B on an H200 (132 SMs): a one-token step's projections
        // get about two blocks per SM, or as many as k allows.
        let c = synthetic::config("llama-3-8b").unwrap();
        let shapes = [
            (c.q_size(), c.hidden_size),
            (c.kv_size(), c.hidden_size),
            (c.hidden_size, c.q_size()),
            (c.intermediate_size, c.hidden_size),
            (c.hidden_size, c.intermediate_size),
        ];
        for (n, k) in shapes {
            let s = KSplit::for_shape(n, k, 132);
            let blocks = n.div_ceil(TILE) * s.splits;
            assert!(
                blocks >= 132 || s.splits == KSplit::MAX_SPLITS,
                "{n} x {k}: {blocks} blocks ({s:?})"
            );
            assert!(blocks <= 4 * 132 || s.splits == 1, "{n} x {k}: {blocks} blocks ({s:?})");
        }
    }
}
