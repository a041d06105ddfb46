use super::*;
use crate::testing::Lcg;

/// Plain f32 matmul of the dequantized operands: the reference.
fn reference(w: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum::<f64>() as f32;
        }
    }
    out
}

/// Every kernel equals the f32 product of the same quantized operands
/// (only float summation order differs: relative 1e-5), for odd shapes.
#[test]
fn kernels_equal_dequantized_reference_on_odd_shapes() {
    let mut rng = Lcg(11);
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
        let w: Vec<f32> = (0..n * k).map(|_| rng.f()).collect();
        let x: Vec<f32> = (0..m * k).map(|_| rng.f() * 3.0).collect();
        let wq = Q8Matrix::from_f32(&w, n, k);
        let xq = Q8Rows::quantize(&x, m);
        let want = reference(&wq.dequantize(), &xq.dequantize(), m, n, k);
        for kind in available_kernels() {
            let mut out = vec![0.0; m * n];
            wq.matmul_q8(&xq, &mut out, kind);
            for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()) * (k as f32).sqrt(),
                    "{kind:?} m{m} n{n} k{k} at {i}: {a} vs {b}"
                );
            }
        }
    }
}

/// Against the exact f32 product, the error is the 8-bit rounding of
/// both operands: bounded relative to the magnitude of the terms.
#[test]
fn quantized_product_is_close_to_exact_f32() {
    let mut rng = Lcg(5);
    let (m, n, k) = (7, 13, 576);
    let w: Vec<f32> = (0..n * k).map(|_| rng.f()).collect();
    let x: Vec<f32> = (0..m * k).map(|_| rng.f()).collect();
    let exact = reference(&w, &x, m, n, k);
    let got = Q8Matrix::from_f32(&w, n, k).matmul(&x, m);
    // sum |x||w| ~ k/4; each term errs by ~1/127 relative on each side.
    let bound = (k as f32 / 4.0) * 2.0 / 127.0;
    for (a, b) in got.iter().zip(&exact) {
        assert!((a - b).abs() < bound, "{a} vs {b} (bound {bound})");
    }
}

/// The strip kernels: AMX runs 8 or more token rows on tiles and fewer on
/// AVX-512 VNNI, the VNNI kernel runs rows in groups of 8, 4, 3, 2 or 1
/// (whichever fits what is left), the AVX2 one in groups of 4 to 1: a row's
/// result must be the same bits alone and in any batch, or a token's logits
/// would depend on its batch; and both kernels give the same bits.
#[test]
fn strip_kernel_results_do_not_depend_on_the_batch() {
    let kinds: Vec<KernelKind> = available_kernels().into_iter().filter(|k| k.uses_strips()).collect();
    if kinds.is_empty() {
        println!("no strip kernel on this CPU: nothing to check");
        return;
    }
    for kind in kinds {
        strip_kernel_is_batch_invariant(kind);
    }
    if available_kernels().contains(&KernelKind::Amx) {
        let mut rng = Lcg(22);
        let (m, n, k) = (19, 37, 576);
        let w: Vec<f32> = (0..n * k).map(|_| rng.f()).collect();
        let x = Q8Rows::quantize(&(0..m * k).map(|_| rng.f() * 3.0).collect::<Vec<_>>(), m);
        let q8 = Q8Matrix::from_f32(&w, n, k);
        let (mut amx, mut vnni) = (vec![0.0; m * n], vec![0.0; m * n]);
        q8.matmul_q8(&x, &mut amx, KernelKind::Amx);
        q8.matmul_q8(&x, &mut vnni, KernelKind::Vnni);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&amx), bits(&vnni), "AMX and VNNI strip kernels differ");
    }
}

fn strip_kernel_is_batch_invariant(kind: KernelKind) {
    let mut rng = Lcg(21);
    for &(m, n, k) in &[
        (8, 16, 32),
        (9, 33, 576),
        (17, 70, 96),
        (40, 19, 1536),
        (3, 31, 64),
        (6, 20, 64),
        (15, 18, 96),
    ] {
        let w: Vec<f32> = (0..n * k).map(|_| rng.f()).collect();
        let x: Vec<f32> = (0..m * k).map(|_| rng.f() * 3.0).collect();
        let q8 = Q8Matrix::from_f32(&w, n, k);
        let nb = n * k / BLOCK;
        let q4 = Q4Matrix::from_parts(
            n,
            k,
            (0..nb).map(|_| rng.f().abs() * 0.1 + 0.01).collect(),
            (0..nb).map(|_| rng.f() * 0.5).collect(),
            &(0..n * k).map(|_| (rng.next_u32() % 16) as u8).collect::<Vec<_>>(),
        );
        type Product<'a> = &'a dyn Fn(&Q8Rows, &mut [f32]);
        let products: [Product<'_>; 2] = [&|xq, out| q8.matmul_q8(xq, out, kind), &|xq, out| {
            q4.matmul_q8(xq, out, kind)
        }];
        for (which, product) in products.iter().enumerate() {
            let mut together = vec![0.0; m * n];
            product(&Q8Rows::quantize(&x, m), &mut together);
            for row in 0..m {
                let mut alone = vec![0.0; n];
                product(&Q8Rows::quantize(&x[row * k..(row + 1) * k], 1), &mut alone);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&alone),
                    bits(&together[row * n..(row + 1) * n]),
                    "{kind:?}, {} weights, m{m} n{n} k{k}, row {row}",
                    ["8-bit", "4-bit"][which]
                );
            }
        }
    }
}

/// 8-bit strips stored as `q + 128` (CPUs without AMX) give the same bits
/// as signed ones, on every strip kernel without tiles: VNNI takes
/// `128 * sum(x)` off each block's sum, AVX2 flips the bytes back.
#[cfg(target_arch = "x86_64")]
#[test]
fn offset_and_signed_8bit_strips_give_the_same_bits() {
    let kinds: Vec<KernelKind> = [KernelKind::Avx2, KernelKind::Vnni]
        .into_iter()
        .filter(|k| available_kernels().contains(k))
        .collect();
    let mut rng = Lcg(23);
    for (kind, &(m, n, k)) in kinds
        .iter()
        .flat_map(|k| [(1, 16, 32), (5, 33, 576), (17, 70, 96)].iter().map(move |s| (*k, s)))
    {
        let w: Vec<f32> = (0..n * k).map(|_| rng.f()).collect();
        let x = Q8Rows::quantize(&(0..m * k).map(|_| rng.f() * 3.0).collect::<Vec<_>>(), m);
        let q8 = Q8Matrix::from_f32(&w, n, k);
        let bits = |offset: bool| {
            let strips = super::strips::Strips::from_q8(n, k, &q8.quants, &q8.scales, offset);
            let mut out = vec![0.0; m * n];
            super::strips_matmul(&[&strips], &x, &mut [&mut out], kind);
            out.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(bits(true), bits(false), "{kind:?} m{m} n{n} k{k}");
    }
}

/// The SIMD paths this CPU has are the ones tested above; say which.
#[test]
fn reports_available_kernels() {
    let kernels = available_kernels();
    assert_eq!(kernels[0], KernelKind::Scalar);
    assert!(kernels.contains(&kernel_kind()));
    println!("kernels on this CPU: {kernels:?}");
}

/// Activation rows quantize to `round(v / d)`, `d = max|v| / 127`, with
/// `scaled_sums = d * sum(q)`, whichever path this CPU takes (random
/// values: no exact ties, where the AVX2 path rounds to even).
#[test]
fn activations_quantize_to_the_nearest_step() {
    let mut rng = Lcg(4);
    let x: Vec<f32> = (0..7 * 96).map(|_| rng.f() * 5.0).collect();
    let q = Q8Rows::quantize(&x, 7);
    for (b, block) in x.chunks_exact(BLOCK).enumerate() {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        assert_eq!(q.scales[b].to_bits(), d.to_bits());
        let want: Vec<i8> = block.iter().map(|v| (v * (1.0 / d)).round() as i8).collect();
        assert_eq!(&q.quants[b * BLOCK..(b + 1) * BLOCK], &want[..], "block {b}");
        let sum: i32 = want.iter().map(|&v| v as i32).sum();
        assert_eq!(q.scaled_sums[b], d * sum as f32);
    }
    let big = Q8Rows::quantize(&[1e30, -1e30, 3.0, 0.0].repeat(8), 1);
    assert_eq!((big.quants[0], big.quants[1], big.quants[2]), (127, -127, 0));
}

#[test]
fn zero_blocks_quantize_to_zero_without_nan() {
    let w = vec![0.0f32; 64];
    let q = Q8Matrix::from_f32(&w, 1, 64);
    assert_eq!(q.matmul(&[1.0; 64], 1), vec![0.0]);
}

/// The extremes the strip kernels' integer sums must hold exactly: 4-bit
/// weights all 15 against activations all ±127 (the AVX2 kernel's 16-bit
/// pair sums at their bound), 8-bit weights of -128 (`|w|` = 128), signed
/// and offset, and 24 weight rows (one and a half strips).
#[cfg(target_arch = "x86_64")]
#[test]
fn strip_kernels_hold_the_extreme_values() {
    let kinds: Vec<KernelKind> = available_kernels().into_iter().filter(|k| k.uses_strips()).collect();
    let (m, n, k) = (17, 24, 96);
    let nb = k / BLOCK;
    // Every activation is its block's largest magnitude: quantized to ±127,
    // all +127 in even rows (the largest sums), mixed signs in odd ones.
    let x: Vec<f32> = (0..m * k)
        .map(|i| {
            if (i / k) % 2 == 1 && (i / 5) % 3 == 0 {
                -2.0
            } else {
                2.0
            }
        })
        .collect();
    let xq = Q8Rows::quantize(&x, m);
    assert!(xq.quants.iter().all(|q| q.abs() == 127));
    let xsum = |r: usize, b: usize| -> i64 { (0..BLOCK).map(|e| xq.quants[r * k + b * BLOCK + e] as i64).sum() };
    let close = |got: &[f32], want: &[f64], what: &str| {
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()) * (k as f64).sqrt(),
                "{what} at {i}: {a} vs {b}"
            );
        }
    };
    let d: Vec<f32> = (0..n * nb).map(|i| 0.01 + (i % 3) as f32 * 0.001).collect();
    let offsets: Vec<f32> = (0..n * nb).map(|i| -0.05 * (i % 2) as f32).collect();
    let q4 = Q4Matrix::from_parts(n, k, d.clone(), offsets.clone(), &vec![15u8; n * k]);
    let want4: Vec<f64> = (0..m * n)
        .map(|i| {
            let (r, w) = (i / n, i % n);
            (0..nb)
                .map(|b| {
                    let at = w * nb + b;
                    d[at] as f64 * xq.scales[r * nb + b] as f64 * (15 * xsum(r, b)) as f64
                        + offsets[at] as f64 * xq.scaled_sums[r * nb + b] as f64
                })
                .sum()
        })
        .collect();
    let q8: Vec<i8> = (0..n * k)
        .map(|i| if i % 3 == 0 { -128 } else { 127 - (i % 7) as i8 })
        .collect();
    let want8: Vec<f64> = (0..m * n)
        .map(|i| {
            let (r, w) = (i / n, i % n);
            (0..nb)
                .map(|b| {
                    let dot: i64 = (0..BLOCK)
                        .map(|e| q8[w * k + b * BLOCK + e] as i64 * xq.quants[r * k + b * BLOCK + e] as i64)
                        .sum();
                    d[w * nb + b] as f64 * xq.scales[r * nb + b] as f64 * dot as f64
                })
                .sum()
        })
        .collect();
    for &kind in &kinds {
        let mut out = vec![0.0; m * n];
        q4.matmul_q8(&xq, &mut out, kind);
        close(&out, &want4, &format!("{kind:?} 4-bit"));
        // Offset strips are for kernels without tiles.
        for offset in [false, true].into_iter().filter(|&o| !o || kind != KernelKind::Amx) {
            let strips = super::strips::Strips::from_q8(n, k, &q8, &d, offset);
            let mut out = vec![0.0; m * n];
            super::strips_matmul(&[&strips], &xq, &mut [&mut out], kind);
            close(&out, &want8, &format!("{kind:?} 8-bit, offset {offset}"));
        }
    }
}
