//! What a dashboard session needs to know about a topic frame: whether it
//! is a reading, and its `(epoch, seq)` and sample time. Pure and
//! allocation-free on the common path: it runs once per frame per
//! subscriber. (Backlog readings never reach the topic: the device session
//! counts them into `backfill` summaries, see [`super::backfill`].)

use serde::Deserialize;

/// The fields of a topic frame the session looks at. Lenient: any frame
/// that is not a reading has no `epoch`/`seq`.
#[derive(Deserialize)]
struct Meta {
    #[serde(rename = "type")]
    kind: Option<String>,
    epoch: Option<u64>,
    seq: Option<u64>,
    ts_ms: Option<i64>,
}

/// A topic frame, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// A reading: its key and sample time.
    Reading {
        /// `(epoch, seq)`.
        key: (u64, u64),
        /// Sample time.
        ts_ms: i64,
    },
    /// Anything else (status, …): forwarded as is.
    Other,
}

/// Allocation-free fast path of [`classify`] (it runs once per frame per
/// subscriber, and a serde parse with a `String` per delivery was once the
/// fan-out's largest cost). Topic frames are built by the hub: a reading
/// that passed the strict decoder (known keys only, each once, no string
/// value that can contain a quote) plus `device_id`/`rx_ms`, or a serialized
/// control frame. The keys are found by a scan; `None` (the serde path
/// decides) for anything unusual, such as escaped keys.
fn classify_fast(frame: &str) -> Option<Class> {
    let b = frame.as_bytes();
    if scan_str(b, b"\"type\"")? != b"reading" {
        return Some(Class::Other);
    }
    let epoch = u64::try_from(scan_int(b, b"\"epoch\"")?).ok()?;
    let seq = u64::try_from(scan_int(b, b"\"seq\"")?).ok()?;
    let ts_ms = scan_int(b, b"\"ts_ms\"")?;
    Some(Class::Reading {
        key: (epoch, seq),
        ts_ms,
    })
}

/// The bytes after `key` (a quoted JSON key), whitespace and the colon.
fn scan_value<'a>(b: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    // Compare only at quotes (a `windows` scan calls memcmp per byte: the
    // callgrind profile showed it).
    let mut at = 0;
    loop {
        at += b.get(at..)?.iter().position(|&c| c == b'"')?;
        if b[at..].starts_with(key) {
            break;
        }
        at += 1;
    }
    let rest = b[at + key.len()..].trim_ascii_start();
    rest.strip_prefix(b":").map(|r| r.trim_ascii_start())
}

/// A string value without escapes.
fn scan_str<'a>(b: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let v = scan_value(b, key)?.strip_prefix(b"\"")?;
    let end = v.iter().position(|&c| c == b'"' || c == b'\\')?;
    (v[end] == b'"').then(|| &v[..end])
}

/// An integer value (digits with an optional minus, ended by `,`, `}` or
/// whitespace).
fn scan_int(b: &[u8], key: &[u8]) -> Option<i64> {
    let v = scan_value(b, key)?;
    let end = v
        .iter()
        .position(|&c| !(c.is_ascii_digit() || c == b'-'))
        .unwrap_or(v.len());
    if !matches!(v.get(end), Some(b',' | b'}' | b' ' | b'\t' | b'\r' | b'\n')) {
        return None;
    }
    std::str::from_utf8(&v[..end]).ok()?.parse().ok()
}

/// Classifies a topic frame.
pub(crate) fn classify(frame: &str) -> Class {
    if let Some(c) = classify_fast(frame) {
        return c;
    }
    let Ok(m) = serde_json::from_str::<Meta>(frame) else {
        return Class::Other;
    };
    match (m.kind.as_deref(), m.epoch, m.seq, m.ts_ms) {
        (Some("reading"), Some(epoch), Some(seq), Some(ts_ms)) => Class::Reading {
            key: (epoch, seq),
            ts_ms,
        },
        _ => Class::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_classified() {
        let live = r#"{"type":"reading","epoch":1,"seq":2,"ts_ms":1000,"meter":"m","power_w":1.0,"device_id":"d","rx_ms":1500}"#;
        assert_eq!(
            classify(live),
            Class::Reading {
                key: (1, 2),
                ts_ms: 1000,
            }
        );
        assert_eq!(
            classify(r#"{"type":"status","device_id":"d","online":true,"last_seen_ms":1}"#),
            Class::Other
        );
        assert_eq!(
            classify(
                r#"{"type":"backfill","device_id":"d","count":3,"from_ts_ms":1,"to_ts_ms":2}"#
            ),
            Class::Other
        );
        assert_eq!(classify("not json"), Class::Other);
        // The fast path agrees with the serde path, spacing included, and
        // leaves what it cannot read to it.
        let spaced = "{ \"type\" : \"reading\", \"epoch\" : 1 , \"seq\":2,\"ts_ms\": -5,\"meter\":\"m\",\"power_w\":1.0,\"device_id\":\"d\",\"rx_ms\":100000}";
        assert_eq!(
            classify_fast(spaced),
            Some(Class::Reading {
                key: (1, 2),
                ts_ms: -5,
            })
        );
        assert_eq!(classify_fast(r#"{"\u0074ype":"reading"}"#), None);
        assert_eq!(classify_fast(r#"{"type":"reading","epoch":1.5}"#), None);
        assert_eq!(
            classify(r#"{"\u0074ype":"reading","epoch":1,"seq":2,"ts_ms":3}"#),
            Class::Reading {
                key: (1, 2),
                ts_ms: 3
            }
        );
        assert_eq!(
            classify_fast(r#"{"type":"status","online":true}"#),
            Some(Class::Other)
        );
        assert_eq!(classify(r#"{"type":"reading","epoch":"x"}"#), Class::Other);
    }
}
