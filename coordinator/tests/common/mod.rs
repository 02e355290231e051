//! A coordinator service on a loopback port for the gRPC tests; it runs until the test's runtime
//! ends.

use coordinator::data::{Datasets, LabelSet};
use coordinator::service::{CoordinatorService, JobInfo};
use proto::v1::coordinator_server::CoordinatorServer;
use std::time::Duration;
use tonic::transport::server::TcpIncoming;

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
    let job = JobInfo { config_json: "{\"job\":1}".into(), nccl_id: vec![], seed: 17 };
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
