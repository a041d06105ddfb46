//! `heterospec bench forward`: the cost of the forward pass, side by side with
//! llama.cpp on the same GGUF, token ids and thread count.
//!
//! Measures prefill tok/s (one 512-token chunk), single-stream decode tok/s,
//! and ms per forward of T new tokens (logits for all T, as tree
//! verification needs) after a 256-token context. Medians of repeated runs;
//! both engines run in the same invocation so machine noise hits both.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use heterospec_engine::{RaggedBatch, SamplingParams, SeqRun, WeightFormat};
use heterospec_kv::BlockTable;
use heterospec_router::{ChatMessage, StopCriteria};
use serde::{Deserialize, Serialize};

use crate::local::{EngineArgs, LocalEngine};
use heterospec_engine::spec::SpecMode;

const PREFILL_TOKENS: usize = 512;
const CONTEXT_TOKENS: usize = 256;
const DECODE_TOKENS: usize = 64;
const FORWARD_TS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// Text the benchmark tokenizes for its prompts (repeated to length).
const BENCH_TEXT: &str = "Speculative decoding drafts several tokens cheaply and verifies them with one \
forward pass of the target model. The verification costs little more than a single step when the \
forward pass reuses each weight across all the tokens of the batch, which is why the cost curve of \
the forward pass decides how large a draft tree can be before it stops paying for itself. ";

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Forward-pass cost: prefill, decode, and ms per forward of T tokens.
    Forward(ForwardArgs),
    /// Served throughput and latency at several concurrency levels.
    Serve(crate::bench_serve::ServeBenchArgs),
    /// Speculation: plain, chain, fixed tree and HeteroSpec side by side.
    Spec(crate::bench_spec::SpecBenchArgs),
    /// Many concurrent streams for a while, some cancelled: nothing lost.
    Soak(crate::bench_soak::SoakArgs),
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    #[arg(long, env = "HETEROSPEC_MODEL", default_value_os_t = crate::fetch::default_model_path())]
    model: PathBuf,
    /// Runs per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Python with llama-cpp-python installed, for the side-by-side column
    /// ("none" to skip; default: python3 if it can import llama_cpp).
    #[arg(long, env = "HETEROSPEC_LLAMA_PYTHON")]
    llama_python: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also draw the cost curves into this PNG (runs
    /// scripts/plot_forward.py; needs python3 with matplotlib).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Further weight formats measured in the same run, for comparison
    /// ("" for none).
    #[arg(long, value_delimiter = ',', default_value = "q8_0,candle-q8_0")]
    compare: Vec<String>,
    /// Only time forwards of this many new tokens after the context,
    /// `--repeats` times, and print the median (for profiling one shape).
    #[arg(long)]
    only_t: Option<usize>,
    /// With --device cuda: time the device forward of a known shape with
    /// weights made on the GPU, no file (llama-3-8b, llama-3-1b,
    /// smollm2-135m): T = 1..64 after a 256-token context, decode steps of
    /// 1, 16 and 64 sequences, and the device's copy bandwidth.
    #[arg(long)]
    synthetic: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
struct ForwardReport {
    decode_tokens_per_second: f64,
    prefill_tokens_per_second: f64,
    /// T -> milliseconds per forward of T new tokens.
    forward_ms: BTreeMap<String, f64>,
}

/// What the machine allows and what the default forward reaches of it.
#[derive(Debug, Serialize, Clone)]
struct Roofline {
    /// Int8 multiply-adds per second of a tight dot-product loop, all threads.
    int8_macs_per_second: Option<f64>,
    /// Bytes per second all threads stream from memory.
    stream_bytes_per_second: f64,
    /// Multiply-adds of the linear layers in a forward of one token.
    macs_per_token: f64,
    /// The GGUF's size: the weights one forward reads.
    weight_bytes: f64,
}

impl Roofline {
    fn measure(config: &heterospec_engine::ModelConfig, model: &Path) -> Result<Self> {
        let (h, q, kv, ff) = (
            config.hidden_size as f64,
            config.q_size() as f64,
            config.kv_size() as f64,
            config.intermediate_size as f64,
        );
        let per_layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * ff;
        Ok(Roofline {
            int8_macs_per_second: heterospec_engine::qgemm::peak::int8_macs_per_second(),
            stream_bytes_per_second: heterospec_engine::qgemm::peak::stream_bytes_per_second(),
            macs_per_token: config.num_layers as f64 * per_layer + config.vocab_size as f64 * h,
            weight_bytes: std::fs::metadata(model)?.len() as f64,
        })
    }

    /// One forward of `t` tokens taking `ms`: its int8 rate and share of
    /// the peak, and its weight-read rate and share of the stream.
    fn line(&self, t: usize, ms: f64) -> String {
        let secs = ms / 1e3;
        let macs = self.macs_per_token * t as f64 / secs;
        let bytes = self.weight_bytes / secs;
        let int8 = match self.int8_macs_per_second {
            Some(peak) => format!("{:.0} GMAC/s ({:.0}% of int8 peak)", macs / 1e9, 100.0 * macs / peak),
            None => format!("{:.0} GMAC/s", macs / 1e9),
        };
        format!(
            "T={t}: {int8}, weights read at {:.1} GB/s ({:.0}% of stream)",
            bytes / 1e9,
            100.0 * bytes / self.stream_bytes_per_second
        )
    }
}

#[derive(Debug, Serialize)]
struct BenchOutput {
    threads: usize,
    weight_format: String,
    heterospec: ForwardReport,
    /// Other weight formats of ours, by name.
    variants: BTreeMap<String, ForwardReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    llama_cpp: Option<ForwardReport>,
    roofline: Roofline,
    #[serde(flatten)]
    headline: ForwardReport,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Forward(args) => forward(args),
        BenchCommand::Serve(args) => crate::bench_serve::run(args),
        BenchCommand::Spec(args) => crate::bench_spec::run(args),
        BenchCommand::Soak(args) => crate::bench_soak::run(args),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn forward(mut args: ForwardArgs) -> Result<()> {
    // The forward alone: no drafter, no cost-curve warm-up.
    args.engine.drafter = "none".into();
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    if let Some(name) = &args.synthetic {
        return crate::bench_synthetic::run(name, args.engine.device, args.repeats, args.json);
    }
    let threads = if args.engine.threads > 0 {
        args.engine.threads
    } else {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    };
    let mut local = LocalEngine::load(&args.model, &args.engine)?;
    let mut bench_ids = Vec::new();
    while bench_ids.len() < PREFILL_TOKENS {
        bench_ids.extend(local.tokenizer.encode(BENCH_TEXT)?);
    }
    bench_ids.truncate(PREFILL_TOKENS);
    let context_ids = bench_ids[..CONTEXT_TOKENS].to_vec();
    let chat = local.tokenizer.apply_chat_template(&[ChatMessage::new(
        "user",
        "Write a short story about a lighthouse keeper.",
    )])?;
    let decode_prompt_ids = local.tokenizer.encode(&chat)?;

    if let Some(t) = args.only_t {
        let ms = forward_ms(&mut local, &bench_ids, t, args.repeats)?;
        println!("T={t}: {ms:.2} ms per forward (median of {})", args.repeats);
        return Ok(());
    }
    let roofline = Roofline::measure(local.engine.model().config(), &args.model)?;
    let ours = measure(&mut local, &bench_ids, &decode_prompt_ids, args.repeats)?;
    drop(local);
    let mut variants = BTreeMap::new();
    for name in args.compare.iter().filter(|n| !n.is_empty()) {
        let format: WeightFormat = name.parse().map_err(anyhow::Error::msg)?;
        let engine = EngineArgs {
            weight_format: format,
            ..args.engine.clone()
        };
        let mut local = LocalEngine::load(&args.model, &engine)?;
        let report = measure(&mut local, &bench_ids, &decode_prompt_ids, args.repeats)?;
        variants.insert(format.as_str().to_string(), report);
    }
    let theirs = match llama_python(args.llama_python.as_deref()) {
        Some(python) => Some(measure_llama_cpp(
            &python,
            &args.model,
            threads,
            &bench_ids,
            &context_ids,
            &decode_prompt_ids,
            args.repeats,
        )?),
        None => {
            eprintln!("llama.cpp column skipped: no python with llama_cpp (see scripts/golden_reference.py)");
            None
        }
    };
    let out = BenchOutput {
        threads,
        weight_format: args.engine.weight_format.as_str().to_string(),
        heterospec: ours.clone(),
        variants,
        llama_cpp: theirs.clone(),
        roofline,
        headline: ours,
    };
    if let Some(png) = &args.plot {
        plot(&out, png)?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    print_table(&out);
    Ok(())
}

fn plot(out: &BenchOutput, png: &Path) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/plot_forward.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(png)
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run python3 {}", script.display()))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(serde_json::to_string(out)?.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("plotting failed ({status}); is matplotlib installed (pip install matplotlib)?");
    }
    eprintln!("cost curves written to {}", png.display());
    Ok(())
}

fn print_table(out: &BenchOutput) {
    println!(
        "forward benchmark: {} threads, weights {}",
        out.threads, out.weight_format
    );
    let main = format!("heterospec {}", out.weight_format);
    let variants: Vec<(String, &ForwardReport)> = out
        .variants
        .iter()
        .map(|(k, r)| (format!("heterospec {k}"), r))
        .collect();
    let rows: Vec<(&str, &ForwardReport)> = std::iter::once((main.as_str(), &out.heterospec))
        .chain(variants.iter().map(|(k, r)| (k.as_str(), *r)))
        .chain(out.llama_cpp.as_ref().map(|r| ("llama.cpp", r)))
        .collect();
    print!("| engine | decode tok/s | prefill tok/s (512) |");
    for t in FORWARD_TS {
        print!(" T={t} ms |");
    }
    println!(" T=16 / T=1 |");
    println!("|---|---|---|{}---|", "---|".repeat(FORWARD_TS.len()));
    for (name, r) in &rows {
        print!(
            "| {name} | {:.1} | {:.0} |",
            r.decode_tokens_per_second, r.prefill_tokens_per_second
        );
        for t in FORWARD_TS {
            print!(" {:.1} |", r.forward_ms[&t.to_string()]);
        }
        println!(" {:.1}x |", r.forward_ms["16"] / r.forward_ms["1"]);
    }
    let ours = &out.heterospec;
    let r = &out.roofline;
    println!(
        "roofline: int8 peak {}, memory stream {:.1} GB/s ({} threads)",
        r.int8_macs_per_second
            .map_or("n/a".to_string(), |p| format!("{:.0} GMAC/s", p / 1e9)),
        r.stream_bytes_per_second / 1e9,
        out.threads
    );
    for t in [1, 16] {
        println!("{main} {}", r.line(t, ours.forward_ms[&t.to_string()]));
    }
    for (name, other) in variants
        .iter()
        .map(|(k, r)| (k.as_str(), *r))
        .chain(out.llama_cpp.as_ref().map(|r| ("llama.cpp", r)))
    {
        println!(
            "ratios {main} / {name}: decode {:.2}x, prefill {:.2}x, T=16 forward time {:.2}x",
            ours.decode_tokens_per_second / other.decode_tokens_per_second,
            ours.prefill_tokens_per_second / other.prefill_tokens_per_second,
            ours.forward_ms["16"] / other.forward_ms["16"]
        );
    }
}

/// Seconds of one forward of `ids` after `num_cached` tokens of `table`;
/// `all_logits` as a verify forward (prefill wants the last row's only).
fn time_forward(
    local: &mut LocalEngine,
    table: &BlockTable,
    ids: &[u32],
    num_cached: usize,
    all_logits: bool,
) -> Result<f64> {
    let mut run = SeqRun::causal_from_table(ids.to_vec(), num_cached, table, local.pool.block_size())?;
    if all_logits {
        run = run.with_all_logits();
    }
    let batch = RaggedBatch { seqs: vec![run] };
    let start = Instant::now();
    local.engine.forward(&batch)?;
    Ok(start.elapsed().as_secs_f64())
}

/// Median ms of `repeats` forwards of `t` new tokens (all logits) after
/// the context (a fresh block table of its own).
fn forward_ms(local: &mut LocalEngine, bench_ids: &[u32], t: usize, repeats: usize) -> Result<f64> {
    let mut table = BlockTable::new();
    local
        .pool
        .allocate_slots(&mut table, CONTEXT_TOKENS + t)
        .context("KV cache too small for the benchmark")?;
    let ids = &bench_ids[CONTEXT_TOKENS..CONTEXT_TOKENS + t];
    let timed = (|| {
        time_forward(local, &table, &bench_ids[..CONTEXT_TOKENS], 0, false)?;
        time_forward(local, &table, ids, CONTEXT_TOKENS, true)?; // warm-up
        (0..repeats)
            .map(|_| time_forward(local, &table, ids, CONTEXT_TOKENS, true))
            .collect::<Result<Vec<_>>>()
    })();
    local.pool.free_table(&mut table);
    Ok(1000.0 * median(timed?))
}

fn measure(
    local: &mut LocalEngine,
    bench_ids: &[u32],
    decode_prompt_ids: &[u32],
    repeats: usize,
) -> Result<ForwardReport> {
    let mut table = BlockTable::new();
    local
        .pool
        .allocate_slots(&mut table, PREFILL_TOKENS)
        .context("KV cache too small for the benchmark")?;
    let prefill = (|| {
        time_forward(local, &table, bench_ids, 0, false)?; // warm-up
        (0..repeats)
            .map(|_| time_forward(local, &table, bench_ids, 0, false))
            .collect::<Result<Vec<_>>>()
    })();
    local.pool.free_table(&mut table);
    let prefill = median(prefill?);
    let mut forward_ms_by_t = BTreeMap::new();
    for t in FORWARD_TS {
        forward_ms_by_t.insert(t.to_string(), forward_ms(local, bench_ids, t, repeats)?);
    }

    let generation = local.generate(
        decode_prompt_ids.to_vec(),
        SamplingParams::greedy(),
        SpecMode::Off,
        StopCriteria {
            max_new_tokens: DECODE_TOKENS + 1,
            stop: vec![],
            ignore_eos: true,
        },
        |_| {},
    )?;
    Ok(ForwardReport {
        decode_tokens_per_second: generation.decode_tokens_per_second(),
        prefill_tokens_per_second: PREFILL_TOKENS as f64 / prefill,
        forward_ms: forward_ms_by_t,
    })
}

fn llama_python(choice: Option<&str>) -> Option<String> {
    match choice {
        Some("none") => None,
        Some(python) => Some(python.to_string()),
        None => {
            let ok = Command::new("python3")
                .args(["-c", "import llama_cpp"])
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            ok.then(|| "python3".to_string())
        }
    }
}

fn measure_llama_cpp(
    python: &str,
    model: &Path,
    threads: usize,
    bench_ids: &[u32],
    context_ids: &[u32],
    decode_prompt_ids: &[u32],
    repeats: usize,
) -> Result<ForwardReport> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_llamacpp.py");
    let input = serde_json::json!({
        "model": model,
        "threads": threads,
        "prefill_ids": bench_ids,
        "context_ids": context_ids,
        "decode_prompt_ids": decode_prompt_ids,
        "decode_tokens": DECODE_TOKENS,
        "ts": FORWARD_TS,
        "repeats": repeats,
    });
    let mut child = Command::new(python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {python} {}", script.display()))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.to_string().as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("llama.cpp benchmark failed ({})", output.status);
    }
    serde_json::from_slice(&output.stdout).context("llama.cpp benchmark printed no JSON")
}
