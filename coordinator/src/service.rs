//! The coordinator's gRPC service. The protocol boundary: only this module (and the worker's
//! client) sees the generated proto types and `tonic::Status`; the logic lives in plain state
//! machines such as [`Rendezvous`].

use crate::checkpoints::{self, Manifest, Partial, Store};
use crate::data::Datasets;
use crate::eval::{EvalBoard, EvalCounts};
use crate::progress::{ProgressBoard, StepRecord};
use crate::rendezvous::{JoinError, Joiner, Rendezvous};
use crate::shard;
use proto::v1::checkpoint_part::Part;
use proto::v1::coordinator_server::Coordinator;
use proto::v1::{
    CheckpointPart, CheckpointSaved, EvalReport, EvalResult, Example, ExampleBatch, FetchCheckpointRequest, FileChunk,
    FinishReply, FinishRequest, JoinReply, JoinRequest, Progress, ProgressReply, ResumePoint, ShardRequest, Split,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

/// What every worker of the job receives at rendezvous.
#[derive(Clone, Debug)]
pub struct JobInfo {
    /// The resolved job config as JSON.
    pub config_json: String,
    pub nccl_id: Vec<u8>,
    /// The seed of the epoch shuffles.
    pub seed: u64,
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
    /// Where the final checkpoint's model is published (`<output.dir>/model`).
    pub model_dir: PathBuf,
    /// The resolved job config (recorded in every manifest).
    pub config: serde_json::Value,
}

/// The largest class count an evaluation report may carry (a bound on message-driven allocation).
const MAX_CLASSES: u32 = 4096;

pub struct CoordinatorService {
    rdv: Arc<Mutex<Rendezvous>>,
    changed: Arc<Notify>,
    evals: Arc<Mutex<EvalBoard>>,
    evals_changed: Arc<Notify>,
    finished: Arc<Mutex<Vec<Option<FinishRequest>>>>,
    /// Notified once every rank has finished.
    pub all_finished: Arc<Notify>,
    job: JobInfo,
    data: Arc<Datasets>,
    /// How long a call that waits for every rank (Join, ReportEval) waits.
    gather_timeout: Duration,
    ckpt: Option<Arc<CheckpointSetup>>,
    /// Checkpoints written, by step, and the final model's directory once published.
    saved: Arc<Mutex<BTreeMap<u64, PathBuf>>>,
    final_model: Arc<Mutex<Option<PathBuf>>>,
    progress: Arc<Mutex<Option<ProgressBoard>>>,
}

impl CoordinatorService {
    pub fn new(world: usize, job: JobInfo, data: Datasets, gather_timeout: Duration) -> Self {
        CoordinatorService {
            rdv: Arc::new(Mutex::new(Rendezvous::new(world, proto::PROTOCOL_VERSION))),
            changed: Arc::new(Notify::new()),
            evals: Arc::new(Mutex::new(EvalBoard::new(world))),
            evals_changed: Arc::new(Notify::new()),
            finished: Arc::new(Mutex::new(vec![None; world])),
            all_finished: Arc::new(Notify::new()),
            job,
            data: Arc::new(data),
            gather_timeout,
            ckpt: None,
            saved: Arc::default(),
            final_model: Arc::default(),
            progress: Arc::default(),
        }
    }

    /// Accepts checkpoints from rank 0 (without, SaveCheckpoint is refused) and resumes from one.
    pub fn with_checkpoints(mut self, setup: CheckpointSetup) -> Self {
        self.ckpt = Some(Arc::new(setup));
        self
    }

    /// Shows rank 0's progress reports.
    pub fn with_progress(self, board: ProgressBoard) -> Self {
        *self.progress.lock().expect("progress lock") = Some(board);
        self
    }

    /// The checkpoints this run wrote, by step.
    pub fn saved_checkpoints(&self) -> BTreeMap<u64, PathBuf> {
        self.saved.lock().expect("saved lock").clone()
    }

    /// The final model's directory, once the final checkpoint is published.
    pub fn final_model(&self) -> Option<PathBuf> {
        self.final_model.lock().expect("final lock").clone()
    }

    pub fn finish_progress(&self) {
        if let Some(p) = self.progress.lock().expect("progress lock").as_ref() {
            p.finish();
        }
    }

    fn checkpoint_setup(&self) -> Result<Arc<CheckpointSetup>, Status> {
        self.ckpt.clone().ok_or_else(|| Status::failed_precondition("this coordinator keeps no checkpoints"))
    }

    /// The metrics recorded in the manifest of the checkpoint of `step`.
    fn metrics_at(&self, step: u64, train_loss: f64) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        if train_loss.is_finite() {
            out.insert("train/loss".to_string(), train_loss);
        }
        let evals = self.evals.lock().expect("eval lock");
        for ((split, s), m) in &evals.done {
            if *s != step {
                continue;
            }
            let name = Split::try_from(*split).map(|s| s.as_str_name().to_lowercase()).unwrap_or_default();
            out.insert(format!("{name}/accuracy"), m.accuracy);
            out.insert(format!("{name}/macro_f1"), m.macro_f1);
            out.insert(format!("{name}/loss"), m.loss);
        }
        out
    }

    /// What the ranks reported when they finished (rank 0's model directory among it).
    pub fn finish_reports(&self) -> Vec<Option<FinishRequest>> {
        self.finished.lock().expect("finish lock").clone()
    }

    /// The finished evaluations: (split, step) -> metrics.
    pub fn eval_results(&self) -> Vec<((i32, u64), crate::eval::EvalMetrics)> {
        self.evals.lock().expect("eval lock").done.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    fn status(e: &JoinError) -> Status {
        match e {
            JoinError::WorldFull { .. } => Status::resource_exhausted(e.to_string()),
            JoinError::ProtocolMismatch { .. } => Status::failed_precondition(e.to_string()),
            JoinError::RankTaken { .. } => Status::already_exists(e.to_string()),
            JoinError::RankOutOfRange { .. } | JoinError::BadRingAddr(_) => Status::invalid_argument(e.to_string()),
        }
    }
}

/// A rank taken by a Join that is still waiting for the world; freed on drop unless kept.
struct SlotGuard {
    rdv: Arc<Mutex<Rendezvous>>,
    changed: Arc<Notify>,
    rank: usize,
    host: String,
    kept: bool,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let freed = self.rdv.lock().map(|mut r| r.leave(self.rank, &self.host)).unwrap_or(false);
        if freed {
            tracing::warn!(
                host = self.host,
                rank = self.rank,
                "a worker left before the world was complete; its rank is free again"
            );
            self.changed.notify_waiters();
        }
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    type StreamShardStream = tokio_stream::wrappers::ReceiverStream<Result<ExampleBatch, Status>>;
    type FetchCheckpointStream = tokio_stream::wrappers::ReceiverStream<Result<FileChunk, Status>>;

    async fn save_checkpoint(
        &self,
        request: Request<tonic::Streaming<CheckpointPart>>,
    ) -> Result<Response<CheckpointSaved>, Status> {
        let setup = self.checkpoint_setup()?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(CheckpointPart { part: Some(Part::Header(h)) }) => h,
            _ => return Err(Status::invalid_argument("a checkpoint stream starts with its header")),
        };
        if header.rank != 0 {
            return Err(Status::permission_denied(format!(
                "rank {} sent a checkpoint: only rank 0 saves",
                header.rank
            )));
        }
        // The files go to disk on a blocking thread; a stream that breaks off drops the
        // partial checkpoint, which deletes itself.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, Vec<u8>)>(8);
        let writer_setup = Arc::clone(&setup);
        let step = header.step;
        let writer = tokio::task::spawn_blocking(move || -> Result<Partial, checkpoints::CheckpointError> {
            let mut p = writer_setup.store.begin(step)?;
            while let Some((name, data)) = rx.blocking_recv() {
                p.write(&name, &data)?;
            }
            Ok(p)
        });
        while let Some(part) = stream.message().await? {
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
        let world = self.rdv.lock().expect("rendezvous lock").world_size() as u32;
        let manifest = Manifest {
            format: checkpoints::FORMAT_VERSION,
            step,
            cursor: checkpoints::Cursor { epoch: header.epoch, position: header.position, world_size: world },
            rng: checkpoints::Rng { seed: self.job.seed, step, epoch: header.epoch },
            is_final: header.r#final,
            config: setup.config.clone(),
            metrics: self.metrics_at(step, header.train_loss),
            files: BTreeMap::new(),
            created_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let is_final = header.r#final;
        let commit_setup = Arc::clone(&setup);
        let path = tokio::task::spawn_blocking(move || -> Result<PathBuf, checkpoints::CheckpointError> {
            let path = commit_setup.store.commit(partial, manifest)?;
            if is_final {
                checkpoints::publish_model(&path, &commit_setup.model_dir)?;
            }
            Ok(path)
        })
        .await
        .map_err(|e| internal(&e))?
        .map_err(|e| internal(&e))?;
        tracing::info!(step, path = %path.display(), is_final, "checkpoint saved");
        self.saved.lock().expect("saved lock").insert(step, path.clone());
        if is_final {
            *self.final_model.lock().expect("final lock") = Some(setup.model_dir.clone());
        }
        Ok(Response::new(CheckpointSaved { path: path.display().to_string() }))
    }

    async fn fetch_checkpoint(
        &self,
        request: Request<FetchCheckpointRequest>,
    ) -> Result<Response<Self::FetchCheckpointStream>, Status> {
        let setup = self.checkpoint_setup()?;
        let r = request.into_inner();
        let (dir, _) = setup
            .resume
            .as_ref()
            .filter(|(dir, _)| dir.file_name().is_some_and(|n| n.to_string_lossy() == r.checkpoint))
            .ok_or_else(|| {
                Status::not_found(format!("{:?} is not the checkpoint this job resumes from", r.checkpoint))
            })?;
        let dir = dir.clone();
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
        let rec = StepRecord {
            step: r.step,
            epoch: r.epoch,
            loss: r.loss,
            lr: r.lr,
            grad_norm: r.grad_norm,
            tokens: r.tokens,
            allreduce_s: r.allreduce_s,
            allreduce_wait_s: r.allreduce_wait_s,
            time_s: 0.0,
        };
        if let Some(board) = self.progress.lock().expect("progress lock").as_mut() {
            board.record(&StepRecord { time_s: board.now_s(), ..rec }, r.total_steps);
        }
        Ok(Response::new(ProgressReply {}))
    }

    async fn stream_shard(&self, request: Request<ShardRequest>) -> Result<Response<Self::StreamShardStream>, Status> {
        let r = request.into_inner();
        let world = self.rdv.lock().expect("rendezvous lock").world_size();
        let rank = r.rank as usize;
        if rank >= world {
            return Err(Status::invalid_argument(format!("rank {rank} is outside the world of {world}")));
        }
        let split =
            Split::try_from(r.split).map_err(|_| Status::invalid_argument(format!("unknown split {}", r.split)))?;
        let records = match split {
            Split::Train => Some(&self.data.train),
            Split::Dev => self.data.dev.as_ref(),
            Split::Test => self.data.test.as_ref(),
        }
        .ok_or_else(|| Status::not_found(format!("the job has no {} split", split.as_str_name().to_lowercase())))?;
        let n = records.len();
        let indices = match split {
            Split::Train => shard::train_indices(n, world, rank, self.job.seed, r.epoch),
            Split::Dev | Split::Test => shard::eval_indices(n, world, rank),
        };
        let start = usize::try_from(r.start).unwrap_or(usize::MAX);
        if start > indices.len() {
            return Err(Status::out_of_range(format!("start {start} is past the shard's {} examples", indices.len())));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
        let data = Arc::clone(&self.data);
        tokio::spawn(async move {
            let records = match split {
                Split::Train => &data.train,
                Split::Dev => data.dev.as_ref().expect("checked above"),
                Split::Test => data.test.as_ref().expect("checked above"),
            };
            for (k, chunk) in indices[start..].chunks(STREAM_BATCH).enumerate() {
                let examples = chunk
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
                let batch = ExampleBatch { examples, position: (start + k * STREAM_BATCH) as u64 };
                if tx.send(Ok(batch)).await.is_err() {
                    return; // the worker went away
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn finish(&self, request: Request<FinishRequest>) -> Result<Response<FinishReply>, Status> {
        let r = request.into_inner();
        let mut f = self.finished.lock().expect("finish lock");
        let rank = r.rank as usize;
        if rank >= f.len() {
            return Err(Status::invalid_argument(format!("rank {rank} is outside the world of {}", f.len())));
        }
        tracing::info!(rank, steps = r.steps, model_dir = r.model_dir, "worker finished");
        f[rank] = Some(r);
        if f.iter().all(Option::is_some) {
            self.all_finished.notify_one();
        }
        Ok(Response::new(FinishReply {}))
    }

    async fn report_eval(&self, request: Request<EvalReport>) -> Result<Response<EvalResult>, Status> {
        let r = request.into_inner();
        if r.classes == 0 || r.classes > MAX_CLASSES {
            return Err(Status::invalid_argument(format!("classes = {} is outside 1..={MAX_CLASSES}", r.classes)));
        }
        let split =
            Split::try_from(r.split).map_err(|_| Status::invalid_argument(format!("unknown split {}", r.split)))?;
        let counts = EvalCounts { classes: r.classes as usize, confusion: r.confusion, loss_sum: r.loss_sum };
        let key = (split as i32, r.step);
        let done = self
            .evals
            .lock()
            .expect("eval lock")
            .report(r.rank as usize, key.0, key.1, counts)
            .map_err(Status::invalid_argument)?;
        if let Some(m) = done {
            tracing::info!(
                split = split.as_str_name(),
                step = r.step,
                examples = m.examples,
                loss = m.loss,
                accuracy = m.accuracy,
                macro_f1 = m.macro_f1,
                "evaluation"
            );
            self.evals_changed.notify_waiters();
        }
        let deadline = tokio::time::Instant::now() + self.gather_timeout;
        loop {
            let notified = self.evals_changed.notified();
            if let Some(m) = self.evals.lock().expect("eval lock").result(key.0, key.1) {
                return Ok(Response::new(EvalResult {
                    examples: m.examples,
                    loss: m.loss,
                    accuracy: m.accuracy,
                    macro_f1: m.macro_f1,
                }));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Status::deadline_exceeded(format!(
                    "evaluation of {} at step {} did not complete within {:?}: not every rank reported",
                    split.as_str_name(),
                    r.step,
                    self.gather_timeout
                )));
            }
        }
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let r = request.into_inner();
        let joiner = Joiner {
            protocol_version: r.protocol_version,
            rank_hint: r.rank_hint,
            ring_addr: r.ring_addr,
            hostname: r.hostname,
        };
        let host = joiner.hostname.clone();
        let rank = {
            let mut rdv = self.rdv.lock().expect("rendezvous lock");
            let rank = rdv.join(joiner).map_err(|e| {
                tracing::warn!(host, error = %e, "join refused");
                Self::status(&e)
            })?;
            tracing::info!(host, rank, missing = ?rdv.missing(), "worker joined");
            rank
        };
        self.changed.notify_waiters();
        // Until the world is complete, a worker that times out or hangs up gives its rank back
        // (dropping this guard), so that its restarted self or a replacement can take it.
        let mut slot =
            SlotGuard { rdv: Arc::clone(&self.rdv), changed: Arc::clone(&self.changed), rank, host, kept: false };
        let deadline = tokio::time::Instant::now() + self.gather_timeout;
        loop {
            let notified = self.changed.notified();
            {
                let rdv = self.rdv.lock().expect("rendezvous lock");
                if let Some(members) = rdv.members() {
                    slot.kept = true;
                    return Ok(Response::new(JoinReply {
                        rank: rank as u32,
                        world_size: rdv.world_size() as u32,
                        job_config_json: self.job.config_json.clone(),
                        ring_peers: members.iter().map(|m| m.ring_addr.clone()).collect(),
                        nccl_id: self.job.nccl_id.clone(),
                        labels: self.data.labels.names.clone(),
                        train_examples: self.data.train.len() as u64,
                        resume: self.ckpt.as_ref().and_then(|c| c.resume.as_ref()).map(|(dir, m)| ResumePoint {
                            step: m.step,
                            epoch: m.cursor.epoch,
                            position: m.cursor.position,
                            checkpoint: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                        }),
                    }));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let missing = self.rdv.lock().expect("rendezvous lock").missing();
                return Err(Status::deadline_exceeded(format!(
                    "rendezvous timed out after {:?}: ranks {missing:?} never joined",
                    self.gather_timeout
                )));
            }
        }
    }
}
