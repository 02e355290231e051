//! `worker --coordinator URL`: one rank of a distributed job. Per generation: join (rank,
//! config, peers, resume point), connect the ring (or NCCL), then the one training loop
//! (`train::run`) over this rank's job I/O, [`RankIo`]: the checkpoint to resume from fetched
//! from the coordinator, the training shard streamed and tokenized in the background, progress
//! reported (rank 0), evaluation counts of this rank's shard reported and gathered, parameter
//! checksums compared, checkpoints uploaded (rank 0; the final one publishes the model), and
//! Finish. Heartbeats run beside it; the coordinator's verdicts (restart, stop) interrupt it,
//! and the worker joins the next generation.
//!
//! The loss of a step is the mean over the *global* batch, so each micro-step scales its
//! backward by `1 / (local examples * world)` and the all-reduce is a plain sum. Clipping comes
//! after the all-reduce and every rank applies the same update to the same bits, so the ranks'
//! parameters never diverge.

use crate::checkpoint;
use crate::collective::{Collective, CollectiveError, Neighbours, Overlapped, Ring, RingHandle, RingOptions};
use crate::engine::{self, Compute, Engine, Peers};
use crate::tokenize::TextEncoder;
use crate::train::{CheckpointAt, EvalSplit, Example, Item, JobIo, Resume, RunInfo, Split};
use anyhow::Context;
use job::config::{ElasticSection, JobConfig, Task};
use job::eval::Counts;
use job::mlm::MaskSpec;
use job::pack::{Corpora, CorpusRows};
use job::progress::StepRecord;
use proto::auth::ClientAuth;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{
    beat_reply, checkpoint_part::Part, Beat, CheckpointHeader, CheckpointPart, ChecksumReport, EvalReport, EvalResult,
    ExampleBatch, FetchCheckpointRequest, FileChunk, FinishRequest, GetJobRequest, JoinRequest, Progress, ShardRequest,
    Split as WireSplit,
};
use std::net::{SocketAddr, TcpListener};
use std::ops::Range;
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
    /// Send the token in clear text (http://) to a coordinator off this machine.
    pub insecure: bool,
}

/// Refuses to send the job token in clear text off this machine: a plain http:// coordinator
/// URL whose host is not loopback, unless `insecure`.
fn check_clear_text(url: &str, token: bool, tls: bool, insecure: bool) -> anyhow::Result<()> {
    let uri: tonic::transport::Uri = url.parse().with_context(|| format!("coordinator address {url:?}"))?;
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    anyhow::ensure!(
        !token || tls || loopback || insecure,
        "the coordinator {url} is not on this machine and the URL is plain http://: the job token would cross the \
         network in clear text; use an https:// URL with --tls-ca, or pass --insecure on a network you trust"
    );
    Ok(())
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

/// A streamed batch's examples, ready for the model: texts tokenized, corpus rows wrapped in
/// `[CLS]` .. `[SEP]`; rows sent as numbers only (`data.shared_storage`) read from `local`, this
/// worker's own mapping of the split's corpus.
fn examples_of(batch: ExampleBatch, enc: &TextEncoder, local: Option<&CorpusRows>) -> anyhow::Result<Vec<Example>> {
    let index = |i: u64| u32::try_from(i).context("example index beyond 2^32");
    let mut out = Vec::with_capacity(batch.examples.len() + batch.rows.len());
    for e in batch.examples {
        let encoded = enc.encode(&e.text, e.text_pair.as_deref())?;
        out.push(Example { index: index(e.index)?, item: Item::Text { encoded, label: e.label } });
    }
    for r in batch.rows {
        if r.segments.is_empty() {
            let rows = local.context("the coordinator sent row numbers only, but this worker has no corpus mapped")?;
            anyhow::ensure!(r.index < rows.rows(), "row {} of a corpus of {} rows", r.index, rows.rows());
            out.push(crate::train::row_example(rows, r.index, enc)?);
            continue;
        }
        let n: usize = r.segments.iter().map(|&l| l as usize).sum();
        anyhow::ensure!(
            n == r.ids.len() && r.word_starts.len() == n.div_ceil(8),
            "row {}: segments of {n} tokens, {} ids and {} bytes of word starts",
            r.index,
            r.ids.len(),
            r.word_starts.len()
        );
        let words: Vec<bool> = (0..n).map(|t| r.word_starts[t / 8] >> (t % 8) & 1 == 1).collect();
        let mut at = 0;
        let segments = r.segments.iter().map(|&l| {
            let s = at..at + l as usize;
            at += l as usize;
            (&r.ids[s.clone()], &words[s])
        });
        let row = enc.row(segments)?;
        out.push(Example { index: index(r.index)?, item: Item::Row(row) });
    }
    Ok(out)
}

/// This rank's shard of an evaluation split, ready for the model.
async fn fetch_shard(
    client: &mut Client,
    me: &Member,
    split: WireSplit,
    (enc, local): (&TextEncoder, Option<&CorpusRows>),
) -> anyhow::Result<Split> {
    let req = ShardRequest { split: split as i32, epoch: 0, start: 0, ..me.shard_request() };
    let mut stream = client.stream_shard(req).await?.into_inner();
    let mut examples = Vec::new();
    while let Some(batch) = stream.message().await? {
        examples.extend(examples_of(batch, enc, local)?);
    }
    Ok(Split { path: split.as_str_name().into(), examples })
}

/// What the data feed sends: the examples of an epoch in shard order, then the epoch's end.
enum Feed {
    Example(Example),
    EpochEnd,
}

/// Streams and tokenizes this rank's training shard, epoch after epoch from `(epoch, position)`,
/// in the background, holding up to [`PREFETCH_EXAMPLES`] ready: the training loop takes its
/// batches from the returned channel and, in the steady state, never waits for data.
fn spawn_feed(
    rt: &tokio::runtime::Runtime,
    mut client: Client,
    me: Member,
    (enc, corpora): (Arc<TextEncoder>, Option<Arc<Corpora>>),
    (epoch, position): (u32, u64),
) -> tokio::sync::mpsc::Receiver<anyhow::Result<Feed>> {
    let (tx, rx) = tokio::sync::mpsc::channel(PREFETCH_EXAMPLES);
    rt.spawn(async move {
        let mut start = position;
        for epoch in epoch.. {
            let r: anyhow::Result<()> = async {
                let req = ShardRequest { split: WireSplit::Train as i32, epoch, start, ..me.shard_request() };
                let mut stream = client.stream_shard(req).await?.into_inner();
                while let Some(batch) = stream.message().await? {
                    for e in examples_of(batch, &enc, corpora.as_ref().map(|c| &c.train))? {
                        if tx.send(Ok(Feed::Example(e))).await.is_err() {
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
    (enc, mask, local): (&TextEncoder, Option<&MaskSpec>, Option<&CorpusRows>),
    split: WireSplit,
    step: u64,
    batch_size: usize,
) -> anyhow::Result<EvalResult> {
    g.phase(&format!("evaluating {}", split.as_str_name().to_lowercase()));
    let me = g.member();
    let shard = g.wait(fetch_shard(client, &me, split, (enc, local)))?;
    let mut report = EvalReport {
        rank: me.rank,
        split: split as i32,
        step,
        generation: me.generation,
        member_secret: me.secret,
        ..Default::default()
    };
    match crate::train::count_split(engine, &shard, batch_size, mask, enc.pad_id)? {
        Counts::Classes(c) => {
            (report.classes, report.confusion, report.loss_sum) = (c.classes as u32, c.confusion, c.loss_sum);
        }
        Counts::Tokens(c) => (report.tokens, report.correct, report.loss_sum) = (c.tokens, c.correct, c.loss_sum),
    }
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
            perplexity = m.perplexity,
            loss = m.loss,
            "evaluation"
        );
    }
    Ok(m)
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

/// Who this worker is in a generation: every message that acts as its rank carries all three
/// (the secret is the one its Join reply gave it).
#[derive(Clone)]
struct Member {
    rank: u32,
    generation: u64,
    secret: Vec<u8>,
}

impl Member {
    fn shard_request(&self) -> ShardRequest {
        ShardRequest {
            rank: self.rank,
            generation: self.generation,
            member_secret: self.secret.clone(),
            ..ShardRequest::default()
        }
    }
}

/// One generation of this worker: its rank, and the plumbing every wait goes through.
struct Gen<'a> {
    rt: &'a tokio::runtime::Runtime,
    rank: usize,
    generation: u64,
    secret: Vec<u8>,
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
    fn member(&self) -> Member {
        Member { rank: self.rank as u32, generation: self.generation, secret: self.secret.clone() }
    }

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
    me: Member,
    e: &ElasticSection,
    abort: Arc<Abort>,
    beats: Arc<Beats>,
) -> tokio::task::JoinHandle<()> {
    let (interval, timeout) =
        (ElasticSection::secs(e.heartbeat_interval_s), ElasticSection::secs(e.heartbeat_timeout_s));
    rt.spawn(async move {
        let beat = |b: &Beats| Beat {
            rank: me.rank,
            generation: me.generation,
            member_secret: me.secret.clone(),
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
    inner: Ring,
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
    fn reduce_scatter_sum(&mut self, buf: &mut [f32], parts: &[Range<usize>]) -> Result<(), CollectiveError> {
        self.tick();
        self.inner.reduce_scatter_sum(buf, parts)
    }
    fn all_gather(&mut self, buf: &mut [f32], parts: &[Range<usize>]) -> Result<(), CollectiveError> {
        self.tick();
        self.inner.all_gather(buf, parts)
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.tick();
        self.inner.all_reduce_sum(buf)
    }
}

impl FaultPoint {
    /// Counts this step's collectives; the "allreduce" fault point is the second.
    fn tick(&mut self) {
        let step = self.completed.load(Ordering::Relaxed) + 1;
        if self.calls.0 != step {
            self.calls = (step, 0);
        }
        self.calls.1 += 1;
        if self.calls.1 == 2 {
            job::fault::worker_point(self.rank, self.generation, "allreduce", step);
        }
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
    check_clear_text(&opts.coordinator, opts.token.is_some(), opts.tls.is_some(), opts.insecure)?;
    // One runtime thread carries the data feed, the heartbeats and the progress reports while
    // the main thread computes; the main thread enters the runtime only for calls it must wait on.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let listener = TcpListener::bind(opts.ring_listen).with_context(|| format!("binding {}", opts.ring_listen))?;
    let ring_addr = opts.ring_advertise.clone().unwrap_or(listener.local_addr()?.to_string());
    tracing::info!(listen = %listener.local_addr()?, advertised = ring_addr, "ring listener");
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
        let secret = reply.member_secret.clone();
        let g = Gen { rt: &rt, rank, generation, secret, abort: Arc::default(), beats: Arc::default() };
        *current.lock().expect("current lock") = Some(Arc::clone(&g.beats));
        let heartbeat =
            spawn_heartbeat(&rt, client.clone(), g.member(), &job.elastic, g.abort.clone(), g.beats.clone());
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

/// One generation: connect the ring (or NCCL), then train through the loop with this rank's
/// job I/O.
fn train_generation(
    g: &Gen,
    opts: &WorkerOpts,
    client: Client,
    reply: &proto::v1::JoinReply,
    job: &JobConfig,
    listener: &TcpListener,
    compute: &Compute,
) -> anyhow::Result<()> {
    tracing::info!(world = reply.world_size, "joined");
    let completed = Arc::new(AtomicU64::new(0));
    let peers = connect_peers(g, opts, reply, job, listener, compute, &completed)?;
    let t = &job.train;
    crate::kernel_threads(t.threads);
    let enc = Arc::new(TextEncoder::from_file(&job.tokenizer_path(), job.model.max_seq_len)?);
    if !reply.corpus_tokenizer.is_empty() && reply.corpus_tokenizer != enc.content_hash() {
        anyhow::bail!(
            "the corpus {} was preprocessed with another tokenizer than {} (its vocabulary or normalisation differ)",
            job.data.train.display(),
            job.tokenizer_path().display()
        );
    }
    let corpora = match (job.train.task, job.data.shared_storage) {
        (Task::Mlm, true) => Some(Arc::new(Corpora::open(job, Some((&enc.content_hash(), &job.tokenizer_path())))?)),
        _ => None,
    };
    let info = RunInfo {
        rank: g.rank,
        world: reply.world_size as usize,
        train_examples: reply.train_examples as usize,
        labels: reply.labels.clone(),
        pad_id: enc.pad_id,
        mask: crate::train::mask_spec(job, &enc)?,
        has_dev: job.data.dev.is_some(),
        has_test: job.data.test.is_some(),
    };
    let mut io = RankIo {
        g,
        client,
        reply,
        job,
        info,
        enc,
        corpora,
        completed,
        feed: None,
        progress: None,
        pending_upload: None,
        model_dir: String::new(),
    };
    crate::train::run(&mut io, job, compute, peers)
}

/// The gradient sums of this generation's world: the TCP ring on its own thread, overlapped
/// with backward, on CPUs; NCCL on GPUs; none for a world of one.
fn connect_peers(
    g: &Gen,
    opts: &WorkerOpts,
    reply: &proto::v1::JoinReply,
    job: &JobConfig,
    listener: &TcpListener,
    compute: &Compute,
    completed: &Arc<AtomicU64>,
) -> anyhow::Result<Peers> {
    let (rank, world) = (g.rank, reply.world_size as usize);
    g.phase("connecting the ring");
    anyhow::ensure!(rank < world, "the coordinator made this worker rank {rank} of a world of {world}");
    let addr = |a: &str| a.parse::<SocketAddr>().with_context(|| format!("ring peer address {a:?}"));
    let neighbours = Neighbours { rank, world, prev: addr(&reply.ring_prev)?, next: addr(&reply.ring_next)? };
    let e = &job.elastic;
    match compute {
        _ if world == 1 => Ok(Peers::Alone),
        Compute::Cpu => {
            let ring = RingOptions {
                timeout: ElasticSection::secs(e.collective_timeout_s),
                token: opts.token.clone(),
                generation: g.generation,
                cancel: Some(Arc::clone(&g.abort.flag)),
                transport: e.ring_transport,
            };
            let r = Ring::connect(neighbours, listener.try_clone()?, &ring);
            g.check()?;
            let r = r?;
            g.abort.watch_ring(r.handle()?);
            let completed = Arc::clone(completed);
            let fp = FaultPoint { inner: r, rank, generation: g.generation, completed, calls: (0, 0) };
            Ok(Peers::Ring(Overlapped::new(Box::new(fp))))
        }
        Compute::Gpu(gpu) => {
            g.phase("connecting NCCL");
            let watchdog = crate::watchdog::Watchdog::new(
                ElasticSection::secs(e.collective_timeout_s),
                crate::watchdog::abort_process(),
            );
            // Its own stream: gradient buckets are summed there while backward runs on the
            // compute stream.
            let side = gpu.ctx.new_stream()?;
            let nccl = crate::nccl::NcclRing::connect(side, rank, world, &reply.nccl_id, watchdog)?;
            Ok(Peers::Nccl(nccl, Arc::clone(&g.abort.flag)))
        }
    }
}

/// A distributed rank's job I/O: everything goes through the coordinator.
struct RankIo<'a, 'g> {
    g: &'a Gen<'g>,
    client: Client,
    reply: &'a proto::v1::JoinReply,
    job: &'a JobConfig,
    info: RunInfo,
    enc: Arc<TextEncoder>,
    /// A pretraining job's corpora, where this worker reads them itself (`data.shared_storage`).
    corpora: Option<Arc<Corpora>>,
    /// Completed steps, for the all-reduce fault point.
    completed: Arc<AtomicU64>,
    feed: Option<tokio::sync::mpsc::Receiver<anyhow::Result<Feed>>>,
    /// Rank 0's progress reports, sent in order from the runtime thread, never delaying a step.
    progress: Option<tokio::sync::mpsc::UnboundedSender<Progress>>,
    pending_upload: Option<(u64, Upload)>,
    /// Where the coordinator published the final model (rank 0).
    model_dir: String,
}

impl JobIo for RankIo<'_, '_> {
    fn info(&self) -> &RunInfo {
        &self.info
    }

    fn resume(&mut self) -> anyhow::Result<Option<Resume>> {
        let Some(r) = &self.reply.resume else { return Ok(None) };
        self.g.phase("fetching the checkpoint");
        let mut files = fetch_checkpoint(self.g, &mut self.client, &r.checkpoint)?;
        let mut take = |name: &str| {
            files.remove(name).ok_or_else(|| anyhow::anyhow!("checkpoint {} arrived without {name}", r.checkpoint))
        };
        Ok(Some(Resume {
            origin: r.checkpoint.clone().into(),
            step: r.step,
            cursor: job::checkpoints::Cursor { epoch: r.epoch, position: r.position, world_size: r.world_size },
            weights: take(checkpoint::WEIGHTS_FILE)?,
            optimizer: take(checkpoint::OPTIMIZER_FILE)?,
        }))
    }

    fn start(&mut self, step: u64, cursor: (u32, u64)) -> anyhow::Result<()> {
        let g = self.g;
        self.completed.store(step, Ordering::Relaxed);
        g.beats.step.store(step, Ordering::Relaxed);
        let data = (Arc::clone(&self.enc), self.corpora.clone());
        self.feed = Some(spawn_feed(g.rt, self.client.clone(), g.member(), data, cursor));
        if g.rank == 0 {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
            let mut c = self.client.clone();
            g.rt.spawn(async move {
                while let Some(p) = rx.recv().await {
                    if let Err(e) = c.report_progress(p).await {
                        tracing::debug!(error = %e, "progress report failed");
                    }
                }
            });
            self.progress = Some(tx);
        }
        Ok(())
    }

    fn phase(&self, what: &str) {
        self.g.phase(what);
    }

    fn check(&self) -> anyhow::Result<()> {
        self.g.check()
    }

    fn next_examples(&mut self, n: usize) -> anyhow::Result<Vec<Example>> {
        let feed = self.feed.as_mut().context("the data feed has not started")?;
        let mut local = Vec::with_capacity(n);
        while local.len() < n {
            match self.g.wait(async { Ok(feed.recv().await) })? {
                Some(Ok(Feed::Example(e))) => local.push(e),
                Some(Ok(Feed::EpochEnd)) if local.is_empty() => continue,
                Some(Ok(Feed::EpochEnd)) => break,
                Some(Err(e)) => return Err(e),
                None => anyhow::bail!("the data feed stopped"),
            }
        }
        Ok(local)
    }

    fn step_done(&mut self, engine: &mut dyn Engine, rec: &StepRecord, total_steps: u64) -> anyhow::Result<()> {
        let (g, step) = (self.g, rec.step);
        self.completed.store(step, Ordering::Relaxed);
        g.beats.step.store(step, Ordering::Relaxed);
        job::fault::worker_point(g.rank, g.generation, "step", step);
        if job::fault::worker_due(g.rank, g.generation, "perturb", step) {
            tracing::warn!(step, "TANDEM_FAULT: perturbing one parameter of this rank");
            engine.edit_params(&mut |p| p[0] += 1e-3)?;
        }
        if let Some(tx) = &self.progress {
            let _ = tx.send(Progress {
                rank: 0,
                step,
                total_steps,
                epoch: rec.epoch,
                loss: rec.loss,
                lr: rec.lr,
                grad_norm: rec.grad_norm,
                tokens: rec.tokens,
                allreduce_s: rec.allreduce_s,
                allreduce_wait_s: rec.allreduce_wait_s,
                data_wait_s: rec.data_wait_s,
                step_s: rec.step_s,
                generation: g.generation,
                member_secret: g.secret.clone(),
                forward_s: rec.forward_s,
                backward_s: rec.backward_s,
                optimizer_s: rec.optimizer_s,
            });
        }
        let every = self.job.elastic.checksum_every;
        if every > 0 && step.is_multiple_of(every) {
            g.phase("comparing parameter checksums");
            let checksum = checksum(&engine.host_params()?.params);
            let me = g.member();
            let report =
                ChecksumReport { rank: me.rank, generation: me.generation, step, checksum, member_secret: me.secret };
            let client = &mut self.client;
            g.wait(async { Ok(client.report_checksum(report).await?) })
                .with_context(|| format!("comparing parameter checksums at step {step}"))?;
        }
        Ok(())
    }

    fn evaluate(&mut self, engine: &mut dyn Engine, split: EvalSplit, step: u64) -> anyhow::Result<()> {
        let wire = match split {
            EvalSplit::Dev => WireSplit::Dev,
            EvalSplit::Test => WireSplit::Test,
        };
        let local = self.corpora.as_ref().and_then(|c| c.split(split.name()));
        let how = (&*self.enc, self.info.mask.as_ref(), local);
        evaluate(self.g, &mut self.client, engine, how, wire, step, self.job.train.eval_batch_size)?;
        Ok(())
    }

    fn checkpoint(&mut self, engine: &mut dyn Engine, at: &CheckpointAt) -> anyhow::Result<()> {
        let g = self.g;
        // Rank 0 saves; with ZeRO-1 every rank takes part in gathering the optimizer state.
        let state = if g.rank == 0 || self.job.train.zero == 1 { engine.host()? } else { None };
        if g.rank != 0 {
            return Ok(());
        }
        let header = CheckpointHeader {
            rank: 0,
            step: at.step,
            epoch: at.epoch,
            position: at.position,
            train_loss: at.train_loss,
            r#final: at.is_final,
            generation: g.generation,
            member_secret: g.secret.clone(),
        };
        if at.is_final {
            g.phase("saving the final checkpoint");
        } else {
            // At most one upload is in flight: the previous one must have landed.
            wait_upload(g, &mut self.pending_upload)?;
        }
        let (model, opt) = state.context("rank 0 holds the gathered optimizer state")?;
        let files = checkpoint::state_files(model, opt, &self.reply.labels, self.job.tokenizer_path().parent())?;
        let upload = upload_checkpoint(self.client.clone(), header, files);
        if at.is_final {
            self.model_dir = g.wait(upload)?;
        } else {
            // A snapshot of the state now; the upload runs on the runtime thread while the
            // next steps compute.
            self.pending_upload = Some((at.step, Upload(Some(g.rt.spawn(upload)))));
        }
        Ok(())
    }

    fn end_of_training(&mut self) -> anyhow::Result<()> {
        wait_upload(self.g, &mut self.pending_upload)?;
        self.feed = None;
        Ok(())
    }

    fn finish(&mut self, steps: u64) -> anyhow::Result<()> {
        self.progress = None;
        let g = self.g;
        let model_dir = std::mem::take(&mut self.model_dir);
        let me = g.member();
        let fin =
            FinishRequest { rank: me.rank, model_dir, steps, generation: me.generation, member_secret: me.secret };
        let client = &mut self.client;
        g.wait(async { Ok(client.finish(fin).await?) })?;
        tracing::info!(steps, "finished");
        if job::fault::worker_due(g.rank, g.generation, "finished", steps) {
            job::fault::stop_self("after it finished");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::check_clear_text;

    #[test]
    fn the_token_never_crosses_the_network_in_clear_text_unless_told() {
        for local in ["http://127.0.0.1:29400", "http://localhost:29400", "http://[::1]:29400"] {
            assert!(check_clear_text(local, true, false, false).is_ok(), "{local}");
        }
        let remote = "http://tandem-coordinator:29400";
        let e = check_clear_text(remote, true, false, false).unwrap_err().to_string();
        assert!(e.contains("clear text") && e.contains("--insecure"), "{e}");
        assert!(check_clear_text("http://10.0.0.7:29400", true, false, false).is_err());
        assert!(check_clear_text(remote, true, false, true).is_ok(), "--insecure");
        assert!(check_clear_text(remote, false, false, false).is_ok(), "no token to leak");
        assert!(check_clear_text("https://tandem-coordinator:29400", true, true, false).is_ok(), "TLS");
    }
}
