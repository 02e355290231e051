//! Rendezvous: who is in the job and with which rank. A plain state machine; the gRPC service
//! feeds it joins and waits for it to be complete.
//!
//! Ranks: a worker's rank hint (Kubernetes' `JOB_COMPLETION_INDEX`) is honoured when it is free;
//! a worker without a hint gets the lowest free rank once every hinted worker that is already
//! waiting has its slot. A join is refused when the world is full, when the protocol version
//! differs, or when the hinted rank is out of range or taken; a refused join changes nothing.

use std::fmt;

/// What a worker says about itself when it joins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joiner {
    pub protocol_version: u32,
    pub rank_hint: Option<u32>,
    pub ring_addr: String,
    pub hostname: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinError {
    WorldFull { world: usize },
    ProtocolMismatch { ours: u32, theirs: u32 },
    RankOutOfRange { hint: u32, world: usize },
    RankTaken { rank: usize, by: String },
    BadRingAddr(String),
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::WorldFull { world } => write!(f, "the job already has all {world} workers"),
            JoinError::ProtocolMismatch { ours, theirs } => {
                write!(f, "protocol version {theirs} differs from the coordinator's {ours}: run the same Tandem build everywhere")
            }
            JoinError::RankOutOfRange { hint, world } => {
                write!(f, "rank hint {hint} is outside the world of {world} (ranks 0..{})", world - 1)
            }
            JoinError::RankTaken { rank, by } => write!(f, "rank {rank} is already taken by {by}"),
            JoinError::BadRingAddr(a) => write!(f, "ring address {a:?} is not host:port"),
        }
    }
}

impl std::error::Error for JoinError {}

#[derive(Debug)]
pub struct Rendezvous {
    world: usize,
    protocol_version: u32,
    slots: Vec<Option<Joiner>>,
}

impl Rendezvous {
    pub fn new(world: usize, protocol_version: u32) -> Self {
        assert!(world >= 1, "a world has at least one worker");
        Rendezvous { world, protocol_version, slots: vec![None; world] }
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Admits a worker and returns its rank.
    pub fn join(&mut self, j: Joiner) -> Result<usize, JoinError> {
        if j.protocol_version != self.protocol_version {
            return Err(JoinError::ProtocolMismatch { ours: self.protocol_version, theirs: j.protocol_version });
        }
        if j.ring_addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
            return Err(JoinError::BadRingAddr(j.ring_addr));
        }
        if self.slots.iter().all(Option::is_some) {
            return Err(JoinError::WorldFull { world: self.world });
        }
        let rank = match j.rank_hint {
            Some(h) if h as usize >= self.world => {
                return Err(JoinError::RankOutOfRange { hint: h, world: self.world })
            }
            Some(h) => {
                let r = h as usize;
                if let Some(other) = &self.slots[r] {
                    return Err(JoinError::RankTaken { rank: r, by: other.hostname.clone() });
                }
                r
            }
            None => self.slots.iter().position(Option::is_none).expect("a free slot exists"),
        };
        self.slots[rank] = Some(j);
        Ok(rank)
    }

    /// Frees `rank` again when the worker holding it goes away (its Join timed out or it hung
    /// up) before the world was complete. Once the world is complete, membership is fixed and
    /// this does nothing; returns whether the slot was freed.
    pub fn leave(&mut self, rank: usize, hostname: &str) -> bool {
        if self.members().is_some() {
            return false;
        }
        match self.slots.get(rank) {
            Some(Some(j)) if j.hostname == hostname => {
                self.slots[rank] = None;
                true
            }
            _ => false,
        }
    }

    /// The ranks still missing.
    pub fn missing(&self) -> Vec<usize> {
        self.slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(r, _)| r).collect()
    }

    /// Every member by rank, once all have joined.
    pub fn members(&self) -> Option<Vec<&Joiner>> {
        self.slots.iter().map(Option::as_ref).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joiner(hint: Option<u32>, host: &str) -> Joiner {
        Joiner { protocol_version: 1, rank_hint: hint, ring_addr: format!("{host}:29500"), hostname: host.into() }
    }

    #[test]
    fn hints_are_honoured_and_the_rest_fill_the_gaps() {
        let mut r = Rendezvous::new(3, 1);
        assert_eq!(r.join(joiner(Some(2), "c")), Ok(2));
        assert_eq!(r.join(joiner(None, "a")), Ok(0));
        assert_eq!(r.missing(), vec![1]);
        assert!(r.members().is_none());
        assert_eq!(r.join(joiner(None, "b")), Ok(1));
        let m = r.members().unwrap();
        assert_eq!(m.iter().map(|j| j.hostname.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn refusals_change_nothing() {
        let mut r = Rendezvous::new(2, 1);
        r.join(joiner(Some(0), "a")).unwrap();
        let before = format!("{r:?}");
        assert_eq!(r.join(joiner(Some(0), "x")), Err(JoinError::RankTaken { rank: 0, by: "a".into() }));
        assert_eq!(r.join(joiner(Some(5), "x")), Err(JoinError::RankOutOfRange { hint: 5, world: 2 }));
        let mut old = joiner(None, "x");
        old.protocol_version = 0;
        assert_eq!(r.join(old), Err(JoinError::ProtocolMismatch { ours: 1, theirs: 0 }));
        let mut bad = joiner(None, "x");
        bad.ring_addr = "nowhere".into();
        assert!(matches!(r.join(bad), Err(JoinError::BadRingAddr(_))));
        assert_eq!(format!("{r:?}"), before);
        r.join(joiner(None, "b")).unwrap();
        assert_eq!(r.join(joiner(None, "late")), Err(JoinError::WorldFull { world: 2 }));
        assert!(JoinError::WorldFull { world: 2 }.to_string().contains("all 2 workers"));
    }

    #[test]
    fn a_worker_that_leaves_before_the_world_is_complete_frees_its_rank() {
        let mut r = Rendezvous::new(2, 1);
        assert_eq!(r.join(joiner(Some(1), "gone")), Ok(1));
        assert!(!r.leave(1, "someone-else"), "only the holder frees a slot");
        assert!(r.leave(1, "gone"));
        assert_eq!(r.join(joiner(Some(1), "back")), Ok(1));
        assert_eq!(r.join(joiner(None, "a")), Ok(0));
        assert!(!r.leave(1, "back"), "a complete world keeps its members");
        assert_eq!(r.members().unwrap().len(), 2);
    }
}
