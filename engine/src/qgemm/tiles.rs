//! The 8-bit tile kernel of AVX-512 (BW) over `MR x NR` tiles of the
//! row-major weights, each weight block loaded once per tile and used for
//! every token row of it (`HETEROSPEC_QGEMM_KERNEL=avx512`; slower than
//! the AVX2 strip kernel on the CPUs measured, so never the default).
//!
//! Invariant: a tile's sums for a token row are the same instructions in
//! the same order whatever other rows share the tile (`mr` only changes how
//! many rows run), so a row's result does not depend on its batch.

pub(super) mod avx512 {
    use super::super::x86::pair;
    use super::super::{Tile, BLOCK, MR, NR};
    use std::arch::x86_64::*;

    /// Full or partial tile; `mr <= MR`, `nr <= NR`.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma")]
    pub unsafe fn tile(t: &Tile<'_>, mr: usize, nr: usize, out: &mut [[f32; NR]; MR]) {
        dispatch_tile!(tile_fixed, (mr, nr), t, out)
    }

    /// Two blocks (64 values) per instruction: `maddubs` of |w| (u8) and x
    /// with w's sign (i8), pairs summed to i32; lanes 0..8 hold block b,
    /// lanes 8..16 block b+1.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma")]
    unsafe fn tile_fixed<const M: usize, const N: usize>(t: &Tile<'_>, out: &mut [[f32; NR]; MR]) {
        let k = t.w.cols;
        let nblocks = k / BLOCK;
        let zero = _mm512_setzero_si512();
        let ones = _mm512_set1_epi16(1);
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        let wq = t.w.quants.as_ptr();
        let xq = t.x.quants.as_ptr();
        let ws = t.w.scales.as_ptr();
        let xs = t.x.scales.as_ptr();
        let pairs = nblocks / 2;
        for p in 0..pairs {
            let b = 2 * p;
            let mut wabs = [zero; N];
            let mut wneg = [0u64; N];
            let mut wsc = [_mm512_setzero_ps(); N];
            for j in 0..N {
                let row = t.n + j;
                // SAFETY: row < rows and b + 1 < nblocks keep this in bounds.
                let w = _mm512_loadu_si512(wq.add(row * k + b * BLOCK) as *const _);
                wabs[j] = _mm512_abs_epi8(w);
                wneg[j] = _mm512_movepi8_mask(w);
                wsc[j] = pair(*ws.add(row * nblocks + b), *ws.add(row * nblocks + b + 1));
            }
            for i in 0..M {
                let row = t.m + i;
                let x = _mm512_loadu_si512(xq.add(row * k + b * BLOCK) as *const _);
                let xsc = pair(*xs.add(row * nblocks + b), *xs.add(row * nblocks + b + 1));
                for j in 0..N {
                    let sx = _mm512_mask_sub_epi8(x, wneg[j], zero, x);
                    let dot = _mm512_madd_epi16(_mm512_maddubs_epi16(wabs[j], sx), ones);
                    let scale = _mm512_mul_ps(wsc[j], xsc);
                    acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i][j]);
                }
            }
        }
        for i in 0..M {
            for j in 0..N {
                let mut sum = _mm512_reduce_add_ps(acc[i][j]);
                if nblocks % 2 == 1 {
                    // The odd last block, scalar.
                    let b = nblocks - 1;
                    let (wr, xr) = (t.n + j, t.m + i);
                    let mut dot = 0i32;
                    for e in 0..BLOCK {
                        dot += *wq.add(wr * k + b * BLOCK + e) as i32 * *xq.add(xr * k + b * BLOCK + e) as i32;
                    }
                    sum += dot as f32 * *ws.add(wr * nblocks + b) * *xs.add(xr * nblocks + b);
                }
                out[i][j] = sum;
            }
        }
    }
}
