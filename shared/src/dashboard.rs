//! Hub ↔ dashboard control frames: presence (`status`), the end of a
//! resume replay (`replay_end`) and backlog summaries (`backfill`), plus
//! the `Sec-WebSocket-Protocol` entries a dashboard offers.
//!
//! Readings themselves reach dashboards as [`crate::DashboardReading`];
//! everything here is the rest of the dashboard protocol (see
//! the README's Dashboards section):
//!
//! ```json
//! {"type":"status","device_id":"ems_001","online":true,"last_seen_ms":1764000000000}
//! {"type":"replay_end","device_id":"ems_001","since_ms":1763996400000,"count":3600,"truncated":false}
//! {"type":"backfill","device_id":"ems_001","count":1200,"from_ts_ms":1763989200000,"to_ts_ms":1763990400000}
//! ```
//!
//! Decoding is lenient (unknown fields are ignored) so dashboards keep
//! working when the hub adds fields.

use serde::{Deserialize, Serialize};

/// The subprotocol every dashboard offers and the hub answers with.
pub const SUBPROTOCOL: &str = "ems.v1";

/// Prefix of the subprotocol entry that carries a viewer token
/// (`ems.bearer.<token>`); offered together with [`SUBPROTOCOL`], never
/// echoed by the hub.
pub const BEARER_PROTOCOL_PREFIX: &str = "ems.bearer.";

/// Prefix of the subprotocol entry that asks for a replay of the stored
/// readings with `ts_ms >= <since_ms>` before the live feed
/// (`ems.resume.<since_ms>`, decimal Unix ms).
pub const RESUME_PROTOCOL_PREFIX: &str = "ems.resume.";

/// Hub → dashboard control frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DashboardFrame {
    /// Presence of the device: sent once right after the upgrade and again
    /// whenever the device connects or disconnects.
    Status {
        /// The device.
        device_id: String,
        /// Whether the device has a live connection to this hub.
        online: bool,
        /// When the hub last heard from the device (connect, disconnect or
        /// the receive time of its newest stored reading), Unix ms; `null`
        /// when never.
        last_seen_ms: Option<i64>,
        /// Readings waiting in the device's outbox, when the device reports
        /// it; omitted otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outbox_depth: Option<u64>,
        /// How far behind the device's outbox is (hub time minus the sample
        /// time of its oldest unsent reading), when the device reports it;
        /// omitted otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        behind_ms: Option<i64>,
        /// The device's loss counters from its last outbox status (see
        /// [`crate::EdgeStatus`]), when it reports them; omitted otherwise.
        /// Flattened: the four counters are fields of the frame.
        #[serde(flatten)]
        losses: Option<EdgeLosses>,
    },
    /// The replay asked for with `ems.resume.<since_ms>` is complete: the
    /// `count` readings before this frame came from the store (oldest
    /// first); everything after it is live.
    ReplayEnd {
        /// The device.
        device_id: String,
        /// The `since_ms` of the request.
        since_ms: i64,
        /// Readings replayed.
        count: u64,
        /// More readings matched than the replay limit: the oldest were
        /// left out (fetch them with the history API).
        truncated: bool,
    },
    /// The device is draining an offline backlog: `count` readings with a
    /// sample time in `[from_ts_ms, to_ts_ms]` were stored but not sent
    /// one by one (fetch them with the history API if wanted).
    Backfill {
        /// The device.
        device_id: String,
        /// Readings summarized.
        count: u64,
        /// Oldest sample time among them, Unix ms.
        from_ts_ms: i64,
        /// Newest sample time among them, Unix ms.
        to_ts_ms: i64,
    },
}

/// What an edge reports it lost or holds back since it started (the
/// counters of its `status` frame), flattened into a dashboard `status`
/// frame: `dropped`, `unwritten`, `dropped_disk_full`, `dropped_damaged`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeLosses {
    /// Readings dropped because the spool was full.
    pub dropped: u64,
    /// Readings held in memory because the spool cannot be written.
    pub unwritten: u64,
    /// Readings dropped because the spool could not be written and the
    /// memory queue was full.
    pub dropped_disk_full: u64,
    /// Readings skipped because their spool record was damaged.
    pub dropped_damaged: u64,
}

impl From<&crate::EdgeStatus> for EdgeLosses {
    fn from(s: &crate::EdgeStatus) -> Self {
        EdgeLosses {
            dropped: s.dropped,
            unwritten: s.unwritten,
            dropped_disk_full: s.dropped_disk_full,
            dropped_damaged: s.dropped_damaged,
        }
    }
}

impl DashboardFrame {
    /// The wire JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frames = [
            DashboardFrame::Status {
                device_id: "d".into(),
                online: false,
                last_seen_ms: None,
                outbox_depth: Some(3),
                behind_ms: Some(10_800_000),
                losses: Some(EdgeLosses {
                    dropped: 1,
                    unwritten: 2,
                    dropped_disk_full: 3,
                    dropped_damaged: 4,
                }),
            },
            DashboardFrame::ReplayEnd {
                device_id: "d".into(),
                since_ms: 1,
                count: 2,
                truncated: true,
            },
            DashboardFrame::Backfill {
                device_id: "d".into(),
                count: 5,
                from_ts_ms: 1,
                to_ts_ms: 9,
            },
        ];
        for f in &frames {
            let back: DashboardFrame = serde_json::from_str(&f.to_json()).unwrap();
            assert_eq!(back, *f);
        }
        // Lenient: unknown fields are ignored, outbox_depth is optional.
        let s: DashboardFrame = serde_json::from_str(
            r#"{"type":"status","device_id":"d","online":true,"last_seen_ms":5,"new":1}"#,
        )
        .unwrap();
        assert!(matches!(
            s,
            DashboardFrame::Status {
                online: true,
                outbox_depth: None,
                losses: None,
                ..
            }
        ));
        // The loss counters are plain fields of the frame.
        let json = frames[0].to_json();
        assert!(
            json.ends_with(
                r#""behind_ms":10800000,"dropped":1,"unwritten":2,"dropped_disk_full":3,"dropped_damaged":4}"#
            ),
            "{json}"
        );
    }
}
