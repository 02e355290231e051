//! `worker --coordinator URL`: one rank of a distributed job, top to bottom: join (rank, config,
//! peers), connect the ring, load the checkpoint, then per epoch stream this rank's shard and per
//! step run the micro-batches, all-reduce the gradients once, clip, schedule, AdamW; evaluate
//! this rank's shard of the test split and report the counts; rank 0 saves the model; finish.
//!
//! The loss of a step is the mean over the *global* batch, so each micro-step scales its
//! backward by `1 / (local examples * world)` and the all-reduce is a plain sum. Clipping comes
//! after the all-reduce and every rank applies the same update to the same bits, so the ranks'
//! parameters never diverge.

use crate::checkpoint;
use crate::collective::{Collective, Solo, TcpRing};
use crate::layout::Head;
use crate::model::Batch;
use crate::optim::{linear_schedule, schedule_steps, AdamW};
use crate::tokenize::TextEncoder;
use crate::train::{batch_of, optimizer_step, Split};
use anyhow::Context;
use coordinator::job::JobConfig;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{EvalReport, FinishRequest, JoinRequest, ShardRequest, Split as WireSplit};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

pub struct WorkerOpts {
    pub coordinator: String,
    pub rank_hint: Option<u32>,
    pub ring_listen: SocketAddr,
    pub ring_advertise: Option<String>,
    pub timeout: Duration,
}

type Client = CoordinatorClient<tonic::transport::Channel>;

async fn connect(url: &str, timeout: Duration) -> anyhow::Result<Client> {
    let deadline = Instant::now() + timeout;
    loop {
        match CoordinatorClient::connect(url.to_string()).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "coordinator not up yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to the coordinator at {url}")),
        }
    }
}

/// This rank's shard of a split, tokenized, with each example's dataset index.
async fn fetch_shard(
    client: &mut Client,
    rank: u32,
    split: WireSplit,
    epoch: u32,
    enc: &TextEncoder,
) -> anyhow::Result<(Vec<u32>, Split)> {
    let mut stream =
        client.stream_shard(ShardRequest { rank, split: split as i32, epoch, start: 0 }).await?.into_inner();
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

pub fn run(opts: WorkerOpts) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let listener = TcpListener::bind(opts.ring_listen).with_context(|| format!("binding {}", opts.ring_listen))?;
    let ring_addr = opts.ring_advertise.clone().unwrap_or(listener.local_addr()?.to_string());
    let mut client = rt.block_on(connect(&opts.coordinator, opts.timeout))?;
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
    let mut ring: Box<dyn Collective> =
        if world == 1 { Box::new(Solo) } else { Box::new(TcpRing::connect(rank, &peers, listener, opts.timeout)?) };

    let t = &job.train;
    if t.threads > 0 {
        rayon::ThreadPoolBuilder::new().num_threads(t.threads).build_global().ok();
    }
    let enc = TextEncoder::from_file(&job.tokenizer_path(), job.model.max_seq_len)?;
    let head = Head::Classification { num_labels: reply.labels.len() };
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
    let per_epoch = shard_len.div_ceil(local_batch) as u64;
    let (total, warmup) = schedule_steps(per_epoch, t);
    let mut opt = AdamW::new(model.layout.total, t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay);

    let started = Instant::now();
    let mut step = 0u64;
    'epochs: for epoch in 0.. {
        let (ids, shard) = rt.block_on(fetch_shard(&mut client, rank as u32, WireSplit::Train, epoch, &enc))?;
        let positions: Vec<usize> = (0..shard.examples.len()).collect();
        for local in positions.chunks(local_batch) {
            if step >= total {
                break 'epochs;
            }
            let lr = linear_schedule(t.lr, step, warmup, total);
            let batches: Vec<Batch> =
                local.chunks(micro).map(|m| batch_of(&shard, m, |i| ids[i], enc.pad_id)).collect();
            let r = optimizer_step(&mut model, &mut opt, ring.as_mut(), &batches, local.len() * world, t, step, lr)?;
            let (loss_sum, norm) = (r.loss_sum, r.grad_norm);
            step += 1;
            if rank == 0 && (step.is_multiple_of(50) || step == total) {
                tracing::info!(step, epoch, local_loss = loss_sum / local.len() as f64, lr, grad_norm = norm, "train");
            }
        }
        if shard_len == 0 {
            break;
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();

    let model_dir = job.output.dir.join("model");
    if rank == 0 {
        checkpoint::save(&model, &model_dir, Some(&reply.labels), job.tokenizer_path().parent())
            .with_context(|| format!("saving the model to {}", model_dir.display()))?;
    }
    for split in [WireSplit::Dev, WireSplit::Test] {
        let has = match split {
            WireSplit::Dev => job.data.dev.is_some(),
            _ => job.data.test.is_some(),
        };
        if !has {
            continue;
        }
        let (_, shard) = rt.block_on(fetch_shard(&mut client, rank as u32, split, 0, &enc))?;
        let classes = reply.labels.len();
        let counts = crate::train::count_split(&mut model, &shard, t.eval_batch_size, enc.pad_id, classes)?;
        let m = rt
            .block_on(client.report_eval(EvalReport {
                rank: rank as u32,
                split: split as i32,
                step,
                classes: classes as u32,
                confusion: counts.confusion,
                loss_sum: counts.loss_sum,
            }))?
            .into_inner();
        if rank == 0 {
            tracing::info!(
                split = split.as_str_name(),
                accuracy = m.accuracy,
                macro_f1 = m.macro_f1,
                loss = m.loss,
                "evaluation"
            );
        }
    }
    rt.block_on(client.finish(FinishRequest {
        rank: rank as u32,
        model_dir: if rank == 0 { model_dir.display().to_string() } else { String::new() },
        steps: step,
    }))?;
    tracing::info!(steps = step, seconds = train_seconds, "finished");
    Ok(())
}
