//! `heterospec bench soak`: many concurrent streams for a while, a share of
//! them cancelled midway, against a served router (started here unless
//! `--server` is given; TLS and bearer tokens if asked). It reports requests
//! done, cancelled and failed, the KV blocks still in use once all ended
//! (leaked), and the router's memory before and after, and exits non-zero
//! on any loss: a failed request, a stream that ended without a finish
//! reason, or a leaked block.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use heterospec_proto::v1 as pb;
use heterospec_proto::v1::generation_client::GenerationClient;
use rand::Rng;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::bench_serve::{launch_serve, read_prompts};

#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// A running server (with --metrics-url for the leak check); without
    /// it the soak starts `heterospec serve`.
    #[arg(long)]
    server: Option<String>,
    /// The router's Prometheus endpoint of a --server.
    #[arg(long)]
    metrics_url: Option<String>,
    /// How long to keep the streams going: seconds, or with s/m.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Share of requests the client cancels after a random number of tokens.
    #[arg(long, default_value_t = 0.2)]
    cancel_rate: f64,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    #[arg(long, default_value = "bench/prompts.jsonl")]
    prompts: PathBuf,
    #[arg(long, env = "HETEROSPEC_MODEL", default_value_os_t = crate::fetch::default_model_path())]
    model: PathBuf,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// CA (PEM) of the server's certificate: connect with TLS.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Certificate and key the started server uses (with --tls-ca).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Bearer token sent with every request.
    #[arg(long, env = "HETEROSPEC_AUTH_TOKEN")]
    auth_token: Option<String>,
    /// Tokens file the started server uses.
    #[arg(long)]
    auth_tokens_file: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = match s.strip_suffix('m') {
        Some(n) => (n, 60.0),
        None => (s.strip_suffix('s').unwrap_or(s), 1.0),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 120s, 2m)"))?;
    if !value.is_finite() || value <= 0.0 {
        return Err("the duration must be positive".into());
    }
    Ok(Duration::from_secs_f64(value * unit))
}

#[derive(Default)]
struct Counts {
    done: AtomicUsize,
    cancelled: AtomicUsize,
    failed: AtomicUsize,
    /// Streams that ended without an error and without a finish reason.
    truncated: AtomicUsize,
    tokens: AtomicUsize,
}

/// The started `heterospec serve` and what the soak reads from it.
struct Launched {
    child: tokio::process::Child,
    url: String,
    metrics_url: String,
}

async fn launch(args: &SoakArgs) -> Result<Launched> {
    let mut extra: Vec<std::ffi::OsString> = vec!["--max-concurrent-requests".into(), "4096".into()];
    for (flag, path) in [
        ("--tls-cert", &args.tls_cert),
        ("--tls-key", &args.tls_key),
        ("--auth-tokens-file", &args.auth_tokens_file),
    ] {
        if let Some(p) = path {
            extra.extend([flag.into(), p.into()]);
        }
    }
    let (child, addr, metrics) = launch_serve(&args.model, args.threads, &extra).await?;
    let scheme = if args.tls_ca.is_some() { "https" } else { "http" };
    Ok(Launched {
        child,
        url: format!("{scheme}://{addr}"),
        metrics_url: format!("http://{metrics}/metrics"),
    })
}

/// The router process under `serve` (its child whose command is `router`).
fn router_pid(serve_pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{serve_pid}/task/{serve_pid}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|pid: &u32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|&b| b == 0).any(|arg| arg == b"router"))
                .unwrap_or(false)
        })
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

async fn connect(url: &str, args: &SoakArgs) -> Result<GenerationClient<Channel>> {
    let mut endpoint = Channel::from_shared(url.to_string())?;
    if let Some(ca) = &args.tls_ca {
        let ca = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        endpoint = endpoint.tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))?;
    }
    Ok(GenerationClient::new(endpoint.connect().await?))
}

fn request(prompt: &str, args: &SoakArgs) -> tonic::Request<pb::GenerateRequest> {
    let mut request = tonic::Request::new(pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Messages(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: prompt.into(),
            }],
        })),
        stopping: Some(pb::StoppingCriteria {
            max_new_tokens: Some(args.max_new_tokens as i32),
            ..Default::default()
        }),
        ..Default::default()
    });
    if let Some(token) = &args.auth_token {
        if let Ok(value) = format!("Bearer {token}").parse() {
            request.metadata_mut().insert("authorization", value);
        }
    }
    request
}

/// One client: requests back to back until `until`, some cancelled.
async fn client_loop(
    mut client: GenerationClient<Channel>,
    prompts: Arc<Vec<String>>,
    args: Arc<SoakArgs>,
    counts: Arc<Counts>,
    until: Instant,
    seed: usize,
) {
    let mut i = seed;
    while Instant::now() < until {
        i += 1;
        let prompt = &prompts[i % prompts.len()];
        let cancel_after = {
            let mut rng = rand::rng();
            (rng.random::<f64>() < args.cancel_rate).then(|| rng.random_range(1..=args.max_new_tokens.max(1)))
        };
        let mut stream = match client.generate(request(prompt, &args)).await {
            Ok(s) => s.into_inner(),
            Err(_) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let mut tokens = 0;
        let mut finished = false;
        let outcome = loop {
            match stream.message().await {
                Ok(Some(r)) => {
                    tokens += r.token_ids.len();
                    finished |= r.finish_reason != 0;
                    if cancel_after.is_some_and(|n| tokens >= n) && !finished {
                        break &counts.cancelled; // dropping the stream cancels it
                    }
                }
                Ok(None) if finished => break &counts.done,
                Ok(None) => break &counts.truncated,
                Err(_) => break &counts.failed,
            }
        };
        outcome.fetch_add(1, Ordering::Relaxed);
        counts.tokens.fetch_add(tokens, Ordering::Relaxed);
    }
}

pub fn run(args: SoakArgs) -> Result<()> {
    if args.concurrency == 0 || args.max_new_tokens == 0 || !(0.0..=1.0).contains(&args.cancel_rate) {
        bail!("--concurrency and --max-new-tokens must be positive, --cancel-rate in [0, 1]");
    }
    let prompts: Arc<Vec<String>> = Arc::new(read_prompts(&args.prompts)?.into_iter().map(|p| p.prompt).collect());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut launched = match &args.server {
            Some(_) => None,
            None => Some(launch(&args).await?),
        };
        let url = launched.as_ref().map_or_else(|| args.server.clone().unwrap_or_default(), |l| l.url.clone());
        let metrics_url = launched.as_ref().map(|l| l.metrics_url.clone()).or(args.metrics_url.clone());
        let pid = launched.as_ref().and_then(|l| l.child.id()).and_then(|serve| {
            // The router starts after its engines: wait for it to appear.
            (0..100).find_map(|_| router_pid(serve).or_else(|| {
                std::thread::sleep(Duration::from_millis(100));
                None
            }))
        });
        // Ready: one request through (the router reaches its engine first).
        let deadline = Instant::now() + Duration::from_secs(120);
        let client = loop {
            if let Ok(mut c) = connect(&url, &args).await {
                if let Ok(s) = c.generate(request(&prompts[0], &args)).await {
                    let mut s = s.into_inner();
                    while let Ok(Some(_)) = s.message().await {}
                    break c;
                }
            }
            if Instant::now() > deadline {
                bail!("the server at {url} did not answer");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let rss_before = pid.and_then(rss_mib);
        let counts = Arc::new(Counts::default());
        let args = Arc::new(args);
        let start = Instant::now();
        let until = start + args.duration;
        let tasks: Vec<_> = (0..args.concurrency)
            .map(|i| tokio::spawn(client_loop(client.clone(), prompts.clone(), args.clone(), counts.clone(), until, i * 7)))
            .collect();
        for t in tasks {
            t.await?;
        }
        let elapsed = start.elapsed().as_secs_f64();
        // Every request has ended: blocks in use should drain to zero.
        let mut leaked = None;
        if let Some(m) = &metrics_url {
            let settle = Instant::now() + Duration::from_secs(10);
            loop {
                let used = crate::scrape::sum(&crate::scrape::page(m).await?, "heterospec_kv_blocks", "state=\"used\"");
                leaked = Some(used);
                if used == 0.0 || Instant::now() > settle {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let rss_after = pid.and_then(rss_mib);
        if let Some(l) = launched.as_mut() {
            if let Some(pid) = l.child.id() {
                // SAFETY: kill(2) on our own child; it shuts its children down.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
            let _ = tokio::time::timeout(Duration::from_secs(30), l.child.wait()).await;
        }
        let get = |c: &AtomicUsize| c.load(Ordering::Relaxed);
        let (done, cancelled, failed, truncated) = (get(&counts.done), get(&counts.cancelled), get(&counts.failed), get(&counts.truncated));
        let mib = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0} MiB"));
        println!(
            "soak: {:.0} s, {} streams, cancel rate {}{}{}",
            elapsed,
            args.concurrency,
            args.cancel_rate,
            if args.tls_ca.is_some() { ", TLS" } else { "" },
            if args.auth_token.is_some() { ", bearer token" } else { "" }
        );
        println!("| requests done | cancelled | failed | ended without finish | tokens | tok/s | KV blocks leaked | router RSS before | after |");
        println!("|---|---|---|---|---|---|---|---|---|");
        println!(
            "| {done} | {cancelled} | {failed} | {truncated} | {} | {:.1} | {} | {} | {} |",
            get(&counts.tokens),
            get(&counts.tokens) as f64 / elapsed,
            leaked.map_or("n/a".to_string(), |l| format!("{l:.0}")),
            mib(rss_before),
            mib(rss_after)
        );
        if failed > 0 || truncated > 0 || leaked.is_some_and(|l| l > 0.0) {
            bail!("the soak lost requests or KV blocks");
        }
        Ok(())
    })
}
