//! The coordinator's gRPC service. The protocol boundary: only this module (and the worker's
//! client) sees the generated proto types and `tonic::Status`; the logic lives in plain state
//! machines such as [`Rendezvous`].

use crate::rendezvous::{JoinError, Joiner, Rendezvous};
use proto::v1::coordinator_server::Coordinator;
use proto::v1::{JoinReply, JoinRequest};
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
}

pub struct CoordinatorService {
    rdv: Arc<Mutex<Rendezvous>>,
    changed: Arc<Notify>,
    job: JobInfo,
    join_timeout: Duration,
}

impl CoordinatorService {
    pub fn new(world: usize, job: JobInfo, join_timeout: Duration) -> Self {
        CoordinatorService {
            rdv: Arc::new(Mutex::new(Rendezvous::new(world, proto::PROTOCOL_VERSION))),
            changed: Arc::new(Notify::new()),
            job,
            join_timeout,
        }
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
        let deadline = tokio::time::Instant::now() + self.join_timeout;
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
                    }));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let missing = self.rdv.lock().expect("rendezvous lock").missing();
                return Err(Status::deadline_exceeded(format!(
                    "rendezvous timed out after {:?}: ranks {missing:?} never joined",
                    self.join_timeout
                )));
            }
        }
    }
}
