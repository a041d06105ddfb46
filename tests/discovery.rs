//! The router follows engines through DNS: engines added behind one name
//! are picked up, engines removed finish their streams and get no new ones,
//! and no request is lost. A scripted resolver drives an in-process router
//! in front of real engine processes; a second run uses the system resolver
//! and the name `localhost`.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use heterospec_proto::v1 as pb;
use heterospec_router::discovery::{EngineDiscovery, Resolver};
use heterospec_router::scheduler::SchedulerConfig;
use heterospec_router::server::{serve, Listeners, RouterConfig};
use heterospec_router::TextTokenizer;

/// Answers with whatever the test put in last.
struct Scripted(Arc<Mutex<Vec<SocketAddr>>>);

impl Resolver for Scripted {
    fn resolve(&self, _host: &str, _port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok(self.0.lock().unwrap().clone())
    }
}

async fn num_engines(
    client: &mut heterospec_proto::v1::generation_client::GenerationClient<tonic::transport::Channel>,
) -> u32 {
    client
        .model_info(pb::ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .num_engines
}

async fn wait_engines(
    client: &mut heterospec_proto::v1::generation_client::GenerationClient<tonic::transport::Channel>,
    want: u32,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while num_engines(client).await != want {
        assert!(Instant::now() < deadline, "the router never saw {want} engines");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn steps(metrics_port: u16) -> f64 {
    metric(&scrape(metrics_port), "heterospec_engine_steps_total", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_added_and_removed_behind_a_name_are_followed_without_losing_requests() {
    let (m1, m2) = (free_port(), free_port());
    let e1 = Proc::start(&engine_args(
        "127.0.0.1:0",
        &["--metrics-listen", &format!("127.0.0.1:{m1}")],
    ));
    let e2 = Proc::start(&engine_args(
        "127.0.0.1:0",
        &["--metrics-listen", &format!("127.0.0.1:{m2}")],
    ));
    let answer = Arc::new(Mutex::new(vec![e1.addr]));
    let tokenizer = TextTokenizer::from_gguf_file(&model()).unwrap();
    let max_context = tokenizer.max_context().unwrap();
    let config = RouterConfig {
        engines: vec![],
        discovery: Some(EngineDiscovery {
            host: "engines.test".into(),
            port: 0,
            interval: Duration::from_millis(100),
            resolver: Arc::new(Scripted(answer.clone())),
        }),
        model_name: "test".into(),
        max_concurrent_requests: 64,
        scheduler: SchedulerConfig {
            max_batch_tokens: 512,
            max_running: 64,
            step_timeout: Duration::from_secs(60),
            overlap_steps: Default::default(),
        },
        drain_timeout: Duration::from_secs(5),
        limits: Default::default(),
        max_total_tokens: None,
        tls: None,
        engine_tls: None,
        auth: None,
        health_listen: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let listeners = Listeners {
        grpc: listener,
        http: None,
    };
    tokio::spawn(serve(config, tokenizer, max_context, listeners, std::future::pending()));
    wait_health(&url, SERVING, Duration::from_secs(30)).await;
    let mut client = connect(&url).await;
    assert_eq!(num_engines(&mut client).await, 1);
    let want = run_stream(&mut client, chat_request("Name three primary colors.", 12))
        .await
        .unwrap()
        .token_ids;
    assert!(steps(m1) > 0.0);
    assert_eq!(steps(m2), 0.0, "the second engine is not known yet");

    // The name now resolves to both: new requests spread over them.
    *answer.lock().unwrap() = vec![e1.addr, e2.addr];
    wait_engines(&mut client, 2).await;
    wait_health(&url, SERVING, Duration::from_secs(30)).await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { run_stream(&mut c, chat_request("Name three primary colors.", 12)).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().token_ids, want);
    }
    assert!(steps(m2) > 0.0, "the added engine got no work");

    // Long streams on both, then the first engine leaves the name: its
    // streams finish, new requests go to the second only.
    let long: Vec<_> = (0..6)
        .map(|_| {
            let mut c = client.clone();
            let mut req = chat_request("Count from one to forty in words.", 48);
            req.stopping.as_mut().unwrap().ignore_eos = true;
            tokio::spawn(async move { run_stream(&mut c, req).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    *answer.lock().unwrap() = vec![e2.addr];
    for t in long {
        let out = t.await.unwrap().expect("a stream on a retired engine still finishes");
        assert_eq!(out.token_ids.len(), 48);
    }
    wait_engines(&mut client, 1).await;
    let before = steps(m1);
    for _ in 0..3 {
        assert_eq!(
            run_stream(&mut client, chat_request("Name three primary colors.", 12))
                .await
                .unwrap()
                .token_ids,
            want
        );
    }
    assert_eq!(steps(m1), before, "a removed engine still got requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_finds_an_engine_through_the_system_resolver() {
    let port = free_port();
    let engine = Proc::start(&engine_args(&format!("127.0.0.1:{port}"), &[]));
    let metrics_port = free_port();
    let router = Proc::start(&router_args(
        &[],
        metrics_port,
        &[
            "--engine-dns",
            &format!("localhost:{port}"),
            "--engine-dns-interval-secs",
            "1",
        ],
    ));
    wait_health(&router.url(), SERVING, Duration::from_secs(60)).await;
    let mut client = connect(&router.url()).await;
    assert_eq!(num_engines(&mut client).await, 1);
    let out = run_stream(&mut client, chat_request("What is the capital of France?", 8))
        .await
        .unwrap();
    assert_eq!(out.token_ids.len(), 8);
    drop(engine);
}
