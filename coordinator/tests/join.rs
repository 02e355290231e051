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
    for r in &replies {
        assert_eq!(r.world_size, 3);
        assert_eq!(r.job_config_json, "{\"job\":1}");
        assert_eq!(r.ring_peers[2], "127.0.0.1:1002");
        assert_eq!(r.ring_peers, replies[0].ring_peers);
    }
    // The world is full now.
    let mut c = CoordinatorClient::connect(url.clone()).await.unwrap();
    let e = c.join(req(None, 1004)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("already has all 3 workers"), "{}", e.message());
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
