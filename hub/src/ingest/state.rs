//! The decisions of one device session, without I/O: what a WebSocket
//! message means, what becomes of a data frame (rate limit, gatekeeper,
//! abuse rule, quarantine or not), when to ping and when the peer is dead,
//! and which answer is still owed at shutdown.
//!
//! [`SessionState`] takes events (a message, a frame, a heartbeat tick, an
//! ack written, a reading queued) with the time as an argument and answers
//! with what to do; [`super::session`] does it (writes to the socket, the
//! topic, the writer queue, the metrics and the log). Every rule here is
//! unit-tested without sockets or clocks.

use std::time::{Duration, Instant};

use ems_shared::{decode_edge_frame, EdgeFrame, EdgeStatus, FrameError, Reading, RejectReason};
use std::sync::Arc;

use super::socket::ReadError;
use super::wire::{Incoming, WireError};
use crate::limits::{DeviceLimits, Excess};

/// The state of one device session.
pub(crate) struct SessionState {
    /// The device's token bucket and the rate limit of the warnings about
    /// its bad frames, shared with its other connections and outliving
    /// them.
    limits: Arc<DeviceLimits>,
    /// Excess episodes, for the abuse rule.
    excess: Excess,
    /// Continuous excess for this long is abuse (close 1008), in ms
    /// (saturating; kept small: every idle connection's task holds it).
    abuse_after_ms: u32,
    /// Pings sent without a frame from the peer since.
    missed: u32,
    /// Unanswered pings after which the peer is dead.
    max_missed: u32,
    /// Whether a frame arrived since the last heartbeat tick: a device that
    /// talks needs no ping.
    heard: bool,
    /// The last reading queued for the store, `(epoch, seq)`.
    last_queued: Option<(u64, u64)>,
    /// The last ack written to the socket.
    last_acked: Option<(u64, u64)>,
}

/// What a WebSocket message asks of the session loop.
#[derive(Debug)]
pub(crate) enum Step {
    /// Nothing more (a pong, or a ping that the socket answers itself).
    Continue,
    /// A ping while readings of this connection wait for their ack: the
    /// device asks for its acks now (an edge that is stopping), so the
    /// writer should commit without lingering. The socket answers the ping
    /// itself.
    Flush,
    /// A data frame to judge with [`SessionState::frame`]: `Some` text, or
    /// `None` for a binary frame.
    Frame(Option<String>),
    /// The session ends.
    End(Ending),
}

/// Why a session ends on a message from its socket.
#[derive(Debug)]
pub(crate) enum Ending {
    /// The peer closed the connection.
    Closed,
    /// The socket failed; log it.
    Failed(std::io::Error),
    /// The peer broke the WebSocket protocol: close with 1002 and log it.
    Protocol(&'static str),
    /// A message over the size limit: close with 1009.
    TooBig {
        /// Its size in bytes.
        size: usize,
        /// The limit.
        max_size: usize,
    },
    /// A text frame that is not UTF-8: close with 1007. `Some(n)`: log it,
    /// `n` similar warnings were suppressed before.
    BadUtf8(Option<u64>),
}

/// What becomes of one data frame.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// A valid reading: forward it to the device's topic and queue it for
    /// the store.
    Reading(Reading),
    /// A valid outbox status report: record it.
    Status(EdgeStatus),
    /// Refused: count it by reason. A `rate_limited` refusal is answered
    /// at once with a `rejected` frame when it has an epoch and seq
    /// ([`rejected_frame`]) and nothing is stored; any other refusal is
    /// quarantined within the device's budget ([`SessionState::refusal`]).
    /// `warn`: `Some(n)` = log it, `n` similar warnings were suppressed
    /// before.
    Refused {
        /// Why.
        error: FrameError,
        /// Whether to log, and how many warnings were suppressed.
        warn: Option<u64>,
    },
    /// A refused frame in a rate-limit excess that has lasted
    /// `abuse_after`: count the refusal, then close with 1008.
    Abuse,
}

/// What becomes of a frame the gatekeeper refused (any reason but
/// `rate_limited`), given whether its device's quarantine budget had room.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Store it in quarantine; a `rejected` answer follows the commit
    /// (when it has an epoch and seq).
    Quarantine,
    /// The budget is spent and the frame has an epoch and seq: answer
    /// `rate_limited` at once ([`deferred`]); the edge keeps the reading
    /// and sends it again later. Counts as rate-limit excess.
    Defer,
    /// The budget is spent and the frame has no epoch/seq (nothing an edge
    /// holds): count it only.
    Skip,
    /// A deferral in a rate-limit excess that has lasted `abuse_after`:
    /// close with 1008.
    Abuse,
}

/// What a heartbeat tick asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Tick {
    /// The peer spoke since the last tick: no ping needed.
    Quiet,
    /// Send a ping.
    Ping,
    /// This many pings went unanswered: the peer is dead.
    Dead(u32),
}

impl SessionState {
    /// A session with the device's `limits`, closing after `abuse_after`
    /// of continuous rate-limit excess and after `max_missed` unanswered
    /// pings.
    pub fn new(limits: Arc<DeviceLimits>, abuse_after: Duration, max_missed: u32) -> Self {
        SessionState {
            limits,
            excess: Excess::default(),
            abuse_after_ms: u32::try_from(abuse_after.as_millis()).unwrap_or(u32::MAX),
            missed: 0,
            max_missed,
            heard: false,
            last_queued: None,
            last_acked: None,
        }
    }

    fn abuse_after(&self) -> Duration {
        Duration::from_millis(u64::from(self.abuse_after_ms))
    }

    /// A message (or the end of the stream, `None`) from the socket at
    /// `now`.
    pub fn message(&mut self, msg: Option<Result<Incoming, ReadError>>, now: Instant) -> Step {
        // Any frame proves the peer alive: under backpressure its pong may
        // sit behind readings the hub has not read yet.
        if matches!(msg, Some(Ok(_))) {
            self.missed = 0;
            self.heard = true;
        }
        match msg {
            Some(Ok(Incoming::Text(text))) => Step::Frame(Some(text)),
            Some(Ok(Incoming::Binary)) => Step::Frame(None),
            Some(Ok(Incoming::Ping(_))) if self.owed_at_shutdown().is_some() => Step::Flush,
            Some(Ok(Incoming::Pong | Incoming::Ping(_))) => Step::Continue,
            Some(Ok(Incoming::Close(_))) | None => Step::End(Ending::Closed),
            Some(Err(ReadError::Wire(WireError::TooBig { size, max_size }))) => {
                Step::End(Ending::TooBig { size, max_size })
            }
            Some(Err(ReadError::Wire(WireError::Utf8))) => {
                Step::End(Ending::BadUtf8(self.limits.warn(now)))
            }
            Some(Err(ReadError::Wire(WireError::Protocol(what)))) => {
                Step::End(Ending::Protocol(what))
            }
            Some(Err(ReadError::Io(e))) => Step::End(Ending::Failed(e)),
        }
    }

    /// Judges one data frame (`None`: binary) that arrived at `now`, hub
    /// time `rx_ms`: the rate limit first, then the gatekeeper.
    pub fn frame(&mut self, frame: Option<&str>, now: Instant, rx_ms: i64) -> Verdict {
        if !self.limits.try_take(now) {
            if self.excess.refused(now, self.abuse_after()) {
                return Verdict::Abuse;
            }
            return self.refused(rate_limited(frame), now);
        }
        let Some(text) = frame else {
            let error = FrameError {
                reason: RejectReason::BinaryFrame,
                detail: "readings are text frames".into(),
                epoch: None,
                seq: None,
            };
            return self.refused(error, now);
        };
        match decode_edge_frame(text, rx_ms) {
            Ok(EdgeFrame::Reading(r)) => Verdict::Reading(r),
            Ok(EdgeFrame::Status(s)) => Verdict::Status(s),
            Err(error) => self.refused(error, now),
        }
    }

    fn refused(&mut self, error: FrameError, now: Instant) -> Verdict {
        let warn = self.limits.warn(now);
        Verdict::Refused { error, warn }
    }

    /// The fate of a frame the gatekeeper refused (`error`, never
    /// `rate_limited`) at `now`; `budget`: its device's quarantine budget
    /// had room for it.
    pub fn refusal(&mut self, error: &FrameError, budget: bool, now: Instant) -> Refusal {
        if budget {
            return Refusal::Quarantine;
        }
        if error.epoch.is_none() || error.seq.is_none() {
            return Refusal::Skip;
        }
        if self.excess.refused(now, self.abuse_after()) {
            return Refusal::Abuse;
        }
        Refusal::Defer
    }

    /// A heartbeat tick.
    pub fn tick(&mut self) -> Tick {
        if std::mem::take(&mut self.heard) {
            self.missed = 0;
            return Tick::Quiet;
        }
        if self.missed >= self.max_missed {
            return Tick::Dead(self.missed);
        }
        self.missed += 1;
        Tick::Ping
    }

    /// The reading `(epoch, seq)` is in the writer queue.
    pub fn queued(&mut self, id: (u64, u64)) {
        self.last_queued = Some(id);
    }

    /// Answers (acks, `rejected`) up to and including `last` were written
    /// to the socket.
    pub fn acked(&mut self, last: (u64, u64)) {
        self.last_acked = Some(last);
    }

    /// The ack still owed for the last queued reading, if it was not
    /// written yet (at shutdown the session waits for it before closing; a
    /// ping meanwhile asks for it now).
    pub fn owed_at_shutdown(&self) -> Option<(u64, u64)> {
        self.last_queued.filter(|l| self.last_acked != Some(*l))
    }
}

/// The `rejected` frame that answers a refused frame, when the frame had
/// a readable epoch and seq (the edge then knows which reading was not
/// taken).
pub(crate) fn rejected_frame(error: &FrameError) -> Option<String> {
    let (epoch, seq) = (error.epoch?, error.seq?);
    let reason = format!("{}: {}", error.reason.code(), error.detail);
    Some(ems_shared::HubFrame::Rejected { epoch, seq, reason }.to_json())
}

/// The `rate_limited` refusal that answers a frame deferred for its
/// device's spent quarantine budget ([`Refusal::Defer`]).
pub(crate) fn deferred(error: &FrameError) -> FrameError {
    FrameError {
        reason: RejectReason::RateLimited,
        detail: "quarantine budget of this device spent; resend later".into(),
        epoch: error.epoch,
        seq: error.seq,
    }
}

/// `"; N similar warnings suppressed"`, or nothing when none were.
pub(crate) fn suppressed(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!("; {n} similar warnings suppressed")
    }
}

/// The refusal of a frame that found the bucket empty; keeps the frame's
/// epoch/seq (when readable, without full validation) so the edge learns
/// which reading was not taken.
fn rate_limited(text: Option<&str>) -> FrameError {
    #[derive(serde::Deserialize)]
    struct Ids {
        epoch: Option<u64>,
        seq: Option<u64>,
    }
    let (epoch, seq) = text
        .and_then(|t| serde_json::from_str::<Ids>(t).ok())
        .map(|i| (i.epoch, i.seq))
        .unwrap_or((None, None));
    FrameError {
        reason: RejectReason::RateLimited,
        detail: "per-device rate limit exceeded; resend later".into(),
        epoch,
        seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimit;
    use crate::limits::{TokenBucket, WARN_EVERY};

    const RX_MS: i64 = 1_700_000_000_000;

    fn reading(seq: u64) -> String {
        format!(
            r#"{{"type":"reading","epoch":7,"seq":{seq},"ts_ms":{RX_MS},"meter":"main","power_w":100.0}}"#
        )
    }

    /// A session whose bucket holds `burst` tokens and never refills.
    fn session(burst: f64, t0: Instant) -> SessionState {
        let limit = RateLimit {
            rate: 0.0,
            burst,
            abuse_after: Duration::from_secs(10),
        };
        let limits = DeviceLimits::new(TokenBucket::new(&limit, t0), WARN_EVERY);
        SessionState::new(Arc::new(limits), limit.abuse_after, 3)
    }

    #[test]
    fn valid_frames_become_readings_and_status() {
        let t0 = Instant::now();
        let mut s = session(10.0, t0);
        match s.frame(Some(&reading(1)), t0, RX_MS) {
            Verdict::Reading(r) => assert_eq!((r.epoch, r.seq), (7, 1)),
            other => panic!("{other:?}"),
        }
        let status = r#"{"type":"status","outbox_depth":3,"oldest_ts_ms":1,"dropped":0}"#;
        match s.frame(Some(status), t0, RX_MS) {
            Verdict::Status(st) => assert_eq!(st.outbox_depth, 3),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_frames_are_refused_and_answered_when_they_have_ids() {
        let t0 = Instant::now();
        let mut s = session(10.0, t0);
        let out_of_range = format!(
            r#"{{"type":"reading","epoch":7,"seq":2,"ts_ms":{RX_MS},"meter":"main","power_factor":2.0}}"#
        );
        let Verdict::Refused { error, warn } = s.frame(Some(&out_of_range), t0, RX_MS) else {
            panic!("accepted");
        };
        assert_eq!(error.reason, RejectReason::OutOfRange);
        assert_eq!(warn, Some(0), "the first warning is logged");
        let reply = rejected_frame(&error).unwrap();
        assert!(reply.contains(r#""type":"rejected""#), "{reply}");
        assert!(reply.contains(r#""seq":2"#), "{reply}");
        assert!(reply.contains("out_of_range: "), "{reply}");
        // No ids, no answer; the second warning within 10 s is suppressed.
        let Verdict::Refused { error, warn } = s.frame(Some("not json"), t0, RX_MS) else {
            panic!("accepted");
        };
        assert_eq!(error.reason, RejectReason::InvalidJson);
        assert_eq!(warn, None);
        assert!(rejected_frame(&error).is_none());
        let Verdict::Refused { error, .. } = s.frame(None, t0, RX_MS) else {
            panic!("accepted");
        };
        assert_eq!(error.reason, RejectReason::BinaryFrame);
        let later = t0 + Duration::from_secs(11);
        let Verdict::Refused { warn, .. } = s.frame(None, later, RX_MS) else {
            panic!("accepted");
        };
        assert_eq!(warn, Some(2), "two warnings suppressed meanwhile");
    }

    #[test]
    fn an_empty_bucket_refuses_before_validation_and_keeps_the_ids() {
        let t0 = Instant::now();
        let mut s = session(1.0, t0);
        assert!(matches!(
            s.frame(Some(&reading(1)), t0, RX_MS),
            Verdict::Reading(_)
        ));
        // Rate-limited even though invalid: the bucket comes first.
        let Verdict::Refused { error, .. } = s.frame(None, t0, RX_MS) else {
            panic!("accepted");
        };
        assert_eq!(error.reason, RejectReason::RateLimited);
        let Verdict::Refused { error, .. } = s.frame(Some(&reading(2)), t0, RX_MS) else {
            panic!("accepted");
        };
        assert_eq!(
            (error.reason, error.epoch, error.seq),
            (RejectReason::RateLimited, Some(7), Some(2))
        );
        assert!(rejected_frame(&error).unwrap().contains("rate_limited: "));
    }

    #[test]
    fn sustained_excess_is_abuse() {
        let t0 = Instant::now();
        let mut s = session(1.0, t0);
        let _ = s.frame(Some(&reading(1)), t0, RX_MS);
        let mut t = t0;
        for i in 0..10 {
            assert!(
                matches!(
                    s.frame(Some(&reading(2)), t, RX_MS),
                    Verdict::Refused { .. }
                ),
                "{i}"
            );
            t += Duration::from_secs(1);
        }
        assert!(matches!(
            s.frame(Some(&reading(2)), t, RX_MS),
            Verdict::Abuse
        ));
    }

    #[test]
    fn refused_frames_are_quarantined_within_the_budget_then_deferred_or_skipped() {
        let t0 = Instant::now();
        let mut s = session(10.0, t0);
        let with_ids = FrameError {
            reason: RejectReason::OutOfRange,
            detail: "x".into(),
            epoch: Some(7),
            seq: Some(2),
        };
        let without = FrameError {
            seq: None,
            ..with_ids.clone()
        };
        assert_eq!(s.refusal(&with_ids, true, t0), Refusal::Quarantine);
        assert_eq!(s.refusal(&without, true, t0), Refusal::Quarantine);
        assert_eq!(s.refusal(&without, false, t0), Refusal::Skip);
        assert_eq!(s.refusal(&with_ids, false, t0), Refusal::Defer);
        let answer = rejected_frame(&deferred(&with_ids)).unwrap();
        assert!(answer.contains(r#""seq":2"#), "{answer}");
        assert!(
            answer.contains("rate_limited: quarantine budget"),
            "{answer}"
        );
        // Deferrals are rate-limit excess: sustained, they are abuse.
        let mut t = t0;
        let mut last = Refusal::Defer;
        for _ in 0..12 {
            t += Duration::from_secs(1);
            last = s.refusal(&with_ids, false, t);
        }
        assert_eq!(last, Refusal::Abuse);
        // Skipped frames are not excess.
        let mut s = session(10.0, t0);
        for i in 0..30 {
            let at = t0 + Duration::from_secs(i);
            assert_eq!(s.refusal(&without, false, at), Refusal::Skip);
        }
    }

    #[test]
    fn messages_map_to_steps() {
        let t0 = Instant::now();
        let mut s = session(1.0, t0);
        let text = |t: &str| Some(Ok(Incoming::Text(t.into())));
        assert!(matches!(s.message(text("x"), t0), Step::Frame(Some(t)) if t == "x"));
        let binary = Some(Ok(Incoming::Binary));
        assert!(matches!(s.message(binary, t0), Step::Frame(None)));
        let pong = Some(Ok(Incoming::Pong));
        assert!(matches!(s.message(pong, t0), Step::Continue));
        let ping = || Some(Ok(Incoming::Ping(Vec::new())));
        assert!(matches!(s.message(ping(), t0), Step::Continue));
        // A ping with a reading waiting for its ack asks for the ack now;
        // once the ack is written, a ping is only a ping again.
        s.queued((1, 7));
        assert!(matches!(s.message(ping(), t0), Step::Flush));
        s.acked((1, 7));
        assert!(matches!(s.message(ping(), t0), Step::Continue));
        let close = Some(Ok(Incoming::Close(None)));
        assert!(matches!(s.message(close, t0), Step::End(Ending::Closed)));
        assert!(matches!(s.message(None, t0), Step::End(Ending::Closed)));
        let big = WireError::TooBig {
            size: 20_000,
            max_size: 16_384,
        };
        assert!(matches!(
            s.message(Some(Err(big.into())), t0),
            Step::End(Ending::TooBig {
                size: 20_000,
                max_size: 16_384
            })
        ));
        let utf8 = || Some(Err(WireError::Utf8.into()));
        assert!(matches!(
            s.message(utf8(), t0),
            Step::End(Ending::BadUtf8(Some(0)))
        ));
        assert!(matches!(
            s.message(utf8(), t0),
            Step::End(Ending::BadUtf8(None))
        ));
        let protocol = Some(Err(WireError::Protocol("reserved opcode").into()));
        assert!(matches!(
            s.message(protocol, t0),
            Step::End(Ending::Protocol("reserved opcode"))
        ));
        assert!(matches!(
            s.message(Some(Err(reset().into())), t0),
            Step::End(Ending::Failed(_))
        ));
    }

    fn reset() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::ConnectionReset)
    }

    #[test]
    fn heartbeat_pings_only_silent_peers_and_declares_them_dead() {
        let t0 = Instant::now();
        let mut s = session(1.0, t0);
        assert_eq!(s.tick(), Tick::Ping);
        assert_eq!(s.tick(), Tick::Ping);
        // Any frame answers for the pings, and a talking peer needs none.
        let _ = s.message(Some(Ok(Incoming::Text("x".into()))), t0);
        assert_eq!(s.tick(), Tick::Quiet);
        assert_eq!(s.tick(), Tick::Ping);
        assert_eq!(s.tick(), Tick::Ping);
        assert_eq!(s.tick(), Tick::Ping);
        assert_eq!(s.tick(), Tick::Dead(3));
        // An error is no sign of life.
        let _ = s.message(Some(Err(reset().into())), t0);
        assert_eq!(s.tick(), Tick::Dead(3));
    }

    #[test]
    fn the_last_queued_reading_is_owed_until_acked() {
        let mut s = session(1.0, Instant::now());
        assert_eq!(s.owed_at_shutdown(), None);
        s.queued((1, 5));
        assert_eq!(s.owed_at_shutdown(), Some((1, 5)));
        s.acked((1, 4));
        assert_eq!(s.owed_at_shutdown(), Some((1, 5)));
        s.acked((1, 5));
        assert_eq!(s.owed_at_shutdown(), None);
        s.queued((2, 0));
        assert_eq!(s.owed_at_shutdown(), Some((2, 0)));
    }

    #[test]
    fn suppressed_warnings_are_counted_in_the_next_line() {
        assert_eq!(suppressed(0), "");
        assert_eq!(suppressed(2), "; 2 similar warnings suppressed");
    }
}
