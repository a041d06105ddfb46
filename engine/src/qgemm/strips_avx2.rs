//! The strip kernel of CPUs with AVX2 but without AVX-512 VNNI: the
//! strips of `strips.rs` (16 weight rows, 4 values of a row side by side), one
//! 8-row half at a time, so that each 32-byte load of a half's group feeds
//! up to [`ROW_GROUP`] token rows.
//!
//! Per group and token row: `maddubs` of the weights as unsigned bytes and
//! the row's 4 values (broadcast) gives pairs of products as i16, `madd`
//! with ones sums them to one i32 per weight row, added to the block's
//! sums. 4-bit values are 0..15, so a pair is at most 2 x 15 x 127 and
//! never saturates; 8-bit values are taken as `|w|` times `x` with `w`'s
//! sign (at most 2 x 128 x 127, activations never being -128). The block's
//! scales are then applied as the VNNI kernel applies them
//! (`acc = fma(sum, dw dx, acc)`, then `fma(sx, mw, acc)` for 4-bit
//! weights), so a row's result is the same instructions in the same order
//! whatever rows share its group: the same bits alone and in any batch.
//!
//! Invariant: integer sums are exact; nothing here depends on the batch.

use std::arch::x86_64::*;

use super::strips::{Strips, STRIP_BLOCK, TILE};
use super::{Q8Rows, BLOCK};

/// Weight rows per half strip (8 i32 lanes).
const HALF: usize = TILE / 2;

/// Token rows that share each weight load (their sums and accumulators
/// stay in registers: 2 x 4 of the 16 ymm).
const ROW_GROUP: usize = 4;

/// Whether this CPU runs the AVX2 strip kernel.
pub fn available() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx2") && has!("fma")
}

/// Strip `s` of `w` against every token row of `x`, into the strip's 16
/// columns of `out (x.rows, w.rows)`.
///
/// # Safety
/// The CPU has AVX2 and FMA, `s` is a strip of `w`, `x.cols == w.cols()`,
/// and `out` holds `x.rows * w.rows()` values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn strip_rows(w: &Strips, s: usize, x: &Q8Rows, out: &mut [f32]) {
    match (w.four_bit(), w.offset()) {
        (true, _) => strip_halves::<FOUR_BIT>(w, s, x, out),
        (false, true) => strip_halves::<OFFSET8>(w, s, x, out),
        (false, false) => strip_halves::<SIGNED8>(w, s, x, out),
    }
}

/// [`strip_rows`] for a strip whose values are held as `MODE` says.
#[inline(always)]
unsafe fn strip_halves<const MODE: u8>(w: &Strips, s: usize, x: &Q8Rows, out: &mut [f32]) {
    let valid = TILE.min(w.rows() - s * TILE);
    for half in 0..valid.div_ceil(HALF) {
        let lanes = HALF.min(valid - half * HALF);
        let mut row = 0;
        while row < x.rows {
            let group = Group {
                w,
                s,
                half,
                lanes,
                x,
                row0: row,
            };
            row += match x.rows - row {
                1 => group.run::<1, MODE>(out),
                2 => group.run::<2, MODE>(out),
                3 => group.run::<3, MODE>(out),
                _ => group.run::<ROW_GROUP, MODE>(out),
            };
        }
    }
}

/// Values `4j..4j + 4` of a token row's block at `block`, in every 32-bit
/// lane.
#[inline(always)]
unsafe fn group_of(block: *const u8, j: usize) -> __m256i {
    _mm256_set1_epi32((block.add(4 * j) as *const i32).read_unaligned())
}

/// How a strip holds its values: 4-bit in pairs of blocks, 8-bit as
/// `q + 128`, signed 8-bit. A 4-bit block's pair sums stay i16 over its 8
/// groups and are widened once: each is at most 2 x 15 x 127 = 3810 in
/// magnitude, 8 of them 30480 < 32767, so the sums are exact.
const FOUR_BIT: u8 = 0;
const OFFSET8: u8 = 1;
const SIGNED8: u8 = 2;

/// Token rows from `row0` against half `half` of strip `s`.
struct Group<'a> {
    w: &'a Strips,
    s: usize,
    half: usize,
    /// Weight rows of the half that exist (the rest is padding).
    lanes: usize,
    x: &'a Q8Rows,
    row0: usize,
}

impl Group<'_> {
    /// Runs `R` token rows, whose values the strip holds as `MODE` says;
    /// returns `R`.
    #[inline(always)]
    unsafe fn run<const R: usize, const MODE: u8>(&self, out: &mut [f32]) -> usize {
        let Group {
            w,
            s,
            half,
            lanes,
            x,
            row0,
        } = *self;
        let (nb, n) = (w.nblocks(), w.rows());
        let scales = s * nb * TILE + half * HALF;
        let (d, m) = (w.block_scales().as_ptr().add(scales), w.block_offsets().as_ptr());
        // Row r's block b scale and scaled sum at `r * nb + b`.
        let dx = x.scales.as_ptr().add(row0 * nb);
        let sx = x.scaled_sums.as_ptr().add(row0 * nb);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            // 4-bit blocks come in pairs sharing their bytes: the shift is
            // known per call, not tested per group.
            let mut sums = if MODE == FOUR_BIT && b % 2 == 1 {
                self.block_sums::<R, MODE, true>(b)
            } else {
                self.block_sums::<R, MODE, false>(b)
            };
            if MODE == FOUR_BIT {
                for sum in &mut sums {
                    *sum = _mm256_madd_epi16(*sum, ones);
                }
            }
            let dw = _mm256_loadu_ps(d.add(b * TILE));
            let mw = (MODE == FOUR_BIT).then(|| _mm256_loadu_ps(m.add(scales + b * TILE)));
            for r in 0..R {
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*dx.add(r * nb + b)));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), scale, acc[r]);
                if let Some(mw) = mw {
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(*sx.add(r * nb + b)), mw, acc[r]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let mut lanes_out = [0.0f32; HALF];
            _mm256_storeu_ps(lanes_out.as_mut_ptr(), *a);
            let at = (row0 + r) * n + s * TILE + half * HALF;
            out[at..at + lanes].copy_from_slice(&lanes_out[..lanes]);
        }
        R
    }

    /// Block `b`'s integer sums for `R` token rows: i16 pairs for 4-bit
    /// values (`HIGH`: the block is in the high nibbles), i32 for 8-bit.
    #[inline(always)]
    unsafe fn block_sums<const R: usize, const MODE: u8, const HIGH: bool>(&self, b: usize) -> [__m256i; R] {
        let (w, x) = (self.w, self.x);
        let k = w.cols();
        let base = w.strip_values(self.s).add(self.half * 32);
        // Row r's values at `r * k`.
        let xq = (x.quants.as_ptr() as *const u8).add(self.row0 * k + b * BLOCK);
        let ones = _mm256_set1_epi16(1);
        let mut sums = [_mm256_setzero_si256(); R];
        for j in 0..8 {
            if MODE == FOUR_BIT {
                let v = _mm256_loadu_si256(base.add((b / 2) * STRIP_BLOCK + j * 64) as *const _);
                let v = if HIGH { _mm256_srli_epi16(v, 4) } else { v };
                let v = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
                for (r, sum) in sums.iter_mut().enumerate() {
                    // Pairs stay i16 over the block (see `FOUR_BIT`).
                    *sum = _mm256_add_epi16(*sum, _mm256_maddubs_epi16(v, group_of(xq.add(r * k), j)));
                }
            } else {
                let v = _mm256_loadu_si256(base.add(b * STRIP_BLOCK + j * 64) as *const _);
                let v = if MODE == OFFSET8 {
                    _mm256_xor_si256(v, _mm256_set1_epi8(-128))
                } else {
                    v
                };
                let magnitude = _mm256_sign_epi8(v, v);
                for (r, sum) in sums.iter_mut().enumerate() {
                    let signed = _mm256_sign_epi8(group_of(xq.add(r * k), j), v);
                    let pairs = _mm256_maddubs_epi16(magnitude, signed);
                    *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        sums
    }
}
