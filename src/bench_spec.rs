//! `heterospec bench spec`: plain decoding, chain speculation, the fixed
//! tree and HeteroSpec side by side in one run, on the same prompts, per
//! category and overall, at each concurrency: mean acceptance length,
//! verified tokens per committed token, tok/s, speedup over plain decoding
//! on the same engine (each compared drafter runs its own plain), and the
//! share of steps per tier. Every request generates exactly
//! `--max-new-tokens` greedy tokens, and the outputs of all variants are
//! checked to be identical.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use heterospec_engine::runner::{Runner, SpecStats, TokenRequest};
use heterospec_engine::spec::{SpecMode, SpecPolicy};
use heterospec_engine::{SamplingParams, StepTimes};
use heterospec_router::{ChatMessage, TextTokenizer};
use serde::Serialize;

use crate::local::{init_threads, EngineArgs};

#[derive(Debug, Clone, Args)]
pub struct SpecBenchArgs {
    /// JSON lines with `category` and `prompt`.
    #[arg(long, default_value = "bench/prompts.jsonl")]
    prompts: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    concurrency: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Prompts per category (all when 0).
    #[arg(long, default_value_t = 0)]
    per_category: usize,
    #[arg(long, env = "HETEROSPEC_MODEL", default_value_os_t = crate::fetch::default_model_path())]
    model: PathBuf,
    /// Other drafters to run side by side (their fixed tree and HeteroSpec),
    /// e.g. `ngram,model` (`model` needs --draft-model); `head=DIR` and
    /// `hybrid=DIR` use another draft head (shown as `head:<dir name>` and
    /// `hybrid:<dir name>`, with the calibration files in DIR when it has them).
    #[arg(long, value_delimiter = ',')]
    compare_drafters: Vec<String>,
    /// Variants to run (`plain` always runs: it is the reference):
    /// plain, chain, fixed, hetero (what the default AUTO mode does).
    #[arg(long, value_delimiter = ',', default_value = "plain,chain,fixed,hetero")]
    variants: Vec<String>,
    /// Rounds over every category and variant (the order reversed every
    /// other round); figures sum over rounds, so machine noise averages out.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Also draw a PNG chart (needs python3 with matplotlib).
    #[arg(long)]
    plot: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    concurrency: usize,
    variant: String,
    category: String,
    tokens: usize,
    seconds: f64,
    tokens_per_second: f64,
    speedup: f64,
    mean_acceptance_length: f64,
    verified_per_committed: f64,
    /// Steps that verified draft tokens whose first one was accepted.
    first_draft_acceptance: f64,
    /// Milliseconds per step spent drafting and in the forward.
    draft_ms_per_step: f64,
    forward_ms_per_step: f64,
    /// Share of speculative steps per tier B0..B7.
    tier_share: Vec<f64>,
}

const VARIANTS: [&str; 4] = ["plain", "chain", "fixed", "hetero"];

/// What one variant did over some runs.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    stats: SpecStats,
    tokens: usize,
    seconds: f64,
    times: StepTimes,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.stats.add(&other.stats);
        self.tokens += other.tokens;
        self.seconds += other.seconds;
        self.times.steps += other.times.steps;
        self.times.draft_secs += other.times.draft_secs;
        self.times.forward_secs += other.times.forward_secs;
    }
}

fn row(concurrency: usize, variant: &str, category: &str, t: &Tally) -> Row {
    let Tally {
        stats: s,
        tokens,
        seconds,
        times,
    } = *t;
    let spec_steps = s.spec_steps.max(1) as f64;
    let steps = times.steps.max(1) as f64;
    Row {
        concurrency,
        variant: variant.to_string(),
        category: category.to_string(),
        tokens,
        seconds,
        tokens_per_second: tokens as f64 / seconds,
        speedup: 0.0,
        mean_acceptance_length: s.mean_acceptance_length(),
        // Every step runs the root; speculative steps also their draft nodes.
        verified_per_committed: (s.steps + s.draft_tokens) as f64 / tokens.max(1) as f64,
        first_draft_acceptance: s.first_accepted as f64 / s.verified_steps.max(1) as f64,
        draft_ms_per_step: times.draft_secs * 1e3 / steps,
        forward_ms_per_step: times.forward_secs * 1e3 / steps,
        tier_share: s.tier_steps[..8].iter().map(|&n| n as f64 / spec_steps).collect(),
    }
}

pub fn run(args: SpecBenchArgs) -> Result<()> {
    init_threads(args.engine.threads);
    crate::fetch::ensure_default_model(&args.model)?;
    if args.engine.drafter == "none" {
        bail!("bench spec needs a drafter");
    }
    let tokenizer = TextTokenizer::from_gguf_file(&args.model)?;
    let mut by_category: BTreeMap<String, Vec<TokenRequest>> = BTreeMap::new();
    for p in crate::bench_serve::read_prompts(&args.prompts)? {
        let text = tokenizer.apply_chat_template(&[ChatMessage::new("user", p.prompt.clone())])?;
        let list = by_category.entry(p.category.clone()).or_default();
        if args.per_category == 0 || list.len() < args.per_category {
            list.push(TokenRequest {
                prompt: tokenizer.encode(&text)?,
                sampling: SamplingParams::greedy(),
                speculation: SpecMode::Off,
                max_new_tokens: args.max_new_tokens,
                stop_token_ids: vec![],
            });
        }
    }
    let engine = args.engine.build_engine(&args.model)?;
    let drafter = engine.drafter_name().context("bench spec needs a drafter")?;
    let policy = engine.policy().cloned().context("the engine has no drafter")?;
    let chain_policy = SpecPolicy {
        depth: 4,
        top_k: 1,
        num_nodes: 4,
        ..policy.clone()
    };
    let chain_engine = args.engine.build_engine_with_policy(&args.model, Some(chain_policy))?;
    let curve = engine.cost_curve().cloned().expect("a drafter implies a cost curve");
    let mut engines = vec![engine, chain_engine];
    for v in &args.variants {
        if !VARIANTS.contains(&v.as_str()) {
            bail!("--variants: unknown variant `{v}` (plain, chain, fixed, hetero)");
        }
    }
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let mut variants: Vec<(String, usize, SpecMode)> = VARIANTS
        .iter()
        .filter(|&&v| v == "plain" || args.variants.iter().any(|w| w == v))
        .map(|&v| {
            let (e, mode) = match v {
                "plain" => (0, SpecMode::Off),
                "chain" => (1, SpecMode::Fixed),
                "fixed" => (0, SpecMode::Fixed),
                _ => (0, SpecMode::Hetero),
            };
            (v.to_string(), e, mode)
        })
        .collect();
    // Other drafters: plain, their fixed tree and HeteroSpec, each with its own
    // committed calibration.
    for d in &args.compare_drafters {
        let mut other = args.engine.clone();
        other.calibration = None;
        let label = match d.split_once('=') {
            Some((kind @ ("head" | "hybrid"), dir)) => {
                other.drafter = kind.into();
                other.draft_head = Some(dir.into());
                let name = Path::new(dir).file_name().map(|n| n.to_string_lossy().into_owned());
                format!("{kind}:{}", name.unwrap_or_else(|| dir.into()))
            }
            Some(_) => bail!("--compare-drafters {d}: only `head=DIR` and `hybrid=DIR` take a path"),
            None => {
                other.drafter = d.clone();
                d.clone()
            }
        };
        engines.push(
            other
                .build_engine(&args.model)
                .with_context(|| format!("--compare-drafters {d}"))?,
        );
        // Its own plain run: copies of one model in one process decode at
        // measurably different speeds, so each drafter is compared with
        // plain decoding on its own engine.
        variants.push((format!("{label}-plain"), engines.len() - 1, SpecMode::Off));
        for (suffix, mode) in [("fixed", SpecMode::Fixed), ("hetero", SpecMode::Hetero)] {
            if !args.variants.iter().any(|v| v == suffix) {
                continue;
            }
            variants.push((format!("{label}-{suffix}"), engines.len() - 1, mode));
        }
    }

    // Variants run back to back per category (not one variant over all
    // categories, then the next), in reversed order every other round, so
    // a slow drift of the machine's speed touches them alike.
    let mut rows = Vec::new();
    for &c in &args.concurrency {
        let mut tallies: BTreeMap<(String, String), Tally> = BTreeMap::new();
        for round in 0..args.repeat {
            for (category, reqs) in &by_category {
                let mut outputs: BTreeMap<&str, Vec<Vec<u32>>> = BTreeMap::new();
                let mut order: Vec<&(String, usize, SpecMode)> = variants.iter().collect();
                if round % 2 == 1 {
                    order.reverse();
                }
                for (variant, e, mode) in order {
                    let reqs: Vec<TokenRequest> = reqs
                        .iter()
                        .map(|r| TokenRequest {
                            speculation: *mode,
                            ..r.clone()
                        })
                        .collect();
                    let before = engines[*e].step_times();
                    let start = Instant::now();
                    let out = Runner::new(&mut engines[*e]).run(&reqs, c, 512)?;
                    let seconds = start.elapsed().as_secs_f64();
                    let after = engines[*e].step_times();
                    let mut t = Tally {
                        seconds,
                        tokens: out.iter().map(|o| o.token_ids.len()).sum(),
                        times: StepTimes {
                            steps: after.steps - before.steps,
                            draft_secs: after.draft_secs - before.draft_secs,
                            forward_secs: after.forward_secs - before.forward_secs,
                        },
                        ..Tally::default()
                    };
                    for o in &out {
                        t.stats.add(&o.stats);
                    }
                    outputs.insert(variant, out.into_iter().map(|o| o.token_ids).collect());
                    tallies.entry((category.clone(), variant.clone())).or_default().add(&t);
                }
                for (variant, ids) in &outputs {
                    if *ids != outputs["plain"] {
                        bail!("{variant} at c={c} changed the greedy output of {category}");
                    }
                }
            }
        }
        for category in by_category.keys() {
            for (variant, ..) in &variants {
                rows.push(row(
                    c,
                    variant,
                    category,
                    &tallies[&(category.clone(), variant.clone())],
                ));
            }
        }
        for (variant, ..) in &variants {
            let mut total = Tally::default();
            for ((_, v), t) in &tallies {
                if v == variant {
                    total.add(t);
                }
            }
            rows.push(row(c, variant, "overall", &total));
        }
    }
    // Speedups are over plain decoding on the variant's own engine (the
    // chain engine, built from the main one's settings, uses the main one's).
    let plain_of = |variant: &str| -> String {
        let engine = variants.iter().find(|v| v.0 == variant).map_or(0, |v| v.1);
        variants
            .iter()
            .find(|v| v.1 == engine && v.2 == SpecMode::Off)
            .map_or_else(|| "plain".to_string(), |v| v.0.clone())
    };
    let tok_s: BTreeMap<(usize, String, String), f64> = rows
        .iter()
        .map(|r| {
            (
                (r.concurrency, r.category.clone(), r.variant.clone()),
                r.tokens_per_second,
            )
        })
        .collect();
    for r in &mut rows {
        let plain = tok_s[&(r.concurrency, r.category.clone(), plain_of(&r.variant))];
        r.speedup = r.tokens_per_second / plain;
    }

    #[derive(Serialize)]
    struct Report<'a> {
        drafter: &'a str,
        policy: &'a SpecPolicy,
        cost_curve_ms: BTreeMap<usize, f64>,
        max_new_tokens: usize,
        rows: &'a [Row],
    }
    let report = Report {
        drafter,
        policy: &policy,
        cost_curve_ms: curve.points().iter().map(|&(t, s)| (t, s * 1e3)).collect(),
        max_new_tokens: args.max_new_tokens,
        rows: &rows,
    };
    let json = serde_json::to_string_pretty(&report)?;
    if args.json {
        println!("{json}");
    } else {
        print_tables(drafter, &policy, &report.cost_curve_ms, &rows);
    }
    // The figures are out before the chart is drawn.
    if let Some(path) = &args.plot {
        let tmp = std::env::temp_dir().join(format!("heterospec-bench-spec-{}.json", std::process::id()));
        std::fs::write(&tmp, &json)?;
        let status = std::process::Command::new("python3")
            .arg("scripts/plot_spec.py")
            .arg(&tmp)
            .arg(path)
            .status()
            .context("running python3 scripts/plot_spec.py")?;
        let _ = std::fs::remove_file(&tmp);
        if !status.success() {
            bail!("scripts/plot_spec.py failed");
        }
    }
    Ok(())
}

fn print_tables(drafter: &str, policy: &SpecPolicy, cost_curve_ms: &BTreeMap<usize, f64>, rows: &[Row]) {
    println!(
        "drafter {}; policy d={} k={} N={}; cost curve (ms) {:?}",
        drafter, policy.depth, policy.top_k, policy.num_nodes, cost_curve_ms
    );
    println!(
        "{:>3} {:<13} {:<14} {:>7} {:>8} {:>8} {:>6} {:>9} {:>6} {:>8} {:>8}  tiers B0..B7 (% of spec steps)",
        "c", "variant", "category", "tokens", "tok/s", "speedup", "τ", "verif/tok", "1st", "draft ms", "fwd ms"
    );
    for r in rows {
        let tiers: Vec<String> = r.tier_share.iter().map(|s| format!("{:.0}", s * 100.0)).collect();
        println!(
            "{:>3} {:<13} {:<14} {:>7} {:>8.1} {:>7.2}x {:>6.2} {:>9.2} {:>5.0}% {:>8.2} {:>8.2}  {}",
            r.concurrency,
            r.variant,
            r.category,
            r.tokens,
            r.tokens_per_second,
            r.speedup,
            r.mean_acceptance_length,
            r.verified_per_committed,
            r.first_draft_acceptance * 100.0,
            r.draft_ms_per_step,
            r.forward_ms_per_step,
            if r.variant.ends_with("hetero") {
                tiers.join("/")
            } else {
                String::new()
            }
        );
    }
}
