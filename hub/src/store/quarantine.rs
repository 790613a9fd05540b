//! The quarantine: what the hub received but does not store as a reading —
//! frames the gatekeeper refused and readings the database refused — kept
//! with the reason, so that every reading an edge let go of ends somewhere
//! an operator can see it.
//!
//! Rows reach the `quarantine` table through the writer, in the same
//! transaction as the readings around them ([`super::ReadingSink::write_batch`]);
//! the `rejected` answer to the edge is sent only after that commit. This
//! module owns the row types, the reason codes and the read side
//! ([`QuarantineStore`]).

use std::sync::Arc;

use ems_shared::{FrameError, RejectReason};

use super::{Row, StoreError};

/// Longest `raw` text kept, in bytes (a frame is at most
/// [`ems_shared::MAX_MESSAGE_BYTES`] anyway).
pub const MAX_RAW_BYTES: usize = 16 * 1024;

/// Why a row is in quarantine: the gatekeeper's reject code, or
/// `store_error` for a valid reading the database refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuarantineReason {
    /// The gatekeeper refused the frame (never [`RejectReason::RateLimited`],
    /// which is a transient answer and stores nothing).
    Frame(RejectReason),
    /// The reading was valid, but the database refused to store it (a
    /// check or trigger raised, a value it cannot hold, TimescaleDB
    /// refusing an insert into a compressed chunk).
    StoreError,
}

impl QuarantineReason {
    /// Every reason that can be quarantined, for metrics that want a zero
    /// for each (a closed label set).
    pub const ALL: [QuarantineReason; 12] = [
        QuarantineReason::Frame(RejectReason::InvalidJson),
        QuarantineReason::Frame(RejectReason::BinaryFrame),
        QuarantineReason::Frame(RejectReason::UnknownType),
        QuarantineReason::Frame(RejectReason::UnknownField),
        QuarantineReason::Frame(RejectReason::MissingField),
        QuarantineReason::Frame(RejectReason::DuplicateField),
        QuarantineReason::Frame(RejectReason::WrongType),
        QuarantineReason::Frame(RejectReason::OutOfRange),
        QuarantineReason::Frame(RejectReason::NoMeasurement),
        QuarantineReason::Frame(RejectReason::BadMeterId),
        QuarantineReason::Frame(RejectReason::FutureTimestamp),
        QuarantineReason::StoreError,
    ];

    /// The stable code stored in `quarantine.reason` and sent in the
    /// `rejected` frame.
    pub fn code(self) -> &'static str {
        match self {
            QuarantineReason::Frame(r) => r.code(),
            QuarantineReason::StoreError => "store_error",
        }
    }
}

/// One row for the `quarantine` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineRow {
    /// The connection's device.
    pub device_id: Arc<str>,
    /// Hub receive time, Unix ms.
    pub received_at_ms: i64,
    /// The frame's `epoch`, when readable.
    pub epoch: Option<u64>,
    /// The frame's `seq`, when readable.
    pub seq: Option<u64>,
    /// Why.
    pub reason: QuarantineReason,
    /// What exactly was wrong (the gatekeeper's or the database's message).
    pub detail: String,
    /// The frame text, at most [`MAX_RAW_BYTES`]; `None` for a binary
    /// frame.
    pub raw: Option<String>,
}

impl QuarantineRow {
    /// A frame the gatekeeper refused (`raw`: its text, `None` if binary).
    pub fn refused_frame(
        device_id: Arc<str>,
        received_at_ms: i64,
        error: &FrameError,
        raw: Option<&str>,
    ) -> Self {
        QuarantineRow {
            device_id,
            received_at_ms,
            epoch: error.epoch,
            seq: error.seq,
            reason: QuarantineReason::Frame(error.reason),
            detail: text(&error.detail, 1024),
            raw: raw.map(|t| text(t, MAX_RAW_BYTES)),
        }
    }

    /// A valid reading the database refused with `detail`; `raw` is the
    /// reading as its wire JSON.
    pub fn store_error(row: &Row, detail: &str) -> Self {
        let json = row.reading.to_json();
        QuarantineRow {
            device_id: row.device_id.clone(),
            received_at_ms: row.received_at_ms,
            epoch: Some(row.reading.epoch),
            seq: Some(row.reading.seq),
            reason: QuarantineReason::StoreError,
            detail: text(detail, 1024),
            raw: Some(text(&json, MAX_RAW_BYTES)),
        }
    }

    /// The `(epoch, seq, reason)` of the `rejected` frame that answers it
    /// once committed; `None` without a readable epoch and seq (nothing
    /// the edge could match).
    pub fn answer(&self) -> Option<(u64, u64, String)> {
        let (epoch, seq) = (self.epoch?, self.seq?);
        Some((
            epoch,
            seq,
            format!("{}: {}", self.reason.code(), self.detail),
        ))
    }

    /// Bytes this row costs in the database, roughly: what the
    /// per-device quarantine budget counts.
    pub fn cost(raw_len: usize) -> usize {
        raw_len.min(MAX_RAW_BYTES) + ROW_OVERHEAD
    }
}

/// What a quarantine row costs beyond its `raw` text (the other columns,
/// the index entries), for the budget.
const ROW_OVERHEAD: usize = 256;

/// A quarantined frame as listed (newest first) by the CLI and the admin
/// API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Quarantined {
    /// The device.
    pub device_id: String,
    /// Hub receive time, Unix ms.
    pub received_at_ms: i64,
    /// `epoch`, when it was readable.
    pub epoch: Option<u64>,
    /// `seq`, when it was readable.
    pub seq: Option<u64>,
    /// The reason code.
    pub reason: String,
    /// The gatekeeper's or the database's message.
    pub detail: String,
    /// The frame text (`None` for a binary frame).
    pub raw: Option<String>,
}

/// Reading the quarantine back.
pub trait QuarantineStore: Send {
    /// Quarantined rows, newest first (receive time, then epoch and seq),
    /// at most `limit`, of one device or of all.
    fn quarantined(
        &mut self,
        device_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Quarantined>, StoreError>;

    /// Quarantined rows per device, in one grouped query (devices without
    /// any are left out).
    fn quarantine_counts(&mut self) -> Result<Vec<(String, u64)>, StoreError>;
}

/// `s` as a database can hold it: NUL characters (which PostgreSQL's
/// `text` refuses) replaced by U+FFFD, then cut to at most `max` bytes.
fn text(s: &str, max: usize) -> String {
    if s.contains('\0') {
        truncated(&s.replace('\0', "\u{FFFD}"), max).to_owned()
    } else {
        truncated(s, max).to_owned()
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
pub(crate) fn truncated(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

#[cfg(test)]
mod tests {
    use super::*;
    use ems_shared::Reading;

    #[test]
    fn rows_keep_ids_and_bounded_text() {
        let error = FrameError {
            reason: RejectReason::OutOfRange,
            detail: "power_factor 2 out of range".into(),
            epoch: Some(7),
            seq: Some(2),
        };
        let long = "é".repeat(MAX_RAW_BYTES);
        let q = QuarantineRow::refused_frame(Arc::from("d"), 5, &error, Some(&long));
        let raw = q.raw.clone().unwrap();
        assert!(raw.len() <= MAX_RAW_BYTES && raw.len() >= MAX_RAW_BYTES - 1);
        assert!(raw.chars().all(|c| c == 'é'));
        assert_eq!(
            q.answer(),
            Some((7, 2, "out_of_range: power_factor 2 out of range".into()))
        );
        let no_ids = FrameError {
            epoch: None,
            ..error
        };
        let q = QuarantineRow::refused_frame(Arc::from("d"), 5, &no_ids, None);
        assert_eq!((q.answer(), q.raw), (None, None));
        let nul = QuarantineRow::refused_frame(Arc::from("d"), 5, &no_ids, Some("a\0b"));
        assert_eq!(nul.raw.as_deref(), Some("a\u{FFFD}b"));

        let row = Row {
            device_id: Arc::from("d"),
            received_at_ms: 9,
            reading: Reading {
                epoch: 3,
                seq: 4,
                meter: "main".into(),
                power_w: Some(1234.5),
                ..Default::default()
            },
        };
        let q = QuarantineRow::store_error(&row, "refused by a trigger");
        assert_eq!(q.reason.code(), "store_error");
        assert_eq!((q.epoch, q.seq, q.received_at_ms), (Some(3), Some(4), 9));
        assert!(q.raw.unwrap().contains("1234.5"));
        assert!(QuarantineRow::cost(10) > 10);
    }

    #[test]
    fn reasons_are_a_closed_set_without_rate_limited() {
        let codes: Vec<&str> = QuarantineReason::ALL.iter().map(|r| r.code()).collect();
        assert!(!codes.contains(&"rate_limited"));
        assert!(codes.contains(&"store_error"));
        let mut unique = codes.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), codes.len());
        for r in RejectReason::ALL {
            assert_eq!(
                codes.contains(&r.code()),
                r != RejectReason::RateLimited,
                "{r:?}"
            );
        }
    }
}
