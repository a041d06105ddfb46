//! What this machine allows, measured: the int8 multiply-add rate of a
//! tight dot-product loop on every thread (AVX-512 VNNI `vpdpbusd`, else
//! AVX2 `vpmaddubsw`), and the rate at which every thread together streams
//! a buffer much larger than the caches. `bench forward` prints each
//! forward's achieved rates as a share of these (its roofline).
//!
//! Cost: about a quarter of a second each; allocates 256 MiB for the stream.

use std::time::Instant;

use rayon::prelude::*;

/// Seconds each thread spends in the dot-product loop.
const DOT_SECONDS: f64 = 0.1;
/// Bytes streamed: far beyond any L3 of the machines this runs on.
const STREAM_BYTES: usize = 256 << 20;

/// Int8 multiply-adds per second over all rayon threads, with the widest
/// int8 dot product this CPU has; `None` without AVX2.
pub fn int8_macs_per_second() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let vnni = super::vnni::vnni_available();
        let avx2 = has!("avx2") && has!("fma");
        if !(vnni || avx2) {
            return None;
        }
        let threads = rayon::current_num_threads();
        let start = Instant::now();
        let macs: f64 = (0..threads)
            .into_par_iter()
            .map(|t| {
                // SAFETY: the CPU features were checked above.
                unsafe {
                    if vnni {
                        x86::vnni_loop(DOT_SECONDS, t as i32)
                    } else {
                        x86::avx2_loop(DOT_SECONDS, t as i32)
                    }
                }
            })
            .sum();
        Some(macs / start.elapsed().as_secs_f64())
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Bytes per second read by all rayon threads together from a buffer of
/// [`STREAM_BYTES`] (best of three passes).
pub fn stream_bytes_per_second() -> f64 {
    let words = vec![1u64; STREAM_BYTES / 8];
    let threads = rayon::current_num_threads().max(1);
    let chunk = words.len().div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        let total: u64 = words
            .par_chunks(chunk)
            .map(|c| c.iter().fold(0u64, |a, &w| a.wrapping_add(w)))
            .sum();
        best = best.min(start.elapsed().as_secs_f64());
        std::hint::black_box(total);
    }
    STREAM_BYTES as f64 / best
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::time::Instant;

    /// Independent accumulators: enough to hide the instruction's latency.
    const CHAINS: usize = 12;
    /// Instructions between clock reads.
    const ROUNDS: usize = 4096;

    /// Runs `vpdpbusd` chains for about `seconds`; returns the
    /// multiply-adds done (64 per instruction).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn vnni_loop(seconds: f64, seed: i32) -> f64 {
        let a = _mm512_set1_epi32(0x0102_0304 ^ seed);
        let b = _mm512_set1_epi32(0x0101_0101);
        let mut acc = [_mm512_setzero_si512(); CHAINS];
        let start = Instant::now();
        let mut n = 0usize;
        while start.elapsed().as_secs_f64() < seconds {
            for _ in 0..ROUNDS {
                for a_i in acc.iter_mut() {
                    *a_i = _mm512_dpbusd_epi32(*a_i, a, b);
                }
            }
            n += ROUNDS * CHAINS;
        }
        std::hint::black_box(acc);
        (n * 64) as f64
    }

    /// The same with AVX2 `vpmaddubsw` + `vpmaddwd` (32 multiply-adds per
    /// pair, the AVX2 kernel's inner step).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2_loop(seconds: f64, seed: i32) -> f64 {
        let a = _mm256_set1_epi32(0x0102_0304 ^ seed);
        let b = _mm256_set1_epi32(0x0101_0101);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); CHAINS];
        let start = Instant::now();
        let mut n = 0usize;
        while start.elapsed().as_secs_f64() < seconds {
            for _ in 0..ROUNDS {
                for a_i in acc.iter_mut() {
                    // The accumulator feeds the product, so nothing hoists.
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(a, *a_i), ones);
                    *a_i = _mm256_add_epi32(p, b);
                }
            }
            n += ROUNDS * CHAINS;
        }
        std::hint::black_box(acc);
        (n * 32) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_peaks_are_positive_and_finite() {
        if let Some(rate) = int8_macs_per_second() {
            assert!(rate.is_finite() && rate > 0.0, "{rate}");
        }
        let bw = stream_bytes_per_second();
        assert!(bw.is_finite() && bw > 0.0, "{bw}");
    }
}
