//! # ems-shared — the EMS wire protocol
//!
//! The types the edge, the hub and dashboards speak, and their validation.
//! Nothing else lives here: no I/O, no async runtime, no WebSocket library.
//!
//! ## Layout
//! - [`measurement`]: the one list of measurements (name, unit, range) that
//!   every struct carrying measurements and every store derives from.
//! - [`ids`]: device ids and meter ids (syntax only).
//! - [`reading`]: the `reading` frame (edge → hub), its strict decoder and
//!   range validation (the "gatekeeper").
//! - [`status`]: the `status` frame (edge → hub: outbox depth and age) and
//!   [`decode_edge_frame`], the dispatch on `type` for edge frames.
//! - [`dashboard`]: hub → dashboard control frames (`status`, `replay_end`,
//!   `backfill`) and the dashboard subprotocol entries.
//! - [`frames`]: hub → edge frames (`ack`, `rejected`) and the hub → dashboard
//!   frame (a reading plus `device_id` and `rx_ms`).
//!
//! ## Ack semantics
//! `{"type":"ack","epoch":E,"seq":S}` is cumulative per connection and epoch:
//! the reading `(E, S)` and every reading of epoch `E` the hub received
//! *before it on the same connection* is durably committed, or was refused
//! for good (a `rejected` frame with any reason but `rate_limited`).
//! An edge that sends each epoch in increasing `seq` order may read it simply as
//! "everything of epoch `E` up to `S`" — except for readings it got
//! `rejected … rate_limited` for: those were NOT taken and must be resent.
//! (Our edge matches acks by send position and requeues rate-limited
//! readings.)

#![warn(missing_docs)]

pub mod dashboard;
pub mod frames;
pub mod ids;
pub mod measurement;
pub mod reading;
pub mod status;

pub use dashboard::{DashboardFrame, EdgeLosses};
pub use frames::{dashboard_frame, DashboardReading, HubFrame};
pub use ids::{validate_device_id, validate_meter_id, IdError};
pub use measurement::{Measured, Measurement};
pub use reading::{decode_reading, FrameError, Reading, RejectReason};
pub use status::{decode_edge_frame, EdgeFrame, EdgeStatus};

/// Largest message (text or binary) a hub accepts; larger ones close the
/// connection with 1009.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// Largest integer exactly representable in an IEEE-754 double
/// (`Number.MAX_SAFE_INTEGER` in JavaScript); `epoch` and `seq` stay ≤ this.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// How far ahead of the hub's clock a reading's `ts_ms` may be.
pub const MAX_FUTURE_SKEW_MS: i64 = 5 * 60 * 1000;

/// Request header of a device's handshake: how long, in milliseconds, the
/// device keeps a reading it sent on a live connection in memory before it
/// writes it to its own storage for want of an ack (its *ack window*). The
/// hub may then hold the device's readings for half of it and answer them
/// with fewer, cumulative acks. Absent: the hub answers as soon as its
/// commit cadence allows.
pub const ACK_WINDOW_HEADER: &str = "ems-ack-window-ms";

/// The longest ack window a device may announce, in milliseconds.
pub const MAX_ACK_WINDOW_MS: u64 = 600_000;

/// The value of [`ACK_WINDOW_HEADER`]: whole milliseconds, 1 to
/// [`MAX_ACK_WINDOW_MS`], digits only.
pub fn parse_ack_window(value: &[u8]) -> Option<std::time::Duration> {
    if value.is_empty() || value.len() > 6 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let ms = value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    (1..=MAX_ACK_WINDOW_MS)
        .contains(&ms)
        .then(|| std::time::Duration::from_millis(ms))
}

/// WebSocket close code sent to a connection replaced by a newer one of the
/// same device.
pub const CLOSE_REPLACED: u16 = 4000;

/// WebSocket close code sent when the device's token was revoked or
/// rotated while connected (the edge must not retry quickly: an operator
/// has to provision a new token).
pub const CLOSE_REVOKED: u16 = 4001;

/// WebSocket close code sent to a device id that keeps replacing its own
/// connections (two live devices sharing one identity); the hub refuses
/// it for a cool-down.
pub const CLOSE_CONFLICT: u16 = 4002;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_ack_window_is_whole_milliseconds_within_bounds() {
        assert_eq!(parse_ack_window(b"4000"), Some(Duration::from_secs(4)));
        assert_eq!(parse_ack_window(b"1"), Some(Duration::from_millis(1)));
        assert_eq!(parse_ack_window(b"600000"), Some(Duration::from_secs(600)));
        for bad in [
            &b""[..],
            b"0",
            b"600001",
            b"9999999",
            b"-5",
            b"+5",
            b" 5",
            b"5 ",
            b"1.5",
            b"4s",
        ] {
            assert_eq!(parse_ack_window(bad), None, "{bad:?}");
        }
    }
}
