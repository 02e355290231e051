//! `worker --coordinator URL`: one rank of a distributed job, top to bottom: join (rank, config,
//! peers, resume point), connect the ring, load the checkpoint (and, when resuming, the
//! checkpoint's weights and optimizer state from the coordinator), then per step: take the next
//! local batch from the prefetched shard, run the micro-batches, all-reduce the gradients once,
//! clip, schedule, AdamW; report progress (rank 0); evaluate when due; upload a checkpoint when
//! due (rank 0). At the end: evaluate dev and test, upload the final checkpoint (the coordinator
//! publishes its model), finish.
//!
//! The loss of a step is the mean over the *global* batch, so each micro-step scales its
//! backward by `1 / (local examples * world)` and the all-reduce is a plain sum. Clipping comes
//! after the all-reduce and every rank applies the same update to the same bits, so the ranks'
//! parameters never diverge.
//!
//! Everything a step depends on is a function of the step number and the restored tensors: the
//! data cursor (epoch, position) of step `s` is `(s / per_epoch, (s % per_epoch) * local_batch)`,
//! the learning rate is the schedule at `s`, the dropout masks are keyed by `(seed, s, example)`.
//! That is why a resumed run continues bit for bit.

use crate::checkpoint;
use crate::collective::{Overlapped, TcpRing};
use crate::layout::Head;
use crate::model::Batch;
use crate::optim::{linear_schedule, schedule_steps, AdamW};
use crate::tokenize::{Encoded, TextEncoder};
use crate::train::{batch_of, optimizer_step, Split};
use anyhow::Context;
use coordinator::job::JobConfig;
use proto::auth::ClientAuth;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{
    checkpoint_part::Part, CheckpointHeader, CheckpointPart, EvalReport, EvalResult, FetchCheckpointRequest, FileChunk,
    FinishRequest, JoinRequest, Progress, ShardRequest, Split as WireSplit,
};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;

pub struct WorkerOpts {
    /// The job token, sent with every RPC and proven to the ring peers.
    pub token: Option<proto::auth::JobToken>,
    pub coordinator: String,
    pub rank_hint: Option<u32>,
    pub ring_listen: SocketAddr,
    pub ring_advertise: Option<String>,
    pub timeout: Duration,
}

type Client = CoordinatorClient<InterceptedService<tonic::transport::Channel, ClientAuth>>;

/// Bytes per message of a checkpoint upload (tonic's default message limit is 4 MiB).
const UPLOAD_CHUNK: usize = 1 << 20;
/// Training examples the data feed holds ready beyond the current step's.
const PREFETCH_EXAMPLES: usize = 1024;

async fn connect(url: &str, timeout: Duration, token: Option<&proto::auth::JobToken>) -> anyhow::Result<Client> {
    let deadline = Instant::now() + timeout;
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| format!("coordinator address {url:?}"))?;
    loop {
        match endpoint.connect().await {
            Ok(ch) => {
                return Ok(
                    CoordinatorClient::with_interceptor(ch, ClientAuth::new(token)).max_decoding_message_size(64 << 20)
                )
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "coordinator not up yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to the coordinator at {url}")),
        }
    }
}

/// This rank's shard of an evaluation split, tokenized, with each example's dataset index.
async fn fetch_shard(
    client: &mut Client,
    rank: u32,
    split: WireSplit,
    enc: &TextEncoder,
) -> anyhow::Result<(Vec<u32>, Split)> {
    let mut stream =
        client.stream_shard(ShardRequest { rank, split: split as i32, epoch: 0, start: 0 }).await?.into_inner();
    let (mut ids, mut examples, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(batch) = stream.message().await? {
        for e in batch.examples {
            ids.push(u32::try_from(e.index).context("example index beyond 2^32")?);
            examples.push(enc.encode(&e.text, e.text_pair.as_deref())?);
            labels.push(e.label);
        }
    }
    Ok((ids, Split { path: split.as_str_name().into(), examples, labels }))
}

/// One training example as the feed delivers it.
struct Fed {
    index: u32,
    example: Encoded,
    label: i64,
}

/// What the data feed sends: the examples of an epoch in shard order, then the epoch's end.
enum Feed {
    Example(Fed),
    EpochEnd,
}

/// Streams and tokenizes this rank's training shard, epoch after epoch from `(epoch, position)`,
/// in the background, holding up to [`PREFETCH_EXAMPLES`] ready: the training loop takes its
/// batches from the returned channel and, in the steady state, never waits for data.
fn spawn_feed(
    rt: &tokio::runtime::Runtime,
    mut client: Client,
    rank: u32,
    enc: Arc<TextEncoder>,
    (epoch, position): (u32, u64),
) -> tokio::sync::mpsc::Receiver<anyhow::Result<Feed>> {
    let (tx, rx) = tokio::sync::mpsc::channel(PREFETCH_EXAMPLES);
    rt.spawn(async move {
        let mut start = position;
        for epoch in epoch.. {
            let r: anyhow::Result<()> = async {
                let req = ShardRequest { rank, split: WireSplit::Train as i32, epoch, start };
                let mut stream = client.stream_shard(req).await?.into_inner();
                while let Some(batch) = stream.message().await? {
                    for e in batch.examples {
                        let index = u32::try_from(e.index).context("example index beyond 2^32")?;
                        let example = enc.encode(&e.text, e.text_pair.as_deref())?;
                        let fed = Feed::Example(Fed { index, example, label: e.label });
                        if tx.send(Ok(fed)).await.is_err() {
                            return Ok(()); // training is over
                        }
                    }
                }
                Ok(())
            }
            .await;
            let msg = match r {
                Ok(()) => Ok(Feed::EpochEnd),
                Err(e) => Err(e.context(format!("streaming the training shard of epoch {epoch}"))),
            };
            let failed = msg.is_err();
            if tx.send(msg).await.is_err() || failed {
                return;
            }
            start = 0;
        }
    });
    rx
}

/// Evaluates this rank's shard of `split` at `step`, reports the counts, and returns the
/// metrics of the whole split (the reply comes once every rank has reported).
fn evaluate(
    rt: &tokio::runtime::Runtime,
    client: &mut Client,
    rank: u32,
    model: &mut crate::model::Bert,
    enc: &TextEncoder,
    split: WireSplit,
    step: u64,
    classes: usize,
    batch_size: usize,
) -> anyhow::Result<EvalResult> {
    let (_, shard) = rt.block_on(fetch_shard(client, rank, split, enc))?;
    let counts = crate::train::count_split(model, &shard, batch_size, enc.pad_id, classes)?;
    let m = rt
        .block_on(client.report_eval(EvalReport {
            rank,
            split: split as i32,
            step,
            classes: classes as u32,
            confusion: counts.confusion,
            loss_sum: counts.loss_sum,
        }))
        .with_context(|| format!("reporting the evaluation of {} at step {step}", split.as_str_name()))?
        .into_inner();
    if rank == 0 {
        tracing::info!(
            step,
            split = split.as_str_name(),
            accuracy = m.accuracy,
            macro_f1 = m.macro_f1,
            loss = m.loss,
            "evaluation"
        );
    }
    Ok(m)
}

/// The files of a checkpoint, as rank 0 uploads them.
fn checkpoint_files(
    model: &crate::model::Bert,
    opt: &AdamW,
    labels: &[String],
    tokenizer_dir: Option<&Path>,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut files = vec![
        (checkpoint::WEIGHTS_FILE.to_string(), checkpoint::weights_bytes(model)?),
        (checkpoint::OPTIMIZER_FILE.to_string(), checkpoint::optimizer_bytes(&model.layout, opt)?),
        (checkpoint::CONFIG_FILE.to_string(), checkpoint::config_json(model, Some(labels)).into_bytes()),
    ];
    if let Some(dir) = tokenizer_dir {
        for f in checkpoint::TOKENIZER_FILES {
            let p = dir.join(f);
            if p.exists() {
                files.push((f.to_string(), std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?));
            }
        }
    }
    Ok(files)
}

/// Uploads a checkpoint to the coordinator; resolves once it is complete on disk, to its path
/// there. The future owns its data: rank 0 spawns it on the runtime thread and trains on while
/// the bytes go out.
async fn upload_checkpoint(
    mut client: Client,
    header: CheckpointHeader,
    files: Vec<(String, Vec<u8>)>,
) -> anyhow::Result<String> {
    let step = header.step;
    let head = std::iter::once(CheckpointPart { part: Some(Part::Header(header)) });
    let chunks = files.into_iter().flat_map(|(name, bytes)| {
        let n = bytes.len().div_ceil(UPLOAD_CHUNK).max(1);
        (0..n).map(move |i| {
            let data = bytes[i * UPLOAD_CHUNK..((i + 1) * UPLOAD_CHUNK).min(bytes.len())].to_vec();
            CheckpointPart { part: Some(Part::Chunk(FileChunk { name: name.clone(), data })) }
        })
    });
    let saved = client
        .save_checkpoint(tokio_stream::iter(head.chain(chunks)))
        .await
        .map_err(|s| anyhow::anyhow!("the coordinator could not save the checkpoint of step {step}: {}", s.message()))?
        .into_inner();
    Ok(saved.path)
}

/// Waits for the checkpoint upload in flight, if any, and reports how it went.
fn wait_upload(
    rt: &tokio::runtime::Runtime,
    pending: &mut Option<(u64, tokio::task::JoinHandle<anyhow::Result<String>>)>,
) -> anyhow::Result<()> {
    if let Some((step, handle)) = pending.take() {
        let path = rt.block_on(handle).context("the checkpoint upload task")??;
        tracing::info!(step, path, "checkpoint saved");
    }
    Ok(())
}

/// Downloads the weights and optimizer state of the checkpoint a resumed job starts from.
fn fetch_checkpoint(
    rt: &tokio::runtime::Runtime,
    client: &mut Client,
    rank: u32,
    name: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, Vec<u8>>> {
    rt.block_on(async {
        let mut stream = client
            .fetch_checkpoint(FetchCheckpointRequest { rank, checkpoint: name.to_string() })
            .await
            .map_err(|s| anyhow::anyhow!("fetching checkpoint {name}: {}", s.message()))?
            .into_inner();
        let mut files = std::collections::BTreeMap::<String, Vec<u8>>::new();
        while let Some(chunk) = stream.message().await.with_context(|| format!("fetching checkpoint {name}"))? {
            files.entry(chunk.name).or_default().extend_from_slice(&chunk.data);
        }
        Ok(files)
    })
}

pub fn run(opts: WorkerOpts) -> anyhow::Result<()> {
    // One runtime thread carries the data feed and the progress reports while the main thread
    // computes; the main thread enters the runtime only for calls it must wait on.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let listener = TcpListener::bind(opts.ring_listen).with_context(|| format!("binding {}", opts.ring_listen))?;
    let ring_addr = opts.ring_advertise.clone().unwrap_or(listener.local_addr()?.to_string());
    let mut client = rt.block_on(connect(&opts.coordinator, opts.timeout, opts.token.as_ref()))?;
    let hostname = std::env::var("HOSTNAME").unwrap_or_else(|_| format!("pid-{}", std::process::id()));
    let reply = rt
        .block_on(client.join(JoinRequest {
            protocol_version: proto::PROTOCOL_VERSION,
            rank_hint: opts.rank_hint,
            ring_addr,
            hostname,
        }))
        .map_err(|s| anyhow::anyhow!("the coordinator refused this worker: {}", s.message()))?
        .into_inner();
    let (rank, world) = (reply.rank as usize, reply.world_size as usize);
    let job: JobConfig = serde_json::from_str(&reply.job_config_json).context("the job config from the coordinator")?;
    let span = tracing::info_span!("worker", rank);
    let _enter = span.enter();
    tracing::info!(world, "joined");
    let peers: Vec<SocketAddr> = reply
        .ring_peers
        .iter()
        .map(|p| p.parse().with_context(|| format!("ring peer address {p:?}")))
        .collect::<anyhow::Result<_>>()?;
    // The ring runs on its own thread, overlapped with backward; a world of one needs none.
    let mut ring: Option<Overlapped> = if world == 1 {
        None
    } else {
        Some(Overlapped::new(Box::new(TcpRing::connect(rank, &peers, listener, opts.timeout, opts.token.as_ref())?)))
    };

    let t = &job.train;
    if t.threads > 0 {
        rayon::ThreadPoolBuilder::new().num_threads(t.threads).build_global().ok();
    }
    let enc = Arc::new(TextEncoder::from_file(&job.tokenizer_path(), job.model.max_seq_len)?);
    let classes = reply.labels.len();
    let head = Head::Classification { num_labels: classes };
    let (mut model, _) = checkpoint::load(&job.model.path, head, t.seed)
        .with_context(|| format!("loading checkpoint {}", job.model.path.display()))?;
    if !t.dropout {
        model.cfg.disable_dropout();
    }
    anyhow::ensure!(
        t.batch_size.is_multiple_of(world),
        "train.batch_size {} is not a multiple of the world {world}",
        t.batch_size
    );
    let local_batch = t.batch_size / world;
    let micro = if t.micro_batch_size == 0 { local_batch } else { t.micro_batch_size.min(local_batch) };
    let shard_len = (reply.train_examples as usize).div_ceil(world);
    anyhow::ensure!(shard_len > 0, "the training split is empty");
    let per_epoch = shard_len.div_ceil(local_batch) as u64;
    let (total, warmup) = schedule_steps(per_epoch, t);
    let cursor_of = |step: u64| ((step / per_epoch) as u32, (step % per_epoch) * local_batch as u64);
    let mut opt = AdamW::new(model.layout.total, t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay);

    let mut step = 0u64;
    if let Some(r) = &reply.resume {
        anyhow::ensure!(
            cursor_of(r.step) == (r.epoch, r.position),
            "checkpoint {} says step {} is at epoch {} position {}, but this job's schedule puts it at {:?}",
            r.checkpoint,
            r.step,
            r.epoch,
            r.position,
            cursor_of(r.step)
        );
        let files = fetch_checkpoint(&rt, &mut client, rank as u32, &r.checkpoint)?;
        let get = |name: &str| {
            files.get(name).ok_or_else(|| anyhow::anyhow!("checkpoint {} arrived without {name}", r.checkpoint))
        };
        let origin = Path::new(&r.checkpoint);
        let report = checkpoint::load_weights(
            &mut model,
            get(checkpoint::WEIGHTS_FILE)?,
            &origin.join(checkpoint::WEIGHTS_FILE),
        )?;
        anyhow::ensure!(report.initialized.is_empty(), "checkpoint {} lacks {:?}", r.checkpoint, report.initialized);
        checkpoint::load_optimizer(
            &model.layout,
            &mut opt,
            get(checkpoint::OPTIMIZER_FILE)?,
            &origin.join(checkpoint::OPTIMIZER_FILE),
        )?;
        anyhow::ensure!(
            opt.t == r.step,
            "checkpoint {}: the optimizer has taken {} steps, the manifest says {}",
            r.checkpoint,
            opt.t,
            r.step
        );
        step = r.step;
        tracing::info!(step, checkpoint = r.checkpoint, "resumed");
    }

    // Rank 0's progress reports go out in order from the runtime thread, never delaying a step.
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
    let progress_task = rank == 0;
    if progress_task {
        let mut c = client.clone();
        rt.spawn(async move {
            while let Some(p) = progress_rx.recv().await {
                if let Err(e) = c.report_progress(p).await {
                    tracing::debug!(error = %e, "progress report failed");
                }
            }
        });
    }

    let eval_split = if job.data.dev.is_some() {
        Some(WireSplit::Dev)
    } else if job.data.test.is_some() {
        Some(WireSplit::Test)
    } else {
        None
    };
    let best_split = job.checkpoint.best_metric.split_once('/').and_then(|(s, _)| match s {
        "dev" if job.data.dev.is_some() => Some(WireSplit::Dev),
        "test" if job.data.test.is_some() => Some(WireSplit::Test),
        _ => None,
    });
    let tokenizer_dir = job.tokenizer_path().parent().map(Path::to_path_buf);
    let mut feed = spawn_feed(&rt, client.clone(), rank as u32, Arc::clone(&enc), cursor_of(step));
    let started = Instant::now();
    let mut last_loss = f64::NAN;
    let mut pending_upload = None;
    while step < total {
        // The next local batch: up to `local_batch` examples, fewer at the end of an epoch.
        let mut local: Vec<Fed> = Vec::with_capacity(local_batch);
        while local.len() < local_batch {
            match feed.blocking_recv() {
                Some(Ok(Feed::Example(f))) => local.push(f),
                Some(Ok(Feed::EpochEnd)) if local.is_empty() => continue,
                Some(Ok(Feed::EpochEnd)) => break,
                Some(Err(e)) => return Err(e),
                None => anyhow::bail!("the data feed stopped"),
            }
        }
        let lr = linear_schedule(t.lr, step, warmup, total);
        let count = local.len();
        let mut shard = Split { path: "train".into(), examples: Vec::with_capacity(count), labels: Vec::new() };
        let mut ids = Vec::with_capacity(count);
        for f in local {
            ids.push(f.index);
            shard.examples.push(f.example);
            shard.labels.push(f.label);
        }
        let positions: Vec<usize> = (0..count).collect();
        let batches: Vec<Batch> =
            positions.chunks(micro).map(|m| batch_of(&shard, m, |i| ids[i], enc.pad_id)).collect();
        let r = optimizer_step(&mut model, &mut opt, ring.as_mut(), &batches, count * world, t, step, lr)?;
        last_loss = r.loss_sum / (count * world) as f64;
        let epoch = cursor_of(step).0;
        step += 1;
        if progress_task {
            let _ = progress_tx.send(Progress {
                rank: 0,
                step,
                total_steps: total,
                epoch,
                loss: last_loss,
                lr,
                grad_norm: f64::from(r.grad_norm),
                tokens: r.tokens as u64,
                allreduce_s: r.allreduce.as_secs_f64(),
                allreduce_wait_s: r.allreduce_wait.as_secs_f64(),
            });
        }
        if step == total {
            break; // the final evaluation and checkpoint follow
        }
        let ckpt_due = job.checkpoint.every > 0 && step.is_multiple_of(job.checkpoint.every);
        let eval_due =
            if t.eval_every > 0 { step.is_multiple_of(t.eval_every) } else { step.is_multiple_of(per_epoch) };
        let mut evaluated = None;
        if let (true, Some(split)) = (eval_due, eval_split) {
            evaluate(&rt, &mut client, rank as u32, &mut model, &enc, split, step, classes, t.eval_batch_size)?;
            evaluated = Some(split);
        }
        // The best checkpoint is judged by its metric at the checkpoint's own step.
        if let (true, Some(split)) = (ckpt_due, best_split) {
            if evaluated != Some(split) {
                evaluate(&rt, &mut client, rank as u32, &mut model, &enc, split, step, classes, t.eval_batch_size)?;
            }
        }
        if ckpt_due && rank == 0 {
            let (epoch, position) = cursor_of(step);
            let header = CheckpointHeader { rank: 0, step, epoch, position, train_loss: last_loss, r#final: false };
            // A snapshot of the state now; the upload runs on the runtime thread while the next
            // steps compute. At most one is in flight: the previous one must have landed.
            wait_upload(&rt, &mut pending_upload)?;
            let files = checkpoint_files(&model, &opt, &reply.labels, tokenizer_dir.as_deref())?;
            pending_upload = Some((step, rt.spawn(upload_checkpoint(client.clone(), header, files))));
        }
    }
    wait_upload(&rt, &mut pending_upload)?;
    drop(feed);
    let train_seconds = started.elapsed().as_secs_f64();

    for (split, has) in [(WireSplit::Dev, job.data.dev.is_some()), (WireSplit::Test, job.data.test.is_some())] {
        if has {
            evaluate(&rt, &mut client, rank as u32, &mut model, &enc, split, step, classes, t.eval_batch_size)?;
        }
    }
    let mut model_dir = String::new();
    if rank == 0 {
        let (epoch, position) = cursor_of(step);
        let header = CheckpointHeader { rank: 0, step, epoch, position, train_loss: last_loss, r#final: true };
        let files = checkpoint_files(&model, &opt, &reply.labels, tokenizer_dir.as_deref())?;
        model_dir = rt.block_on(upload_checkpoint(client.clone(), header, files))?;
    }
    drop(progress_tx);
    rt.block_on(client.finish(FinishRequest { rank: rank as u32, model_dir, steps: step }))?;
    tracing::info!(steps = step, seconds = train_seconds, "finished");
    Ok(())
}
