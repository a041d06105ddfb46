//! Speculative decoding on the default model: greedy output is token for
//! token the plain output for every drafter (n-gram, a draft model made by
//! `heterospec quantize`, layer-skip self-draft, the committed draft head,
//! the head with prompt lookup),
//! every mode and batch sizes 1 and 8 with prefill and decode mixed; and
//! through the router, with modes mixed in one batch, per-response stats and
//! per-tier engine metrics.

mod common;

use std::path::Path;

use common::*;
use heterospec_engine::runner::{Runner, TokenOutput, TokenRequest};
use heterospec_engine::spec::{CostCurve, DraftHead, SpecMode, SpecPolicy};
use heterospec_engine::{DrafterKind, Engine, EngineConfig, Model, SamplingParams, SpecSetup, WeightFormat};
use heterospec_proto::v1 as pb;
use heterospec_router::{ChatMessage, TextTokenizer};

const PROMPTS: [&str; 20] = [
    "Write a Python function that returns the sum of a list, then write it again with a docstring.",
    "Repeat after me three times: the quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "List the days of the week.",
    "Explain photosynthesis in two sentences.",
    "Write a JavaScript function that reverses a string.",
    "Count from one to fifteen in words.",
    "Summarize: The council met on Tuesday. Residents asked for more trees and better lighting. The council agreed to fund the lighting next year.",
    "What is 12 times 7? Show your work.",
    "Give me three tips for sleeping better.",
    "Write a SQL query that selects all users older than 30.",
    "Name the planets of the solar system in order.",
    "How do I boil an egg? Give numbered steps.",
    "Translate 'good morning' into Spanish, French and German.",
    "Write a haiku about autumn.",
    "What does a CPU do?",
    "Write a Python class for a stack with push and pop.",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
    "Spell the word 'banana' letter by letter.",
];
const NEW_TOKENS: usize = 20;

fn requests(tokenizer: &TextTokenizer, mode: SpecMode) -> Vec<TokenRequest> {
    PROMPTS
        .iter()
        .map(|p| {
            let text = tokenizer
                .apply_chat_template(&[ChatMessage::new("user", p.to_string())])
                .unwrap();
            TokenRequest {
                prompt: tokenizer.encode(&text).unwrap(),
                sampling: SamplingParams::greedy(),
                speculation: mode,
                max_new_tokens: NEW_TOKENS,
                stop_token_ids: vec![],
            }
        })
        .collect()
}

/// The committed head's fixed-tree mean acceptance length on these prompts
/// is well above this (see the README's Draft head section).
const HEAD_MIN_TAU: f64 = 1.5;

fn config() -> EngineConfig {
    EngineConfig {
        block_size: 16,
        kv_cache_bytes: 256 << 20,
    }
}

fn run(engine: &mut Engine, reqs: &[TokenRequest], batch: usize) -> Vec<TokenOutput> {
    // Prompt chunks of 48 tokens: prefill and decode share steps at batch 8.
    Runner::new(engine).run(reqs, batch, 48).unwrap()
}

fn spec_engine(drafter: DrafterKind, curve: &CostCurve) -> Engine {
    let model = Model::load(&model(), WeightFormat::Native).unwrap();
    // The hybrid drafter's committed calibration holds its n-gram scale.
    let policy = match drafter {
        DrafterKind::Hybrid(_) => SpecPolicy::default_for("hybrid"),
        _ => SpecPolicy::default_ngram(),
    };
    Engine::with_speculation(
        model,
        config(),
        Some(SpecSetup {
            drafter,
            policy,
            verify_budget: None,
            cost_curve: Some(curve.clone()),
        }),
    )
    .unwrap()
}

/// The default model's committed draft head, 8-bit as the CLI loads it.
fn committed_head() -> Box<DraftHead> {
    let target = Model::load(&model(), WeightFormat::Native).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("engine/heads/smollm2-135m");
    Box::new(DraftHead::load(&path, target.config(), WeightFormat::Q8_0).unwrap())
}

fn quantized_draft(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("draft-q4_0.gguf");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_heterospec"))
        .args([
            "quantize",
            "--dtype",
            "q4_0",
            "--model",
            model().to_str().unwrap(),
            "--out",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "heterospec quantize failed");
    out
}

#[test]
fn greedy_speculation_equals_plain_decoding_on_the_default_model() {
    let tokenizer = TextTokenizer::from_gguf_file(&model()).unwrap();
    let mut plain_engine = Engine::new(Model::load(&model(), WeightFormat::Native).unwrap(), config()).unwrap();
    let plain: Vec<Vec<u32>> = run(&mut plain_engine, &requests(&tokenizer, SpecMode::Off), 8)
        .into_iter()
        .map(|o| o.token_ids)
        .collect();
    drop(plain_engine);
    let dir = std::env::temp_dir().join(format!("heterospec-spec-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let draft_path = quantized_draft(&dir);
    // A curve where verifying is cheap, so every mode drafts and verifies
    // (the measured curve of a 2-core machine often says it does not pay).
    let curve = CostCurve::new(vec![(1, 1.0), (64, 1.5), (256, 8.0)]);
    type MakeDrafter<'a> = Box<dyn Fn() -> DrafterKind + 'a>;
    let drafters: Vec<(&str, MakeDrafter<'_>)> = vec![
        ("ngram", Box::new(|| DrafterKind::Ngram)),
        (
            "model",
            Box::new(|| DrafterKind::Model(Box::new(Model::load(&draft_path, WeightFormat::Native).unwrap()))),
        ),
        ("self", Box::new(|| DrafterKind::SelfDraft { num_layers: 8 })),
        ("head", Box::new(|| DrafterKind::Head(committed_head()))),
        ("hybrid", Box::new(|| DrafterKind::Hybrid(committed_head()))),
    ];
    for (name, make) in &drafters {
        for mode in [SpecMode::Fixed, SpecMode::Hetero, SpecMode::Auto] {
            // A fresh engine per mode: the budget rule learns how far to
            // trust a drafter, and a poor one (the self-draft of a small
            // model) soon stops being verified at all.
            let mut engine = spec_engine(make(), &curve);
            let mut verified = 0;
            for batch in [1, 8] {
                let out = run(&mut engine, &requests(&tokenizer, mode), batch);
                let mut accepted = 0;
                for (i, o) in out.iter().enumerate() {
                    assert_eq!(
                        o.token_ids, plain[i],
                        "{name} {mode:?} batch {batch}: prompt {i} differs"
                    );
                    accepted += o.stats.accepted_tokens;
                    verified += o.stats.draft_tokens;
                }
                let steps: usize = out.iter().map(|o| o.stats.spec_steps).sum();
                eprintln!("{name} {mode:?} batch {batch}: {accepted} draft tokens accepted in {steps} verifications");
                if (*name == "head" || *name == "hybrid") && mode == SpecMode::Fixed {
                    // The head reads the right features (a misaligned or
                    // missing feature leaves it guessing from the token alone).
                    let tau = 1.0 + accepted as f64 / steps.max(1) as f64;
                    assert!(
                        tau >= HEAD_MIN_TAU,
                        "head: mean acceptance length {tau:.2} at batch {batch}"
                    );
                }
                if mode == SpecMode::Fixed {
                    assert!(
                        accepted > 0,
                        "{name} {mode:?} batch {batch}: no draft token was accepted"
                    );
                }
            }
            assert!(verified > 0, "{name} {mode:?}: no draft token was verified");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn request(prompt: &str, mode: pb::SpeculationMode) -> pb::GenerateRequest {
    pb::GenerateRequest {
        speculation: mode as i32,
        ..chat_request(prompt, 40)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_mixed_in_one_batch_through_the_router_agree_and_report_speculation() {
    let engine_metrics = free_port();
    let metrics_flag = format!("127.0.0.1:{engine_metrics}");
    // Steps overlap at every batch size, speculative ones included.
    let cluster = Cluster::start(&["--metrics-listen", &metrics_flag], &["--overlap-steps", "on"]);
    let mut client = cluster.client().await;
    let modes = [
        pb::SpeculationMode::Off,
        pb::SpeculationMode::Fixed,
        pb::SpeculationMode::Hetero,
        pb::SpeculationMode::Auto,
    ];
    let prompts = &PROMPTS[..6];
    let mut tasks = Vec::new();
    for p in prompts {
        for mode in modes {
            let mut c = client.clone();
            let req = request(p, mode);
            tasks.push(tokio::spawn(async move { run_stream(&mut c, req).await }));
        }
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap().unwrap());
    }
    let mut accepted_fixed = 0;
    let mut tiered_hetero = 0;
    for (i, chunk) in results.chunks(modes.len()).enumerate() {
        for (m, r) in chunk.iter().enumerate() {
            assert_eq!(
                r.token_ids, chunk[0].token_ids,
                "prompt {i}: {:?} differs from off",
                modes[m]
            );
            assert_eq!(r.text, chunk[0].text);
            let stats = r
                .speculation
                .clone()
                .expect("the last response carries speculation stats");
            assert!(stats.steps > 0);
            assert!(stats.steps as usize <= r.token_ids.len());
            let want = 1.0 + stats.accepted_tokens as f32 / stats.steps as f32;
            assert!((stats.mean_acceptance_length - want).abs() < 1e-5);
            if modes[m] == pb::SpeculationMode::Off {
                assert_eq!((stats.verified_tokens, stats.accepted_tokens), (0, 0));
                assert_eq!(stats.steps as usize, r.token_ids.len());
            }
            if modes[m] == pb::SpeculationMode::Fixed {
                accepted_fixed += stats.accepted_tokens;
                assert_eq!(stats.tier_steps.iter().sum::<u32>(), 0, "fixed trees have no tier");
            }
            if modes[m] == pb::SpeculationMode::Hetero {
                assert_eq!(stats.tier_steps.len(), 8);
                tiered_hetero += stats.tier_steps.iter().sum::<u32>();
            }
        }
    }
    assert!(accepted_fixed > 0, "the fixed tree never had a draft token accepted");
    // A lone request also agrees with the batched ones (and, alone, the
    // budget rule drafts for it: a large batch may leave no room).
    let solo = run_stream(&mut client, request(prompts[0], pb::SpeculationMode::Hetero))
        .await
        .unwrap();
    assert_eq!(solo.token_ids, results[0].token_ids);
    tiered_hetero += solo.speculation.unwrap().tier_steps.iter().sum::<u32>();
    assert!(tiered_hetero > 0, "no HETERO step reported a tier");

    let text = scrape(engine_metrics);
    assert!(metric(&text, "heterospec_spec_steps_total", &["tier=\"fixed\""]) > 0.0);
    let hetero_steps: f64 = (0..8)
        .map(|t| metric(&text, "heterospec_spec_steps_total", &[&format!("tier=\"B{t}\"")]))
        .sum();
    assert!(
        hetero_steps > 0.0,
        "no per-tier HeteroSpec steps in the engine's /metrics"
    );
    assert!(metric(&text, "heterospec_spec_draft_tokens_total", &[]) > 0.0);
    assert!(
        metric(&text, "heterospec_spec_verified_tokens_total", &[])
            > metric(&text, "heterospec_spec_draft_tokens_total", &[])
    );
    assert!(metric(&text, "heterospec_spec_accepted_tokens_total", &[]) > 0.0);
    assert!(metric(&text, "heterospec_spec_acceptance_length_count", &[]) > 0.0);
    assert!(metric(&text, "heterospec_spec_budget_tokens_count", &[]) > 0.0);
    assert_eq!(
        metric(&cluster.metrics(), "heterospec_kv_blocks", &["state=\"used\""]),
        0.0,
        "lookahead blocks were all given back"
    );
}
