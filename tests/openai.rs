//! The OpenAI-compatible HTTP front (`--http-listen`) driven by the official
//! `openai` Python client (installed into `target/pydeps` on first use)
//! against a real router and engine on loopback: its answers equal the gRPC
//! port's for the same request, streamed or not; its errors carry OpenAI's
//! shape and HTTP codes (400, 401, 404, 429, 503); a client that hangs up
//! frees its blocks; without `max_tokens` a reply may fill the context; the
//! requests show in the same metrics.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use heterospec_proto::v1 as pb;
use serde_json::Value;

/// The pinned `openai` client, in `target/pydeps`.
fn pydeps() -> PathBuf {
    python_packages(&[("openai", "3.57.0")])
}

/// Runs a scenario of `tests/openai_client.py` against `base`.
fn client(base: &str, scenario: &str, key: Option<&str>) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).args([base, scenario]).env("PYTHONPATH", pydeps());
    if let Some(k) = key {
        cmd.arg(k);
    }
    let out = cmd.output().expect("python3 runs");
    assert!(
        out.status.success(),
        "openai_client.py {scenario}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn with_http(extra: &[&str]) -> (Cluster, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--http-listen", &listen];
    args.extend_from_slice(extra);
    (Cluster::start(&[], &args), format!("http://{listen}"))
}

fn sampled_request(prompt: &str, max_new_tokens: i32) -> pb::GenerateRequest {
    let mut req = chat_request(prompt, max_new_tokens);
    req.sampling = Some(pb::SamplingParams {
        temperature: Some(0.8),
        top_p: Some(0.9),
        seed: Some(7),
        ..Default::default()
    });
    req
}

fn completion_request() -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt("The capital of France is".into())),
        stopping: Some(pb::StoppingCriteria {
            max_new_tokens: Some(12),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The `param` and HTTP status of a refusal the client saw.
fn refusal(errors: &Value, name: &str) -> (u64, String) {
    let e = &errors[name];
    (
        e["status"].as_u64().unwrap_or(0),
        e["error"]["param"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_gets_what_the_grpc_port_gives() {
    let (cluster, base) = with_http(&[]);
    let mut grpc = cluster.client().await;
    let greedy = run_stream(&mut grpc, chat_request("Name three colors.", 24))
        .await
        .unwrap();
    let sampled = run_stream(&mut grpc, sampled_request("Name three colors.", 24))
        .await
        .unwrap();
    let completion = run_stream(&mut grpc, completion_request()).await.unwrap();
    let before = metric(&cluster.metrics(), "heterospec_requests_total", &[]);

    let out = client(&base, "main", None);
    assert_eq!(
        out["models"],
        serde_json::json!(["SmolLM2-135M-Instruct.Q4_1"]),
        "{out}"
    );

    let chat = &out["chat"];
    assert_eq!(chat["text"], greedy.text.as_str(), "{out}");
    assert_eq!(chat["object"], "chat.completion");
    assert!(chat["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let want_finish = if greedy.finish_reason == pb::FinishReason::Length as i32 {
        "length"
    } else {
        "stop"
    };
    assert_eq!(chat["finish"], want_finish);
    let usage = greedy.usage.unwrap();
    assert_eq!(chat["usage"]["prompt_tokens"], usage.prompt_tokens);
    assert_eq!(chat["usage"]["completion_tokens"], usage.completion_tokens);
    assert_eq!(
        chat["usage"]["total_tokens"],
        usage.prompt_tokens + usage.completion_tokens
    );
    assert!(chat["speculation"]["steps"].as_u64().unwrap() > 0, "{chat}");
    // Greedy: each token is the first of its alternatives, with its logprob.
    let logprobs = chat["logprobs"].as_array().unwrap();
    assert_eq!(logprobs.len(), greedy.token_ids.len());
    for t in logprobs {
        let top = t["top"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        assert_eq!(top[0][0], t["token"], "{t}");
        assert!((top[0][1].as_f64().unwrap() - t["logprob"].as_f64().unwrap()).abs() < 1e-6);
        assert!(top[1][1].as_f64() <= top[0][1].as_f64() && top[2][1].as_f64() <= top[1][1].as_f64());
    }

    // Streamed: the same text in chunks, the role first, the finish reason,
    // the speculation stats and a usage chunk at the end.
    let stream = &out["chat_stream"];
    assert_eq!(stream["text"], greedy.text.as_str(), "{stream}");
    assert_eq!(stream["roles"], serde_json::json!(["assistant"]));
    assert_eq!(stream["finish"], want_finish);
    assert_eq!(stream["usage"]["completion_tokens"], usage.completion_tokens);
    assert!(stream["speculation"]["steps"].as_u64().unwrap() > 0, "{stream}");
    assert!(stream["chunks"].as_u64().unwrap() >= 3, "{stream}");
    assert_eq!(out["off"], greedy.text.as_str(), "speculation off gives the same text");

    // Seeded sampling: the same draw over either port, streamed or not.
    assert_eq!(out["sampled"], sampled.text.as_str(), "{out}");
    assert_eq!(out["sampled_stream"], sampled.text.as_str(), "{out}");

    // A stop string cuts the text before it.
    let stopped = out["stopped"]["text"].as_str().unwrap();
    assert!(!stopped.contains('\n') && greedy.text.starts_with(stopped), "{out}");

    // Completions: the text of the gRPC prompt request, tokens that add up to
    // it, two alternatives each.
    let c = &out["completion"];
    assert_eq!(c["text"], completion.text.as_str(), "{c}");
    assert_eq!(c["object"], "text_completion");
    let tokens: String = c["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    // (A reply ended by an end-of-sequence token lists it too, as OpenAI's.)
    if completion.finish_reason == pb::FinishReason::Length as i32 {
        assert_eq!(tokens, completion.text);
    } else {
        assert!(tokens.starts_with(&completion.text), "{tokens:?}");
    }
    // (Two alternatives that decode to the same text share one key.)
    assert!(c["top"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| (1..=2).contains(&t.as_object().unwrap().len())));
    assert_eq!(out["completion_stream"], completion.text.as_str());

    // Refusals: OpenAI's error object naming the field, with its HTTP code.
    let errors = &out["errors"];
    for (name, status, param) in [
        ("n", 400, "n"),
        ("temperature", 400, "temperature"),
        ("max_tokens", 400, "max_tokens"),
        ("top_logprobs", 400, "top_logprobs"),
        ("messages", 400, "messages"),
        ("body", 400, "body"),
        ("model", 404, ""),
        ("too_big", 413, "body"),
        ("route", 404, ""),
    ] {
        assert_eq!(refusal(errors, name), (status, param.to_string()), "{name}: {errors}");
        assert!(
            errors[name]["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{errors}"
        );
    }
    assert!(
        errors["body"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("temperature"),
        "{errors}"
    );

    // The HTTP requests count in the same metrics as gRPC ones: 8 served
    // and 7 refused (a body over --max-request-bytes is refused before it
    // is read, as on the gRPC port, and not counted).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = cluster.metrics();
        let after = metric(&text, "heterospec_requests_total", &[]);
        if after - before == 15.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{after} - {before} requests counted:
{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_frees_its_blocks_and_no_max_tokens_fills_the_context() {
    let (cluster, base) = with_http(&["--max-total-tokens", "200"]);
    cluster.client().await;
    // Without max_tokens a chat reply may run to the end of the context.
    let out = client(&base, "fill", None);
    assert_eq!(out["finish"], "length", "{out}");
    let usage = &out["usage"];
    assert_eq!(
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap(),
        200,
        "{out}"
    );
    let out = client(&base, "cancel", None);
    assert_eq!(out["chunks"], 3);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = cluster.metrics();
        if metric(&text, "heterospec_kv_blocks", &["state=\"used\""]) == 0.0
            && metric(&text, "heterospec_requests_total", &["outcome=\"cancelled\""]) == 1.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blocks not freed after the client left:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_limits_and_a_lost_engine_map_to_401_429_and_503() {
    let dir = std::env::temp_dir().join(format!("heterospec-openai-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "sesame\n").unwrap();
    let (mut cluster, base) = with_http(&[
        "--auth-tokens-file",
        tokens.to_str().unwrap(),
        "--max-concurrent-requests",
        "1",
    ]);
    wait_health(&cluster.router.url(), SERVING, Duration::from_secs(60)).await;

    let out = client(&base, "one", Some("wrong"));
    assert_eq!(out["error"]["status"], 401, "{out}");
    assert_eq!(out["error"]["error"]["type"], "authentication_error", "{out}");
    assert_eq!(client(&base, "one", Some("sesame"))["error"], Value::Null);

    let out = client(&base, "busy", Some("sesame"));
    assert_eq!(out["second"]["status"], 429, "{out}");

    // The engine dies: requests get 503, the router lives on.
    cluster.engine.child.kill().unwrap();
    cluster.engine.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = client(&base, "one", Some("sesame"));
        if out["error"]["status"] == 503 {
            assert_eq!(out["error"]["error"]["type"], "service_unavailable_error", "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "no 503 after the engine died: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(cluster.router.child.try_wait().unwrap().is_none(), "the router lives");
    let _ = std::fs::remove_dir_all(&dir);
}
