//! Waking the link thread without polling: an `eventfd(2)` that the
//! outbox's users signal when the link must act (the sampler after an
//! append it could not send itself, or whose send left the link something
//! to plan, see [`crate::link::conduit`]; the supervisor after a sync
//! released held readings; the stop signal), and [`wait`], one `poll(2)`
//! on that descriptor and the hub's socket. A reading the sampler sent
//! itself signals nothing: the link thread sleeps on until the ack.
//!
//! - [`Wake::notify`] adds one to the eventfd's counter (a `write` of 8
//!   bytes, never blocks); any number of notifications before the link
//!   looks collapse into one wake-up. [`Wake::clear`] resets the counter.
//! - [`wait`] sleeps until the socket is readable (or hung up, or in
//!   error: the next read reports it), writable (only when asked: a write
//!   is pending), the eventfd is signalled, or the timeout passes. The
//!   caller must have consumed everything the TLS and WebSocket layers
//!   already buffered before it sleeps (poll only sees the kernel's
//!   buffer): the link reads until the read would block.
//! - Both calls are plain `libc` (Linux, and so the Raspberry Pi's aarch64
//!   and armv7 targets); no async runtime.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The eventfd the link waits on (see the module docs).
#[derive(Debug)]
pub struct Wake {
    /// The eventfd, non-blocking, close-on-exec.
    fd: OwnedFd,
    /// Notifications since creation (for tests and diagnostics).
    notified: AtomicU64,
}

impl Wake {
    /// A fresh, unsignalled eventfd.
    pub fn new() -> io::Result<Wake> {
        // SAFETY: eventfd takes no pointers; a non-negative return is a new
        // descriptor that we own from here on.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a valid descriptor nobody else owns.
        Ok(Wake {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            notified: AtomicU64::new(0),
        })
    }

    /// Signals the waiter (see the module docs). Never blocks and never
    /// fails in a way the caller could act on: a full counter (2⁶⁴ − 2
    /// notifications) is still signalled.
    pub fn notify(&self) {
        self.notified.fetch_add(1, Ordering::Relaxed);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our descriptor.
        let _ = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// How many times [`Wake::notify`] was called since creation.
    pub fn notifications(&self) -> u64 {
        self.notified.load(Ordering::Relaxed)
    }

    /// Resets the signal; returns whether it was set.
    pub fn clear(&self) -> bool {
        let mut count: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our descriptor.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut count as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        n == std::mem::size_of::<u64>() as isize && count > 0
    }
}

impl AsRawFd for Wake {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// What [`wait`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ready {
    /// The socket has data, hung up or failed: read it.
    pub readable: bool,
    /// The socket can take more bytes (only reported when asked for).
    pub writable: bool,
    /// The eventfd was signalled (not cleared by `wait`).
    pub woken: bool,
}

impl Ready {
    /// Nothing happened: the timeout passed (or a signal interrupted the
    /// wait).
    pub fn timed_out(&self) -> bool {
        *self == Ready::default()
    }
}

/// Sleeps until `socket` is readable, or writable when `want_write`, or
/// `wake` is signalled, or `timeout` passed (`None`: no timeout). An
/// interrupted wait (`EINTR`) returns as a timeout.
pub fn wait(
    socket: RawFd,
    want_write: bool,
    wake: &Wake,
    timeout: Option<Duration>,
) -> io::Result<Ready> {
    let events = libc::POLLIN | if want_write { libc::POLLOUT } else { 0 };
    let mut fds = [
        libc::pollfd {
            fd: socket,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a live array of two pollfd structs.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, poll_timeout_ms(timeout)) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(Ready::default());
        }
        return Err(e);
    }
    let sock = fds[0].revents;
    Ok(Ready {
        readable: sock & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0,
        writable: want_write && sock & libc::POLLOUT != 0,
        woken: fds[1].revents & libc::POLLIN != 0,
    })
}

/// `poll`'s timeout argument for `timeout`: rounded *up* to whole
/// milliseconds (rounding down would wake just before a deadline and spin
/// until it), at most `i32::MAX` ms; `None` is -1 (no timeout).
pub fn poll_timeout_ms(timeout: Option<Duration>) -> libc::c_int {
    match timeout {
        None => -1,
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000);
            libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    #[test]
    fn timeouts_round_up_and_saturate() {
        assert_eq!(poll_timeout_ms(None), -1);
        assert_eq!(poll_timeout_ms(Some(Duration::ZERO)), 0);
        assert_eq!(poll_timeout_ms(Some(Duration::from_nanos(1))), 1);
        assert_eq!(poll_timeout_ms(Some(Duration::from_micros(1500))), 2);
        assert_eq!(poll_timeout_ms(Some(Duration::from_millis(7))), 7);
        assert_eq!(
            poll_timeout_ms(Some(Duration::from_secs(u64::MAX))),
            libc::c_int::MAX
        );
    }

    #[test]
    fn notifications_wake_the_waiter_once_until_cleared() {
        let (sock, _peer) = UnixStream::pair().unwrap();
        let wake = Wake::new().unwrap();
        let fd = sock.as_raw_fd();
        // Nothing signalled: a timeout.
        let r = wait(fd, false, &wake, Some(Duration::ZERO)).unwrap();
        assert!(r.timed_out(), "{r:?}");
        assert!(!wake.clear());
        // Three notifications are one wake-up.
        for _ in 0..3 {
            wake.notify();
        }
        let r = wait(fd, false, &wake, Some(Duration::from_secs(10))).unwrap();
        assert_eq!(
            r,
            Ready {
                woken: true,
                ..Ready::default()
            }
        );
        // Still signalled until cleared (poll is level-triggered).
        assert!(wait(fd, false, &wake, Some(Duration::ZERO)).unwrap().woken);
        assert!(wake.clear());
        assert!(!wake.clear());
        assert!(wait(fd, false, &wake, Some(Duration::ZERO))
            .unwrap()
            .timed_out());
    }

    #[test]
    fn a_notification_from_another_thread_ends_a_long_wait() {
        let (sock, _peer) = UnixStream::pair().unwrap();
        let wake = std::sync::Arc::new(Wake::new().unwrap());
        let w = wake.clone();
        let started = Instant::now();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            w.notify();
        });
        let r = wait(
            sock.as_raw_fd(),
            false,
            &wake,
            Some(Duration::from_secs(60)),
        )
        .unwrap();
        t.join().unwrap();
        assert!(r.woken);
        assert!(started.elapsed() < Duration::from_secs(60));
    }

    #[test]
    fn socket_data_hangup_and_room_are_reported() {
        let (sock, mut peer) = UnixStream::pair().unwrap();
        let wake = Wake::new().unwrap();
        let fd = sock.as_raw_fd();
        // Writable only when asked for.
        let r = wait(fd, true, &wake, Some(Duration::ZERO)).unwrap();
        assert!(r.writable && !r.readable, "{r:?}");
        assert!(wait(fd, false, &wake, Some(Duration::ZERO))
            .unwrap()
            .timed_out());
        peer.write_all(b"x").unwrap();
        let r = wait(fd, false, &wake, Some(Duration::from_secs(10))).unwrap();
        assert!(r.readable && !r.woken, "{r:?}");
        let mut byte = [0u8; 1];
        (&sock).read_exact(&mut byte).unwrap();
        assert!(wait(fd, false, &wake, Some(Duration::ZERO))
            .unwrap()
            .timed_out());
        // A peer that went away makes the socket "readable" (EOF).
        drop(peer);
        assert!(
            wait(fd, false, &wake, Some(Duration::from_secs(10)))
                .unwrap()
                .readable
        );
    }
}
