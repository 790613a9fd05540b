//! The `status` frame (edge → hub): how far behind the edge's outbox is,
//! and [`decode_edge_frame`], the dispatch on `type` for everything an edge
//! may send.
//!
//! ```json
//! {"type":"status","outbox_depth":10800,"oldest_ts_ms":1764000000000,"dropped":0}
//! ```
//!
//! - `outbox_depth`: readings in the edge's outbox that the hub has not
//!   acknowledged yet (queued or in flight).
//! - `oldest_ts_ms`: sample time (Unix ms, the reading's own `ts_ms`) of the
//!   oldest of them; `null` when the outbox is empty. The hub turns it into
//!   "behind by" = its receive time − `oldest_ts_ms`, so a dashboard can say
//!   "catching up, 3 h behind" without trusting two clocks to agree on a
//!   duration.
//! - `dropped`: readings the edge dropped since it started because its
//!   spool was full (optional, default 0).
//! - `unwritten`: readings the edge holds in memory because it cannot
//!   write its spool (disk full, card errors); absent while it can.
//! - `dropped_disk_full`: readings dropped since start because the spool
//!   could not be written and the memory queue was full; absent when 0.
//! - `dropped_damaged`: readings skipped since start because their spool
//!   record was damaged, missing or unreadable; absent when 0.
//!
//! The last three are left out when 0, so a hub that predates them (and
//! refuses unknown fields) still accepts the frames of a healthy edge.
//!
//! The edge sends one right after connecting and then every ~10 s. The hub
//! never acks a status frame and stores nothing from it.
//!
//! Dispatch cost: [`decode_edge_frame`] first tries the strict reading
//! decoder, exactly as before; only a frame that fails it is probed for its
//! `type`, so the reading path pays nothing.

use serde::{Deserialize, Serialize};

use crate::{decode_reading, FrameError, Reading, RejectReason, MAX_SAFE_INTEGER};

/// The constant `"type":"status"` tag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatusTag {
    /// `"status"`
    #[default]
    #[serde(rename = "status")]
    Status,
}

/// Outbox status of an edge (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeStatus {
    /// Always `"status"`.
    #[serde(rename = "type")]
    pub frame_type: StatusTag,
    /// Unacknowledged readings in the outbox, in [0, 2^53−1].
    pub outbox_depth: u64,
    /// Sample time of the oldest unacknowledged reading, Unix ms; `None`
    /// (`null`) when the outbox is empty.
    pub oldest_ts_ms: Option<i64>,
    /// Readings dropped because the spool was full, since the edge started.
    #[serde(default)]
    pub dropped: u64,
    /// Readings held in memory because the spool cannot be written; 0
    /// (omitted) while it can.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unwritten: u64,
    /// Readings dropped because the spool could not be written and the
    /// memory queue was full, since the edge started (omitted when 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_disk_full: u64,
    /// Readings skipped because their spool record was damaged, missing or
    /// unreadable, since the edge started (omitted when 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_damaged: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl EdgeStatus {
    /// The wire JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks ranges: counters ≤ 2^53−1, `oldest_ts_ms` not more than
    /// [`crate::MAX_FUTURE_SKEW_MS`] ahead of `now_ms` and not negative.
    pub fn validate(&self, now_ms: i64) -> Result<(), FrameError> {
        let counters = [
            self.outbox_depth,
            self.dropped,
            self.unwritten,
            self.dropped_disk_full,
            self.dropped_damaged,
        ];
        if counters.iter().any(|c| *c > MAX_SAFE_INTEGER) {
            return Err(FrameError::new(
                RejectReason::OutOfRange,
                "status counters exceed 2^53-1",
            ));
        }
        if let Some(ts) = self.oldest_ts_ms {
            if ts < 0 {
                return Err(FrameError::new(
                    RejectReason::OutOfRange,
                    "oldest_ts_ms is negative",
                ));
            }
            if ts > now_ms.saturating_add(crate::MAX_FUTURE_SKEW_MS) {
                return Err(FrameError::new(
                    RejectReason::FutureTimestamp,
                    "oldest_ts_ms is in the future",
                ));
            }
        }
        Ok(())
    }

    /// How far behind the edge is at `now_ms`: `now_ms − oldest_ts_ms`,
    /// at least 0; 0 when the outbox is empty.
    pub fn behind_ms(&self, now_ms: i64) -> i64 {
        self.oldest_ts_ms
            .map(|t| now_ms.saturating_sub(t).max(0))
            .unwrap_or(0)
    }
}

/// Any frame an edge may send.
#[derive(Debug, Clone, PartialEq)]
pub enum EdgeFrame {
    /// A reading (acked after commit).
    Reading(Reading),
    /// An outbox status report (never acked).
    Status(EdgeStatus),
}

/// Lenient view used only to find `type` in a frame the reading decoder
/// refused.
#[derive(Deserialize)]
struct TypeProbe<'a> {
    #[serde(rename = "type", borrow)]
    frame_type: Option<std::borrow::Cow<'a, str>>,
}

/// The gatekeeper for everything an edge sends: a reading (strict, as
/// [`decode_reading`]) or a status frame. Errors are those of the decoder
/// of the frame's `type`.
pub fn decode_edge_frame(text: &str, now_ms: i64) -> Result<EdgeFrame, FrameError> {
    let reading_err = match decode_reading(text, now_ms) {
        Ok(r) => return Ok(EdgeFrame::Reading(r)),
        Err(e) => e,
    };
    let is_status = serde_json::from_str::<TypeProbe<'_>>(text)
        .ok()
        .and_then(|p| p.frame_type)
        .is_some_and(|t| t == "status");
    if !is_status {
        return Err(reading_err);
    }
    match serde_json::from_str::<EdgeStatus>(text) {
        Ok(s) => {
            s.validate(now_ms)?;
            Ok(EdgeFrame::Status(s))
        }
        Err(e) => {
            let mut err = FrameError::new(crate::reading::classify(&e), e.to_string());
            // A status frame has no epoch/seq, so it is never answered
            // with `rejected` (FrameError::new leaves both `None`).
            err.epoch = None;
            err.seq = None;
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_000_000_000;

    #[test]
    fn status_round_trips_and_dispatches() {
        let s = EdgeStatus {
            outbox_depth: 3,
            oldest_ts_ms: Some(NOW - 10_800_000),
            dropped: 0,
            ..Default::default()
        };
        let json = s.to_json();
        assert_eq!(
            decode_edge_frame(&json, NOW).unwrap(),
            EdgeFrame::Status(s.clone())
        );
        assert_eq!(s.behind_ms(NOW), 10_800_000);
        // Field order does not matter, `dropped` is optional.
        let f = decode_edge_frame(
            r#"{"outbox_depth":0,"oldest_ts_ms":null,"type":"status"}"#,
            NOW,
        )
        .unwrap();
        assert!(matches!(
            f,
            EdgeFrame::Status(EdgeStatus {
                outbox_depth: 0,
                oldest_ts_ms: None,
                dropped: 0,
                ..
            })
        ));
    }

    #[test]
    fn readings_still_decode_and_bad_frames_keep_their_reasons() {
        let r = decode_edge_frame(
            r#"{"type":"reading","epoch":1,"seq":2,"ts_ms":3,"meter":"m","power_w":1}"#,
            NOW,
        )
        .unwrap();
        assert!(matches!(r, EdgeFrame::Reading(Reading { seq: 2, .. })));
        let e = |s: &str| decode_edge_frame(s, NOW).unwrap_err();
        assert_eq!(e(r#"{"type":"nope"}"#).reason, RejectReason::UnknownType);
        assert_eq!(e("{").reason, RejectReason::InvalidJson);
        assert_eq!(
            e(r#"{"type":"status","outbox_depth":"1","oldest_ts_ms":null}"#).reason,
            RejectReason::WrongType
        );
        assert_eq!(
            e(r#"{"type":"status","outbox_depth":1,"oldest_ts_ms":null,"x":1}"#).reason,
            RejectReason::UnknownField
        );
        assert_eq!(
            e(r#"{"type":"status","oldest_ts_ms":null}"#).reason,
            RejectReason::MissingField
        );
        assert_eq!(
            e(&format!(
                r#"{{"type":"status","outbox_depth":1,"oldest_ts_ms":{}}}"#,
                NOW + 3_600_000
            ))
            .reason,
            RejectReason::FutureTimestamp
        );
        let err = e(r#"{"type":"status","epoch":1,"seq":2,"outbox_depth":1}"#);
        assert_eq!((err.epoch, err.seq), (None, None));
        assert_eq!(
            e(&format!(
                r#"{{"type":"status","outbox_depth":1,"oldest_ts_ms":null,"dropped_damaged":{}}}"#,
                MAX_SAFE_INTEGER + 1
            ))
            .reason,
            RejectReason::OutOfRange
        );
    }

    #[test]
    fn loss_counters_are_optional_and_left_out_when_zero() {
        let healthy = EdgeStatus {
            outbox_depth: 2,
            ..Default::default()
        };
        // What a hub that predates the counters accepts.
        assert_eq!(
            healthy.to_json(),
            r#"{"type":"status","outbox_depth":2,"oldest_ts_ms":null,"dropped":0}"#
        );
        let degraded = EdgeStatus {
            unwritten: 3,
            dropped_disk_full: 4,
            dropped_damaged: 5,
            ..healthy
        };
        let json = degraded.to_json();
        assert!(
            json.ends_with(r#""unwritten":3,"dropped_disk_full":4,"dropped_damaged":5}"#),
            "{json}"
        );
        assert_eq!(
            decode_edge_frame(&json, NOW).unwrap(),
            EdgeFrame::Status(degraded)
        );
    }
}
