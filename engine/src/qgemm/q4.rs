//! 4-bit weights for the batched GEMM: GGUF Q4_0 and Q4_1 blocks kept at
//! 4 bits (half the memory traffic of 8-bit weights, which is what bounds
//! single-token decoding), as `value = d * q + m` with `q` in 0..16.
//!
//! Against 8-bit activation blocks `x = dx * xq`, one block's product is
//! `d * dx * sum(q * xq) + m * (dx * sum(xq))`; the second factor is
//! precomputed per activation block (`Q8Rows::scaled_sums`).
//!
//! Packed layout, per row, per pair of blocks (32 bytes):
//! ```text
//!   byte i (0..32):  low nibble = block 2p, value i   high nibble = block 2p+1, value i
//! ```
//! so `bytes & 0xF` and `bytes >> 4` are each a whole block in order (an odd
//! last block uses the low nibbles only).

use candle_core::quantized::GgmlDType;
use half::f16;

use super::{run_tiles, KernelKind, Q8Rows, TileKernel, BLOCK, MR, NR};

/// A weight matrix in 4-bit blocks.
pub struct Q4Matrix {
    rows: usize,
    cols: usize,
    /// (rows, cols / BLOCK)
    d: Vec<f32>,
    /// (rows, cols / BLOCK)
    m: Vec<f32>,
    /// (rows, row_bytes)
    packed: Vec<u8>,
    /// The same values in strips (`strips.rs`), built on first use.
    #[cfg(target_arch = "x86_64")]
    strips: std::sync::OnceLock<super::strips::Strips>,
}

impl Q4Matrix {
    fn nblocks(&self) -> usize {
        self.cols / BLOCK
    }

    fn row_bytes(&self) -> usize {
        self.nblocks().div_ceil(2) * BLOCK
    }

    /// From per-block `d`, `m` and values `q` (0..16), row-major.
    pub fn from_parts(rows: usize, cols: usize, d: Vec<f32>, m: Vec<f32>, q: &[u8]) -> Self {
        assert_eq!(cols % BLOCK, 0, "columns must be a multiple of {BLOCK}");
        let nblocks = cols / BLOCK;
        assert_eq!(d.len(), rows * nblocks);
        assert_eq!(m.len(), rows * nblocks);
        assert_eq!(q.len(), rows * cols);
        let row_bytes = nblocks.div_ceil(2) * BLOCK;
        let mut packed = vec![0u8; rows * row_bytes];
        for r in 0..rows {
            for b in 0..nblocks {
                let (pair, high) = (b / 2, b % 2 == 1);
                for i in 0..BLOCK {
                    let v = q[r * cols + b * BLOCK + i];
                    debug_assert!(v < 16);
                    let byte = &mut packed[r * row_bytes + pair * BLOCK + i];
                    *byte |= if high { v << 4 } else { v };
                }
            }
        }
        Q4Matrix {
            rows,
            cols,
            d,
            m,
            packed,
            #[cfg(target_arch = "x86_64")]
            strips: std::sync::OnceLock::new(),
        }
    }

    /// From raw GGUF data of a `(rows, cols)` Q4_0 or Q4_1 tensor; `None`
    /// for other types.
    pub fn from_ggml(dtype: GgmlDType, data: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let (block_bytes, has_min) = match dtype {
            GgmlDType::Q4_0 => (2 + 16, false),
            GgmlDType::Q4_1 => (2 + 2 + 16, true),
            _ => return None,
        };
        let nblocks = rows * cols / BLOCK;
        if cols % BLOCK != 0 || data.len() != nblocks * block_bytes {
            return None;
        }
        let mut d = Vec::with_capacity(nblocks);
        let mut m = Vec::with_capacity(nblocks);
        let mut q = Vec::with_capacity(rows * cols);
        for block in data.chunks_exact(block_bytes) {
            let scale = f16::from_le_bytes([block[0], block[1]]).to_f32();
            let (min, qs) = if has_min {
                (f16::from_le_bytes([block[2], block[3]]).to_f32(), &block[4..])
            } else {
                (-8.0 * scale, &block[2..])
            };
            d.push(scale);
            m.push(min);
            q.extend(qs.iter().map(|b| b & 0x0F));
            q.extend(qs.iter().map(|b| b >> 4));
        }
        Some(Self::from_parts(rows, cols, d, m, &q))
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    fn value(&self, r: usize, b: usize, i: usize) -> u8 {
        let byte = self.packed[r * self.row_bytes() + (b / 2) * BLOCK + i];
        if b % 2 == 1 {
            byte >> 4
        } else {
            byte & 0x0F
        }
    }

    /// The dequantized matrix (for tests and references).
    pub fn dequantize(&self) -> Vec<f32> {
        let nb = self.nblocks();
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for b in 0..nb {
                let (d, m) = (self.d[r * nb + b], self.m[r * nb + b]);
                out.extend((0..BLOCK).map(|i| d * self.value(r, b, i) as f32 + m));
            }
        }
        out
    }

    pub fn matmul_q8(&self, x: &Q8Rows, out: &mut [f32], kind: KernelKind) {
        #[cfg(target_arch = "x86_64")]
        if kind.uses_strips() {
            return super::strips_matmul(&[self.strips()], x, &mut [out], kind);
        }
        run_tiles(self, x, out, kind);
    }

    /// The strip layout of the strip kernels, built on first use.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn strips(&self) -> &super::strips::Strips {
        self.strips.get_or_init(|| {
            super::strips::Strips::from_q4(self.rows, self.cols, &self.d, &self.m, |r, c| {
                self.value(r, c / BLOCK, c % BLOCK)
            })
        })
    }
}

impl TileKernel for Q4Matrix {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn tile(&self, x: &Q8Rows, n: usize, m: usize, mr: usize, nr: usize, kind: KernelKind, acc: &mut [[f32; NR]; MR]) {
        match kind {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx512` is only chosen when the CPU has AVX-512 F/BW/DQ.
            KernelKind::Avx512 => unsafe { simd::tile_avx512(self, x, n, m, mr, nr, acc) },
            _ => self.scalar_tile(x, n, m, mr, nr, acc),
        }
    }
}

impl Q4Matrix {
    /// One block's product: `d * dx * sum(q * xq) + m * dx * sum(xq)`.
    fn scalar_block(&self, x: &Q8Rows, wr: usize, xr: usize, b: usize) -> f32 {
        let nb = self.nblocks();
        let xq = &x.quants[xr * self.cols + b * BLOCK..xr * self.cols + (b + 1) * BLOCK];
        let dot: i32 = (0..BLOCK).map(|i| self.value(wr, b, i) as i32 * xq[i] as i32).sum();
        self.d[wr * nb + b] * x.scales[xr * nb + b] * dot as f32 + self.m[wr * nb + b] * x.scaled_sums[xr * nb + b]
    }

    fn scalar_tile(&self, x: &Q8Rows, n: usize, m: usize, mr: usize, nr: usize, acc: &mut [[f32; NR]; MR]) {
        for i in 0..mr {
            for j in 0..nr {
                acc[i][j] = (0..self.nblocks()).map(|b| self.scalar_block(x, n + j, m + i, b)).sum();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::super::x86::pair;
    use super::{Q4Matrix, Q8Rows, BLOCK, MR, NR};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma")]
    pub unsafe fn tile_avx512(
        w: &Q4Matrix,
        x: &Q8Rows,
        n: usize,
        m: usize,
        mr: usize,
        nr: usize,
        acc: &mut [[f32; NR]; MR],
    ) {
        dispatch_tile!(fixed_avx512, (mr, nr), w, x, n, m, acc)
    }

    /// Sum over blocks of `m * dx * sum(xq)` for one (weight row, x row).
    #[inline]
    unsafe fn offsets(w: &Q4Matrix, x: &Q8Rows, wr: usize, xr: usize) -> f32 {
        let nb = w.nblocks();
        let wm = &w.m[wr * nb..(wr + 1) * nb];
        let xs = &x.scaled_sums[xr * nb..(xr + 1) * nb];
        wm.iter().zip(xs).map(|(a, b)| a * b).sum()
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma")]
    unsafe fn fixed_avx512<const M: usize, const N: usize>(
        w: &Q4Matrix,
        x: &Q8Rows,
        n: usize,
        m: usize,
        out: &mut [[f32; NR]; MR],
    ) {
        let k = w.cols;
        let nb = w.nblocks();
        let row_bytes = w.row_bytes();
        let ones = _mm512_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0F);
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        let (wp, xq, wd, xs) = (w.packed.as_ptr(), x.quants.as_ptr(), w.d.as_ptr(), x.scales.as_ptr());
        for p in 0..nb / 2 {
            let b = 2 * p;
            let mut q = [_mm512_setzero_si512(); N];
            let mut wsc = [_mm512_setzero_ps(); N];
            for j in 0..N {
                // SAFETY: p < nb / 2 keeps the 32 bytes inside row n + j.
                let v = _mm256_loadu_si256(wp.add((n + j) * row_bytes + p * BLOCK) as *const __m256i);
                let lo = _mm256_and_si256(v, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                q[j] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                wsc[j] = pair(*wd.add((n + j) * nb + b), *wd.add((n + j) * nb + b + 1));
            }
            for i in 0..M {
                let xv = _mm512_loadu_si512(xq.add((m + i) * k + b * BLOCK) as *const _);
                let xsc = pair(*xs.add((m + i) * nb + b), *xs.add((m + i) * nb + b + 1));
                for j in 0..N {
                    let p32 = _mm512_madd_epi16(_mm512_maddubs_epi16(q[j], xv), ones);
                    acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p32), _mm512_mul_ps(wsc[j], xsc), acc[i][j]);
                }
            }
        }
        for i in 0..M {
            for j in 0..N {
                let mut sum = _mm512_reduce_add_ps(acc[i][j]) + offsets(w, x, n + j, m + i);
                if nb % 2 == 1 {
                    let b = nb - 1;
                    let wr = n + j;
                    let xr = m + i;
                    let dot: i32 = (0..BLOCK)
                        .map(|e| w.value(wr, b, e) as i32 * *xq.add(xr * k + b * BLOCK + e) as i32)
                        .sum();
                    sum += *wd.add(wr * nb + b) * *xs.add(xr * nb + b) * dot as f32;
                }
                out[i][j] = sum;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::available_kernels;
    use super::*;
    use crate::testing::Lcg;

    fn random(rows: usize, cols: usize, rng: &mut Lcg) -> Q4Matrix {
        let nb = rows * cols / BLOCK;
        let d = (0..nb).map(|_| rng.f().abs() * 0.1 + 0.01).collect();
        let m = (0..nb).map(|_| rng.f() * 0.5).collect();
        let q: Vec<u8> = (0..rows * cols).map(|_| (rng.next_u32() % 16) as u8).collect();
        Q4Matrix::from_parts(rows, cols, d, m, &q)
    }

    /// Every kernel equals the f64 product of the dequantized operands.
    #[test]
    fn kernels_equal_dequantized_reference_on_odd_shapes() {
        let mut rng = Lcg(3);
        for &(m, n, k) in &[
            (1, 1, 32),
            (1, 70, 64),
            (3, 5, 96),
            (4, 2, 32),
            (5, 33, 576),
            (16, 67, 160),
            (70, 9, 64),
            (17, 31, 1536),
        ] {
            let w = random(n, k, &mut rng);
            let x: Vec<f32> = (0..m * k).map(|_| rng.f() * 3.0).collect();
            let xq = Q8Rows::quantize(&x, m);
            let wf = w.dequantize();
            let xf = xq.dequantize();
            for kind in available_kernels() {
                let mut out = vec![0.0; m * n];
                w.matmul_q8(&xq, &mut out, kind);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|p| xf[i * k + p] as f64 * wf[j * k + p] as f64).sum();
                        let got = out[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()) * (k as f64).sqrt(),
                            "{kind:?} m{m} n{n} k{k} ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// GGUF Q4_0 / Q4_1 blocks decode to the values candle decodes.
    #[test]
    fn ggml_blocks_decode_like_candle() {
        use candle_core::quantized::QTensor;
        use candle_core::{Device, Tensor};
        let mut rng = Lcg(9);
        let (rows, cols) = (3, 96);
        let src: Vec<f32> = (0..rows * cols).map(|_| rng.f()).collect();
        let t = Tensor::from_vec(src, (rows, cols), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1] {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let want = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let ours = Q4Matrix::from_ggml(dtype, &q.data().unwrap(), rows, cols).expect("4-bit type");
            for (a, b) in ours.dequantize().iter().zip(&want) {
                assert!((a - b).abs() < 1e-6, "{dtype:?}: {a} vs {b}");
            }
        }
        assert!(Q4Matrix::from_ggml(GgmlDType::Q8_0, &[0; 34], 1, 32).is_none());
    }
}
