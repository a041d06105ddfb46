//! What an operator meets on a real cluster, with real processes on
//! loopback: an engine that panics, a router restarted while its engine
//! lives, an engine still loading, and prompts far too large.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use heterospec_proto::v1 as pb;
use heterospec_proto::v1::generation_client::GenerationClient;
use tonic::transport::Channel;

fn text_request(prompt: String) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(prompt)),
        stopping: Some(pb::StoppingCriteria {
            max_new_tokens: Some(4),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_engine_ends_its_streams_unavailable_reports_not_serving_and_exits_nonzero() {
    // Engine 0 panics in its 20th step; engine 1 is healthy.
    let mut bad = Proc::start(&engine_args("127.0.0.1:0", &["--test-panic-at-step", "20"]));
    let good = Proc::start(&engine_args("127.0.0.1:0", &[]));
    let metrics_port = free_port();
    let router = Proc::start(&router_args(&[bad.url(), good.url()], metrics_port, &[]));
    wait_health(&router.url(), SERVING, Duration::from_secs(60)).await;
    wait_health(&bad.url(), SERVING, Duration::from_secs(60)).await;
    assert_eq!(service_health(&bad.url(), "liveness").await, SERVING);
    let mut client = connect(&router.url()).await;
    let solo = run_stream(&mut client, chat_request("Name three colors.", 12))
        .await
        .unwrap();

    // Idle engines tie and the first one gets each request: this one starts
    // by step 13 and still runs at step 20, which panics after it streamed
    // tokens: it ends UNAVAILABLE (a retry could repeat what was sent).
    let status = run_stream(&mut client, chat_request("Write a long story about a ship.", 60))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    // Crash-only: NOT_SERVING (readiness and liveness), then a non-zero exit.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut saw_not_serving = false;
    while Instant::now() < deadline && bad.child.try_wait().unwrap().is_none() {
        if health_status(&bad.url()).await == NOT_SERVING && service_health(&bad.url(), "liveness").await == NOT_SERVING
        {
            saw_not_serving = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_not_serving, "the engine reported NOT_SERVING before it exited");
    let exit = bad.wait_timeout(Duration::from_secs(10)).expect("the engine exits");
    assert_eq!(exit.code(), Some(70), "{exit:?}");

    // The router keeps serving on the other engine, with the same output.
    wait_health(&router.url(), SERVING, Duration::from_secs(10)).await;
    for _ in 0..3 {
        let out = run_stream(&mut client, chat_request("Name three colors.", 12))
            .await
            .unwrap();
        assert_eq!(out.token_ids, solo.token_ids);
    }
    drop(good);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_is_not_serving_while_it_loads() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_heterospec"))
        .args(engine_args(&format!("127.0.0.1:{port}"), &[]))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The first answer comes while loading and warming, the last when ready.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let status = health_status(&url).await;
        if status != -1 && seen.last() != Some(&status) {
            seen.push(status);
        }
        if status == SERVING {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen, vec![NOT_SERVING, SERVING], "health while loading, then loaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_router_serves_at_once_because_the_old_one_gave_its_lease_back() {
    // One partition, and a lease timeout longer than the test: without
    // Detach a second router could not lease any KV for a minute.
    let engine = Proc::start(&engine_args("127.0.0.1:0", &["--lease-timeout-secs", "60"]));
    let mut first = Proc::start(&router_args(&[engine.url()], free_port(), &[]));
    wait_health(&first.url(), SERVING, Duration::from_secs(60)).await;
    let mut client = connect(&first.url()).await;
    let solo = run_stream(&mut client, chat_request("Say hello.", 8)).await.unwrap();
    first.signal(libc::SIGTERM);
    let exit = first.wait_timeout(Duration::from_secs(30)).expect("the router exits");
    assert!(exit.success(), "{exit:?}");

    let second = Proc::start(&router_args(&[engine.url()], free_port(), &[]));
    // Far less than the lease timeout: the lease was given back.
    wait_health(&second.url(), SERVING, Duration::from_secs(20)).await;
    let mut client = connect(&second.url()).await;
    let out = run_stream(&mut client, chat_request("Say hello.", 8)).await.unwrap();
    assert_eq!(out.token_ids, solo.token_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_prompts_are_refused_before_tokenizing_and_router_memory_stays_bounded() {
    let cluster = Cluster::start(&[], &[]);
    let mut client = cluster.client().await;
    let pid = cluster.router.child.id();
    let before = rss_bytes(pid);

    // 2 MB: over --max-prompt-bytes (1 MiB), refused naming the field and
    // the flag; several at once.
    let two_mb = "lorem ipsum ".repeat(2 << 20).chars().take(2 << 20).collect::<String>();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut client = client.clone();
        let prompt = two_mb.clone();
        tasks.push(tokio::spawn(async move {
            run_stream(&mut client, text_request(prompt)).await
        }));
    }
    for task in tasks {
        let status = task.await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("prompt") && status.message().contains("--max-prompt-bytes"),
            "{status:?}"
        );
    }
    // 64 MB: over --max-request-bytes (4 MiB), refused before it is read.
    let huge = "x".repeat(64 << 20);
    let status = run_stream(&mut client, text_request(huge)).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument
        ),
        "{status:?}"
    );
    let after = rss_bytes(pid);
    assert!(
        after < before + (200 << 20),
        "router RSS grew from {before} to {after} bytes"
    );

    // Too many messages, named with its flag; then serving goes on.
    let many = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Messages(pb::ChatMessages {
            messages: (0..300)
                .map(|_| pb::ChatMessage {
                    role: "user".into(),
                    content: "hi".into(),
                })
                .collect(),
        })),
        ..Default::default()
    };
    let status = run_stream(&mut client, many).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("--max-messages"), "{status:?}");
    let out = run_stream(&mut client, chat_request("Say hello.", 4)).await.unwrap();
    assert_eq!(out.token_ids.len(), 4);
}

/// Each of `prompts` alone (16 greedy tokens), then all of them at once
/// with a request whose prompt holds `token`: asserts that each prompt's
/// tokens equal its solo ones, and returns the solo tokens and what the
/// request holding `token` got.
async fn solo_then_together_with(
    client: &mut GenerationClient<Channel>,
    prompts: &[&'static str],
    token: u32,
) -> (Vec<Vec<u32>>, Result<Streamed, tonic::Status>) {
    let mut solo = Vec::new();
    for p in prompts {
        solo.push(run_stream(client, chat_request(p, 16)).await.unwrap().token_ids);
    }
    let marked = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::PromptTokenIds(pb::TokenIds {
            ids: vec![1, 2, token, 3],
        })),
        stopping: Some(pb::StoppingCriteria {
            max_new_tokens: Some(16),
            ..Default::default()
        }),
        ..Default::default()
    };
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (mut client, request) = (client.clone(), chat_request(p, 16));
            tokio::spawn(async move { run_stream(&mut client, request).await })
        })
        .collect();
    let mut marked_client = client.clone();
    let marked = tokio::spawn(async move { run_stream(&mut marked_client, marked).await });
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().unwrap().token_ids, solo[i], "prompt {i}");
    }
    (solo, marked.await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_sequence_fails_its_request_and_the_rest_of_its_step_runs_on() {
    // The engine fails any sequence holding token 49000 on its own.
    let cluster = Cluster::start(&["--test-poison-token", "49000"], &["--overlap-steps", "on"]);
    let mut client = cluster.client().await;
    let prompts = [
        "Name three colors.",
        "What is two plus two?",
        "Say hello in French.",
        "List three fruits.",
        "What is the capital of Italy?",
        "Count to five.",
        "Name a large animal.",
    ];
    let (solo, bad) = solo_then_together_with(&mut client, &prompts, 49000).await;
    let status = bad.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert!(status.message().contains("poisoned"), "{status:?}");
    // The engine still serves.
    let again = run_stream(&mut client, chat_request(prompts[0], 16)).await.unwrap();
    assert_eq!(again.token_ids, solo[0]);
    assert_eq!(
        metric(&cluster.metrics(), "heterospec_requests_total", &["sequence_failed"]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_engine_dies_before_its_first_token_is_retried_on_another() {
    // Engine 0 panics in its first step: the first request's prompt.
    let bad = Proc::start(&engine_args("127.0.0.1:0", &["--test-panic-at-step", "1"]));
    let good = Proc::start(&engine_args("127.0.0.1:0", &[]));
    let metrics_port = free_port();
    let router = Proc::start(&router_args(&[bad.url(), good.url()], metrics_port, &[]));
    wait_health(&router.url(), SERVING, Duration::from_secs(60)).await;
    wait_health(&bad.url(), SERVING, Duration::from_secs(60)).await;
    wait_health(&good.url(), SERVING, Duration::from_secs(60)).await;
    let mut client = connect(&router.url()).await;
    let retried = run_stream(&mut client, chat_request("Name three colors.", 12))
        .await
        .expect("retried on the healthy engine");
    // Engine 0 is gone now: this one runs on engine 1 from the start.
    let solo = run_stream(&mut client, chat_request("Name three colors.", 12))
        .await
        .unwrap();
    assert_eq!(retried.token_ids, solo.token_ids);
    assert_eq!(retried.token_ids.len(), 12);
    let text = scrape(metrics_port);
    assert_eq!(metric(&text, "heterospec_requests_retried_total", &[]), 1.0, "{text}");
    drop((bad, good));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drafter_failure_decodes_its_step_plainly_and_loses_nothing() {
    // Drafting fails in any step holding token 49001 (the poisoned
    // request's prompt); the engine drafts with its default head.
    let metrics_port = free_port();
    let cluster = Cluster::start(
        &[
            "--test-poison-draft-token",
            "49001",
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
        ],
        &[],
    );
    let mut client = cluster.client().await;
    let prompts = ["Name three colors.", "Count to five.", "Say hello in French."];
    let (_, bad) = solo_then_together_with(&mut client, &prompts, 49001).await;
    assert_eq!(bad.unwrap().token_ids.len(), 16);
    let text = scrape(metrics_port);
    assert!(
        metric(&text, "heterospec_spec_draft_failures_total", &[]) >= 1.0,
        "no drafting failure recorded"
    );
}
