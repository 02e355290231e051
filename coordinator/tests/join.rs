//! Rendezvous over real gRPC on loopback: N workers join concurrently and all receive distinct
//! ranks, the one job config and every ring address; late, mismatched and lonely workers get
//! clear errors.

mod common;

use common::{empty_data, serve};
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::JoinRequest;
use std::time::Duration;

fn req(hint: Option<u32>, port: u16) -> JoinRequest {
    JoinRequest {
        protocol_version: proto::PROTOCOL_VERSION,
        rank_hint: hint,
        ring_addr: format!("127.0.0.1:{port}"),
        hostname: format!("w{port}"),
        config_sha256: common::config_sha256(),
        model_sha256: "model-a".into(),
        // Each worker's own NCCL id (as a CUDA worker makes one): 128 bytes marked by its port.
        nccl_id: vec![(port % 251) as u8; 128],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_rendezvous_and_receive_ranks_config_and_peers() {
    let url = serve(3, empty_data(2), Duration::from_secs(10)).await;
    let mut handles = Vec::new();
    for (hint, port) in [(None, 1001), (Some(2), 1002), (None, 1003)] {
        let url = url.clone();
        handles.push(tokio::spawn(async move {
            let mut c = CoordinatorClient::connect(url).await.unwrap();
            c.join(req(hint, port)).await.unwrap().into_inner()
        }));
    }
    let mut replies = Vec::new();
    for h in handles {
        replies.push(h.await.unwrap());
    }
    let mut ranks: Vec<u32> = replies.iter().map(|r| r.rank).collect();
    ranks.sort();
    assert_eq!(ranks, [0, 1, 2]);
    assert_eq!(replies[1].rank, 2, "the rank hint is honoured");
    // Every rank gets the NCCL id of the worker that became rank 0.
    let rank0_port = [1001u16, 1002, 1003][replies.iter().position(|r| r.rank == 0).unwrap()];
    for r in &replies {
        assert_eq!(r.nccl_id, vec![(rank0_port % 251) as u8; 128], "rank 0's NCCL id is relayed");
        assert_eq!(r.world_size, 3);
        assert_eq!(r.job_config_json, "{\"job\":1}");
    }
    // Each rank gets its ring neighbours' addresses (rank - 1 and rank + 1), not the world's.
    let addr_of = |rank: u32| {
        let i = replies.iter().position(|r| r.rank == rank).unwrap();
        format!("127.0.0.1:{}", [1001, 1002, 1003][i])
    };
    for r in &replies {
        assert_eq!(r.ring_prev, addr_of((r.rank + 2) % 3));
        assert_eq!(r.ring_next, addr_of((r.rank + 1) % 3));
    }
    // The world is full now.
    let mut c = CoordinatorClient::connect(url.clone()).await.unwrap();
    let e = c.join(req(None, 1004)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("already has all 3 workers"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nccl_id_of_the_wrong_size_is_refused() {
    let url = serve(2, empty_data(2), Duration::from_secs(10)).await;
    let mut c = CoordinatorClient::connect(url).await.unwrap();
    let mut r = req(None, 2101);
    r.nccl_id = vec![1; 129];
    let e = c.join(r).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("128 bytes"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_protocol_version_is_refused() {
    let url = serve(2, empty_data(2), Duration::from_secs(10)).await;
    let mut c = CoordinatorClient::connect(url).await.unwrap();
    let mut r = req(None, 2001);
    r.protocol_version += 1;
    let e = c.join(r).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("protocol version"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendezvous_that_never_completes_names_the_missing_ranks() {
    let url = serve(3, empty_data(2), Duration::from_millis(300)).await;
    let mut c = CoordinatorClient::connect(url).await.unwrap();
    let e = c.join(req(Some(1), 3001)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
    assert!(e.message().contains("ranks [0, 2] never joined"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_times_out_or_hangs_up_frees_its_rank() {
    let url = serve(2, empty_data(2), Duration::from_millis(400)).await;
    // Rank 1 joins, nobody else comes: its Join times out, and rank 1 is free again.
    let mut c = CoordinatorClient::connect(url.clone()).await.unwrap();
    let e = c.join(req(Some(1), 2001)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
    // Rank 0 joins and hangs up while waiting: rank 0 is free again too.
    let u = url.clone();
    let waiting =
        tokio::spawn(async move { CoordinatorClient::connect(u).await.unwrap().join(req(Some(0), 2002)).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    waiting.abort();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Their restarted selves take the same ranks and complete the world.
    let (u0, u1) = (url.clone(), url.clone());
    let a = tokio::spawn(async move { CoordinatorClient::connect(u0).await.unwrap().join(req(Some(0), 2003)).await });
    let b = tokio::spawn(async move { CoordinatorClient::connect(u1).await.unwrap().join(req(Some(1), 2004)).await });
    let (a, b) = (a.await.unwrap().unwrap().into_inner(), b.await.unwrap().unwrap().into_inner());
    assert_eq!((a.rank, b.rank), (0, 1));
    assert_eq!((a.ring_prev.as_str(), a.ring_next.as_str()), ("127.0.0.1:2004", "127.0.0.1:2004"));
    assert_eq!(b.ring_next, "127.0.0.1:2003");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_config_or_model_is_refused_and_takes_no_rank() {
    let url = serve(2, empty_data(2), Duration::from_secs(10)).await;
    // The first admitted worker's model digest becomes the job's (this coordinator has no model
    // files of its own to read).
    let first = {
        let url = url.clone();
        tokio::spawn(async move { CoordinatorClient::connect(url).await.unwrap().join(req(Some(0), 3001)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = CoordinatorClient::connect(url.clone()).await.unwrap();
    let mut other_model = req(Some(1), 3002);
    other_model.model_sha256 = "model-b".into();
    let e = c.join(other_model).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("model files") && e.message().contains("model-b"), "{}", e.message());
    let mut other_config = req(Some(1), 3003);
    other_config.config_sha256 = "0".repeat(64);
    let e = c.join(other_config).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("another job config"), "{}", e.message());
    // Neither took rank 1: a matching worker gets it and the world completes.
    let reply = c.join(req(Some(1), 3004)).await.unwrap().into_inner();
    assert_eq!((reply.rank, reply.world_size), (1, 2));
    assert_eq!(first.await.unwrap().unwrap().into_inner().rank, 0);
}

/// An NCCL id of another length than NCCL's 128 bytes, and a CPU worker (no id) in a world of
/// CUDA workers, are refused at Join with what is wrong, taking no rank.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_nccl_id_and_a_mixed_world_are_refused() {
    let url = serve(2, empty_data(2), Duration::from_secs(10)).await;
    let mut c = CoordinatorClient::connect(url.clone()).await.unwrap();
    let short = JoinRequest { nccl_id: vec![1; 100], ..req(Some(0), 2001) };
    let e = c.join(short).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("128 bytes (none on CPU); this worker sent 100"), "{}", e.message());
    // A CUDA worker holds slot 0 (its Join waits for the world); a CPU one is refused.
    let waiting = tokio::spawn(async move { c.join(req(Some(0), 2002)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c2 = CoordinatorClient::connect(url).await.unwrap();
    let cpu = JoinRequest { nccl_id: vec![], ..req(Some(1), 2003) };
    let e = c2.join(cpu).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("this worker computes on CPU and w2002 on CUDA"), "{}", e.message());
    // A CUDA worker completes the world.
    let reply = c2.join(req(Some(1), 2004)).await.unwrap().into_inner();
    assert_eq!((reply.rank, reply.world_size), (1, 2));
    assert_eq!(waiting.await.unwrap().unwrap().into_inner().rank, 0);
}
