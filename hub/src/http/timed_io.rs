//! A deadline on every write to a socket: [`TimedIo`] wraps a connection
//! (below TLS, so it covers the handshake, every HTTP response and, after
//! the upgrade, every WebSocket frame, ping and close alike) and fails a
//! write that stays blocked longer than the deadline — a peer that stopped
//! reading (its receive window closed) is cut instead of holding a
//! connection slot and its buffers forever. hyper has no write deadline of
//! its own.
//!
//! The clock runs only while a write is blocked: it starts when a write
//! (or flush, or shutdown) first returns `Pending` and is reset by any
//! progress. Reads have no deadline here (the request-head timeout and the
//! WebSocket heartbeat bound them). After a timeout every later write fails
//! at once.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::metrics::Metrics;

/// A connection whose writes have a deadline (see the module docs).
pub(crate) struct TimedIo<I> {
    io: I,
    limit: Duration,
    /// Running while a write is blocked.
    timer: Option<Pin<Box<Sleep>>>,
    /// Set once a write timed out.
    cut: bool,
    metrics: Arc<Metrics>,
}

impl<I> TimedIo<I> {
    /// `io` with writes limited to `limit` each (counted in `metrics`).
    pub(crate) fn new(io: I, limit: Duration, metrics: Arc<Metrics>) -> Self {
        TimedIo {
            io,
            limit,
            timer: None,
            cut: false,
            metrics,
        }
    }

    /// The connection without the deadline (a device session times its
    /// writes itself).
    pub(crate) fn into_inner(self) -> I {
        self.io
    }

    /// A write is blocked: `Pending` until the deadline, then the error.
    fn blocked<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.timer = None;
                self.cut = true;
                self.metrics
                    .hardening
                    .write_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                Poll::Ready(Err(timed_out()))
            }
        }
    }

    /// What a write step returned, with the deadline applied.
    fn step<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.blocked(cx),
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "peer stopped reading")
}

impl<I: AsyncRead + Unpin> AsyncRead for TimedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for TimedIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.cut {
            return Poll::Ready(Err(timed_out()));
        }
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.step(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.cut {
            return Poll::Ready(Err(timed_out()));
        }
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.step(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.cut {
            return Poll::Ready(Err(timed_out()));
        }
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.step(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.cut {
            return Poll::Ready(Err(timed_out()));
        }
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.step(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_write_blocked_past_the_deadline_fails_and_is_counted() {
        let metrics = Arc::new(Metrics::new());
        // A pipe of 64 bytes whose far end is never read.
        let (near, _far) = tokio::io::duplex(64);
        let mut io = TimedIo::new(near, Duration::from_millis(100), metrics.clone());
        let t = std::time::Instant::now();
        let e = io.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert_eq!(metrics.hardening.write_timeouts.load(Ordering::Relaxed), 1);
        // Cut for good.
        assert!(io.write_all(b"x").await.is_err());
    }

    #[tokio::test]
    async fn a_slow_but_moving_reader_is_not_cut() {
        let metrics = Arc::new(Metrics::new());
        let (near, mut far) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 16];
            while got < 4096 {
                tokio::time::sleep(Duration::from_millis(2)).await;
                got += far.read(&mut buf).await.unwrap();
            }
        });
        let mut io = TimedIo::new(near, Duration::from_millis(200), metrics);
        // 4 KiB through a 64-byte pipe at 16 bytes per 2 ms: ~0.5 s in
        // all, each write waiting far less than the deadline.
        io.write_all(&[1u8; 4096]).await.unwrap();
        reader.await.unwrap();
    }
}
