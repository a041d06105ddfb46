//! The serving processes: `heterospec engine`, `heterospec router`, and the
//! launcher `heterospec serve` that runs both as child processes.
//!
//! Every server prints one line `heterospec <role> listening on <addr>` on
//! stdout once it accepts connections (with `--listen host:0` the address
//! shows the port the OS picked); the launcher and the tests wait for it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use heterospec_engine::health::EngineHealth;
use heterospec_engine::loading::EngineSlot;
use heterospec_engine::server::{EngineHandle, EngineInfo};
use heterospec_proto::engine::v1::engine_server::EngineServer;
use heterospec_router::discovery::EngineDiscovery;
use heterospec_router::scheduler::SchedulerConfig;
use heterospec_router::security::{client_tls, TlsFiles};
use heterospec_router::server::{Listeners, RouterConfig};
use heterospec_router::TextTokenizer;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

use crate::local::{init_threads, EngineArgs};
pub use crate::router_args::RouterArgs;
use heterospec_engine::Device;

#[derive(Debug, Args)]
pub struct EngineProcessArgs {
    /// gRPC address to serve the engine API on.
    #[arg(long, env = "HETEROSPEC_ENGINE_LISTEN", default_value = "127.0.0.1:50061")]
    pub listen: SocketAddr,
    /// Serve Prometheus metrics (step timings) on this address.
    #[arg(long, env = "HETEROSPEC_ENGINE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    #[arg(long, env = "HETEROSPEC_MODEL", default_value_os_t = crate::fetch::default_model_path())]
    pub model: PathBuf,
    /// Routers that may share this engine: its KV blocks are split into this
    /// many equal partitions, one leased to each router that attaches.
    #[arg(long, env = "HETEROSPEC_MAX_ROUTERS", default_value_t = 1)]
    pub max_routers: usize,
    /// Seconds of silence after which a router's KV partition may go to
    /// another router (routers renew theirs every second).
    #[arg(long, env = "HETEROSPEC_LEASE_TIMEOUT", default_value_t = 10)]
    pub lease_timeout_secs: u64,
    /// Seconds a step may run before the engine reports NOT_SERVING (also
    /// to its liveness probe: a wedged engine gets restarted).
    #[arg(long, env = "HETEROSPEC_ENGINE_STEP_TIMEOUT", default_value_t = 120)]
    pub step_timeout_secs: u64,
    /// Tests only: panic on the engine thread in step N (1 = the first), to
    /// prove that a panic turns into UNAVAILABLE, NOT_SERVING and an exit.
    #[arg(long, hide = true)]
    pub test_panic_at_step: Option<u64>,
    /// Tests only: a sequence whose new tokens hold this id fails on its
    /// own, to prove that the others of its step run on.
    #[arg(long, hide = true)]
    pub test_poison_token: Option<u32>,
    /// Tests only: drafting fails in a step whose new tokens hold this id,
    /// to prove that the step then decodes plainly and loses nothing.
    #[arg(long, hide = true)]
    pub test_poison_draft_token: Option<u32>,
    /// TLS certificate (PEM) of the engine port; with --tls-key.
    #[arg(long, env = "HETEROSPEC_ENGINE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of the engine port.
    #[arg(long, env = "HETEROSPEC_ENGINE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) routers' client certificates must chain to (mutual TLS:
    /// only routers holding such a certificate may call the engine).
    #[arg(long, env = "HETEROSPEC_ENGINE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Also serve grpc.health.v1 alone, in plaintext, on this address (for
    /// Kubernetes' gRPC probes when the engine port takes TLS).
    #[arg(long, env = "HETEROSPEC_ENGINE_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Debug, Args)]
pub struct RouterProcessArgs {
    /// Public gRPC address (Generate, ModelInfo, health, reflection).
    #[arg(long, env = "HETEROSPEC_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Engine URL, e.g. http://127.0.0.1:50061 (repeatable).
    #[arg(
        long = "engine",
        env = "HETEROSPEC_ENGINES",
        value_delimiter = ',',
        required_unless_present = "engine_dns"
    )]
    pub engines: Vec<String>,
    /// Find engines by DNS: HOST:PORT (e.g. a headless Kubernetes service),
    /// re-resolved every --engine-dns-interval-secs; engines that appear
    /// are used, ones that disappear finish their requests and are dropped.
    #[arg(long, env = "HETEROSPEC_ENGINE_DNS")]
    pub engine_dns: Option<String>,
    #[arg(long, env = "HETEROSPEC_ENGINE_DNS_INTERVAL", default_value_t = 5)]
    pub engine_dns_interval_secs: u64,
    /// Serve Prometheus metrics on this address.
    #[arg(long, env = "HETEROSPEC_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// The model file (the router reads its tokenizer and chat template).
    #[arg(long, env = "HETEROSPEC_MODEL", default_value_os_t = crate::fetch::default_model_path())]
    pub model: PathBuf,
    /// CA (PEM) the engines' certificates chain to: TLS to engines (their
    /// URLs then start with https://).
    #[arg(long, env = "HETEROSPEC_ENGINE_TLS_CA")]
    pub engine_tls_ca: Option<PathBuf>,
    /// This router's client certificate (PEM) for engines that require
    /// mutual TLS; with --engine-tls-key.
    #[arg(long, env = "HETEROSPEC_ENGINE_TLS_CERT")]
    pub engine_tls_cert: Option<PathBuf>,
    #[arg(long, env = "HETEROSPEC_ENGINE_TLS_KEY")]
    pub engine_tls_key: Option<PathBuf>,
    /// Name the engines' certificates carry (default: the host of each
    /// engine URL; engines found by --engine-dns are dialled by IP).
    #[arg(long, env = "HETEROSPEC_ENGINE_TLS_SERVER_NAME")]
    pub engine_tls_server_name: Option<String>,
    #[command(flatten)]
    pub router: RouterArgs,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Public gRPC address.
    #[arg(long, env = "HETEROSPEC_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Router metrics address (engines serve theirs on the next ports when
    /// --engine-metrics is set).
    #[arg(long, env = "HETEROSPEC_METRICS_LISTEN", default_value = "127.0.0.1:9400")]
    pub metrics_listen: SocketAddr,
    /// Engine processes to start.
    #[arg(long, default_value_t = 1)]
    pub engines: usize,
    #[arg(long, env = "HETEROSPEC_MODEL", default_value_os_t = crate::fetch::default_model_path())]
    pub model: PathBuf,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub router: RouterArgs,
}

fn runtime(worker_threads: usize) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()?)
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn announce(role: &str, addr: SocketAddr) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "heterospec {role} listening on {addr}");
    let _ = out.flush();
}

pub fn run_engine(args: EngineProcessArgs) -> Result<()> {
    init_threads(args.engine.threads);
    crate::fetch::ensure_default_model(&args.model)?;
    if args.step_timeout_secs == 0 {
        bail!("--step-timeout-secs must be at least 1");
    }
    let info = EngineInfo {
        model: model_name(&args.model),
        instance_id: instance_id(),
        max_routers: args.max_routers,
        lease_timeout: Duration::from_secs(args.lease_timeout_secs),
        panic_at_step: args.test_panic_at_step,
    };
    let health = Arc::new(EngineHealth::new(Duration::from_secs(args.step_timeout_secs)));
    let tls = TlsFiles::from_flags(
        args.tls_cert.clone(),
        args.tls_key.clone(),
        args.tls_client_ca.clone(),
        "",
    )
    .map_err(anyhow::Error::msg)?;
    // The forward runs on its own thread pool; the runtime only does I/O.
    runtime(1)?.block_on(async move {
        if let Some(addr) = args.metrics_listen {
            crate::metrics::install(addr)?;
        }
        heterospec_engine::metrics::describe();
        // The port opens first: probes see NOT_SERVING while the model
        // loads, then the engine's real state (crate `health`).
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let service_name = <EngineServer<EngineSlot> as tonic::server::NamedService>::NAME;
        let reporting = health.clone();
        tokio::spawn(async move { reporting.report(reporter, service_name).await });
        if let Some(addr) = args.health_listen {
            heterospec_router::server::serve_health_only(addr, health_service.clone())
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
        }
        let slot = EngineSlot::default();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &tls {
            builder = builder.tls_config(tls.server_config().map_err(anyhow::Error::msg)?)?;
        }
        let server = tokio::spawn(
            builder
                .add_service(health_service)
                .add_service(slot.clone().into_service())
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    termination(),
                ),
        );
        let (engine_args, model) = (args.engine.clone(), args.model.clone());
        let mut engine = tokio::task::spawn_blocking(move || engine_args.build_engine(&model)).await??;
        engine.set_poison_token(args.test_poison_token);
        engine.set_poison_draft_token(args.test_poison_draft_token);
        slot.fill(EngineHandle::spawn(engine, info, health.clone()).map_err(anyhow::Error::msg)?);
        health.set_loaded();
        announce("engine", addr);
        server.await??;
        Ok(())
    })
}

pub fn run_router(args: RouterProcessArgs) -> Result<()> {
    crate::fetch::ensure_default_model(&args.model)?;
    let tokenizer = TextTokenizer::load(&args.model, args.router.chat_template.as_deref())?;
    let max_context = tokenizer
        .max_context()
        .context("the model file has no context length")?;
    let discovery = args
        .engine_dns
        .as_deref()
        .map(|spec| EngineDiscovery::parse(spec, Duration::from_secs(args.engine_dns_interval_secs.max(1))))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let (tls, auth) = args.router.security()?;
    let engine_tls = match (&args.engine_tls_ca, &args.engine_tls_cert, &args.engine_tls_key) {
        (None, None, None) => None,
        (Some(ca), cert, key) => {
            let identity = match (cert, key) {
                (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                (None, None) => None,
                _ => bail!("--engine-tls-cert and --engine-tls-key go together"),
            };
            Some(client_tls(ca, identity, args.engine_tls_server_name.as_deref()).map_err(anyhow::Error::msg)?)
        }
        _ => bail!("--engine-tls-cert and --engine-tls-key need --engine-tls-ca"),
    };
    let config = RouterConfig {
        engines: args.engines.clone(),
        discovery,
        model_name: model_name(&args.model),
        max_concurrent_requests: args.router.max_concurrent_requests,
        scheduler: SchedulerConfig {
            max_batch_tokens: args.router.max_batch_tokens,
            max_running: args.router.max_running,
            step_timeout: Duration::from_secs(args.router.step_timeout_secs),
            overlap_steps: args.router.overlap_steps,
        },
        drain_timeout: Duration::from_secs(args.router.drain_timeout_secs),
        limits: args.router.request_limits(),
        max_total_tokens: args.router.max_total_tokens,
        tls,
        engine_tls,
        auth,
        health_listen: args.router.health_listen,
    };
    config.validate().map_err(anyhow::Error::msg)?;
    if args.router.http_listen.is_some() && config.tls.is_some() {
        bail!(
            "--http-listen serves plaintext and the public port takes TLS (--tls-cert): terminate TLS in front \
             of the HTTP port, or leave --http-listen off"
        );
    }
    runtime(2)?.block_on(async move {
        if let Some(addr) = args.metrics_listen {
            crate::metrics::install(addr)?;
        }
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        announce("router", listener.local_addr()?);
        let http = match args.router.http_listen {
            Some(addr) => {
                let http = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (--http-listen)"))?;
                announce("router (OpenAI HTTP)", http.local_addr()?);
                Some(http)
            }
            None => None,
        };
        let listeners = Listeners { grpc: listener, http };
        heterospec_router::server::serve(config, tokenizer, max_context, listeners, termination())
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        tracing::info!("router stopped");
        Ok(())
    })
}

fn model_name(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn instance_id() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one((std::process::id(), std::time::SystemTime::now()))
}

/// Starts `heterospec <args>` and waits for its "listening on" line.
async fn spawn_child(args: &[String]) -> Result<(Child, SocketAddr)> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdout(Stdio::piped()).kill_on_drop(true);
    // SAFETY: prctl only sets a flag of the new process; no allocation.
    // Children die with the launcher even if it is SIGKILLed.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start heterospec {}", args.join(" ")))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next_line().await? {
            Some(line) => {
                if let Some(addr) = line.split(" listening on ").nth(1) {
                    break addr.trim().parse::<SocketAddr>()?;
                }
            }
            None => bail!(
                "heterospec {} exited before listening",
                args.first().map(String::as_str).unwrap_or("")
            ),
        }
    };
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr))
}

fn send_sigterm(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on a pid we spawned and have not reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
}

pub fn run_serve(args: ServeArgs) -> Result<()> {
    if args.engines == 0 {
        bail!("--engines must be at least 1");
    }
    crate::fetch::ensure_default_model(&args.model)?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = if args.engine.threads > 0 {
        args.engine.threads
    } else {
        (cores / args.engines).max(1)
    };
    let model = args.model.display().to_string();
    runtime(1)?.block_on(async move {
        let mut engines = Vec::new();
        let mut urls = Vec::new();
        for i in 0..args.engines {
            // One GPU per engine: engine i on the i-th device from --device.
            let device = match args.engine.device {
                Device::Cuda(first) => Device::Cuda(first + i),
                Device::Cpu => Device::Cpu,
            };
            let engine = EngineArgs {
                device,
                ..args.engine.clone()
            };
            let mut engine_args: Vec<String> = vec![
                "engine".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--model".into(),
                model.clone(),
                "--threads".into(),
                threads.to_string(),
            ];
            engine_args.extend(engine.to_cli_args());
            let (child, addr) = spawn_child(&engine_args).await?;
            urls.push(format!("http://{addr}"));
            engines.push(child);
        }
        let r = &args.router;
        let router_args: Vec<String> = vec![
            "router".into(),
            "--listen".into(),
            args.listen.to_string(),
            "--metrics-listen".into(),
            args.metrics_listen.to_string(),
            "--model".into(),
            model.clone(),
            "--engine".into(),
            urls.join(","),
        ]
        .into_iter()
        .chain(r.to_cli_args())
        .collect();
        let (mut router, addr) = spawn_child(&router_args).await?;
        announce("serve", addr);
        eprintln!(
            "heterospec serving {} on {addr} ({} engine(s): {}; metrics on http://{}/metrics)",
            model,
            engines.len(),
            urls.join(", "),
            args.metrics_listen
        );
        let status = tokio::select! {
            _ = termination() => {
                send_sigterm(&router);
                router.wait().await?
            }
            status = router.wait() => status?,
        };
        for engine in &engines {
            send_sigterm(engine);
        }
        for engine in &mut engines {
            let _ = tokio::time::timeout(Duration::from_secs(10), engine.wait()).await;
        }
        if !status.success() {
            bail!("the router exited with {status}");
        }
        Ok(())
    })
}
