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
use crate::collective::{Collective, Overlapped, RingHandle, TcpRing};
use crate::engine::{self, Compute, Engine, Peers};
use crate::layout::Head;
use crate::model::Batch;
use crate::optim::{linear_schedule, schedule_steps, AdamW};
use crate::tokenize::{Encoded, TextEncoder};
use crate::train::{batch_of, optimizer_step, Split};
use anyhow::Context;
use job::config::{ElasticSection, JobConfig};
use proto::auth::ClientAuth;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{
    beat_reply, checkpoint_part::Part, Beat, CheckpointHeader, CheckpointPart, ChecksumReport, EvalReport, EvalResult,
    FetchCheckpointRequest, FileChunk, FinishRequest, GetJobRequest, JoinRequest, Progress, ShardRequest,
    Split as WireSplit,
};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// TLS to the coordinator (an https:// URL).
    pub tls: Option<proto::tls::ClientTls>,
    /// Where the model computes; on a GPU, gradients are summed with NCCL instead of the ring.
    pub device: engine::Device,
}

type Client = CoordinatorClient<InterceptedService<tonic::transport::Channel, ClientAuth>>;

/// Bytes per message of a checkpoint upload (tonic's default message limit is 4 MiB).
const UPLOAD_CHUNK: usize = 1 << 20;
/// Training examples the data feed holds ready beyond the current step's.
const PREFETCH_EXAMPLES: usize = 1024;

async fn connect(
    url: &str,
    timeout: Duration,
    token: Option<&proto::auth::JobToken>,
    tls: Option<&proto::tls::ClientTls>,
) -> anyhow::Result<Client> {
    let deadline = Instant::now() + timeout;
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| format!("coordinator address {url:?}"))?;
    match tls {
        Some(t) => {
            anyhow::ensure!(url.starts_with("https://"), "--tls-ca needs an https:// coordinator URL, not {url:?}");
            endpoint = endpoint.tls_config(t.config().map_err(anyhow::Error::msg)?).context("configuring TLS")?;
        }
        None => anyhow::ensure!(
            !url.starts_with("https://"),
            "{url:?} is https: give the CA that signed the coordinator's certificate with --tls-ca"
        ),
    }
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
    (rank, generation): (u32, u64),
    split: WireSplit,
    enc: &TextEncoder,
) -> anyhow::Result<(Vec<u32>, Split)> {
    let req = ShardRequest { rank, split: split as i32, epoch: 0, start: 0, generation };
    let mut stream = client.stream_shard(req).await?.into_inner();
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
    (rank, generation): (u32, u64),
    enc: Arc<TextEncoder>,
    (epoch, position): (u32, u64),
) -> tokio::sync::mpsc::Receiver<anyhow::Result<Feed>> {
    let (tx, rx) = tokio::sync::mpsc::channel(PREFETCH_EXAMPLES);
    rt.spawn(async move {
        let mut start = position;
        for epoch in epoch.. {
            let r: anyhow::Result<()> = async {
                let req = ShardRequest { rank, split: WireSplit::Train as i32, epoch, start, generation };
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
    g: &Gen,
    client: &mut Client,
    engine: &mut dyn Engine,
    enc: &TextEncoder,
    split: WireSplit,
    step: u64,
    batch_size: usize,
) -> anyhow::Result<EvalResult> {
    g.phase(&format!("evaluating {}", split.as_str_name().to_lowercase()));
    let (_, shard) = g.wait(fetch_shard(client, (g.rank as u32, g.generation), split, enc))?;
    let counts = crate::train::count_split(engine, &shard, batch_size, enc.pad_id)?;
    let report = EvalReport {
        rank: g.rank as u32,
        split: split as i32,
        step,
        classes: counts.classes as u32,
        confusion: counts.confusion,
        loss_sum: counts.loss_sum,
        generation: g.generation,
    };
    let m = g
        .wait(async { Ok(client.report_eval(report).await?) })
        .with_context(|| format!("reporting the evaluation of {} at step {step}", split.as_str_name()))?
        .into_inner();
    if g.rank == 0 {
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
    let (step, generation) = (header.step, header.generation);
    let head = std::iter::once(CheckpointPart { part: Some(Part::Header(header)) });
    let chunks = files.into_iter().flat_map(|(name, bytes)| {
        let n = bytes.len().div_ceil(UPLOAD_CHUNK).max(1);
        (0..n).map(move |i| {
            let data = bytes[i * UPLOAD_CHUNK..((i + 1) * UPLOAD_CHUNK).min(bytes.len())].to_vec();
            CheckpointPart { part: Some(Part::Chunk(FileChunk { name: name.clone(), data })) }
        })
    });
    let parts = head.chain(chunks).enumerate().map(move |(i, p)| {
        if i == 2 {
            job::fault::worker_point(0, generation, "upload", step);
        }
        p
    });
    let saved = client
        .save_checkpoint(tokio_stream::iter(parts))
        .await
        .map_err(|s| anyhow::anyhow!("the coordinator could not save the checkpoint of step {step}: {}", s.message()))?
        .into_inner();
    Ok(saved.path)
}

/// Waits for the checkpoint upload in flight, if any, and reports how it went.
fn wait_upload(g: &Gen, pending: &mut Option<(u64, Upload)>) -> anyhow::Result<()> {
    if let Some((step, mut up)) = pending.take() {
        g.phase("uploading a checkpoint");
        let handle = up.0.take().expect("an upload in flight");
        let path = g.wait(async { handle.await.context("the checkpoint upload task")? })?;
        tracing::info!(step, path, "checkpoint saved");
    }
    Ok(())
}

/// Downloads the weights and optimizer state of the checkpoint a resumed job starts from.
fn fetch_checkpoint(
    g: &Gen,
    client: &mut Client,
    name: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, Vec<u8>>> {
    let rank = g.rank as u32;
    g.wait(async {
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

/// An upload in flight on the runtime thread; dropped unfinished (the generation failed), it is
/// cancelled.
struct Upload(Option<tokio::task::JoinHandle<anyhow::Result<String>>>);

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// Why a generation was interrupted from outside the training loop.
#[derive(Clone, Debug)]
enum Why {
    /// The coordinator restarts the job: rejoin.
    Restart(String),
    /// The job is over: finished (true), or failed elsewhere: exit.
    Stop(String, bool),
    /// The coordinator stopped answering: find it again (it may be restarting).
    Lost(String),
}

/// Interrupts a generation: set once (by the heartbeat task), it breaks the ring's connections
/// and wakes every wait of the training loop.
#[derive(Default)]
struct Abort {
    why: std::sync::Mutex<Option<Why>>,
    flag: Arc<AtomicBool>,
    notify: tokio::sync::Notify,
    ring: std::sync::Mutex<Option<RingHandle>>,
}

impl Abort {
    fn set(&self, why: Why) {
        let mut w = self.why.lock().expect("abort lock");
        if w.is_some() {
            return;
        }
        *w = Some(why);
        self.flag.store(true, Ordering::SeqCst);
        if let Some(h) = self.ring.lock().expect("ring lock").take() {
            h.shutdown();
        }
        self.notify.notify_waiters();
    }

    fn why(&self) -> Option<Why> {
        self.why.lock().expect("abort lock").clone()
    }

    fn watch_ring(&self, h: RingHandle) {
        if self.why().is_some() {
            h.shutdown();
        } else {
            *self.ring.lock().expect("ring lock") = Some(h);
        }
    }

    async fn cancelled(&self) {
        loop {
            let n = self.notify.notified();
            if self.why().is_some() {
                return;
            }
            n.await;
        }
    }
}

/// What the heartbeats say about this worker.
#[derive(Default)]
struct Beats {
    step: AtomicU64,
    phase: std::sync::Mutex<String>,
    failure: std::sync::Mutex<String>,
    failed: tokio::sync::Notify,
}

/// One generation of this worker: its rank, and the plumbing every wait goes through.
struct Gen<'a> {
    rt: &'a tokio::runtime::Runtime,
    rank: usize,
    generation: u64,
    abort: Arc<Abort>,
    beats: Arc<Beats>,
}

#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted by the coordinator")
    }
}

impl std::error::Error for Interrupted {}

impl Gen<'_> {
    /// Runs `fut` on the runtime until it completes or the generation is interrupted.
    fn wait<T>(&self, fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
        self.rt.block_on(async {
            tokio::select! {
                biased;
                r = fut => r,
                () = self.abort.cancelled() => Err(anyhow::Error::new(Interrupted)),
            }
        })
    }

    fn phase(&self, p: &str) {
        p.clone_into(&mut self.beats.phase.lock().expect("phase lock"));
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.abort.why().is_some() {
            return Err(anyhow::Error::new(Interrupted));
        }
        Ok(())
    }
}

/// Heartbeats to the coordinator until the generation ends: a beat every interval; the replies
/// (or their absence) decide whether the generation goes on.
fn spawn_heartbeat(
    rt: &tokio::runtime::Runtime,
    mut client: Client,
    (rank, generation): (u32, u64),
    e: &ElasticSection,
    abort: Arc<Abort>,
    beats: Arc<Beats>,
) -> tokio::task::JoinHandle<()> {
    let (interval, timeout) =
        (ElasticSection::secs(e.heartbeat_interval_s), ElasticSection::secs(e.heartbeat_timeout_s));
    rt.spawn(async move {
        let beat = |b: &Beats| Beat {
            rank,
            generation,
            step: b.step.load(Ordering::Relaxed),
            phase: b.phase.lock().expect("phase lock").clone(),
            failure: b.failure.lock().expect("failure lock").clone(),
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Beat>(4);
        let _ = tx.send(beat(&beats)).await;
        let mut replies = match tokio::time::timeout(
            timeout,
            client.heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return abort.set(Why::Lost(format!("the heartbeat was refused: {}", s.message()))),
            Err(_) => return abort.set(Why::Lost(format!("the coordinator did not answer within {timeout:?}"))),
        };
        let mut tick = tokio::time::interval(interval);
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if last.elapsed() > timeout {
                        return abort.set(Why::Lost(format!(
                            "no heartbeat reply from the coordinator for {:.1} s",
                            last.elapsed().as_secs_f64()
                        )));
                    }
                    let _ = tx.send(beat(&beats)).await;
                }
                () = beats.failed.notified() => {
                    let _ = tx.send(beat(&beats)).await;
                }
                m = replies.message() => match m {
                    Ok(Some(r)) => {
                        last = Instant::now();
                        match beat_reply::Action::try_from(r.action) {
                            Ok(beat_reply::Action::Continue) => {}
                            Ok(beat_reply::Action::Restart) => return abort.set(Why::Restart(r.message)),
                            _ => return abort.set(Why::Stop(r.message, r.finished)),
                        }
                    }
                    Ok(None) => return abort.set(Why::Lost("the coordinator ended the heartbeat stream".into())),
                    Err(s) => return abort.set(Why::Lost(format!("the heartbeat stream broke: {}", s.message()))),
                },
            }
        }
    })
}

/// A collective that can kill this process in the middle of an all-reduce (see
/// `job::fault`); otherwise it is the ring itself.
struct FaultPoint {
    inner: TcpRing,
    rank: usize,
    generation: u64,
    completed: Arc<AtomicU64>,
    calls: (u64, u32),
}

impl Collective for FaultPoint {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), crate::collective::CollectiveError> {
        let step = self.completed.load(Ordering::Relaxed) + 1;
        if self.calls.0 != step {
            self.calls = (step, 0);
        }
        self.calls.1 += 1;
        if self.calls.1 == 2 {
            job::fault::worker_point(self.rank, self.generation, "allreduce", step);
        }
        self.inner.all_reduce_sum(buf)
    }
}

/// A 64-bit FNV-1a of the parameters' bits: equal parameters, equal checksums.
fn checksum(params: &[f32]) -> u64 {
    params.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, p| (h ^ u64::from(p.to_bits())).wrapping_mul(0x0100_0000_01b3))
}

/// Connects to the coordinator and joins the next generation, retrying until `deadline` while
/// the coordinator is unreachable or restarting. Before each Join it fetches the job's config
/// and digests the model files that config names (`model` caches the last digest by path), so
/// that the coordinator can refuse a worker that would load another model.
fn join(
    rt: &tokio::runtime::Runtime,
    opts: &WorkerOpts,
    request: &JoinRequest,
    deadline: Instant,
    rejoining: bool,
    model: &mut Option<(Vec<std::path::PathBuf>, String)>,
) -> anyhow::Result<(Client, proto::v1::JoinReply)> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let mut client = rt.block_on(connect(&opts.coordinator, left, opts.token.as_ref(), opts.tls.as_ref()))?;
        let attempt = rt.block_on(async {
            let spec = client.get_job(GetJobRequest { protocol_version: proto::PROTOCOL_VERSION }).await?.into_inner();
            Ok::<_, tonic::Status>(spec)
        });
        let status = match attempt {
            Ok(spec) => {
                let job: JobConfig =
                    serde_json::from_str(&spec.job_config_json).context("the job config from the coordinator")?;
                let files = job::fingerprint::model_files(&job);
                let digest = match model.as_ref().filter(|(f, _)| *f == files) {
                    Some((_, d)) => d.clone(),
                    None => {
                        let d = job::fingerprint::model_sha256(&job).context("reading the model files")?;
                        *model = Some((files, d.clone()));
                        d
                    }
                };
                let req = JoinRequest {
                    config_sha256: job::fingerprint::sha256_hex(spec.job_config_json.as_bytes()),
                    model_sha256: digest,
                    ..request.clone()
                };
                match rt.block_on(client.join(req)) {
                    Ok(r) => return Ok((client, r.into_inner())),
                    Err(s) => s,
                }
            }
            Err(s) => s,
        };
        use tonic::Code;
        let retry = match status.code() {
            Code::Unavailable | Code::Aborted | Code::Unknown | Code::Cancelled => true,
            Code::ResourceExhausted | Code::DeadlineExceeded => rejoining,
            _ => false,
        };
        // GetJob and Join answer only with the codes above or these: a transport failure.
        let transport = matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Internal);
        if transport && (!retry || Instant::now() >= deadline) {
            // A transport failure: say why, with its causes (a TLS handshake error names the
            // certificate problem).
            let hint = if opts.tls.is_some() {
                "check --tls-ca (and --tls-cert / --tls-key if the coordinator requires a client certificate)"
            } else {
                "if it serves TLS, use an https:// URL and --tls-ca"
            };
            return Err(anyhow::Error::new(status))
                .with_context(|| format!("cannot reach the coordinator at {} ({hint})", opts.coordinator));
        }
        if !retry || Instant::now() >= deadline {
            anyhow::bail!("the coordinator refused this worker: {}", status.message());
        }
        tracing::info!(reason = status.message(), "joining again");
        std::thread::sleep(Duration::from_millis(300));
    }
}

pub fn run(opts: WorkerOpts) -> anyhow::Result<()> {
    // One runtime thread carries the data feed, the heartbeats and the progress reports while
    // the main thread computes; the main thread enters the runtime only for calls it must wait on.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let listener = TcpListener::bind(opts.ring_listen).with_context(|| format!("binding {}", opts.ring_listen))?;
    let ring_addr = opts.ring_advertise.clone().unwrap_or(listener.local_addr()?.to_string());
    // The host name and the process id: several local workers share a host.
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "localhost".into());
    let hostname = format!("{host}/pid-{}", std::process::id());
    let compute = opts.device.open()?;
    let mut request = JoinRequest {
        protocol_version: proto::PROTOCOL_VERSION,
        rank_hint: opts.rank_hint,
        ring_addr,
        hostname,
        ..Default::default()
    };
    // SIGTERM (a pod evicted or deleted): tell the coordinator at once, as a failure of this
    // rank (the job restarts from its last checkpoint without waiting for a heartbeat timeout),
    // and exit with 143. A worker that has finished just leaves.
    let current: Arc<std::sync::Mutex<Option<Arc<Beats>>>> = Arc::default();
    let leaving = Arc::new(AtomicBool::new(false));
    {
        let _guard = rt.enter();
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("handling SIGTERM")?;
        let (current, leaving) = (Arc::clone(&current), Arc::clone(&leaving));
        rt.spawn(async move {
            if term.recv().await.is_none() {
                return;
            }
            leaving.store(true, Ordering::SeqCst);
            let beats = current.lock().expect("current lock").clone();
            if let Some(b) = beats {
                if *b.phase.lock().expect("phase lock") == "finished" {
                    std::process::exit(0);
                }
                tracing::warn!("received SIGTERM: leaving the job");
                *b.failure.lock().expect("failure lock") = "received SIGTERM (pod eviction or shutdown)".into();
                b.failed.notify_one();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            std::process::exit(143);
        });
    }
    let mut rejoin = None;
    let mut model_digest = None;
    loop {
        if leaving.load(Ordering::SeqCst) {
            // Never rejoin after SIGTERM: the handler above ends the process.
            rt.block_on(std::future::pending::<()>());
        }
        if matches!(compute, Compute::Gpu(_)) {
            // A fresh NCCL id for every generation; the coordinator relays rank 0's.
            request.nccl_id = crate::nccl::new_id()?;
        }
        let deadline = Instant::now() + rejoin.unwrap_or(opts.timeout);
        let (client, reply) = join(&rt, &opts, &request, deadline, rejoin.is_some(), &mut model_digest)?;
        let job: JobConfig =
            serde_json::from_str(&reply.job_config_json).context("the job config from the coordinator")?;
        rejoin = Some(ElasticSection::secs(job.elastic.rejoin_timeout_s));
        let (rank, generation) = (reply.rank as usize, reply.generation);
        let span = tracing::info_span!("worker", rank, generation);
        let _enter = span.enter();
        let g = Gen { rt: &rt, rank, generation, abort: Arc::default(), beats: Arc::default() };
        *current.lock().expect("current lock") = Some(Arc::clone(&g.beats));
        let heartbeat = spawn_heartbeat(
            &rt,
            client.clone(),
            (rank as u32, generation),
            &job.elastic,
            g.abort.clone(),
            g.beats.clone(),
        );
        let result = train_generation(&g, &opts, client, &reply, &job, &listener, &compute);
        let why = match &result {
            // Done: wait for the job's end, since a failure elsewhere can still restart it.
            Ok(()) => {
                g.phase("finished");
                rt.block_on(g.abort.cancelled());
                g.abort.why()
            }
            Err(e) if g.abort.why().is_none() => {
                // This worker's own failure: tell the coordinator, and wait for its verdict.
                tracing::error!(error = format!("{e:#}"), "this generation failed");
                *g.beats.failure.lock().expect("failure lock") = format!("{e:#}");
                g.beats.failed.notify_one();
                let wait = ElasticSection::secs(2.0 * job.elastic.heartbeat_timeout_s);
                rt.block_on(async {
                    let _ = tokio::time::timeout(wait, g.abort.cancelled()).await;
                });
                g.abort.why()
            }
            Err(_) => g.abort.why(),
        };
        heartbeat.abort();
        match (result, why) {
            (Ok(()), Some(Why::Stop(..))) => return Ok(()),
            // The job finished while this worker's own Finish was on its way back.
            (Err(e), Some(Why::Stop(_, true))) if e.is::<Interrupted>() => return Ok(()),
            (Ok(()), Some(Why::Lost(msg))) => {
                tracing::warn!(reason = msg, "the coordinator went away after this worker finished");
                return Ok(());
            }
            (Err(e), Some(Why::Stop(msg, _))) => {
                return Err(if e.is::<Interrupted>() {
                    anyhow::anyhow!("the coordinator stopped the job: {msg}")
                } else {
                    e.context("the coordinator stopped the job")
                })
            }
            (_, Some(Why::Restart(msg))) => tracing::warn!(reason = msg, "the job restarts; rejoining"),
            (_, Some(Why::Lost(msg))) => tracing::warn!(reason = msg, "lost the coordinator; rejoining"),
            (Err(e), None) => {
                tracing::warn!(error = format!("{e:#}"), "no word from the coordinator after a failure; rejoining")
            }
            (Ok(()), None) => unreachable!("a finished worker waits until the abort is set"),
        }
    }
}

/// One generation: connect the ring, load the start state (the base checkpoint, or the
/// checkpoint the job resumes from), train to the end, evaluate, save, finish.
fn train_generation(
    g: &Gen,
    opts: &WorkerOpts,
    mut client: Client,
    reply: &proto::v1::JoinReply,
    job: &JobConfig,
    listener: &TcpListener,
    compute: &Compute,
) -> anyhow::Result<()> {
    let (rank, world) = (g.rank, reply.world_size as usize);
    tracing::info!(world, "joined");
    g.phase("connecting the ring");
    let peers: Vec<SocketAddr> = reply
        .ring_peers
        .iter()
        .map(|p| p.parse().with_context(|| format!("ring peer address {p:?}")))
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(
        peers.len() == world && rank < world,
        "the coordinator sent {} ring peers for a world of {world}",
        peers.len()
    );
    let e = &job.elastic;
    // The ring runs on its own thread, overlapped with backward; a world of one needs none, and
    // GPUs sum with NCCL instead.
    let completed = Arc::new(AtomicU64::new(0));
    let gpu = match compute {
        Compute::Gpu(gpu) => Some(gpu),
        Compute::Cpu => None,
    };
    let ring: Option<Overlapped> = if world == 1 || gpu.is_some() {
        None
    } else {
        let r = TcpRing::connect_generation(
            rank,
            &peers,
            listener.try_clone()?,
            ElasticSection::secs(e.collective_timeout_s),
            opts.token.as_ref(),
            g.generation,
            Some(Arc::clone(&g.abort.flag)),
        );
        g.check()?;
        let r = r?;
        g.abort.watch_ring(r.handle()?);
        let fp =
            FaultPoint { inner: r, rank, generation: g.generation, completed: Arc::clone(&completed), calls: (0, 0) };
        Some(Overlapped::new(Box::new(fp)))
    };

    let nccl = match gpu {
        Some(gpu) if world > 1 => {
            g.phase("connecting NCCL");
            let watchdog = crate::watchdog::Watchdog::new(
                ElasticSection::secs(e.collective_timeout_s),
                crate::watchdog::abort_process(),
            );
            // Its own stream: gradient buckets are summed there while backward runs on the
            // compute stream.
            let side = gpu.ctx.new_stream()?;
            Some(crate::nccl::NcclRing::connect(side, rank, world, &reply.nccl_id, watchdog)?)
        }
        _ => None,
    };

    g.phase("loading the model");
    let t = &job.train;
    if t.threads > 0 {
        rayon::ThreadPoolBuilder::new().num_threads(t.threads).build_global().ok();
    }
    let enc = Arc::new(TextEncoder::from_file(&job.tokenizer_path(), job.model.max_seq_len)?);
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
    anyhow::ensure!(shard_len > 0, "the training split is empty");
    // ceil(ceil(n / world) / (batch / world)) = ceil(n / batch): the schedule does not depend
    // on the world size, so an elastic job keeps it when it continues with fewer workers.
    let per_epoch = shard_len.div_ceil(local_batch) as u64;
    let (total, warmup) = schedule_steps(per_epoch, t);
    let cursor_of = |step: u64| ((step / per_epoch) as u32, (step % per_epoch) * local_batch as u64);
    let mut opt = AdamW::new(model.layout.total, t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay);

    let mut step = 0u64;
    if let Some(r) = &reply.resume {
        // The checkpoint's cursor is a position in the shard of the world that wrote it; the
        // same global position, position * world, is where every world resumes.
        let written_by = (r.world_size as u64).max(1);
        let (epoch, position) = cursor_of(r.step);
        anyhow::ensure!(
            (epoch, position * world as u64) == (r.epoch, r.position * written_by),
            "checkpoint {} says step {} is at epoch {} position {} of a world of {written_by}, but this job's schedule \
             puts it at {:?} of a world of {world}",
            r.checkpoint,
            r.step,
            r.epoch,
            r.position,
            (epoch, position)
        );
        g.phase("fetching the checkpoint");
        let files = fetch_checkpoint(g, &mut client, &r.checkpoint)?;
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
    completed.store(step, Ordering::Relaxed);
    g.beats.step.store(step, Ordering::Relaxed);
    // The model and the optimizer state (restored above on the host) go to the engine, with
    // the gradient sums of this world.
    let peers = match (ring, nccl) {
        (Some(r), _) => Peers::Ring(r),
        (None, Some(n)) => Peers::Nccl(n, Arc::clone(&g.abort.flag)),
        (None, None) => Peers::Alone,
    };
    let mut engine = engine::open(compute, model, opt, t.precision, peers)?;
    let engine = &mut *engine;

    // Rank 0's progress reports go out in order from the runtime thread, never delaying a step.
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
    let progress_task = rank == 0;
    if progress_task {
        let mut c = client.clone();
        g.rt.spawn(async move {
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
    let mut feed = spawn_feed(g.rt, client.clone(), (rank as u32, g.generation), Arc::clone(&enc), cursor_of(step));
    let started = Instant::now();
    let mut last_loss = f64::NAN;
    let mut pending_upload: Option<(u64, Upload)> = None;
    // What rank 0 says about a checkpoint it uploads: step, data cursor, loss, generation.
    let checkpoint_header = |step: u64, train_loss: f64, is_final: bool| {
        let (epoch, position) = cursor_of(step);
        CheckpointHeader { rank: 0, step, epoch, position, train_loss, r#final: is_final, generation: g.generation }
    };
    while step < total {
        g.check()?;
        let step_started = Instant::now();
        // The next local batch: up to `local_batch` examples, fewer at the end of an epoch.
        g.phase("waiting for data");
        let mut local: Vec<Fed> = Vec::with_capacity(local_batch);
        while local.len() < local_batch {
            let next = g.wait(async { Ok(feed.recv().await) })?;
            match next {
                Some(Ok(Feed::Example(f))) => local.push(f),
                Some(Ok(Feed::EpochEnd)) if local.is_empty() => continue,
                Some(Ok(Feed::EpochEnd)) => break,
                Some(Err(e)) => return Err(e),
                None => anyhow::bail!("the data feed stopped"),
            }
        }
        let data_wait = step_started.elapsed();
        g.phase("training");
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
        let r = optimizer_step(engine, &batches, count * world, t, step, lr);
        g.check()?;
        let r = r?;
        last_loss = r.loss_sum / (count * world) as f64;
        let epoch = cursor_of(step).0;
        step += 1;
        completed.store(step, Ordering::Relaxed);
        g.beats.step.store(step, Ordering::Relaxed);
        job::fault::worker_point(rank, g.generation, "step", step);
        if job::fault::worker_due(rank, g.generation, "perturb", step) {
            tracing::warn!(step, "TANDEM_FAULT: perturbing one parameter of this rank");
            engine.edit_params(&mut |p| p[0] += 1e-3)?;
        }
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
                data_wait_s: data_wait.as_secs_f64(),
                step_s: step_started.elapsed().as_secs_f64(),
                generation: g.generation,
            });
        }
        if e.checksum_every > 0 && step.is_multiple_of(e.checksum_every) {
            g.phase("comparing parameter checksums");
            let checksum = checksum(&engine.host()?.0.params);
            let report = ChecksumReport { rank: rank as u32, generation: g.generation, step, checksum };
            g.wait(async { Ok(client.report_checksum(report).await?) })
                .with_context(|| format!("comparing parameter checksums at step {step}"))?;
        }
        if step == total {
            break; // the final evaluation and checkpoint follow
        }
        let ckpt_due = job.checkpoint.every > 0 && step.is_multiple_of(job.checkpoint.every);
        let eval_due =
            if t.eval_every > 0 { step.is_multiple_of(t.eval_every) } else { step.is_multiple_of(per_epoch) };
        let mut evaluated = None;
        if let (true, Some(split)) = (eval_due, eval_split) {
            evaluate(g, &mut client, engine, &enc, split, step, t.eval_batch_size)?;
            evaluated = Some(split);
        }
        // The best checkpoint is judged by its metric at the checkpoint's own step.
        if let (true, Some(split)) = (ckpt_due, best_split) {
            if evaluated != Some(split) {
                evaluate(g, &mut client, engine, &enc, split, step, t.eval_batch_size)?;
            }
        }
        if ckpt_due && rank == 0 {
            let header = checkpoint_header(step, last_loss, false);
            // A snapshot of the state now; the upload runs on the runtime thread while the next
            // steps compute. At most one is in flight: the previous one must have landed.
            wait_upload(g, &mut pending_upload)?;
            let (model, opt) = engine.host()?;
            let files = checkpoint_files(model, opt, &reply.labels, tokenizer_dir.as_deref())?;
            let handle = g.rt.spawn(upload_checkpoint(client.clone(), header, files));
            pending_upload = Some((step, Upload(Some(handle))));
        }
    }
    wait_upload(g, &mut pending_upload)?;
    drop(feed);
    let train_seconds = started.elapsed().as_secs_f64();

    for (split, has) in [(WireSplit::Dev, job.data.dev.is_some()), (WireSplit::Test, job.data.test.is_some())] {
        if has {
            evaluate(g, &mut client, engine, &enc, split, step, t.eval_batch_size)?;
        }
    }
    let mut model_dir = String::new();
    if rank == 0 {
        g.phase("saving the final checkpoint");
        let header = checkpoint_header(step, last_loss, true);
        let (model, opt) = engine.host()?;
        let files = checkpoint_files(model, opt, &reply.labels, tokenizer_dir.as_deref())?;
        model_dir = g.wait(upload_checkpoint(client.clone(), header, files))?;
    }
    drop(progress_tx);
    let fin = FinishRequest { rank: rank as u32, model_dir, steps: step, generation: g.generation };
    g.wait(async { Ok(client.finish(fin).await?) })?;
    tracing::info!(steps = step, seconds = train_seconds, "finished");
    Ok(())
}
