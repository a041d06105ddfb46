//! Deployment files against real tools: the Kubernetes manifests validate
//! (`scripts/check_deploy.py`: kubernetes-validate, operator resources,
//! cross references), `promtool check rules` passes, and a real Prometheus
//! scraping a real router and engine, with the rules loaded, returns data
//! for every expression the rules and the Grafana dashboard use.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use heterospec_proto::v1 as pb;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tool(name: &str) -> Command {
    let mut c = Command::new(name);
    c.current_dir(repo());
    c
}

fn run_ok(mut c: Command, what: &str) {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run it ({e}); .ci/run installs it"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn manifests_validate_and_rules_pass_promtool() {
    let mut check = tool("python3");
    check.arg("scripts/check_deploy.py");
    run_ok(
        check,
        "python3 scripts/check_deploy.py (needs kubernetes-validate from PyPI)",
    );
    let mut promtool = tool("promtool");
    promtool.args(["check", "rules", "deploy/prometheus/rules.yml"]);
    run_ok(promtool, "promtool check rules (Debian package prometheus)");
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET over HTTP/1.0; the body, or None when unreachable.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_string()))
}

fn query(port: u16, expr: &str) -> serde_json::Value {
    let (status, body) = http_get(port, &format!("/api/v1/query?query={}", encode(expr))).expect("prometheus answers");
    assert_eq!(status, 200, "query {expr} failed: {body}");
    serde_json::from_str(&body).unwrap()
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every `expr` of the dashboard's panels.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/heterospec-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_gets_data_for_every_rule_and_dashboard_expression() {
    let engine_metrics = free_port();
    let flag = format!("127.0.0.1:{engine_metrics}");
    let cluster = Cluster::start(&["--metrics-listen", &flag], &[]);
    let client = cluster.client().await;

    let dir = std::env::temp_dir().join(format!("heterospec-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prom_port = free_port();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: heterospec-router\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n  - job_name: heterospec-engine\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
        repo().join("deploy/prometheus/rules.yml").display(),
        cluster.metrics_port,
        engine_metrics
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let _prometheus = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus) runs"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(prom_port, "/-/ready").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "prometheus did not become ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Traffic while Prometheus scrapes: repetitive prompts (the n-gram
    // drafter has something to copy) in the fixed and HeteroSpec modes.
    let traffic = tokio::spawn(async move {
        let prompts = [
            "Repeat after me three times: the quick brown fox jumps over the lazy dog.",
            "Write a Python function that returns the sum of a list, then write it again with a docstring.",
            "Count from one to twenty in words.",
        ];
        for round in 0..1000 {
            let mut tasks = Vec::new();
            for (i, p) in prompts.iter().enumerate() {
                let mut c = client.clone();
                let mode = if (round + i) % 2 == 0 {
                    pb::SpeculationMode::Fixed
                } else {
                    pb::SpeculationMode::Hetero
                };
                let req = pb::GenerateRequest {
                    speculation: mode as i32,
                    ..chat_request(p, 24)
                };
                tasks.push(tokio::spawn(async move { run_stream(&mut c, req).await }));
            }
            for t in tasks {
                t.await.unwrap().unwrap();
            }
        }
    });

    let (_, rules) = http_get(prom_port, "/api/v1/rules").unwrap();
    let rules: serde_json::Value = serde_json::from_str(&rules).unwrap();
    let mut recorded = Vec::new();
    let mut num_alerts = 0;
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            match rule["type"].as_str().unwrap() {
                "recording" => recorded.push(rule["name"].as_str().unwrap().to_string()),
                _ => num_alerts += 1,
            }
        }
    }
    assert!(recorded.len() >= 10 && num_alerts >= 4, "rules not loaded: {rules}");
    let mut exprs: Vec<String> = recorded.clone();
    exprs.extend(dashboard_exprs());
    exprs.extend([
        "up{job=\"heterospec-router\"} == 1".to_string(),
        "up{job=\"heterospec-engine\"} == 1".to_string(),
    ]);

    let deadline = Instant::now() + Duration::from_secs(90);
    let mut empty: Vec<String>;
    loop {
        empty = exprs
            .iter()
            .filter(|e| {
                query(prom_port, e)["data"]["result"]
                    .as_array()
                    .is_none_or(|r| r.is_empty())
            })
            .cloned()
            .collect();
        if empty.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    traffic.abort();
    assert!(empty.is_empty(), "no data for: {empty:#?}");

    // Every rule (alerts too) evaluates without error.
    let (_, rules) = http_get(prom_port, "/api/v1/rules").unwrap();
    let rules: serde_json::Value = serde_json::from_str(&rules).unwrap();
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            assert_eq!(
                rule["health"], "ok",
                "rule {} is unhealthy: {}",
                rule["name"], rule["lastError"]
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
