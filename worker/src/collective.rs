//! Collectives between the workers of a job: the sum all-reduce of gradients, and for ZeRO-1
//! its two halves by explicit parts (reduce-scatter of gradients, all-gather of parameters).
//!
//! `Collective` is the interface the CPU training loop sees and `Ring` its implementation
//! (the role gloo plays for PyTorch); GPU ranks sum on the device with NCCL (`nccl.rs`).
//! Neighbours connect and prove themselves over TCP; on one host they then move the data through
//! shared memory (`transport.rs`), elsewhere over the same TCP connections.
//!
//! `Ring` is the classic bandwidth-optimal ring: the buffer is cut into N chunks; in N-1
//! reduce-scatter steps each rank sends one chunk to its successor and adds the chunk it receives
//! from its predecessor, after which rank r holds the complete sum of chunk (r+1) mod N; N-1
//! all-gather steps then pass the finished chunks around the ring. Every rank sends and receives
//! 2(N-1)/N of the buffer.
//!
//! **Determinism:** chunk c is summed in ring order starting at rank c, `((x_c + x_c+1) + ...)`,
//! always the same order for a given world size, and every rank ends with a copy of the same
//! bits. So ranks never drift apart, and a run is reproducible bit for bit.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use job::config::RingTransport;

use crate::transport::{self, Incoming, Outgoing};

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("ring peer rank {rank} ({addr}): {source}")]
    Peer { rank: usize, addr: String, source: std::io::Error },
    #[error("ring setup: {0}")]
    Setup(String),
}

/// The collectives over the ranks of a job. Every rank must make the same calls, in the same
/// order, with buffers of the same length and the same `parts`.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sums `buf` over the ranks, each part landing on its owner: afterwards `buf[parts[r]]` on
    /// rank r holds the sum of that range; the rest of `buf` is left partly summed. `parts` are
    /// disjoint, one per rank, and may be empty.
    fn reduce_scatter_sum(&mut self, buf: &mut [f32], parts: &[Range<usize>]) -> Result<(), CollectiveError>;
    /// Copies `buf[parts[r]]` of rank r into `buf` on every rank, bit for bit.
    fn all_gather(&mut self, buf: &mut [f32], parts: &[Range<usize>]) -> Result<(), CollectiveError>;
    /// Replaces `buf` on every rank with the elementwise sum over all ranks: a reduce-scatter
    /// over [`sum_parts`] and an all-gather.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let parts = sum_parts(buf.len(), self.world_size());
        self.reduce_scatter_sum(buf, &parts)?;
        self.all_gather(buf, &parts)
    }
}

/// The parts of a buffer of `len` elements an all-reduce over `n` ranks gives each rank to sum:
/// [`chunk_ranges`], rank r owning chunk r + 1 (so that chunk c's sum starts at rank c).
pub fn sum_parts(len: usize, n: usize) -> Vec<Range<usize>> {
    let chunks = chunk_ranges(len, n);
    (0..n).map(|r| chunks[(r + 1) % n].clone()).collect()
}

const MAGIC: &[u8; 8] = b"TANDRING";

/// The chunk boundaries of a buffer of `len` elements cut into `n` nearly equal parts.
pub fn chunk_ranges(len: usize, n: usize) -> Vec<std::ops::Range<usize>> {
    let (base, extra) = (len / n, len % n);
    let mut start = 0;
    (0..n)
        .map(|i| {
            let size = base + usize::from(i < extra);
            let r = start..start + size;
            start += size;
            r
        })
        .collect()
}

/// The CPU ring. Each rank connects to its successor and accepts its predecessor over TCP;
/// neighbours on one host then move the data through shared memory (`transport.rs`).
pub struct Ring {
    rank: usize,
    world: usize,
    next: Outgoing,
    prev: Incoming,
    next_addr: String,
    prev_addr: String,
}

/// How a rank joins its ring.
#[derive(Clone, Debug)]
pub struct RingOptions {
    /// How long to wait for the neighbours; every later read and write has the same deadline.
    pub timeout: Duration,
    /// The job token, which neighbours prove they hold (without sending it).
    pub token: Option<proto::auth::JobToken>,
    /// The job's generation: peers of another one (a stale connection from before a restart)
    /// are refused.
    pub generation: u64,
    /// Setting it gives up the wait for the neighbours at once.
    pub cancel: Option<Arc<AtomicBool>>,
    pub transport: RingTransport,
}

impl RingOptions {
    pub fn new(timeout: Duration) -> Self {
        RingOptions { timeout, token: None, generation: 0, cancel: None, transport: RingTransport::Auto }
    }
}

/// How long one connection to a rank's ring port has to prove that it is the predecessor.
const ADMISSION_WAIT: Duration = Duration::from_secs(5);
/// Connections checked at once; more are dropped unread until one of those is done.
const MAX_ADMITTING: usize = 16;

// The wire format is the buffers' own bytes: little-endian f32.
#[cfg(target_endian = "big")]
compile_error!("the ring all-reduce sends native f32 bytes and assumes a little-endian machine");

/// A rank's place in the ring: all it needs of the world (the coordinator's Join reply carries
/// only these, whatever the world's size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbours {
    pub rank: usize,
    pub world: usize,
    /// The ring addresses of rank - 1 and rank + 1 (mod world).
    pub prev: SocketAddr,
    pub next: SocketAddr,
}

impl Neighbours {
    /// `rank`'s neighbours in a ring of every rank's address, `peers`.
    pub fn of(rank: usize, peers: &[SocketAddr]) -> Self {
        let world = peers.len();
        Neighbours { rank, world, prev: peers[(rank + world - 1) % world], next: peers[(rank + 1) % world] }
    }
}

impl Ring {
    /// Joins the ring as `n.rank`: `listener` is this rank's own, where its predecessor connects.
    pub fn connect(n: Neighbours, listener: TcpListener, opts: &RingOptions) -> Result<Self, CollectiveError> {
        let Neighbours { rank, world, prev: prev_addr, next: next_addr } = n;
        let (timeout, generation) = (opts.timeout, opts.generation);
        let cancel = opts.cancel.clone();
        let cancelled = move || cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
        if rank >= world || world < 2 {
            return Err(CollectiveError::Setup(format!(
                "rank {rank} in a ring of {world}: a ring needs 2 or more ranks"
            )));
        }
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let deadline = Instant::now() + timeout;
        let token = opts.token.clone();
        // The successor side, on its own thread: connect (retrying while it starts listening),
        // introduce ourselves, answer its challenge, and wait for its verdict.
        let hello = hello(rank, world, token.is_some(), generation);
        let proof_token = token.clone();
        let connector_cancelled = cancelled.clone();
        let connector = std::thread::spawn(move || -> Result<TcpStream, String> {
            let mut s = loop {
                if connector_cancelled() {
                    return Err("cancelled".into());
                }
                match TcpStream::connect_timeout(&next_addr, Duration::from_millis(500)) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) => return Err(format!("connecting: {e}")),
                }
            };
            s.set_read_timeout(Some(timeout))
                .and_then(|()| s.set_write_timeout(Some(timeout)))
                .map_err(|e| e.to_string())?;
            s.write_all(&hello).map_err(|e| format!("sending our hello: {e}"))?;
            if let Some(t) = &proof_token {
                let mut challenge = [0u8; 16];
                s.read_exact(&mut challenge).map_err(|e| format!("reading its challenge: {e}"))?;
                s.write_all(&t.proof(&ring_context(rank, next_rank, world, generation), &challenge))
                    .map_err(|e| format!("sending our proof: {e}"))?;
            }
            let mut verdict = [0u8; 1];
            match s.read_exact(&mut verdict) {
                Ok(()) if verdict[0] == 1 => Ok(s),
                _ => Err("it refused this rank (another job, world size or job token?)".into()),
            }
        });
        let who = Who { rank, prev_rank, world, generation, token };
        let prev = admit(&listener, &who, deadline, &cancelled).map_err(|e| CollectiveError::Peer {
            rank: prev_rank,
            addr: prev_addr.to_string(),
            source: std::io::Error::new(
                e.kind(),
                format!("rank {rank} found no valid predecessor within {timeout:?}: {e}"),
            ),
        })?;
        let next = connector.join().map_err(|_| CollectiveError::Setup("connector thread panicked".into()))?.map_err(
            |why| CollectiveError::Peer {
                rank: next_rank,
                addr: next_addr.to_string(),
                source: std::io::Error::other(format!("rank {rank}'s successor: {why}")),
            },
        )?;
        for s in [&next, &prev] {
            s.set_nodelay(true).ok();
            s.set_read_timeout(Some(timeout)).map_err(|e| CollectiveError::Setup(e.to_string()))?;
            s.set_write_timeout(Some(timeout)).map_err(|e| CollectiveError::Setup(e.to_string()))?;
        }
        let (next, prev) = transport::negotiate(next, prev, opts.transport).map_err(|e| {
            CollectiveError::Setup(format!("rank {rank} agreeing on the transport with its neighbours: {e}"))
        })?;
        tracing::debug!(
            rank,
            to_successor = if next.shared_memory() { "shared memory" } else { "tcp" },
            from_predecessor = if prev.shared_memory() { "shared memory" } else { "tcp" },
            "ring connected"
        );
        Ok(Ring { rank, world, next, prev, next_addr: next_addr.to_string(), prev_addr: prev_addr.to_string() })
    }

    /// Whether the data to the successor and from the predecessor moves through shared memory.
    pub fn shared_memory(&self) -> (bool, bool) {
        (self.next.shared_memory(), self.prev.shared_memory())
    }

    /// A handle that can break this ring's connections from another thread (a blocked
    /// all-reduce then fails at once): how a restart stops a step that waits on a dead peer.
    pub fn handle(&self) -> std::io::Result<RingHandle> {
        Ok(RingHandle(vec![self.next.tcp().try_clone()?, self.prev.tcp().try_clone()?]))
    }

    /// Sends `send` to the successor while receiving `recv.len()` floats from the predecessor,
    /// each combined into `recv` by `op(local, received)`.
    fn exchange(&mut self, send: &[f32], recv: &mut [f32], op: impl Fn(&mut f32, f32)) -> Result<(), CollectiveError> {
        let (next, prev) = (&mut self.next, &mut self.prev);
        let (sent, received) = std::thread::scope(|s| {
            let h = s.spawn(|| next.send(send));
            let r = prev.recv(recv.len(), |off, piece| {
                for (x, &y) in recv[off..off + piece.len()].iter_mut().zip(piece) {
                    op(x, y);
                }
            });
            (h.join().unwrap_or_else(|_| Err(std::io::Error::other("send thread panicked"))), r)
        });
        let world = self.world;
        sent.map_err(|source| CollectiveError::Peer {
            rank: (self.rank + 1) % world,
            addr: self.next_addr.clone(),
            source,
        })?;
        received.map_err(|source| CollectiveError::Peer {
            rank: (self.rank + world - 1) % world,
            addr: self.prev_addr.clone(),
            source,
        })?;
        Ok(())
    }
}

/// The two disjoint ranges `a` (to read) and `b` (to write) of `buf`.
fn split_pair(buf: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&[f32], &mut [f32]) {
    if a.is_empty() {
        (&[], &mut buf[b])
    } else if b.is_empty() {
        (&buf[a], &mut [])
    } else if a.start >= b.end {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.len()], &mut lo[b])
    } else {
        assert!(a.end <= b.start, "ring chunks {a:?} and {b:?} overlap");
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.len()])
    }
}

/// Breaks a ring's connections: see [`Ring::handle`].
pub struct RingHandle(Vec<TcpStream>);

impl RingHandle {
    pub fn shutdown(&self) {
        for s in &self.0 {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// What a rank says first to its successor: magic, rank, world, and whether it has a token.
fn hello(rank: usize, world: usize, has_token: bool, generation: u64) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&(rank as u32).to_le_bytes());
    h.extend_from_slice(&(world as u32).to_le_bytes());
    h.push(u8::from(has_token));
    h.extend_from_slice(&generation.to_le_bytes());
    h
}

fn ring_context(from: usize, to: usize, world: usize, generation: u64) -> String {
    format!("ring {from} -> {to} of {world}, generation {generation}")
}

/// Who a rank expects as its predecessor.
#[derive(Clone)]
struct Who {
    rank: usize,
    prev_rank: usize,
    world: usize,
    generation: u64,
    token: Option<proto::auth::JobToken>,
}

/// Accepts connections on `listener` until one proves to be the predecessor (`admit_predecessor`),
/// and tells it so. Connections are checked concurrently, each within [`ADMISSION_WAIT`], so a
/// connection that is not the predecessor (garbage, a stray client, a wrong token, a peer that
/// drips its hello) is dropped and logged, and holds up neither the real one nor the ring.
fn admit(
    listener: &TcpListener,
    who: &Who,
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> std::io::Result<TcpStream> {
    let (tx, rx) = std::sync::mpsc::channel::<Result<TcpStream, (SocketAddr, String)>>();
    let mut admitting = 0usize;
    let mut last_refusal = String::from("nobody connected");
    listener.set_nonblocking(true)?;
    loop {
        if cancelled() {
            return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "cancelled"));
        }
        let mut accepted = false;
        match listener.accept() {
            Ok((s, from)) => {
                accepted = true;
                s.set_nonblocking(false)?;
                if admitting >= MAX_ADMITTING {
                    tracing::warn!(rank = who.rank, %from, "refused a ring connection: {MAX_ADMITTING} are being checked");
                } else {
                    admitting += 1;
                    let (tx, by) = (tx.clone(), (Instant::now() + ADMISSION_WAIT).min(deadline));
                    let who = who.clone();
                    std::thread::spawn(move || {
                        let mut s = s;
                        let r = admit_predecessor(&mut s, &who, by);
                        let _ = tx.send(r.map(|()| s).map_err(|why| (from, why)));
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let wait = if accepted { Duration::ZERO } else { Duration::from_millis(10) };
        match rx.recv_timeout(wait) {
            Ok(Ok(mut s)) => {
                s.write_all(&[1])?;
                return Ok(s);
            }
            Ok(Err((from, why))) => {
                admitting -= 1;
                tracing::warn!(rank = who.rank, %from, reason = %why, "refused a ring connection");
                last_refusal = format!("{from}: {why}");
            }
            Err(_) if Instant::now() >= deadline => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("last refused connection: {last_refusal}"),
                ));
            }
            Err(_) => {}
        }
    }
}

/// Checks that the peer on `s` is our predecessor of this job: its hello, and with a token, its
/// proof of the token for a fresh nonce, all by `by`. Reads a bounded number of bytes.
fn admit_predecessor(s: &mut TcpStream, who: &Who, by: Instant) -> Result<(), String> {
    let Who { rank, prev_rank, world, generation, ref token } = *who;
    let wait = by.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
    s.set_write_timeout(Some(wait)).map_err(|e| e.to_string())?;
    let mut got = [0u8; 25];
    read_exact_by(s, &mut got, by).map_err(|e| format!("no hello: {e}"))?;
    if &got[..8] != MAGIC {
        return Err("not a Tandem ring peer (bad magic)".into());
    }
    let their_rank = u32::from_le_bytes(got[8..12].try_into().expect("4 bytes")) as usize;
    let their_world = u32::from_le_bytes(got[12..16].try_into().expect("4 bytes")) as usize;
    if their_rank != prev_rank || their_world != world {
        return Err(format!(
            "claims rank {their_rank} of {their_world}; rank {rank} expects rank {prev_rank} of {world}"
        ));
    }
    if got[16] != u8::from(token.is_some()) {
        return Err("disagrees on whether the job has a token".into());
    }
    let their_generation = u64::from_le_bytes(got[17..25].try_into().expect("8 bytes"));
    if their_generation != generation {
        return Err(format!("is of generation {their_generation} of the job, this ring is generation {generation}"));
    }
    if let Some(token) = token {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| format!("random nonce: {e}"))?;
        s.write_all(&nonce).map_err(|e| e.to_string())?;
        let mut proof = [0u8; 32];
        read_exact_by(s, &mut proof, by).map_err(|e| format!("no proof: {e}"))?;
        if !token.verify_proof(&ring_context(prev_rank, rank, world, generation), &nonce, &proof) {
            return Err("does not hold the job token".into());
        }
    }
    Ok(())
}

/// `read_exact` that gives up at `by`, however slowly the bytes come.
fn read_exact_by(s: &mut TcpStream, buf: &mut [u8], by: Instant) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = by.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{filled} of {} bytes within the deadline", buf.len()),
            ));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[filled..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Ring {
    /// The ring's chunk c: the part of rank c - 1, which the reduce-scatter completes there.
    fn chunks(&self, len: usize, parts: &[Range<usize>]) -> Result<Vec<Range<usize>>, CollectiveError> {
        let n = self.world;
        if parts.len() != n || parts.iter().any(|p| p.start > p.end || p.end > len) {
            return Err(CollectiveError::Setup(format!(
                "{} parts {parts:?} of {len} floats for {n} ranks",
                parts.len()
            )));
        }
        Ok((0..n).map(|c| parts[(c + n - 1) % n].clone()).collect())
    }
}

impl Collective for Ring {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn reduce_scatter_sum(&mut self, buf: &mut [f32], parts: &[Range<usize>]) -> Result<(), CollectiveError> {
        let n = self.world;
        let chunks = self.chunks(buf.len(), parts)?;
        // Step s sends chunk (rank - s) and accumulates chunk (rank - s - 1): after n - 1 steps
        // rank r holds the complete chunk r + 1.
        for s in 0..n - 1 {
            let send = chunks[(self.rank + n - s) % n].clone();
            let recv = chunks[(self.rank + 2 * n - s - 1) % n].clone();
            let (send, recv) = split_pair(buf, send, recv);
            // x_r + (sum of ranks c..r-1): ring order, as commutative addition gives the same bits.
            self.exchange(send, recv, |x, y| *x += y)?;
        }
        Ok(())
    }

    fn all_gather(&mut self, buf: &mut [f32], parts: &[Range<usize>]) -> Result<(), CollectiveError> {
        let n = self.world;
        let chunks = self.chunks(buf.len(), parts)?;
        // Step s sends chunk (rank + 1 - s), which this rank has, and stores chunk (rank - s).
        for s in 0..n - 1 {
            let send = chunks[(self.rank + 1 + n - s) % n].clone();
            let recv = chunks[(self.rank + n - s) % n].clone();
            let (send, recv) = split_pair(buf, send, recv);
            self.exchange(send, recv, |x, y| *x = y)?;
        }
        Ok(())
    }
}

/// The sum of a buffer of `count` rows of `width` floats of which most are zero on every rank,
/// such as the word-embedding gradient of a classifier (only the rows of the batch's tokens are
/// non-zero). Each rank gives the rows that may be non-zero on it (`rows`, ascending) and their
/// values (`packed`, in that order); every other row must be zero there. The ranks first sum a
/// one-float-per-row indicator of their rows, then sum the rows named anywhere, packed in row
/// order (zeros where a rank has none). Returns those rows and their sums, the same bits on
/// every rank; every other row's sum is zero. For BERT's 30522-row vocabulary and a batch of
/// short texts that is a few percent of the dense traffic, and no pass over the dense buffer.
pub fn all_reduce_rows(
    coll: &mut dyn Collective,
    rows: &[u32],
    packed: &[f32],
    count: usize,
    width: usize,
) -> Result<(Vec<u32>, Vec<f32>), CollectiveError> {
    let ascending = rows.windows(2).all(|w| w[0] < w[1]) && rows.last().is_none_or(|&r| (r as usize) < count);
    if !ascending || packed.len() != rows.len() * width {
        return Err(CollectiveError::Setup(format!(
            "{} rows (ascending, below {count}?) of {width} floats given as {} floats",
            rows.len(),
            packed.len()
        )));
    }
    let mut named = vec![0.0f32; count];
    for &r in rows {
        named[r as usize] = 1.0;
    }
    coll.all_reduce_sum(&mut named)?;
    let union: Vec<u32> = (0..count as u32).filter(|&i| named[i as usize] > 0.0).collect();
    let mut sums = vec![0.0f32; union.len() * width];
    let mut mine = rows.iter().zip(packed.chunks(width.max(1))).peekable();
    for (k, &r) in union.iter().enumerate() {
        if let Some((_, values)) = mine.next_if(|(&m, _)| m == r) {
            sums[k * width..(k + 1) * width].copy_from_slice(values);
        }
    }
    coll.all_reduce_sum(&mut sums)?;
    Ok((union, sums))
}

/// A collective on its own thread, so that gradient sums run while backward computes the rest:
/// the training loop hands over each segment of the gradient buffer as backward finishes it
/// ([`Overlapped::start`]), and collects the sums once backward is done ([`Overlapped::finish`]).
/// Every rank starts the same segments in the same order (backward's order), so the ring's
/// messages pair up; a bucket's sum is deterministic, like every ring sum. Between steps (no
/// bucket in flight) the blocking collectives of [`Collective`] run on the caller's thread,
/// straight on the caller's buffer.
pub struct Overlapped {
    rank: usize,
    world: usize,
    coll: Arc<std::sync::Mutex<Box<dyn Collective + Send>>>,
    to_comm: std::sync::mpsc::Sender<Bucket>,
    from_comm: std::sync::mpsc::Receiver<Result<Bucket, CollectiveError>>,
    in_flight: usize,
    /// Set by the thread when a collective failed: the ring is then out of step for good.
    failed: Arc<AtomicBool>,
    /// Time the comm thread spent in collectives since the last `take_busy`.
    busy: Arc<std::sync::Mutex<Duration>>,
    /// The buffers of the last step's buckets, in the order they were started: every step starts
    /// the same segments in the same order, so each next bucket finds a buffer of its size whose
    /// pages are already mapped (fresh allocations cost more in page faults than the copy).
    spare: std::collections::VecDeque<Vec<f32>>,
}

/// One segment of a flat buffer on its way through a collective.
pub struct Bucket {
    pub range: Range<usize>,
    pub data: Vec<f32>,
    pub op: Op,
}

/// What a [`Bucket`] goes through; parts are relative to the bucket.
pub enum Op {
    /// [`Collective::all_reduce_sum`].
    Sum,
    /// [`all_reduce_rows`]: the data holds these rows of `width` floats, of a buffer of `count`
    /// rows; the summed rows come back in their place.
    SumRows { rows: Vec<u32>, count: usize, width: usize },
    /// [`Collective::reduce_scatter_sum`]: only this rank's part comes back summed.
    ReduceScatter(Vec<Range<usize>>),
}

impl Overlapped {
    pub fn new(coll: Box<dyn Collective + Send>) -> Self {
        let (rank, world) = (coll.rank(), coll.world_size());
        let coll = Arc::new(std::sync::Mutex::new(coll));
        let (to_comm, comm_rx) = std::sync::mpsc::channel::<Bucket>();
        let (comm_tx, from_comm) = std::sync::mpsc::channel();
        let busy = Arc::new(std::sync::Mutex::new(Duration::ZERO));
        let failed = Arc::new(AtomicBool::new(false));
        let (busy_comm, failed_comm, coll_comm) = (Arc::clone(&busy), Arc::clone(&failed), Arc::clone(&coll));
        // Not joined: it ends when `to_comm` closes, or with the process after an error.
        std::thread::Builder::new()
            .name("all-reduce".into())
            .spawn(move || {
                for mut b in comm_rx {
                    let t0 = Instant::now();
                    let mut coll = coll_comm.lock().expect("collective lock");
                    let r = match &b.op {
                        Op::Sum => coll.all_reduce_sum(&mut b.data),
                        Op::SumRows { rows, count, width } => {
                            let (count, width) = (*count, *width);
                            all_reduce_rows(coll.as_mut(), rows, &b.data, count, width).map(|(union, sums)| {
                                (b.data, b.op) = (sums, Op::SumRows { rows: union, count, width });
                            })
                        }
                        Op::ReduceScatter(parts) => coll.reduce_scatter_sum(&mut b.data, parts),
                    }
                    .map(|()| b);
                    drop(coll);
                    *busy_comm.lock().expect("busy lock") += t0.elapsed();
                    let failed = r.is_err();
                    failed_comm.store(failed, Ordering::Relaxed);
                    if comm_tx.send(r).is_err() || failed {
                        return;
                    }
                }
            })
            .expect("spawning the all-reduce thread");
        Overlapped { rank, world, coll, to_comm, from_comm, in_flight: 0, failed, busy, spare: Default::default() }
    }

    /// Starts summing `data`, the gradients of `range` of the flat buffer.
    pub fn start(&mut self, range: Range<usize>, data: &[f32]) {
        let data = self.buffer(data.iter().copied());
        self.send(Bucket { range, data, op: Op::Sum });
    }

    /// A bucket's buffer holding `values`: the next spare one, refilled.
    fn buffer(&mut self, values: impl Iterator<Item = f32>) -> Vec<f32> {
        let mut v = self.spare.pop_front().unwrap_or_default();
        v.clear();
        v.extend(values);
        v
    }

    /// Starts summing `range` of the flat buffer as mostly-zero rows of `width` floats
    /// ([`all_reduce_rows`]): `rows` (ascending) are those that may be non-zero here, `packed`
    /// their values. `finish` writes the rows named on any rank; the others stay as they are
    /// (zero).
    pub fn start_rows(&mut self, range: Range<usize>, rows: Vec<u32>, packed: impl Iterator<Item = f32>, width: usize) {
        let count = range.len() / width.max(1);
        let data = self.buffer(packed);
        self.send(Bucket { range, data, op: Op::SumRows { rows, count, width } });
    }

    /// Starts a reduce-scatter of `data` (`range` of the flat buffer) in which each rank owns
    /// its part of `shards` (ranges of the flat buffer, one per rank).
    pub fn start_scatter(&mut self, range: Range<usize>, data: &[f32], shards: &[Range<usize>]) {
        let parts = within(&range, shards);
        let data = self.buffer(data.iter().copied());
        self.send(Bucket { range, data, op: Op::ReduceScatter(parts) });
    }

    fn send(&mut self, b: Bucket) {
        // A send fails only when the thread has stopped after an error, which `finish` reports.
        if self.to_comm.send(b).is_ok() {
            self.in_flight += 1;
        }
    }

    /// Waits for every started collective and writes what it gave this rank into `buf`.
    pub fn finish(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        while self.in_flight > 0 {
            let b = self
                .from_comm
                .recv()
                .map_err(|_| CollectiveError::Setup("the all-reduce thread stopped after an error".into()))??;
            self.in_flight -= 1;
            let kept = match &b.op {
                Op::ReduceScatter(parts) => parts[self.rank].clone(),
                Op::SumRows { rows, width, .. } => {
                    for (&r, values) in rows.iter().zip(b.data.chunks(*width)) {
                        let at = b.range.start + r as usize * width;
                        buf[at..at + width].copy_from_slice(values);
                    }
                    self.spare.push_back(b.data);
                    continue;
                }
                Op::Sum => 0..b.data.len(),
            };
            buf[b.range.start + kept.start..b.range.start + kept.end].copy_from_slice(&b.data[kept]);
            self.spare.push_back(b.data);
        }
        Ok(())
    }

    /// Frees the spare bucket buffers (before work that needs the memory more: a checkpoint);
    /// the next step allocates them again.
    pub fn release(&mut self) {
        self.spare = Default::default();
    }

    /// The time the all-reduce thread spent in collectives since the last call.
    pub fn take_busy(&mut self) -> Duration {
        std::mem::take(&mut *self.busy.lock().expect("busy lock"))
    }

    /// Runs a blocking collective on this thread; only between steps.
    fn blocking(
        &mut self,
        f: impl FnOnce(&mut dyn Collective) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        if self.in_flight > 0 {
            return Err(CollectiveError::Setup("a blocking collective with gradient buckets in flight".into()));
        }
        if self.failed.load(Ordering::Relaxed) {
            return Err(CollectiveError::Setup("the ring failed in an earlier collective".into()));
        }
        let mut coll = self.coll.lock().expect("collective lock");
        f(coll.as_mut())
    }
}

/// `shards` (ranges of a flat buffer) cut to `range` and made relative to its start.
pub fn within(range: &Range<usize>, shards: &[Range<usize>]) -> Vec<Range<usize>> {
    shards
        .iter()
        .map(|s| {
            let (a, b) = (s.start.clamp(range.start, range.end), s.end.clamp(range.start, range.end));
            a - range.start..b.max(a) - range.start
        })
        .collect()
}

impl Collective for Overlapped {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn reduce_scatter_sum(&mut self, buf: &mut [f32], parts: &[Range<usize>]) -> Result<(), CollectiveError> {
        self.blocking(|c| c.reduce_scatter_sum(buf, parts))
    }
    fn all_gather(&mut self, buf: &mut [f32], parts: &[Range<usize>]) -> Result<(), CollectiveError> {
        self.blocking(|c| c.all_gather(buf, parts))
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.blocking(|c| c.all_reduce_sum(buf))
    }
}
