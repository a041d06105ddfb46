//! Serving over several engines end to end: one router spreading requests
//! over two engine processes, and routers sharing one engine through KV
//! leases; real processes on 127.0.0.1 with the real default model.

mod common;

use std::time::Duration;

use common::*;
use heterospec_proto::v1 as pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_several_engines() {
    let ports = [free_port(), free_port()];
    let engines: Vec<Proc> = ports
        .iter()
        .map(|p| {
            Proc::start(&engine_args(
                "127.0.0.1:0",
                &["--threads", "1", "--metrics-listen", &format!("127.0.0.1:{p}")],
            ))
        })
        .collect();
    let urls: Vec<String> = engines.iter().map(Proc::url).collect();
    let router = Proc::start(&router_args(&urls, free_port(), &[]));
    wait_health(&router.url(), SERVING, Duration::from_secs(30)).await;
    let client = connect(&router.url()).await;
    let solo = run_stream(&mut client.clone(), chat_request(PROMPTS[5], 10))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            run_stream(&mut c, chat_request(PROMPTS[5], 10)).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().token_ids, solo.token_ids);
    }
    for p in ports {
        let steps = metric(&scrape(p), "heterospec_engine_steps_total", &[]);
        assert!(steps > 0.0, "engine with metrics on {p} ran no step");
    }
    let info = client
        .clone()
        .model_info(pb::ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.num_engines, 2);
}

/// Two routers share one engine (`--max-routers 2`), each on its own lease
/// of half the KV blocks: the same prompts through both at once give the
/// solo outputs (each router numbers its blocks from 1, so overlapping
/// blocks would mix their KV). A third router is refused while both hold
/// their leases, and takes over a partition once one router is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_share_an_engine_through_kv_leases() {
    let engine = Proc::start(&engine_args(
        "127.0.0.1:0",
        &[
            "--max-routers",
            "2",
            "--lease-timeout-secs",
            "2",
            "--kv-cache-memory",
            "48000000",
        ],
    ));
    let router_a = Proc::start(&router_args(&[engine.url()], free_port(), &[]));
    let router_b = Proc::start(&router_args(&[engine.url()], free_port(), &[]));
    wait_health(&router_a.url(), SERVING, Duration::from_secs(60)).await;
    wait_health(&router_b.url(), SERVING, Duration::from_secs(60)).await;
    let a = connect(&router_a.url()).await;
    let b = connect(&router_b.url()).await;

    let prompts = &PROMPTS[..4];
    let mut solo = Vec::new();
    for p in prompts {
        solo.push(run_stream(&mut a.clone(), chat_request(p, 16)).await.unwrap().token_ids);
    }
    let mut tasks = Vec::new();
    for client in [&a, &b] {
        for (i, p) in prompts.iter().enumerate() {
            let mut c = client.clone();
            let p = p.to_string();
            tasks.push(tokio::spawn(async move {
                (i, run_stream(&mut c, chat_request(&p, 16)).await)
            }));
        }
    }
    for t in tasks {
        let (i, got) = t.await.unwrap();
        assert_eq!(got.unwrap().token_ids, solo[i], "prompt {i} through a shared engine");
    }

    // Both partitions are held: a third router is not SERVING and refuses
    // requests with UNAVAILABLE.
    let router_c = Proc::start(&router_args(&[engine.url()], free_port(), &[]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(health_status(&router_c.url()).await, NOT_SERVING);
    let mut c = connect(&router_c.url()).await;
    let refused = run_stream(&mut c, chat_request(prompts[0], 4)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    // Router A goes away; once its lease times out, C takes the partition
    // over (and B keeps serving throughout).
    drop(router_a);
    wait_health(&router_c.url(), SERVING, Duration::from_secs(30)).await;
    for (i, p) in prompts.iter().enumerate() {
        let got = run_stream(&mut c, chat_request(p, 16)).await.unwrap();
        assert_eq!(got.token_ids, solo[i], "prompt {i} through the router that took over");
        let got = run_stream(&mut b.clone(), chat_request(p, 16)).await.unwrap();
        assert_eq!(got.token_ids, solo[i], "prompt {i} through the router that stayed");
    }
}

/// A router with overlapping steps sends step n+1 before step n has
/// answered: the engine runs a lease's numbered steps in their order
/// whatever order they arrive in, and a continuation (`continues`) runs
/// the token its sequence committed last; releases a step carries happen
/// before it. A number already run is refused, and a step whose
/// predecessor never comes is refused, not left hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbered_steps_run_in_order_and_continue_from_the_last_token() {
    use heterospec_proto::engine::v1 as epb;
    use heterospec_proto::engine::v1::engine_client::EngineClient;

    let engine = Proc::start(&engine_args("127.0.0.1:0", &[]));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut client = loop {
        match EngineClient::connect(engine.url()).await {
            Ok(c) => break c,
            Err(e) if std::time::Instant::now() > deadline => panic!("engine: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let info = client.info(epb::InfoRequest::default()).await.unwrap().into_inner();
    let lease = client
        .attach(epb::AttachRequest {
            router_id: 7,
            router_name: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let (instance_id, lease_id) = (info.instance_id, lease.lease_id);
    let request = move |step_number: u64, seqs: Vec<epb::SeqStep>| epb::StepRequest {
        seqs,
        instance_id,
        lease_id,
        step_number,
        release_seq_ids: vec![],
    };
    let prompt = epb::SeqStep {
        seq_id: 1,
        new_token_ids: vec![1, 9690, 198, 2683, 314, 216, 34, 1046, 216, 34, 47],
        block_table: vec![1, 2],
        sampling: Some(epb::Sampling {
            temperature: 0.0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            ..Default::default()
        }),
        sample: true,
        ..Default::default()
    };
    let continuation = epb::SeqStep {
        seq_id: 1,
        block_table: vec![1, 2],
        sample: true,
        continues: true,
        ..Default::default()
    };
    // Step 2 arrives first and waits for step 1.
    let mut second_client = client.clone();
    let second = tokio::spawn(async move { second_client.step(request(2, vec![continuation])).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "step 2 ran before step 1");
    let first = client
        .step(request(1, vec![prompt.clone()]))
        .await
        .unwrap()
        .into_inner();
    let second = second.await.unwrap().unwrap().into_inner();
    assert!(second.failures.is_empty(), "{:?}", second.failures);
    assert_eq!(second.seqs.len(), 1);

    // The same tokens, stepped one by one with the token given.
    let explicit = epb::SeqStep {
        seq_id: 2,
        new_token_ids: vec![first.seqs[0].tokens[0].token_id],
        num_computed: prompt.new_token_ids.len() as u32,
        block_table: vec![3, 4],
        sample: true,
        ..Default::default()
    };
    let replay = client
        .step(request(
            3,
            vec![epb::SeqStep {
                seq_id: 2,
                block_table: vec![3, 4],
                ..prompt
            }],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay.seqs[0].tokens[0].token_id, first.seqs[0].tokens[0].token_id);
    let replay = client.step(request(4, vec![explicit])).await.unwrap().into_inner();
    assert_eq!(replay.seqs[0].tokens[0].token_id, second.seqs[0].tokens[0].token_id);

    // A number already run is refused at once.
    let again = client.step(request(4, vec![])).await.unwrap_err();
    assert_eq!(again.code(), Code::InvalidArgument, "{again}");
    // Releases carried by a step happen before it: its continuation of the
    // released sequence fails alone.
    let released = epb::StepRequest {
        release_seq_ids: vec![2],
        ..request(
            5,
            vec![epb::SeqStep {
                seq_id: 2,
                block_table: vec![3, 4],
                sample: true,
                continues: true,
                ..Default::default()
            }],
        )
    };
    let released = client.step(released).await.unwrap().into_inner();
    assert!(released.seqs.is_empty() && released.failures.len() == 1, "{released:?}");
    assert!(released.failures[0].reason.contains("unknown"), "{released:?}");

    // Step 7 without step 6: refused after a bounded wait.
    let lost = client.step(request(7, vec![])).await.unwrap_err();
    assert_eq!(lost.code(), Code::FailedPrecondition, "{lost}");
    assert!(lost.message().contains("step 6"), "{lost}");
}
