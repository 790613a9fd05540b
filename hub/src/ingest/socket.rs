//! A device's upgraded connection: reads messages through the
//! [`wire`](super::wire) decoder, writes the hub's frames, closes.
//!
//! Reads go through a buffer on the stack that lives only during one poll;
//! the decoder keeps what is left of it (part of a frame, or frames behind
//! the message returned) and nothing while the device is idle. Frames the
//! hub sends are queued in `out` and written at [`DeviceSocket::flush`];
//! `out` is released once written. A ping is answered and a peer's close
//! echoed through the same queue, written at the session's next flush (the
//! session flushes after every message that leaves something queued, and
//! before it drops the socket).

use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::http::timed_io::TimedIo;

use super::wire::{encode, encode_close, Decoder, Incoming, Op, WireError};

/// Bytes read per `read` call (on the stack, only during the poll): a
/// device that sends its backlog fills it with ~18 readings at a time.
const READ_CHUNK: usize = 4096;

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The device broke the protocol or a limit.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The connection under the WebSocket.
enum Io {
    /// Plain TCP (behind nginx, or on a trusted network): the socket
    /// itself, out of hyper's box and without the HTTP side's write
    /// deadline ([`TimedIo`]): [`DeviceSocket::flush`] has its own.
    Tcp(TcpStream),
    /// Anything else hyper upgraded (TLS).
    Other(Box<TokioIo<Upgraded>>),
}

/// A device's upgraded connection.
pub(crate) struct DeviceSocket {
    io: Io,
    decoder: Decoder,
    /// Frames queued for the next flush (unallocated while empty).
    out: Vec<u8>,
    /// Whether a close frame was queued or written: nothing may follow it.
    closing: bool,
}

impl DeviceSocket {
    /// Waits for hyper to hand over the upgraded connection (`None`: the
    /// upgrade failed, logged).
    pub(crate) async fn upgrade(
        on_upgrade: hyper::upgrade::OnUpgrade,
        device_id: &str,
        peer: std::net::SocketAddr,
    ) -> Option<DeviceSocket> {
        let mut decoder = Decoder::new(ems_shared::MAX_MESSAGE_BYTES);
        match on_upgrade.await {
            Ok(u) => Some(DeviceSocket {
                io: match u.downcast::<TokioIo<TimedIo<TcpStream>>>() {
                    Ok(parts) => {
                        // Bytes the device sent right behind its request.
                        decoder.keep(&parts.read_buf);
                        Io::Tcp(parts.io.into_inner().into_inner())
                    }
                    Err(u) => Io::Other(Box::new(TokioIo::new(u))),
                },
                decoder,
                out: Vec::new(),
                closing: false,
            }),
            Err(e) => {
                log::debug!("upgrade of device {device_id} from {peer} failed: {e}");
                None
            }
        }
    }

    /// The next message (`None`: the peer closed the TCP connection). A
    /// ping's pong and a close's echo are queued for the next flush.
    pub(crate) fn next(
        &mut self,
    ) -> impl std::future::Future<Output = Option<Result<Incoming, ReadError>>> + '_ {
        poll_fn(move |cx| self.poll_next(cx))
    }

    /// [`DeviceSocket::next`] as a poll, for the session loop's own poll of
    /// its mailbox, timer and socket.
    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Incoming, ReadError>>> {
        // Messages that arrived behind the last one come first.
        match self.decoder.feed(&[]) {
            Ok(Some(m)) => return Poll::Ready(Some(Ok(self.answer(m)))),
            Ok(None) => {}
            Err(e) => return Poll::Ready(Some(Err(e.into()))),
        }
        let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        loop {
            let mut buf = ReadBuf::uninit(&mut chunk);
            if let Err(e) = ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf)) {
                return Poll::Ready(Some(Err(e.into())));
            }
            if buf.filled().is_empty() {
                return Poll::Ready(None);
            }
            match self.decoder.feed(buf.filled()) {
                Ok(Some(m)) => return Poll::Ready(Some(Ok(self.answer(m)))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }

    /// Queues the reply a message needs from the socket itself.
    fn answer(&mut self, m: Incoming) -> Incoming {
        match &m {
            Incoming::Ping(payload) if !self.closing => encode(&mut self.out, Op::Pong, payload),
            Incoming::Close(code) if !self.closing => {
                self.closing = true;
                match code {
                    Some(code) => encode_close(&mut self.out, *code, ""),
                    None => encode(&mut self.out, Op::Close, &[]),
                }
            }
            _ => {}
        }
        m
    }

    /// Whether frames wait for a flush.
    pub(crate) fn pending(&self) -> bool {
        !self.out.is_empty()
    }

    /// Queues a text frame for the next flush.
    pub(crate) fn feed_text(&mut self, text: &str) {
        if !self.closing {
            encode(&mut self.out, Op::Text, text.as_bytes());
        }
    }

    /// Writes what is queued, giving up after `limit`: a peer that stops
    /// reading must not freeze its session (no heartbeat, no kick, no
    /// shutdown).
    pub(crate) async fn flush(&mut self, limit: Duration) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let (io, out) = (&mut self.io, &self.out);
        let written = tokio::time::timeout(limit, async {
            io.write_all(out).await?;
            io.flush().await
        })
        .await;
        // Released, not kept: an idle connection holds no buffer.
        self.out = Vec::new();
        match written {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "peer stopped reading",
            )),
        }
    }

    /// Queues one text frame and writes it with whatever else is queued.
    pub(crate) async fn send_text(&mut self, text: &str, limit: Duration) -> std::io::Result<()> {
        self.feed_text(text);
        self.flush(limit).await
    }

    /// Pings the device.
    pub(crate) async fn ping(&mut self, limit: Duration) -> std::io::Result<()> {
        if !self.closing {
            encode(&mut self.out, Op::Ping, &[]);
        }
        self.flush(limit).await
    }

    /// Closes with `code` and `reason`, and waits up to a second for the
    /// peer's close (or its end of the connection). A close the peer
    /// started is only echoed (queued when it arrived).
    pub(crate) async fn close(&mut self, code: u16, reason: &str) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            if self.closing {
                let _ = self.flush(Duration::from_secs(1)).await;
                return;
            }
            self.closing = true;
            encode_close(&mut self.out, code, reason);
            if self.flush(Duration::from_secs(1)).await.is_err() {
                return;
            }
            while let Some(Ok(m)) = self.next().await {
                if matches!(m, Incoming::Close(_)) {
                    break;
                }
            }
        })
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Other(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Other(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Other(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Other(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
