//! The coordinator's gRPC service. The protocol boundary: only this module (and the worker's
//! client) sees the generated proto types and `tonic::Status`; the logic lives in plain state
//! machines such as [`Rendezvous`].

use crate::data::Datasets;
use crate::eval::{EvalBoard, EvalCounts};
use crate::rendezvous::{JoinError, Joiner, Rendezvous};
use crate::shard;
use proto::v1::coordinator_server::Coordinator;
use proto::v1::{
    EvalReport, EvalResult, Example, ExampleBatch, FinishReply, FinishRequest, JoinReply, JoinRequest, ShardRequest,
    Split,
};
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
        }
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

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    type StreamShardStream = tokio_stream::wrappers::ReceiverStream<Result<ExampleBatch, Status>>;

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
        let deadline = tokio::time::Instant::now() + self.gather_timeout;
        loop {
            let notified = self.changed.notified();
            {
                let rdv = self.rdv.lock().expect("rendezvous lock");
                if let Some(members) = rdv.members() {
                    return Ok(Response::new(JoinReply {
                        rank: rank as u32,
                        world_size: rdv.world_size() as u32,
                        job_config_json: self.job.config_json.clone(),
                        ring_peers: members.iter().map(|m| m.ring_addr.clone()).collect(),
                        nccl_id: self.job.nccl_id.clone(),
                        labels: self.data.labels.names.clone(),
                        train_examples: self.data.train.len() as u64,
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
