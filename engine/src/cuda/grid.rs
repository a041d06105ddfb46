//! Launch geometry: each kernel's grid and block for a problem size
//! (every kernel runs 256-thread blocks), and one attention launch's shape.

use super::{BLOCK_THREADS, TILE};

/// A kernel launch's grid and block dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

impl Grid {
    const BLOCK: (u32, u32, u32) = (BLOCK_THREADS, 1, 1);

    /// `matmul_bf16`: one block per 64 x 64 output tile.
    pub(super) fn matmul(m: usize, n: usize) -> Self {
        Grid {
            grid: (n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, 1),
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
