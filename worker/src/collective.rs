//! Collectives between the workers of a job: the sum all-reduce of gradients.
//!
//! `Collective` is the interface the CPU training loop sees and `TcpRing` its implementation
//! (the role gloo plays for PyTorch); GPU ranks sum on the device with NCCL (`nccl.rs`).
//!
//! `TcpRing` is the classic bandwidth-optimal ring: the buffer is cut into N chunks; in N-1
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
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("ring peer rank {rank} ({addr}): {source}")]
    Peer { rank: usize, addr: String, source: std::io::Error },
    #[error("ring setup: {0}")]
    Setup(String),
}

/// A sum all-reduce over the ranks of a job.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank with the elementwise sum over all ranks. Every rank must call
    /// it with buffers of the same length, in the same order.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
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

/// The CPU ring over TCP. Each rank connects to its successor and accepts its predecessor.
pub struct TcpRing {
    rank: usize,
    world: usize,
    next: TcpStream,
    prev: TcpStream,
    next_addr: String,
    prev_addr: String,
    recv_buf: Vec<f32>,
}

// The wire format is the buffers' own bytes: little-endian f32.
#[cfg(target_endian = "big")]
compile_error!("the ring all-reduce sends native f32 bytes and assumes a little-endian machine");

impl TcpRing {
    /// Joins the ring: `listener` is this rank's own (already bound to `peers[rank]`), `peers`
    /// every rank's address. Waits up to `timeout` for the neighbours; every later read and write
    /// has the same deadline.
    pub fn connect(
        rank: usize,
        peers: &[SocketAddr],
        listener: TcpListener,
        timeout: Duration,
        token: Option<&proto::auth::JobToken>,
    ) -> Result<Self, CollectiveError> {
        Self::connect_generation(rank, peers, listener, timeout, token, 0, None)
    }

    /// [`TcpRing::connect`] for generation `generation` of a job: peers of another generation
    /// (a stale connection from before a restart) are refused, and setting `cancel` gives up
    /// the wait for the neighbours at once.
    pub fn connect_generation(
        rank: usize,
        peers: &[SocketAddr],
        listener: TcpListener,
        timeout: Duration,
        token: Option<&proto::auth::JobToken>,
        generation: u64,
        cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    ) -> Result<Self, CollectiveError> {
        let cancelled = {
            let cancel = cancel.clone();
            move || cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        };
        let world = peers.len();
        if rank >= world || world < 2 {
            return Err(CollectiveError::Setup(format!(
                "rank {rank} in a ring of {world}: a ring needs 2 or more ranks"
            )));
        }
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let deadline = Instant::now() + timeout;
        let next_addr = peers[next_rank];
        let token = token.cloned();
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
        // The predecessor side: accept connections until one proves to be the predecessor. A
        // connection that is not (garbage, a stray client, a wrong token) is dropped and
        // logged, and does not stop the ring from forming.
        let mut last_refusal = String::from("nobody connected");
        let prev = loop {
            let (mut s, from) = match accept_before(&listener, deadline, &cancelled) {
                Ok(x) => x,
                Err(e) => {
                    return Err(CollectiveError::Peer {
                        rank: prev_rank,
                        addr: peers[prev_rank].to_string(),
                        source: std::io::Error::new(
                            e.kind(),
                            format!(
                                "rank {rank} found no valid predecessor within {timeout:?} ({e}); last refused \
                                 connection: {last_refusal}"
                            ),
                        ),
                    })
                }
            };
            match admit_predecessor(&mut s, rank, prev_rank, world, token.as_ref(), generation, deadline) {
                Ok(()) => break s,
                Err(why) => {
                    tracing::warn!(rank, %from, reason = %why, "refused a ring connection");
                    last_refusal = format!("{from}: {why}");
                }
            }
        };
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
        let prev_stream = prev;
        Ok(TcpRing {
            rank,
            world,
            next,
            prev: prev_stream,
            next_addr: peers[next_rank].to_string(),
            prev_addr: peers[prev_rank].to_string(),
            recv_buf: Vec::new(),
        })
    }

    /// A handle that can break this ring's connections from another thread (a blocked
    /// all-reduce then fails at once): how a restart stops a step that waits on a dead peer.
    pub fn handle(&self) -> std::io::Result<RingHandle> {
        Ok(RingHandle(vec![self.next.try_clone()?, self.prev.try_clone()?]))
    }

    /// Sends `send` to the successor while receiving `recv_len` floats from the predecessor into
    /// `self.recv_buf`.
    fn exchange(&mut self, send: &[f32], recv_len: usize) -> Result<(), CollectiveError> {
        self.recv_buf.resize(recv_len, 0.0);
        let (next, prev) = (&mut self.next, &mut self.prev);
        let recv: &mut [u8] = bytemuck::cast_slice_mut(&mut self.recv_buf[..]);
        let (sent, received) = std::thread::scope(|s| {
            let h = s.spawn(|| next.write_all(bytemuck::cast_slice(send)));
            let r = prev.read_exact(recv);
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

/// Breaks a ring's connections: see [`TcpRing::handle`].
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

/// Checks that the peer on `s` is our predecessor of this job: its hello, and with a token, its
/// proof of the token for a fresh nonce. Reads a bounded number of bytes with a short deadline,
/// so garbage or silence costs at most a few seconds. Answers 1 when admitted.
fn admit_predecessor(
    s: &mut TcpStream,
    rank: usize,
    prev_rank: usize,
    world: usize,
    token: Option<&proto::auth::JobToken>,
    generation: u64,
    deadline: Instant,
) -> Result<(), String> {
    let wait =
        deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(10), Duration::from_secs(5));
    s.set_read_timeout(Some(wait)).and_then(|()| s.set_write_timeout(Some(wait))).map_err(|e| e.to_string())?;
    let mut got = [0u8; 25];
    s.read_exact(&mut got).map_err(|e| format!("no hello: {e}"))?;
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
        s.read_exact(&mut proof).map_err(|e| format!("no proof: {e}"))?;
        if !token.verify_proof(&ring_context(prev_rank, rank, world, generation), &nonce, &proof) {
            return Err("does not hold the job token".into());
        }
    }
    s.write_all(&[1]).map_err(|e| e.to_string())
}

fn accept_before(
    listener: &TcpListener,
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true)?;
    loop {
        if cancelled() {
            return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "cancelled"));
        }
        match listener.accept() {
            Ok((s, from)) => {
                s.set_nonblocking(false)?;
                return Ok((s, from));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "predecessor did not connect in time"));
            }
            Err(e) => return Err(e),
        }
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let n = self.world;
        let chunks = chunk_ranges(buf.len(), n);
        // Reduce-scatter: step s sends chunk (rank - s) and accumulates chunk (rank - s - 1).
        for s in 0..n - 1 {
            let send = chunks[(self.rank + n - s) % n].clone();
            let recv = chunks[(self.rank + 2 * n - s - 1) % n].clone();
            self.exchange(&buf[send], recv.len())?;
            for (x, &y) in buf[recv].iter_mut().zip(&self.recv_buf) {
                *x += y; // (sum of ranks c..r-1) + x_r: ring order, as commutative addition gives the same bits
            }
        }
        // All-gather: step s sends chunk (rank + 1 - s), which is complete, and stores chunk (rank - s).
        for s in 0..n - 1 {
            let send = chunks[(self.rank + 1 + n - s) % n].clone();
            let recv = chunks[(self.rank + n - s) % n].clone();
            self.exchange(&buf[send], recv.len())?;
            buf[recv].copy_from_slice(&self.recv_buf);
        }
        Ok(())
    }
}

/// The sum of a buffer of rows of `width` floats of which most are zero on every rank, such as the
/// word-embedding gradient of a classifier (only the rows of the batch's tokens are non-zero):
/// the ranks first sum a one-float-per-row indicator of their non-zero rows, then sum only the
/// rows that are non-zero somewhere, packed in row order; every other row is zero on every rank
/// and is set to +0.0. Each rank ends with the same bits. For BERT's 30522-row vocabulary and a
/// batch of short texts that is a few percent of the dense traffic.
pub fn all_reduce_rows(coll: &mut dyn Collective, data: &mut [f32], width: usize) -> Result<(), CollectiveError> {
    if width == 0 || !data.len().is_multiple_of(width) {
        return Err(CollectiveError::Setup(format!("{} floats are not rows of {width}", data.len())));
    }
    let mut touched: Vec<f32> =
        data.chunks(width).map(|r| if r.iter().any(|&x| x != 0.0) { 1.0 } else { 0.0 }).collect();
    coll.all_reduce_sum(&mut touched)?;
    let rows: Vec<usize> = (0..touched.len()).filter(|&i| touched[i] > 0.0).collect();
    let mut packed = Vec::with_capacity(rows.len() * width);
    for &i in &rows {
        packed.extend_from_slice(&data[i * width..(i + 1) * width]);
    }
    coll.all_reduce_sum(&mut packed)?;
    data.fill(0.0);
    for (k, &i) in rows.iter().enumerate() {
        data[i * width..(i + 1) * width].copy_from_slice(&packed[k * width..(k + 1) * width]);
    }
    Ok(())
}

/// A collective on its own thread, so that gradient sums run while backward computes the rest:
/// the training loop hands over each segment of the gradient buffer as backward finishes it
/// ([`Overlapped::start`]), and collects the sums once backward is done ([`Overlapped::finish`]).
/// Every rank starts the same segments in the same order (backward's order), so the ring's
/// messages pair up; a bucket's sum is deterministic, like every ring sum.
pub struct Overlapped {
    rank: usize,
    world: usize,
    to_comm: std::sync::mpsc::Sender<Bucket>,
    from_comm: std::sync::mpsc::Receiver<Result<Bucket, CollectiveError>>,
    in_flight: usize,
    /// Time the comm thread spent in all-reduces since the last `take_busy`.
    busy: std::sync::Arc<std::sync::Mutex<Duration>>,
}

/// One segment of the gradient buffer on its way through the all-reduce.
pub struct Bucket {
    pub range: std::ops::Range<usize>,
    pub data: Vec<f32>,
    /// Sum as mostly-zero rows of this many floats ([`all_reduce_rows`]).
    pub row_width: Option<usize>,
}

impl Overlapped {
    pub fn new(mut coll: Box<dyn Collective + Send>) -> Self {
        let (rank, world) = (coll.rank(), coll.world_size());
        let (to_comm, comm_rx) = std::sync::mpsc::channel::<Bucket>();
        let (comm_tx, from_comm) = std::sync::mpsc::channel();
        let busy = std::sync::Arc::new(std::sync::Mutex::new(Duration::ZERO));
        let busy_comm = std::sync::Arc::clone(&busy);
        // Not joined: it ends when `to_comm` closes, or with the process after an error.
        std::thread::Builder::new()
            .name("all-reduce".into())
            .spawn(move || {
                for mut b in comm_rx {
                    let t0 = Instant::now();
                    let r = match b.row_width {
                        Some(w) => all_reduce_rows(coll.as_mut(), &mut b.data, w),
                        None => coll.all_reduce_sum(&mut b.data),
                    }
                    .map(|()| b);
                    *busy_comm.lock().expect("busy lock") += t0.elapsed();
                    let failed = r.is_err();
                    if comm_tx.send(r).is_err() || failed {
                        return;
                    }
                }
            })
            .expect("spawning the all-reduce thread");
        Overlapped { rank, world, to_comm, from_comm, in_flight: 0, busy }
    }

    /// Starts summing `data`, the gradients of `range` of the flat buffer.
    pub fn start(&mut self, range: std::ops::Range<usize>, data: &[f32]) {
        self.send(Bucket { range, data: data.to_vec(), row_width: None });
    }

    /// Starts summing `data` as mostly-zero rows of `width` floats ([`all_reduce_rows`]).
    pub fn start_rows(&mut self, range: std::ops::Range<usize>, data: &[f32], width: usize) {
        self.send(Bucket { range, data: data.to_vec(), row_width: Some(width) });
    }

    fn send(&mut self, b: Bucket) {
        // A send fails only when the thread has stopped after an error, which `finish` reports.
        if self.to_comm.send(b).is_ok() {
            self.in_flight += 1;
        }
    }

    /// Waits for every started sum and writes it into `grads`.
    pub fn finish(&mut self, grads: &mut [f32]) -> Result<(), CollectiveError> {
        while self.in_flight > 0 {
            let b = self
                .from_comm
                .recv()
                .map_err(|_| CollectiveError::Setup("the all-reduce thread stopped after an error".into()))??;
            self.in_flight -= 1;
            grads[b.range].copy_from_slice(&b.data);
        }
        Ok(())
    }

    /// The time the all-reduce thread spent summing since the last call.
    pub fn take_busy(&mut self) -> Duration {
        std::mem::take(&mut *self.busy.lock().expect("busy lock"))
    }
}

impl Collective for Overlapped {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    /// A blocking sum through the same thread; only between steps (no buckets in flight).
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if self.in_flight > 0 {
            return Err(CollectiveError::Setup("all_reduce_sum with gradient buckets in flight".into()));
        }
        let whole = 0..buf.len();
        self.start(whole, buf);
        self.finish(buf)
    }
}
