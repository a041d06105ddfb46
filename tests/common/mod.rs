//! Test harness: real `heterospec` processes on 127.0.0.1, stopped when the
//! handle drops, and small clients for gRPC, health and `/metrics`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use heterospec_proto::v1 as pb;
use heterospec_proto::v1::generation_client::GenerationClient;
use tonic::transport::Channel;

pub fn model() -> PathBuf {
    let path = std::env::var_os("HETEROSPEC_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        path.exists(),
        "{} is missing: run `heterospec fetch-model` first",
        path.display()
    );
    path
}

/// `target/pydeps`, where `import` finds each `(package, version)`; pip
/// installs what is missing or of another version there (the README's
/// test command installs them all up front).
pub fn python_packages(packages: &[(&str, &str)]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pydeps");
    let has = |(name, version): &(&str, &str)| {
        let check = format!("import importlib.metadata as m, sys; sys.exit(m.version('{name}') != '{version}')");
        Command::new("python3")
            .args(["-c", &check])
            .env("PYTHONPATH", &dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let missing: Vec<String> = packages
        .iter()
        .filter(|p| !has(p))
        .map(|(n, v)| format!("{n}=={v}"))
        .collect();
    if !missing.is_empty() {
        let out = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--upgrade", "--target"])
            .arg(&dir)
            .args(&missing)
            .output()
            .expect("python3 runs");
        assert!(
            packages.iter().all(has),
            "cannot install {missing:?} into {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `heterospec` process; killed (if still running) on drop.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Proc {
    /// Starts `heterospec args...` and waits for its "listening on" line.
    pub fn start(args: &[String]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_heterospec"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("heterospec starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(addr) = line.split(" listening on ").nth(1) {
                        let _ = tx.send(addr.trim().parse::<SocketAddr>().unwrap());
                        sent = true;
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("heterospec {args:?} did not start listening"));
        Proc { child, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// Waits for exit; `None` on timeout.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn engine_args(listen: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["engine", "--listen", listen, "--model", model().to_str().unwrap()]
        .into_iter()
        .map(String::from)
        .collect();
    if !extra.contains(&"--threads") {
        args.extend(["--threads".to_string(), "2".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

pub fn router_args(engines: &[String], metrics_port: u16, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "router".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--metrics-listen".into(),
        format!("127.0.0.1:{metrics_port}"),
        "--model".into(),
        model().to_str().unwrap().into(),
    ];
    for e in engines {
        args.push("--engine".into());
        args.push(e.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// One engine and a router in front of it.
pub struct Cluster {
    pub engine: Proc,
    pub router: Proc,
    pub metrics_port: u16,
}

impl Cluster {
    pub fn start(engine_extra: &[&str], router_extra: &[&str]) -> Cluster {
        let engine = Proc::start(&engine_args("127.0.0.1:0", engine_extra));
        let metrics_port = free_port();
        let router = Proc::start(&router_args(&[engine.url()], metrics_port, router_extra));
        Cluster {
            engine,
            router,
            metrics_port,
        }
    }

    /// A client, once the router reports SERVING (connected to its engine).
    pub async fn client(&self) -> GenerationClient<Channel> {
        wait_health(&self.router.url(), SERVING, Duration::from_secs(60)).await;
        connect(&self.router.url()).await
    }

    pub fn metrics(&self) -> String {
        scrape(self.metrics_port)
    }
}

pub async fn connect(url: &str) -> GenerationClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match GenerationClient::connect(url.to_string()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("cannot connect to {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// GET /metrics over plain HTTP/1.0.
pub fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// Sum of all samples of `name` whose labels contain every `label`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let key = l.split_whitespace().next().unwrap_or("");
            (key == name || key.starts_with(&format!("{name}{{"))) && labels.iter().all(|lab| key.contains(lab))
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

/// A greedy chat request.
pub fn chat_request(prompt: &str, max_new_tokens: i32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Messages(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: prompt.into(),
            }],
        })),
        stopping: Some(pb::StoppingCriteria {
            max_new_tokens: Some(max_new_tokens),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Everything one stream returned.
#[derive(Debug, Default, Clone)]
pub struct Streamed {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: i32,
    pub usage: Option<pb::Usage>,
    pub speculation: Option<pb::SpeculationStats>,
}

pub async fn run_stream(
    client: &mut GenerationClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<Streamed, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = Streamed::default();
    while let Some(r) = stream.message().await? {
        out.token_ids.extend(r.token_ids);
        out.text.push_str(&r.text);
        if r.finish_reason != 0 {
            out.finish_reason = r.finish_reason;
            out.usage = r.usage;
            out.speculation = r.speculation;
        }
    }
    Ok(out)
}

pub async fn health_status(url: &str) -> i32 {
    service_health(url, "").await
}

/// The `grpc.health.v1` status of `service` (-1: no answer).
pub async fn service_health(url: &str, service: &str) -> i32 {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let Ok(channel) = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
    else {
        return -1;
    };
    let mut client = HealthClient::new(channel);
    match client
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
    {
        Ok(r) => r.into_inner().status,
        Err(_) => -1,
    }
}

/// `grpc.health.v1` SERVING.
pub const SERVING: i32 = 1;
pub const NOT_SERVING: i32 = 2;

pub async fn wait_health(url: &str, want: i32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = health_status(url).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "health of {url} is {got}, waited for {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resident memory of process `pid` in bytes (Linux).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// Chat prompts the serving tests send.
pub const PROMPTS: [&str; 16] = [
    "What is the capital of France?",
    "Write a Python function that returns the sum of a list.",
    "Explain photosynthesis in two sentences.",
    "What is 12 times 7?",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "Name three primary colors.",
    "What is the boiling point of water?",
    "Write a haiku about autumn.",
    "Who wrote Romeo and Juliet?",
    "What does a CPU do?",
    "List the planets of the solar system.",
    "How do I make a cup of tea?",
    "What is the largest ocean?",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
];
