//! Intel AMX tiles for the batched GEMM (Sapphire Rapids and later), over
//! the strips of `strips.rs`: 16 token rows at a time from
//! [`MIN_TILE_ROWS`] rows on (the VNNI kernel below), with the same scale
//! updates as the VNNI kernel ([`block_update`]), so the same bits.
//!
//! Invariant: the tile instructions are emitted with `asm!` (their
//! intrinsics are not stable) only after Linux granted the tile-data state
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), checked once in [`available`].

use std::arch::asm;
use std::arch::x86_64::*;

use super::lines::Lines;
use super::strips::{block_update, store_lanes, unpack_strip, Strips, STRIP_BLOCK, TILE};
use super::{Q8Rows, BLOCK};

/// From this many token rows on, the tile unit; below, AVX-512 VNNI (the
/// crossing point measured by `examples/qgemm_kernels.rs`: 6-8 rows, with
/// the VNNI kernel of 4 rows per weight load; not measured again since it
/// takes 8, for want of an AMX machine; moving it changes no bits).
pub const MIN_TILE_ROWS: usize = 8;

/// Whether this CPU and kernel can run the tile instructions (and the
/// AVX-512 VNNI kernel that shares their results).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        if !super::vnni::vnni_available() {
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

/// Token rows padded to a multiple of 16 (zero rows), built once per
/// `Q8Rows` for the tile unit's first operand.
pub struct AmxRows {
    pub(super) quants: Vec<i8>,
    pub(super) scales: Vec<f32>,
    pub(super) scaled_sums: Vec<f32>,
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
pub(super) unsafe fn strip_tiles(w: &Strips, s: usize, x: &Q8Rows, xa: &AmxRows, out: &mut [f32], buf: &mut Lines<u8>) {
    let (k, nb, n) = (w.cols, w.nblocks(), w.rows);
    let valid = TILE.min(n - s * TILE);
    let base = w.strip_values(s);
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
