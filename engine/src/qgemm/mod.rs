//! Batched 8-bit GEMM for the CPU forward: `out (m, n) = x (m, k) · wᵀ`
//! with `w (n, k)` quantized to 8 bits in blocks of 32 along `k` (one f32
//! scale per block, as GGUF Q8_0) and `x` quantized the same way per row.
//!
//! Unlike a per-row dot product (candle's quantized matmul), each weight
//! block is loaded once per tile and used for `MR` activation rows, so a
//! forward over T tokens re-reads the weights T/MR times instead of T times.
//!
//! ```text
//!   tile: NR weight rows x MR activation rows, accumulated over k blocks
//!          k ->  [b0][b1][b2] ...
//!   w row n    | 32 x i8 + scale | ...
//!   w row n+1  |                 | ...
//!   x row m..m+MR (quantized once per call)
//! ```
//!
//! Paths, chosen at run time: Intel AMX tiles (`amx.rs`) and the AVX-512
//! VNNI strip kernel (`vnni.rs`), over weights in strips of 16 rows
//! (`strips.rs`, built on first use; the same bits as each other), the
//! AVX2 (+FMA) strip kernel over the same strips (`strips_avx2.rs`,
//! `maddubs` int8 products), AVX-512 (BW) tiles of the row-major weights
//! (`tiles.rs`, chosen only by name), and a portable scalar fallback used
//! everywhere else. Threads: the output columns are split across the rayon
//! pool.

use rayon::prelude::*;

/// Calls `$f::<M, N>(args..)` for the runtime tile shape `(mr, nr)`.
macro_rules! dispatch_tile {
    ($f:ident, ($mr:expr, $nr:expr), $($arg:expr),*) => {
        match ($mr, $nr) {
            (4, 2) => $f::<4, 2>($($arg),*),
            (3, 2) => $f::<3, 2>($($arg),*),
            (2, 2) => $f::<2, 2>($($arg),*),
            (1, 2) => $f::<1, 2>($($arg),*),
            (4, 1) => $f::<4, 1>($($arg),*),
            (3, 1) => $f::<3, 1>($($arg),*),
            (2, 1) => $f::<2, 1>($($arg),*),
            _ => $f::<1, 1>($($arg),*),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod lines;
pub mod peak;
mod q4;
#[cfg(target_arch = "x86_64")]
mod strips;
#[cfg(target_arch = "x86_64")]
mod strips_avx2;
#[cfg(target_arch = "x86_64")]
mod vnni;
pub use q4::Q4Matrix;

/// SIMD helpers shared by the 8-bit and 4-bit kernels.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `[a; 8] ++ [b; 8]`: one scale per block of a two-block vector.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn pair(a: f32, b: f32) -> __m512 {
        _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(a)), _mm256_set1_ps(b), 1)
    }
}

/// Values per quantization block (as GGUF Q8_0).
pub const BLOCK: usize = 32;
/// Activation rows per micro-tile.
pub(crate) const MR: usize = 4;
/// Weight rows per micro-tile.
pub(crate) const NR: usize = 2;
/// Weight rows per parallel task.
const TASK_ROWS: usize = 32;

/// A weight matrix in 8-bit blocks.
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// (rows, cols / BLOCK)
    scales: Vec<f32>,
    /// (rows, cols)
    quants: Vec<i8>,
    /// The same values in strips (`strips.rs`), built on first use.
    #[cfg(target_arch = "x86_64")]
    strips: std::sync::OnceLock<strips::Strips>,
}

/// Rows quantized to 8-bit blocks: activations for one call.
pub struct Q8Rows {
    pub rows: usize,
    pub cols: usize,
    pub scales: Vec<f32>,
    pub quants: Vec<i8>,
    /// Per block: `scale * sum(quants)` (the offset term of 4-bit weights).
    pub scaled_sums: Vec<f32>,
    /// Per block: `sum(quants)` (the offset term of 8-bit weights stored
    /// as unsigned bytes).
    pub sums: Vec<i32>,
    /// The rows padded to whole AMX tiles, built on first use.
    #[cfg(target_arch = "x86_64")]
    amx: std::sync::OnceLock<amx::AmxRows>,
}

/// [`Q8Rows::quantize`] with AVX2: the same `d`; values rounded half to
/// even (as llama.cpp's AVX2 path) where the portable path rounds half away
/// from zero, so exact ties may differ by one step between the two paths
/// (one machine always takes the same one).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], scales: &mut [f32], quants: &mut [i8], sums: &mut [i32]) {
    use std::arch::x86_64::*;
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let ones = _mm256_set1_epi16(1);
    for (b, block) in x.chunks_exact(BLOCK).enumerate() {
        let p = block.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let m01 = _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask));
        let m23 = _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask));
        let m = _mm256_max_ps(m01, m23);
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let i: [__m256i; 4] = std::array::from_fn(|k| {
            _mm256_cvtps_epi32(_mm256_round_ps(
                _mm256_mul_ps(v[k], inv),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            ))
        });
        // i32 -> i16 -> i8 with saturation; packs interleave 128-bit lanes,
        // the permute puts the 32 values back in order.
        let w01 = _mm256_packs_epi32(i[0], i[1]);
        let w23 = _mm256_packs_epi32(i[2], i[3]);
        let bytes =
            _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(quants.as_mut_ptr().add(b * BLOCK) as *mut __m256i, bytes);
        let pairs = _mm256_add_epi32(_mm256_madd_epi16(w01, ones), _mm256_madd_epi16(w23, ones));
        let s = _mm_add_epi32(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        scales[b] = d;
        sums[b] = _mm_cvtsi128_si32(s);
    }
}

/// Quantizes each block of 32 to `round(v / d)` with `d = max|v| / 127`.
fn quantize_blocks(src: &[f32], scales: &mut [f32], quants: &mut [i8]) {
    for ((block, d), q) in src.chunks_exact(BLOCK).zip(scales).zip(quants.chunks_exact_mut(BLOCK)) {
        // Eight running maxima, so that the loop vectorizes.
        let mut lanes = [0.0f32; 8];
        for eight in block.chunks_exact(8) {
            for (m, v) in lanes.iter_mut().zip(eight) {
                *m = m.max(v.abs());
            }
        }
        *d = lanes.iter().fold(0.0f32, |m, &v| m.max(v)) / 127.0;
        let inv = if *d > 0.0 { 1.0 / *d } else { 0.0 };
        for (q, v) in q.iter_mut().zip(block) {
            *q = (v * inv).round() as i8;
        }
    }
}

impl Q8Rows {
    /// The values the quantized rows stand for (for tests and references).
    pub fn dequantize(&self) -> Vec<f32> {
        self.quants
            .chunks_exact(BLOCK)
            .zip(&self.scales)
            .flat_map(|(q, &d)| q.iter().map(move |&v| v as f32 * d))
            .collect()
    }

    pub fn quantize(x: &[f32], rows: usize) -> Self {
        let cols = x.len() / rows.max(1);
        assert_eq!(cols % BLOCK, 0, "columns must be a multiple of {BLOCK}");
        let nblocks = x.len() / BLOCK;
        let mut scales = vec![0.0; nblocks];
        let mut quants = vec![0i8; x.len()];
        let mut sums = vec![0; nblocks];
        #[cfg(target_arch = "x86_64")]
        if crate::ops::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA; the buffers match `x`.
            unsafe { quantize_avx2(x, &mut scales, &mut quants, &mut sums) };
            return Self::from_parts(rows, cols, scales, quants, sums);
        }
        quantize_blocks(x, &mut scales, &mut quants);
        for (sum, q) in sums.iter_mut().zip(quants.chunks_exact(BLOCK)) {
            *sum = q.iter().map(|&v| v as i32).sum::<i32>();
        }
        Self::from_parts(rows, cols, scales, quants, sums)
    }

    fn from_parts(rows: usize, cols: usize, scales: Vec<f32>, quants: Vec<i8>, sums: Vec<i32>) -> Self {
        let scaled_sums = scales.iter().zip(&sums).map(|(&d, &sum)| d * sum as f32).collect();
        Q8Rows {
            rows,
            cols,
            scales,
            quants,
            scaled_sums,
            sums,
            #[cfg(target_arch = "x86_64")]
            amx: std::sync::OnceLock::new(),
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn amx(&self) -> &amx::AmxRows {
        self.amx.get_or_init(|| amx::AmxRows::pack(self))
    }
}

impl Q8Matrix {
    /// Quantizes a row-major f32 matrix `(rows, cols)`; `cols` must be a
    /// multiple of 32.
    pub fn from_f32(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols);
        assert_eq!(cols % BLOCK, 0, "columns must be a multiple of {BLOCK}");
        let mut scales = vec![0.0; rows * cols / BLOCK];
        let mut quants = vec![0i8; rows * cols];
        quantize_blocks(w, &mut scales, &mut quants);
        Q8Matrix {
            rows,
            cols,
            scales,
            quants,
            #[cfg(target_arch = "x86_64")]
            strips: std::sync::OnceLock::new(),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The dequantized matrix (for tests and references).
    pub fn dequantize(&self) -> Vec<f32> {
        self.quants
            .chunks_exact(BLOCK)
            .zip(&self.scales)
            .flat_map(|(q, &d)| q.iter().map(move |&v| v as f32 * d))
            .collect()
    }

    /// `out (m, rows) = x (m, cols) · selfᵀ`, `x` as f32 rows.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let xq = Q8Rows::quantize(x, m);
        let mut out = vec![0.0; m * self.rows];
        self.matmul_q8(&xq, &mut out, kernel_kind());
        out
    }

    /// `out (m, rows)` from already-quantized rows, with a chosen kernel.
    pub fn matmul_q8(&self, x: &Q8Rows, out: &mut [f32], kind: KernelKind) {
        #[cfg(target_arch = "x86_64")]
        if kind.uses_strips() {
            return strips_matmul(&[self.strips()], x, &mut [out], kind);
        }
        run_tiles(self, x, out, kind);
    }

    /// The strip layout of the strip kernels, built on first use.
    #[cfg(target_arch = "x86_64")]
    fn strips(&self) -> &strips::Strips {
        self.strips.get_or_init(|| {
            strips::Strips::from_q8(self.rows, self.cols, &self.quants, &self.scales, !amx::available())
        })
    }
}

/// A weight matrix of our GEMM, either width.
#[derive(Clone, Copy)]
pub(crate) enum QWeight<'a> {
    Q8(&'a Q8Matrix),
    Q4(&'a Q4Matrix),
}

impl QWeight<'_> {
    fn matmul_q8(self, x: &Q8Rows, out: &mut [f32], kind: KernelKind) {
        match self {
            QWeight::Q8(w) => w.matmul_q8(x, out, kind),
            QWeight::Q4(w) => w.matmul_q8(x, out, kind),
        }
    }
}

/// `outs[i] = x · ws[i]ᵀ` for products that share their input: one
/// parallel stage for all of them on the strip kernels (fewer hand-offs
/// between threads than one stage each), one after another otherwise. Each
/// output is the same bits as its product alone.
pub(crate) fn matmul_many(ws: &[QWeight<'_>], x: &Q8Rows, outs: &mut [&mut [f32]], kind: KernelKind) {
    #[cfg(target_arch = "x86_64")]
    if kind.uses_strips() {
        let strips: Vec<&strips::Strips> = ws
            .iter()
            .map(|w| match w {
                QWeight::Q8(w) => w.strips(),
                QWeight::Q4(w) => w.strips(),
            })
            .collect();
        return strips_matmul(&strips, x, outs, kind);
    }
    for (w, out) in ws.iter().zip(outs.iter_mut()) {
        w.matmul_q8(x, out, kind);
    }
}

/// `outs[i] (x.rows, ws[i].rows) = x · ws[i]ᵀ` for every product, as one
/// parallel stage over all their strips, with the strip kernel `kind`:
/// `Amx` (tiles from [`MIN_TILE_ROWS`](amx::MIN_TILE_ROWS) token rows on,
/// AVX-512 VNNI below), `Vnni` (AVX-512 VNNI for every row count, CPUs
/// without AMX; the same bits as `Amx`) or `Avx2` (`strips_avx2.rs`). Each
/// product's output is the same bits as the product alone.
#[cfg(target_arch = "x86_64")]
fn strips_matmul(ws: &[&strips::Strips], x: &Q8Rows, outs: &mut [&mut [f32]], kind: KernelKind) {
    match kind {
        KernelKind::Amx => assert!(amx::available(), "AMX kernel chosen on a CPU without AMX"),
        KernelKind::Vnni => assert!(
            vnni::vnni_available(),
            "VNNI kernel chosen on a CPU without AVX-512 VNNI"
        ),
        KernelKind::Avx2 => assert!(strips_avx2::available(), "AVX2 kernel chosen on a CPU without AVX2"),
        other => panic!("{other:?} is not a strip kernel"),
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
    let xa = (kind == KernelKind::Amx && x.rows >= amx::MIN_TILE_ROWS).then(|| x.amx());
    let total = starts[ws.len()];
    (0..total).into_par_iter().with_min_len(2).for_each(|i| {
        let p = starts.partition_point(|&start| start <= i) - 1;
        let (w, s) = (ws[p], i - starts[p]);
        // SAFETY: each strip writes only its own columns of its product's
        // output, which outlives the loop; the CPU was checked above.
        let out = unsafe { shared[p].slice() };
        match xa {
            Some(xa) => {
                strips::UNPACKED.with(|buf| unsafe { amx::strip_tiles(w, s, x, xa, out, &mut buf.borrow_mut()) })
            }
            None if kind == KernelKind::Avx2 => unsafe { strips_avx2::strip_rows(w, s, x, out) },
            None => unsafe { vnni::strip_rows(w, s, x, out) },
        }
    });
}

/// A weight layout with micro-kernels over `MR x NR` tiles.
pub(crate) trait TileKernel: Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// Fills `acc[..mr][..nr]` with the products of weight rows `n..n+nr`
    /// and activation rows `m..m+mr`.
    #[allow(clippy::too_many_arguments)]
    fn tile(&self, x: &Q8Rows, n: usize, m: usize, mr: usize, nr: usize, kind: KernelKind, acc: &mut [[f32; NR]; MR]);
}

/// `out (x.rows, w.rows)`: weight rows split across the rayon pool, each
/// task walking its rows in `NR x MR` tiles.
pub(crate) fn run_tiles<W: TileKernel>(w: &W, x: &Q8Rows, out: &mut [f32], kind: KernelKind) {
    assert_eq!(x.cols, w.cols(), "inner dimensions differ");
    assert_eq!(out.len(), x.rows * w.rows());
    let m = x.rows;
    let n = w.rows();
    let shared = crate::par::SharedOut::new(out);
    let num_tasks = n.div_ceil(TASK_ROWS);
    (0..num_tasks).into_par_iter().for_each(|t| {
        let n0 = t * TASK_ROWS;
        let n1 = (n0 + TASK_ROWS).min(n);
        // SAFETY: each task writes only columns n0..n1 of `out`, which no
        // other task touches; `out` outlives the parallel loop.
        let out = unsafe { shared.slice() };
        let mut nb = n0;
        while nb < n1 {
            let nr = NR.min(n1 - nb);
            let mut mb = 0;
            while mb < m {
                let mr = MR.min(m - mb);
                let mut acc = [[0.0f32; NR]; MR];
                w.tile(x, nb, mb, mr, nr, kind, &mut acc);
                for (i, row) in acc.iter().enumerate().take(mr) {
                    for (j, v) in row.iter().enumerate().take(nr) {
                        out[(mb + i) * n + nb + j] = *v;
                    }
                }
                mb += mr;
            }
            nb += nr;
        }
    });
}

impl TileKernel for Q8Matrix {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn tile(&self, x: &Q8Rows, n: usize, m: usize, mr: usize, nr: usize, kind: KernelKind, acc: &mut [[f32; NR]; MR]) {
        let tile = Tile { w: self, x, n, m };
        match kind {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx512` is only chosen when the CPU has
            // AVX-512 F/BW/DQ and AVX2/FMA.
            KernelKind::Avx512 => unsafe { avx512::tile(&tile, mr, nr, acc) },
            _ => scalar_tile(&tile, mr, nr, acc),
        }
    }
}

/// Which micro-kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    Scalar,
    /// AVX2 (+FMA) over the 16-row weight strips, 8 weight rows by up to
    /// 4 token rows at a time (`strips_avx2.rs`): CPUs without AVX-512
    /// VNNI.
    Avx2,
    Avx512,
    /// AVX-512 VNNI over 16-row weight strips, for every row count (the
    /// same bits as `Amx`): the fast path of CPUs without AMX.
    Vnni,
    /// Intel AMX tiles from 8 token rows, AVX-512 VNNI below (same bits).
    Amx,
}

impl KernelKind {
    /// Whether this kernel reads the weights in strips (`strips.rs`) rather
    /// than as row-major tiles.
    pub fn uses_strips(self) -> bool {
        cfg!(target_arch = "x86_64") && matches!(self, KernelKind::Avx2 | KernelKind::Vnni | KernelKind::Amx)
    }
}

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<KernelKind>> = const { std::cell::Cell::new(None) };
}

/// Makes [`kernel_kind`] return `kind` (if this CPU has it) on the calling
/// thread (the one that runs a model's forward); `None` restores the
/// default. For tests that compare kernels on whole forwards.
pub fn set_kernel_override(kind: Option<KernelKind>) {
    OVERRIDE.with(|o| o.set(kind));
}

/// The kernel every product uses, whatever its row count: each kernel sums
/// in its own order, so mixing kernels by batch size would make a token's
/// logits depend on the batch it ran in (and speculative decoding would no
/// longer equal plain decoding). The fastest this CPU supports (AMX, whose
/// few-row AVX-512 VNNI companion gives the same bits; else the VNNI strip
/// kernel; else the AVX2 strip kernel), unless `HETEROSPEC_QGEMM_KERNEL` (scalar, avx2, avx512, vnni,
/// amx) or
/// [`set_kernel_override`] picks another one.
pub fn kernel_kind() -> KernelKind {
    if let Some(k) = OVERRIDE.with(|o| o.get()).filter(|k| available_kernels().contains(k)) {
        return k;
    }
    default_kernel_kind()
}

fn default_kernel_kind() -> KernelKind {
    static KIND: std::sync::OnceLock<KernelKind> = std::sync::OnceLock::new();
    *KIND.get_or_init(|| {
        let available = available_kernels();
        let wanted = std::env::var("HETEROSPEC_QGEMM_KERNEL")
            .ok()
            .and_then(|v| match v.as_str() {
                "scalar" => Some(KernelKind::Scalar),
                "avx2" => Some(KernelKind::Avx2),
                "avx512" => Some(KernelKind::Avx512),
                "vnni" => Some(KernelKind::Vnni),
                "amx" => Some(KernelKind::Amx),
                _ => None,
            });
        match wanted {
            Some(k) if available.contains(&k) => k,
            _ => *available.last().expect("scalar is always available"),
        }
    })
}

/// Kernels this CPU can run, slowest first (for tests and benchmarks); the
/// last is the default. The AVX-512 (BW) tiles come before the AVX2 strips:
/// `examples/qgemm_kernels.rs` measured them 1.4x (1 row) to 3x (64 rows)
/// slower on an AMD EPYC (Zen 4).
pub fn available_kernels() -> Vec<KernelKind> {
    let mut v = vec![KernelKind::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") {
            if has!("avx512f") && has!("avx512bw") && has!("avx512dq") {
                v.push(KernelKind::Avx512);
            }
            v.push(KernelKind::Avx2);
            if vnni::vnni_available() {
                v.push(KernelKind::Vnni);
            }
            if amx::available() {
                v.push(KernelKind::Amx);
            }
        }
    }
    v
}

/// One micro-tile: weight rows `n..n+nr` against activation rows `m..m+mr`.
struct Tile<'a> {
    w: &'a Q8Matrix,
    x: &'a Q8Rows,
    n: usize,
    m: usize,
}

fn scalar_tile(t: &Tile<'_>, mr: usize, nr: usize, acc: &mut [[f32; NR]; MR]) {
    let k = t.w.cols;
    let nblocks = k / BLOCK;
    for i in 0..mr {
        let xr = t.m + i;
        for j in 0..nr {
            let wr = t.n + j;
            let mut sum = 0.0f32;
            for b in 0..nblocks {
                let wq = &t.w.quants[wr * k + b * BLOCK..wr * k + (b + 1) * BLOCK];
                let xq = &t.x.quants[xr * k + b * BLOCK..xr * k + (b + 1) * BLOCK];
                let dot: i32 = wq.iter().zip(xq).map(|(&a, &b)| a as i32 * b as i32).sum();
                sum += dot as f32 * t.w.scales[wr * nblocks + b] * t.x.scales[xr * nblocks + b];
            }
            acc[i][j] = sum;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod tiles;
#[cfg(target_arch = "x86_64")]
use tiles::avx512;

#[cfg(test)]
mod tests;
