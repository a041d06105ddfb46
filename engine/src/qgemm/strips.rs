//! Weight matrices in **strips** of 16 rows, 4 values of a row side by side
//! (the AMX tile unit's layout for its second operand), built once per
//! matrix, read by the kernels in `amx.rs` (AMX), `vnni.rs` (AVX-512
//! VNNI) and `strips_avx2.rs` (AVX2), which `qgemm::strips_matmul` picks
//! from (this file depends on none of them):
//!
//! ```text
//!   strip s, block b, group j (0..8):  64 bytes = [row 0: 4 values][row 1] ... [row 15]
//!   values 4j..4j+4 of block b; 4-bit weights: block 2p in the low nibbles,
//!   block 2p+1 in the high nibbles of pair p's groups; 8-bit weights signed
//!   where the tile unit reads them, else stored as q + 128 (unsigned)
//! ```
//!
//! so that a block's product for 16 weight rows comes out with one weight
//! row per lane: `tdpbsud`/`tdpbssd` for 16 token rows at a time, or eight
//! `vpdpbusd` per token row. Both then apply the block's scales the same
//! way, in the same order (see [`block_update`]):
//!
//! ```text
//!   acc[x][w] = fma(sum_b, dw[w] * dx[x], acc[x][w]);  acc[x][w] = fma(sx[x], mw[w], acc[x][w])
//! ```
//!
//! Invariant: integer block sums are exact in every kernel, so a token
//! row's result does not depend on how many rows ran with it (and AMX and
//! VNNI give the same bits).

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::lines::Lines;
use super::BLOCK;

/// Weight and activation rows per tile (weight rows per strip).
pub(super) const TILE: usize = 16;
/// Bytes of one block of a strip: 8 groups x 16 rows x 4 values.
pub(super) const STRIP_BLOCK: usize = BLOCK * TILE;

/// A weight matrix in strips (see the module docs).
pub struct Strips {
    pub(super) rows: usize,
    pub(super) cols: usize,
    /// 4-bit values (unsigned, two blocks per group byte) or 8-bit.
    pub(super) four_bit: bool,
    /// 8-bit values stored as `q + 128` (unsigned): `vpdpbusd` takes them
    /// as they are and each block's sum loses `128 * sum(x)` (exact
    /// integers, so the same sums as signed values), where the signed
    /// layout needs a sign trick per group and row. Signed where the tile
    /// unit reads the strips.
    pub(super) offset: bool,
    /// Q4: (strips, pairs, 8, 64); Q8: (strips, blocks, 8, 64).
    pub(super) data: Lines<u8>,
    /// (strips, blocks, 16): block scales, zero for padding rows.
    pub(super) d: Lines<f32>,
    /// (strips, blocks, 16): Q4 offsets (`value = d q + m`); empty for Q8.
    pub(super) m: Lines<f32>,
}

impl Strips {
    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    pub(super) fn cols(&self) -> usize {
        self.cols
    }

    pub(super) fn nblocks(&self) -> usize {
        self.cols / BLOCK
    }

    pub(super) fn strips(&self) -> usize {
        self.rows.div_ceil(TILE)
    }

    /// 4-bit values (two blocks per group byte) rather than 8-bit.
    pub(super) fn four_bit(&self) -> bool {
        self.four_bit
    }

    /// 8-bit values stored as `q + 128`.
    pub(super) fn offset(&self) -> bool {
        self.offset
    }

    /// The first byte of strip `s`'s values.
    pub(super) fn strip_values(&self, s: usize) -> *const u8 {
        assert!(s < self.strips());
        // In bounds: the data holds every strip.
        unsafe { self.data.as_ptr().add(s * self.strip_bytes()) }
    }

    /// Block scales, `(strips, blocks, 16)`.
    pub(super) fn block_scales(&self) -> &[f32] {
        &self.d
    }

    /// Q4 block offsets, `(strips, blocks, 16)`; empty for 8-bit values.
    pub(super) fn block_offsets(&self) -> &[f32] {
        &self.m
    }

    /// Bytes of one strip's values.
    pub(super) fn strip_bytes(&self) -> usize {
        let nb = self.nblocks();
        if self.four_bit {
            nb.div_ceil(2) * STRIP_BLOCK
        } else {
            nb * STRIP_BLOCK
        }
    }

    /// From 8-bit values `q (rows, cols)` and scales `(rows, blocks)`,
    /// stored as `q + 128` if `offset` (for kernels without the tile unit:
    /// see [`Strips::offset`]), else signed.
    pub(crate) fn from_q8(rows: usize, cols: usize, q: &[i8], scales: &[f32], offset: bool) -> Self {
        let flip = if offset { 0x80 } else { 0 };
        let mut out = Self::build(rows, cols, false, scales, None, |r, c| (q[r * cols + c] as u8) ^ flip);
        out.offset = offset;
        out
    }

    /// From 4-bit values (`q(row, col)` in 0..16), scales and offsets.
    pub fn from_q4(rows: usize, cols: usize, d: &[f32], m: &[f32], q: impl Fn(usize, usize) -> u8) -> Self {
        Self::build(rows, cols, true, d, Some(m), q)
    }

    fn build(
        rows: usize,
        cols: usize,
        four_bit: bool,
        d: &[f32],
        m: Option<&[f32]>,
        q: impl Fn(usize, usize) -> u8,
    ) -> Self {
        let nb = cols / BLOCK;
        let scale_len = rows.div_ceil(TILE) * nb * TILE;
        let mut out = Strips {
            rows,
            cols,
            four_bit,
            offset: false,
            data: Lines::zeroed(0),
            d: Lines::zeroed(scale_len),
            m: Lines::zeroed(if m.is_some() { scale_len } else { 0 }),
        };
        out.data = Lines::zeroed(out.strips() * out.strip_bytes());
        let strip_bytes = out.strip_bytes();
        for r in 0..rows {
            let (s, lane) = (r / TILE, r % TILE);
            let base = s * strip_bytes;
            for b in 0..nb {
                let at = (s * nb + b) * TILE + lane;
                out.d[at] = d[r * nb + b];
                if let Some(m) = m {
                    out.m[at] = m[r * nb + b];
                }
                let (unit, shift) = if four_bit { (b / 2, 4 * (b % 2)) } else { (b, 0) };
                for e in 0..BLOCK {
                    let (j, i) = (e / 4, e % 4);
                    let byte = &mut out.data[base + unit * STRIP_BLOCK + j * 4 * TILE + lane * 4 + i];
                    *byte |= q(r, b * BLOCK + e) << shift;
                }
            }
        }
        out
    }
}

/// One block's scales applied to its integer sums (16 weight rows, one per
/// lane, for one token row): the single place the AMX and VNNI kernels do
/// this, so that they round identically (the AVX2 kernel does the same
/// operations on 8 lanes).
#[inline(always)]
pub(super) unsafe fn block_update(
    acc: __m512,
    sums: __m512i,
    dw: __m512,
    dx: f32,
    offsets: Option<(f32, __m512)>,
) -> __m512 {
    let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc);
    match offsets {
        Some((sx, mw)) => _mm512_fmadd_ps(_mm512_set1_ps(sx), mw, acc),
        None => acc,
    }
}

/// Group `j` of 4-bit block `b` in a strip at `base`: 16 rows x 4 values,
/// one byte each (the block's nibbles of its pair's group).
#[inline(always)]
pub(super) unsafe fn four_bit_group(base: *const u8, b: usize, j: usize) -> __m512i {
    let v = _mm512_loadu_si512(base.add((b / 2) * STRIP_BLOCK + j * 64) as *const _);
    let v = if b % 2 == 0 { v } else { _mm512_srli_epi16(v, 4) };
    _mm512_and_si512(v, _mm512_set1_epi8(0x0F))
}

/// Stores the first `valid` lanes of `v` at `dst`.
#[inline(always)]
pub(super) unsafe fn store_lanes(dst: *mut f32, v: __m512, valid: usize) {
    _mm512_mask_storeu_ps(dst, ((1u32 << valid) - 1) as u16, v);
}

/// Strip `s`'s 4-bit blocks as bytes `(blocks, 8, 64)` in `buf`, each
/// pair of blocks loaded once.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,fma")]
pub(super) unsafe fn unpack_strip(w: &Strips, s: usize, buf: &mut Lines<u8>) -> *const u8 {
    let nb = w.nblocks();
    let base = w.strip_values(s);
    // Every byte of the first `nb` blocks is written below.
    buf.grow_to(nb * STRIP_BLOCK);
    let low = _mm512_set1_epi8(0x0F);
    let dst = buf.as_mut_ptr();
    for p in 0..nb.div_ceil(2) {
        for j in 0..8 {
            let v = _mm512_loadu_si512(base.add(p * STRIP_BLOCK + j * 64) as *const _);
            _mm512_storeu_si512(
                dst.add(2 * p * STRIP_BLOCK + j * 64) as *mut _,
                _mm512_and_si512(v, low),
            );
            if 2 * p + 1 < nb {
                let high = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                _mm512_storeu_si512(dst.add((2 * p + 1) * STRIP_BLOCK + j * 64) as *mut _, high);
            }
        }
    }
    buf.as_ptr()
}

thread_local! {
    /// One strip's weights as bytes, `(blocks, 8, 64)` (4-bit pairs split).
    pub(super) static UNPACKED: RefCell<Lines<u8>> = RefCell::new(Lines::zeroed(0));
}
