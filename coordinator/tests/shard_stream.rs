//! Data shards streamed over real gRPC: each rank receives exactly its DistributedSampler shard,
//! in order, resumable from a position; bad requests get clear errors.

mod common;

use common::{join_all, serve, BATCH};
use job::data::{Datasets, LabelSet, Record};
use job::shard;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{ShardRequest, Split};
use std::time::Duration;

fn records(n: usize) -> Vec<Record> {
    (0..n).map(|i| Record { text: format!("example {i}"), text_pair: None, label: (i % 3) as i64 }).collect()
}

async fn fetch(
    url: &str,
    (rank, secret): (u32, &[u8]),
    split: Split,
    epoch: u32,
    start: u64,
) -> Result<Vec<(u64, String, i64)>, tonic::Status> {
    let mut c = CoordinatorClient::connect(url.to_string()).await.unwrap();
    let mut stream = c
        .stream_shard(ShardRequest {
            rank,
            split: split as i32,
            epoch,
            start,
            generation: 0,
            member_secret: secret.to_vec(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    let mut expected_position = start;
    while let Some(batch) = stream.message().await? {
        assert_eq!(batch.position, expected_position);
        expected_position += batch.examples.len() as u64;
        out.extend(batch.examples.into_iter().map(|e| (e.index, e.text, e.label)));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rank_streams_its_shard_and_can_resume() {
    let data = Datasets {
        labels: LabelSet::new(vec!["a".into(), "b".into(), "c".into()]).unwrap(),
        train: records(1000),
        dev: None,
        test: Some(records(101)),
    };
    let url = serve(3, data, Duration::from_secs(5)).await;
    let secrets = join_all(&url, 3).await;
    for epoch in 0..2 {
        for rank in 0..3u32 {
            let got = fetch(&url, (rank, &secrets[rank as usize]), Split::Train, epoch, 0).await.unwrap();
            let cost: Vec<u32> = (0..1000).map(|i| shard::cost(&format!("example {i}"), None, 16)).collect();
            let balance = shard::Balance { cost: &cost, batch: BATCH / 3 };
            let want = shard::train_indices(1000, 3, rank as usize, 17, epoch, Some(balance));
            assert_ne!(
                want,
                shard::train_indices(1000, 3, rank as usize, 17, epoch, None),
                "lengths differ: a deal of its own"
            );
            assert_eq!(got.iter().map(|e| e.0 as usize).collect::<Vec<_>>(), want);
            assert!(got.iter().all(|(i, text, label)| *text == format!("example {i}") && *label == (*i % 3) as i64));
            let tail = fetch(&url, (rank, &secrets[rank as usize]), Split::Train, epoch, 300).await.unwrap();
            assert_eq!(tail, got[300..].to_vec(), "resuming at position 300");
        }
    }
    let mut seen: Vec<u64> = Vec::new();
    for rank in 0..3 {
        seen.extend(
            fetch(&url, (rank, &secrets[rank as usize]), Split::Test, 0, 0).await.unwrap().into_iter().map(|e| e.0),
        );
    }
    seen.sort();
    assert_eq!(seen, (0..101).collect::<Vec<_>>(), "evaluation counts every example once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shard_requests_are_refused() {
    let url = serve(
        2,
        Datasets {
            labels: LabelSet::new(vec!["a".into(), "b".into(), "c".into()]).unwrap(),
            train: records(10),
            dev: None,
            test: None,
        },
        Duration::from_secs(5),
    )
    .await;
    let secrets = join_all(&url, 2).await;
    let e = fetch(&url, (2, &secrets[0]), Split::Train, 0, 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = fetch(&url, (0, &secrets[0]), Split::Dev, 0, 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("no dev split"), "{}", e.message());
    let e = fetch(&url, (0, &secrets[0]), Split::Train, 0, 6).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange);
    assert_eq!(
        fetch(&url, (1, &secrets[1]), Split::Train, 0, 5).await.unwrap(),
        vec![],
        "the end of a shard is an empty stream"
    );
}
