//! Milliseconds per product for each GEMM kernel this CPU has, on the
//! default model's matrix shapes (4-bit weights) and 1 to 64 activation rows:
//! `cargo run --release -p heterospec-engine --example qgemm_kernels`.

use heterospec_engine::qgemm::{available_kernels, Q4Matrix, Q8Rows};
use std::time::Instant;
fn main() {
    let shapes = [(576usize, 576usize), (1536, 576), (576, 1536), (49152, 576)];
    for &(n, k) in &shapes {
        let nb = n * k / 32;
        let d: Vec<f32> = (0..nb).map(|i| 0.01 + (i % 7) as f32 * 0.001).collect();
        let m: Vec<f32> = (0..nb).map(|i| -0.05 + (i % 5) as f32 * 0.01).collect();
        let q: Vec<u8> = (0..n * k).map(|i| (i * 7 % 16) as u8).collect();
        let w = Q4Matrix::from_parts(n, k, d, m, &q);
        for rows in [1usize, 2, 3, 4, 6, 8, 12, 16, 32, 64] {
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.1).collect();
            let xq = Q8Rows::quantize(&x, rows);
            let mut line = format!("n{n} k{k} m{rows}:");
            for kind in available_kernels().into_iter().skip(1) {
                let mut out = vec![0.0; rows * n];
                w.matmul_q8(&xq, &mut out, kind);
                let reps = 20;
                let t = Instant::now();
                for _ in 0..reps {
                    w.matmul_q8(&xq, &mut out, kind);
                }
                line += &format!(" {kind:?} {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / reps as f64);
            }
            println!("{line}");
        }
    }
}
