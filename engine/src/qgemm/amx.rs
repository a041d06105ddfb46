//! Intel AMX tiles for the batched GEMM (Sapphire Rapids and later), and an
//! AVX-512 VNNI kernel over the same weight layout that gives the same bits:
//! the AMX kernel's path below 8 token rows, and on CPUs with VNNI but no
//! AMX (AMD Zen 4/5) the path for every row count (`matmul_vnni`).
//!
//! Weights are re-laid out once in **strips** of 16 rows, 4 values of a row
//! side by side (the tile unit's layout for its second operand):
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
//! Integer block sums are exact in both, so a token row's result does not
//! depend on how many rows ran with it. The tile instructions are emitted
//! with `asm!` (their intrinsics are not stable); Linux must grant the
//! tile-data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), checked once in
//! [`available`].

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use super::lines::Lines;
use super::{Q8Rows, BLOCK};

/// Weight and activation rows per tile.
const TILE: usize = 16;
/// Bytes of one block of a strip: 8 groups x 16 rows x 4 values.
const STRIP_BLOCK: usize = BLOCK * TILE;
/// From this many token rows on, the tile unit; below, AVX-512 VNNI (the
/// crossing point measured by `examples/qgemm_kernels.rs`: 6-8 rows).
pub const MIN_TILE_ROWS: usize = 8;

/// Whether this CPU and kernel can run the tile instructions (and the
/// AVX-512 VNNI kernel that shares their results).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        if !vnni_available() {
            return false;
        }
        let leaf7 = __cpuid_count(7, 0);
        let (amx_tile, amx_int8) = (leaf7.edx & (1 << 24) != 0, leaf7.edx & (1 << 25) != 0);
        if !(amx_tile && amx_int8) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain syscall with integer arguments.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    })
}

/// Whether this CPU runs the strip kernel on AVX-512 VNNI (every row
/// count: the `Vnni` kernel; few rows of the `Amx` one).
pub fn vnni_available() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vnni") && has!("fma")
}

/// A weight matrix in strips (see the module docs).
pub struct Strips {
    rows: usize,
    cols: usize,
    /// 4-bit values (unsigned, two blocks per group byte) or 8-bit.
    four_bit: bool,
    /// 8-bit values stored as `q + 128` (unsigned): `vpdpbusd` takes them
    /// as they are and each block's sum loses `128 * sum(x)` (exact
    /// integers, so the same sums as signed values), where the signed
    /// layout needs a sign trick per group and row. Signed where the tile
    /// unit reads the strips.
    offset: bool,
    /// Q4: (strips, pairs, 8, 64); Q8: (strips, blocks, 8, 64).
    data: Lines<u8>,
    /// (strips, blocks, 16): block scales, zero for padding rows.
    d: Lines<f32>,
    /// (strips, blocks, 16): Q4 offsets (`value = d q + m`); empty for Q8.
    m: Lines<f32>,
}

impl Strips {
    fn nblocks(&self) -> usize {
        self.cols / BLOCK
    }

    fn strips(&self) -> usize {
        self.rows.div_ceil(TILE)
    }

    /// Bytes of one strip's values.
    fn strip_bytes(&self) -> usize {
        let nb = self.nblocks();
        if self.four_bit {
            nb.div_ceil(2) * STRIP_BLOCK
        } else {
            nb * STRIP_BLOCK
        }
    }

    /// From 8-bit values `q (rows, cols)` and scales `(rows, blocks)`;
    /// stored as `q + 128` on CPUs without the tile unit.
    pub fn from_q8(rows: usize, cols: usize, q: &[i8], scales: &[f32]) -> Self {
        Self::from_q8_as(rows, cols, q, scales, !available())
    }

    /// [`Strips::from_q8`], `offset` or signed whatever the CPU.
    pub(crate) fn from_q8_as(rows: usize, cols: usize, q: &[i8], scales: &[f32], offset: bool) -> Self {
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

/// Token rows padded to a multiple of 16 (zero rows), built once per
/// `Q8Rows` for the tile unit's first operand.
pub struct AmxRows {
    quants: Vec<i8>,
    scales: Vec<f32>,
    scaled_sums: Vec<f32>,
}

impl AmxRows {
    pub fn pack(x: &Q8Rows) -> Self {
        let padded = x.rows.div_ceil(TILE) * TILE;
        let nb = x.cols / BLOCK;
        let mut quants = x.quants.clone();
        quants.resize(padded * x.cols, 0);
        let mut scales = x.scales.clone();
        scales.resize(padded * nb, 0.0);
        let mut scaled_sums = x.scaled_sums.clone();
        scaled_sums.resize(padded * nb, 0.0);
        AmxRows {
            quants,
            scales,
            scaled_sums,
        }
    }
}

/// `outs[i] (x.rows, ws[i].rows) = x · ws[i]ᵀ` for every product, as one
/// parallel stage over all their strips, with the strip kernel `kind`:
/// `Amx` (tiles from [`MIN_TILE_ROWS`] token rows on, AVX-512 VNNI below)
/// or `Vnni` (AVX-512 VNNI for every row count, CPUs without AMX). The same
/// bits either way, and the same as each product alone.
pub fn strips_matmul(ws: &[&Strips], x: &Q8Rows, outs: &mut [&mut [f32]], kind: super::KernelKind) {
    let amx = kind == super::KernelKind::Amx;
    if amx {
        assert!(available(), "AMX kernel chosen on a CPU without AMX");
    } else {
        assert!(vnni_available(), "VNNI kernel chosen on a CPU without AVX-512 VNNI");
    }
    assert_eq!(ws.len(), outs.len());
    let mut starts = Vec::with_capacity(ws.len() + 1);
    starts.push(0);
    for (w, out) in ws.iter().zip(outs.iter()) {
        assert_eq!(x.cols, w.cols, "inner dimensions differ");
        assert_eq!(out.len(), x.rows * w.rows);
        starts.push(starts.last().copied().unwrap_or(0) + w.strips());
    }
    let shared: Vec<_> = outs.iter_mut().map(|o| crate::par::SharedOut::new(o)).collect();
    let xa = (amx && x.rows >= MIN_TILE_ROWS).then(|| x.amx());
    let total = starts[ws.len()];
    (0..total).into_par_iter().with_min_len(2).for_each(|i| {
        let p = starts.partition_point(|&start| start <= i) - 1;
        let (w, s) = (ws[p], i - starts[p]);
        // SAFETY: each strip writes only its own columns of its product's
        // output, which outlives the loop; the CPU was checked above.
        let out = unsafe { shared[p].slice() };
        match xa {
            Some(xa) => UNPACKED.with(|buf| unsafe { strip_tiles(w, s, x, xa, out, &mut buf.borrow_mut()) }),
            None => unsafe { strip_rows(w, s, x, out) },
        }
    });
}

/// One block's scales applied to its integer sums (16 weight rows, one per
/// lane, for one token row): the single place both kernels do this, so that
/// they round identically.
#[inline(always)]
unsafe fn block_update(acc: __m512, sums: __m512i, dw: __m512, dx: f32, offsets: Option<(f32, __m512)>) -> __m512 {
    let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc);
    match offsets {
        Some((sx, mw)) => _mm512_fmadd_ps(_mm512_set1_ps(sx), mw, acc),
        None => acc,
    }
}

/// Group `j` of 4-bit block `b` in a strip at `base`: 16 rows x 4 values,
/// one byte each (the block's nibbles of its pair's group).
#[inline(always)]
unsafe fn four_bit_group(base: *const u8, b: usize, j: usize) -> __m512i {
    let v = _mm512_loadu_si512(base.add((b / 2) * STRIP_BLOCK + j * 64) as *const _);
    let v = if b % 2 == 0 { v } else { _mm512_srli_epi16(v, 4) };
    _mm512_and_si512(v, _mm512_set1_epi8(0x0F))
}

/// Stores the first `valid` lanes of `v` at `dst`.
#[inline(always)]
unsafe fn store_lanes(dst: *mut f32, v: __m512, valid: usize) {
    _mm512_mask_storeu_ps(dst, ((1u32 << valid) - 1) as u16, v);
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
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,fma")]
unsafe fn strip_rows(w: &Strips, s: usize, x: &Q8Rows, out: &mut [f32]) {
    let base = w.data.as_ptr().add(s * w.strip_bytes());
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

/// Strip `s`'s 4-bit blocks as bytes `(blocks, 8, 64)` in `buf`, each
/// pair of blocks loaded once.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,fma")]
unsafe fn unpack_strip(w: &Strips, s: usize, buf: &mut Lines<u8>) -> *const u8 {
    let nb = w.nblocks();
    let base = w.data.as_ptr().add(s * w.strip_bytes());
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

/// Asks the cache for what block `b` of strip `s + 1` reads (its values,
/// scales and offsets), so that the next strip's first touch does not
/// wait on memory while this one computes. No effect on any result.
#[inline(always)]
unsafe fn prefetch_next(w: &Strips, s: usize, b: usize) {
    let data = w.data.as_ptr().add((s + 1) * w.strip_bytes());
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

thread_local! {
    /// One strip's weights as bytes, `(blocks, 8, 64)` (4-bit pairs split).
    static UNPACKED: RefCell<Lines<u8>> = RefCell::new(Lines::zeroed(0));
}

/// Tile configuration (palette 1): tiles 0/3 token rows (16 x 32 bytes),
/// 1/4 weights (8 x 64 bytes), 2/5 sums (16 x 64 bytes).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for (t, (rows, colsb)) in [(16u8, 32u16), (8, 64), (16, 64), (16, 32), (8, 64), (16, 64)]
            .into_iter()
            .enumerate()
        {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
            c[48 + t] = rows;
        }
        TileConfig(c)
    }
}

#[repr(C, align(64))]
struct Sums([i32; 2 * TILE * TILE]);

/// Strip `s` against all token rows, 16 at a time on the tile unit.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,fma")]
unsafe fn strip_tiles(w: &Strips, s: usize, x: &Q8Rows, xa: &AmxRows, out: &mut [f32], buf: &mut Lines<u8>) {
    let (k, nb, n) = (w.cols, w.nblocks(), w.rows);
    let valid = TILE.min(n - s * TILE);
    let base = w.data.as_ptr().add(s * w.strip_bytes());
    // The strip's blocks as 8 x 64 bytes each.
    let blocks: *const u8 = if w.four_bit { unpack_strip(w, s, buf) } else { base };
    let config = TileConfig::new();
    asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack));
    // Two buffers: the sums of blocks b, b+1 are stored while those of the
    // previous two are scaled, so the tile unit and the epilogue overlap.
    let mut sums = [Sums([0; 2 * TILE * TILE]), Sums([0; 2 * TILE * TILE])];
    for g in 0..x.rows.div_ceil(TILE) {
        let mut acc = [_mm512_setzero_ps(); TILE];
        // Scales the sums of `count` blocks from `first` held in `buf`.
        let epilogue = |acc: &mut [__m512; TILE], buf: *const i32, first: usize, count: usize| {
            for h in 0..count {
                let bb = first + h;
                let at = (s * nb + bb) * TILE;
                let dw = _mm512_loadu_ps(w.d.as_ptr().add(at));
                let mw = if w.four_bit {
                    _mm512_loadu_ps(w.m.as_ptr().add(at))
                } else {
                    dw
                };
                let block = buf.add(h * TILE * TILE);
                for (xl, acc) in acc.iter_mut().enumerate() {
                    let row = g * TILE + xl;
                    let isums = _mm512_loadu_si512(block.add(xl * TILE) as *const _);
                    let dx = *xa.scales.get_unchecked(row * nb + bb);
                    let offsets = w.four_bit.then(|| (*xa.scaled_sums.get_unchecked(row * nb + bb), mw));
                    *acc = block_update(*acc, isums, dw, dx, offsets);
                }
            }
        };
        let mut pending: Option<(usize, usize, usize)> = None;
        let mut b = 0;
        let mut turn = 0;
        while b < nb {
            let two = b + 1 < nb;
            let x0 = xa.quants.as_ptr().add(g * TILE * k + b * BLOCK);
            let w0 = blocks.add(b * STRIP_BLOCK);
            let c = sums[turn].0.as_mut_ptr();
            // Blocks b (tiles 0, 1 -> 2) and, if any, b + 1 (3, 4 -> 5):
            // signed tokens times unsigned 4-bit or signed 8-bit weights.
            macro_rules! products {
                ($op:literal) => {
                    if two {
                        asm!(
                            "tileloadd tmm0, [{x0} + {k}*1]",
                            "tileloadd tmm1, [{w0} + {s64}*1]",
                            "tileloadd tmm3, [{x1} + {k}*1]",
                            "tileloadd tmm4, [{w1} + {s64}*1]",
                            "tilezero tmm2",
                            "tilezero tmm5",
                            concat!($op, " tmm2, tmm0, tmm1"),
                            concat!($op, " tmm5, tmm3, tmm4"),
                            "tilestored [{c0} + {s64}*1], tmm2",
                            "tilestored [{c1} + {s64}*1], tmm5",
                            x0 = in(reg) x0, x1 = in(reg) x0.add(BLOCK), k = in(reg) k,
                            w0 = in(reg) w0, w1 = in(reg) w0.add(STRIP_BLOCK), s64 = in(reg) 64usize,
                            c0 = in(reg) c, c1 = in(reg) c.add(TILE * TILE),
                            options(nostack),
                        )
                    } else {
                        asm!(
                            "tileloadd tmm0, [{x0} + {k}*1]",
                            "tileloadd tmm1, [{w0} + {s64}*1]",
                            "tilezero tmm2",
                            concat!($op, " tmm2, tmm0, tmm1"),
                            "tilestored [{c0} + {s64}*1], tmm2",
                            x0 = in(reg) x0, k = in(reg) k, w0 = in(reg) w0, s64 = in(reg) 64usize, c0 = in(reg) c,
                            options(nostack),
                        )
                    }
                };
            }
            if w.four_bit {
                products!("tdpbsud");
            } else {
                products!("tdpbssd");
            }
            if let Some((buf, first, count)) = pending {
                epilogue(&mut acc, sums[buf].0.as_ptr(), first, count);
            }
            pending = Some((turn, b, 1 + two as usize));
            turn ^= 1;
            b += 1 + two as usize;
        }
        if let Some((buf, first, count)) = pending {
            epilogue(&mut acc, sums[buf].0.as_ptr(), first, count);
        }
        for (xl, acc) in acc.iter().enumerate().take(TILE.min(x.rows - g * TILE)) {
            store_lanes(out.as_mut_ptr().add((g * TILE + xl) * n + s * TILE), *acc, valid);
        }
    }
    asm!("tilerelease", options(nostack));
}
