//! Evaluation counts reported over real gRPC: every rank receives the metrics of the whole split
//! once all have reported; malformed reports are refused.

mod common;

use common::{empty_data, join_all, serve};
use job::eval::EvalCounts;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{EvalReport, Split};
use std::time::Duration;

fn report((rank, secret): (u32, &[u8]), counts: &EvalCounts) -> EvalReport {
    EvalReport {
        rank,
        member_secret: secret.to_vec(),
        split: Split::Test as i32,
        step: 20,
        classes: counts.classes as u32,
        confusion: counts.confusion.clone(),
        loss_sum: counts.loss_sum,
        generation: 0,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rank_gets_the_metrics_of_the_whole_split() {
    let url = serve(3, empty_data(2), Duration::from_secs(5)).await;
    let secrets = join_all(&url, 3).await;
    let pairs: Vec<(usize, usize)> = (0..50).map(|i| (i % 3 % 2, (i / 7) % 2)).collect();
    let mut whole = EvalCounts::new(2);
    pairs.iter().for_each(|&(a, p)| whole.add(a, p, 0.25));
    let mut handles = Vec::new();
    for rank in 0..3u32 {
        let mut part = EvalCounts::new(2);
        pairs.iter().skip(rank as usize).step_by(3).for_each(|&(a, p)| part.add(a, p, 0.25));
        let (url, secret) = (url.clone(), secrets[rank as usize].clone());
        handles.push(tokio::spawn(async move {
            let mut c = CoordinatorClient::connect(url).await.unwrap();
            c.report_eval(report((rank, &secret), &part)).await.unwrap().into_inner()
        }));
    }
    let want = whole.metrics();
    for h in handles {
        let got = h.await.unwrap();
        assert_eq!(
            (got.examples, got.accuracy, got.macro_f1, got.loss),
            (want.examples, want.accuracy, want.macro_f1, want.loss)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_reports_are_refused() {
    let url = serve(2, empty_data(2), Duration::from_secs(5)).await;
    let secrets = join_all(&url, 2).await;
    let mut c = CoordinatorClient::connect(url).await.unwrap();
    let mut r = report((0, &secrets[0]), &EvalCounts::new(2));
    r.confusion.pop();
    let e = c.report_eval(r).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("needs 4 entries"), "{}", e.message());
    let mut r = report((0, &secrets[0]), &EvalCounts::new(2));
    r.classes = 1_000_000;
    assert_eq!(c.report_eval(r).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    // Masked-LM counts (0 classes) in a classification job.
    let mlm = EvalReport {
        tokens: 10,
        correct: 3,
        classes: 0,
        confusion: vec![],
        ..report((0, &secrets[0]), &EvalCounts::new(2))
    };
    let e = c.report_eval(mlm).await.unwrap_err();
    assert!(e.message().contains("do not fit this job's task"), "{}", e.message());
    let e = c.report_eval(report((7, &secrets[0]), &EvalCounts::new(2))).await.unwrap_err();
    assert!(e.message().contains("outside the world"), "{}", e.message());
    // Rank 1's counts under rank 0's secret: a token holder cannot report for another rank.
    let e = c.report_eval(report((1, &secrets[0]), &EvalCounts::new(2))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("without its member secret"), "{}", e.message());
}
