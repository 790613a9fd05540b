//! Export encoders: CSV rows (RFC 4180 quoting, `\n` line ends) and JSON
//! Lines, written straight into any [`Write`] — a reusable `Vec<u8>` chunk
//! buffer for a streamed HTTP body, or a `BufWriter<Stdout>` for the CLI.
//! Nothing is allocated per row.
//!
//! Columns: [`CSV_HEADER`]. `ts` is RFC 3339 UTC with milliseconds
//! (`2026-03-29T01:00:00.000Z`); an absent measurement is an empty cell (CSV)
//! or an absent key (JSONL, as on the wire and in the history API). A
//! non-finite number (which validation never lets in) is written as absent;
//! so is `ts` for an instant outside years 0000–9999.

use std::io::{self, Write};
use std::sync::LazyLock;

use ems_shared::{Measured, Measurement, Reading};
use serde::ser::{Serialize, SerializeMap, Serializer};

/// The CSV header row (without the line end): the key columns, one column
/// per measurement in the order of [`Measurement::ALL`], then `flags`.
pub static CSV_HEADER: LazyLock<String> = LazyLock::new(|| {
    let mut h = String::from("device_id,meter,ts_ms,ts,epoch,seq");
    for m in Measurement::ALL {
        h.push(',');
        h.push_str(m.name());
    }
    h.push_str(",flags");
    h
});

/// One exported reading.
#[derive(Debug, Clone, Copy)]
pub struct ExportRow<'a> {
    /// The device that sent it.
    pub device_id: &'a str,
    /// The stored reading.
    pub reading: &'a Reading,
    /// Its plausibility flags ([`super::flags`]).
    pub flags: u32,
}

/// Writes the header row and its line end.
pub fn write_csv_header(out: &mut impl Write) -> io::Result<()> {
    out.write_all(CSV_HEADER.as_bytes())?;
    out.write_all(b"\n")
}

/// Writes one row and its line end.
pub fn write_csv_row(out: &mut impl Write, row: &ExportRow<'_>) -> io::Result<()> {
    let r = row.reading;
    write_field(out, row.device_id)?;
    out.write_all(b",")?;
    write_field(out, &r.meter)?;
    write!(out, ",{},", r.ts_ms)?;
    let mut ts = [0u8; TS_LEN];
    if let Some(s) = rfc3339_ms(r.ts_ms, &mut ts) {
        out.write_all(s.as_bytes())?;
    }
    write!(out, ",{},{}", r.epoch, r.seq)?;
    for v in measurements(r) {
        out.write_all(b",")?;
        if let Some(v) = v.filter(|v| v.is_finite()) {
            write!(out, "{v}")?;
        }
    }
    writeln!(out, ",{}", row.flags)
}

/// Writes one JSON object and `\n`.
pub fn write_jsonl_row(out: &mut impl Write, row: &ExportRow<'_>) -> io::Result<()> {
    serde_json::to_writer(&mut *out, row).map_err(io::Error::other)?;
    out.write_all(b"\n")
}

/// The measurement columns in header order.
fn measurements(r: &Reading) -> [Option<f64>; Measurement::COUNT] {
    Measurement::ALL.map(|m| r.get(m))
}

impl Serialize for ExportRow<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.reading;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("device_id", self.device_id)?;
        m.serialize_entry("meter", &r.meter)?;
        m.serialize_entry("ts_ms", &r.ts_ms)?;
        let mut ts = [0u8; TS_LEN];
        if let Some(t) = rfc3339_ms(r.ts_ms, &mut ts) {
            m.serialize_entry("ts", t)?;
        }
        m.serialize_entry("epoch", &r.epoch)?;
        m.serialize_entry("seq", &r.seq)?;
        for (k, v) in Measurement::ALL.iter().zip(measurements(r)) {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                m.serialize_entry(k.name(), &v)?;
            }
        }
        m.serialize_entry("flags", &self.flags)?;
        m.end()
    }
}

/// A CSV field, quoted when it holds a comma, quote, CR or LF (quotes
/// doubled inside).
fn write_field(out: &mut impl Write, s: &str) -> io::Result<()> {
    if !s.bytes().any(|b| matches!(b, b',' | b'"' | b'\r' | b'\n')) {
        return out.write_all(s.as_bytes());
    }
    out.write_all(b"\"")?;
    for (i, part) in s.split('"').enumerate() {
        if i > 0 {
            out.write_all(b"\"\"")?;
        }
        out.write_all(part.as_bytes())?;
    }
    out.write_all(b"\"")
}

/// Length of `YYYY-MM-DDTHH:MM:SS.mmmZ`.
const TS_LEN: usize = 24;

/// Formats `ms` as RFC 3339 UTC with milliseconds into `buf`; `None`
/// outside years 0000–9999.
pub fn rfc3339_ms(ms: i64, buf: &mut [u8; TS_LEN]) -> Option<&str> {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (y, mo, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        return None;
    }
    let fields: [(usize, i64, usize); 7] = [
        (0, y, 4),
        (5, mo, 2),
        (8, d, 2),
        (11, in_day / 3_600_000, 2),
        (14, in_day / 60_000 % 60, 2),
        (17, in_day / 1000 % 60, 2),
        (20, in_day % 1000, 3),
    ];
    *buf = *b"0000-00-00T00:00:00.000Z";
    for (at, mut v, width) in fields {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    std::str::from_utf8(buf).ok()
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Reading {
        Reading {
            epoch: 7,
            seq: 42,
            ts_ms: 1_774_746_000_123,
            meter: "main".into(),
            voltage_v: Some(230.1),
            current_a: Some(-4.2),
            power_w: Some(960.5),
            energy_wh: Some(1_523_400.0),
            frequency_hz: Some(50.02),
            power_factor: Some(0.96),
            reactive_power_var: Some(0.0),
            ..Default::default()
        }
    }

    fn csv(rows: &[ExportRow<'_>]) -> String {
        let mut buf = Vec::new();
        write_csv_header(&mut buf).unwrap();
        for r in rows {
            write_csv_row(&mut buf, r).unwrap();
        }
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn header_is_exact() {
        assert_eq!(
            *CSV_HEADER,
            "device_id,meter,ts_ms,ts,epoch,seq,voltage_v,current_a,power_w,energy_wh,\
             frequency_hz,power_factor,reactive_power_var,flags"
        );
    }

    #[test]
    fn rows_with_all_and_with_absent_measurements() {
        let a = full();
        let b = Reading {
            voltage_v: None,
            current_a: None,
            energy_wh: None,
            frequency_hz: None,
            power_factor: None,
            reactive_power_var: None,
            ts_ms: 0,
            ..full()
        };
        let out = csv(&[
            ExportRow {
                device_id: "d1",
                reading: &a,
                flags: 0,
            },
            ExportRow {
                device_id: "d1",
                reading: &b,
                flags: 10,
            },
        ]);
        assert_eq!(
            out,
            "device_id,meter,ts_ms,ts,epoch,seq,voltage_v,current_a,power_w,energy_wh,\
             frequency_hz,power_factor,reactive_power_var,flags\n\
             d1,main,1774746000123,2026-03-29T01:00:00.123Z,7,42,230.1,-4.2,960.5,1523400,50.02,0.96,0,0\n\
             d1,main,0,1970-01-01T00:00:00.000Z,7,42,,,960.5,,,,,10\n"
        );
    }

    #[test]
    fn fields_are_quoted_when_needed() {
        let r = Reading {
            meter: "a\"b".into(),
            ..full()
        };
        let out = csv(&[ExportRow {
            device_id: "x,y\nz",
            reading: &r,
            flags: 0,
        }]);
        let line = out.lines().skip(1).collect::<Vec<_>>().join("\n");
        assert!(
            line.starts_with("\"x,y\nz\",\"a\"\"b\",1774746000123,"),
            "{line}"
        );
        let mut buf = Vec::new();
        write_field(&mut buf, "\"").unwrap();
        assert_eq!(buf, b"\"\"\"\"");
    }

    #[test]
    fn non_finite_numbers_are_written_as_absent() {
        let r = Reading {
            power_w: Some(f64::NAN),
            energy_wh: Some(f64::INFINITY),
            ..full()
        };
        let row = ExportRow {
            device_id: "d1",
            reading: &r,
            flags: 0,
        };
        let out = csv(&[row]);
        assert!(out.contains(",230.1,-4.2,,,50.02,"), "{out}");
        let mut buf = Vec::new();
        write_jsonl_row(&mut buf, &row).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert!(v.get("power_w").is_none() && v.get("energy_wh").is_none());
    }

    #[test]
    fn jsonl_rows() {
        let a = full();
        let b = Reading {
            voltage_v: None,
            current_a: None,
            energy_wh: None,
            frequency_hz: None,
            power_factor: None,
            reactive_power_var: None,
            ..full()
        };
        let mut buf = Vec::new();
        for (r, flags) in [(&a, 1), (&b, 0)] {
            write_jsonl_row(
                &mut buf,
                &ExportRow {
                    device_id: "d1",
                    reading: r,
                    flags,
                },
            )
            .unwrap();
        }
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "{\"device_id\":\"d1\",\"meter\":\"main\",\"ts_ms\":1774746000123,\
             \"ts\":\"2026-03-29T01:00:00.123Z\",\"epoch\":7,\"seq\":42,\"voltage_v\":230.1,\
             \"current_a\":-4.2,\"power_w\":960.5,\"energy_wh\":1523400.0,\"frequency_hz\":50.02,\
             \"power_factor\":0.96,\"reactive_power_var\":0.0,\"flags\":1}\n\
             {\"device_id\":\"d1\",\"meter\":\"main\",\"ts_ms\":1774746000123,\
             \"ts\":\"2026-03-29T01:00:00.123Z\",\"epoch\":7,\"seq\":42,\"power_w\":960.5,\
             \"flags\":0}\n"
        );
    }

    #[test]
    fn timestamps_match_jiff() {
        let mut buf = [0u8; TS_LEN];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut samples = vec![
            0,
            -1,
            86_399_999,
            951_782_400_000,     // 2000-02-29
            -62_167_219_200_000, // 0000-01-01
        ];
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Within jiff's range (which stops a day short of year 10000).
            samples.push((x % 315_569_000_000_000) as i64 - 62_167_219_200_000);
        }
        for ms in samples {
            let want = format!("{:.3}", jiff::Timestamp::from_millisecond(ms).unwrap());
            assert_eq!(rfc3339_ms(ms, &mut buf), Some(want.as_str()), "{ms}");
        }
        assert_eq!(
            rfc3339_ms(253_402_300_799_999, &mut buf),
            Some("9999-12-31T23:59:59.999Z")
        );
        assert_eq!(rfc3339_ms(253_402_300_800_000, &mut buf), None);
        assert_eq!(rfc3339_ms(-62_167_219_200_001, &mut buf), None);
    }
}
