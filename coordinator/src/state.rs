//! The job's lifecycle as a plain state machine: generations and failure handling, liveness,
//! the evaluation and checksum gathers, the checkpoints written, the end of the job. No network,
//! no files, no clock of its own (callers pass `now`), no proto types: each change returns what
//! the caller must do about it (an [`Effect`]), and the gRPC adapter (`service.rs`) does that
//! I/O (reading the checkpoint directory, persisting the restart count, telling the heartbeat
//! streams, waking waiting calls) after releasing the lock.
//!
//! **Lock order.** The service keeps one `Mutex<JobState>`. Its two other locks, the telemetry
//! and the progress board, are never taken while the state lock is held, nor the state lock
//! while either is held; nothing awaits and no file is touched under the state lock.
//!
//! A failure restarts the job in two steps, so that the newest checkpoint is found (its files
//! hashed) outside the lock: [`JobState::fail`] marks the generation as failing (from then on
//! its messages are refused, and further failures of it change nothing) and returns
//! [`Effect::Restarting`]; the caller reads the checkpoint directory and hands the result to
//! [`JobState::restart`], which starts the next generation from it.

use crate::gather::{EvalBoard, EvalSplit};
use crate::rendezvous::{JoinError, Joiner, Rendezvous};
use job::checkpoints::Manifest;
use job::config::ElasticSection;
use job::eval::{Counts, EvalMetrics};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The coordinator's restart bookkeeping, kept in `<checkpoint dir>/coordinator.json`: a
/// restarted coordinator continues the generation numbers (its restart budget starts afresh;
/// `restarts` is this process's count, for the record).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Restarts {
    pub generation: u64,
    pub restarts: u32,
}

/// What the state machine asks of its caller.
#[derive(Debug, PartialEq)]
pub enum Effect {
    /// A generation's world closed and training starts: wake the waiting joins.
    Started,
    /// `generation` failed and restarts: read the newest complete checkpoint and hand it to
    /// [`JobState::restart`].
    Restarting { generation: u64, reason: String },
    /// A gather (the checksums of a step) is complete: wake the calls waiting for it.
    Gathered,
    /// The job restarted as `restarts.generation` from the checkpoint of `step` in `dir`
    /// (step 0 and no dir: from the start): persist `restarts`, record the restart, tell the
    /// heartbeats, wake every waiting call.
    Restarted { restarts: Restarts, step: u64, dir: Option<PathBuf> },
    /// The job is over (see [`JobState::outcome`]): tell the heartbeats, wake every waiting call,
    /// stop serving.
    Ended,
}

/// Why a message is refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("the job has failed: {0}")]
    Failed(String),
    #[error("generation {generation} is over: the job is restarting as generation {current}")]
    Stale { generation: u64, current: u64 },
    #[error("rank {rank} is outside the world of {world}")]
    OutsideWorld { rank: usize, world: usize },
    #[error("{0}")]
    NotAllowed(String),
    #[error(
        "this message acts as rank {rank} of generation {generation} without its member secret: only the worker \
         that joined as rank {rank} acts as it"
    )]
    NotMember { rank: usize, generation: u64 },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error("{0}")]
    Mismatch(String),
}

/// What the coordinator last heard from a rank of the running generation.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub step: u64,
    pub phase: String,
    /// Since when `(step, phase)` has not changed.
    pub unchanged_since: Instant,
}

/// What a rank said when it finished.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    pub steps: u64,
    /// Where its final checkpoint's model was published (rank 0).
    pub model_dir: String,
}

/// A joined worker's place in a closed world.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub rank: usize,
    pub world: usize,
    pub generation: u64,
    /// The ring addresses of rank - 1 and rank + 1.
    pub ring_prev: String,
    pub ring_next: String,
    pub nccl_id: Vec<u8>,
    /// The member's secret, which its later messages carry.
    pub secret: Vec<u8>,
    /// The checkpoint the generation starts from: its directory and manifest.
    pub resume: Option<(PathBuf, Manifest)>,
}

/// Where a waiting join stands.
#[derive(Debug, PartialEq)]
pub enum JoinWait {
    Ready(Box<Assignment>),
    Waiting,
    /// The job restarted while it waited: join again.
    Restarted,
    /// The world closed without it (an elastic world of fewer).
    Left,
    Failed(String),
}

/// The timeouts and budgets the state machine applies.
#[derive(Clone, Debug)]
pub struct Limits {
    /// How long the first generation of this coordinator may take to gather.
    pub gather_timeout: Duration,
    pub elastic: ElasticSection,
}

/// The status of the job's lifecycle at one moment (the status page adds the telemetry).
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub open: bool,
    pub first_generation: bool,
    pub world_size: usize,
    pub min_workers: usize,
    pub max_workers: usize,
    pub joined: usize,
    pub restarts: u32,
    pub end: Option<Result<(), String>>,
    pub stopping: bool,
    /// Per rank of a running generation: host, what was last heard, whether it finished.
    pub workers: Vec<(String, Seen, bool)>,
    pub saved: BTreeMap<u64, PathBuf>,
    pub final_model: Option<PathBuf>,
}

#[derive(Debug)]
pub struct JobState {
    limits: Limits,
    rdv: Rendezvous,
    /// The generation this coordinator process started with (its gathering may take the
    /// gather timeout; later ones the rejoin timeout).
    first_generation: u64,
    restarts: Restarts,
    /// Set by [`JobState::fail`] until [`JobState::restart`].
    failing: Option<u64>,
    end: Option<Result<(), String>>,
    stopping: bool,
    seen: Vec<Seen>,
    finished: Vec<Option<Finished>>,
    evals: EvalBoard,
    checksums: BTreeMap<u64, Vec<Option<u64>>>,
    /// When the gathering's progress was last logged (at most once a second).
    join_logged: Option<Instant>,
    /// The checkpoint the current generation starts from.
    resume: Option<(PathBuf, Manifest)>,
    /// Checkpoints written by this process, by step, and the published model.
    saved: BTreeMap<u64, PathBuf>,
    final_model: Option<PathBuf>,
    /// SHA-256 of the job config every worker must have been handed, and of the model files
    /// every worker must load (the coordinator's own, else the first admitted worker's).
    config_sha256: String,
    model_sha256: Option<String>,
}

impl JobState {
    pub fn new(rdv: Rendezvous, limits: Limits, restarts: Restarts, config_sha256: String) -> Self {
        let world = rdv.max_workers();
        JobState {
            limits,
            first_generation: rdv.generation(),
            rdv,
            restarts,
            failing: None,
            end: None,
            stopping: false,
            seen: Vec::new(),
            finished: vec![None; world],
            evals: EvalBoard::new(world),
            checksums: BTreeMap::new(),
            join_logged: None,
            resume: None,
            saved: BTreeMap::new(),
            final_model: None,
            config_sha256,
            model_sha256: None,
        }
    }

    /// Before the job starts: another rendezvous (an elastic world, a later generation), its
    /// limits, and the restart count to continue.
    pub fn reconfigure(&mut self, rdv: Rendezvous, limits: Limits, restarts: Restarts) {
        self.first_generation = rdv.generation();
        self.finished = vec![None; rdv.max_workers()];
        self.evals = EvalBoard::new(rdv.max_workers());
        self.rdv = rdv;
        self.limits = limits;
        self.restarts = restarts;
    }

    /// The checkpoint the first generation starts from.
    pub fn set_resume(&mut self, resume: Option<(PathBuf, Manifest)>) {
        self.resume = resume;
    }

    /// The digest of the model files every worker must load (None: the first worker's).
    pub fn set_model_sha256(&mut self, digest: Option<String>) {
        self.model_sha256 = digest;
    }

    /// The most workers the job runs with.
    pub fn max_workers(&self) -> usize {
        self.rdv.max_workers()
    }

    pub fn generation(&self) -> u64 {
        self.rdv.generation()
    }

    /// The world size of the generation that ran last.
    pub fn world_size(&self) -> usize {
        self.rdv.world_size()
    }

    /// How the job ended: Ok once every rank finished, Err with the reason it was given up.
    pub fn outcome(&self) -> Option<Result<(), String>> {
        self.end.clone()
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping
    }

    /// A signal asks the job to stop: failures from now on are not restarted. Returns whether
    /// this is the first such request of a job still running.
    pub fn stop(&mut self) -> bool {
        let first = !self.stopping && self.end.is_none();
        self.stopping = true;
        first
    }

    /// Ends the job with `outcome` (the first end counts).
    pub fn end(&mut self, outcome: Result<(), String>) -> Option<Effect> {
        if self.end.is_some() {
            return None;
        }
        self.end = Some(outcome);
        Some(Effect::Ended)
    }

    /// A message of `generation` from `rank` is current: the job runs, the generation is the
    /// running one (gathered, not failing), and the rank is inside its world.
    pub fn current(&self, generation: u64, rank: usize) -> Result<usize, Refusal> {
        if let Some(Err(why)) = &self.end {
            return Err(Refusal::Failed(why.clone()));
        }
        let now = self.rdv.generation();
        if generation != now || self.rdv.is_open() || self.failing == Some(generation) {
            return Err(Refusal::Stale { generation, current: now });
        }
        let world = self.rdv.world_size();
        if rank >= world {
            return Err(Refusal::OutsideWorld { rank, world });
        }
        Ok(rank)
    }

    /// [`JobState::current`], and the message proves that it comes from the worker that joined
    /// as `rank` (it carries that member's secret): the job token alone does not let a worker
    /// act as another rank.
    pub fn authorize(&self, generation: u64, rank: usize, secret: &[u8]) -> Result<usize, Refusal> {
        let rank = self.current(generation, rank)?;
        match self.rdv.member(rank) {
            Some(m) if m.secret.matches(secret) => Ok(rank),
            _ => Err(Refusal::NotMember { rank, generation }),
        }
    }

    // --- generations, failures, liveness ---

    /// `generation` failed (`reason`). A failure of a generation that is over, or failing
    /// already, or of a job that is stopping or over, changes nothing; with the restart budget
    /// spent the job ends; else the generation fails and the caller restarts it.
    pub fn fail(&mut self, generation: u64, reason: &str) -> Option<Effect> {
        if self.rdv.generation() != generation || self.rdv.is_open() || self.failing.is_some() || self.end.is_some() {
            return None;
        }
        if self.stopping {
            // Workers leaving because the job is being stopped (Ctrl-C reaches the local
            // workers too) are not a failure to recover from.
            tracing::info!(reason, "not restarting: the job is stopping");
            return None;
        }
        let max = self.limits.elastic.max_restarts;
        if self.restarts.restarts >= max {
            return self.end(Err(format!(
                "{reason}; the job has restarted {max} times already (elastic.max_restarts), giving up"
            )));
        }
        self.failing = Some(generation);
        Some(Effect::Restarting { generation, reason: reason.to_string() })
    }

    /// Starts the generation after the failing `generation` from `resume` (the newest complete
    /// checkpoint, None for the start).
    pub fn restart(&mut self, generation: u64, resume: Option<(PathBuf, Manifest)>, now: Instant) -> Option<Effect> {
        if self.failing != Some(generation) {
            return None;
        }
        self.failing = None;
        if self.end.is_some() {
            return None;
        }
        self.restarts.restarts += 1;
        self.restarts.generation = self.rdv.restart(now);
        self.checksums.clear();
        self.seen.clear();
        let (step, dir) = resume.as_ref().map_or((0, None), |(d, m)| (m.step, Some(d.clone())));
        self.resume = resume;
        Some(Effect::Restarted { restarts: self.restarts.clone(), step, dir })
    }

    /// A generation's world has closed: watch its members.
    fn started(&mut self, now: Instant) -> Effect {
        let world = self.rdv.world_size();
        self.seen = vec![Seen { at: now, step: 0, phase: "joining".into(), unchanged_since: now }; world];
        self.finished = vec![None; world];
        self.evals.set_world(world);
        tracing::info!(generation = self.rdv.generation(), world, "the world is complete; training starts");
        Effect::Started
    }

    /// One look at the job (the monitor's, every 100 ms): closes an elastic world whose last
    /// call is over, ends a job whose generation cannot gather in time, and fails a generation
    /// with a rank whose heartbeats stopped or whose progress stalled.
    pub fn tick(&mut self, now: Instant) -> Option<Effect> {
        if self.end.is_some() || self.failing.is_some() {
            return None;
        }
        let generation = self.rdv.generation();
        if self.rdv.is_open() {
            if self.rdv.tick(now) {
                return Some(self.started(now));
            }
            let limit = if generation == self.first_generation {
                self.limits.gather_timeout
            } else {
                ElasticSection::secs(self.limits.elastic.rejoin_timeout_s)
            };
            if self.rdv.gathering_for(now) > limit {
                let (joined, min) = self.rdv.count();
                let missing = self.rdv.missing();
                return self.end(Err(format!(
                    "generation {generation}: {joined} of the {min} workers needed joined within {limit:?} (slots \
                     {missing:?} never did)"
                )));
            }
            return None;
        }
        let why = self.stalled(now)?;
        self.fail(generation, &why)
    }

    /// The first rank of the running generation that has gone silent or stopped moving.
    fn stalled(&self, now: Instant) -> Option<String> {
        let hb = ElasticSection::secs(self.limits.elastic.heartbeat_timeout_s);
        let stall = ElasticSection::secs(self.limits.elastic.progress_timeout_s);
        let members = self.rdv.members().unwrap_or_default();
        self.seen.iter().enumerate().find_map(|(rank, s)| {
            if self.finished.get(rank).is_some_and(Option::is_some) {
                return None; // done, waiting for the others: silence is not a failure
            }
            let host = members.get(rank).map_or("?", |m| m.hostname.as_str());
            let silent = now.saturating_duration_since(s.at);
            if silent > hb {
                return Some(format!(
                    "rank {rank} ({host}) stalled: no heartbeat for {:.1} s (last at step {}, {})",
                    silent.as_secs_f64(),
                    s.step,
                    s.phase
                ));
            }
            let stuck = now.saturating_duration_since(s.unchanged_since);
            if !stall.is_zero() && stuck > stall {
                return Some(format!(
                    "rank {rank} ({host}) stalled: no progress for {:.1} s (at step {}, {})",
                    stuck.as_secs_f64(),
                    s.step,
                    s.phase
                ));
            }
            None
        })
    }

    /// A heartbeat from `rank` of `generation`: its step and phase, and the failure it reports
    /// ("" for none). A beat of a generation that is over is ignored.
    pub fn beat(
        &mut self,
        generation: u64,
        rank: usize,
        step: u64,
        phase: &str,
        failure: &str,
        now: Instant,
    ) -> Option<Effect> {
        self.current(generation, rank).ok()?;
        if let Some(s) = self.seen.get_mut(rank) {
            if s.step != step || s.phase != phase {
                s.unchanged_since = now;
                s.step = step;
                phase.clone_into(&mut s.phase);
            }
            s.at = now;
        }
        if failure.is_empty() {
            return None;
        }
        let host = self.host(rank);
        self.fail(generation, &format!("rank {rank} ({host}) failed: {failure}"))
    }

    /// The heartbeat stream of `rank` of `generation` closed: unless it finished, it is gone.
    pub fn gone(&mut self, generation: u64, rank: usize) -> Option<Effect> {
        if self.current(generation, rank).is_err() || self.finished.get(rank).is_some_and(Option::is_some) {
            return None;
        }
        let host = self.host(rank);
        self.fail(generation, &format!("rank {rank} ({host}) is gone: its heartbeat connection closed"))
    }

    /// The host of `rank` in the running generation.
    pub fn host(&self, rank: usize) -> String {
        self.rdv.member(rank).map(|j| j.hostname.clone()).unwrap_or_default()
    }

    // --- rendezvous ---

    /// Admits a worker to the gathering generation, checking that it holds the job's config
    /// and model: its slot and the generation.
    pub fn join(
        &mut self,
        joiner: Joiner,
        config_sha256: &str,
        model_sha256: String,
        now: Instant,
    ) -> Result<(usize, u64, Option<Effect>), Refusal> {
        if let Some(Err(why)) = &self.end {
            return Err(Refusal::Failed(why.clone()));
        }
        // A worker of another protocol is refused by the rendezvous, naming the versions.
        if joiner.protocol_version == self.rdv.protocol_version() {
            if config_sha256 != self.config_sha256 {
                return Err(Refusal::Mismatch(format!(
                    "this worker holds another job config (sha256 {config_sha256:?}, the job's is {}): was the \
                     coordinator restarted with another config?",
                    self.config_sha256
                )));
            }
            if let Some(want) = self.model_sha256.as_ref().filter(|want| **want != model_sha256) {
                return Err(Refusal::Mismatch(format!(
                    "this worker's model files (config.json, model.safetensors, tokenizer) differ from the job's: \
                     sha256 {model_sha256} here, {want} for the job; give every worker the same checkpoint"
                )));
            }
        }
        let was_open = self.rdv.is_open();
        let host = joiner.hostname.clone();
        let slot = self.rdv.join(joiner, now)?;
        self.model_sha256.get_or_insert(model_sha256);
        tracing::debug!(host, slot, generation = self.rdv.generation(), "worker joined");
        // A line a second while a large world gathers, not a line a worker.
        if self.join_logged.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
            self.join_logged = Some(now);
            let (joined, min) = self.rdv.count();
            tracing::info!(
                joined,
                min,
                max = self.rdv.max_workers(),
                generation = self.rdv.generation(),
                last = host,
                "workers joining"
            );
        }
        let started = (was_open && !self.rdv.is_open()).then(|| self.started(now));
        Ok((slot, self.rdv.generation(), started))
    }

    /// Where the join that took `slot` of `generation` stands.
    pub fn assignment(&self, slot: usize, generation: u64) -> JoinWait {
        if let Some(Err(why)) = &self.end {
            return JoinWait::Failed(why.clone());
        }
        if self.rdv.generation() != generation {
            return JoinWait::Restarted;
        }
        // O(1) a join: the world may be tens of thousands of workers, each waking for its reply.
        match self.rdv.rank_of_slot(slot) {
            Some(rank) => {
                let world = self.rdv.world_size();
                let member = |r: usize| self.rdv.member(r).expect("a closed world's ranks are filled");
                JoinWait::Ready(Box::new(Assignment {
                    rank,
                    world,
                    generation,
                    ring_prev: member((rank + world - 1) % world).ring_addr.clone(),
                    ring_next: member((rank + 1) % world).ring_addr.clone(),
                    nccl_id: member(0).nccl_id.clone(),
                    secret: member(rank).secret.as_bytes().to_vec(),
                    resume: self.resume.clone(),
                }))
            }
            None if !self.rdv.is_open() => JoinWait::Left,
            None => JoinWait::Waiting,
        }
    }

    /// The worker holding `slot` left before the world closed: free the slot.
    pub fn leave(&mut self, slot: usize, host: &str) -> bool {
        self.rdv.leave(slot, host)
    }

    /// The slots still free in the gathering generation.
    pub fn missing(&self) -> Vec<usize> {
        self.rdv.missing()
    }

    // --- what the ranks report ---

    /// `rank` of `generation` finished; once every rank has, the job ends.
    pub fn finish(&mut self, generation: u64, rank: usize, f: Finished) -> Result<Option<Effect>, Refusal> {
        let rank = self.current(generation, rank)?;
        let world = self.finished.len();
        let slot = self.finished.get_mut(rank).ok_or(Refusal::OutsideWorld { rank, world })?;
        tracing::info!(rank, steps = f.steps, model_dir = f.model_dir, "worker finished");
        *slot = Some(f);
        Ok(if self.finished.iter().all(Option::is_some) { self.end(Ok(())) } else { None })
    }

    /// What the ranks of the last generation reported when they finished.
    pub fn finish_reports(&self) -> &[Option<Finished>] {
        &self.finished
    }

    /// `rank`'s evaluation counts of `split` at `step`; the metrics of the whole split once
    /// every rank has reported.
    pub fn report_eval(
        &mut self,
        generation: u64,
        rank: usize,
        split: EvalSplit,
        step: u64,
        counts: Counts,
    ) -> Result<Option<EvalMetrics>, Refusal> {
        let rank = self.current(generation, rank)?;
        self.evals.report(rank, split, step, counts).map_err(Refusal::Invalid)
    }

    /// The metrics of a finished evaluation.
    pub fn eval_result(&self, split: EvalSplit, step: u64) -> Option<&EvalMetrics> {
        self.evals.result(split, step)
    }

    /// Every finished evaluation, by (split, step).
    pub fn eval_results(&self) -> &BTreeMap<(EvalSplit, u64), EvalMetrics> {
        &self.evals.done
    }

    /// `rank`'s parameter checksum at `step`. Once every rank has reported, the checksums
    /// agree, or the job ends: the ranks have diverged.
    pub fn report_checksum(
        &mut self,
        generation: u64,
        rank: usize,
        step: u64,
        checksum: u64,
    ) -> Result<Option<Effect>, Refusal> {
        let rank = self.current(generation, rank)?;
        let world = self.rdv.world_size();
        let incomplete = self.checksums.values().filter(|s| s.iter().any(Option::is_none)).count();
        if !self.checksums.contains_key(&step) && incomplete >= crate::gather::MAX_PENDING {
            return Err(Refusal::Invalid(format!(
                "{incomplete} checksum gathers are incomplete already; step {step} is not one the other ranks have reached"
            )));
        }
        let sums = self.checksums.entry(step).or_insert_with(|| vec![None; world]);
        let Some(slot) = sums.get_mut(rank) else {
            return Err(Refusal::OutsideWorld { rank, world: sums.len() });
        };
        if slot.is_some() {
            return Err(Refusal::Invalid(format!("rank {rank} already reported step {step}")));
        }
        *slot = Some(checksum);
        if sums.iter().any(Option::is_none) {
            return Ok(None);
        }
        let differ: Vec<usize> = (1..world).filter(|&k| sums[k] != sums[0]).collect();
        if differ.is_empty() {
            tracing::debug!(step, checksum = format!("{checksum:016x}"), "parameters agree");
            return Ok(Some(Effect::Gathered));
        }
        Ok(self.end(Err(format!(
            "the workers' parameters diverged at step {step}: ranks {differ:?} differ from rank 0 (a silent desync: \
             a faulty device, memory corruption, or nondeterministic code)"
        ))))
    }

    /// Whether every rank's checksum of `step` is in.
    pub fn checksums_complete(&self, step: u64) -> bool {
        self.checksums.get(&step).is_some_and(|s| s.iter().all(Option::is_some))
    }

    // --- checkpoints ---

    /// A checkpoint upload from `rank` of `generation` may be written: rank 0 of the running
    /// generation saves.
    pub fn accept_upload(&self, generation: u64, rank: usize, secret: &[u8]) -> Result<(), Refusal> {
        if rank != 0 {
            return Err(Refusal::NotAllowed(format!("rank {rank} sent a checkpoint: only rank 0 saves")));
        }
        self.authorize(generation, rank, secret).map(|_| ())
    }

    /// The metrics a checkpoint of `step` records: its training loss and the evaluations of
    /// that step.
    pub fn metrics_at(&self, step: u64, train_loss: f64) -> BTreeMap<String, f64> {
        let evals = self.evals.done.iter().filter(|((_, s), _)| *s == step).map(|((split, _), m)| (split.name(), m));
        job::checkpoints::step_metrics(train_loss, evals)
    }

    /// A checkpoint of `step` is complete at `path`; the final one has published `model`.
    pub fn saved(&mut self, step: u64, path: PathBuf, model: Option<PathBuf>) {
        self.saved.insert(step, path);
        if model.is_some() {
            self.final_model = model;
        }
    }

    pub fn saved_checkpoints(&self) -> &BTreeMap<u64, PathBuf> {
        &self.saved
    }

    pub fn final_model(&self) -> Option<&PathBuf> {
        self.final_model.as_ref()
    }

    /// The checkpoint the current generation starts from.
    pub fn resume_point(&self) -> Option<&(PathBuf, Manifest)> {
        self.resume.as_ref()
    }

    // --- status ---

    pub fn snapshot(&self) -> Snapshot {
        let (joined, min_workers) = self.rdv.count();
        let open = self.rdv.is_open();
        let workers = if open {
            Vec::new()
        } else {
            let members = self.rdv.members().unwrap_or_default();
            self.seen
                .iter()
                .enumerate()
                .map(|(rank, s)| {
                    let host = members.get(rank).map(|m| m.hostname.clone()).unwrap_or_default();
                    (host, s.clone(), self.finished.get(rank).is_some_and(Option::is_some))
                })
                .collect()
        };
        Snapshot {
            generation: self.rdv.generation(),
            open,
            first_generation: self.rdv.generation() == self.first_generation,
            world_size: self.rdv.world_size(),
            min_workers,
            max_workers: self.rdv.max_workers(),
            joined,
            restarts: self.restarts.restarts,
            end: self.end.clone(),
            stopping: self.stopping,
            workers,
            saved: self.saved.clone(),
            final_model: self.final_model.clone(),
        }
    }

    pub fn max_restarts(&self) -> u32 {
        self.limits.elastic.max_restarts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROTOCOL: u32 = 7;

    fn limits(max_restarts: u32) -> Limits {
        let elastic = ElasticSection { max_restarts, ..ElasticSection::default() };
        Limits { gather_timeout: Duration::from_secs(60), elastic }
    }

    fn job(world: usize, max_restarts: u32, t0: Instant) -> JobState {
        let _ = t0;
        JobState::new(Rendezvous::new(world, PROTOCOL), limits(max_restarts), Restarts::default(), "cfg".into())
    }

    fn joiner(rank: u32) -> Joiner {
        Joiner {
            protocol_version: PROTOCOL,
            rank_hint: Some(rank),
            ring_addr: format!("10.0.0.{rank}:29500"),
            hostname: format!("host-{rank}"),
            nccl_id: Vec::new(),
            secret: proto::auth::MemberSecret::generate(),
        }
    }

    /// Every rank of the gathering generation joins; returns the generation.
    fn gather(s: &mut JobState, world: u32, now: Instant) -> u64 {
        let mut started = None;
        for rank in 0..world {
            let (_, generation, effect) = s.join(joiner(rank), "cfg", "model".into(), now).unwrap();
            started = effect.or(started);
            assert_eq!(s.assignment(rank as usize, generation) == JoinWait::Waiting, rank + 1 < world);
        }
        assert_eq!(started, Some(Effect::Started));
        s.generation()
    }

    fn manifest(step: u64) -> Manifest {
        let cursor = job::checkpoints::Cursor { epoch: 0, position: step * 4, world_size: 2 };
        Manifest::new(step, cursor, 1, false, serde_json::Value::Null, BTreeMap::new())
    }

    #[test]
    fn a_failure_during_gathering_changes_nothing_and_a_gathering_that_times_out_ends_the_job() {
        let t0 = Instant::now();
        let mut s = job(2, 3, t0);
        let (slot, generation, started) = s.join(joiner(0), "cfg", "model".into(), t0).unwrap();
        assert_eq!((slot, started), (0, None));
        // Nothing runs yet: a failure report, a stale beat, an upload are refused or ignored.
        assert_eq!(s.fail(generation, "rank 0 died"), None);
        assert!(matches!(s.accept_upload(generation, 0, &[]), Err(Refusal::Stale { .. })));
        // A worker that leaves frees its slot for a replacement.
        assert!(s.leave(0, "host-0"));
        assert_eq!(s.missing(), vec![0, 1]);
        s.join(joiner(0), "cfg", "model".into(), t0).unwrap();
        assert_eq!(s.tick(t0 + Duration::from_secs(30)), None);
        assert_eq!(s.tick(t0 + Duration::from_secs(61)), Some(Effect::Ended));
        let why = s.outcome().unwrap().unwrap_err();
        assert!(why.contains("1 of the 2 workers needed") && why.contains("[1]"), "{why}");
        assert_eq!(s.assignment(0, generation), JoinWait::Failed(why));
    }

    #[test]
    fn a_failure_during_training_restarts_from_the_newest_checkpoint_and_refuses_the_old_generation() {
        let t0 = Instant::now();
        let mut s = job(2, 3, t0);
        let g0 = gather(&mut s, 2, t0);
        assert!(matches!(s.assignment(1, g0), JoinWait::Ready(a) if a.rank == 1 && a.world == 2 && a.resume.is_none()));
        assert_eq!(s.beat(g0, 1, 3, "training", "", t0), None);
        // Rank 1 reports a failure: the generation fails at once; its second failure and its
        // other ranks' messages change nothing.
        let e = s.beat(g0, 1, 3, "training", "CUDA error", t0);
        assert!(
            matches!(&e, Some(Effect::Restarting { generation, reason }) if *generation == g0 && reason.contains("rank 1 (host-1) failed: CUDA error"))
        );
        assert_eq!(s.gone(g0, 0), None);
        assert!(matches!(s.current(g0, 0), Err(Refusal::Stale { .. })));
        // The caller found the checkpoint of step 4.
        let e = s.restart(g0, Some(("ckpt/step-00000004".into(), manifest(4))), t0).unwrap();
        let Effect::Restarted { restarts, step, dir } = e else { panic!("{e:?}") };
        assert_eq!((restarts.generation, restarts.restarts, step), (g0 + 1, 1, 4));
        assert_eq!(dir, Some(PathBuf::from("ckpt/step-00000004")));
        assert_eq!(s.restart(g0, None, t0), None, "a second restart of the same failure");
        // The old generation's reports are refused; the new one resumes from step 4.
        assert!(matches!(s.finish(g0, 0, Finished { steps: 9, model_dir: String::new() }), Err(Refusal::Stale { .. })));
        assert!(matches!(s.report_checksum(g0, 0, 5, 1), Err(Refusal::Stale { .. })));
        let g1 = gather(&mut s, 2, t0);
        assert_eq!(g1, g0 + 1);
        let JoinWait::Ready(a) = s.assignment(0, g1) else { panic!("not assigned") };
        assert_eq!(a.resume.map(|(_, m)| m.step), Some(4));
        // It finishes.
        assert_eq!(s.finish(g1, 0, Finished { steps: 9, model_dir: "out/model".into() }).unwrap(), None);
        assert_eq!(s.finish(g1, 1, Finished { steps: 9, model_dir: String::new() }).unwrap(), Some(Effect::Ended));
        assert_eq!(s.outcome(), Some(Ok(())));
    }

    #[test]
    fn a_silent_rank_fails_its_generation_and_the_restart_budget_runs_out() {
        let t0 = Instant::now();
        let mut s = job(2, 1, t0);
        let g0 = gather(&mut s, 2, t0);
        let hb = Duration::from_secs_f64(ElasticSection::default().heartbeat_timeout_s);
        let later = t0 + hb + Duration::from_secs(1);
        s.beat(g0, 0, 1, "training", "", later);
        let e = s.tick(later);
        assert!(
            matches!(&e, Some(Effect::Restarting { reason, .. }) if reason.contains("rank 1 (host-1) stalled: no heartbeat")),
            "{e:?}"
        );
        assert!(matches!(s.restart(g0, None, later), Some(Effect::Restarted { step: 0, dir: None, .. })));
        let g1 = gather(&mut s, 2, later);
        // The one restart allowed is spent: the next failure ends the job.
        assert_eq!(s.gone(g1, 0), Some(Effect::Ended));
        let why = s.outcome().unwrap().unwrap_err();
        assert!(why.contains("rank 0 (host-0) is gone") && why.contains("elastic.max_restarts"), "{why}");
        assert_eq!(s.fail(g1, "again"), None);
        assert!(matches!(s.current(g1, 0), Err(Refusal::Failed(_))));
    }

    #[test]
    fn checksums_that_differ_end_the_job_naming_the_step_and_the_ranks() {
        let t0 = Instant::now();
        let mut s = job(3, 3, t0);
        let g = gather(&mut s, 3, t0);
        assert_eq!(s.report_checksum(g, 0, 10, 0xabc).unwrap(), None);
        assert!(matches!(s.report_checksum(g, 0, 10, 0xabc), Err(Refusal::Invalid(_))));
        assert_eq!(s.report_checksum(g, 1, 10, 0xabc).unwrap(), None);
        assert!(!s.checksums_complete(10));
        assert_eq!(s.report_checksum(g, 2, 10, 0xabc).unwrap(), Some(Effect::Gathered));
        assert!(s.checksums_complete(10));
        s.report_checksum(g, 0, 20, 1).unwrap();
        s.report_checksum(g, 1, 20, 2).unwrap();
        assert_eq!(s.report_checksum(g, 2, 20, 1).unwrap(), Some(Effect::Ended));
        let why = s.outcome().unwrap().unwrap_err();
        assert!(why.contains("diverged at step 20: ranks [1]"), "{why}");
    }

    #[test]
    fn an_upload_of_a_stale_generation_or_another_rank_or_without_the_secret_is_refused() {
        let t0 = Instant::now();
        let mut s = job(2, 3, t0);
        assert!(matches!(s.accept_upload(0, 0, &[]), Err(Refusal::Stale { .. })), "nothing runs yet");
        let g0 = gather(&mut s, 2, t0);
        let secret = |s: &JobState, rank| s.rdv.member(rank).unwrap().secret.as_bytes().to_vec();
        let (s0, s1) = (secret(&s, 0), secret(&s, 1));
        assert_ne!(s0, s1);
        assert_eq!(s.accept_upload(g0, 0, &s0), Ok(()));
        assert!(matches!(s.accept_upload(g0, 1, &s1), Err(Refusal::NotAllowed(_))));
        // Rank 1 acting as rank 0: refused, for uploads as for everything else.
        for wrong in [&s1[..], &[], &s0[..31]] {
            assert_eq!(s.accept_upload(g0, 0, wrong), Err(Refusal::NotMember { rank: 0, generation: g0 }));
            assert_eq!(s.authorize(g0, 0, wrong), Err(Refusal::NotMember { rank: 0, generation: g0 }));
        }
        assert_eq!(s.authorize(g0, 1, &s1), Ok(1));
        assert!(matches!(s.fail(g0, "rank 1 died"), Some(Effect::Restarting { .. })));
        // Failing already: an upload that started before must not be kept.
        assert!(matches!(s.accept_upload(g0, 0, &s0), Err(Refusal::Stale { .. })));
        s.restart(g0, None, t0);
        assert!(
            matches!(s.accept_upload(g0, 0, &s0), Err(Refusal::Stale { generation, current }) if generation == g0 && current == g0 + 1)
        );
        let g1 = gather(&mut s, 2, t0);
        // Each generation's members get fresh secrets.
        assert_eq!(s.accept_upload(g1, 0, &s0), Err(Refusal::NotMember { rank: 0, generation: g1 }));
        let s0 = secret(&s, 0);
        assert_eq!(s.accept_upload(g1, 0, &s0), Ok(()));
        assert!(matches!(s.accept_upload(g1 + 1, 0, &s0), Err(Refusal::Stale { .. })));
    }

    #[test]
    fn a_worker_with_another_config_or_model_is_refused_and_a_stopping_job_does_not_restart() {
        let t0 = Instant::now();
        let mut s = job(2, 3, t0);
        s.set_model_sha256(Some("model".into()));
        assert!(
            matches!(s.join(joiner(0), "other", "model".into(), t0), Err(Refusal::Mismatch(m)) if m.contains("another job config"))
        );
        assert!(
            matches!(s.join(joiner(0), "cfg", "theirs".into(), t0), Err(Refusal::Mismatch(m)) if m.contains("model files"))
        );
        let g = gather(&mut s, 2, t0);
        assert!(s.stop());
        assert!(!s.stop());
        assert_eq!(s.fail(g, "rank 0 got SIGINT"), None);
        assert_eq!(s.end(Err("stopped".into())), Some(Effect::Ended));
        assert_eq!(s.end(Ok(())), None, "the first end counts");
    }
}
