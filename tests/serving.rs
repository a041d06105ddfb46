//! Serving end to end: real engine and router processes on 127.0.0.1 with
//! the real default model, talking gRPC.

mod common;

use std::time::{Duration, Instant};

use common::*;
use heterospec_proto::v1 as pb;
use tonic::Code;

fn max_new(i: usize) -> i32 {
    6 + (i as i32 * 5) % 19
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_match_solo_generation_and_metrics_move() {
    let cluster = Cluster::start(&[], &[]);
    let mut client = cluster.client().await;

    // One stream equals in-process `heterospec generate`.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_heterospec"))
        .args([
            "generate",
            "--json",
            "--chat",
            "--max-new-tokens",
            "24",
            "--threads",
            "2",
            "--prompt",
            PROMPTS[0],
        ])
        .args(["--model", model().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let local: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let served = run_stream(&mut client, chat_request(PROMPTS[0], 24)).await.unwrap();
    let local_ids: Vec<u32> = local["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(served.token_ids, local_ids);
    assert_eq!(served.text, local["text"].as_str().unwrap());
    let usage = served.usage.unwrap();
    assert_eq!(usage.completion_tokens as usize, served.token_ids.len());

    // Solo results, one at a time.
    let mut solo = Vec::new();
    for (i, p) in PROMPTS.iter().enumerate() {
        solo.push(run_stream(&mut client, chat_request(p, max_new(i))).await.unwrap());
    }
    // 16 concurrent streams with different prompts and lengths.
    let mut tasks = Vec::new();
    for (i, p) in PROMPTS.iter().enumerate() {
        let mut c = client.clone();
        let req = chat_request(p, max_new(i));
        tasks.push(tokio::spawn(async move { run_stream(&mut c, req).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap().unwrap();
        assert_eq!(got.token_ids, solo[i].token_ids, "prompt {i} differs when batched");
        assert_eq!(got.text, solo[i].text);
        assert_ne!(got.finish_reason, 0);
    }

    // Every DESIGN metric is exported, and the counters moved.
    let text = cluster.metrics();
    for name in [
        "heterospec_requests_total",
        "heterospec_request_duration_seconds_count",
        "heterospec_time_to_first_token_seconds_count",
        "heterospec_inter_token_latency_seconds_count",
        "heterospec_queue_duration_seconds_count",
        "heterospec_prompt_tokens_total",
        "heterospec_generated_tokens_total",
        "heterospec_requests_running",
        "heterospec_requests_waiting",
        "heterospec_kv_blocks",
        "heterospec_prefix_cache_queries_total",
        "heterospec_prefix_cache_hits_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    assert_eq!(
        metric(&text, "heterospec_requests_total", &["outcome=\"length\""])
            + metric(&text, "heterospec_requests_total", &["outcome=\"eos\""]),
        33.0
    );
    let generated: usize = solo.iter().map(|s| s.token_ids.len()).sum::<usize>() * 2 + served.token_ids.len();
    assert_eq!(
        metric(&text, "heterospec_generated_tokens_total", &[]) as usize,
        generated
    );
    assert_eq!(
        metric(&text, "heterospec_kv_blocks", &["state=\"used\""]),
        0.0,
        "all blocks returned"
    );
    assert!(metric(&text, "heterospec_time_to_first_token_seconds_count", &[]) >= 33.0);
    // The engine's time on steps, as it reported it, lies within the time
    // the router had a step in flight (per step too when steps do not
    // overlap), and both were spent.
    let steps = metric(&text, "heterospec_engine_step_seconds_count", &[]);
    assert!(steps >= 1.0 && metric(&text, "heterospec_engine_busy_seconds_count", &[]) == steps);
    let busy = metric(&text, "heterospec_engine_busy_seconds_sum", &[]);
    let round_trips = metric(&text, "heterospec_engine_step_seconds_sum", &[]);
    assert!(
        busy > 0.0 && busy <= round_trips,
        "busy {busy} s, round trips {round_trips} s"
    );
    // A CPU engine: by default (--overlap-steps auto) no step overlaps.
    assert_eq!(metric(&text, "heterospec_engine_steps_overlapped_total", &[]), 0.0);

    // Prefix cache: the same prompt again hits (the 16 solo runs and their
    // batched twins share the chat template's system prompt too).
    let long =
        "Summarize: ".to_string() + &"The river flows to the sea and the sea returns rain to the hills. ".repeat(8);
    let before = metric(&cluster.metrics(), "heterospec_prefix_cache_hits_total", &[]);
    let first = run_stream(&mut client, chat_request(&long, 8)).await.unwrap();
    let mid = metric(&cluster.metrics(), "heterospec_prefix_cache_hits_total", &[]);
    let second = run_stream(&mut client, chat_request(&long, 8)).await.unwrap();
    let after = metric(&cluster.metrics(), "heterospec_prefix_cache_hits_total", &[]);
    assert_eq!(first.token_ids, second.token_ids);
    assert!(
        after - mid >= 128.0,
        "second identical prompt hit {} tokens",
        after - mid
    );
    assert!(mid - before < after - mid);
    assert!(second.usage.unwrap().cached_prompt_tokens >= 128);
    // A different salt does not share.
    let mut salted = chat_request(&long, 8);
    salted.cache_salt = "tenant-b".into();
    let third = run_stream(&mut client, salted).await.unwrap();
    assert_eq!(third.token_ids, first.token_ids);
    assert_eq!(third.usage.unwrap().cached_prompt_tokens, 0);
    assert_eq!(
        metric(&cluster.metrics(), "heterospec_prefix_cache_hits_total", &[]),
        after
    );

    // ModelInfo describes the deployment.
    let info = client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.num_engines, 1);
    assert_eq!(info.max_context, 8192);
    assert!(info.num_kv_blocks > 100);
}

fn expect_invalid(
    result: Result<tonic::Response<tonic::codec::Streaming<pb::GenerateResponse>>, tonic::Status>,
    field: &str,
) {
    let status = result.expect_err("invalid request accepted");
    assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
    assert!(
        status.message().contains(field),
        "message `{}` does not name `{field}`",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_fields_and_overload_are_refused_and_serving_continues() {
    let cluster = Cluster::start(&[], &["--max-concurrent-requests", "2"]);
    let mut client = cluster.client().await;
    let ok = || chat_request("Hello", 4);

    let mut r = ok();
    r.input = None;
    expect_invalid(client.generate(r).await, "input");
    let mut r = ok();
    r.input = Some(pb::generate_request::Input::Prompt(String::new()));
    expect_invalid(client.generate(r).await, "prompt");
    let mut r = ok();
    r.input = Some(pb::generate_request::Input::PromptTokenIds(pb::TokenIds {
        ids: vec![1, 999_999],
    }));
    expect_invalid(client.generate(r).await, "prompt_token_ids");
    let mut r = ok();
    r.input = Some(pb::generate_request::Input::Messages(pb::ChatMessages {
        messages: vec![pb::ChatMessage {
            role: "wizard".into(),
            content: "hi".into(),
        }],
    }));
    expect_invalid(client.generate(r).await, "messages");
    for (field, sampling) in [
        (
            "temperature",
            pb::SamplingParams {
                temperature: Some(-0.5),
                ..Default::default()
            },
        ),
        (
            "top_p",
            pb::SamplingParams {
                top_p: Some(0.0),
                ..Default::default()
            },
        ),
        (
            "top_p",
            pb::SamplingParams {
                top_p: Some(1.5),
                ..Default::default()
            },
        ),
        (
            "top_k",
            pb::SamplingParams {
                top_k: Some(-1),
                ..Default::default()
            },
        ),
        (
            "repetition_penalty",
            pb::SamplingParams {
                repetition_penalty: Some(0.0),
                ..Default::default()
            },
        ),
    ] {
        let mut r = ok();
        r.sampling = Some(sampling);
        expect_invalid(client.generate(r).await, field);
    }
    let mut r = ok();
    r.stopping = Some(pb::StoppingCriteria {
        max_new_tokens: Some(0),
        ..Default::default()
    });
    expect_invalid(client.generate(r).await, "max_new_tokens");
    let mut r = ok();
    r.stopping = Some(pb::StoppingCriteria {
        max_new_tokens: Some(9000),
        ..Default::default()
    });
    expect_invalid(client.generate(r).await, "max_new_tokens");
    let mut r = ok();
    r.stopping = Some(pb::StoppingCriteria {
        stop: (0..17).map(|i| i.to_string()).collect(),
        ..Default::default()
    });
    expect_invalid(client.generate(r).await, "stop");
    let mut r = ok();
    r.stopping = Some(pb::StoppingCriteria {
        stop: vec![String::new()],
        ..Default::default()
    });
    expect_invalid(client.generate(r).await, "stop");
    let mut r = ok();
    r.input = Some(pb::generate_request::Input::Prompt("word ".repeat(9000)));
    expect_invalid(client.generate(r).await, "prompt");
    let mut r = ok();
    r.speculation = 42;
    expect_invalid(client.generate(r).await, "speculation");
    let mut r = ok();
    r.cache_salt = "x".repeat(300);
    expect_invalid(client.generate(r).await, "cache_salt");

    // Two long streams fill the limit; a third is refused at once.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut s = client
            .generate(chat_request("Tell me a long story.", 200))
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap().expect("first response");
        streams.push(s);
    }
    let refused = client.generate(ok()).await.expect_err("over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    drop(streams);
    // Capacity returns once the cancelled streams are cleaned up.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match run_stream(&mut client, ok()).await {
            Ok(out) => {
                assert!(!out.token_ids.is_empty());
                break;
            }
            Err(s) if s.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("server did not recover: {s:?}"),
        }
    }
    let text = cluster.metrics();
    assert!(metric(&text, "heterospec_requests_total", &["outcome=\"invalid_argument\""]) >= 15.0);
    assert!(metric(&text, "heterospec_requests_total", &["outcome=\"resource_exhausted\""]) >= 1.0);
    assert_eq!(
        metric(&text, "heterospec_requests_total", &["outcome=\"cancelled\""]),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_stream_frees_its_blocks_and_others_are_unaffected() {
    // Steps overlap at every batch size: the cancelled stream's last run is
    // in flight when its blocks are freed.
    let cluster = Cluster::start(&[], &["--overlap-steps", "on"]);
    let mut client = cluster.client().await;
    let solo = run_stream(&mut client, chat_request(PROMPTS[2], 30)).await.unwrap();

    let mut other_client = client.clone();
    let other = tokio::spawn(async move { run_stream(&mut other_client, chat_request(PROMPTS[2], 30)).await });
    let mut doomed = client
        .generate(chat_request("Tell me a long story about a dragon.", 400))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        doomed.message().await.unwrap().expect("streaming");
    }
    let used_while_running = metric(&cluster.metrics(), "heterospec_kv_blocks", &["state=\"used\""]);
    assert!(used_while_running >= 2.0);
    drop(doomed);

    assert_eq!(other.await.unwrap().unwrap().token_ids, solo.token_ids);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = cluster.metrics();
        if metric(&text, "heterospec_kv_blocks", &["state=\"used\""]) == 0.0
            && metric(&text, "heterospec_requests_total", &["outcome=\"cancelled\""]) == 1.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "blocks not freed after cancel:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_under_a_small_kv_pool_loses_no_request() {
    // 2 * 30 layers * 16 slots * 192 floats * 4 bytes = 737,280 bytes per
    // block: 13 blocks (12 usable, 192 tokens) for four ~80-token requests.
    let cluster = Cluster::start(&["--kv-cache-memory", "9600000"], &["--overlap-steps", "on"]);
    let mut client = cluster.client().await;
    let prompts = [PROMPTS[1], PROMPTS[4], PROMPTS[9], PROMPTS[15]];
    let mut solo = Vec::new();
    for p in prompts {
        let mut r = chat_request(p, 40);
        r.stopping.as_mut().unwrap().ignore_eos = true;
        solo.push(run_stream(&mut client, r).await.unwrap());
    }
    let mut tasks = Vec::new();
    for p in prompts {
        let mut c = client.clone();
        let mut r = chat_request(p, 40);
        r.stopping.as_mut().unwrap().ignore_eos = true;
        tasks.push(tokio::spawn(async move { run_stream(&mut c, r).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap().unwrap();
        assert_eq!(got.token_ids, solo[i].token_ids, "request {i} changed under preemption");
        assert_eq!(got.finish_reason, pb::FinishReason::Length as i32);
    }
    // A prompt larger than the whole pool is refused, and serving goes on.
    let mut huge = chat_request(&"many words here ".repeat(60), 4);
    huge.stopping.as_mut().unwrap().ignore_eos = true;
    let refused = run_stream(&mut client, huge).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(run_stream(&mut client, chat_request(PROMPTS[0], 4)).await.is_ok());
    let text = cluster.metrics();
    assert!(
        metric(&text, "heterospec_preemptions_total", &[]) >= 1.0,
        "no preemption happened:\n{text}"
    );
    assert!(
        metric(&text, "heterospec_engine_steps_overlapped_total", &[]) >= 10.0,
        "batched steps overlapped:\n{text}"
    );
    assert_eq!(metric(&text, "heterospec_kv_blocks", &["state=\"used\""]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_engine_ends_streams_with_unavailable_and_recovers() {
    let mut engine = Proc::start(&engine_args("127.0.0.1:0", &[]));
    let engine_addr = engine.addr;
    let metrics_port = free_port();
    let router = Proc::start(&router_args(&[engine.url()], metrics_port, &[]));
    wait_health(&router.url(), SERVING, Duration::from_secs(30)).await;
    let client = connect(&router.url()).await;

    let mut streams = Vec::new();
    for p in &PROMPTS[..3] {
        let mut s = client
            .clone()
            .generate(chat_request(p, 500))
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap().expect("streaming");
        streams.push(s);
    }
    engine.signal(libc::SIGKILL);
    let killed_at = Instant::now();
    for mut s in streams {
        let end = loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without an error"),
                Err(status) => break status,
            }
        };
        assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    }
    assert!(
        killed_at.elapsed() < Duration::from_secs(2),
        "streams took {:?} to fail",
        killed_at.elapsed()
    );
    wait_health(&router.url(), NOT_SERVING, Duration::from_secs(2)).await;
    let refused = run_stream(&mut client.clone(), chat_request("hi", 4))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    engine.wait_timeout(Duration::from_secs(5));

    // The engine comes back on the same address; the router reconnects.
    let mut engine = Proc::start(&engine_args(&engine_addr.to_string(), &[]));
    wait_health(&router.url(), SERVING, Duration::from_secs(30)).await;
    let out = run_stream(&mut client.clone(), chat_request(PROMPTS[3], 8))
        .await
        .unwrap();
    assert!(!out.token_ids.is_empty());
    let text = scrape(metrics_port);
    assert_eq!(
        metric(&text, "heterospec_requests_total", &["outcome=\"unavailable\""]),
        4.0
    );

    // A restart while the router is idle: the prompt's cached blocks on the
    // router side belong to the dead instance and must not be used (the
    // output would be garbage); a request either fails UNAVAILABLE or runs
    // on the new instance with the right output.
    let long = format!("{} {}", PROMPTS[6], "Answer in detail, please. ".repeat(8));
    let before = run_stream(&mut client.clone(), chat_request(&long, 12)).await.unwrap();
    engine.signal(libc::SIGKILL);
    engine.wait_timeout(Duration::from_secs(5));
    let _engine = Proc::start(&engine_args(&engine_addr.to_string(), &[]));
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        match run_stream(&mut client.clone(), chat_request(&long, 12)).await {
            Ok(out) => break out,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(s) => panic!("no recovery after an idle restart: {s:?}"),
        }
    };
    assert_eq!(after.token_ids, before.token_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_launcher_drains_streams_on_sigterm_and_exits_zero() {
    let listen = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut serve = Proc::start(&[
        "serve".to_string(),
        "--listen".into(),
        listen,
        "--metrics-listen".into(),
        metrics,
        "--model".into(),
        model().to_str().unwrap().into(),
        "--threads".into(),
        "2".into(),
    ]);
    let url = serve.url();
    wait_health(&url, SERVING, Duration::from_secs(30)).await;
    let client = connect(&url).await;
    let mut tasks = Vec::new();
    for p in &PROMPTS[..2] {
        let mut c = client.clone();
        let mut r = chat_request(p, 30);
        r.stopping.as_mut().unwrap().ignore_eos = true;
        tasks.push(tokio::spawn(async move { run_stream(&mut c, r).await }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    serve.signal(libc::SIGTERM);
    for t in tasks {
        let out = t.await.unwrap().expect("in-flight stream finishes");
        assert_eq!(out.finish_reason, pb::FinishReason::Length as i32);
        assert_eq!(out.token_ids.len(), 30);
    }
    let status = serve.wait_timeout(Duration::from_secs(20)).expect("serve exits");
    assert!(status.success(), "serve exited with {status}");
}
