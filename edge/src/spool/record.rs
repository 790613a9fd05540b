//! The spool's on-disk record formats: one record per line.
//!
//! | format | line | written by |
//! |--------|------|------------|
//! | 1 | `<wire JSON>` | edges before checksums existed; read, never written |
//! | 2 | `2 <crc32> <record number> <wire JSON>` | every edge since |
//! | done | `D <crc32> <from> <to>` | edges that skip acknowledged records |
//!
//! The format is told by the line's first byte: `{` is format 1, `2` is
//! format 2, `D` a done range; anything else is a damaged line. A done
//! range says that records `from..to` (`to` excluded) were acknowledged
//! before they were written, so they are not in the file: the spool writes
//! only readings the hub has not acknowledged by the time of the sync, and
//! the line keeps the numbering dense (a reader tells "done" from "lost").
//! Its `<crc32>` covers `<from> <to>`. In format 2, `<crc32>` is
//! eight lower-case hex digits of the CRC-32 (IEEE 802.3, the one of zlib
//! and gzip) of everything after it and its space, `<record number> <wire
//! JSON>`, so a changed digit anywhere in the reading or its number is
//! detected. The record number makes a line self-locating: after a
//! damaged or unreadable stretch of a file the reader finds its place again
//! at the next good line.
//!
//! A format-1 line has no checksum: a reading an older edge spooled is
//! still sent, but only a damage that breaks its JSON is detected.
//! Overhead of format 2: 13 bytes plus the digits of the record number
//! (about 20 bytes, 8 % of a 242-byte reading).

/// A decoded line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line<'a> {
    /// Format 1: the wire JSON; its record number is its position.
    Plain(&'a str),
    /// Format 2: checksum verified.
    Checked {
        /// Its record number.
        rec: u64,
        /// The wire JSON.
        json: &'a str,
    },
    /// Records `from..to` are done; none of them is in the file.
    Done {
        /// First record of the range.
        from: u64,
        /// One past its last record.
        to: u64,
    },
    /// Not a valid line (bad checksum, bad syntax, unknown format).
    Damaged(&'static str),
}

/// The version tag of the current format.
const FORMAT_2: &[u8] = b"2 ";
/// The tag of a done range.
const DONE: &[u8] = b"D ";

/// Bytes of the line that [`encode`] makes for record `rec`.
pub fn encoded_len(rec: u64, json: &str) -> u64 {
    (FORMAT_2.len() + 9 + digits(rec) + 1 + json.len() + 1) as u64
}

fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Appends the format-2 line of record `rec` (with its newline) to `out`.
/// `json` must not contain a newline (wire JSON never does).
pub fn encode(rec: u64, json: &str, out: &mut Vec<u8>) {
    let body = format!("{rec} {json}");
    out.extend_from_slice(FORMAT_2);
    out.extend_from_slice(format!("{:08x} ", crc32(body.as_bytes())).as_bytes());
    out.extend_from_slice(body.as_bytes());
    out.push(b'\n');
}

/// Appends the line (with its newline) saying that records `from..to`
/// are done (`from < to`).
pub fn encode_done(from: u64, to: u64, out: &mut Vec<u8>) {
    let body = format!("{from} {to}");
    out.extend_from_slice(DONE);
    out.extend_from_slice(format!("{:08x} ", crc32(body.as_bytes())).as_bytes());
    out.extend_from_slice(body.as_bytes());
    out.push(b'\n');
}

/// Decodes one line (without its newline).
pub fn decode(line: &[u8]) -> Line<'_> {
    match line.first() {
        Some(b'{') => match std::str::from_utf8(line) {
            Ok(json) => Line::Plain(json),
            Err(_) => Line::Damaged("not UTF-8"),
        },
        Some(_) if line.starts_with(FORMAT_2) => decode_checked(&line[FORMAT_2.len()..]),
        Some(_) if line.starts_with(DONE) => decode_done(&line[DONE.len()..]),
        _ => Line::Damaged("unknown record format"),
    }
}

fn decode_done(rest: &[u8]) -> Line<'_> {
    let Some(body) = verified(rest) else {
        return Line::Damaged("checksum mismatch");
    };
    let mut parts = body.split(' ');
    match (
        parts.next().and_then(|f| f.parse::<u64>().ok()),
        parts.next().and_then(|t| t.parse::<u64>().ok()),
        parts.next(),
    ) {
        (Some(from), Some(to), None) if from < to => Line::Done { from, to },
        _ => Line::Damaged("bad done range"),
    }
}

/// The text after `<crc32> ` if the checksum matches it.
fn verified(rest: &[u8]) -> Option<&str> {
    let (Some(crc), Some(b' ')) = (rest.get(..8), rest.get(8)) else {
        return None;
    };
    let body = &rest[9..];
    let crc = std::str::from_utf8(crc)
        .ok()
        .and_then(|h| u32::from_str_radix(h, 16).ok());
    if crc != Some(crc32(body)) {
        return None;
    }
    std::str::from_utf8(body).ok()
}

fn decode_checked(rest: &[u8]) -> Line<'_> {
    let (Some(crc), Some(b' ')) = (rest.get(..8), rest.get(8)) else {
        return Line::Damaged("truncated checksum");
    };
    let body = &rest[9..];
    let crc = std::str::from_utf8(crc)
        .ok()
        .and_then(|h| u32::from_str_radix(h, 16).ok());
    if crc != Some(crc32(body)) {
        return Line::Damaged("checksum mismatch");
    }
    let Ok(body) = std::str::from_utf8(body) else {
        return Line::Damaged("not UTF-8");
    };
    let Some((rec, json)) = body.split_once(' ') else {
        return Line::Damaged("no record number");
    };
    match rec.parse() {
        Ok(rec) => Line::Checked { rec, json },
        Err(_) => Line::Damaged("bad record number"),
    }
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as zlib's
/// `crc32()`.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The ack watermark file's content: `2 <crc32> <value, 20 digits>` and a
/// newline, always 32 bytes, so it can be overwritten in place (no new
/// block needed on a full disk). An older edge wrote the bare number.
pub fn encode_watermark(value: u64) -> [u8; 32] {
    let digits = format!("{value:020}");
    let text = format!("2 {:08x} {digits}\n", crc32(digits.as_bytes()));
    let mut out = [b'\n'; 32];
    out.copy_from_slice(&text.as_bytes()[..32]);
    out
}

/// Reads a watermark file's content: `None` if it is damaged.
pub fn decode_watermark(text: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(text)
        .ok()?
        .trim_end_matches(['\n', '\0']);
    match text.split(' ').collect::<Vec<_>>().as_slice() {
        // The format of older edges: the bare number, no checksum.
        [old] => old.parse().ok(),
        ["2", crc, digits] => {
            let crc = u32::from_str_radix(crc, 16).ok()?;
            (crc == crc32(digits.as_bytes()))
                .then(|| digits.parse().ok())
                .flatten()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_standard_one() {
        // The check value of CRC-32/ISO-HDLC (zlib, gzip, PNG).
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
    }

    #[test]
    fn lines_round_trip_and_every_change_is_caught() {
        let json = r#"{"type":"reading","epoch":7,"seq":3,"ts_ms":1,"meter":"m","power_w":2.0}"#;
        let mut line = Vec::new();
        encode(41, json, &mut line);
        assert_eq!(line.len() as u64, encoded_len(41, json));
        assert_eq!(line.last(), Some(&b'\n'));
        let line = &line[..line.len() - 1];
        assert_eq!(decode(line), Line::Checked { rec: 41, json });
        // Any single changed byte is refused (never decoded as another value).
        for i in 0..line.len() {
            let mut bad = line.to_vec();
            bad[i] ^= 0x01;
            assert!(
                matches!(decode(&bad), Line::Damaged(_)),
                "byte {i} changed: {:?}",
                decode(&bad)
            );
        }
        assert!(matches!(decode(b""), Line::Damaged(_)));
        assert!(matches!(decode(&[0; 40]), Line::Damaged(_)));
        assert!(matches!(decode(b"3 whatever"), Line::Damaged(_)));
    }

    #[test]
    fn done_ranges_round_trip_and_every_change_is_caught() {
        let mut line = Vec::new();
        encode_done(120, 4711, &mut line);
        assert_eq!(line.last(), Some(&b'\n'));
        let line = &line[..line.len() - 1];
        assert_eq!(
            decode(line),
            Line::Done {
                from: 120,
                to: 4711
            }
        );
        for i in 0..line.len() {
            let mut bad = line.to_vec();
            bad[i] ^= 0x01;
            assert!(
                matches!(decode(&bad), Line::Damaged(_)),
                "byte {i} changed: {:?}",
                decode(&bad)
            );
        }
        // An empty or reversed range is not a done range.
        let mut empty = Vec::new();
        encode_done(5, 5, &mut empty);
        assert!(matches!(
            decode(&empty[..empty.len() - 1]),
            Line::Damaged(_)
        ));
    }

    #[test]
    fn format_1_lines_are_read_as_they_are() {
        let json = r#"{"type":"reading","epoch":7,"seq":3,"ts_ms":1,"meter":"m","power_w":2.0}"#;
        assert_eq!(decode(json.as_bytes()), Line::Plain(json));
    }

    #[test]
    fn watermark_round_trips_and_damage_is_refused() {
        let w = encode_watermark(1234);
        assert_eq!(w.len(), 32);
        assert_eq!(decode_watermark(&w), Some(1234));
        assert_eq!(decode_watermark(b"77\n"), Some(77));
        assert_eq!(decode_watermark(b"garbage\n"), None);
        assert_eq!(decode_watermark(&[0; 32]), None);
        let text = String::from_utf8(w.to_vec()).unwrap();
        let bad = text.replacen("1234", "9234", 1);
        assert_eq!(decode_watermark(bad.as_bytes()), None);
    }
}
