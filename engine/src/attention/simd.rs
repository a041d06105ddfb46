//! AVX2 kernels of the attention, for head dimensions that are multiples
//! of 8: dot products of queries with a chunk of keys, and the weighted
//! value sums. Per row, the same operations in the same order whatever
//! the number of rows in a pass, so a row's result never depends on its
//! neighbours.

use std::arch::x86_64::*;

/// `out[j] = q · keys[j]`, four keys at a time (one horizontal sum per
/// four dot products).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dots(q: *const f32, keys: &[*const f32], hd: usize, out: &mut [f32]) {
    let mut j = 0;
    while j + 4 <= keys.len() {
        let mut s = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < hd {
            let qv = _mm256_loadu_ps(q.add(i));
            for (acc, k) in s.iter_mut().zip(&keys[j..j + 4]) {
                *acc = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k.add(i)), *acc);
            }
            i += 8;
        }
        // Pairwise adds leave lane l of each half holding key l's partial sums.
        let h01 = _mm256_hadd_ps(s[0], s[1]);
        let h23 = _mm256_hadd_ps(s[2], s[3]);
        let h = _mm256_hadd_ps(h01, h23);
        let four = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(out.as_mut_ptr().add(j), four);
        j += 4;
    }
    for (o, k) in out[j..].iter_mut().zip(&keys[j..]) {
        let mut s = _mm256_setzero_ps();
        let mut i = 0;
        while i < hd {
            s = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i)), _mm256_loadu_ps(k.add(i)), s);
            i += 8;
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        *o = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
}

/// Query rows per pass of [`grouped_dots`]: 4 keys x 2 rows of sums,
/// the 4 keys and a query in registers.
pub const DOT_ROWS: usize = 2;

/// For each query row `r`: `out[r][j] = qs[r] · keys[j]` over a whole
/// chunk, each key loaded once for all rows; per row, the same
/// operations in the same order as [`dots`] (same bits).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn grouped_dots(
    qs: &[*const f32],
    keys: &[*const f32; super::CHUNK],
    hd: usize,
    out: &mut [[f32; super::CHUNK]],
) {
    match qs.len() {
        1 => dots(qs[0], keys, hd, &mut out[0]),
        2 => grouped_dots_fixed::<2>(qs, keys, hd, out),
        _ => unreachable!("at most {DOT_ROWS} rows per pass"),
    }
}

#[inline(always)]
unsafe fn grouped_dots_fixed<const R: usize>(
    qs: &[*const f32],
    keys: &[*const f32; super::CHUNK],
    hd: usize,
    out: &mut [[f32; super::CHUNK]],
) {
    let qs: [*const f32; R] = std::array::from_fn(|r| qs[r]);
    for j in (0..super::CHUNK).step_by(4) {
        let mut s = [[_mm256_setzero_ps(); 4]; R];
        let mut i = 0;
        while i < hd {
            let k: [__m256; 4] = std::array::from_fn(|l| _mm256_loadu_ps(keys[j + l].add(i)));
            for r in 0..R {
                let qv = _mm256_loadu_ps(qs[r].add(i));
                for l in 0..4 {
                    s[r][l] = _mm256_fmadd_ps(qv, k[l], s[r][l]);
                }
            }
            i += 8;
        }
        for (s, out) in s.iter().zip(out.iter_mut()) {
            let h01 = _mm256_hadd_ps(s[0], s[1]);
            let h23 = _mm256_hadd_ps(s[2], s[3]);
            let h = _mm256_hadd_ps(h01, h23);
            let four = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            _mm_storeu_ps(out.as_mut_ptr().add(j), four);
        }
    }
}

/// Rows per pass of [`grouped_sum`] (their sums stay in registers).
pub const GROUP_ROWS: usize = 12;

/// For each row `r`: `accs[r] += sum_j w[r][j] values[j]`, 8 columns at
/// a time for all rows, each value loaded once; per row and column the
/// fused multiply-adds run in key order whatever the number of rows.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn grouped_sum(accs: &[*mut f32], w: &[[f32; super::CHUNK]], values: &[*const f32], hd: usize) {
    macro_rules! rows {
        ($($r:literal)*) => {
            match accs.len() {
                $($r => grouped_sum_fixed::<$r>(accs, w, values, hd),)*
                _ => unreachable!("at most {GROUP_ROWS} rows per pass"),
            }
        };
    }
    rows!(1 2 3 4 5 6 7 8 9 10 11 12)
}

#[inline(always)]
unsafe fn grouped_sum_fixed<const R: usize>(
    accs: &[*mut f32],
    w: &[[f32; super::CHUNK]],
    values: &[*const f32],
    hd: usize,
) {
    // Fixed-length views, so that the row loops unroll and the sums
    // stay in registers.
    let accs: [*mut f32; R] = std::array::from_fn(|r| accs[r]);
    let w: [&[f32; super::CHUNK]; R] = std::array::from_fn(|r| &w[r]);
    let mut c = 0;
    while c < hd {
        let mut regs: [__m256; R] = std::array::from_fn(|r| _mm256_loadu_ps(accs[r].add(c)));
        for (j, v) in values.iter().enumerate() {
            let v = _mm256_loadu_ps(v.add(c));
            for r in 0..R {
                regs[r] = _mm256_fmadd_ps(_mm256_set1_ps(w[r][j]), v, regs[r]);
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(accs[r].add(c), regs[r]);
        }
        c += 8;
    }
}
