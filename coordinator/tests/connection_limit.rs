//! The gRPC port's connection limit over real sockets: connections past the limit are closed at
//! once, those within it stay open (HTTP/2), a closed one gives its slot back, and one that
//! sends nothing within the handshake time is closed.

mod common;

use coordinator::service::{CoordinatorService, JobInfo};
use proto::v1::coordinator_server::CoordinatorServer;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Whether the server closed `c` (end of stream) within a short wait, rather than keeping it.
async fn closed(c: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_millis(500), c.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false, // the server's HTTP/2 settings: a connection it serves
        Err(_) => false,    // still open, waiting for our preface
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed_and_a_closed_one_gives_its_slot_back() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let job = JobInfo { config_json: "{\"job\":1}".into(), seed: 17, batch_size: common::BATCH, max_seq_len: 16 };
    let svc = CoordinatorService::new(1, job, common::empty_data(2), Duration::from_secs(5));
    let handshake = Duration::from_secs(2);
    let incoming = coordinator::limits::limit(tonic::transport::server::TcpIncoming::from(listener), 3, handshake);
    tokio::spawn(
        tonic::transport::Server::builder().add_service(CoordinatorServer::new(svc)).serve_with_incoming(incoming),
    );

    let mut kept = Vec::new();
    for k in 0..3 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        assert!(!closed(&mut c).await, "connection {k} (within the limit) was closed");
        kept.push(c);
    }
    for k in 3..6 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut c).await, "connection {k} (past the limit) was kept");
    }
    drop(kept.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = TcpStream::connect(addr).await.unwrap();
    assert!(!closed(&mut again).await, "the slot of a closed connection was not given back");
    // It says nothing: closed once the handshake time is over, and its slot is free again.
    tokio::time::sleep(handshake).await;
    assert!(closed(&mut again).await, "a silent connection outlived the handshake time");
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    assert!(!closed(&mut c).await, "the silent connection's slot was not given back");
    for (k, c) in kept.iter_mut().enumerate() {
        assert!(!closed(c).await, "connection {k}, which sent its preface, was closed");
    }
    assert_eq!(coordinator::limits::max_connections(16_384), 32_832);
}
