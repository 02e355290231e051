//! Hostile and broken peers against a running job, with real processes and real sockets on
//! loopback: ten thousand health `Watch` streams on one unauthenticated HTTP/2 connection and a
//! burst of connections past the limit, a flood of HTTP requests on the status port, and ring
//! connections that drip bytes or send garbage. Each attack starts while the coordinator
//! gathers its workers and lasts through the job; the job must miss no heartbeat (a missed one
//! restarts it: its generation would not be 0) and end bit-identical to the unattacked run.
//! Timing bounds are generous: CI is a loaded 2-core machine.

use crate::distributed::{assert_bits_eq, bin, checkpointed_job, coordinator, params, run_ok, scratch};
use crate::observe::{health, Running};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const STEPS: u64 = 40;
const WORLD: usize = 2;

/// The parameters of the unattacked job (2 workers), computed once for the tests here.
fn reference() -> &'static [f32] {
    static REFERENCE: OnceLock<Vec<f32>> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = scratch("hostile-reference");
        let cfg = checkpointed_job(&dir, STEPS);
        run_ok(coordinator(&cfg, WORLD, &dir.join("out")));
        let p = params(&dir.join("out/model"));
        std::fs::remove_dir_all(&dir).ok();
        p
    })
}

/// The job's coordinator of 2 workers without local workers (a test starts them itself),
/// detecting failures at test speed: a heartbeat missed for 3 s restarts the job. Returns it and
/// its gRPC address.
pub(crate) fn start_coordinator(cfg: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> (Running, String) {
    let mut c = Command::new(bin("coordinator"));
    c.args(["--world-size", &WORLD.to_string(), "--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .args(["--gather-timeout-s", "120", "--no-progress", "--shutdown-grace-s", "2"])
        .args(["--set", &format!("output.dir={}", out.display())])
        .args(["--set", "elastic.heartbeat_interval_s=0.25", "--set", "elastic.heartbeat_timeout_s=3"])
        .args(extra)
        .envs(env.iter().copied());
    let job = Running::start(c);
    let grpc = job.logged("coordinator listening addr=");
    (job, grpc)
}

fn start_worker(grpc: &str, rank: usize, env: &[(&str, &str)]) -> Running {
    let mut w = Command::new(bin("worker"));
    w.args(["--coordinator", &format!("http://{grpc}"), "--rank-hint", &rank.to_string(), "--timeout-s", "120"])
        .env("RAYON_NUM_THREADS", "1")
        .envs(env.iter().copied());
    Running::start(w)
}

/// The job ended as the unattacked one: no failure detected (generation 0: a missed heartbeat
/// or a broken ring would have restarted it) and the same parameters, bit for bit.
fn assert_unharmed(coord: &Running, out: &Path, what: &str) {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoints/coordinator.json")).unwrap()).unwrap();
    assert_eq!(state["generation"], 0, "{what}: the job restarted:\n{}", coord.log());
    assert!(!coord.log().contains("restarting the job"), "{what}:\n{}", coord.log());
    assert_bits_eq(&params(&out.join("model")), reference(), what);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// An HTTP/2 frame: length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// A header block of HPACK literals (without indexing, new names, no Huffman).
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in fields {
        b.push(0);
        b.push(name.len() as u8);
        b.extend(name.as_bytes());
        b.push(value.len() as u8);
        b.extend(value.as_bytes());
    }
    b
}

/// What the server did with the streams one client opened on one connection.
#[derive(Debug, Default)]
struct StreamCounts {
    /// Streams the server answered (response headers), and refused (RST_STREAM REFUSED_STREAM;
    /// the request's DATA frame on a refused stream then draws a STREAM_CLOSED, not counted).
    answered: BTreeSet<u32>,
    refused: BTreeSet<u32>,
    goaway: bool,
}

/// Opens `n` health `Watch` streams on one HTTP/2 connection without the job token, as fast as
/// the socket takes them and ignoring the server's stream limit (a conforming client would
/// queue them), and counts what comes back for `listen`. Returns the counts and the connection,
/// still open (the streams the server accepted stay open with it).
fn watch_flood(grpc: &str, n: u32, listen: Duration) -> (StreamCounts, TcpStream) {
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;
    let mut s = TcpStream::connect(grpc).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
    let read_frame = |s: &mut TcpStream| -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).ok()?;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        Some((head[3], head[4], stream, payload))
    };
    // The server's SETTINGS (its stream limit among them) apply once acknowledged.
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    loop {
        let (kind, flags, _, _) = read_frame(&mut s).expect("the server's SETTINGS");
        if kind == SETTINGS && flags & 1 == 0 {
            s.write_all(&frame(SETTINGS, 1, 0, &[])).unwrap();
            break;
        }
    }
    let block = header_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/grpc.health.v1.Health/Watch"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut batch = Vec::new();
        for i in 0..n {
            let id = 1 + 2 * i;
            batch.extend(frame(HEADERS, 0x4, id, &block)); // END_HEADERS
            batch.extend(frame(0, 0x1, id, &[0, 0, 0, 0, 0])); // an empty request, END_STREAM
            if batch.len() > 64 << 10 || i + 1 == n {
                if writer.write_all(&batch).is_err() {
                    return; // the server closed the connection
                }
                batch.clear();
            }
        }
    });
    let mut counts = StreamCounts::default();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let until = Instant::now() + listen;
    while Instant::now() < until && counts.answered.len() + counts.refused.len() < n as usize {
        let Some((kind, _, stream, payload)) = read_frame(&mut s) else {
            if counts.goaway {
                break; // closed after its GOAWAY
            }
            continue; // a read timeout: go on listening
        };
        match kind {
            HEADERS => {
                counts.answered.insert(stream);
            }
            RST_STREAM if payload == 7u32.to_be_bytes() => {
                counts.refused.insert(stream); // REFUSED_STREAM
            }
            GOAWAY => counts.goaway = true,
            _ => {}
        }
    }
    sender.join().unwrap();
    (counts, s)
}

#[test]
fn ten_thousand_watch_streams_and_a_connection_burst_are_refused_and_the_job_is_unharmed() {
    let dir = scratch("hostile-watch");
    let cfg = checkpointed_job(&dir, STEPS);
    let out = dir.join("out");
    let (mut coord, grpc) = start_coordinator(&cfg, &out, &["--no-http"], &[]);
    let pid = coord.child.id();
    let rss_before = rss_kib(pid);

    // 10,000 Watch streams on one unauthenticated connection: at most 64 are served at once.
    let (counts, flood) = watch_flood(&grpc, 10_000, Duration::from_secs(30));
    let served = counts.answered.len();
    let refused = counts.refused.len();
    eprintln!(
        "hostile: 10,000 Watch streams on one connection: {served} served, {refused} refused, GOAWAY {}",
        counts.goaway
    );
    assert!((1..=64).contains(&served), "{served} streams served on one connection");
    assert!(refused > 0, "no stream was refused ({served} served)");
    assert!(
        counts.goaway || served + refused == 10_000,
        "{} streams neither served, refused nor ended with the connection",
        10_000 - served - refused
    );
    // Connections past 2 x world + 64 are closed as they are accepted (the flood holds one).
    let limit = 2 * WORLD + 64;
    let burst: Vec<TcpStream> = (0..limit + 32).map(|_| TcpStream::connect(&grpc).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500)); // time to be closed
    let closed = burst
        .iter()
        .filter(|c| {
            c.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 256];
            let mut c = *c;
            loop {
                match c.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(_) => continue, // the server's SETTINGS: a connection it kept
                    Err(_) => return false,
                }
            }
        })
        .count();
    assert!(closed >= 33, "{closed} of {} connections closed past the limit of {limit}", limit + 32);
    assert!(closed < limit + 32, "every connection was closed");
    drop(burst);
    // Probes still get their answer (SERVING = 1), and the attack cost little memory.
    assert_eq!(health(&grpc, ""), Ok(1));
    let grown = rss_kib(pid).saturating_sub(rss_before);
    assert!(grown < 64 << 10, "the coordinator grew by {grown} KiB under the flood");

    // The job runs with the served Watch streams still open on the flood's connection.
    let mut workers: Vec<Running> = (0..WORLD).map(|r| start_worker(&grpc, r, &[])).collect();
    coord.wait_success("the coordinator");
    for (r, w) in workers.iter_mut().enumerate() {
        w.wait_success(&format!("worker {r}"));
    }
    drop(flood);
    assert_unharmed(&coord, &out, "the job beside 10,000 Watch streams");
    std::fs::remove_dir_all(&dir).ok();
}

/// One HTTP/1.1 GET with `Connection: close`: the status code, or None when the connection
/// failed (refused past the limit, reset).
fn http_get(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    String::from_utf8_lossy(&raw).split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn an_http_flood_during_a_job_misses_no_heartbeat_and_changes_nothing() {
    let dir = scratch("hostile-http");
    let cfg = checkpointed_job(&dir, STEPS);
    let out = dir.join("out");
    let (mut coord, grpc) = start_coordinator(&cfg, &out, &["--http-listen", "127.0.0.1:0"], &[]);
    let http = coord.logged("url=").trim_start_matches("http://").trim_end_matches('/').to_string();

    // 200 clients, each asking for /loss.png, /api/status and /metrics in turn as fast as it is
    // answered, from before the workers start until the job ends (at most 30 s).
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..200)
        .map(|i| {
            let (http, stop, ok, failed) = (http.clone(), stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let paths = ["/loss.png", "/api/status", "/metrics"];
                let mut k = i;
                while !stop.load(Ordering::Relaxed) {
                    match http_get(&http, paths[k % 3]) {
                        Some(200) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    k += 1;
                }
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let mut workers: Vec<Running> = (0..WORLD).map(|r| start_worker(&grpc, r, &[])).collect();
    while coord.child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    coord.wait_success("the coordinator");
    for (r, w) in workers.iter_mut().enumerate() {
        w.wait_success(&format!("worker {r}"));
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("hostile: {ok} HTTP requests answered, {failed} failed, over {:?}", started.elapsed());
    assert!(ok >= 1000, "the flood was not a flood: {ok} answered, {failed} failed");
    assert_unharmed(&coord, &out, "the job under an HTTP flood");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ring_connections_that_drip_or_send_garbage_do_not_hold_up_the_ring() {
    let dir = scratch("hostile-ring");
    let cfg = checkpointed_job(&dir, STEPS);
    let out = dir.join("out");
    let token = [("TANDEM_JOB_TOKEN", "the-hostile-ring-token-0123")];
    // Every ring read and write has 8 s: admission that checked the three drippers one after
    // another (5 s each) before the real peer would break the ring, and restart the job.
    let extra = ["--no-http", "--set", "elastic.collective_timeout_s=8"];
    let (mut coord, grpc) = start_coordinator(&cfg, &out, &extra, &token);
    let mut rank1 = start_worker(&grpc, 1, &token);
    let ring = rank1.logged("ring listener listen=");

    // Before its predecessor arrives: three connections drip a hello that looks right, a byte
    // every 300 ms; one sends garbage; one says nothing.
    let stop = Arc::new(AtomicBool::new(false));
    let mut hello = b"TANDRING".to_vec();
    hello.extend(0u32.to_le_bytes());
    hello.extend((WORLD as u32).to_le_bytes());
    hello.push(1);
    hello.extend(0u64.to_le_bytes());
    let attackers: Vec<_> = (0..5)
        .map(|i| {
            let (ring, stop, hello) = (ring.clone(), stop.clone(), hello.clone());
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&ring).unwrap();
                match i {
                    0..=2 => {
                        for b in hello {
                            if stop.load(Ordering::Relaxed) || s.write_all(&[b]).is_err() {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(300));
                        }
                    }
                    3 => {
                        let _ = s.write_all(&[0xA5; 4096]);
                    }
                    _ => {}
                }
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut rank0 = start_worker(&grpc, 0, &token);
    coord.wait_success("the coordinator");
    rank0.wait_success("worker 0");
    rank1.wait_success("worker 1");
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    assert_unharmed(&coord, &out, "the job beside dripping ring peers");
    std::fs::remove_dir_all(&dir).ok();
}
