//! Intel AMX tiles for the batched GEMM (Sapphire Rapids and later).
//!
//! One `tdpbusd` (4-bit weights, unsigned) or `tdpbssd` (8-bit weights)
//! multiplies a 16 x 32 tile of weight values by a 32 x 16 tile of
//! activation values into 16 x 16 int32 sums: one 32-value block for 16
//! weight rows and 16 activation rows in one instruction. Blocks carry their
//! own scales, so each block's sums leave the tile unit (`tilestored`) and
//! are scaled into f32 accumulators held in AVX-512 registers:
//!
//! ```text
//!   acc[w][x] += C[w][x] * dw[w] * dx[x]  (+ mw[w] * sx[x] for Q4_1 offsets)
//! ```
//!
//! Activations are packed once per call into the tile unit's layout for the
//! second operand (groups of 4 values of one row side by side); 4-bit weight
//! rows are unpacked to bytes one strip of 16 rows at a time, in L1.
//! Padding rows (past the last weight or activation row) are zero and their
//! results are dropped. The tile instructions are emitted with `asm!` (the
//! intrinsics are not stable); Linux must grant the tile-data state
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), checked once in [`available`].

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use super::{Q8Rows, BLOCK};

/// Weight and activation rows per tile.
const TILE: usize = 16;
/// Bytes of one packed activation block: 8 rows of 4-value groups x 16 rows.
const PACKED_BLOCK: usize = BLOCK * TILE;

/// Whether this CPU and kernel can run the tile instructions.
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx2") && has!("fma")) {
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

/// Activation rows in the tile unit's layout, built once per `Q8Rows`.
pub struct AmxRows {
    groups: usize,
    /// (groups, nblocks, 8, 64): `[g][b][j][4 * r + i] = x[16 g + r][32 b + 4 j + i]`.
    packed: Vec<i8>,
    /// (groups, nblocks, 16): block scales, zero for padding rows.
    scales: Vec<f32>,
    /// (groups, nblocks, 16): `scale * sum(quants)` per block.
    scaled_sums: Vec<f32>,
}

impl AmxRows {
    pub fn pack(x: &Q8Rows) -> Self {
        let (m, k) = (x.rows, x.cols);
        let nblocks = k / BLOCK;
        let groups = m.div_ceil(TILE);
        let mut packed = vec![0i8; groups * nblocks * PACKED_BLOCK];
        let mut scales = vec![0.0f32; groups * nblocks * TILE];
        let mut scaled_sums = vec![0.0f32; groups * nblocks * TILE];
        for row in 0..m {
            let (g, r) = (row / TILE, row % TILE);
            for b in 0..nblocks {
                let src = &x.quants[row * k + b * BLOCK..row * k + (b + 1) * BLOCK];
                let dst = &mut packed[(g * nblocks + b) * PACKED_BLOCK..];
                for (j, four) in src.chunks_exact(4).enumerate() {
                    dst[j * 4 * TILE + 4 * r..j * 4 * TILE + 4 * r + 4].copy_from_slice(four);
                }
                scales[(g * nblocks + b) * TILE + r] = x.scales[row * nblocks + b];
                scaled_sums[(g * nblocks + b) * TILE + r] = x.scaled_sums[row * nblocks + b];
            }
        }
        AmxRows {
            groups,
            packed,
            scales,
            scaled_sums,
        }
    }
}

/// A weight matrix as the tile kernel reads it.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    /// Signed 8-bit values, row-major `(rows, cols)`, one scale per block.
    Q8 { quants: &'a [i8], scales: &'a [f32] },
    /// 4-bit values packed two blocks per 32 bytes (see `q4`), `value = d q + m`.
    Q4 {
        packed: &'a [u8],
        row_bytes: usize,
        d: &'a [f32],
        m: &'a [f32],
    },
}

/// Per-thread buffers for one strip of 16 weight rows.
#[derive(Default)]
struct Strip {
    /// The rows as bytes, `(16, cols)` (4-bit rows unpacked, a short last
    /// strip padded with zero rows).
    bytes: Vec<u8>,
    /// Block scales and offsets, `(nblocks, 16)`, zero for padding rows.
    dw: Vec<f32>,
    mw: Vec<f32>,
}

thread_local! {
    static STRIP: RefCell<Strip> = RefCell::new(Strip::default());
}

/// `out (x.rows, rows) = x · wᵀ` for a `(rows, cols)` weight matrix.
pub fn matmul(w: Weights<'_>, rows: usize, cols: usize, x: &Q8Rows, out: &mut [f32]) {
    assert!(available(), "AMX kernel chosen on a CPU without AMX");
    assert_eq!(x.cols, cols, "inner dimensions differ");
    assert_eq!(out.len(), x.rows * rows);
    let xa = x.amx();
    let strips = rows.div_ceil(TILE);
    let out_ptr = super::SyncPtr(out.as_mut_ptr());
    (0..strips).into_par_iter().with_min_len(2).for_each(|s| {
        // SAFETY: each strip writes only its own columns of `out`, which
        // outlives the loop; `available()` checked the CPU and the kernel.
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), x.rows * rows) };
        STRIP.with(|strip| unsafe { strip_product(w, rows, cols, s * TILE, x.rows, xa, out, &mut strip.borrow_mut()) });
    });
}

/// Tile configuration (palette 1): tiles 0/3 weights (16 x 32 bytes),
/// 1/4 activations (8 x 64 bytes), 2/5 sums (16 x 64 bytes).
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

/// Weight rows `n0..n0+16` (fewer at the end) against all activation rows.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma")]
unsafe fn strip_product(
    w: Weights<'_>,
    rows: usize,
    k: usize,
    n0: usize,
    m: usize,
    xa: &AmxRows,
    out: &mut [f32],
    strip: &mut Strip,
) {
    let nb = k / BLOCK;
    let valid = TILE.min(rows - n0);
    let Strip { bytes: strip, dw, mw } = strip;
    // The strip's weight bytes, `(16, k)` with stride `k`.
    let (a_ptr, unsigned): (*const u8, bool) = match w {
        Weights::Q8 { quants, .. } if valid == TILE => (quants.as_ptr().add(n0 * k) as *const u8, false),
        Weights::Q8 { quants, .. } => {
            strip.clear();
            strip.resize(TILE * k, 0);
            let src = &quants[n0 * k..(n0 + valid) * k];
            std::ptr::copy_nonoverlapping(src.as_ptr() as *const u8, strip.as_mut_ptr(), src.len());
            (strip.as_ptr(), false)
        }
        Weights::Q4 { packed, row_bytes, .. } => {
            strip.clear();
            strip.resize(TILE * k, 0);
            let low = _mm256_set1_epi8(0x0F);
            for r in 0..valid {
                let src = packed.as_ptr().add((n0 + r) * row_bytes);
                let dst = strip.as_mut_ptr().add(r * k);
                for p in 0..nb.div_ceil(2) {
                    let v = _mm256_loadu_si256(src.add(p * BLOCK) as *const __m256i);
                    _mm256_storeu_si256(dst.add(2 * p * BLOCK) as *mut __m256i, _mm256_and_si256(v, low));
                    if 2 * p + 1 < nb {
                        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                        _mm256_storeu_si256(dst.add((2 * p + 1) * BLOCK) as *mut __m256i, hi);
                    }
                }
            }
            (strip.as_ptr(), true)
        }
    };
    // Block scales (and Q4 offsets) transposed to `(nb, 16)`, zero for
    // padding rows, so that the epilogue runs over all 16 rows with its
    // sums in registers.
    let (scales, offsets) = match w {
        Weights::Q8 { scales, .. } => (scales, None),
        Weights::Q4 { d, m, .. } => (d, Some(m)),
    };
    dw.clear();
    dw.resize(nb * TILE, 0.0);
    mw.clear();
    mw.resize(nb * TILE, 0.0);
    for r in 0..valid {
        for b in 0..nb {
            dw[b * TILE + r] = scales[(n0 + r) * nb + b];
            if let Some(m) = offsets {
                mw[b * TILE + r] = m[(n0 + r) * nb + b];
            }
        }
    }
    let has_offsets = offsets.is_some();
    let config = TileConfig::new();
    asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack));
    let mut sums = Sums([0; 2 * TILE * TILE]);
    for g in 0..xa.groups {
        let mut acc = [_mm512_setzero_ps(); TILE];
        let mut b = 0;
        while b < nb {
            let two = b + 1 < nb;
            let a0 = a_ptr.add(b * BLOCK);
            let x0 = xa.packed.as_ptr().add((g * nb + b) * PACKED_BLOCK);
            let c = sums.0.as_mut_ptr();
            match (unsigned, two) {
                (true, true) => asm!(
                    "tileloadd tmm0, [{a0} + {k}*1]",
                    "tileloadd tmm1, [{x0} + {s64}*1]",
                    "tileloadd tmm3, [{a1} + {k}*1]",
                    "tileloadd tmm4, [{x1} + {s64}*1]",
                    "tilezero tmm2",
                    "tilezero tmm5",
                    "tdpbusd tmm2, tmm0, tmm1",
                    "tdpbusd tmm5, tmm3, tmm4",
                    "tilestored [{c0} + {s64}*1], tmm2",
                    "tilestored [{c1} + {s64}*1], tmm5",
                    a0 = in(reg) a0, a1 = in(reg) a0.add(BLOCK), k = in(reg) k,
                    x0 = in(reg) x0, x1 = in(reg) x0.add(PACKED_BLOCK), s64 = in(reg) 64usize,
                    c0 = in(reg) c, c1 = in(reg) c.add(TILE * TILE),
                    options(nostack),
                ),
                (false, true) => asm!(
                    "tileloadd tmm0, [{a0} + {k}*1]",
                    "tileloadd tmm1, [{x0} + {s64}*1]",
                    "tileloadd tmm3, [{a1} + {k}*1]",
                    "tileloadd tmm4, [{x1} + {s64}*1]",
                    "tilezero tmm2",
                    "tilezero tmm5",
                    "tdpbssd tmm2, tmm0, tmm1",
                    "tdpbssd tmm5, tmm3, tmm4",
                    "tilestored [{c0} + {s64}*1], tmm2",
                    "tilestored [{c1} + {s64}*1], tmm5",
                    a0 = in(reg) a0, a1 = in(reg) a0.add(BLOCK), k = in(reg) k,
                    x0 = in(reg) x0, x1 = in(reg) x0.add(PACKED_BLOCK), s64 = in(reg) 64usize,
                    c0 = in(reg) c, c1 = in(reg) c.add(TILE * TILE),
                    options(nostack),
                ),
                (true, false) => asm!(
                    "tileloadd tmm0, [{a0} + {k}*1]",
                    "tileloadd tmm1, [{x0} + {s64}*1]",
                    "tilezero tmm2",
                    "tdpbusd tmm2, tmm0, tmm1",
                    "tilestored [{c0} + {s64}*1], tmm2",
                    a0 = in(reg) a0, k = in(reg) k, x0 = in(reg) x0, s64 = in(reg) 64usize, c0 = in(reg) c,
                    options(nostack),
                ),
                (false, false) => asm!(
                    "tileloadd tmm0, [{a0} + {k}*1]",
                    "tileloadd tmm1, [{x0} + {s64}*1]",
                    "tilezero tmm2",
                    "tdpbssd tmm2, tmm0, tmm1",
                    "tilestored [{c0} + {s64}*1], tmm2",
                    a0 = in(reg) a0, k = in(reg) k, x0 = in(reg) x0, s64 = in(reg) 64usize, c0 = in(reg) c,
                    options(nostack),
                ),
            }
            for h in 0..(1 + two as usize) {
                let bb = b + h;
                let at = (g * nb + bb) * TILE;
                let dx = _mm512_loadu_ps(xa.scales.as_ptr().add(at));
                let sx = _mm512_loadu_ps(xa.scaled_sums.as_ptr().add(at));
                let block = sums.0.as_ptr().add(h * TILE * TILE);
                let (dwb, mwb) = (dw.as_ptr().add(bb * TILE), mw.as_ptr().add(bb * TILE));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let prod = _mm512_cvtepi32_ps(_mm512_loadu_si512(block.add(r * TILE) as *const _));
                    let scale = _mm512_mul_ps(dx, _mm512_set1_ps(*dwb.add(r)));
                    *acc = _mm512_fmadd_ps(prod, scale, *acc);
                    if has_offsets {
                        *acc = _mm512_fmadd_ps(sx, _mm512_set1_ps(*mwb.add(r)), *acc);
                    }
                }
            }
            b += 1 + two as usize;
        }
        let xrows = TILE.min(m - g * TILE);
        let n = rows;
        for (r, acc) in acc.iter().enumerate().take(valid) {
            let mut lanes = [0.0f32; TILE];
            _mm512_storeu_ps(lanes.as_mut_ptr(), *acc);
            for (xl, v) in lanes.iter().enumerate().take(xrows) {
                out[(g * TILE + xl) * n + n0 + r] = *v;
            }
        }
    }
    asm!("tilerelease", options(nostack));
}

#[repr(C, align(64))]
struct Sums([i32; 2 * TILE * TILE]);
