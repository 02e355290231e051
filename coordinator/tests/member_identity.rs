//! Per-rank identity over real gRPC: the job token lets a worker join, not act as another rank.
//! Rank 1, holding the token, cannot upload a checkpoint (as itself or as rank 0), finish for
//! rank 0, report rank 0's failure, progress or checksum; rank 0 cannot upload a checkpoint that
//! does not fit the schedule. Each is refused with a clear status and nothing on disk changes;
//! the job goes on (rank 0's real checkpoint is then written).

mod common;

use coordinator::service::{CheckpointSetup, CoordinatorService, JobInfo};
use job::checkpoints::Store;
use job::config::{Publish, TrainSection};
use job::data::{Datasets, LabelSet, Record};
use job::schedule::Schedule;
use proto::auth::{ClientAuth, JobToken, ServerAuth};
use proto::v1::checkpoint_part::Part;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::coordinator_server::CoordinatorServer;
use proto::v1::{
    beat_reply, Beat, CheckpointHeader, CheckpointPart, ChecksumReport, FileChunk, FinishRequest, JoinRequest, Progress,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::server::TcpIncoming;

type Client = CoordinatorClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClientAuth>>;

/// 48 training examples, a global batch of 12: 4 steps an epoch, 8 in all; a checkpoint every 2.
async fn serve(dir: &Path, token: &JobToken) -> String {
    let records = (0..48).map(|i| Record { text: format!("example {i}"), text_pair: None, label: i % 2 }).collect();
    let data = Datasets {
        labels: LabelSet::new(vec!["a".into(), "b".into()]).unwrap(),
        train: records,
        dev: None,
        test: None,
    };
    let train = TrainSection { epochs: 2, batch_size: common::BATCH, ..TrainSection::default() };
    let setup = CheckpointSetup {
        store: Store::open(&dir.join("checkpoints"), 2, "").unwrap(),
        resume: None,
        model_dir: dir.join("model"),
        publish: Publish::Final,
        config: serde_json::json!({"job": 1}),
        schedule: Schedule::new(&train, 48).unwrap(),
        every: 2,
    };
    let job = JobInfo { config_json: "{\"job\":1}".into(), seed: 17, batch_size: common::BATCH, max_seq_len: 16 };
    let svc = CoordinatorService::new(2, job, data, Duration::from_secs(10)).with_checkpoints(setup);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let auth = ServerAuth::new(Some(token.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(tonic::service::interceptor::InterceptedService::new(CoordinatorServer::new(svc), auth))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    url
}

async fn client(url: &str, token: &JobToken) -> Client {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    CoordinatorClient::with_interceptor(ch, ClientAuth::new(Some(token)))
}

/// Every file under `dir` with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn upload(header: CheckpointHeader) -> impl tokio_stream::Stream<Item = CheckpointPart> {
    let chunk = |name: &str| CheckpointPart {
        part: Some(Part::Chunk(FileChunk { name: name.into(), data: format!("the {name} bytes").into_bytes() })),
    };
    let parts = vec![
        CheckpointPart { part: Some(Part::Header(header)) },
        chunk("config.json"),
        chunk("model.safetensors"),
        chunk("optimizer.safetensors"),
    ];
    tokio_stream::iter(parts)
}

fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: tonic::Code, says: &str) {
    let e = r.unwrap_err();
    assert_eq!(e.code(), code, "{e:?}");
    assert!(e.message().contains(says), "{:?} does not say {says:?}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_holder_cannot_act_as_another_rank_nor_upload_off_the_schedule() {
    let dir = std::env::temp_dir().join(format!("tandem-member-identity-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let token = JobToken::new("the-job-token-0123456789").unwrap();
    let url = serve(&dir, &token).await;
    let (mut c0, mut c1) = (client(&url, &token).await, client(&url, &token).await);
    let join = |rank: u32| JoinRequest {
        protocol_version: proto::PROTOCOL_VERSION,
        rank_hint: Some(rank),
        ring_addr: format!("127.0.0.1:{}", 40000 + rank),
        hostname: format!("host-{rank}"),
        config_sha256: common::config_sha256(),
        ..Default::default()
    };
    let (r0, r1) = tokio::join!(c0.join(join(0)), c1.join(join(1)));
    let (s0, s1) = (r0.unwrap().into_inner().member_secret, r1.unwrap().into_inner().member_secret);
    assert_ne!(s0, s1);
    let before = files(&dir);

    // Step 2 is a checkpoint step: epoch 0, position 12 in a rank's shard of 6 examples a step.
    let header = |rank: u32, secret: &[u8]| CheckpointHeader {
        rank,
        step: 2,
        epoch: 0,
        position: 12,
        train_loss: 0.5,
        r#final: false,
        generation: 0,
        member_secret: secret.to_vec(),
    };
    let denied = tonic::Code::PermissionDenied;
    let not_member = "without its member secret";
    refused(c1.save_checkpoint(upload(header(1, &s1))).await, denied, "only rank 0 saves");
    refused(c1.save_checkpoint(upload(header(0, &s1))).await, denied, not_member);
    refused(c1.save_checkpoint(upload(header(0, &[]))).await, denied, not_member);
    // Rank 0 itself, off the schedule: a far-future final step (it would become `latest` and
    // the published model), a step between checkpoints, a cursor that is not the step's.
    let far = CheckpointHeader { step: 1_000_000, r#final: true, ..header(0, &s0) };
    let bad = tonic::Code::InvalidArgument;
    refused(c0.save_checkpoint(upload(far)).await, bad, "past the job's last step 8");
    let between = CheckpointHeader { step: 3, position: 18, ..header(0, &s0) };
    refused(c0.save_checkpoint(upload(between)).await, bad, "not a checkpoint step");
    let moved = CheckpointHeader { position: 0, ..header(0, &s0) };
    refused(c0.save_checkpoint(upload(moved)).await, bad, "is not step 2's (epoch 0, position 12)");

    // Finishing, failing, reporting for rank 0 under rank 1's secret.
    let fin = FinishRequest { rank: 0, model_dir: String::new(), steps: 8, generation: 0, member_secret: s1.clone() };
    refused(c1.finish(fin).await, denied, not_member);
    let beat = |secret: &[u8], failure: &str| Beat {
        rank: 0,
        generation: 0,
        step: 0,
        phase: "training".into(),
        failure: failure.into(),
        member_secret: secret.to_vec(),
    };
    let lie = beat(&s1, "rank 0 lost its GPU");
    refused(c1.heartbeat(tokio_stream::iter(vec![lie])).await, denied, not_member);
    let progress = Progress { rank: 0, step: 1, total_steps: 8, member_secret: s1.clone(), ..Default::default() };
    refused(c1.report_progress(progress).await, denied, not_member);
    let sum = ChecksumReport { rank: 0, generation: 0, step: 2, checksum: 1, member_secret: s1.clone() };
    refused(c1.report_checksum(sum).await, denied, not_member);

    assert_eq!(files(&dir), before, "a refused message changed something on disk");
    // The job was not failed by any of it: rank 0's own beat is answered CONTINUE, and its
    // checkpoint of step 2 is written.
    // (The stream stays open: a heartbeat stream that ends is a rank gone.)
    let (beats, rx) = tokio::sync::mpsc::channel(1);
    beats.send(beat(&s0, "")).await.unwrap();
    let beating = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut replies = c0.heartbeat(beating).await.unwrap().into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    assert_eq!(reply.action, beat_reply::Action::Continue as i32, "{reply:?}");
    let saved = c0.save_checkpoint(upload(header(0, &s0))).await.unwrap().into_inner();
    assert!(saved.path.ends_with("step-00000002"), "{}", saved.path);
    assert_eq!(files(&dir).len(), before.len() + 4, "the checkpoint's three files and its manifest");
    drop(beats);
    let _ = std::fs::remove_dir_all(&dir);
}
