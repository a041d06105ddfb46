//! `heterospec bench serve`: throughput and latency of the served path at
//! several concurrency levels, plus in-process generation at concurrency 1
//! on the same prompts (the gRPC and scheduling overhead), in one run.
//!
//! Each level runs `max(c, --min-requests)` chat requests from the prompt
//! file through `c` concurrent clients; every request generates exactly
//! `--max-new-tokens` tokens (`ignore_eos`) so levels are comparable.
//! `--compare-overlap` starts two servers, the router overlapping every
//! step it can (`--overlap-steps on`) and none (`off`), and runs each
//! level on both back to back (alternating which goes first), so the two
//! are compared under the same machine load.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use heterospec_engine::runner::TokenRequest;
use heterospec_engine::SamplingParams;
use heterospec_proto::v1 as pb;
use heterospec_proto::v1::generation_client::GenerationClient;
use heterospec_router::{ChatMessage, StopCriteria, TextTokenizer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::local::{EngineArgs, LocalEngine};
use heterospec_engine::spec::SpecMode;

#[derive(Debug, Clone, Args)]
pub struct ServeBenchArgs {
    /// A running server; without it the bench starts `heterospec serve`.
    #[arg(long)]
    server: Option<String>,
    /// The running server's router metrics (`http://host:port/metrics`),
    /// for the engines' idle share per level; the server the bench starts
    /// is read on its own.
    #[arg(long)]
    metrics_url: Option<String>,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// JSON lines with a `prompt` (and a `category`) each.
    #[arg(long, default_value = "bench/prompts.jsonl")]
    prompts: PathBuf,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Fewest requests per level.
    #[arg(long, default_value_t = 8)]
    min_requests: usize,
    #[arg(long, env = "HETEROSPEC_MODEL", default_value_os_t = crate::fetch::default_model_path())]
    model: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Run every level on two servers, `--overlap-steps on` and `off`.
    #[arg(long, conflicts_with = "server")]
    compare_overlap: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Debug, Deserialize)]
pub struct PromptRecord {
    #[serde(default)]
    pub category: String,
    pub prompt: String,
}

/// Greedy token requests for the prompts of a file, each rendered as one
/// user turn of the chat template, ending at end-of-sequence.
pub fn chat_requests(
    tokenizer: &TextTokenizer,
    path: &Path,
    max_new_tokens: usize,
    speculation: SpecMode,
) -> Result<Vec<TokenRequest>> {
    read_prompts(path)?
        .iter()
        .map(|p| {
            let text = tokenizer.apply_chat_template(&[ChatMessage::new("user", p.prompt.clone())])?;
            Ok(TokenRequest {
                prompt: tokenizer.encode(&text)?,
                sampling: SamplingParams::greedy(),
                speculation,
                max_new_tokens,
                stop_token_ids: tokenizer.eos_token_ids().to_vec(),
            })
        })
        .collect()
}

pub fn read_prompts(path: &Path) -> Result<Vec<PromptRecord>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let prompts = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}: not a prompt record", path.display(), i + 1))
        })
        .collect::<Result<Vec<PromptRecord>>>()?;
    if prompts.is_empty() {
        bail!("{} has no prompts", path.display());
    }
    Ok(prompts)
}

#[derive(Debug, Serialize)]
struct LevelReport {
    /// The router's `--overlap-steps` (with `--compare-overlap`: on, off).
    #[serde(skip_serializing_if = "Option::is_none")]
    overlap_steps: Option<bool>,
    concurrency: usize,
    requests: usize,
    tokens: usize,
    seconds: f64,
    tokens_per_second: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    itl_p50_ms: f64,
    itl_p99_ms: f64,
    /// Share of the level's time the engines spent outside steps (one
    /// minus their reported busy time over the wall time, per engine), and
    /// the share of it with no Step call in flight (the router planning,
    /// detokenizing, streaming), both of the wall time. Where the server's
    /// metrics were read.
    #[serde(skip_serializing_if = "Option::is_none")]
    engine_idle: Option<Idle>,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Idle {
    engine_idle_share: f64,
    between_steps_share: f64,
}

/// What the router's `/metrics` says of the engines so far: their busy
/// seconds, the Step calls' seconds, and how many engines report.
async fn engine_time(metrics_url: &str) -> Result<(f64, f64, usize)> {
    let page = crate::scrape::page(metrics_url).await?;
    Ok((
        crate::scrape::sum(&page, "heterospec_engine_busy_seconds_sum", ""),
        crate::scrape::sum(&page, "heterospec_engine_step_seconds_sum", ""),
        crate::scrape::series(&page, "heterospec_engine_busy_seconds_sum"),
    ))
}

#[derive(Debug, Serialize)]
struct ServeBenchReport {
    max_new_tokens: usize,
    in_process_tokens_per_second: f64,
    levels: Vec<LevelReport>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn request(prompt: &str, max_new_tokens: usize) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Messages(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: prompt.into(),
            }],
        })),
        stopping: Some(pb::StoppingCriteria {
            max_new_tokens: Some(max_new_tokens as i32),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct RequestTiming {
    tokens: usize,
    ttft: f64,
    gaps: Vec<f64>,
}

async fn timed_request(
    client: &mut GenerationClient<tonic::transport::Channel>,
    req: pb::GenerateRequest,
) -> Result<RequestTiming> {
    let start = Instant::now();
    let mut stream = client.generate(req).await?.into_inner();
    let mut timing = RequestTiming {
        tokens: 0,
        ttft: 0.0,
        gaps: Vec::new(),
    };
    let mut last: Option<Instant> = None;
    while let Some(resp) = stream.message().await? {
        let n = resp.token_ids.len();
        if n == 0 {
            continue;
        }
        let now = Instant::now();
        match last {
            None => timing.ttft = (now - start).as_secs_f64(),
            Some(t) => {
                let gap = (now - t).as_secs_f64() / n as f64;
                timing.gaps.extend(std::iter::repeat_n(gap, n));
            }
        }
        last = Some(now);
        timing.tokens += n;
    }
    Ok(timing)
}

async fn run_level(
    url: &str,
    metrics_url: Option<&str>,
    prompts: &[PromptRecord],
    concurrency: usize,
    args: &ServeBenchArgs,
) -> Result<LevelReport> {
    let num_requests = concurrency.max(args.min_requests);
    let next = Arc::new(AtomicUsize::new(0));
    let client = GenerationClient::connect(url.to_string()).await?;
    let before = match metrics_url {
        Some(m) => Some(engine_time(m).await?),
        None => None,
    };
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let mut client = client.clone();
        let next = next.clone();
        let reqs: Vec<pb::GenerateRequest> = (0..num_requests)
            .map(|i| request(&prompts[i % prompts.len()].prompt, args.max_new_tokens))
            .collect();
        workers.push(tokio::spawn(async move {
            let mut timings = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= reqs.len() {
                    return Ok::<_, anyhow::Error>(timings);
                }
                timings.push(timed_request(&mut client, reqs[i].clone()).await?);
            }
        }));
    }
    let mut timings = Vec::new();
    for w in workers {
        timings.extend(w.await??);
    }
    let seconds = start.elapsed().as_secs_f64();
    let engine_idle = match (metrics_url, before) {
        (Some(m), Some((busy0, calls0, _))) => {
            let (busy, calls, engines) = engine_time(m).await?;
            let wall = seconds * engines.max(1) as f64;
            Some(Idle {
                engine_idle_share: 1.0 - (busy - busy0) / wall,
                between_steps_share: 1.0 - (calls - calls0) / wall,
            })
        }
        _ => None,
    };
    let tokens: usize = timings.iter().map(|t| t.tokens).sum();
    let mut ttft: Vec<f64> = timings.iter().map(|t| t.ttft * 1000.0).collect();
    let mut itl: Vec<f64> = timings.iter().flat_map(|t| t.gaps.iter().map(|g| g * 1000.0)).collect();
    ttft.sort_by(f64::total_cmp);
    itl.sort_by(f64::total_cmp);
    Ok(LevelReport {
        overlap_steps: None,
        concurrency,
        requests: timings.len(),
        tokens,
        seconds,
        tokens_per_second: tokens as f64 / seconds,
        ttft_p50_ms: percentile(&ttft, 0.5),
        ttft_p99_ms: percentile(&ttft, 0.99),
        itl_p50_ms: percentile(&itl, 0.5),
        itl_p99_ms: percentile(&itl, 0.99),
        engine_idle,
    })
}

/// In-process generation of the first `min_requests` prompts, one at a time.
fn in_process(prompts: &[PromptRecord], args: &ServeBenchArgs) -> Result<f64> {
    let mut local = LocalEngine::load(&args.model, &args.engine)?;
    let mut start = Instant::now();
    let mut tokens = 0;
    // Request 0 warms up (page faults, caches) and is not timed.
    for i in 0..=args.min_requests {
        if i == 1 {
            start = Instant::now();
            tokens = 0;
        }
        let chat = local
            .tokenizer
            .apply_chat_template(&[ChatMessage::new("user", prompts[i % prompts.len()].prompt.clone())])?;
        let ids = local.tokenizer.encode(&chat)?;
        let g = local.generate(
            ids,
            SamplingParams::greedy(),
            SpecMode::Auto,
            StopCriteria {
                max_new_tokens: args.max_new_tokens,
                stop: vec![],
                ignore_eos: true,
            },
            |_| {},
        )?;
        tokens += g.token_ids.len();
    }
    Ok(tokens as f64 / start.elapsed().as_secs_f64())
}

/// `heterospec serve` started on free ports with `extra` flags: the child
/// (killed when dropped), its public address and its metrics address.
pub async fn launch_serve(
    model: &Path,
    threads: usize,
    extra: &[std::ffi::OsString],
) -> Result<(tokio::process::Child, String, String)> {
    let port = || -> Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
    let metrics = format!("127.0.0.1:{}", port()?);
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{}", port()?)])
        .args(["--metrics-listen", &metrics])
        .arg("--model")
        .arg(model)
        .args(["--threads", &threads.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    while let Some(line) = lines.next_line().await? {
        if let Some(addr) = line.split(" listening on ").nth(1) {
            let addr = addr.trim().to_string();
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok((child, addr, metrics));
        }
    }
    bail!("heterospec serve exited before listening")
}

pub fn run(args: ServeBenchArgs) -> Result<()> {
    let prompts = read_prompts(&args.prompts)?;
    if args.concurrency.is_empty()
        || args.concurrency.contains(&0)
        || args.min_requests == 0
        || args.max_new_tokens == 0
    {
        bail!("--concurrency levels, --min-requests and --max-new-tokens must be positive");
    }
    let in_process_tps = in_process(&prompts, &args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let levels = rt.block_on(async {
        let variants: Vec<Option<bool>> = match args.compare_overlap {
            true => vec![Some(true), Some(false)],
            false => vec![None],
        };
        // (child, public URL, metrics URL) per variant.
        let mut servers = Vec::new();
        for &overlap in &variants {
            servers.push(match &args.server {
                Some(url) => (None, url.clone(), args.metrics_url.clone()),
                None => {
                    // The engine settings of the in-process baseline too.
                    let mut extra: Vec<std::ffi::OsString> = vec!["--max-concurrent-requests".into(), "1024".into()];
                    extra.extend(args.engine.to_cli_args().into_iter().map(Into::into));
                    if let Some(on) = overlap {
                        let value = if on { "on" } else { "off" };
                        extra.extend(["--overlap-steps".into(), value.into()]);
                    }
                    let (child, addr, metrics) = launch_serve(&args.model, args.engine.threads, &extra).await?;
                    (
                        Some(child),
                        format!("http://{addr}"),
                        Some(format!("http://{metrics}/metrics")),
                    )
                }
            });
        }
        // One untimed request warms each served path too (retried until
        // the router has reached its engine).
        let warm = ServeBenchArgs {
            min_requests: 1,
            ..args.clone()
        };
        for (_, url, _) in &servers {
            let deadline = Instant::now() + Duration::from_secs(60);
            while let Err(e) = run_level(url, None, &prompts, 1, &warm).await {
                if Instant::now() > deadline {
                    return Err(e.context("the server did not become ready"));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let mut levels = Vec::new();
        for (i, &c) in args.concurrency.iter().enumerate() {
            let mut order: Vec<usize> = (0..servers.len()).collect();
            if i % 2 == 1 {
                order.reverse();
            }
            let mut reports: Vec<(usize, LevelReport)> = Vec::new();
            for k in order {
                let (_, url, metrics_url) = &servers[k];
                let mut report = run_level(url, metrics_url.as_deref(), &prompts, c, &args).await?;
                report.overlap_steps = variants[k];
                reports.push((k, report));
            }
            reports.sort_by_key(|(k, _)| *k);
            levels.extend(reports.into_iter().map(|(_, r)| r));
        }
        for (child, _, _) in &mut servers {
            let Some(child) = child.as_mut() else { continue };
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) on our own child; it shuts its children down.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        }
        Ok::<_, anyhow::Error>(levels)
    })?;
    let report = ServeBenchReport {
        max_new_tokens: args.max_new_tokens,
        in_process_tokens_per_second: in_process_tps,
        levels,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let base = |overlap: Option<bool>| {
        report
            .levels
            .iter()
            .find(|l| l.concurrency == 1 && l.overlap_steps == overlap)
            .map(|l| l.tokens_per_second)
    };
    println!("serve benchmark: {} new tokens per request", report.max_new_tokens);
    let (variant_head, variant_rule) = match args.compare_overlap {
        true => ("| overlap steps ", "|---"),
        false => ("", ""),
    };
    println!(
        "{variant_head}| concurrency | requests | aggregate tok/s | vs c=1 | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | engine idle | no step in flight |"
    );
    println!("{variant_rule}|---|---|---|---|---|---|---|---|---|---|");
    for l in &report.levels {
        let ratio = base(l.overlap_steps)
            .map(|b| format!("{:.2}x", l.tokens_per_second / b))
            .unwrap_or_default();
        let variant = match l.overlap_steps {
            Some(on) => format!("| {} ", if on { "on" } else { "off" }),
            None => String::new(),
        };
        let (idle, between) = l.engine_idle.map_or((String::new(), String::new()), |i| {
            (
                format!("{:.0} %", 100.0 * i.engine_idle_share),
                format!("{:.0} %", 100.0 * i.between_steps_share),
            )
        });
        println!(
            "{variant}| {} | {} | {:.1} | {ratio} | {:.0} | {:.0} | {:.1} | {:.1} | {idle} | {between} |",
            l.concurrency, l.requests, l.tokens_per_second, l.ttft_p50_ms, l.ttft_p99_ms, l.itl_p50_ms, l.itl_p99_ms
        );
    }
    if args.compare_overlap {
        // Levels come in pairs (on, off), in the order they ran.
        let ratios: Vec<String> = report
            .levels
            .chunks_exact(2)
            .map(|pair| {
                format!(
                    "c={} {:.3}x",
                    pair[0].concurrency,
                    pair[0].tokens_per_second / pair[1].tokens_per_second
                )
            })
            .collect();
        println!("overlap on / off: {}", ratios.join(", "));
    }
    if let Some(b) = base(report.levels.first().and_then(|l| l.overlap_steps)) {
        println!(
            "in-process generate, c=1: {:.1} tok/s; served c=1 / in-process = {:.3}",
            report.in_process_tokens_per_second,
            b / report.in_process_tokens_per_second
        );
    }
    Ok(())
}
