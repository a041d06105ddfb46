//! `bench forward --device cuda --synthetic NAME`: the device forward of a
//! known architecture's shapes with weights made on the GPU (no file;
//! `heterospec_engine::cuda::synthetic`), timed by
//! `heterospec_engine::cuda::bench`, next to the device's own copy
//! bandwidth (the roofline of a forward that reads its weights once);
//! each forward from CUDA graphs (the default) and queued launch by launch
//! (`--enforce-eager`), side by side.

use anyhow::{bail, Result};
use heterospec_engine::Device;

#[cfg(feature = "cuda")]
pub fn run(name: &str, device: Device, repeats: usize, json: bool) -> Result<()> {
    use heterospec_engine::cuda::{bench, synthetic, Gpu, GpuModel};

    let Device::Cuda(ordinal) = device else {
        bail!("--synthetic builds its weights on a GPU: give --device cuda (or cuda:N)");
    };
    let config = synthetic::config(name)?;
    let gpu = Gpu::open(ordinal)?;
    let copy = gpu.copy_bytes_per_second()?;
    let model = GpuModel::synthetic(gpu.clone(), config.clone(), 1)?;
    let c = &config;
    let (h, q, kv, ff) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
    // The matrices the device reads per forward: every layer's and the output layer.
    let weights = c.num_layers * (2 * h * q + 2 * h * kv + 3 * h * ff) + c.vocab_size * h;
    let weight_bytes = 2.0 * weights as f64;
    let plan = bench::Plan {
        repeats,
        ..bench::Plan::default()
    };
    let report = bench::measure(&model, &plan)?;
    model.set_graphs(false);
    let eager = bench::measure(&model, &plan)?;
    model.set_graphs(true);
    let t1 = report.forward_ms.iter().find(|&&(t, _)| t == 1).map(|&(_, ms)| ms);
    if json {
        let out = serde_json::json!({
            "shape": name,
            "device": format!("{gpu:?}"),
            "weights": weights,
            "weight_bytes": weight_bytes,
            "copy_bytes_per_second": copy,
            "context": plan.context,
            "report": report,
            "eager": eager,
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "synthetic {name} on {gpu:?}: {:.2} G weights read per forward ({:.1} GB in bf16), context {}",
        weights as f64 / 1e9,
        weight_bytes / 1e9,
        plan.context
    );
    let ts: Vec<String> = report.forward_ms.iter().map(|(t, _)| format!("T={t} ms")).collect();
    println!("| forwards | prefill tok/s | {} |", ts.join(" | "));
    println!("|---|---|{}", "---|".repeat(ts.len()));
    for (name, r) in [("graphs", &report), ("eager", &eager)] {
        let ms: Vec<String> = r.forward_ms.iter().map(|(_, ms)| format!("{ms:.2}")).collect();
        println!("| {name} | {:.0} | {} |", r.prefill_tokens_per_second, ms.join(" | "));
    }
    let saved: Vec<String> = report
        .forward_ms
        .iter()
        .zip(&eager.forward_ms)
        .map(|(&(_, g), &(_, e))| format!("{:.2}x", e / g))
        .collect();
    println!("| eager / graphs | | {} |", saved.join(" | "));
    for (name, r) in [("graphs", &report), ("eager", &eager)] {
        let bs: Vec<String> = r
            .batch_decode_tokens_per_second
            .iter()
            .map(|(b, tps)| format!("batch {b}: {tps:.0} tok/s"))
            .collect();
        println!("decode ({name}): {}", bs.join(", "));
    }
    println!("device copy bandwidth {:.2} TB/s", copy / 1e12);
    if let Some(ms) = t1 {
        let rate = weight_bytes / (ms / 1e3);
        println!(
            "T=1 reads the weights at {:.2} TB/s ({:.0}% of the copy bandwidth)",
            rate / 1e12,
            100.0 * rate / copy
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub fn run(_: &str, _: Device, _: usize, _: bool) -> Result<()> {
    bail!("--synthetic needs the GPU path: build with the `cuda` feature (on by default)")
}
