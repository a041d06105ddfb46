//! `heterospec draft-data`: grows the draft head's training set. The target
//! answers prompt files (and, optionally, prompts it wrote itself) with the
//! engine's continuous batching, greedy and sampled; each answer is added
//! to the dataset as token ids, which is saved after every chunk, so an
//! interrupted run loses at most one chunk and a rerun adds only what is
//! missing.
//!
//! Invariant: no benchmark or calibration prompt enters the dataset.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use heterospec_engine::runner::{Runner, TokenRequest};
use heterospec_engine::spec::SpecMode;
use heterospec_engine::{Engine, EngineConfig, Model, SamplingParams, WeightFormat};
use heterospec_router::{ChatMessage, TextTokenizer};
use serde::{Deserialize, Serialize};

use crate::dataset::{group_of, DraftDataset, DraftRecord};
use crate::local::init_threads;
use crate::progress::{bar, tick};

/// The committed training set of the default model's head.
pub const DEFAULT_DATASET: &str = "engine/heads/smollm2-135m/train-data.hsd";

/// Prompt files that must never be trained on.
const HELD_OUT_PROMPTS: [&str; 2] = ["bench/prompts.jsonl", "bench/calibration_prompts.jsonl"];

#[derive(Debug, Args)]
pub struct DraftDataArgs {
    #[arg(long, env = "HETEROSPEC_MODEL", default_value_os_t = crate::fetch::default_model_path())]
    pub model: PathBuf,
    /// JSON lines with `category`, `prompt` and optional `followup` (a user
    /// turn asked after the target's greedy answer). Repeatable.
    #[arg(long, default_value = "bench/draft_train_prompts.jsonl")]
    pub prompts: Vec<PathBuf>,
    /// The dataset to grow (created when missing).
    #[arg(long, default_value = DEFAULT_DATASET)]
    pub dataset: PathBuf,
    /// A file of user turns the target writes itself (sampled from the chat
    /// template's user role), topped up to `--self-prompt-count` and then
    /// answered like the prompt files.
    #[arg(long)]
    pub self_prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub self_prompt_count: usize,
    /// Answers per prompt, one at each temperature (0: greedy; sampled
    /// answers are seeded by the prompt).
    #[arg(long, value_delimiter = ',', default_value = "0,0.7")]
    pub temperatures: Vec<f32>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Answers generated at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Stop after adding this many records (0: no limit); a later run
    /// continues.
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Start no new chunk after this many minutes (0: no limit); a later
    /// run continues.
    #[arg(long, default_value_t = 0.0)]
    pub minutes: f64,
    /// Generate nothing: print what the dataset holds (JSON, per category)
    /// and check that no benchmark or calibration prompt is in it.
    #[arg(long)]
    pub stats: bool,
    /// Worker threads (0: one per core).
    #[arg(long, env = "HETEROSPEC_THREADS", default_value_t = 0)]
    pub threads: usize,
}

/// Per-category counts of a dataset.
#[derive(Debug, Default, Serialize)]
struct CategoryStats {
    records: usize,
    greedy: usize,
    sampled: usize,
    held_out: usize,
    prompt_tokens: usize,
    answer_tokens: usize,
}

/// `--stats`: the dataset's contents by category, as JSON on stdout; an
/// error when a record's prompt holds a benchmark or calibration prompt.
fn print_stats(path: &Path, tok: &TextTokenizer) -> Result<()> {
    let data = DraftDataset::load(path)?;
    let held_out = held_out_texts()?;
    let mut by_category: std::collections::BTreeMap<String, CategoryStats> = Default::default();
    let (mut groups, mut prompts) = (HashSet::new(), HashSet::new());
    for r in &data.records {
        prompts.insert(&r.prompt);
        let text = tok.decode(&r.prompt)?;
        if let Some(p) = held_out.iter().find(|p| text.contains(p.as_str())) {
            bail!("{}: a record's prompt holds the benchmark prompt {p:?}", path.display());
        }
        groups.insert(r.group);
        let s = by_category.entry(r.category.clone()).or_default();
        s.records += 1;
        s.greedy += (r.temperature == 0.0) as usize;
        s.sampled += (r.temperature > 0.0) as usize;
        s.held_out += r.held_out() as usize;
        s.prompt_tokens += r.prompt.len();
        s.answer_tokens += r.answer.len();
    }
    let report = serde_json::json!({
        "dataset": path.display().to_string(),
        "records": data.records.len(),
        "prompts": prompts.len(),
        "conversations": groups.len(),
        "answer_tokens": data.answer_tokens(),
        "categories": by_category,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// A prompt file's line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DraftPrompt {
    #[serde(default)]
    pub category: String,
    pub prompt: String,
    /// A user turn asked after the target's greedy answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub followup: Option<String>,
}

pub fn read_prompt_file(path: &Path) -> Result<Vec<DraftPrompt>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}: not a prompt record", path.display(), i + 1))
        })
        .collect()
}

/// Texts of the benchmark and calibration prompts (run from the
/// repository root, where they are).
pub fn held_out_texts() -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    for p in HELD_OUT_PROMPTS.iter().map(Path::new) {
        if !p.exists() {
            bail!("{} is missing: run draft-data from the repository root", p.display());
        }
        out.extend(read_prompt_file(p)?.into_iter().map(|r| r.prompt.trim().to_string()));
    }
    Ok(out)
}

/// One answer to generate.
struct Job {
    category: String,
    group: u64,
    temperature: f32,
    request: TokenRequest,
}

fn request(prompt: Vec<u32>, temperature: f32, group: u64, args: &DraftDataArgs, tok: &TextTokenizer) -> TokenRequest {
    TokenRequest {
        prompt,
        sampling: if temperature > 0.0 {
            SamplingParams {
                temperature,
                seed: Some(group ^ (temperature.to_bits() as u64).rotate_left(32)),
                ..SamplingParams::default()
            }
        } else {
            SamplingParams::greedy()
        },
        speculation: SpecMode::Off,
        max_new_tokens: args.max_new_tokens,
        stop_token_ids: tok.eos_token_ids().to_vec(),
    }
}

/// Answers `jobs` in chunks, adding each to `data` and saving after every
/// chunk; returns how many were added.
fn answer(
    engine: &mut Engine,
    data: &mut DraftDataset,
    jobs: Vec<Job>,
    args: &DraftDataArgs,
    what: &str,
    run_started: Instant,
) -> Result<usize> {
    if jobs.is_empty() {
        return Ok(0);
    }
    let started = Instant::now();
    let progress = bar(jobs.len(), what);
    let (mut added, mut tokens) = (0, 0);
    for chunk in jobs.chunks(args.concurrency.max(1) * 8) {
        if args.minutes > 0.0 && run_started.elapsed().as_secs_f64() > args.minutes * 60.0 {
            eprintln!(
                "{what}: stopping after {} minutes (--minutes); run again to continue",
                args.minutes
            );
            break;
        }
        let requests: Vec<TokenRequest> = chunk.iter().map(|j| j.request.clone()).collect();
        let out = Runner::new(engine).run(&requests, args.concurrency.max(1), 256)?;
        for (job, o) in chunk.iter().zip(out) {
            tokens += o.token_ids.len();
            added += data.push(DraftRecord {
                category: job.category.clone(),
                temperature: job.temperature,
                group: job.group,
                prompt: job.request.prompt.clone(),
                answer: o.token_ids,
            })? as usize;
        }
        data.save(&args.dataset, 3)?;
        progress.set_message(format!(
            "{:.0} answer tok/s",
            tokens as f64 / started.elapsed().as_secs_f64()
        ));
        tick(&progress, chunk.len() as u64);
    }
    progress.finish();
    eprintln!(
        "{what}: {added} answers, {tokens} tokens in {:.0} s ({:.0} tok/s)",
        started.elapsed().as_secs_f64(),
        tokens as f64 / started.elapsed().as_secs_f64()
    );
    Ok(added)
}

/// `prompt` at each temperature the data has no answer at yet.
fn add_jobs(
    jobs: &mut Vec<Job>,
    data: &DraftDataset,
    (category, group, prompt): (&str, u64, &[u32]),
    tok: &TextTokenizer,
    args: &DraftDataArgs,
) {
    for &t in &args.temperatures {
        if !data.contains(prompt, t) {
            jobs.push(Job {
                category: category.to_string(),
                group,
                temperature: t,
                request: request(prompt.to_vec(), t, group, args, tok),
            });
        }
    }
}

/// The prompts' first turns at each temperature, those not yet answered.
fn first_turn_jobs(
    data: &DraftDataset,
    prompts: &[DraftPrompt],
    tok: &TextTokenizer,
    args: &DraftDataArgs,
) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    for p in prompts {
        let ids = tok.encode(&tok.apply_chat_template(&[ChatMessage::new("user", p.prompt.clone())])?)?;
        add_jobs(&mut jobs, data, (&p.category, group_of(&ids), &ids), tok, args);
    }
    Ok(jobs)
}

/// Second turns (`followup`) after the target's greedy first answer, where
/// the data has that answer and not yet this turn's.
fn followup_jobs(
    data: &DraftDataset,
    prompts: &[DraftPrompt],
    tok: &TextTokenizer,
    args: &DraftDataArgs,
) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    let (mut asked, mut answered) = (0, 0);
    for p in prompts {
        let Some(followup) = &p.followup else { continue };
        asked += 1;
        let first = ChatMessage::new("user", p.prompt.clone());
        let ids = tok.encode(&tok.apply_chat_template(std::slice::from_ref(&first))?)?;
        let Some(mut reply) = data.greedy_answer(&ids) else {
            continue;
        };
        answered += 1;
        if let Some((last, rest)) = reply.split_last() {
            if tok.eos_token_ids().contains(last) {
                reply = rest;
            }
        }
        let turns = [
            first,
            ChatMessage::new("assistant", tok.decode(reply)?),
            ChatMessage::new("user", followup.clone()),
        ];
        let ids2 = tok.encode(&tok.apply_chat_template(&turns)?)?;
        let category = format!("{}-multiturn", p.category);
        add_jobs(&mut jobs, data, (&category, group_of(&ids), &ids2), tok, args);
    }
    if asked > 0 {
        eprintln!(
            "{asked} prompts have a follow-up, {answered} of them a greedy first answer; {} follow-ups to answer",
            jobs.len()
        );
    }
    Ok(jobs)
}

/// The chat template's text before a user turn's content.
fn user_turn_prefix(tok: &TextTokenizer) -> Result<String> {
    const MARK: &str = "\u{1}USER-TURN\u{1}";
    let text = tok.apply_chat_template(&[ChatMessage::new("user", MARK)])?;
    let at = text.find(MARK).context("the chat template drops the user's text")?;
    Ok(text[..at].to_string())
}

/// Tops `path` up to `count` user turns the target writes itself (sampled at
/// temperature 1, deduplicated, none a held-out prompt).
fn self_prompts(
    engine: &mut Engine,
    tok: &TextTokenizer,
    path: &Path,
    count: usize,
    held_out: &HashSet<String>,
) -> Result<()> {
    let mut have = if path.exists() {
        read_prompt_file(path)?
    } else {
        Vec::new()
    };
    let mut seen: HashSet<String> = have.iter().map(|p| p.prompt.to_lowercase()).collect();
    let prefix = tok.encode(&user_turn_prefix(tok)?)?;
    let started = Instant::now();
    let mut seed = have.len() as u64 * 7919;
    let mut rounds = 0;
    while have.len() < count {
        rounds += 1;
        if rounds > 50 {
            bail!("the target wrote only {} distinct user turns", have.len());
        }
        let want = (count - have.len()) * 5 / 4 + 8;
        let requests: Vec<TokenRequest> = (0..want)
            .map(|_| {
                seed += 1;
                TokenRequest {
                    prompt: prefix.clone(),
                    sampling: SamplingParams {
                        temperature: 1.0,
                        top_p: 0.95,
                        seed: Some(seed),
                        ..SamplingParams::default()
                    },
                    speculation: SpecMode::Off,
                    max_new_tokens: 64,
                    stop_token_ids: tok.eos_token_ids().to_vec(),
                }
            })
            .collect();
        let out = Runner::new(engine).run(&requests, 64, 256)?;
        for o in out {
            // Only turns the target ended itself.
            if !o.token_ids.last().is_some_and(|t| tok.eos_token_ids().contains(t)) {
                continue;
            }
            let text = tok.decode(&o.token_ids[..o.token_ids.len() - 1])?.trim().to_string();
            let ok = (12..=400).contains(&text.len()) && !text.contains("<|") && !held_out.contains(&text);
            if ok && seen.insert(text.to_lowercase()) && have.len() < count {
                have.push(DraftPrompt {
                    category: "self".into(),
                    prompt: text,
                    followup: None,
                });
            }
        }
        let lines: Vec<String> = have.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
        std::fs::write(path, lines.join("\n") + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!(
        "{}: {} user turns ({:.0} s)",
        path.display(),
        have.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn run(args: DraftDataArgs) -> Result<()> {
    init_threads(args.threads);
    let run_started = Instant::now();
    crate::fetch::ensure_default_model(&args.model)?;
    if args
        .temperatures
        .iter()
        .any(|&t| !(t == 0.0 || (0.001..=2.0).contains(&t)))
    {
        bail!("--temperatures must be 0 (greedy) or between 0.001 and 2");
    }
    let tok = TextTokenizer::from_gguf_file(&args.model)?;
    if args.stats {
        return print_stats(&args.dataset, &tok);
    }
    let model = Model::load(&args.model, WeightFormat::Native)?;
    let mut engine = Engine::new(
        model,
        EngineConfig {
            kv_cache_bytes: 4 << 30,
            ..EngineConfig::default()
        },
    )?;
    let vocab_size = engine.model().config().vocab_size;
    let mut data = DraftDataset::load_or_new(&args.dataset, vocab_size)?;
    let held_out = held_out_texts()?;
    let mut files = args.prompts.clone();
    if let Some(path) = &args.self_prompts {
        if args.self_prompt_count > 0 {
            self_prompts(&mut engine, &tok, path, args.self_prompt_count, &held_out)?;
        }
        files.push(path.clone());
    }
    let mut prompts = Vec::new();
    for f in &files {
        for p in read_prompt_file(f)? {
            for text in std::iter::once(&p.prompt).chain(&p.followup) {
                if held_out.contains(text.trim()) {
                    bail!("{}: {text:?} is a benchmark or calibration prompt", f.display());
                }
            }
            prompts.push(p);
        }
    }
    let budget = |added: usize| {
        if args.limit == 0 {
            usize::MAX
        } else {
            args.limit.saturating_sub(added)
        }
    };
    // Follow-ups on greedy answers already there first (a run cut short by
    // `--minutes` still adds some), then first turns, then the follow-ups
    // those made possible.
    let mut added = 0;
    for (what, first_turns) in [("follow-ups", false), ("answers", true), ("follow-ups", false)] {
        let mut jobs = if first_turns {
            first_turn_jobs(&data, &prompts, &tok, &args)?
        } else {
            followup_jobs(&data, &prompts, &tok, &args)?
        };
        // Each (prompt, temperature) once, though two files may hold the
        // same prompt; in a shuffled order (by group), so a run cut short
        // covers every source.
        let mut queued = HashSet::new();
        jobs.retain(|j| queued.insert((j.request.prompt.clone(), j.temperature.to_bits())));
        jobs.sort_by_key(|j| (j.group, (j.temperature * 1000.0) as u32));
        jobs.truncate(budget(added));
        added += answer(&mut engine, &mut data, jobs, &args, what, run_started)?;
    }
    data.save(&args.dataset, 19)?;
    let held = data.records.iter().filter(|r| r.held_out()).count();
    eprintln!(
        "{}: {} records ({added} new), {} answer tokens; {held} records held out",
        args.dataset.display(),
        data.records.len(),
        data.answer_tokens()
    );
    Ok(())
}
