//! Speculative decoding on tiny random models: greedy output equals plain
//! decoding for every drafter, mode and batch size; sampled tokens follow
//! the target distribution exactly (and a biased acceptance rule is caught);
//! tree shapes respect the calibration's tiers. With
//! `HETEROSPEC_TEST_DEVICE=cuda` the target runs on the GPU.

use heterospec_engine::runner::{Runner, TokenOutput, TokenRequest};
use heterospec_engine::spec::head::HeadKind;
use heterospec_engine::spec::{CostCurve, SpecMode, SpecPolicy};
use heterospec_engine::testing::{tiny_head, tiny_head_with_layers, tiny_model, tiny_target, Lcg};
use heterospec_engine::{DrafterKind, Engine, EngineConfig, Sampler, SamplingParams};

const TARGET_SEED: u64 = 5;

fn config() -> EngineConfig {
    EngineConfig {
        block_size: 4,
        kv_cache_bytes: 8 << 20,
    }
}

/// Verification nearly free up to 64 tokens: the budget rule speculates.
fn cheap_curve() -> CostCurve {
    CostCurve::new(vec![(1, 1.0), (64, 1.2), (512, 10.0)])
}

fn policy() -> SpecPolicy {
    SpecPolicy {
        depth: 3,
        top_k: 3,
        num_nodes: 6,
        thresholds: vec![0.2, 0.5, 0.8, 1.2, 1.6, 2.0, 3.0],
        ..SpecPolicy::default()
    }
}

fn spec_engine(drafter: DrafterKind) -> Engine {
    Engine::with_speculation(
        tiny_target(TARGET_SEED).unwrap(),
        config(),
        Some(heterospec_engine::SpecSetup {
            drafter,
            policy: policy(),
            verify_budget: None,
            cost_curve: Some(cheap_curve()),
        }),
    )
    .unwrap()
}

/// A drafter's name and how to build a fresh one.
type NamedDrafter = (&'static str, fn() -> DrafterKind);

fn drafters() -> Vec<NamedDrafter> {
    vec![
        ("ngram", || DrafterKind::Ngram),
        ("self", || DrafterKind::SelfDraft { num_layers: 1 }),
        ("model-same", || {
            DrafterKind::Model(Box::new(tiny_model(TARGET_SEED).unwrap()))
        }),
        ("model-other", || DrafterKind::Model(Box::new(tiny_model(11).unwrap()))),
        ("head", || {
            DrafterKind::Head(Box::new(tiny_head(TARGET_SEED, HeadKind::Eagle).unwrap()))
        }),
        ("head-eagle3", || {
            DrafterKind::Head(Box::new(tiny_head(TARGET_SEED, HeadKind::Eagle3).unwrap()))
        }),
        ("hybrid", || {
            DrafterKind::Hybrid(Box::new(tiny_head(TARGET_SEED, HeadKind::Eagle).unwrap()))
        }),
        ("head-2layers", || {
            DrafterKind::Head(Box::new(
                tiny_head_with_layers(TARGET_SEED, HeadKind::Eagle, 2).unwrap(),
            ))
        }),
    ]
}

/// 20 prompts of 3..40 tokens, some with repeated spans (n-gram matches).
fn prompts() -> Vec<Vec<u32>> {
    let mut rng = Lcg(3);
    (0..20)
        .map(|i| {
            let len = 3 + (rng.next_u32() % 38) as usize;
            let mut p: Vec<u32> = (0..len).map(|_| rng.next_u32() % 64).collect();
            if i % 2 == 0 && len > 8 {
                let span = p[..6].to_vec();
                p.extend(span);
            }
            p
        })
        .collect()
}

fn requests(mode: SpecMode, sampling: &SamplingParams, max_new: usize) -> Vec<TokenRequest> {
    prompts()
        .into_iter()
        .map(|prompt| TokenRequest {
            prompt,
            sampling: sampling.clone(),
            speculation: mode,
            max_new_tokens: max_new,
            stop_token_ids: vec![],
        })
        .collect()
}

fn run(engine: &mut Engine, reqs: &[TokenRequest], batch: usize) -> Vec<TokenOutput> {
    Runner::new(engine).run(reqs, batch, 5).unwrap()
}

#[test]
fn greedy_speculation_equals_plain_decoding_for_every_drafter_mode_and_batch_size() {
    let greedy = SamplingParams::greedy();
    let mut plain_engine = Engine::new(tiny_target(TARGET_SEED).unwrap(), config()).unwrap();
    let plain = run(&mut plain_engine, &requests(SpecMode::Off, &greedy, 24), 1);
    let mut worst = 0.0f32;
    for (name, make) in drafters() {
        for mode in [SpecMode::Fixed, SpecMode::Hetero, SpecMode::Auto] {
            for batch in [1, 8] {
                let mut engine = make_engine(make);
                let out = run(&mut engine, &requests(mode, &greedy, 24), batch);
                let mut accepted = 0;
                for (i, o) in out.iter().enumerate() {
                    assert_eq!(
                        o.token_ids, plain[i].token_ids,
                        "{name} {mode:?} batch {batch} prompt {i}"
                    );
                    // The tiny target is confident: tokens alone would hide a
                    // wrong but small change to the verified logits.
                    for (a, b) in o.logprobs.iter().zip(&plain[i].logprobs) {
                        worst = worst.max((a - b).abs());
                    }
                    accepted += o.stats.accepted_tokens;
                    assert!(o.stats.spec_steps > 0, "{name} {mode:?}: never speculated");
                }
                if name == "model-same" {
                    // Drafts from the target itself: nearly everything is accepted.
                    let drafted: usize = out.iter().map(|o| o.stats.steps).sum();
                    assert!(
                        accepted > 2 * drafted / 3 * 2,
                        "{name} {mode:?}: {accepted} accepted in {drafted} steps"
                    );
                }
                if name == "ngram" || name == "self" || name.starts_with("head") || name == "hybrid" {
                    assert!(accepted > 0, "{name} {mode:?} batch {batch}: nothing accepted");
                }
            }
        }
    }
    println!("worst log-probability difference from plain decoding: {worst:e}");
    assert!(
        worst < 1e-5,
        "verified log-probabilities differ from plain decoding by {worst}"
    );
}

fn make_engine(make: fn() -> DrafterKind) -> Engine {
    spec_engine(make())
}

#[test]
fn tree_shapes_follow_the_calibration_tiers() {
    let p = policy();
    let mut engine = spec_engine(DrafterKind::Model(Box::new(tiny_model(TARGET_SEED).unwrap())));
    let out = run(
        &mut engine,
        &requests(SpecMode::Hetero, &SamplingParams::greedy(), 24),
        8,
    );
    let mut low_tier_steps = 0;
    for o in &out {
        low_tier_steps += o.stats.tier_steps[..3].iter().sum::<usize>();
        assert_eq!(o.stats.tier_steps[8], 0, "no fixed-tree steps in hetero mode");
    }
    assert!(low_tier_steps > 0, "a self-draft is confident somewhere");
    // Per step: accepted <= the tier's depth and drafted <= its node cap.
    let mut engine = spec_engine(DrafterKind::Model(Box::new(tiny_model(TARGET_SEED).unwrap())));
    let mut runner = Runner::new(&mut engine);
    let reqs = requests(SpecMode::Hetero, &SamplingParams::greedy(), 24);
    let outs = runner.run(&reqs[..4], 4, 64).unwrap();
    for o in outs {
        let max_nodes: usize = (0..8).map(|t| p.shape(t).max_nodes).max().unwrap();
        assert!(o.stats.draft_tokens <= o.stats.spec_steps * max_nodes);
        assert!(o.stats.accepted_tokens <= o.stats.spec_steps * p.max_depth());
    }
}

/// Wilson–Hilferty approximation of the chi-square quantile at 1 - 1e-4.
fn chi_square_critical(df: usize) -> f64 {
    let z = 3.719;
    let k = df as f64;
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

/// Pearson's statistic of `counts` against probabilities `expected`,
/// merging categories expected below 5 into one.
fn chi_square(counts: &[usize], expected: &[f64], n: usize) -> (f64, usize) {
    let (mut stat, mut df, mut rest_obs, mut rest_exp) = (0.0, 0usize, 0.0, 0.0);
    for (&c, &p) in counts.iter().zip(expected) {
        let e = p * n as f64;
        if e < 5.0 {
            rest_obs += c as f64;
            rest_exp += e;
        } else {
            stat += (c as f64 - e).powi(2) / e;
            df += 1;
        }
    }
    if rest_exp > 0.0 {
        stat += (rest_obs - rest_exp).powi(2) / rest_exp.max(1e-9);
        df += 1;
    }
    (stat, df.saturating_sub(1).max(1))
}

/// Exact distributions of the first and second generated token without
/// speculation (by enumerating the first token).
fn exact_first_two(prompt: &[u32], sampling: &SamplingParams) -> (Vec<f64>, Vec<f64>) {
    let mut engine = Engine::new(tiny_target(TARGET_SEED).unwrap(), config()).unwrap();
    let mut sampler = Sampler::new(sampling.clone());
    let logits_after = |engine: &mut Engine, tokens: &[u32]| -> Vec<f32> {
        use heterospec_engine::{RaggedBatch, SeqRun};
        let table: Vec<_> = (1..=16u32).map(heterospec_kv::BlockId).collect();
        let run = SeqRun::causal(tokens.to_vec(), 0, &table, 4).unwrap();
        engine.forward(&RaggedBatch { seqs: vec![run] }).unwrap()
    };
    let mut p1 = vec![0.0; 64];
    let mut p2 = vec![0.0; 64];
    for (t, p) in sampler.distribution(&logits_after(&mut engine, prompt), prompt) {
        p1[t as usize] += p as f64;
        let mut next = prompt.to_vec();
        next.push(t);
        for (u, q) in sampler.distribution(&logits_after(&mut engine, &next), &next) {
            p2[u as usize] += p as f64 * q as f64;
        }
    }
    (p1, p2)
}

fn sampled_first_two(
    engine: &mut Engine,
    prompt: &[u32],
    sampling: &SamplingParams,
    n: usize,
    min_accepted: usize,
) -> (Vec<usize>, Vec<usize>) {
    let reqs: Vec<TokenRequest> = (0..n)
        .map(|i| TokenRequest {
            prompt: prompt.to_vec(),
            sampling: SamplingParams {
                seed: Some(1000 + i as u64),
                ..sampling.clone()
            },
            // The fixed tree drafts right after the prompt (the budget rule
            // waits for decode steps), so both tokens can come from drafts;
            // a third token lets the second also come from a decode step's
            // draft (a draft head's usual case: it then has the prompt's
            // features).
            speculation: SpecMode::Fixed,
            max_new_tokens: 3,
            stop_token_ids: vec![],
        })
        .collect();
    let out = Runner::new(engine).run(&reqs, 32, 64).unwrap();
    let (mut c1, mut c2) = (vec![0; 64], vec![0; 64]);
    let mut spec = 0;
    for o in out {
        c1[o.token_ids[0] as usize] += 1;
        c2[o.token_ids[1] as usize] += 1;
        spec += o.stats.accepted_tokens;
    }
    assert!(
        spec > min_accepted,
        "drafts were accepted {spec} times in {n} runs: the test would not test much"
    );
    (c1, c2)
}

#[test]
fn sampling_with_speculation_follows_the_target_distribution_and_a_biased_rule_is_caught() {
    // The model's own greedy continuation, then its start again: the n-gram
    // drafter proposes tokens the target likes.
    let base = vec![3u32, 9, 27];
    let mut plain = Engine::new(tiny_target(TARGET_SEED).unwrap(), config()).unwrap();
    let req = TokenRequest {
        prompt: base.clone(),
        sampling: SamplingParams::greedy(),
        speculation: SpecMode::Off,
        max_new_tokens: 10,
        stop_token_ids: vec![],
    };
    let cont = run(&mut plain, &[req], 1).remove(0).token_ids;
    let prompt: Vec<u32> = [&base[..], &cont, &base, &cont[..2]].concat();
    let sampling = SamplingParams {
        temperature: 6.0,
        top_k: 12,
        top_p: 0.95,
        repetition_penalty: 1.1,
        seed: None,
        top_logprobs: 0,
    };
    let (p1, p2) = exact_first_two(&prompt, &sampling);
    let n = 3000;
    // The heads draft right after the prompt without the prompt's features
    // (they come from the same forward), so fewer of their drafts survive.
    for (name, make, min_accepted) in [
        (drafters()[0].0, drafters()[0].1, n / 4),
        (drafters()[2].0, drafters()[2].1, n / 4),
        (drafters()[4].0, drafters()[4].1, n / 20),
        (drafters()[5].0, drafters()[5].1, n / 20),
        (drafters()[6].0, drafters()[6].1, n / 20),
    ] {
        let mut engine = spec_engine(make());
        let (c1, c2) = sampled_first_two(&mut engine, &prompt, &sampling, n, min_accepted);
        for (which, counts, p) in [("first", &c1, &p1), ("second", &c2, &p2)] {
            let (stat, df) = chi_square(counts, p, n);
            assert!(
                stat < chi_square_critical(df),
                "{name}: {which} token chi-square {stat:.1} over df {df} (critical {:.1})",
                chi_square_critical(df)
            );
        }
    }
    // Control: the same test rejects a rule biased towards the drafts.
    let mut engine = spec_engine(DrafterKind::Model(Box::new(tiny_model(TARGET_SEED).unwrap())));
    engine.use_biased_acceptance_for_tests();
    let (c1, _) = sampled_first_two(&mut engine, &prompt, &sampling, n, n / 4);
    let (stat, df) = chi_square(&c1, &p1, n);
    assert!(
        stat > chi_square_critical(df),
        "the biased rule went unnoticed: chi-square {stat:.1} over df {df}"
    );
}

#[test]
fn seeded_sampling_with_speculation_repeats_plain_sampling_token_for_token() {
    let sampling = SamplingParams {
        temperature: 6.0,
        top_k: 12,
        top_p: 0.95,
        repetition_penalty: 1.1,
        seed: Some(42),
        // Alternatives are reported on the verify path as on the plain one.
        top_logprobs: 2,
    };
    let mut plain_engine = Engine::new(tiny_target(TARGET_SEED).unwrap(), config()).unwrap();
    let plain: Vec<Vec<u32>> = run(&mut plain_engine, &requests(SpecMode::Off, &sampling, 24), 1)
        .into_iter()
        .map(|o| o.token_ids)
        .collect();
    for (name, make) in drafters() {
        for mode in [SpecMode::Fixed, SpecMode::Hetero] {
            let mut engine = spec_engine(make());
            let out = run(&mut engine, &requests(mode, &sampling, 24), 8);
            for (i, o) in out.iter().enumerate() {
                assert_eq!(o.token_ids, plain[i], "{name} {mode:?} prompt {i}");
            }
        }
    }
}
