//! The `reading` frame (edge → hub) and the gatekeeper that decides whether a
//! frame is a valid reading.
//!
//! Decoding is strict: unknown fields, missing fields, wrong JSON types
//! (`"230"` where a number is expected), non-integers for `epoch`/`seq` and
//! duplicate keys are all refused. [`Reading::validate`] then checks ranges.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{validate_meter_id, Measured, MAX_FUTURE_SKEW_MS, MAX_SAFE_INTEGER};

/// The constant `"type":"reading"` tag of a reading frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadingTag {
    /// `"reading"`
    #[default]
    #[serde(rename = "reading")]
    Reading,
}

crate::measurement_struct! {
    serde:
    /// One sample of one meter, as sent by the edge.
    ///
    /// Build one with struct-update syntax:
    /// `Reading { epoch, seq, ts_ms, meter: "main".into(), power_w: Some(960.5), ..Default::default() }`.
    /// The measurement fields come from the one list in
    /// [`crate::measurement`]; at least one must be present.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Reading {
        /// Always `"reading"`.
        #[serde(rename = "type")]
        pub frame_type: ReadingTag,
        /// Chosen by the edge at process start.
        pub epoch: u64,
        /// Counts readings within the epoch, from 0.
        pub seq: u64,
        /// Sample time, Unix milliseconds.
        pub ts_ms: i64,
        /// Meter id on the device (`[a-z0-9_-]{1,32}`).
        pub meter: String,
    }
}

/// Why a frame was refused. [`RejectReason::code`] is a stable, short
/// string usable as a metric label and in `rejected` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not JSON, or truncated JSON.
    InvalidJson,
    /// A binary WebSocket frame (readings are text).
    BinaryFrame,
    /// `type` missing or not a known frame type.
    UnknownType,
    /// A field the protocol does not define.
    UnknownField,
    /// A required field (`epoch`, `seq`, `ts_ms`, `meter`) is absent.
    MissingField,
    /// The same key twice.
    DuplicateField,
    /// A value of the wrong JSON type, e.g. a string for a number, or a
    /// fraction/negative/huge number for `epoch`/`seq`.
    WrongType,
    /// A number outside its documented range.
    OutOfRange,
    /// None of the measurements is present.
    NoMeasurement,
    /// `meter` does not match `[a-z0-9_-]{1,32}`.
    BadMeterId,
    /// `ts_ms` is more than 5 minutes ahead of the hub's clock.
    FutureTimestamp,
    /// The device sent faster than its rate limit allows (the hub's
    /// per-device token bucket was empty); resend later.
    RateLimited,
}

impl RejectReason {
    /// Every reason, for metrics that want a zero for each.
    pub const ALL: [RejectReason; 12] = [
        RejectReason::InvalidJson,
        RejectReason::BinaryFrame,
        RejectReason::UnknownType,
        RejectReason::UnknownField,
        RejectReason::MissingField,
        RejectReason::DuplicateField,
        RejectReason::WrongType,
        RejectReason::OutOfRange,
        RejectReason::NoMeasurement,
        RejectReason::BadMeterId,
        RejectReason::FutureTimestamp,
        RejectReason::RateLimited,
    ];

    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::BinaryFrame => "binary_frame",
            RejectReason::UnknownType => "unknown_type",
            RejectReason::UnknownField => "unknown_field",
            RejectReason::MissingField => "missing_field",
            RejectReason::DuplicateField => "duplicate_field",
            RejectReason::WrongType => "wrong_type",
            RejectReason::OutOfRange => "out_of_range",
            RejectReason::NoMeasurement => "no_measurement",
            RejectReason::BadMeterId => "bad_meter_id",
            RejectReason::FutureTimestamp => "future_timestamp",
            RejectReason::RateLimited => "rate_limited",
        }
    }
}

/// A refused frame: the reason, a human-readable detail, and the frame's
/// `epoch`/`seq` when they could be read (so the hub can send `rejected`).
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{}: {detail}", reason.code())]
pub struct FrameError {
    /// The class of failure.
    pub reason: RejectReason,
    /// What exactly was wrong (bounded length; never contains credentials,
    /// since frames never do).
    pub detail: String,
    /// `epoch` of the frame, when readable.
    pub epoch: Option<u64>,
    /// `seq` of the frame, when readable.
    pub seq: Option<u64>,
}

impl FrameError {
    pub(crate) fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        let mut detail = detail.into();
        if detail.len() > 160 {
            let mut cut = 160;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
            detail.push('…');
        }
        FrameError {
            reason,
            detail,
            epoch: None,
            seq: None,
        }
    }
}

impl Reading {
    /// Checks ranges and ids. `now_ms` is the validator's clock (Unix ms).
    pub fn validate(&self, now_ms: i64) -> Result<(), FrameError> {
        let err = |reason, detail: String| {
            let mut e = FrameError::new(reason, detail);
            e.epoch = Some(self.epoch).filter(|v| *v <= MAX_SAFE_INTEGER);
            e.seq = Some(self.seq).filter(|v| *v <= MAX_SAFE_INTEGER);
            e
        };
        if self.epoch > MAX_SAFE_INTEGER {
            return Err(err(RejectReason::OutOfRange, "epoch exceeds 2^53-1".into()));
        }
        if self.seq > MAX_SAFE_INTEGER {
            return Err(err(RejectReason::OutOfRange, "seq exceeds 2^53-1".into()));
        }
        if validate_meter_id(&self.meter).is_err() {
            return Err(err(
                RejectReason::BadMeterId,
                "meter must be 1-32 characters of [a-z0-9_-]".into(),
            ));
        }
        if self.ts_ms < 0 {
            // Before 1970: a clock that was never set. Every store can hold
            // anything from 0 to the future bound.
            return Err(err(
                RejectReason::OutOfRange,
                "ts_ms is negative (before 1970)".into(),
            ));
        }
        if self.ts_ms > now_ms.saturating_add(MAX_FUTURE_SKEW_MS) {
            return Err(err(
                RejectReason::FutureTimestamp,
                format!(
                    "ts_ms is {} ms ahead of the hub clock (max {MAX_FUTURE_SKEW_MS})",
                    self.ts_ms - now_ms
                ),
            ));
        }
        let mut any = false;
        for (m, v) in self.present() {
            any = true;
            let (lo, hi) = m.range();
            if !v.is_finite() || v < lo || v > hi {
                return Err(err(
                    RejectReason::OutOfRange,
                    format!("{m} = {v} is outside [{lo}, {hi}]"),
                ));
            }
        }
        if !any {
            return Err(err(
                RejectReason::NoMeasurement,
                "at least one measurement is required".into(),
            ));
        }
        Ok(())
    }

    /// Encodes the reading as its wire JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain data with finite floats cannot fail; non-finite
        // floats become `null`, which validation on the other side refuses.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Lenient view used only to recover `epoch`/`seq` from a refused frame.
#[derive(Deserialize)]
struct Probe {
    epoch: Option<serde_json::Value>,
    seq: Option<serde_json::Value>,
}

fn probe_ids(text: &str) -> (Option<u64>, Option<u64>) {
    let Ok(p) = serde_json::from_str::<Probe>(text) else {
        return (None, None);
    };
    let id = |v: Option<serde_json::Value>| {
        v.and_then(|v| v.as_u64())
            .filter(|v| *v <= MAX_SAFE_INTEGER)
    };
    (id(p.epoch), id(p.seq))
}

pub(crate) fn classify(e: &serde_json::Error) -> RejectReason {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => RejectReason::InvalidJson,
        Category::Data => {
            let msg = e.to_string();
            if msg.starts_with("unknown field") {
                RejectReason::UnknownField
            } else if msg.starts_with("missing field") {
                RejectReason::MissingField
            } else if msg.starts_with("duplicate field") {
                RejectReason::DuplicateField
            } else if msg.starts_with("unknown variant") {
                RejectReason::UnknownType
            } else {
                RejectReason::WrongType
            }
        }
    }
}

/// The gatekeeper: decodes a text frame strictly and validates it against
/// `now_ms` (the hub's clock, Unix ms).
pub fn decode_reading(text: &str, now_ms: i64) -> Result<Reading, FrameError> {
    match serde_json::from_str::<Reading>(text) {
        Ok(r) => {
            r.validate(now_ms)?;
            Ok(r)
        }
        Err(e) => {
            let mut reason = classify(&e);
            // `{"voltage_v":1}` lacks `type`: report the missing tag as such.
            if reason == RejectReason::MissingField && e.to_string().contains("`type`") {
                reason = RejectReason::UnknownType;
            }
            let mut err = FrameError::new(reason, e.to_string());
            let (epoch, seq) = probe_ids(text);
            err.epoch = epoch;
            err.seq = seq;
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_000_000_000;

    fn ok(s: &str) -> Reading {
        decode_reading(s, NOW).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn reason(s: &str) -> RejectReason {
        decode_reading(s, NOW).expect_err(s).reason
    }

    #[test]
    fn a_long_decimal_is_parsed_to_the_nearest_double_and_survives_a_round_trip() {
        // 17+ significant digits: a parser that is not correctly rounded
        // lands one unit in the last place away, so the stored value would
        // differ from what the meter sent and from its own re-encoding.
        let r = ok(
            "{\"type\":\"reading\",\"epoch\":0,\"seq\":8,\"ts_ms\":0,\"meter\":\"pv-1\",\"power_w\":11200.333333316666\r\r\t}\n",
        );
        assert_eq!(
            r.power_w,
            Some("11200.333333316666".parse::<f64>().unwrap())
        );
        assert_eq!(ok(&r.to_json()), r);
    }

    #[test]
    fn accepts_the_contract_example() {
        let r = ok(
            r#"{"type":"reading","epoch":7,"seq":42,"ts_ms":1764000000000,"meter":"main","voltage_v":230.1,"current_a":4.2,"power_w":960.5,"energy_wh":1523400.0}"#,
        );
        assert_eq!((r.epoch, r.seq), (7, 42));
        assert_eq!(r.voltage_v, Some(230.1));
        assert_eq!(r.frequency_hz, None);
    }

    #[test]
    fn integers_as_measurements_are_numbers() {
        let r = ok(r#"{"type":"reading","epoch":0,"seq":0,"ts_ms":0,"meter":"m","power_w":-5}"#);
        assert_eq!(r.power_w, Some(-5.0));
    }

    #[test]
    fn classes_of_invalid_frames() {
        let base = r#""type":"reading","epoch":1,"seq":2,"ts_ms":1764000000000,"meter":"main""#;
        assert_eq!(reason("not json"), RejectReason::InvalidJson);
        assert_eq!(reason("{\"type\":\"reading\""), RejectReason::InvalidJson);
        assert_eq!(reason("[]"), RejectReason::WrongType);
        assert_eq!(
            reason(r#"{"epoch":1,"seq":2,"ts_ms":0,"meter":"m","power_w":1}"#),
            RejectReason::UnknownType
        );
        assert_eq!(
            reason(r#"{"type":"status","epoch":1}"#),
            RejectReason::UnknownType
        );
        assert_eq!(
            reason(&format!("{{{base},\"power_w\":1,\"x\":1}}")),
            RejectReason::UnknownField
        );
        assert_eq!(
            reason(r#"{"type":"reading","seq":2,"ts_ms":0,"meter":"m","power_w":1}"#),
            RejectReason::MissingField
        );
        assert_eq!(
            reason(&format!("{{{base},\"voltage_v\":\"230\"}}")),
            RejectReason::WrongType
        );
        assert_eq!(
            reason(&format!("{{{base},\"voltage_v\":null}}")),
            RejectReason::NoMeasurement
        );
        assert_eq!(
            reason(&format!("{{{base},\"voltage_v\":230,\"voltage_v\":231}}")),
            RejectReason::DuplicateField
        );
        assert_eq!(
            reason(&format!("{{{base},\"voltage_v\":2000.5}}")),
            RejectReason::OutOfRange
        );
        assert_eq!(
            reason(&format!("{{{base},\"energy_wh\":-1}}")),
            RejectReason::OutOfRange
        );
        assert_eq!(
            reason(&format!("{{{base},\"power_factor\":1.01}}")),
            RejectReason::OutOfRange
        );
        assert_eq!(
            reason(&format!("{{{base},\"power_w\":1e400}}")),
            RejectReason::InvalidJson
        );
        assert_eq!(reason(&format!("{{{base}}}")), RejectReason::NoMeasurement);
        assert_eq!(
            reason(r#"{"type":"reading","epoch":1.5,"seq":2,"ts_ms":0,"meter":"m","power_w":1}"#),
            RejectReason::WrongType
        );
        assert_eq!(
            reason(r#"{"type":"reading","epoch":-1,"seq":2,"ts_ms":0,"meter":"m","power_w":1}"#),
            RejectReason::WrongType
        );
        assert_eq!(
            reason(
                r#"{"type":"reading","epoch":9007199254740992,"seq":2,"ts_ms":0,"meter":"m","power_w":1}"#
            ),
            RejectReason::OutOfRange
        );
        assert_eq!(
            reason(r#"{"type":"reading","epoch":1,"seq":2,"ts_ms":0,"meter":"Main","power_w":1}"#),
            RejectReason::BadMeterId
        );
        let future = NOW + MAX_FUTURE_SKEW_MS + 1;
        assert_eq!(
            reason(&format!(
                r#"{{"type":"reading","epoch":1,"seq":2,"ts_ms":{future},"meter":"m","power_w":1}}"#
            )),
            RejectReason::FutureTimestamp
        );
        assert_eq!(
            reason(r#"{"type":"reading","epoch":1,"seq":2,"ts_ms":-1,"meter":"m","power_w":1}"#),
            RejectReason::OutOfRange
        );
        let edge = NOW + MAX_FUTURE_SKEW_MS;
        ok(&format!(
            r#"{{"type":"reading","epoch":1,"seq":2,"ts_ms":{edge},"meter":"m","power_w":1}}"#
        ));
    }

    #[test]
    fn refused_frames_keep_readable_ids() {
        let e = decode_reading(
            r#"{"type":"reading","epoch":3,"seq":9,"ts_ms":0,"meter":"m","voltage_v":"x"}"#,
            NOW,
        )
        .unwrap_err();
        assert_eq!((e.epoch, e.seq), (Some(3), Some(9)));
        let e = decode_reading(
            r#"{"type":"reading","epoch":3,"seq":9,"ts_ms":0,"meter":"m","voltage_v":-3}"#,
            NOW,
        )
        .unwrap_err();
        assert_eq!((e.epoch, e.seq), (Some(3), Some(9)));
        let e = decode_reading("garbage", NOW).unwrap_err();
        assert_eq!((e.epoch, e.seq), (None, None));
    }

    #[test]
    fn detail_is_bounded() {
        let long = format!(r#"{{"type":"reading","{}":1}}"#, "é".repeat(500));
        let e = decode_reading(&long, NOW).unwrap_err();
        assert!(e.detail.len() <= 164, "{}", e.detail.len());
    }

    #[test]
    fn round_trip() {
        let r = Reading {
            epoch: MAX_SAFE_INTEGER,
            seq: 12,
            ts_ms: NOW,
            meter: "main".into(),
            power_w: Some(-12.5),
            power_factor: Some(0.97),
            ..Default::default()
        };
        let text = r.to_json();
        assert!(text.starts_with(r#"{"type":"reading","#), "{text}");
        assert_eq!(ok(&text), r);
    }
}
