//! The coordinator's gRPC service: a thin adapter between the protocol and the job's state
//! machine ([`crate::state::JobState`]). Only this module (and the worker's client) sees the
//! generated proto types and `tonic::Status`; it converts them to the state's plain types and
//! back, does the I/O the state asks for (the checkpoint directory, the restart count on disk,
//! the heartbeat streams, the waiting calls) outside the state's lock, and streams the data and
//! the checkpoint files. See `state.rs` for the lock order.

use crate::gather::EvalSplit;
use crate::rendezvous::{JoinError, Joiner, Rendezvous};
use crate::state::{Effect, Finished, JobState, JoinWait, Limits, Refusal};
use crate::telemetry::{CheckpointStatus, JobStatus, Telemetry, WorkerStatus, CURVE_POINTS};
use job::checkpoints::{self, Manifest, Partial, Store};
use job::config::ElasticSection;
use job::data::Datasets;
use job::eval::{Counts, EvalCounts, MlmCounts};
use job::pack::{Corpora, CorpusRows};
use job::progress::{ProgressBoard, StepRecord};
use job::schedule::{CheckpointAt, Schedule};
use job::shard;
use proto::v1::checkpoint_part::Part;
use proto::v1::coordinator_server::Coordinator;
use proto::v1::{
    beat_reply, Beat, BeatReply, CheckpointPart, CheckpointSaved, ChecksumReport, ChecksumResult, EvalReport,
    EvalResult, Example, ExampleBatch, FetchCheckpointRequest, FileChunk, FinishReply, FinishRequest, GetJobRequest,
    JobSpec, JoinReply, JoinRequest, Progress, ProgressReply, ResumePoint, ShardRequest, Split, TokenRow,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

pub use crate::state::Restarts;

/// The size of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

/// What every worker of the job receives at rendezvous.
#[derive(Clone, Debug)]
pub struct JobInfo {
    /// The resolved job config as JSON.
    pub config_json: String,
    /// The seed of the epoch shuffles.
    pub seed: u64,
    /// The global batch, whose examples each step deals evenly over the ranks by length (0:
    /// round-robin), and the sequence length that caps an example's length.
    pub batch_size: usize,
    pub max_seq_len: usize,
}

/// Examples per streamed message, and messages read ahead of the worker.
const STREAM_BATCH: usize = 256;
const READ_AHEAD: usize = 4;
/// Bytes per message when a checkpoint file is streamed to a worker.
const FILE_CHUNK: usize = 1 << 20;

/// Where checkpoints go and where the job resumes from.
#[derive(Debug)]
pub struct CheckpointSetup {
    pub store: Store,
    /// The checkpoint every worker starts from: its directory and manifest.
    pub resume: Option<(PathBuf, Manifest)>,
    /// Where the model is published at the end (`<output.dir>/model`), and which one.
    pub model_dir: PathBuf,
    pub publish: job::config::Publish,
    /// The resolved job config (recorded in every manifest).
    pub config: serde_json::Value,
    /// The run's schedule and `checkpoint.every`: an upload must be a checkpoint of it.
    pub schedule: Schedule,
    pub every: u64,
}

/// The largest class count an evaluation report may carry (a bound on message-driven allocation).
const MAX_CLASSES: u32 = 4096;

/// What the job's generations say to the heartbeat streams: the current generation, and the
/// end of the job once it is decided (Ok: finished; Err: why it failed).
#[derive(Clone, Debug, PartialEq)]
pub struct Signal {
    pub generation: u64,
    pub end: Option<Result<(), String>>,
}

pub const STATE_FILE: &str = "coordinator.json";

/// What the coordinator serves: a fine-tuning job's labelled splits, or a pretraining job's
/// corpora (memory-mapped, read a row at a time).
pub enum Data {
    Labelled(Datasets),
    Corpus(Box<Corpora>),
}

impl From<Datasets> for Data {
    fn from(d: Datasets) -> Data {
        Data::Labelled(d)
    }
}

impl From<Corpora> for Data {
    fn from(c: Corpora) -> Data {
        Data::Corpus(Box::new(c))
    }
}

impl Data {
    /// Examples (rows) in a split; `None` where the job has no such split.
    /// How many examples (or corpus rows) `split` holds; None: the job has no such split.
    pub fn len(&self, split: Split) -> Option<usize> {
        match self {
            Data::Labelled(d) => match split {
                Split::Train => Some(d.train.len()),
                Split::Dev => d.dev.as_ref().map(Vec::len),
                Split::Test => d.test.as_ref().map(Vec::len),
            },
            Data::Corpus(c) => Self::corpus(c, split).map(|r| r.rows() as usize),
        }
    }

    fn corpus(c: &Corpora, split: Split) -> Option<&CorpusRows> {
        match split {
            Split::Train => Some(&c.train),
            Split::Dev => c.dev.as_ref(),
            Split::Test => c.test.as_ref(),
        }
    }

    /// The batch of `split`'s examples at `indices`; `position` is the first one's in the shard.
    fn batch(&self, split: Split, indices: &[usize], position: u64) -> ExampleBatch {
        let mut batch = ExampleBatch { position, ..Default::default() };
        match self {
            Data::Labelled(d) => {
                let records = match split {
                    Split::Train => &d.train,
                    Split::Dev => d.dev.as_ref().expect("checked by the caller"),
                    Split::Test => d.test.as_ref().expect("checked by the caller"),
                };
                batch.examples = indices
                    .iter()
                    .map(|&i| {
                        let rec = &records[i];
                        Example {
                            index: i as u64,
                            text: rec.text.clone(),
                            text_pair: rec.text_pair.clone(),
                            label: rec.label,
                        }
                    })
                    .collect();
            }
            // With shared storage the workers read the rows themselves: only their numbers go.
            Data::Corpus(c) if c.shared => {
                batch.rows = indices.iter().map(|&i| TokenRow { index: i as u64, ..Default::default() }).collect();
            }
            Data::Corpus(c) => {
                let rows = Self::corpus(c, split).expect("checked by the caller");
                batch.rows = indices.iter().map(|&i| token_row(rows, i as u64)).collect();
            }
        }
        batch
    }
}

/// Row `r` of a corpus as the wire carries it.
fn token_row(rows: &CorpusRows, r: u64) -> TokenRow {
    let mut row = TokenRow { index: r, ..Default::default() };
    let mut words = Vec::new();
    for (ids, starts) in rows.segments(r) {
        row.segments.push(ids.len() as u32);
        row.ids.extend(ids);
        words.extend(starts);
    }
    row.word_starts = vec![0; words.len().div_ceil(8)];
    for (t, _) in words.iter().enumerate().filter(|(_, &w)| w) {
        row.word_starts[t / 8] |= 1 << (t % 8);
    }
    row
}

pub struct Inner {
    /// The job's lifecycle: the one lock of its state (see `state.rs`).
    state: Mutex<JobState>,
    /// Woken when the rendezvous changes (waiting joins) and when a gather completes
    /// (waiting evaluation and checksum reports); both on every restart and at the end.
    changed: Notify,
    gathered: Notify,
    /// Notified once the job has ended (see [`Inner::outcome`]).
    pub all_finished: Notify,
    signal: tokio::sync::watch::Sender<Signal>,
    job: JobInfo,
    data: Data,
    /// Each training example's length, by which a step's examples are dealt ([`shard::cost`]).
    train_cost: Vec<u32>,
    /// How long a call that waits for every rank (Join, ReportEval) waits.
    gather_timeout: Duration,
    elastic: ElasticSection,
    ckpt: Option<CheckpointSetup>,
    progress: Mutex<Option<ProgressBoard>>,
    /// The step and evaluation history behind the status page, /metrics and TensorBoard.
    telemetry: Mutex<Telemetry>,
    /// The job's output directory (for the status page).
    output_dir: PathBuf,
    /// Checkpoint uploads being received now.
    uploads: std::sync::atomic::AtomicUsize,
    /// The last epoch's training shards of every rank, by (epoch, world): computed once for the
    /// world, not once a stream (an O(n) permutation for each of thousands of ranks).
    train_shards: tokio::sync::Mutex<Option<EpochShards>>,
    /// Held while the checkpoint directory changes or is chosen from: a commit and its pruning,
    /// or a restart's choice of checkpoint, one at a time, so that pruning never deletes the
    /// checkpoint a new generation starts from. Taken before the state lock, never after.
    dir_lock: Mutex<()>,
}

/// Every rank's training shard of an epoch, by (epoch, world).
type EpochShards = ((u32, usize), Arc<Vec<Vec<usize>>>);

/// The gRPC service; clones share one job.
#[derive(Clone)]
pub struct CoordinatorService {
    inner: Arc<Inner>,
}

impl std::ops::Deref for CoordinatorService {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl CoordinatorService {
    pub fn new(world: usize, job: JobInfo, data: impl Into<Data>, gather_timeout: Duration) -> Self {
        let data = data.into();
        let (signal, _) = tokio::sync::watch::channel(Signal { generation: 0, end: None });
        let config_sha256 = job::fingerprint::sha256_hex(job.config_json.as_bytes());
        let elastic = ElasticSection::default();
        let limits = Limits { gather_timeout, elastic: elastic.clone() };
        let rdv = Rendezvous::new(world, proto::PROTOCOL_VERSION);
        let state = JobState::new(rdv, limits, Restarts::default(), config_sha256);
        CoordinatorService {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                changed: Notify::new(),
                gathered: Notify::new(),
                all_finished: Notify::new(),
                signal,
                // Packed rows are of one length; a corpus's rows are not dealt by length.
                train_cost: match &data {
                    Data::Labelled(d) => {
                        d.train.iter().map(|r| shard::cost(&r.text, r.text_pair.as_deref(), job.max_seq_len)).collect()
                    }
                    Data::Corpus(_) => Vec::new(),
                },
                job,
                data,
                gather_timeout,
                elastic,
                ckpt: None,
                progress: Mutex::default(),
                telemetry: Mutex::default(),
                output_dir: PathBuf::new(),
                uploads: Default::default(),
                train_shards: tokio::sync::Mutex::default(),
                dir_lock: Mutex::default(),
            }),
        }
    }

    fn setup_mut(&mut self) -> &mut Inner {
        Arc::get_mut(&mut self.inner).expect("the service is configured before it serves")
    }

    /// Failure detection and recovery: `min_workers` of `elastic` up to the world given to
    /// [`CoordinatorService::new`], restarts, timeouts; `restarts` continues an earlier count.
    pub fn with_elastic(mut self, elastic: ElasticSection, batch_size: usize, restarts: Restarts) -> Self {
        let inner = self.setup_mut();
        let state = inner.state.get_mut().expect("state lock");
        let max = state.max_workers();
        let min = if elastic.min_workers == 0 { max } else { elastic.min_workers.min(max) };
        let rdv = Rendezvous::elastic(
            min,
            max,
            batch_size,
            ElasticSection::secs(elastic.last_call_s),
            proto::PROTOCOL_VERSION,
            restarts.generation,
        );
        inner.signal.send_replace(Signal { generation: restarts.generation, end: None });
        state.reconfigure(rdv, Limits { gather_timeout: inner.gather_timeout, elastic: elastic.clone() }, restarts);
        inner.elastic = elastic;
        self
    }

    /// Accepts checkpoints from rank 0 (without, SaveCheckpoint is refused) and resumes from one.
    pub fn with_checkpoints(mut self, setup: CheckpointSetup) -> Self {
        let inner = self.setup_mut();
        inner.state.get_mut().expect("state lock").set_resume(setup.resume.clone());
        inner.ckpt = Some(setup);
        self
    }

    /// The digest of the model files every worker must load (see `fingerprint`).
    pub fn with_model_sha256(mut self, digest: Option<String>) -> Self {
        self.setup_mut().state.get_mut().expect("state lock").set_model_sha256(digest);
        self
    }

    /// Shows rank 0's progress reports.
    pub fn with_progress(mut self, board: ProgressBoard) -> Self {
        *self.setup_mut().progress.get_mut().expect("progress lock") = Some(board);
        self
    }

    /// Keeps the job's history in `telemetry` (made with TensorBoard output, say) and names
    /// its output directory on the status page.
    pub fn with_telemetry(mut self, telemetry: Telemetry, output_dir: PathBuf) -> Self {
        let inner = self.setup_mut();
        *inner.telemetry.get_mut().expect("telemetry lock") = telemetry;
        inner.output_dir = output_dir;
        self
    }

    /// Every rank's training shard of `epoch` in a world of `world` (of `n` examples), computed on
    /// the blocking pool once and kept until another epoch or world is asked for.
    async fn train_shards(&self, n: usize, world: usize, epoch: u32) -> Result<Arc<Vec<Vec<usize>>>, Status> {
        let mut cache = self.train_shards.lock().await;
        if let Some((key, shards)) = cache.as_ref() {
            if *key == (epoch, world) {
                return Ok(Arc::clone(shards));
            }
        }
        let inner = Arc::clone(&self.inner);
        let shards = tokio::task::spawn_blocking(move || {
            let (cost, batch) = (&inner.train_cost, inner.job.batch_size);
            let balance = (!cost.is_empty() && batch > 0 && batch.is_multiple_of(world))
                .then(|| shard::Balance { cost, batch: batch / world });
            shard::train_shards(n, world, inner.job.seed, epoch, balance)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let shards = Arc::new(shards);
        *cache = Some(((epoch, world), Arc::clone(&shards)));
        Ok(shards)
    }

    /// Watches the job's generations on the current runtime: closes elastic worlds when their
    /// last call is over, declares a rank failed when its heartbeats stop or its progress
    /// stalls, and ends the job when a generation cannot gather its workers in time.
    pub fn spawn_monitor(&self) {
        let svc = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while svc.signal.borrow().end.is_none() {
                tick.tick().await;
                let effect = svc.state().tick(Instant::now());
                svc.apply(effect).await;
            }
        });
    }

    /// Does what the state machine asked for, outside its lock.
    async fn apply(&self, effect: Option<Effect>) {
        match effect {
            None => {}
            // Reading the checkpoint directory hashes whole checkpoints: a blocking thread.
            Some(e @ Effect::Restarting { .. }) => {
                let inner = Arc::clone(&self.inner);
                let _ = tokio::task::spawn_blocking(move || inner.apply_blocking(Some(e))).await;
            }
            e => self.apply_blocking(e),
        }
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().expect("state lock")
    }

    /// Does what the state machine asked for (blocking: a restart reads the checkpoint
    /// directory); called without the state lock.
    fn apply_blocking(&self, mut effect: Option<Effect>) {
        while let Some(e) = effect.take() {
            match e {
                Effect::Started => self.changed.notify_waiters(),
                Effect::Gathered => self.gathered.notify_waiters(),
                Effect::Restarting { generation, reason } => {
                    let _dir = self.dir_lock.lock().expect("checkpoint directory lock");
                    let resume = self.ckpt.as_ref().and_then(|c| match c.store.latest() {
                        Ok(latest) => latest,
                        Err(e) => {
                            tracing::error!(error = %e, "reading the checkpoint directory");
                            None
                        }
                    });
                    let from = resume.as_ref().map_or("the start (no checkpoint yet)".to_string(), |(d, m)| {
                        format!("{} (step {})", d.file_name().unwrap_or_default().to_string_lossy(), m.step)
                    });
                    let next = self.state().restart(generation, resume, Instant::now());
                    if next.is_some() {
                        tracing::warn!(
                            reason,
                            generation = generation + 1,
                            max_restarts = self.elastic.max_restarts,
                            "restarting the job from {from}; waiting for the workers to rejoin"
                        );
                    }
                    effect = next;
                }
                Effect::Restarted { restarts, step, dir } => {
                    if let Some(c) = &self.ckpt {
                        if let Err(e) = write_state(c.store.dir(), &restarts) {
                            tracing::error!(error = %e, "saving the coordinator's restart count");
                        }
                    }
                    let name = dir.map(|d| d.display().to_string()).unwrap_or_default();
                    self.telemetry.lock().expect("telemetry lock").record_restart(step, &name);
                    self.signal.send_replace(Signal { generation: restarts.generation, end: None });
                    self.changed.notify_waiters();
                    self.gathered.notify_waiters();
                }
                Effect::Ended => {
                    let (generation, outcome, stopping) = {
                        let s = self.state();
                        (s.generation(), s.outcome(), s.is_stopping())
                    };
                    match &outcome {
                        Some(Err(why)) if stopping => tracing::warn!(reason = %why, "the job stopped"),
                        Some(Err(why)) => tracing::error!(reason = %why, "the job failed"),
                        _ => {}
                    }
                    self.signal.send_replace(Signal { generation, end: outcome });
                    self.changed.notify_waiters();
                    self.gathered.notify_waiters();
                    self.all_finished.notify_one();
                }
            }
        }
    }

    /// The checkpoints this run wrote, by step.
    pub fn saved_checkpoints(&self) -> BTreeMap<u64, PathBuf> {
        self.state().saved_checkpoints().clone()
    }

    /// The final model's directory, once the final checkpoint is published.
    pub fn final_model(&self) -> Option<PathBuf> {
        self.state().final_model().cloned()
    }

    /// The progress board's totals (smoothed loss, seconds, tokens; see `ProgressBoard::totals`).
    pub fn progress_totals(&self) -> Option<(f64, f64, u64)> {
        self.progress.lock().expect("progress lock").as_ref().map(ProgressBoard::totals)
    }

    pub fn finish_progress(&self) {
        if let Some(p) = self.progress.lock().expect("progress lock").as_ref() {
            p.finish();
        }
    }

    /// How the job ended: Ok once every rank finished, Err with the reason it was given up.
    /// None while it runs.
    pub fn outcome(&self) -> Option<Result<(), String>> {
        self.signal.borrow().end.clone()
    }

    /// Ends the job (the server's shutdown signal fires).
    pub fn end(&self, outcome: Result<(), String>) {
        let effect = self.state().end(outcome);
        self.apply_blocking(effect);
    }

    /// Stops the job on a signal (SIGTERM: a pod eviction or deletion, say): waits up to
    /// `grace` for a checkpoint upload in flight to land, then ends the job, which tells every
    /// worker to STOP. What is on disk stays: a coordinator started again with the same
    /// checkpoint directory (and `checkpoint.resume = true`) continues from the newest one.
    pub async fn terminate(&self, signal: &str, grace: Duration) {
        use std::sync::atomic::Ordering;
        if !self.state().stop() {
            return;
        }
        tracing::warn!(signal, "stopping the job");
        let deadline = tokio::time::Instant::now() + grace;
        while self.uploads.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let kept = match self.ckpt.as_ref().map(|c| c.store.latest()) {
            Some(Ok(Some((dir, m)))) => format!("{} (step {}) is the newest checkpoint", dir.display(), m.step),
            _ => "no checkpoint was saved yet".to_string(),
        };
        self.end(Err(format!(
            "the coordinator received {signal} and stopped the job; {kept}: start the coordinator again with the same \
             checkpoint directory and checkpoint.resume = true to continue"
        )));
    }

    /// Whether a signal asked the coordinator to stop.
    pub fn is_stopping(&self) -> bool {
        self.state().is_stopping()
    }

    fn checkpoint_setup(&self) -> Result<&CheckpointSetup, Status> {
        self.ckpt.as_ref().ok_or_else(|| Status::failed_precondition("this coordinator keeps no checkpoints"))
    }

    /// A message of generation `generation` is still current, its rank is inside the world, and
    /// it comes from the worker that joined as that rank ([`JobState::authorize`]).
    fn authorize(&self, generation: u64, rank: u32, secret: &[u8]) -> Result<usize, Status> {
        self.state().authorize(generation, rank as usize, secret).map_err(|r| status(&r))
    }

    /// The whole job at this moment: what the status page and `/metrics` show. The state's
    /// snapshot is taken under its lock, the rest after.
    pub fn job_status(&self) -> JobStatus {
        let now = Instant::now();
        let s = self.state().snapshot();
        let (state, message) = match (&s.end, s.open) {
            (Some(Ok(())), _) => ("finished", "every rank finished".to_string()),
            (Some(Err(why)), _) if s.stopping => ("stopped", why.clone()),
            (Some(Err(why)), _) => ("failed", why.clone()),
            (None, true) if s.first_generation => {
                ("gathering", format!("{} of at least {} workers have joined", s.joined, s.min_workers))
            }
            (None, true) => ("restarting", format!("{} of at least {} workers have rejoined", s.joined, s.min_workers)),
            (None, false) => ("training", String::new()),
        };
        let workers = s
            .workers
            .iter()
            .enumerate()
            .map(|(rank, (host, seen, finished))| WorkerStatus {
                rank,
                host: host.clone(),
                step: seen.step,
                phase: seen.phase.clone(),
                heartbeat_age_s: now.saturating_duration_since(seen.at).as_secs_f64(),
                finished: *finished,
            })
            .collect();
        let checkpoints = s
            .saved
            .iter()
            .filter(|(_, path)| path.exists()) // keep_last prunes old ones
            .map(|(step, path)| CheckpointStatus { step: *step, path: path.display().to_string() })
            .collect();
        let t = self.telemetry.lock().expect("telemetry lock");
        let last = t.last().cloned();
        JobStatus {
            state,
            message,
            output_dir: self.output_dir.display().to_string(),
            generation: s.generation,
            world_size: if s.open { s.joined } else { s.world_size },
            min_workers: s.min_workers,
            max_workers: s.max_workers,
            joined: s.joined,
            restarts: s.restarts,
            max_restarts: self.elastic.max_restarts,
            elapsed_s: t.now_s(),
            step: last.as_ref().map_or(0, |r| r.step),
            total_steps: t.total_steps(),
            epoch: last.as_ref().map_or(0, |r| r.epoch),
            tokens_per_s: t.tokens_per_s(),
            totals: t.totals().clone(),
            workers,
            checkpoints,
            final_model: s.final_model.map(|p| p.display().to_string()),
            curve: t.curve(CURVE_POINTS).iter().map(|r| [r.step as f64, r.loss, r.lr, r.time_s]).collect(),
            evals: t.evals().to_vec(),
            last,
        }
    }

    /// The loss curve (and evaluation accuracies) as a PNG, drawn without the telemetry's lock.
    pub fn loss_png(&self) -> Vec<u8> {
        let series = self.telemetry.lock().expect("telemetry lock").plot_series();
        crate::telemetry::loss_chart(&series)
    }

    /// The telemetry's version ([`Telemetry::changes`]): the loss chart changes only with it.
    pub fn telemetry_changes(&self) -> u64 {
        self.telemetry.lock().expect("telemetry lock").changes()
    }

    /// What the ranks reported when they finished (rank 0's model directory among it).
    pub fn finish_reports(&self) -> Vec<Option<Finished>> {
        self.state().finish_reports().to_vec()
    }

    /// The finished evaluations: (split, step) -> metrics.
    pub fn eval_results(&self) -> Vec<((EvalSplit, u64), job::eval::EvalMetrics)> {
        self.state().eval_results().iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// The world size of the generation that ran last.
    pub fn world_size(&self) -> usize {
        self.state().world_size()
    }
}

/// The gRPC status of a refusal.
fn status(r: &Refusal) -> Status {
    match r {
        Refusal::Failed(_) | Refusal::Stale { .. } => Status::aborted(r.to_string()),
        Refusal::OutsideWorld { .. } | Refusal::Invalid(_) => Status::invalid_argument(r.to_string()),
        Refusal::NotAllowed(_) | Refusal::NotMember { .. } => Status::permission_denied(r.to_string()),
        Refusal::Mismatch(_) => Status::failed_precondition(r.to_string()),
        Refusal::Join(e) => match e {
            JoinError::WorldFull { .. } | JoinError::Running { .. } => Status::resource_exhausted(e.to_string()),
            JoinError::ProtocolMismatch { .. } => Status::failed_precondition(e.to_string()),
            JoinError::RankTaken { .. } => Status::already_exists(e.to_string()),
            JoinError::RankOutOfRange { .. } | JoinError::BadRingAddr(_) => Status::invalid_argument(e.to_string()),
            JoinError::MixedDevices { .. } => Status::failed_precondition(e.to_string()),
        },
    }
}

/// The split of an evaluation report.
fn eval_split(split: i32) -> Result<EvalSplit, Status> {
    match Split::try_from(split) {
        Ok(Split::Dev) => Ok(EvalSplit::Dev),
        Ok(Split::Test) => Ok(EvalSplit::Test),
        _ => Err(Status::invalid_argument(format!("split {split} is not an evaluation split"))),
    }
}

/// Writes the restart bookkeeping atomically (a temporary file of a unique name, fsync, rename,
/// then the directory fsynced).
pub fn write_state(dir: &std::path::Path, r: &Restarts) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!(".{STATE_FILE}.{}", checkpoints::unique()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string_pretty(r).expect("state serialises").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads the restart bookkeeping a previous coordinator left in `dir` (default when none).
pub fn read_state(dir: &std::path::Path) -> anyhow::Result<Restarts> {
    let p = dir.join(STATE_FILE);
    match std::fs::read_to_string(&p) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Restarts::default()),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", p.display())),
    }
}

/// A slot taken by a Join that is still waiting for the world; freed on drop unless kept.
struct SlotGuard {
    inner: Arc<Inner>,
    slot: usize,
    host: String,
    kept: bool,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let freed = self.inner.state.lock().map(|mut s| s.leave(self.slot, &self.host)).unwrap_or(false);
        if freed {
            tracing::warn!(
                host = self.host,
                slot = self.slot,
                "a worker left before the world was complete; its slot is free again"
            );
            self.inner.changed.notify_waiters();
        }
    }
}

/// Counts an upload in flight for as long as it lives.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn reply(action: beat_reply::Action, generation: u64, message: String) -> BeatReply {
    BeatReply { action: action as i32, generation, message, finished: false }
}

/// What a heartbeat stream of `generation` is told now.
fn verdict(sig: &Signal, generation: u64) -> BeatReply {
    match &sig.end {
        Some(Ok(())) => BeatReply {
            finished: true,
            ..reply(beat_reply::Action::Stop, sig.generation, "the job has finished".into())
        },
        Some(Err(why)) => reply(beat_reply::Action::Stop, sig.generation, format!("the job has failed: {why}")),
        None if sig.generation != generation => reply(
            beat_reply::Action::Restart,
            sig.generation,
            format!("the job restarts as generation {} from its last checkpoint", sig.generation),
        ),
        None => reply(beat_reply::Action::Continue, sig.generation, String::new()),
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    type StreamShardStream = tokio_stream::wrappers::ReceiverStream<Result<ExampleBatch, Status>>;
    type FetchCheckpointStream = tokio_stream::wrappers::ReceiverStream<Result<FileChunk, Status>>;
    type HeartbeatStream = tokio_stream::wrappers::ReceiverStream<Result<BeatReply, Status>>;

    async fn save_checkpoint(
        &self,
        request: Request<tonic::Streaming<CheckpointPart>>,
    ) -> Result<Response<CheckpointSaved>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(CheckpointPart { part: Some(Part::Header(h)) }) => h,
            _ => return Err(Status::invalid_argument("a checkpoint stream starts with its header")),
        };
        let setup = self.checkpoint_setup()?;
        {
            // Only rank 0 uploads, and only a checkpoint the training loop writes at that step.
            let s = self.state();
            s.accept_upload(header.generation, header.rank as usize, &header.member_secret).map_err(|r| status(&r))?;
            let start = s.resume_point().map_or(0, |(_, m)| m.step);
            let at = CheckpointAt {
                step: header.step,
                epoch: header.epoch,
                position: header.position,
                train_loss: header.train_loss,
                is_final: header.r#final,
            };
            let local_batch = self.job.batch_size / s.world_size().max(1);
            setup
                .schedule
                .check_checkpoint(setup.every, local_batch, start, &at)
                .map_err(|why| Status::invalid_argument(format!("checkpoint refused: {why}")))?;
        }
        let _in_flight = InFlight::new(&self.uploads);
        // The files go to disk on a blocking thread; a stream that breaks off drops the
        // partial checkpoint, which deletes itself.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, Vec<u8>)>(8);
        let writer_inner = Arc::clone(&self.inner);
        let step = header.step;
        let writer = tokio::task::spawn_blocking(move || -> Result<Partial, checkpoints::CheckpointError> {
            let store = &writer_inner.ckpt.as_ref().expect("checked above").store;
            let mut p = store.begin(step)?;
            while let Some((name, data)) = rx.blocking_recv() {
                p.write(&name, &data)?;
            }
            Ok(p)
        });
        // A sender that goes silent mid-upload (stopped, partitioned) is given up on.
        let silence = ElasticSection::secs(self.elastic.heartbeat_timeout_s);
        loop {
            let part = match tokio::time::timeout(silence, stream.message()).await {
                Ok(Ok(Some(part))) => part,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "the checkpoint upload of step {step} stalled for {silence:?}"
                    )))
                }
            };
            match part.part {
                Some(Part::Chunk(c)) => {
                    if tx.send((c.name, c.data)).await.is_err() {
                        break; // the writer failed; its error is returned below
                    }
                }
                _ => return Err(Status::invalid_argument("a checkpoint stream has one header, then file chunks")),
            }
        }
        drop(tx);
        let internal = |e: &dyn std::fmt::Display| Status::internal(e.to_string());
        let partial = writer.await.map_err(|e| internal(&e))?.map_err(|e| match e {
            checkpoints::CheckpointError::BadName(_) => Status::invalid_argument(e.to_string()),
            e => internal(&e),
        })?;
        // A checkpoint of a generation that failed meanwhile is not kept: the job has already
        // chosen where it restarts from.
        let (world, metrics) = {
            let s = self.state();
            s.accept_upload(header.generation, 0, &header.member_secret).map_err(|r| status(&r))?;
            (s.world_size() as u32, s.metrics_at(step, header.train_loss))
        };
        let cursor = checkpoints::Cursor { epoch: header.epoch, position: header.position, world_size: world };
        let manifest = Manifest::new(step, cursor, self.job.seed, header.r#final, setup.config.clone(), metrics);
        let is_final = header.r#final;
        let commit_inner = Arc::clone(&self.inner);
        let path = tokio::task::spawn_blocking(move || -> Result<PathBuf, checkpoints::CheckpointError> {
            let setup = commit_inner.ckpt.as_ref().expect("checked above");
            job::fault::coordinator_point("commit", step);
            let path = {
                let _dir = commit_inner.dir_lock.lock().expect("checkpoint directory lock");
                // The checkpoint the running generation started from: its workers may be
                // fetching it.
                let fetched = commit_inner.state().resume_point().map(|(dir, _)| dir.clone());
                setup.store.commit(partial, manifest, &fetched.iter().map(PathBuf::as_path).collect::<Vec<_>>())?
            };
            if is_final {
                let from = setup.store.publish_end(&path, setup.publish, &setup.model_dir)?;
                tracing::info!(checkpoint = %from.display(), model = %setup.model_dir.display(), "model published");
            }
            Ok(path)
        })
        .await
        .map_err(|e| internal(&e))?
        .map_err(|e| internal(&e))?;
        tracing::info!(step, path = %path.display(), is_final, "checkpoint saved");
        let model = is_final.then(|| setup.model_dir.clone());
        self.state().saved(step, path.clone(), model);
        Ok(Response::new(CheckpointSaved { path: path.display().to_string() }))
    }

    async fn fetch_checkpoint(
        &self,
        request: Request<FetchCheckpointRequest>,
    ) -> Result<Response<Self::FetchCheckpointStream>, Status> {
        self.checkpoint_setup()?;
        let r = request.into_inner();
        let dir = self
            .state()
            .resume_point()
            .map(|(dir, _)| dir.clone())
            .filter(|dir| dir.file_name().is_some_and(|n| n.to_string_lossy() == r.checkpoint))
            .ok_or_else(|| {
                Status::not_found(format!("{:?} is not the checkpoint this job resumes from", r.checkpoint))
            })?;
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            for name in ["model.safetensors", "optimizer.safetensors"] {
                let path = dir.join(name);
                let mut f = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::internal(format!("{}: {e}", path.display()))));
                        return;
                    }
                };
                loop {
                    let mut data = vec![0u8; FILE_CHUNK];
                    let n = match f.read(&mut data) {
                        Ok(n) => n,
                        Err(e) => {
                            let _ = tx.blocking_send(Err(Status::internal(format!("{}: {e}", path.display()))));
                            return;
                        }
                    };
                    if n == 0 {
                        break;
                    }
                    data.truncate(n);
                    if tx.blocking_send(Ok(FileChunk { name: name.to_string(), data })).is_err() {
                        return; // the worker went away
                    }
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn report_progress(&self, request: Request<Progress>) -> Result<Response<ProgressReply>, Status> {
        let r = request.into_inner();
        if r.rank != 0 {
            return Err(Status::permission_denied(format!("rank {} reported progress: only rank 0 does", r.rank)));
        }
        // A report of a generation that is over would put a replaced step into the history.
        self.authorize(r.generation, r.rank, &r.member_secret)?;
        let rec = StepRecord {
            step: r.step,
            epoch: r.epoch,
            loss: r.loss,
            lr: r.lr,
            grad_norm: r.grad_norm,
            tokens: r.tokens,
            allreduce_s: r.allreduce_s,
            allreduce_wait_s: r.allreduce_wait_s,
            data_wait_s: r.data_wait_s,
            step_s: r.step_s,
            forward_s: r.forward_s,
            backward_s: r.backward_s,
            optimizer_s: r.optimizer_s,
            time_s: 0.0,
        };
        // Lock order (telemetry, then the board): the state lock is not held.
        let mut telemetry = self.telemetry.lock().expect("telemetry lock");
        let rec = StepRecord { time_s: telemetry.now_s(), ..rec };
        if let Some(board) = self.progress.lock().expect("progress lock").as_mut() {
            board.record(&rec, r.total_steps);
        }
        telemetry.record_step(rec, r.total_steps);
        Ok(Response::new(ProgressReply {}))
    }

    async fn stream_shard(&self, request: Request<ShardRequest>) -> Result<Response<Self::StreamShardStream>, Status> {
        let r = request.into_inner();
        let rank = self.authorize(r.generation, r.rank, &r.member_secret)?;
        let world = self.world_size();
        let split =
            Split::try_from(r.split).map_err(|_| Status::invalid_argument(format!("unknown split {}", r.split)))?;
        let n = self
            .data
            .len(split)
            .ok_or_else(|| Status::not_found(format!("the job has no {} split", split.as_str_name().to_lowercase())))?;
        let indices = match split {
            Split::Train => self.train_shards(n, world, r.epoch).await?[rank].clone(),
            Split::Dev | Split::Test => shard::eval_indices(n, world, rank),
        };
        let start = usize::try_from(r.start).unwrap_or(usize::MAX);
        if start > indices.len() {
            return Err(Status::out_of_range(format!("start {start} is past the shard's {} examples", indices.len())));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            for (k, chunk) in indices[start..].chunks(STREAM_BATCH).enumerate() {
                // A corpus's rows are read from memory-mapped shards (page faults): each message
                // is made on the blocking pool, which no stream holds while its worker is slow.
                let (inner, chunk, position) = (Arc::clone(&inner), chunk.to_vec(), (start + k * STREAM_BATCH) as u64);
                let Ok(batch) = tokio::task::spawn_blocking(move || inner.data.batch(split, &chunk, position)).await
                else {
                    return; // the runtime is shutting down
                };
                if tx.send(Ok(batch)).await.is_err() {
                    return; // the worker went away
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn finish(&self, request: Request<FinishRequest>) -> Result<Response<FinishReply>, Status> {
        let r = request.into_inner();
        let f = Finished { steps: r.steps, model_dir: r.model_dir };
        let effect = {
            let mut s = self.state();
            s.authorize(r.generation, r.rank as usize, &r.member_secret).map_err(|e| status(&e))?;
            s.finish(r.generation, r.rank as usize, f).map_err(|e| status(&e))?
        };
        self.apply(effect).await;
        Ok(Response::new(FinishReply {}))
    }

    async fn report_eval(&self, request: Request<EvalReport>) -> Result<Response<EvalResult>, Status> {
        let r = request.into_inner();
        if r.classes > MAX_CLASSES {
            return Err(Status::invalid_argument(format!("classes = {} is outside 0..={MAX_CLASSES}", r.classes)));
        }
        let split = eval_split(r.split)?;
        let counts = match (&self.data, r.classes) {
            (Data::Labelled(_), 1..) => Counts::Classes(EvalCounts {
                classes: r.classes as usize,
                confusion: r.confusion,
                loss_sum: r.loss_sum,
            }),
            (Data::Corpus(_), 0) if r.correct <= r.tokens => {
                Counts::Tokens(MlmCounts { tokens: r.tokens, correct: r.correct, loss_sum: r.loss_sum })
            }
            _ => {
                return Err(Status::invalid_argument(format!(
                    "counts of {} classes ({} correct of {} tokens) do not fit this job's task",
                    r.classes, r.correct, r.tokens
                )))
            }
        };
        let done = {
            let mut s = self.state();
            s.authorize(r.generation, r.rank as usize, &r.member_secret).map_err(|e| status(&e))?;
            s.report_eval(r.generation, r.rank as usize, split, r.step, counts).map_err(|e| status(&e))?
        };
        if let Some(m) = done {
            tracing::info!(
                split = split.name(),
                step = r.step,
                examples = m.examples,
                loss = m.loss,
                accuracy = m.accuracy,
                macro_f1 = m.macro_f1,
                perplexity = m.perplexity,
                "evaluation"
            );
            self.telemetry.lock().expect("telemetry lock").record_eval(split.name(), r.step, &m);
            self.gathered.notify_waiters();
        }
        let deadline = tokio::time::Instant::now() + self.gather_timeout;
        loop {
            let notified = self.gathered.notified();
            {
                let s = self.state();
                s.current(r.generation, r.rank as usize).map_err(|e| status(&e))?;
                if let Some(m) = s.eval_result(split, r.step) {
                    return Ok(Response::new(EvalResult {
                        examples: m.examples,
                        loss: m.loss,
                        accuracy: m.accuracy,
                        macro_f1: m.macro_f1,
                        perplexity: m.perplexity,
                    }));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Status::deadline_exceeded(format!(
                    "evaluation of {} at step {} did not complete within {:?}: not every rank reported",
                    split.name(),
                    r.step,
                    self.gather_timeout
                )));
            }
        }
    }

    async fn report_checksum(&self, request: Request<ChecksumReport>) -> Result<Response<ChecksumResult>, Status> {
        let r = request.into_inner();
        let effect = {
            let mut s = self.state();
            s.authorize(r.generation, r.rank as usize, &r.member_secret).map_err(|e| status(&e))?;
            s.report_checksum(r.generation, r.rank as usize, r.step, r.checksum).map_err(|e| status(&e))?
        };
        self.apply(effect).await;
        let deadline = tokio::time::Instant::now() + self.gather_timeout;
        loop {
            let notified = self.gathered.notified();
            {
                let s = self.state();
                s.current(r.generation, r.rank as usize).map_err(|e| status(&e))?;
                if s.checksums_complete(r.step) {
                    return Ok(Response::new(ChecksumResult {}));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Status::deadline_exceeded(format!(
                    "the parameter checksums of step {} did not all arrive within {:?}",
                    r.step, self.gather_timeout
                )));
            }
        }
    }

    async fn heartbeat(
        &self,
        request: Request<tonic::Streaming<Beat>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("an empty heartbeat stream"))?;
        let generation = first.generation;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut signal = self.signal.subscribe();
        // A beat of a generation that is over (or of a rank outside the world) is answered,
        // and the stream ends: the worker rejoins or stops.
        let authorized = self.state().authorize(generation, first.rank as usize, &first.member_secret);
        let rank = match authorized {
            Ok(rank) => rank,
            // Nobody acts as another rank: not even to say that it failed, or is gone.
            Err(e @ Refusal::NotMember { .. }) => return Err(status(&e)),
            Err(_) => {
                let v = verdict(&signal.borrow_and_update(), generation);
                let v = if v.action == beat_reply::Action::Continue as i32 {
                    reply(beat_reply::Action::Restart, v.generation, "this rank is not in the job now".into())
                } else {
                    v
                };
                let _ = tx.send(Ok(v)).await;
                return Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
            }
        };
        let svc = self.clone();
        // A worker gives the coordinator up when no reply came for heartbeat_timeout_s: CONTINUE
        // goes out at most every quarter of that (a RESTART or STOP at once), not for every beat,
        // which halves what tens of thousands of beating workers cost.
        let quiet = ElasticSection::secs(self.elastic.heartbeat_timeout_s) / 4;
        tokio::spawn(async move {
            let mut next = Some(first);
            let mut replied: Option<Instant> = None;
            loop {
                if let Some(b) = next.take() {
                    let effect = svc.state().beat(generation, rank, b.step, &b.phase, &b.failure, Instant::now());
                    svc.apply(effect).await;
                    let v = verdict(&signal.borrow_and_update(), generation);
                    let due =
                        v.action != beat_reply::Action::Continue as i32 || replied.is_none_or(|t| t.elapsed() >= quiet);
                    if due {
                        if tx.send(Ok(v)).await.is_err() {
                            return;
                        }
                        replied = Some(Instant::now());
                    }
                }
                tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(b)) => next = Some(b),
                        Ok(None) | Err(_) => {
                            let effect = svc.state().gone(generation, rank);
                            svc.apply(effect).await;
                            return;
                        }
                    },
                    changed = signal.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let v = verdict(&signal.borrow_and_update(), generation);
                        let over = v.action != beat_reply::Action::Continue as i32;
                        if tx.send(Ok(v)).await.is_err() || over {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<JobSpec>, Status> {
        let theirs = request.into_inner().protocol_version;
        if theirs != proto::PROTOCOL_VERSION {
            let e = JoinError::ProtocolMismatch { ours: proto::PROTOCOL_VERSION, theirs };
            return Err(status(&Refusal::Join(e)));
        }
        Ok(Response::new(JobSpec { job_config_json: self.job.config_json.clone() }))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let r = request.into_inner();
        let joiner = Joiner {
            protocol_version: r.protocol_version,
            rank_hint: r.rank_hint,
            ring_addr: r.ring_addr,
            hostname: r.hostname,
            nccl_id: r.nccl_id,
            secret: proto::auth::MemberSecret::generate(),
        };
        if !matches!(joiner.nccl_id.len(), 0 | NCCL_ID_BYTES) {
            return Err(Status::invalid_argument(format!(
                "an NCCL unique id is {NCCL_ID_BYTES} bytes (none on CPU); this worker sent {}",
                joiner.nccl_id.len()
            )));
        }
        let host = joiner.hostname.clone();
        let joined = self.state().join(joiner, &r.config_sha256, r.model_sha256, Instant::now());
        let (slot, generation, started) = joined.map_err(|e| {
            tracing::warn!(host, reason = %e, "join refused");
            match e {
                // Not to be retried: the worker exits.
                Refusal::Failed(_) => Status::failed_precondition(e.to_string()),
                e => status(&e),
            }
        })?;
        // Waiting joins wake when the world closes (Started), restarts or ends, not at every join:
        // at ten thousand workers that would be a hundred million wake-ups.
        self.apply(started).await;
        // Until the world is complete, a worker that times out or hangs up gives its slot back
        // (dropping this guard), so that its restarted self or a replacement can take it.
        let mut guard = SlotGuard { inner: Arc::clone(&self.inner), slot, host, kept: false };
        let deadline = tokio::time::Instant::now() + self.gather_timeout;
        loop {
            let notified = self.changed.notified();
            let wait = self.state().assignment(slot, generation);
            match wait {
                JoinWait::Ready(a) => {
                    guard.kept = true;
                    return Ok(Response::new(JoinReply {
                        rank: a.rank as u32,
                        world_size: a.world as u32,
                        job_config_json: self.job.config_json.clone(),
                        ring_prev: a.ring_prev,
                        ring_next: a.ring_next,
                        nccl_id: a.nccl_id,
                        member_secret: a.secret,
                        labels: match &self.data {
                            Data::Labelled(d) => d.labels.names.clone(),
                            Data::Corpus(_) => Vec::new(),
                        },
                        train_examples: self.data.len(Split::Train).unwrap_or(0) as u64,
                        corpus_tokenizer: match &self.data {
                            Data::Labelled(_) => Vec::new(),
                            Data::Corpus(c) => c.train.reader().tokenizer_hash().to_vec(),
                        },
                        resume: a.resume.as_ref().map(|(dir, m)| ResumePoint {
                            step: m.step,
                            epoch: m.cursor.epoch,
                            position: m.cursor.position,
                            checkpoint: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                            world_size: m.cursor.world_size,
                        }),
                        generation,
                    }));
                }
                JoinWait::Failed(why) => return Err(Status::failed_precondition(format!("the job has failed: {why}"))),
                JoinWait::Restarted => {
                    guard.kept = true; // the restart already emptied every slot
                    return Err(Status::aborted("the job restarted while this worker waited; join again"));
                }
                JoinWait::Left => {
                    guard.kept = true;
                    return Err(Status::resource_exhausted("the world closed without this worker"));
                }
                JoinWait::Waiting => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let missing = self.state().missing();
                return Err(Status::deadline_exceeded(format!(
                    "rendezvous timed out after {:?}: ranks {missing:?} never joined",
                    self.gather_timeout
                )));
            }
        }
    }
}
