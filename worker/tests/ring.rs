//! The ring all-reduce between real sockets on loopback, its data over TCP and through shared
//! memory: every rank ends with the same bits, equal to the sum taken in ring order, for world
//! sizes 2..5 and buffers shorter than, equal to and longer than the world; a dead peer is an
//! error within the timeout, never a hang; strays on a ring port hold nothing up.

use job::config::RingTransport;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};
use worker::collective::{
    all_reduce_rows, chunk_ranges, Collective, CollectiveError, Neighbours, Overlapped, Ring, RingOptions,
};

fn value(rank: usize, i: usize) -> f32 {
    // Values of mixed magnitude, so that the order of the sum shows in the bits.
    let x = ((rank * 7919 + i * 104_729) % 1000) as f32 / 7.0 - 60.0;
    if i.is_multiple_of(3) {
        x * 1e-3
    } else {
        x
    }
}

fn listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, addrs)
}

fn opts(timeout: Duration) -> RingOptions {
    RingOptions::new(timeout)
}

/// Whether this machine's /dev/shm takes the two 4 MiB segments of a 2-ring.
fn has_shm() -> bool {
    let probe = std::path::Path::new("/dev/shm").join(format!("tandem-probe-{}", std::process::id()));
    let ok = std::fs::write(&probe, vec![0u8; 8 << 20]).is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Runs `f(rank, ring)` on every rank of a real ring of `n` (one thread each); the results by rank.
fn on_ring<T: Send + 'static>(n: usize, f: impl Fn(usize, &mut Ring) -> T + Send + Sync + 'static) -> Vec<T> {
    on_ring_with(n, RingTransport::Auto, f)
}

fn on_ring_with<T: Send + 'static>(
    n: usize,
    transport: RingTransport,
    f: impl Fn(usize, &mut Ring) -> T + Send + Sync + 'static,
) -> Vec<T> {
    on_owned_ring(n, transport, move |rank, mut ring| f(rank, &mut ring))
}

/// [`on_ring_with`], handing each rank its ring.
fn on_owned_ring<T: Send + 'static>(
    n: usize,
    transport: RingTransport,
    f: impl Fn(usize, Ring) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let (ls, addrs) = listeners(n);
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (addrs, f) = (addrs.clone(), std::sync::Arc::clone(&f));
            std::thread::spawn(move || {
                let o = RingOptions { transport, ..opts(Duration::from_secs(10)) };
                let ring = Ring::connect(Neighbours::of(rank, &addrs), l, &o).unwrap();
                if transport == RingTransport::Tcp {
                    assert_eq!(ring.shared_memory(), (false, false), "rank {rank}: shared memory with tcp");
                }
                f(rank, ring)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn run_ring(n: usize, len: usize, transport: RingTransport) -> Vec<Vec<f32>> {
    on_ring_with(n, transport, move |rank, ring| {
        let mut buf: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
        ring.all_reduce_sum(&mut buf).unwrap();
        // A second call on the same ring works too (the streams stay in step).
        let mut again: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
        ring.all_reduce_sum(&mut again).unwrap();
        assert_eq!(buf, again);
        buf
    })
}

#[test]
fn all_ranks_get_the_ring_ordered_sum() {
    for (n, transport) in (2..=5).flat_map(|n| [(n, RingTransport::Auto), (n, RingTransport::Tcp)]) {
        for &len in &[0usize, 1, 3, n, 7, 1000, 100_003] {
            let results = run_ring(n, len, transport);
            let chunks = chunk_ranges(len, n);
            let mut expected = vec![0.0f32; len];
            for (c, range) in chunks.iter().enumerate() {
                for i in range.clone() {
                    let mut acc = value(c, i);
                    for k in 1..n {
                        acc += value((c + k) % n, i);
                    }
                    expected[i] = acc;
                }
            }
            for (rank, r) in results.iter().enumerate() {
                assert!(
                    r == &expected,
                    "world {n}, len {len}, {transport:?}: rank {rank} differs from the ring-ordered sum"
                );
            }
        }
    }
}

#[test]
fn a_dead_peer_is_an_error_not_a_hang() {
    let (mut ls, addrs) = listeners(3);
    let l2 = ls.pop().unwrap();
    drop(l2); // rank 2 never comes
    let l1 = ls.pop().unwrap();
    let l0 = ls.pop().unwrap();
    let start = Instant::now();
    let a = {
        let addrs = addrs.clone();
        std::thread::spawn(move || {
            Ring::connect(Neighbours::of(0, &addrs), l0, &opts(Duration::from_millis(800))).map(|_| ())
        })
    };
    let b = std::thread::spawn(move || {
        Ring::connect(Neighbours::of(1, &addrs), l1, &opts(Duration::from_millis(800))).map(|_| ())
    });
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert!(matches!(a, Err(CollectiveError::Peer { rank: 2, .. })), "{a:?}");
    assert!(matches!(b, Err(CollectiveError::Peer { rank: 2, .. })), "{b:?}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
}

/// The sparse-rows sum equals the dense sum, row for row, when each rank has its own few
/// non-zero rows (some shared, some not), and every rank gets the same bits.
#[test]
fn sparse_rows_sum_equals_the_dense_sum() {
    let (count, width) = (1000usize, 7usize);
    // Each rank's rows: two shared, two of its own, and row 700, named but zero on rank 0.
    let rows_of = |rank: usize| -> Vec<u32> {
        let mut r = vec![3, 17 + rank as u32, 500, 999 - 2 * rank as u32];
        if rank == 0 {
            r.push(700);
        }
        r.sort();
        r
    };
    let local = move |rank: usize| -> Vec<f32> {
        let mut v = vec![0.0f32; count * width];
        for r in rows_of(rank).into_iter().filter(|&r| r != 700) {
            let r = r as usize;
            for j in 0..width {
                v[r * width + j] = value(rank, r * width + j);
            }
        }
        v
    };
    for n in [2usize, 3] {
        let got = on_ring(n, move |rank, ring| {
            let (rows, dense) = (rows_of(rank), local(rank));
            let packed: Vec<f32> =
                rows.iter().flat_map(|&r| &dense[r as usize * width..(r as usize + 1) * width]).copied().collect();
            let (union, sums) = all_reduce_rows(ring, &rows, &packed, count, width).unwrap();
            let mut out = vec![0.0f32; count * width];
            for (&r, s) in union.iter().zip(sums.chunks(width)) {
                out[r as usize * width..(r as usize + 1) * width].copy_from_slice(s);
            }
            (union, out)
        });
        let mut want = vec![0.0f32; count * width];
        for rank in 0..n {
            for (w, x) in want.iter_mut().zip(local(rank)) {
                *w += x;
            }
        }
        for (rank, (union, g)) in got.iter().enumerate() {
            assert_eq!(g, &got[0].1, "world {n}: rank {rank} differs from rank 0");
            assert_eq!(union.len(), 3 + 2 * n, "world {n}: rows 3, 500, 700 and two of each rank's own");
            for (i, (a, b)) in g.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-5 * b.abs(), "world {n}: element {i}: {a} vs {b}");
            }
        }
        // Rows out of order are refused.
        let err = on_ring(n, move |_, ring| all_reduce_rows(ring, &[5, 2], &[0.0; 14], count, width).is_err());
        assert!(err.iter().all(|&e| e), "world {n}: unsorted rows are an error");
    }
}

#[test]
fn ring_peers_must_hold_the_job_token() {
    use proto::auth::JobToken;
    let good = JobToken::new("ring-token-0123456789").unwrap();
    let other = JobToken::new("another-token-0123456789").unwrap();
    for (tokens, ok) in [
        (vec![Some(good.clone()), Some(good.clone()), Some(good.clone())], true),
        (vec![Some(good.clone()), Some(other.clone()), Some(good.clone())], false),
        (vec![Some(good.clone()), None, Some(good.clone())], false),
    ] {
        let (ls, addrs) = listeners(3);
        let handles: Vec<_> = ls
            .into_iter()
            .zip(tokens)
            .enumerate()
            .map(|(rank, (l, tok))| {
                let addrs = addrs.clone();
                std::thread::spawn(move || {
                    let mut ring = Ring::connect(
                        Neighbours::of(rank, &addrs),
                        l,
                        &RingOptions { token: tok, ..opts(Duration::from_secs(3)) },
                    )?;
                    let mut buf = vec![rank as f32; 10];
                    ring.all_reduce_sum(&mut buf)?;
                    Ok::<_, CollectiveError>(buf)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        if ok {
            for r in results {
                assert_eq!(r.unwrap(), vec![3.0; 10]);
            }
        } else {
            let errs: Vec<String> = results.into_iter().filter_map(|r| r.err()).map(|e| e.to_string()).collect();
            assert!(!errs.is_empty(), "a ring with a wrong or missing token formed");
            assert!(
                errs.iter().any(|e| e.contains("does not hold the job token")
                    || e.contains("disagrees on whether the job has a token")),
                "{errs:?}"
            );
            for e in &errs {
                assert!(!e.contains("ring-token") && !e.contains("another-token"), "a token leaked into an error: {e}");
            }
        }
    }
}

/// A stray client that connects to a rank's ring port first and sends garbage (or nothing) is
/// dropped; the real ring still forms and sums correctly.
#[test]
fn garbage_on_a_ring_port_does_not_stop_the_ring() {
    use std::io::Write;
    let (ls, addrs) = listeners(2);
    // Before the real peers start: one client sends garbage, one says nothing and stays.
    let mut junk = std::net::TcpStream::connect(addrs[0]).unwrap();
    junk.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(4096)).unwrap();
    let _silent = std::net::TcpStream::connect(addrs[1]).unwrap();
    two_ranks_sum(ls, &addrs, Duration::from_secs(20));
}

/// Rank 0 and 1 of a 2-ring on `ls` sum 1s and 2s, and both get 3s.
fn two_ranks_sum(ls: Vec<TcpListener>, addrs: &[SocketAddr], timeout: Duration) {
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let addrs = addrs.to_vec();
            std::thread::spawn(move || {
                let mut ring = Ring::connect(Neighbours::of(rank, &addrs), l, &opts(timeout)).unwrap();
                let mut buf = vec![1.0f32 + rank as f32; 1000];
                ring.all_reduce_sum(&mut buf).unwrap();
                buf
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), vec![3.0; 1000]);
    }
}

/// Buffers of several shared-memory slots' worth (the slots are reused within one exchange) sum
/// to the same bits through shared memory as over TCP, and both equal the sum in ring order.
#[test]
fn shared_memory_and_tcp_sum_the_same_bits() {
    let len = 3 * (4 << 20) / 4 + 12_345; // each exchange of a 2-ring moves 1.5 segments
    let via = |t| run_ring(2, len, t);
    let (shm, tcp) = (via(RingTransport::Auto), via(RingTransport::Tcp));
    // Where /dev/shm takes a segment, auto does use it.
    let used = on_ring(2, |_, ring| ring.shared_memory());
    let want = has_shm();
    assert!(used.iter().all(|&u| u == (want, want)), "shared memory used: {used:?}, /dev/shm usable: {want}");
    assert!(shm[0] == tcp[0] && shm[1] == tcp[1], "shared memory and TCP sums differ");
    for i in [0, 1, len / 2, len - 1] {
        assert_eq!(shm[0][i].to_bits(), (value(0, i) + value(1, i)).to_bits(), "element {i}");
    }
    // Nothing is left in /dev/shm once the rings are connected and gone (a segment of a ring
    // that other tests are connecting lives for milliseconds, so only what stays counts).
    if has_shm() {
        let segments = || -> std::collections::BTreeSet<String> {
            std::fs::read_dir("/dev/shm")
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("tandem-ring-"))
                .collect()
        };
        let first = segments();
        std::thread::sleep(Duration::from_secs(1));
        let left: Vec<_> = first.intersection(&segments()).cloned().collect();
        assert!(left.is_empty(), "segments left behind: {left:?}");
    }
}

/// A peer that goes away in the middle of a shared-memory exchange is an error within the
/// timeout on the other rank, not a hang (the waits are on the TCP connection).
#[test]
fn a_peer_that_dies_mid_sum_is_an_error_not_a_hang() {
    for transport in [RingTransport::Auto, RingTransport::Tcp] {
        let start = Instant::now();
        let results = on_ring_with(2, transport, |rank, ring| {
            let mut buf = vec![1.0f32; 4 << 20];
            if rank == 1 {
                return Ok(()); // drops its ring unsummed
            }
            ring.all_reduce_sum(&mut buf)
        });
        assert!(results[0].is_err(), "{transport:?}: rank 0 summed with a peer that left");
        assert!(start.elapsed() < Duration::from_secs(8), "{transport:?}: took {:?}", start.elapsed());
    }
}

/// Peers that drip a valid-looking hello a byte at a time, connected before the real
/// predecessor, hold up neither its admission nor the ring: each connection is checked on its
/// own, within a deadline of its own.
#[test]
fn peers_that_drip_their_hello_do_not_hold_up_the_ring() {
    use std::io::Write;
    let (ls, addrs) = listeners(2);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drippers: Vec<_> = (0..3)
        .map(|_| {
            let (addr, stop) = (addrs[0], std::sync::Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                for &b in b"TANDRING".iter().cycle().take(20) {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) || s.write_all(&[b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200)); // they are first in the accept queue
    let start = Instant::now();
    two_ranks_sum(ls, &addrs, Duration::from_secs(30));
    let took = start.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for d in drippers {
        d.join().unwrap();
    }
    assert!(took < Duration::from_secs(4), "the ring took {took:?} to form beside 3 dripping peers");
}

/// ZeRO-1's collectives: each rank's part of a reduce-scatter is the sum of that range over the
/// ranks (uneven parts, an empty one, a part with no float to its name), an all-gather copies
/// each rank's part to all bit for bit, and the two through the collective thread
/// ([`Overlapped`]), in pieces, give the same as on the ring itself.
#[test]
fn reduce_scatter_and_all_gather_by_uneven_parts() {
    for n in [2usize, 3, 4] {
        let len = 1000 + 7 * n;
        // Rank 0 owns nothing; the others split the buffer unevenly.
        let mut cuts: Vec<usize> = (0..n).map(|r| if r == 0 { 0 } else { len * r * r / (n * n) }).collect();
        cuts.push(len);
        let parts: Vec<std::ops::Range<usize>> = (0..n).map(|r| cuts[r]..cuts[r + 1]).collect();
        let parts2 = parts.clone();
        let got = on_ring(n, move |rank, ring| {
            let parts = &parts2;
            let mut buf: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
            ring.reduce_scatter_sum(&mut buf, parts).unwrap();
            let summed = buf[parts[rank].clone()].to_vec();
            // Each rank's own marker values, gathered.
            let mut g: Vec<f32> =
                (0..len).map(|i| if parts[rank].contains(&i) { value(rank, i) } else { f32::NAN }).collect();
            ring.all_gather(&mut g, parts).unwrap();
            (summed, g)
        });
        let want = run_ring(n, len, RingTransport::Auto)[0].clone();
        for (rank, (summed, gathered)) in got.iter().enumerate() {
            let p = parts[rank].clone();
            let exact: Vec<f32> = p.clone().map(|i| (0..n).map(|r| value(r, i)).sum::<f32>()).collect();
            for (k, i) in p.clone().enumerate() {
                let close = (summed[k] - exact[k]).abs() <= 1e-4 * exact[k].abs().max(1.0);
                assert!(close, "n {n} rank {rank} element {i}: {} vs {}", summed[k], exact[k]);
            }
            let owner = |i: usize| parts.iter().position(|q| q.contains(&i)).unwrap();
            for (i, &x) in gathered.iter().enumerate() {
                assert_eq!(x.to_bits(), value(owner(i), i).to_bits(), "n {n} rank {rank}: gathered element {i}");
            }
        }
        // With the parts of the all-reduce, the reduce-scatter gives the all-reduce's bits.
        let sum_parts = worker::collective::sum_parts(len, n);
        let got = on_ring(n, move |rank, ring| {
            let mut buf: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
            ring.reduce_scatter_sum(&mut buf, &sum_parts).unwrap();
            buf[sum_parts[rank].clone()].to_vec()
        });
        let parts = worker::collective::sum_parts(len, n);
        for (rank, part) in got.iter().enumerate() {
            assert_eq!(part[..], want[parts[rank].clone()], "n {n} rank {rank}: reduce-scatter vs all-reduce bits");
        }
    }
}

/// The same collectives through the collective thread: `start_scatter` of two segments by
/// shards of the whole buffer, then an all-gather of the shards between steps.
#[test]
fn overlapped_scatter_and_gather_by_shards() {
    let (n, len) = (3usize, 2500usize);
    let got = on_owned_ring(n, RingTransport::Auto, move |rank, ring| {
        let mut o = Overlapped::new(Box::new(ring));
        let shards = chunk_ranges(len, n);
        let mine: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
        let mut out = vec![f32::NAN; len];
        o.start_scatter(1200..len, &mine[1200..], &shards);
        o.start_scatter(0..1200, &mine[..1200], &shards);
        o.finish(&mut out).unwrap();
        let own = shards[rank].clone();
        let summed = out[own.clone()].to_vec();
        let mut params: Vec<f32> = (0..len).map(|i| if own.contains(&i) { i as f32 } else { -1.0 }).collect();
        o.all_gather(&mut params, &shards).unwrap();
        (summed, params)
    });
    let shards = chunk_ranges(len, n);
    for (rank, (summed, params)) in got.iter().enumerate() {
        for (k, i) in shards[rank].clone().enumerate() {
            let exact: f32 = (0..n).map(|r| value(r, i)).sum();
            assert!((summed[k] - exact).abs() <= 1e-4 * exact.abs().max(1.0), "rank {rank} element {i}");
        }
        assert_eq!(*params, (0..len).map(|i| i as f32).collect::<Vec<_>>(), "rank {rank}: gathered parameters");
    }
}
