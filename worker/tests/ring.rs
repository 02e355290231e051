//! The TCP ring all-reduce between real sockets on loopback: every rank ends with the same bits,
//! equal to the sum taken in ring order, for world sizes 2..5 and buffers shorter than, equal to
//! and longer than the world; a dead peer is an error within the timeout, never a hang.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};
use worker::collective::{all_reduce_rows, chunk_ranges, Collective, CollectiveError, TcpRing};

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

/// Runs `f(rank, ring)` on every rank of a real ring of `n` (one thread each); the results by rank.
fn on_ring<T: Send + 'static>(n: usize, f: impl Fn(usize, &mut TcpRing) -> T + Send + Sync + 'static) -> Vec<T> {
    let (ls, addrs) = listeners(n);
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (addrs, f) = (addrs.clone(), std::sync::Arc::clone(&f));
            std::thread::spawn(move || {
                let mut ring = TcpRing::connect(rank, &addrs, l, Duration::from_secs(10), None).unwrap();
                f(rank, &mut ring)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn run_ring(n: usize, len: usize) -> Vec<Vec<f32>> {
    on_ring(n, move |rank, ring| {
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
    for n in 2..=5 {
        for &len in &[0usize, 1, 3, n, 7, 1000, 100_003] {
            let results = run_ring(n, len);
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
                assert!(r == &expected, "world {n}, len {len}: rank {rank} differs from the ring-ordered sum");
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
        std::thread::spawn(move || TcpRing::connect(0, &addrs, l0, Duration::from_millis(800), None).map(|_| ()))
    };
    let b = std::thread::spawn(move || TcpRing::connect(1, &addrs, l1, Duration::from_millis(800), None).map(|_| ()));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert!(matches!(a, Err(CollectiveError::Peer { rank: 2, .. })), "{a:?}");
    assert!(matches!(b, Err(CollectiveError::Peer { rank: 2, .. })), "{b:?}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
}

/// The sparse-rows sum equals the dense sum, row for row, when each rank has its own few
/// non-zero rows (some shared, some not), and every rank gets the same bits.
#[test]
fn sparse_rows_sum_equals_the_dense_sum() {
    let (rows, width) = (1000, 7);
    let local = move |rank: usize| -> Vec<f32> {
        let mut v = vec![0.0f32; rows * width];
        for r in [3, 17 + rank, 500, 999 - 2 * rank] {
            for j in 0..width {
                v[r * width + j] = value(rank, r * width + j);
            }
        }
        v
    };
    for n in [2usize, 3] {
        let got = on_ring(n, move |rank, ring| {
            let mut sparse = local(rank);
            all_reduce_rows(ring, &mut sparse, width).unwrap();
            sparse
        });
        let mut want = vec![0.0f32; rows * width];
        for rank in 0..n {
            for (w, x) in want.iter_mut().zip(local(rank)) {
                *w += x;
            }
        }
        for (rank, g) in got.iter().enumerate() {
            assert_eq!(g, &got[0], "world {n}: rank {rank} differs from rank 0");
            for (i, (a, b)) in g.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-5 * b.abs(), "world {n}: element {i}: {a} vs {b}");
            }
        }
        let nonzero_rows = got[0].chunks(width).filter(|r| r.iter().any(|&x| x != 0.0)).count();
        assert_eq!(nonzero_rows, 2 + 2 * n, "world {n}: rows 3 and 500, and two of each rank's own");
    }
}

/// With a job token, peers prove they hold it without sending it; a peer with another token, or
/// none, is refused at the handshake, with an error, not a hang.
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
                    let mut ring = TcpRing::connect(rank, &addrs, l, Duration::from_secs(3), tok.as_ref())?;
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
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let mut ring = TcpRing::connect(rank, &addrs, l, Duration::from_secs(20), None).unwrap();
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
