//! A coordinator service on a loopback port for the gRPC tests; it runs until the test's runtime
//! ends.

use coordinator::service::{CoordinatorService, JobInfo};
use job::data::{Datasets, LabelSet};
use proto::v1::coordinator_server::CoordinatorServer;
use std::time::Duration;
use tonic::transport::server::TcpIncoming;

/// The global batch of the served job: each step's examples are dealt over the ranks by length.
#[allow(dead_code)]
pub const BATCH: usize = 12;

/// The digest of the job config `serve` hands out, which every Join must present.
#[allow(dead_code)]
pub fn config_sha256() -> String {
    job::fingerprint::sha256_hex(b"{\"job\":1}")
}

/// Datasets with `classes` labels and nothing in them.
#[allow(dead_code)]
pub fn empty_data(classes: usize) -> Datasets {
    let names = (0..classes).map(|i| format!("class{i}")).collect();
    Datasets { labels: LabelSet::new(names).unwrap(), train: vec![], dev: None, test: None }
}

/// Serves a job of `world` workers over `data` (job config `{"job":1}`, seed 17); returns its URL.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub async fn serve(world: usize, data: Datasets, timeout: Duration) -> String {
    serve_with_token(world, data, timeout, None).await
}

/// `serve`, requiring `token` on every RPC when given.
pub async fn serve_with_token(
    world: usize,
    data: Datasets,
    timeout: Duration,
    token: Option<proto::auth::JobToken>,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let job = JobInfo { config_json: "{\"job\":1}".into(), seed: 17, batch_size: BATCH, max_seq_len: 16 };
    let svc = CoordinatorService::new(world, job, data, timeout);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(tonic::service::interceptor::InterceptedService::new(
                CoordinatorServer::new(svc),
                proto::auth::ServerAuth::new(token),
            ))
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    format!("http://{addr}")
}

/// Joins `world` workers (real Join RPCs, all at once) so that the world of generation 0 is
/// complete; the RPCs that need a member (shards, evaluations) are accepted from then on, with
/// the member secret of each rank, returned by rank.
#[allow(dead_code)]
pub async fn join_all(url: &str, world: usize) -> Vec<Vec<u8>> {
    let mut handles = Vec::new();
    for rank in 0..world {
        let url = url.to_string();
        handles.push(tokio::spawn(async move {
            let mut c = proto::v1::coordinator_client::CoordinatorClient::connect(url).await.unwrap();
            c.join(proto::v1::JoinRequest {
                protocol_version: proto::PROTOCOL_VERSION,
                rank_hint: Some(rank as u32),
                ring_addr: format!("127.0.0.1:{}", 40000 + rank),
                hostname: format!("test-{rank}"),
                config_sha256: config_sha256(),
                model_sha256: String::new(),
                nccl_id: Vec::new(),
            })
            .await
            .unwrap()
        }));
    }
    let mut secrets = Vec::new();
    for h in handles {
        let reply = h.await.unwrap().into_inner();
        assert_eq!(reply.generation, 0);
        assert_eq!(reply.member_secret.len(), 32);
        secrets.push(reply.member_secret);
    }
    secrets
}
