//! How many tokens per second one coordinator serves to pretraining workers: the real service
//! on loopback over a preprocessed corpus, `--workers` real gRPC clients that join and stream
//! their shard of epoch 0 at once, as workers' data feeds do (each row's message decoded;
//! the rows are not masked or trained on). Prints one JSON line: rows/s, tokens/s, 128-token
//! sequences/s, and that against what one H100 consumes training BERT-base (~6,000 sequences of
//! 128 tokens a second). With `--shared` the coordinator hands out row numbers only
//! (`data.shared_storage`), and the clients read each row from their own mapping of the shards.
//!
//! `cargo run --release -p coordinator --example serve_rows -- CORPUS_DIR [--workers N]
//! [--max-seq-len L] [--rows-per-worker R] [--shared]`. The clients run in the same process, on
//! the same cores, as the coordinator.

use coordinator::service::{CoordinatorService, JobInfo};
use job::config::JobConfig;
use job::pack::Corpora;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::coordinator_server::CoordinatorServer;
use proto::v1::{JoinRequest, ShardRequest, Split};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// BERT-base training on one H100, sequences of 128 tokens a second (the figure).
const H100_SEQS_PER_S: f64 = 6000.0;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut corpus, mut workers, mut max_len, mut cap, mut shared) = (None, 2usize, 128usize, u64::MAX, false);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"));
        match a.as_str() {
            "--workers" => workers = value()?.parse()?,
            "--max-seq-len" => max_len = value()?.parse()?,
            "--rows-per-worker" => cap = value()?.parse()?,
            "--shared" => shared = true,
            _ if corpus.is_none() => corpus = Some(PathBuf::from(a)),
            _ => anyhow::bail!("unexpected argument {a}"),
        }
    }
    let corpus = corpus.ok_or_else(|| anyhow::anyhow!("usage: serve_rows CORPUS_DIR [--workers N] ..."))?;
    let set = |k: &str, v: String| format!("{k}={v}");
    let overrides = [
        set("data.train", corpus.display().to_string()),
        set("train.task", "mlm".into()),
        set("model.max_seq_len", max_len.to_string()),
        set("train.batch_size", (32 * workers).to_string()),
        set("data.shared_storage", shared.to_string()),
    ];
    let job = JobConfig::load(None, &overrides)?;
    let started = Instant::now();
    let corpora = Corpora::open(&job, None)?;
    let opened = started.elapsed();
    let rows = corpora.train.rows();
    // The clients' own mapping of the corpus, for --shared.
    let local = Arc::new(Corpora::open(&job, None)?);

    let config_json = serde_json::to_string(&job)?;
    let info = JobInfo {
        config_json: config_json.clone(),
        seed: job.train.seed,
        batch_size: 32 * workers,
        max_seq_len: max_len,
    };
    let svc = CoordinatorService::new(workers, info, corpora, Duration::from_secs(600));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(CoordinatorServer::new(svc))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
    });

    let digest = job::fingerprint::sha256_hex(config_json.as_bytes());
    let mut joins = Vec::new();
    for rank in 0..workers {
        let (url, digest) = (url.clone(), digest.clone());
        joins.push(tokio::spawn(async move {
            let mut c = CoordinatorClient::connect(url).await?;
            let req = JoinRequest {
                protocol_version: proto::PROTOCOL_VERSION,
                rank_hint: Some(rank as u32),
                ring_addr: format!("127.0.0.1:{}", 40000 + rank),
                hostname: format!("bench-{rank}"),
                config_sha256: digest,
                ..Default::default()
            };
            let secret = c.join(req).await?.into_inner().member_secret;
            anyhow::Ok((c, secret))
        }));
    }
    let mut clients = Vec::new();
    for j in joins {
        clients.push(j.await??);
    }

    let t0 = Instant::now();
    let mut streams = Vec::new();
    for (rank, (mut c, member_secret)) in clients.into_iter().enumerate() {
        let local = Arc::clone(&local);
        streams.push(tokio::spawn(async move {
            let req =
                ShardRequest { rank: rank as u32, split: Split::Train as i32, member_secret, ..Default::default() };
            let mut s = c.stream_shard(req).await?.into_inner();
            let (mut rows, mut tokens) = (0u64, 0u64);
            'stream: while let Some(batch) = s.message().await? {
                for r in batch.rows {
                    tokens += if r.segments.is_empty() {
                        local.train.segments(r.index).iter().map(|(ids, _)| ids.len() as u64).sum::<u64>()
                    } else {
                        r.ids.len() as u64
                    } + 2 * r.segments.len().max(1) as u64;
                    rows += 1;
                    if rows >= cap {
                        break 'stream;
                    }
                }
            }
            anyhow::Ok((rows, tokens))
        }));
    }
    let (mut total_rows, mut total_tokens) = (0u64, 0u64);
    for s in streams {
        let (r, t) = s.await??;
        total_rows += r;
        total_tokens += t;
    }
    let secs = t0.elapsed().as_secs_f64();
    let seqs = total_tokens as f64 / 128.0 / secs;
    println!(
        "{}",
        serde_json::json!({
            "corpus_rows": rows,
            "index_seconds": opened.as_secs_f64(),
            "workers": workers,
            "shared_storage": shared,
            "rows": total_rows,
            "seconds": secs,
            "rows_per_s": total_rows as f64 / secs,
            "tokens_per_s": total_tokens as f64 / secs,
            "seq128_per_s": seqs,
            "h100_bert_base_gpus_fed": seqs / H100_SEQS_PER_S,
        })
    );
    Ok(())
}
