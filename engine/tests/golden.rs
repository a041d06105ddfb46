//! Golden test: our forward on the default GGUF, and on Gemma 3 270M,
//! against llama.cpp's.
//!
//! `tests/golden/smollm2_llamacpp.json` (and `gemma3_llamacpp.json`) holds,
//! for fixed prompts, llama.cpp's greedy continuation and its top-5 logits
//! at every generated position (made by `scripts/golden_reference.py`). We feed the same tokens (teacher
//! forcing) through our model in one ragged forward and require:
//! - the same top-1 token wherever llama.cpp's top-1 leads its top-2 by more
//!   than `margin(format)` (a near-tie may flip under different rounding);
//! - llama.cpp's top-5 logits close to ours: both quantize activations to
//!   8 bits inside the matmuls (in different block layouts and orders), so
//!   single logits differ by noise; we bound the worst difference, the 90th
//!   percentile, and the mean signed difference (a systematic error such as
//!   a wrong RoPE or norm shows up there first).
//!
//! The models must be present (`heterospec fetch-model`, `heterospec
//! fetch-model gemma3-270m`); a missing model is a failure, not a skip.

use std::path::PathBuf;

use heterospec_engine::{KvLayout, KvStorage, Model, RaggedBatch, SeqRun, WeightFormat};
use heterospec_kv::{BlockPool, BlockPoolConfig, BlockTable};
use serde_json::Value;

/// Logit gap above which both implementations must agree on the argmax
/// (a gap smaller than twice the format's typical error may flip).
fn margin(format: WeightFormat) -> f32 {
    match format {
        // Requantized to 8 bits: a second rounding, logit error up to ~1.8.
        WeightFormat::Q8_0 | WeightFormat::CandleQ8_0 => 1.0,
        _ => 0.5,
    }
}
/// Bounds on |ours - llama.cpp| over all top-5 logits (logits are ~10-25).
/// Measured with the committed golden file (printed by the test):
/// as-shipped Q4_1: p90 0.36, max 0.84, mean signed 0.000;
/// f32: p90 0.36, max 0.98, mean 0.04; Q8_0 requantized: p90 0.66,
/// max 1.82, mean 0.15 (requantizing adds a second rounding).
/// Native 4-bit per GEMM kernel: p90 0.38-0.41, max 0.89-1.41. The kernels
/// compute the same integer products and differ only in float summation
/// order, yet their logits differ by up to 0.9 from each other on this
/// model: every layer requantizes its activations to 8 bits, and a rounding
/// that flips there carries through 30 layers. Hence the wider max for
/// `native`; top-1 agreement and p90 stay as tight as for the others.
struct Tolerance {
    max: f32,
    p90: f32,
    mean_signed: f32,
}

fn tolerance(format: WeightFormat) -> Tolerance {
    match format {
        WeightFormat::Q8_0 | WeightFormat::CandleQ8_0 => Tolerance {
            max: 2.5,
            p90: 1.0,
            mean_signed: 0.3,
        },
        WeightFormat::Native => Tolerance {
            max: 1.75,
            p90: 0.5,
            mean_signed: 0.1,
        },
        WeightFormat::AsShipped | WeightFormat::F32 => Tolerance {
            max: 1.25,
            p90: 0.5,
            mean_signed: 0.1,
        },
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn model_path() -> PathBuf {
    std::env::var_os("HETEROSPEC_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

fn check_against_llama_cpp(format: WeightFormat) {
    check_model(&model_path(), "smollm2", format, &tolerance(format), 150);
}

/// Gemma 3 270M (`fetch-model gemma3-270m`): Q4_K, Q5_0, Q6_K and Q8_0
/// weights, all held at 8 bits by `native`.
fn gemma_path() -> PathBuf {
    repo_root().join("models/gemma-3-270m-q4_k_m.gguf")
}

fn check_model(path: &std::path::Path, family: &str, format: WeightFormat, tol: &Tolerance, min_clear: usize) {
    assert!(
        path.exists(),
        "{} is missing: run `heterospec fetch-model` first",
        path.display()
    );
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join(format!("tests/golden/{family}_llamacpp.json")))
            .expect("golden file"),
    )
    .expect("golden JSON");
    let model = Model::load(path, format).expect("model loads");
    let config = model.config().clone();
    let block_size = 16;
    let layout = KvLayout::for_budget(&config, block_size, 64 << 20).unwrap();
    let mut kv = KvStorage::new(layout);
    let mut pool = BlockPool::new(BlockPoolConfig {
        num_blocks: layout.num_blocks,
        block_size,
    });

    // All prompts in one ragged batch.
    let cases = golden["cases"].as_array().unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let mut batch = RaggedBatch::default();
    let mut tables = Vec::new();
    for case in cases {
        let prompt = ids(&case["prompt_token_ids"]);
        let greedy = ids(&case["greedy_token_ids"]);
        let mut tokens = prompt.clone();
        tokens.extend_from_slice(&greedy[..greedy.len() - 1]);
        let mut table = BlockTable::new();
        pool.allocate_slots(&mut table, tokens.len()).unwrap();
        let mut run = SeqRun::causal_from_table(tokens.clone(), 0, &table, block_size).unwrap();
        run.logits_rows = (prompt.len() - 1..tokens.len()).collect();
        batch.seqs.push(run);
        tables.push(table);
    }
    let logits = model.forward(&batch, &mut kv).unwrap();
    let vocab = config.vocab_size;

    let mut checked_top1 = 0;
    let mut diffs = Vec::new();
    for (c, case) in cases.iter().enumerate() {
        let offset: usize = batch.seqs[..c].iter().map(|s| s.logits_rows.len()).sum();
        for (k, top5) in case["top5"].as_array().unwrap().iter().enumerate() {
            let row = &logits[(offset + k) * vocab..(offset + k + 1) * vocab];
            let top5: Vec<(usize, f32)> = top5
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_f64().unwrap() as f32))
                .collect();
            diffs.extend(top5.iter().map(|&(id, reference)| row[id] - reference));
            if top5[0].1 - top5[1].1 > margin(format) {
                let ours = heterospec_engine::sampler::argmax(row) as usize;
                assert_eq!(
                    ours,
                    top5[0].0,
                    "{format:?} case {c} position {k}: top-1 differs (margin {})",
                    top5[0].1 - top5[1].1
                );
                checked_top1 += 1;
            }
        }
    }
    let mean_signed = diffs.iter().sum::<f32>() / diffs.len() as f32;
    let mut abs: Vec<f32> = diffs.iter().map(|d| d.abs()).collect();
    abs.sort_by(f32::total_cmp);
    let (p90, max) = (abs[abs.len() * 9 / 10], abs[abs.len() - 1]);
    println!(
        "{family} {format:?}: {checked_top1} clear top-1 positions agree; top-5 logit |diff| p90 {p90:.3} max {max:.3}, mean signed {mean_signed:.3}"
    );
    assert!(
        max < tol.max,
        "{format:?}: worst logit difference {max} exceeds {}",
        tol.max
    );
    assert!(
        p90 < tol.p90,
        "{format:?}: 90th-percentile logit difference {p90} exceeds {}",
        tol.p90
    );
    assert!(
        mean_signed.abs() < tol.mean_signed,
        "{format:?}: systematic logit offset {mean_signed}"
    );
    assert!(
        checked_top1 > min_clear,
        "too few clear positions to mean anything: {checked_top1}"
    );
}

#[test]
fn q8_0_weights_match_llama_cpp() {
    check_against_llama_cpp(WeightFormat::Q8_0);
}

/// With every SIMD GEMM kernel this CPU has (the scalar one is checked
/// against the same reference in the unit tests).
#[test]
fn native_4bit_weights_match_llama_cpp() {
    for kernel in heterospec_engine::qgemm::available_kernels() {
        if kernel == heterospec_engine::qgemm::KernelKind::Scalar {
            continue;
        }
        println!("kernel {kernel:?}");
        heterospec_engine::qgemm::set_kernel_override(Some(kernel));
        check_against_llama_cpp(WeightFormat::Native);
    }
    heterospec_engine::qgemm::set_kernel_override(None);
}

#[test]
fn candle_q8_0_weights_match_llama_cpp() {
    check_against_llama_cpp(WeightFormat::CandleQ8_0);
}

#[test]
fn shipped_q4_1_weights_match_llama_cpp() {
    check_against_llama_cpp(WeightFormat::AsShipped);
}

#[test]
fn f32_weights_match_llama_cpp() {
    check_against_llama_cpp(WeightFormat::F32);
}

/// Measured (printed by the test): native p90 0.67, max 2.62, mean signed
/// -0.14; f32 p90 0.61, max 2.56, mean -0.08. Wider than the default
/// model's: llama.cpp rounds GELU's input and output to f16 and its
/// activations to 8 bits across Gemma's larger hidden states (embeddings
/// scaled by 25); every clear top-1 agrees.
#[test]
fn gemma3_matches_llama_cpp() {
    for format in [WeightFormat::Native, WeightFormat::F32] {
        let tol = Tolerance {
            max: 3.5,
            p90: 1.0,
            mean_signed: 0.3,
        };
        check_model(&gemma_path(), "gemma3", format, &tol, 100);
    }
}

/// The default model's weights in F16 (`heterospec quantize --dtype f16`,
/// made again here: the same bytes as the file llama.cpp ran), against
/// llama.cpp at the file's own precision (F16 weights): what each weight
/// format costs on a float file.
#[test]
fn f16_file_in_every_format_against_llama_cpp() {
    let path = std::env::temp_dir().join(format!("heterospec-f16-{}.gguf", std::process::id()));
    heterospec_engine::requantize::requantize_gguf(&model_path(), &path, candle_core::quantized::GgmlDType::F16)
        .unwrap();
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/golden/smollm2_f16_llamacpp.json")).unwrap(),
    )
    .unwrap();
    let digest = sha256_hex(&std::fs::read(&path).unwrap());
    assert_eq!(
        digest,
        golden["model_sha256"].as_str().unwrap(),
        "not the file llama.cpp ran"
    );
    // Measured: f32, as-shipped and native (which keeps float weights
    // exact) p90 0.012, max 0.051, mean signed 0.001; q8_0 (8-bit weights
    // and activations) p90 0.47, max 1.06, mean signed 0.11.
    for format in [
        WeightFormat::Native,
        WeightFormat::Q8_0,
        WeightFormat::F32,
        WeightFormat::AsShipped,
    ] {
        let tol = match format {
            WeightFormat::Q8_0 => Tolerance {
                max: 1.5,
                p90: 0.7,
                mean_signed: 0.2,
            },
            _ => Tolerance {
                max: 0.1,
                p90: 0.03,
                mean_signed: 0.01,
            },
        };
        check_model(&path, "smollm2_f16", format, &tol, 150);
    }
    let _ = std::fs::remove_file(&path);
}
