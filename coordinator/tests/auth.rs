//! A job with a token refuses every RPC that lacks it or carries another one, before any state
//! changes: refused joins take no rank, and the workers with the token then fill the world.

mod common;

use common::{empty_data, serve_with_token};
use proto::auth::{ClientAuth, JobToken};
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::JoinRequest;
use std::time::Duration;

fn req(port: u16) -> JoinRequest {
    JoinRequest {
        protocol_version: proto::PROTOCOL_VERSION,
        rank_hint: None,
        ring_addr: format!("127.0.0.1:{port}"),
        hostname: format!("host-{port}"),
        config_sha256: common::config_sha256(),
        model_sha256: "model-a".into(),
        nccl_id: Vec::new(),
    }
}

async fn client(
    url: &str,
    token: Option<&JobToken>,
) -> CoordinatorClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClientAuth>> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    CoordinatorClient::with_interceptor(ch, ClientAuth::new(token))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_workers_with_the_token_get_in() {
    let token = JobToken::new("the-right-token-0123456789").unwrap();
    let wrong = JobToken::new("a-wrong-token-0123456789").unwrap();
    let url = serve_with_token(2, empty_data(2), Duration::from_secs(10), Some(token.clone())).await;

    let e = client(&url, None).await.join(req(1)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("requires its job token"), "{}", e.message());
    let e = client(&url, Some(&wrong)).await.join(req(2)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(!e.message().contains("token-0123456789"), "the token leaked: {}", e.message());

    // The refused joins took no rank: two workers with the token complete the world of two.
    let (a, b) = (client(&url, Some(&token)).await, client(&url, Some(&token)).await);
    let (ra, rb) =
        tokio::join!(async move { a.clone().join(req(3)).await }, async move { b.clone().join(req(4)).await });
    let mut ranks = vec![ra.unwrap().into_inner().rank, rb.unwrap().into_inner().rank];
    ranks.sort();
    assert_eq!(ranks, [0, 1]);
}
