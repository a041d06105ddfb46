//! Every architecture the engine loads, against llama.cpp: tiny random
//! GGUFs of each (`scripts/arch_goldens.py write`, the same bytes on every
//! machine: their SHA-256 is checked) give llama.cpp's logits
//! (`tests/golden/archs_llamacpp.json`, from `scripts/arch_goldens.py
//! record`) at every position (Gemma 3's across its sliding window), and
//! their pre-tokenizers (the default model's, Llama 3's, Qwen2's) split
//! text as llama.cpp does; speculation
//! on them gives plain greedy output; the GPU path refuses the blocks it
//! does not run, by name.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use heterospec_engine::{KvLayout, KvStorage, Model, RaggedBatch, SeqRun, WeightFormat};
use heterospec_kv::{BlockPool, BlockPoolConfig, BlockTable};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The tiny models, written once per test process into the build's own
/// scratch folder (the same bytes every time, so one folder serves every
/// run and nothing is left in the system's temporary folder).
fn tiny_models() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("archs-tiny-models");
        let pydeps = python_packages(&[("gguf", "0.17.1"), ("numpy", "2.4.6")]);
        let out = Command::new("python3")
            .arg(root.join("scripts/arch_goldens.py"))
            .arg("write")
            .arg(model())
            .arg(&dir)
            .env("PYTHONPATH", pydeps)
            .output()
            .expect("python3 runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        dir
    })
    .clone()
}

fn golden() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/archs_llamacpp.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Logits of every position of `tokens` (one sequence), `(tokens, vocab)`:
/// in one forward, or (`decode`) one token per forward over the cached ones.
fn logits_of(model: &Model, tokens: &[u32], decode: bool) -> Vec<f32> {
    let block_size = 16;
    let layout = KvLayout::for_budget(model.config(), block_size, 16 << 20).unwrap();
    let mut kv = KvStorage::new(layout);
    let mut pool = BlockPool::new(BlockPoolConfig {
        num_blocks: layout.num_blocks,
        block_size,
    });
    let mut table = BlockTable::new();
    pool.allocate_slots(&mut table, tokens.len()).unwrap();
    let mut forward = |ids: &[u32], cached: usize| {
        let mut run = SeqRun::causal_from_table(ids.to_vec(), cached, &table, block_size).unwrap();
        run.logits_rows = (0..ids.len()).collect();
        model.forward(&RaggedBatch { seqs: vec![run] }, &mut kv).unwrap()
    };
    match decode {
        false => forward(tokens, 0),
        true => (0..tokens.len()).flat_map(|t| forward(&tokens[t..t + 1], t)).collect(),
    }
}

fn logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    logits_of(model, tokens, false)
}

fn decoded_logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    logits_of(model, tokens, true)
}

#[test]
fn every_architecture_gives_llama_cpps_logits() {
    let dir = tiny_models();
    let golden = golden();
    let tokens: Vec<u32> = golden["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let archs = golden["architectures"].as_object().unwrap();
    assert_eq!(
        archs.keys().collect::<Vec<_>>(),
        ["gemma3", "llama", "llama3", "llama_f16", "qwen2", "qwen3"],
        "every architecture has golden logits"
    );
    for (name, g) in archs {
        let path = dir.join(format!("{name}.gguf"));
        let digest: String = Sha256::digest(std::fs::read(&path).unwrap())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            digest,
            g["sha256"].as_str().unwrap(),
            "{name}: not the file llama.cpp ran"
        );
        // Float weights: `native` keeps them exact, as `f32` does; `q8_0`
        // (8-bit weights and activations) is measured for comparison.
        for format in [WeightFormat::F32, WeightFormat::Native, WeightFormat::Q8_0] {
            let model = Model::load(&path, format).unwrap();
            let (worst, clear) = compare(&logits(&model, &tokens), model.config().vocab_size, g, name);
            eprintln!(
                "{name} as {format:?}: top-8 logits within {worst:.1e} of llama.cpp, argmax equal at {clear} clear positions"
            );
            // Exact weights on both sides; llama.cpp keeps K/V in f16 (about
            // 1e-3 relative), we keep them in f32. 8 bits: a few tenths.
            let bound = if format == WeightFormat::Q8_0 { 0.5 } else { 0.02 };
            assert!(
                worst < bound,
                "{name} as {format:?}: top-8 logits differ by up to {worst}"
            );
            if format != WeightFormat::Q8_0 {
                assert!(clear >= tokens.len() / 2, "{name}: only {clear} clear positions");
            }
        }
        // Decoding one token at a time over the cache (Gemma 3's window
        // then cuts cached keys) gives the same logits.
        let model = Model::load(&path, WeightFormat::Native).unwrap();
        let (worst, _) = compare(&decoded_logits(&model, &tokens), model.config().vocab_size, g, name);
        assert!(worst < 0.02, "{name} decoded: top-8 logits differ by up to {worst}");
    }
}

/// The worst top-8 logit difference from llama.cpp's at every position, and
/// how many positions with a clear argmax agree (a clear one that differs
/// fails, except for 8-bit weights, where near-ties within their error may
/// flip: those are not counted).
fn compare(ours: &[f32], vocab: usize, g: &Value, name: &str) -> (f32, usize) {
    let (mut worst, mut clear) = (0f32, 0);
    for (t, top) in g["top"].as_array().unwrap().iter().enumerate() {
        let row = &ours[t * vocab..(t + 1) * vocab];
        let top: Vec<(usize, f32)> = top
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_f64().unwrap() as f32))
            .collect();
        for &(id, reference) in &top {
            worst = worst.max((row[id] - reference).abs());
        }
        // The argmax, where llama.cpp's leads clearly.
        if top[0].1 - top[1].1 > 0.01 {
            let ours_top = (0..vocab).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            if ours_top == top[0].0 {
                clear += 1;
            } else {
                assert!(
                    top[0].1 - top[1].1 < worst.max(0.02),
                    "{name}, position {t}: argmax differs"
                );
            }
        }
    }
    (worst, clear)
}

#[test]
fn every_architectures_pre_tokenizer_splits_text_as_llama_cpp_does() {
    let dir = tiny_models();
    for (name, g) in golden()["architectures"].as_object().unwrap() {
        let tok = heterospec_router::TextTokenizer::from_gguf_file(&dir.join(format!("{name}.gguf"))).unwrap();
        for (text, want) in g["tokenized"].as_object().unwrap() {
            let want: Vec<u32> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(tok.encode(text).unwrap(), want, "{name}: {text:?}");
        }
    }
}

#[test]
fn a_chat_template_may_call_pythons_string_methods() {
    // The qwen3 file carries a template in Qwen3's manner (`startswith`,
    // `split`, `lstrip`, `rstrip`).
    let tok = heterospec_router::TextTokenizer::from_gguf_file(&tiny_models().join("qwen3.gguf")).unwrap();
    let messages = [
        heterospec_router::ChatMessage::new("user", "<tool_response>42"),
        heterospec_router::ChatMessage::new("assistant", "<think>hmm</think>\nIt is 42.  "),
    ];
    assert_eq!(
        tok.apply_chat_template(&messages).unwrap(),
        "<|im_start|>tool\n<tool_response>42<|im_end|>\n<|im_start|>assistant\nIt is 42.<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// `heterospec generate` on a tiny model: its JSON, or its error.
fn generate(model: &Path, extra: &[&str]) -> Result<Value, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_heterospec"))
        .args(["generate", "--json", "--model"])
        .arg(model)
        .args([
            "--prompt",
            "The tiny model says",
            "--max-new-tokens",
            "24",
            "--ignore-eos",
        ])
        .args(extra)
        .env("HETEROSPEC_THREADS", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.success() {
        // A drafting step that fails is logged and skipped: none may.
        true if stderr.contains("WARN") => Err(stderr.into_owned()),
        true => Ok(serde_json::from_slice(&out.stdout).unwrap()),
        false => Err(stderr.into_owned()),
    }
}

#[test]
fn speculation_on_every_architecture_equals_plain_greedy_and_the_gpu_path_says_what_it_runs() {
    let dir = tiny_models();
    for name in ["gemma3", "llama", "llama3", "qwen2", "qwen3"] {
        let path = dir.join(format!("{name}.gguf"));
        let plain = generate(&path, &["--speculation", "off"]).unwrap();
        for drafter in [
            &["--drafter", "ngram"][..],
            &["--drafter", "self", "--self-draft-layers", "1"],
        ] {
            let mut args = vec!["--speculation", "fixed"];
            args.extend_from_slice(drafter);
            let spec = generate(&path, &args).unwrap();
            assert_eq!(spec["token_ids"], plain["token_ids"], "{name}, {drafter:?}");
            // The self-draft always drafts (n-grams need repeats).
            if drafter[1] == "self" {
                assert!(
                    spec["speculation"]["verified_tokens"].as_u64() > Some(0),
                    "{name}: {spec}"
                );
            }
        }
        // (Llama blocks, frequency factors included, run there.)
        if !name.starts_with("llama") {
            let err = generate(&path, &["--device", "cuda"]).unwrap_err();
            assert!(err.contains("GPU path runs llama blocks"), "{name}: {err}");
            if name == "gemma3" {
                assert!(
                    err.contains("sliding-window attention") && err.contains("GELU"),
                    "{err}"
                );
            }
        }
    }
}
