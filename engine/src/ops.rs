//! Element-wise pieces of the forward pass on flat f32 rows: RMSNorm, RoPE,
//! SiLU-gating, dot products. Allocation-free; callers own the buffers.

/// `x <- x / sqrt(mean(x^2) + eps) * weight`, row by row.
pub fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    debug_assert_eq!(x.len(), out.len());
    for (row, out_row) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mean_sq = dot(row, row) / dim as f32;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        for ((o, &v), &w) in out_row.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
}

/// [`rms_norm_rows`] writing each row of width `weight.len()` over itself
/// (a row's scale is taken before it is written).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    for row in x.chunks_exact_mut(dim) {
        let scale = 1.0 / (dot(row, row) / dim as f32 + eps).sqrt();
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
    }
}

/// Per-token rotation tables: `cos[t * half + i]`, `sin[t * half + i]` with
/// `half = head_dim / 2`, frequency `theta^(-2i / head_dim)` (divided by
/// `factors[i]` where the model has RoPE frequency factors: Llama 3.1+),
/// and which elements of a head each frequency rotates.
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    half: usize,
    /// Pairs `(x[i], x[i + half])` (NeoX: Qwen's GGUFs keep Hugging Face's
    /// order) rather than `(x[2i], x[2i + 1])` (llama's GGUF order).
    neox: bool,
}

impl RopeTable {
    pub fn new(positions: impl Iterator<Item = usize>, head_dim: usize, theta: f32) -> Self {
        Self::for_model(positions, head_dim, theta, None, false)
    }

    /// [`RopeTable::new`] with frequency `i` divided by `factors[i]`, in the
    /// NeoX layout when `neox`.
    pub fn for_model(
        positions: impl Iterator<Item = usize>,
        head_dim: usize,
        theta: f32,
        factors: Option<&[f32]>,
        neox: bool,
    ) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let f = 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64);
                f / factors.map_or(1.0, |k| k[i] as f64)
            })
            .collect();
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for p in positions {
            for &f in &inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { cos, sin, half, neox }
    }

    /// Rotates every head of every token in `x`, laid out as `(tokens,
    /// heads, head_dim)`.
    pub fn apply(&self, x: &mut [f32], num_heads: usize) {
        let half = self.half;
        // Element pair `i` of a head: (i, i + half) or (2i, 2i + 1).
        let (stride, offset) = if self.neox { (1, half) } else { (2, 1) };
        for (t, token) in x.chunks_exact_mut(num_heads * 2 * half).enumerate() {
            let cos = &self.cos[t * half..(t + 1) * half];
            let sin = &self.sin[t * half..(t + 1) * half];
            for head in token.chunks_exact_mut(2 * half) {
                for i in 0..half {
                    let (j, k) = (i * stride, i * stride + offset);
                    let (a, b) = (head[j], head[k]);
                    head[j] = a * cos[i] - b * sin[i];
                    head[k] = a * sin[i] + b * cos[i];
                }
            }
        }
    }
}

/// `gate <- silu(gate) * up`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
            silu_mul_portable(gate, up)
        }
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { silu_mul_avx2(gate, up) };
    }
    silu_mul_portable(gate, up)
}

/// `x sigmoid(x) u` with `sigmoid(x) = 1 / (1 + e^-x)` written through
/// `e = e^-|x|` (no libm call, so the loop vectorizes).
#[inline(always)]
fn silu_mul_portable(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let e = exp_nonpositive(-x.abs());
        let sigmoid = if x >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
        *g = x * sigmoid * u;
    }
}

/// `gate <- gelu(gate) * up`, GELU in its tanh form (Gemma's
/// `gelu_pytorch_tanh`).
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn gelu_mul_avx2(gate: &mut [f32], up: &[f32]) {
            gelu_mul_portable(gate, up)
        }
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { gelu_mul_avx2(gate, up) };
    }
    gelu_mul_portable(gate, up)
}

/// `0.5 x (1 + tanh(z)) u` with `z = sqrt(2 / pi) (x + 0.044715 x^3)`,
/// written as `x sigmoid(2z) u` (the same identity, no libm call).
#[inline(always)]
fn gelu_mul_portable(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let z2 = 2.0 * SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x);
        let e = exp_nonpositive(-z2.abs());
        let sigmoid = if z2 >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
        *g = x * sigmoid * u;
    }
}

/// Dot product with 8 independent accumulators so it vectorises.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `e^x` for `x <= 0` (softmax weights), without a libm call so that loops
/// over it vectorize: `2^n * p(r)` with `x = n ln 2 + r`, `|r| <= ln 2 / 2`,
/// `p` the degree-6 Taylor polynomial (relative error below 5e-7, a few
/// f32 ulps); inputs
/// below -87 give `e^-87` (far below any weight that matters).
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // t = 1.5 * 2^23 + n stays in one binade: its low bits are n itself
    // (an integer subtraction, where `n as i32` would not vectorize).
    let n_int = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// Whether the CPU has AVX2 and FMA: hot loops written once as
/// `#[inline(always)]` bodies get a copy compiled for them (the crate is
/// built for baseline x86-64) and pick it at run time.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The `m` largest entries of `row`, largest first (the lower index first
/// among equals), with their log-softmax over the whole row.
pub fn top_logprobs(row: &[f32], m: usize) -> Vec<(u32, f32)> {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(m + 1);
    for (i, &l) in row.iter().enumerate() {
        if top.len() < m || top.last().is_some_and(|t| l > t.1) {
            let at = top.partition_point(|t| t.1 >= l);
            top.insert(at, (i as u32, l));
            top.truncate(m);
        }
    }
    let lse = log_sum_exp(row);
    top.into_iter().map(|(t, l)| (t, l - lse)).collect()
}

/// `ln(sum(exp(row)))`, computed stably: the log-softmax of entry `i` is
/// `row[i] - log_sum_exp(row)`.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn log_sum_exp_avx2(row: &[f32]) -> f32 {
            log_sum_exp_portable(row)
        }
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { log_sum_exp_avx2(row) };
    }
    log_sum_exp_portable(row)
}

/// Eight lanes for the maximum and the sum, so both loops vectorize.
#[inline(always)]
fn log_sum_exp_portable(row: &[f32]) -> f32 {
    let eights = row.chunks_exact(8);
    let tail = eights.remainder();
    let mut lanes = [f32::NEG_INFINITY; 8];
    for eight in eights.clone() {
        for (m, &v) in lanes.iter_mut().zip(eight) {
            *m = m.max(v);
        }
    }
    let max = lanes.iter().chain(tail).copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let mut sums = [0.0f32; 8];
    for eight in eights {
        for (a, &v) in sums.iter_mut().zip(eight) {
            *a += exp_nonpositive(v - max);
        }
    }
    let sum: f32 = sums.iter().sum::<f32>() + tail.iter().map(|&v| exp_nonpositive(v - max)).sum::<f32>();
    max + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_sum_for_odd_lengths() {
        for n in [0, 1, 7, 8, 9, 64, 67] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-4, "n={n}");
        }
    }

    #[test]
    fn silu_and_log_sum_exp_match_their_definitions() {
        let x: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.37).collect();
        let up: Vec<f32> = (0..203).map(|i| 1.0 + (i % 7) as f32 * 0.1).collect();
        let mut got = x.clone();
        silu_mul(&mut got, &up);
        for ((g, &v), &u) in got.iter().zip(&x).zip(&up) {
            let want = (v as f64 / (1.0 + (-v as f64).exp()) * u as f64) as f32;
            assert!(
                (g - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "silu({v}): {g} vs {want}"
            );
        }
        let want = x.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln() as f32;
        let got = log_sum_exp(&x);
        assert!((got - want).abs() < 1e-5 * want.abs(), "{got} vs {want}");
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
        assert!((log_sum_exp(&[0.0]) - 0.0).abs() < 1e-7);
    }

    #[test]
    fn gelu_matches_its_tanh_definition() {
        let x: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.07).collect();
        let up: Vec<f32> = (0..203).map(|i| 1.0 + (i % 5) as f32 * 0.1).collect();
        let mut got = x.clone();
        gelu_mul(&mut got, &up);
        for ((g, &v), &u) in got.iter().zip(&x).zip(&up) {
            let v = v as f64;
            let z = (2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v);
            let want = (0.5 * v * (1.0 + z.tanh()) * u as f64) as f32;
            assert!(
                (g - want).abs() <= 2e-6 * (1.0 + want.abs()),
                "gelu({v}): {g} vs {want}"
            );
        }
    }

    #[test]
    fn exp_nonpositive_matches_libm() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -(i as f32) * 87.0 / 200_000.0;
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e4) < 1e-37 && exp_nonpositive(f32::NEG_INFINITY) >= 0.0);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let mut x: Vec<f32> = (0..16).map(|i| i as f32 - 3.0).collect();
        let orig = x.clone();
        RopeTable::new([0usize].into_iter(), 8, 10_000.0).apply(&mut x, 2);
        assert_eq!(x, orig);
        RopeTable::new([17usize].into_iter(), 8, 10_000.0).apply(&mut x, 2);
        assert!((dot(&x, &x) - dot(&orig, &orig)).abs() < 1e-3);
        assert_ne!(x, orig);
    }

    #[test]
    fn rms_norm_gives_unit_rms_with_unit_weight() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let mut out = [0.0; 4];
        rms_norm_rows(&x, &[1.0; 4], 0.0, &mut out);
        let rms = (dot(&out, &out) / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }
}
