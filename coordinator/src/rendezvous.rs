//! Rendezvous: who is in each generation of the job, and with which rank. A plain state
//! machine; the gRPC service feeds it joins and the clock, and waits for it to close.
//!
//! A job runs as a sequence of generations: the first at start, a new one after every failure.
//! Each generation gathers its workers from scratch (survivors rejoin, replacements join), then
//! closes: with all `max` workers at once, or, when elastic (`min < max`), with at least `min`
//! once `last_call` has passed since the `min`-th joined and the global batch divides evenly
//! among them. Once closed, membership is fixed until the next restart.
//!
//! Slots and ranks: a worker's rank hint (Kubernetes' `JOB_COMPLETION_INDEX`) picks its slot when
//! free; a worker without a hint takes the lowest free slot. A full world's ranks are its slots;
//! a smaller world numbers its members 0..n in slot order. A join is refused when the world is
//! full or closed, when the protocol version differs, or when the hinted slot is out of range or
//! taken; a refused join changes nothing.

use std::fmt;
use std::time::{Duration, Instant};

/// What a worker says about itself when it joins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joiner {
    pub protocol_version: u32,
    pub rank_hint: Option<u32>,
    pub ring_addr: String,
    pub hostname: String,
    /// The NCCL unique id it made (empty on CPU); rank 0's is the generation's.
    pub nccl_id: Vec<u8>,
    /// What the coordinator gave it to prove it is this member (`JoinReply.member_secret`).
    pub secret: proto::auth::MemberSecret,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinError {
    WorldFull {
        world: usize,
    },
    Running {
        world: usize,
        max: usize,
    },
    ProtocolMismatch {
        ours: u32,
        theirs: u32,
    },
    RankOutOfRange {
        hint: u32,
        world: usize,
    },
    RankTaken {
        rank: usize,
        by: String,
    },
    BadRingAddr(String),
    /// A CUDA worker (it sent an NCCL id) in a world of CPU workers, or the other way round.
    MixedDevices {
        cuda: bool,
        other: String,
    },
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::WorldFull { world } => write!(f, "the job already has all {world} workers"),
            JoinError::Running { world, max } => write!(
                f,
                "the job is running with {world} of at most {max} workers; it takes new workers only when it \
                 restarts"
            ),
            JoinError::ProtocolMismatch { ours, theirs } => {
                write!(f, "protocol version {theirs} differs from the coordinator's {ours}: run the same Tandem build everywhere")
            }
            JoinError::RankOutOfRange { hint, world } => {
                write!(f, "rank hint {hint} is outside the world of {world} (ranks 0..{})", world - 1)
            }
            JoinError::RankTaken { rank, by } => write!(f, "rank {rank} is already taken by {by}"),
            JoinError::BadRingAddr(a) => write!(f, "ring address {a:?} is not host:port"),
            JoinError::MixedDevices { cuda, other } => {
                let (this, theirs) = if *cuda { ("CUDA", "CPU") } else { ("CPU", "CUDA") };
                write!(
                    f,
                    "this worker computes on {this} and {other} on {theirs}: a world's gradients are summed by one \
                     transport (the CPU ring or NCCL), so every worker runs on the same --device"
                )
            }
        }
    }
}

impl std::error::Error for JoinError {}

#[derive(Debug)]
pub struct Rendezvous {
    min: usize,
    max: usize,
    /// The global batch: a world of n closes only if n divides it.
    batch_size: usize,
    last_call: Duration,
    protocol_version: u32,
    generation: u64,
    slots: Vec<Option<Joiner>>,
    /// How many slots are filled, the lowest slot that may be free, and the device of the workers
    /// in them (CUDA or not, and the first one's host): kept so that a join costs O(1) however
    /// large the world.
    filled: usize,
    first_free: usize,
    device: Option<(bool, String)>,
    /// The slot of each rank, once this generation's world is closed.
    world: Option<Vec<usize>>,
    /// The rank of each slot, once the world is closed (`None`: a slot left out of it).
    ranks: Vec<Option<usize>>,
    /// When the `min`-th worker of this gathering joined.
    min_reached: Option<Instant>,
    /// When this generation started gathering.
    since: Instant,
}

impl Rendezvous {
    /// A fixed world of `world` workers, generation 0.
    pub fn new(world: usize, protocol_version: u32) -> Self {
        Self::elastic(world, world, world, Duration::ZERO, protocol_version, 0)
    }

    /// A world of `min..=max` workers, starting at `generation`.
    pub fn elastic(
        min: usize,
        max: usize,
        batch_size: usize,
        last_call: Duration,
        protocol_version: u32,
        generation: u64,
    ) -> Self {
        assert!(1 <= min && min <= max, "a world has 1 <= min <= max workers");
        Rendezvous {
            min,
            max,
            batch_size,
            last_call,
            protocol_version,
            generation,
            slots: vec![None; max],
            filled: 0,
            first_free: 0,
            device: None,
            world: None,
            ranks: Vec::new(),
            min_reached: None,
            since: Instant::now(),
        }
    }

    pub fn protocol_version(&self) -> u32 {
        self.protocol_version
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The most workers the job runs with.
    pub fn max_workers(&self) -> usize {
        self.max
    }

    /// The fewest workers the job runs with.
    pub fn min_workers(&self) -> usize {
        self.min
    }

    /// This generation's world size once closed, else the most it can be.
    pub fn world_size(&self) -> usize {
        self.world.as_ref().map_or(self.max, Vec::len)
    }

    /// Whether this generation is still gathering its workers.
    pub fn is_open(&self) -> bool {
        self.world.is_none()
    }

    /// How long this generation has been gathering (or had gathered).
    pub fn gathering_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.since)
    }

    fn joined(&self) -> usize {
        self.filled
    }

    /// Admits a worker to the gathering generation and returns its slot.
    pub fn join(&mut self, j: Joiner, now: Instant) -> Result<usize, JoinError> {
        if j.protocol_version != self.protocol_version {
            return Err(JoinError::ProtocolMismatch { ours: self.protocol_version, theirs: j.protocol_version });
        }
        if j.ring_addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
            return Err(JoinError::BadRingAddr(j.ring_addr));
        }
        if let Some(w) = &self.world {
            return Err(if w.len() == self.max {
                JoinError::WorldFull { world: self.max }
            } else {
                JoinError::Running { world: w.len(), max: self.max }
            });
        }
        let cuda = !j.nccl_id.is_empty();
        if let Some((_, other)) = self.device.as_ref().filter(|(theirs, _)| *theirs != cuda) {
            return Err(JoinError::MixedDevices { cuda, other: other.clone() });
        }
        let slot = match j.rank_hint {
            Some(h) if h as usize >= self.max => return Err(JoinError::RankOutOfRange { hint: h, world: self.max }),
            Some(h) => {
                let r = h as usize;
                if let Some(other) = &self.slots[r] {
                    return Err(JoinError::RankTaken { rank: r, by: other.hostname.clone() });
                }
                r
            }
            None => {
                let free = self.slots[self.first_free..].iter().position(Option::is_none);
                self.first_free + free.expect("an open world has a free slot")
            }
        };
        if slot == self.first_free {
            self.first_free += 1;
        }
        self.device.get_or_insert_with(|| (cuda, j.hostname.clone()));
        self.slots[slot] = Some(j);
        self.filled += 1;
        if self.joined() >= self.min && self.min_reached.is_none() {
            self.min_reached = Some(now);
        }
        self.tick(now);
        Ok(slot)
    }

    /// Closes the gathering world when it may close by `now`; returns whether it is closed.
    pub fn tick(&mut self, now: Instant) -> bool {
        if self.world.is_some() {
            return true;
        }
        let n = self.joined();
        let last_call_over = self.min_reached.is_some_and(|t| now.saturating_duration_since(t) >= self.last_call);
        if n == self.max || (n >= self.min && last_call_over && self.batch_size.is_multiple_of(n)) {
            let world: Vec<usize> =
                self.slots.iter().enumerate().filter(|(_, s)| s.is_some()).map(|(i, _)| i).collect();
            self.ranks = vec![None; self.max];
            for (rank, &slot) in world.iter().enumerate() {
                self.ranks[slot] = Some(rank);
            }
            self.world = Some(world);
            return true;
        }
        false
    }

    /// Frees `slot` again when the worker holding it goes away (its Join timed out or it hung
    /// up) before the world closed. Once closed, membership is fixed and this does nothing;
    /// returns whether the slot was freed.
    pub fn leave(&mut self, slot: usize, hostname: &str) -> bool {
        if self.world.is_some() {
            return false;
        }
        match self.slots.get(slot) {
            Some(Some(j)) if j.hostname == hostname => {
                self.slots[slot] = None;
                self.filled -= 1;
                self.first_free = self.first_free.min(slot);
                if self.filled == 0 {
                    self.device = None;
                }
                if self.joined() < self.min {
                    self.min_reached = None;
                }
                true
            }
            _ => false,
        }
    }

    /// Starts the next generation: everybody must join again. Returns its number.
    pub fn restart(&mut self, now: Instant) -> u64 {
        self.generation += 1;
        self.slots = vec![None; self.max];
        (self.filled, self.first_free, self.device) = (0, 0, None);
        self.world = None;
        self.ranks = Vec::new();
        self.min_reached = None;
        self.since = now;
        self.generation
    }

    /// The rank of the worker in `slot`, once the world is closed.
    pub fn rank_of_slot(&self, slot: usize) -> Option<usize> {
        *self.ranks.get(slot)?
    }

    /// The slots still free.
    pub fn missing(&self) -> Vec<usize> {
        self.slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(r, _)| r).collect()
    }

    /// How many have joined, and how many the world needs at least.
    pub fn count(&self) -> (usize, usize) {
        (self.joined(), self.min)
    }

    /// The member of `rank`, once the world is closed.
    pub fn member(&self, rank: usize) -> Option<&Joiner> {
        self.slots[*self.world.as_ref()?.get(rank)?].as_ref()
    }

    /// Every member by rank, once the world is closed.
    pub fn members(&self) -> Option<Vec<&Joiner>> {
        let w = self.world.as_ref()?;
        Some(w.iter().map(|&s| self.slots[s].as_ref().expect("a closed world's slots are filled")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Rendezvous {
        fn join_now(&mut self, j: Joiner) -> Result<usize, JoinError> {
            self.join(j, Instant::now())
        }
    }

    fn joiner(hint: Option<u32>, host: &str) -> Joiner {
        Joiner {
            protocol_version: 1,
            rank_hint: hint,
            ring_addr: format!("{host}:29500"),
            hostname: host.into(),
            nccl_id: Vec::new(),
            secret: proto::auth::MemberSecret::generate(),
        }
    }

    #[test]
    fn hints_are_honoured_and_the_rest_fill_the_gaps() {
        let mut r = Rendezvous::new(3, 1);
        assert_eq!(r.join_now(joiner(Some(2), "c")), Ok(2));
        assert_eq!(r.join_now(joiner(None, "a")), Ok(0));
        assert_eq!(r.missing(), vec![1]);
        assert!(r.members().is_none());
        assert_eq!(r.join_now(joiner(None, "b")), Ok(1));
        let m = r.members().unwrap();
        assert_eq!(m.iter().map(|j| j.hostname.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn refusals_change_nothing() {
        let mut r = Rendezvous::new(2, 1);
        r.join_now(joiner(Some(0), "a")).unwrap();
        let before = format!("{r:?}");
        assert_eq!(r.join_now(joiner(Some(0), "x")), Err(JoinError::RankTaken { rank: 0, by: "a".into() }));
        assert_eq!(r.join_now(joiner(Some(5), "x")), Err(JoinError::RankOutOfRange { hint: 5, world: 2 }));
        let mut old = joiner(None, "x");
        old.protocol_version = 0;
        assert_eq!(r.join_now(old), Err(JoinError::ProtocolMismatch { ours: 1, theirs: 0 }));
        let mut bad = joiner(None, "x");
        bad.ring_addr = "nowhere".into();
        assert!(matches!(r.join_now(bad), Err(JoinError::BadRingAddr(_))));
        assert_eq!(format!("{r:?}"), before);
        r.join_now(joiner(None, "b")).unwrap();
        assert_eq!(r.join_now(joiner(None, "late")), Err(JoinError::WorldFull { world: 2 }));
        assert!(JoinError::WorldFull { world: 2 }.to_string().contains("all 2 workers"));
    }

    #[test]
    fn a_worker_that_leaves_before_the_world_is_complete_frees_its_rank() {
        let mut r = Rendezvous::new(2, 1);
        assert_eq!(r.join_now(joiner(Some(1), "gone")), Ok(1));
        assert!(!r.leave(1, "someone-else"), "only the holder frees a slot");
        assert!(r.leave(1, "gone"));
        assert_eq!(r.join_now(joiner(Some(1), "back")), Ok(1));
        assert_eq!(r.join_now(joiner(None, "a")), Ok(0));
        assert!(!r.leave(1, "back"), "a complete world keeps its members");
        assert_eq!(r.members().unwrap().len(), 2);
    }

    #[test]
    fn a_restart_gathers_everyone_again() {
        let mut r = Rendezvous::new(2, 1);
        r.join_now(joiner(None, "a")).unwrap();
        r.join_now(joiner(None, "b")).unwrap();
        assert!(!r.is_open());
        assert_eq!(r.restart(Instant::now()), 1);
        assert!(r.is_open() && r.members().is_none());
        assert_eq!(r.join_now(joiner(Some(1), "b")), Ok(1));
        assert_eq!(r.join_now(joiner(None, "replacement")), Ok(0));
        assert_eq!(r.members().unwrap()[0].hostname, "replacement");
    }

    #[test]
    fn an_elastic_world_closes_with_fewer_after_the_last_call() {
        let t0 = Instant::now();
        let mut r = Rendezvous::elastic(2, 3, 6, Duration::from_secs(10), 1, 4);
        assert_eq!(r.join(joiner(Some(2), "c"), t0), Ok(2));
        assert!(!r.tick(t0 + Duration::from_secs(100)), "one is below min");
        assert_eq!(r.join(joiner(Some(0), "a"), t0 + Duration::from_secs(1)), Ok(0));
        assert!(!r.tick(t0 + Duration::from_secs(5)), "the last call is still on");
        assert!(r.tick(t0 + Duration::from_secs(11)));
        assert_eq!(r.world_size(), 2);
        assert_eq!((r.rank_of_slot(0), r.rank_of_slot(2), r.rank_of_slot(1)), (Some(0), Some(1), None));
        assert_eq!(r.join(joiner(None, "late"), t0), Err(JoinError::Running { world: 2, max: 3 }));
        // A world the batch does not divide among does not close: 4 does not divide by 3.
        let mut r = Rendezvous::elastic(2, 4, 4, Duration::from_secs(5), 1, 0);
        for h in ["a", "b", "c"] {
            r.join(joiner(None, h), t0).unwrap();
        }
        assert!(!r.tick(t0 + Duration::from_secs(10)));
        assert!(r.leave(2, "c"));
        assert!(r.tick(t0 + Duration::from_secs(10)));
        assert_eq!(r.world_size(), 2);
    }

    #[test]
    fn a_cuda_worker_and_a_cpu_worker_cannot_share_a_world() {
        let mut r = Rendezvous::new(3, 1);
        r.join_now(joiner(Some(0), "cpu-a")).unwrap();
        let mut gpu = joiner(Some(1), "gpu-b");
        gpu.nccl_id = vec![7; 128];
        let e = r.join_now(gpu).unwrap_err();
        assert_eq!(e, JoinError::MixedDevices { cuda: true, other: "cpu-a".into() });
        assert!(e.to_string().contains("this worker computes on CUDA and cpu-a on CPU"), "{e}");
        assert_eq!(r.missing(), vec![1, 2], "the refusal changed nothing");
        // A world of CUDA workers refuses a CPU one the same way.
        let mut r = Rendezvous::new(2, 1);
        let mut gpu = joiner(None, "gpu-a");
        gpu.nccl_id = vec![7; 128];
        r.join_now(gpu).unwrap();
        let e = r.join_now(joiner(None, "cpu-b")).unwrap_err();
        assert_eq!(e, JoinError::MixedDevices { cuda: false, other: "gpu-a".into() });
    }

    #[test]
    fn slots_are_filled_lowest_first_and_a_left_slot_is_taken_again() {
        let mut r = Rendezvous::new(4, 1);
        assert_eq!(r.join_now(joiner(None, "a")), Ok(0));
        assert_eq!(r.join_now(joiner(Some(2), "c")), Ok(2));
        assert_eq!(r.join_now(joiner(None, "b")), Ok(1));
        assert!(r.leave(0, "a"));
        assert_eq!(r.count().0, 2);
        assert_eq!(r.join_now(joiner(None, "a2")), Ok(0), "the left slot first");
        assert_eq!(r.join_now(joiner(None, "d")), Ok(3), "then past the hinted one");
        assert!(!r.is_open());
        assert_eq!((r.rank_of_slot(3), r.member(3).map(|m| m.hostname.as_str())), (Some(3), Some("d")));
    }
}
