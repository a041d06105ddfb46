//! The AVX-512 VNNI strip kernel: the AMX kernel's path below
//! [`MIN_TILE_ROWS`](super::amx::MIN_TILE_ROWS) token rows, and on CPUs
//! with VNNI but no AMX (AMD Zen 4/5) the path for every row count.
//!
//! Invariant: a row's integer sums and scale updates are the same
//! instructions in the same order whatever rows share its group (and the
//! same as the tile unit's), so its result is the same bits alone and in
//! any batch.

use std::arch::x86_64::*;

use super::strips::{block_update, four_bit_group, store_lanes, unpack_strip, Strips, STRIP_BLOCK, TILE, UNPACKED};
use super::{Q8Rows, BLOCK};

/// Whether this CPU runs the strip kernel on AVX-512 VNNI (every row
/// count: the `Vnni` kernel; few rows of the `Amx` one).
pub fn vnni_available() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vnni") && has!("fma")
}

/// Strip `s` against token rows, up to [`ROW_GROUP`] at a time: per block,
/// each of the eight 4-value groups of the strip is loaded once and fed to
/// one `vpdpbusd` per token row of the group (the row's 4 values
/// broadcast). A row's integer sums and scale updates are the same
/// instructions in the same order whatever rows share its group, so its
/// result is the same bits alone and in any batch (and the same as the
/// tile unit's).
///
/// A 4-bit strip read by more than two groups is unpacked to bytes once
/// per product (the integer sums are the same, so the bits are too); up to
/// 16 rows, splitting the nibbles in each group measured faster (T=16
/// 17.4 -> 15.4 ms in alternating runs) than storing and reloading them.
///
/// # Safety
/// The CPU has AVX-512 F/BW/DQ, VNNI and FMA, `s` is a strip of `w`,
/// `x.cols == w.cols()`, and `out` holds `x.rows * w.rows()` values.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,fma")]
pub(super) unsafe fn strip_rows(w: &Strips, s: usize, x: &Q8Rows, out: &mut [f32]) {
    let base = w.strip_values(s);
    if w.four_bit && x.rows > 2 * ROW_GROUP {
        UNPACKED.with(|buf| {
            let unpacked = unpack_strip(w, s, &mut buf.borrow_mut());
            strip_row_groups::<UNPACKED4>(w, s, x, out, unpacked)
        })
    } else if w.four_bit {
        strip_row_groups::<PACKED4>(w, s, x, out, base)
    } else if w.offset {
        strip_row_groups::<OFFSET8>(w, s, x, out, base)
    } else {
        strip_row_groups::<SIGNED8>(w, s, x, out, base)
    }
}

/// How [`strip_row_group`] reads a strip's values: 4-bit values unpacked
/// to bytes, 4-bit values in pairs of blocks, 8-bit values as `q + 128`,
/// signed 8-bit values.
const UNPACKED4: u8 = 0;
const PACKED4: u8 = 1;
const OFFSET8: u8 = 2;
const SIGNED8: u8 = 3;

/// [`strip_rows`] over `bytes`, read as `MODE` says.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,fma")]
unsafe fn strip_row_groups<const MODE: u8>(w: &Strips, s: usize, x: &Q8Rows, out: &mut [f32], bytes: *const u8) {
    let mut row = 0;
    while row < x.rows {
        let left = x.rows - row;
        // The first group asks for the next strip while it computes.
        let ahead = row == 0 && s + 1 < w.strips();
        let taken = match left {
            1 => strip_row_group::<1, MODE>(w, s, x, row, out, bytes, ahead),
            2 => strip_row_group::<2, MODE>(w, s, x, row, out, bytes, ahead),
            3 => strip_row_group::<3, MODE>(w, s, x, row, out, bytes, ahead),
            4..ROW_GROUP => strip_row_group::<4, MODE>(w, s, x, row, out, bytes, ahead),
            _ => strip_row_group::<ROW_GROUP, MODE>(w, s, x, row, out, bytes, ahead),
        };
        row += taken;
    }
}

/// Asks the cache for what block `b` of strip `s + 1` reads (its values,
/// scales and offsets), so that the next strip's first touch does not
/// wait on memory while this one computes. No effect on any result.
#[inline(always)]
unsafe fn prefetch_next(w: &Strips, s: usize, b: usize) {
    let data = w.strip_values(s + 1);
    let unit = match (w.four_bit, b % 2) {
        (true, 1) => None,
        (true, _) => Some(b / 2),
        (false, _) => Some(b),
    };
    if let Some(unit) = unit {
        for line in 0..STRIP_BLOCK / 64 {
            _mm_prefetch::<_MM_HINT_T0>(data.add(unit * STRIP_BLOCK + line * 64) as *const i8);
        }
    }
    let at = ((s + 1) * w.nblocks() + b) * TILE;
    _mm_prefetch::<_MM_HINT_T0>(w.d.as_ptr().add(at) as *const i8);
    if w.four_bit {
        _mm_prefetch::<_MM_HINT_T0>(w.m.as_ptr().add(at) as *const i8);
    }
}

/// Token rows that share each weight load of [`strip_rows`] (their sums
/// and accumulators stay in registers: 2 x 8 of the 32 zmm).
const ROW_GROUP: usize = 8;

/// Values `4j..4j + 4` of block `b` of a token row, in every 32-bit lane.
#[inline(always)]
unsafe fn group_of(row: *const u8, b: usize, j: usize) -> __m512i {
    _mm512_set1_epi32((row.add(b * BLOCK + 4 * j) as *const i32).read_unaligned())
}

/// Token rows `row0..row0 + R` against strip `s`, whose values `bytes`
/// holds as `MODE` says; returns `R`.
#[inline(always)]
unsafe fn strip_row_group<const R: usize, const MODE: u8>(
    w: &Strips,
    s: usize,
    x: &Q8Rows,
    row0: usize,
    out: &mut [f32],
    bytes: *const u8,
    ahead: bool,
) -> usize {
    let (k, nb, n) = (w.cols, w.nblocks(), w.rows);
    let four_bit = MODE == UNPACKED4 || MODE == PACKED4;
    let valid = TILE.min(n - s * TILE);
    let xq: [*const u8; R] = std::array::from_fn(|r| x.quants.as_ptr().add((row0 + r) * k) as *const u8);
    let dx: [*const f32; R] = std::array::from_fn(|r| x.scales.as_ptr().add((row0 + r) * nb));
    let sx: [*const f32; R] = std::array::from_fn(|r| x.scaled_sums.as_ptr().add((row0 + r) * nb));
    let qx: [*const i32; R] = std::array::from_fn(|r| x.sums.as_ptr().add((row0 + r) * nb));
    let (dw_at, mw_at) = (w.d.as_ptr().add(s * nb * TILE), w.m.as_ptr());
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        if ahead {
            prefetch_next(w, s, b);
        }
        let mut sums = [zero; R];
        match MODE {
            UNPACKED4 | OFFSET8 => {
                let unit = bytes.add(b * STRIP_BLOCK);
                for j in 0..8 {
                    let v = _mm512_loadu_si512(unit.add(j * 64) as *const _);
                    for r in 0..R {
                        sums[r] = _mm512_dpbusd_epi32(sums[r], v, group_of(xq[r], b, j));
                    }
                }
                if MODE == OFFSET8 {
                    for r in 0..R {
                        let offset = _mm512_set1_epi32(128 * *qx[r].add(b));
                        sums[r] = _mm512_sub_epi32(sums[r], offset);
                    }
                }
            }
            PACKED4 => {
                for j in 0..8 {
                    let v = four_bit_group(bytes, b, j);
                    for r in 0..R {
                        sums[r] = _mm512_dpbusd_epi32(sums[r], v, group_of(xq[r], b, j));
                    }
                }
            }
            _ => {
                let unit = bytes.add(b * STRIP_BLOCK);
                for j in 0..8 {
                    let v = _mm512_loadu_si512(unit.add(j * 64) as *const _);
                    // |w| (unsigned) times x with w's sign.
                    let (magnitude, negative) = (_mm512_abs_epi8(v), _mm512_movepi8_mask(v));
                    for r in 0..R {
                        let xb = group_of(xq[r], b, j);
                        let sx = _mm512_mask_sub_epi8(xb, negative, zero, xb);
                        sums[r] = _mm512_dpbusd_epi32(sums[r], magnitude, sx);
                    }
                }
            }
        }
        let dw = _mm512_loadu_ps(dw_at.add(b * TILE));
        if four_bit {
            let mw = _mm512_loadu_ps(mw_at.add((s * nb + b) * TILE));
            for r in 0..R {
                acc[r] = block_update(acc[r], sums[r], dw, *dx[r].add(b), Some((*sx[r].add(b), mw)));
            }
        } else {
            for r in 0..R {
                acc[r] = block_update(acc[r], sums[r], dw, *dx[r].add(b), None);
            }
        }
    }
    for (r, &a) in acc.iter().enumerate() {
        store_lanes(out.as_mut_ptr().add((row0 + r) * n + s * TILE), a, valid);
    }
    R
}
