//! The ports' connection limits: at most `max` connections open at once. A connection past the
//! limit is accepted and closed at once (logged at most once a second), so that one client
//! opening connections cannot exhaust the coordinator's memory or file descriptors; a
//! connection's slot is given back when it closes. A connection that has not sent the first
//! [`HANDSHAKE_BYTES`] (an HTTP/2 preface is 24, a TLS ClientHello more, an HTTP/1 request line
//! as many) within the handshake time is closed: silent or dripping clients cannot hold the
//! slots.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The connections a coordinator of `world` workers allows: two for each worker (a worker
/// reconnecting while its last connection times out) and 64 for probes, scrapes and tools.
pub fn max_connections(world: usize) -> usize {
    2 * world + 64
}

/// The bytes a connection must send within the handshake time.
pub const HANDSHAKE_BYTES: usize = 16;
/// The handshake time the coordinator gives its ports' connections.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection holding one of the limit's slots.
pub struct Limited {
    inner: TcpStream,
    _slot: OwnedSemaphorePermit,
    received: usize,
    /// Until [`HANDSHAKE_BYTES`] have arrived: when the connection is given up.
    handshake: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// `incoming`'s connections, at most `max` open at once, each closed unless it sends
/// [`HANDSHAKE_BYTES`] within `handshake`.
pub fn limit(
    incoming: impl Stream<Item = std::io::Result<TcpStream>>,
    max: usize,
    handshake: std::time::Duration,
) -> impl Stream<Item = std::io::Result<Limited>> {
    let slots = Arc::new(Semaphore::new(max));
    let mut last_warning: Option<Instant> = None;
    let limited = incoming.filter_map(move |conn| match conn {
        Err(e) => Some(Err(e)),
        Ok(inner) => match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => Some(Ok(Limited {
                inner,
                _slot: slot,
                received: 0,
                handshake: Some(Box::pin(tokio::time::sleep(handshake))),
            })),
            Err(_) => {
                if last_warning.is_none_or(|t| t.elapsed().as_secs() >= 1) {
                    last_warning = Some(Instant::now());
                    let peer = inner.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                    tracing::warn!(max, %peer, "connection limit reached: closing a new connection");
                }
                None
            }
        },
    });
    Backoff { inner: Box::pin(limited), pause: None }
}

/// How long accepting pauses after an accept error.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

/// After an accept error (out of file descriptors: EMFILE), the next accept waits
/// [`ACCEPT_BACKOFF`]: the listener would fail again at once, and the server's accept loop would
/// spin on a core until a descriptor frees.
struct Backoff<S> {
    inner: Pin<Box<S>>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T, S: Stream<Item = std::io::Result<T>>> Stream for Backoff<S> {
    type Item = std::io::Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(pause) = &mut self.pause {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        let item = self.inner.as_mut().poll_next(cx);
        if let Poll::Ready(Some(Err(e))) = &item {
            tracing::debug!(error = %e, "accepting a connection failed; pausing");
            self.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
        }
        item
    }
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Limited {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        let this = &mut *self;
        if let Some(deadline) = &mut this.handshake {
            this.received += buf.filled().len() - before;
            if this.received >= HANDSHAKE_BYTES {
                this.handshake = None;
            } else if read.is_pending() && deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("fewer than {HANDSHAKE_BYTES} bytes within the handshake time"),
                )));
            }
        }
        read
    }
}

impl AsyncWrite for Limited {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accept_errors_pause_the_accept_loop() {
        let errors = tokio_stream::iter((0..5).map(|_| Err::<TcpStream, _>(std::io::Error::other("EMFILE"))));
        let mut s = std::pin::pin!(limit(errors, 1, std::time::Duration::from_secs(1)));
        let t = Instant::now();
        let mut n = 0;
        while let Some(e) = s.next().await {
            assert!(e.is_err());
            n += 1;
        }
        assert_eq!(n, 5);
        assert!(t.elapsed() >= ACCEPT_BACKOFF * 4, "5 errors in {:?}", t.elapsed());
    }
}
