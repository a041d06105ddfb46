//! The draft head end to end on the default model: `heterospec draft-data`
//! grows a training set of the target's answers (greedy, sampled, follow-up
//! turns; a rerun adds nothing), `heterospec train-draft` trains a head on
//! it (and resumes from its checkpoint) that `generate --drafter head` loads
//! and drafts with (the output stays the plain output), alone and with
//! prompt lookup (`--drafter hybrid`); the committed head, with lookup, is
//! the default drafter and says how it was made; the committed training set
//! is varied and holds no benchmark prompt.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};

use common::model;
use serde_json::Value;

fn heterospec(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_heterospec"))
        .args(args)
        .env("HETEROSPEC_THREADS", "2")
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "heterospec {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn prompts(path: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["category"].as_str().unwrap_or("").to_string(),
                v["prompt"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn training_prompts_cover_five_categories_and_no_benchmark_prompt() {
    let train = prompts("bench/draft_train_prompts.jsonl");
    let categories: HashSet<&str> = train.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(
        categories,
        HashSet::from(["chat", "code", "math", "instructions", "summarization"])
    );
    let held_out: HashSet<String> = prompts("bench/prompts.jsonl")
        .into_iter()
        .chain(prompts("bench/calibration_prompts.jsonl"))
        .map(|p| p.1)
        .collect();
    for (_, p) in &train {
        assert!(!held_out.contains(p), "training prompt is a benchmark prompt: {p}");
    }
    assert!(train.len() > 1000, "{} training prompts", train.len());
}

/// What the committed training set holds at least (it only grows).
const MIN_PROMPTS: u64 = 10_000;
const MIN_ANSWER_TOKENS: u64 = 1_800_000;

#[test]
fn the_committed_training_set_is_varied_greedy_and_sampled_and_holds_no_benchmark_prompt() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // `--stats` fails when a record's prompt holds a benchmark prompt.
    let out = Command::new(env!("CARGO_BIN_EXE_heterospec"))
        .current_dir(root)
        .args(["draft-data", "--model", model().to_str().unwrap(), "--stats"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    for category in [
        "chat",
        "code",
        "math",
        "instructions",
        "summarization",
        "self",
        "code-source",
        "long-context",
        "chat-multiturn",
    ] {
        let c = &stats["categories"][category];
        assert!(
            c["greedy"].as_u64() > Some(0) && c["sampled"].as_u64() > Some(0),
            "{category}: {stats}"
        );
    }
    let held_out: u64 = stats["categories"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["held_out"].as_u64().unwrap())
        .sum();
    assert!(held_out > 0, "{stats}");
    assert!(stats["prompts"].as_u64() > Some(MIN_PROMPTS), "{stats}");
    assert!(stats["answer_tokens"].as_u64() > Some(MIN_ANSWER_TOKENS), "{stats}");
}

#[test]
fn draft_data_grows_a_training_set_and_train_draft_writes_a_head_that_generate_drafts_with() {
    let dir = std::env::temp_dir().join(format!("heterospec-train-draft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompts_path = dir.join("prompts.jsonl");
    std::fs::write(
        &prompts_path,
        "{\"category\": \"chat\", \"prompt\": \"Name three colors.\", \"followup\": \"Why those?\"}\n\
         {\"category\": \"math\", \"prompt\": \"What is 3 plus 4?\"}\n",
    )
    .unwrap();
    let model = model();
    let model = model.to_str().unwrap();
    let dataset = dir.join("data.hsd");
    let dataset = dataset.to_str().unwrap();
    let draft_data = |prompts: &Path| {
        Command::new(env!("CARGO_BIN_EXE_heterospec"))
            .args([
                "draft-data",
                "--model",
                model,
                "--dataset",
                dataset,
                "--max-new-tokens",
                "24",
            ])
            .args(["--prompts", prompts.to_str().unwrap(), "--temperatures", "0,0.7"])
            .env("HETEROSPEC_THREADS", "2")
            .output()
            .unwrap()
    };
    // Two prompts at two temperatures, then the follow-up on the greedy
    // answer at both; a second run has nothing to add.
    let log = String::from_utf8_lossy(&draft_data(&prompts_path).stderr).to_string();
    assert!(log.contains("6 records (6 new)"), "{log}");
    let log = String::from_utf8_lossy(&draft_data(&prompts_path).stderr).to_string();
    assert!(log.contains("6 records (0 new)"), "{log}");
    let stats: Value =
        serde_json::from_slice(&heterospec(&["draft-data", "--model", model, "--dataset", dataset, "--stats"]).stdout)
            .unwrap();
    for category in ["chat", "math", "chat-multiturn"] {
        let c = &stats["categories"][category];
        assert_eq!(
            (c["greedy"].as_u64(), c["sampled"].as_u64()),
            (Some(1), Some(1)),
            "{stats}"
        );
    }
    assert_eq!(stats["conversations"], 2, "{stats}");
    // A benchmark prompt is refused, naming it.
    let bench_prompt = &prompts("bench/prompts.jsonl")[0].1;
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        serde_json::json!({"category": "chat", "prompt": bench_prompt}).to_string(),
    )
    .unwrap();
    let out = draft_data(&bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("benchmark or calibration prompt"),
        "{err}"
    );

    let out_dir = dir.join("head");
    // `train-draft` on the training set into `out`.
    let features = dir.join("features");
    let train_epochs = |out: &Path, epochs: &str, extra: &[&str]| {
        let checkpoint = out.with_extension("checkpoint.safetensors");
        let mut args = vec![
            "train-draft",
            "--model",
            model,
            "--dataset",
            dataset,
            "--out",
            out.to_str().unwrap(),
            "--checkpoint",
            checkpoint.to_str().unwrap(),
            "--sub-vocab",
            "512",
            "--epochs",
            epochs,
            "--batch-size",
            "2",
        ];
        if !extra.contains(&"--features-cache") {
            args.extend(["--features-cache", features.to_str().unwrap()]);
        }
        args.extend_from_slice(extra);
        heterospec(&args)
    };
    let train = |out: &Path, extra: &[&str]| train_epochs(out, "2", extra);
    let log = String::from_utf8_lossy(&train(&out_dir, &[]).stderr).to_string();
    assert!(log.contains("sequences") && log.contains("epoch 2: loss"), "{log}");
    assert!(log.contains("features kept in"), "{log}");
    let first = std::fs::read(out_dir.join("model.safetensors")).unwrap();
    // Seeded: the same file again, from the kept features as from the
    // prefill.
    let log = String::from_utf8_lossy(&train(&out_dir, &[]).stderr).to_string();
    assert!(
        log.contains("features of") && !log.contains("features kept in"),
        "{log}"
    );
    assert_eq!(std::fs::read(out_dir.join("model.safetensors")).unwrap(), first);
    train(&out_dir, &["--features-cache", "none"]);
    assert_eq!(std::fs::read(out_dir.join("model.safetensors")).unwrap(), first);
    let config: Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["draft_vocab_size"], 512);
    assert!(config["provenance"].as_str().unwrap().contains("epoch 2: loss"));
    // One epoch, then a resumed run does the second from the checkpoint.
    let resumed_dir = dir.join("resumed");
    train_epochs(&resumed_dir, "1", &[]);
    let log = String::from_utf8_lossy(&train(&resumed_dir, &["--resume"]).stderr).to_string();
    assert!(
        log.contains("resuming after epoch 1") && !log.contains("epoch 1: loss"),
        "{log}"
    );
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(resumed_dir.join("config.json")).unwrap()).unwrap();
    let provenance = config["provenance"].as_str().unwrap();
    assert!(
        provenance.contains("resumed") && provenance.contains("epoch 1: loss") && provenance.contains("epoch 2: loss"),
        "{provenance}"
    );
    // Fine-tuning starts from a head's own weights: at learning rate 0 the
    // same file comes back; otherwise it trains on, and says from what.
    let tuned_dir = dir.join("tuned");
    let from = ["--init", out_dir.to_str().unwrap()];
    let log = String::from_utf8_lossy(
        &train_epochs(&tuned_dir, "1", &[&from[..], &["--learning-rate", "0"]].concat()).stderr,
    )
    .to_string();
    assert!(log.contains("starting from the head in"), "{log}");
    let same = std::fs::read(tuned_dir.join("model.safetensors")).unwrap();
    // Bit for bit but for the sign of a zero (-0 - -0 is +0).
    let zero = |h: &[u8]| h == [0, 0] || h == [0, 0x80];
    assert!(
        same.len() == first.len()
            && same
                .chunks(2)
                .zip(first.chunks(2))
                .all(|(a, b)| a == b || (zero(a) && zero(b))),
        "a head trained at learning rate 0 changed"
    );
    train_epochs(&tuned_dir, "1", &from);
    assert_ne!(std::fs::read(tuned_dir.join("model.safetensors")).unwrap(), first);
    let config: Value = serde_json::from_str(&std::fs::read_to_string(tuned_dir.join("config.json")).unwrap()).unwrap();
    let provenance = config["provenance"].as_str().unwrap();
    assert!(
        provenance.contains(&format!("--init {}", out_dir.display()))
            && provenance.contains(&format!("from {} (heterospec train-draft", out_dir.display())),
        "{provenance}"
    );
    // A head with an output norm, as some published heads have: a resumed
    // fine-tune keeps it.
    let normed_dir = dir.join("normed");
    std::fs::create_dir_all(&normed_dir).unwrap();
    std::fs::copy(out_dir.join("config.json"), normed_dir.join("config.json")).unwrap();
    let cpu = candle_core::Device::Cpu;
    let mut tensors = candle_core::safetensors::load(out_dir.join("model.safetensors"), &cpu).unwrap();
    let hidden = config["hidden_size"].as_u64().unwrap() as usize;
    let norm = candle_core::Tensor::ones(hidden, candle_core::DType::F16, &cpu).unwrap();
    tensors.insert("norm.weight".into(), norm);
    candle_core::safetensors::save(&tensors, normed_dir.join("model.safetensors")).unwrap();
    let normed_tuned = dir.join("normed-tuned");
    train_epochs(&normed_tuned, "1", &["--init", normed_dir.to_str().unwrap()]);
    let log = String::from_utf8_lossy(&train(&normed_tuned, &["--resume"]).stderr).to_string();
    assert!(log.contains("resuming after epoch 1"), "{log}");
    let written = candle_core::safetensors::load(normed_tuned.join("model.safetensors"), &cpu).unwrap();
    assert!(
        written.contains_key("norm.weight"),
        "the resumed head lost its output norm"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_heterospec"))
        .args(["train-draft", "--init", out_dir.to_str().unwrap(), "--resume"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--init"), "{err}");

    let generate = |extra: &[&str]| -> Value {
        let mut args = vec![
            "generate",
            "--json",
            "--model",
            model,
            "--chat",
            "--prompt",
            "Name three colors.",
            "--max-new-tokens",
            "24",
        ];
        args.extend_from_slice(extra);
        serde_json::from_slice(&heterospec(&args).stdout).unwrap()
    };
    let plain = generate(&["--drafter", "none"]);
    let head = generate(&[
        "--drafter",
        "head",
        "--draft-head",
        out_dir.to_str().unwrap(),
        "--speculation",
        "fixed",
    ]);
    assert_eq!(head["token_ids"], plain["token_ids"]);
    assert!(head["speculation"]["verified_tokens"].as_u64().unwrap() > 0, "{head}");
    let hybrid = generate(&[
        "--drafter",
        "hybrid",
        "--draft-head",
        out_dir.to_str().unwrap(),
        "--speculation",
        "fixed",
    ]);
    assert_eq!(hybrid["token_ids"], plain["token_ids"]);
    assert!(
        hybrid["speculation"]["verified_tokens"].as_u64().unwrap() > 0,
        "{hybrid}"
    );

    // An EAGLE-3 head from the same training set (the target's low, middle
    // and high-layer states).
    let eagle3_dir = dir.join("head3");
    train(&eagle3_dir, &["--kind", "eagle3"]);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(eagle3_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLMEagle3");
    assert_eq!(
        config["eagle_config"]["eagle_aux_hidden_state_layer_ids"],
        serde_json::json!([2, 15, 27])
    );
    let head3_args = [
        "--drafter",
        "head",
        "--draft-head",
        eagle3_dir.to_str().unwrap(),
        "--speculation",
        "fixed",
    ];
    let head3 = generate(&head3_args);
    assert_eq!(head3["token_ids"], plain["token_ids"]);
    assert!(head3["speculation"]["verified_tokens"].as_u64().unwrap() > 0, "{head3}");
    // A head's own calibration.json is its default calibration.
    std::fs::write(eagle3_dir.join("calibration.json"), "not a calibration").unwrap();
    let mut args = vec!["generate", "--model", model, "--prompt", "Hi", "--max-new-tokens", "2"];
    args.extend_from_slice(&head3_args);
    let out = Command::new(env!("CARGO_BIN_EXE_heterospec"))
        .args(&args)
        .env("HETEROSPEC_THREADS", "2")
        .env_remove("HETEROSPEC_CALIBRATION")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("calibration.json"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_committed_head_with_prompt_lookup_is_the_default_drafter_and_the_head_says_how_it_was_made() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("engine/heads/smollm2-135m/config.json")).unwrap())
            .unwrap();
    let provenance = config["provenance"].as_str().unwrap();
    assert!(provenance.starts_with("heterospec train-draft"), "{provenance}");
    // Run from the repository root, the default model drafts with its head
    // and prompt lookup.
    let out = Command::new(env!("CARGO_BIN_EXE_heterospec"))
        .current_dir(root)
        .args([
            "generate",
            "--json",
            "--chat",
            "--prompt",
            "Hi!",
            "--max-new-tokens",
            "4",
        ])
        .env("HETEROSPEC_THREADS", "2")
        .env_remove("HETEROSPEC_DRAFTER")
        .env_remove("HETEROSPEC_MODEL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = String::from_utf8_lossy(&out.stderr);
    let ready = log
        .lines()
        .find(|l| l.contains("speculation ready"))
        .unwrap_or_default();
    assert!(ready.contains("\"hybrid\""), "{log}");
}
