//! Local-time buckets: the `bucket` and `tz` parameters, and the exact UTC
//! spans of the hours, days and months of a time zone.
//!
//! Time zones come from the IANA database bundled into the binary (jiff with
//! `tzdb-bundle-always` and neither `tzdb-zoneinfo` nor `tz-system`), so no
//! file of the host is read and every host answers the same.
//!
//! ## What a bucket is
//! - **day** of local date `D`: `[start(D), start(D+1))`, where `start(D)` is
//!   local midnight of `D` — the earlier one when midnight repeats, and the
//!   end of the gap when midnight falls into one (jiff's "compatible"
//!   disambiguation). A day is 23 h or 25 h on DST change days, and a date a
//!   zone skipped entirely (Pacific/Apia, 2011-12-30) has no bucket.
//! - **month**: `[start(first of month), start(first of next month))`.
//! - **hour**: an hour bucket starts at every instant at which the local
//!   wall clock shows a whole hour (`HH:00:00.000`). A repeated hour (autumn)
//!   therefore gives two buckets; a skipped hour (spring) gives none. Where a
//!   shift is not a whole hour (Australia/Lord_Howe, 30 minutes) the hour
//!   around the shift lasts 90 minutes: in spring the clock never shows
//!   02:00, so the 01:00 bucket runs until 03:00 (02:30–02:59 included); in
//!   autumn the clock shows 01:30–01:59 twice but 02:00 once, so the 01:00
//!   bucket runs 90 minutes too.
//!
//! Boundaries never sit on an offset transition unless the wall clock shows
//! a whole hour there, so a transition at 00:01 local (America/St_Johns until
//! 2011, Antarctica/Casey 2020–2022, Asia/Gaza 2010–2011) is no boundary.
//! Every boundary is thus a whole local hour under the offset in force, and
//! lies on the 15-minute UTC grid exactly when that offset is a multiple of
//! 15 minutes. In the bundled database that holds for every zone from
//! 1979-10-01 on (a test checks every zone from 1980); before, Africa/Monrovia
//! (−00:44:30 until 1972-01-07), Pacific/Kiritimati (−10:40 until
//! 1979-10-01) and the local mean times of every zone before its first
//! standard offset do not. [`Span::is_slot_aligned`] tells; the slot-based
//! rollup refuses unaligned spans and the caller answers those exactly from
//! raw rows ([`super::rule::rollup_brute`]).
//!
//! `from_ms`/`to_ms` are snapped outward: the answer is every bucket that
//! overlaps `[from_ms, to_ms)`.

use std::fmt;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::Serialize;
use thiserror::Error;

/// Length of one pre-aggregation slot: 15 minutes, aligned to UTC.
pub const SLOT_MS: i64 = 15 * 60 * 1000;

/// One hour in milliseconds.
const HOUR_MS: i64 = 3_600_000;

/// The most buckets one answer may hold (more than 11 years of hours).
pub const MAX_BUCKETS: usize = 100_000;

/// The longest time zone name accepted (the longest IANA name is 32).
const MAX_TZ_LEN: usize = 64;

/// A query parameter that cannot be used; the message names it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{param}: {detail}")]
pub struct ParamError {
    /// The parameter (`bucket`, `tz`, `from_ms`, `to_ms`).
    pub param: &'static str,
    /// What is wrong with it (never echoes more than a bounded prefix).
    pub detail: String,
}

impl ParamError {
    fn new(param: &'static str, detail: impl Into<String>) -> Self {
        ParamError {
            param,
            detail: detail.into(),
        }
    }
}

/// The length of local time one bucket covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    /// A local hour (see the module docs for DST).
    Hour,
    /// A local calendar day.
    Day,
    /// A local calendar month.
    Month,
}

impl Bucket {
    /// Parses the `bucket` parameter: `hour`, `day` or `month`.
    pub fn parse(s: &str) -> Result<Bucket, ParamError> {
        match s {
            "hour" => Ok(Bucket::Hour),
            "day" => Ok(Bucket::Day),
            "month" => Ok(Bucket::Month),
            _ => Err(ParamError::new("bucket", "must be hour, day or month")),
        }
    }

    /// The parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Hour => "hour",
            Bucket::Day => "day",
            Bucket::Month => "month",
        }
    }
}

impl fmt::Display for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A time zone from the bundled IANA database, with its canonical name.
#[derive(Debug, Clone)]
pub struct Zone {
    /// The rules.
    tz: TimeZone,
    /// The database's spelling of the name (lookup is case-insensitive).
    name: String,
}

impl Zone {
    /// Parses the `tz` parameter: an IANA name such as `Europe/Berlin` or
    /// `UTC` (case-insensitive). Fixed offsets, POSIX TZ strings and
    /// `Etc/Unknown` are refused.
    pub fn parse(s: &str) -> Result<Zone, ParamError> {
        let plausible = !s.is_empty()
            && s.len() <= MAX_TZ_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'+'));
        if !plausible {
            return Err(ParamError::new(
                "tz",
                "must be an IANA time zone name such as Europe/Berlin",
            ));
        }
        let unknown = || ParamError::new("tz", format!("unknown time zone {s:?}"));
        let tz = jiff::tz::db().get(s).map_err(|_| unknown())?;
        if tz.is_unknown() {
            return Err(unknown());
        }
        let name = tz.iana_name().unwrap_or(s).to_owned();
        Ok(Zone { tz, name })
    }

    /// Coordinated Universal Time.
    pub fn utc() -> Zone {
        Zone {
            tz: TimeZone::UTC,
            name: "UTC".to_owned(),
        }
    }

    /// The canonical IANA name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The UTC offset in force at `ms`, in milliseconds.
    pub fn offset_ms(&self, ms: i64) -> Option<i64> {
        let ts = Timestamp::from_millisecond(ms).ok()?;
        Some(i64::from(self.tz.to_offset(ts).seconds()) * 1000)
    }
}

/// A half-open UTC interval `[start_ms, end_ms)`, Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Span {
    /// First millisecond.
    pub start_ms: i64,
    /// First millisecond after.
    pub end_ms: i64,
}

impl Span {
    /// Length in milliseconds.
    pub fn len_ms(self) -> i64 {
        self.end_ms - self.start_ms
    }

    /// Whether `ms` lies inside.
    pub fn contains(self, ms: i64) -> bool {
        self.start_ms <= ms && ms < self.end_ms
    }

    /// Whether both ends lie on the 15-minute UTC slot grid.
    pub fn is_slot_aligned(self) -> bool {
        self.start_ms.rem_euclid(SLOT_MS) == 0 && self.end_ms.rem_euclid(SLOT_MS) == 0
    }
}

/// The start of the slot holding `ms`.
pub fn slot_of(ms: i64) -> i64 {
    ms - ms.rem_euclid(SLOT_MS)
}

fn ts(ms: i64, param: &'static str) -> Result<Timestamp, ParamError> {
    Timestamp::from_millisecond(ms)
        .map_err(|_| ParamError::new(param, "outside the supported time range"))
}

/// The buckets of `bucket` length in `zone` that overlap `[from_ms, to_ms)`,
/// in order, contiguous (each `end_ms` is the next `start_ms`).
/// `from_ms == to_ms` is an empty range; `from_ms > to_ms` is refused, and so
/// is a range of more than [`MAX_BUCKETS`] buckets.
pub fn buckets(
    zone: &Zone,
    bucket: Bucket,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<Span>, ParamError> {
    if from_ms > to_ms {
        return Err(ParamError::new("from_ms", "must not be after to_ms"));
    }
    ts(from_ms, "from_ms")?;
    ts(to_ms, "to_ms")?;
    if from_ms == to_ms {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut push = |span: Span| {
        if out.len() == MAX_BUCKETS {
            return Err(ParamError::new(
                "to_ms",
                format!("the range spans more than {MAX_BUCKETS} {bucket} buckets"),
            ));
        }
        out.push(span);
        Ok(())
    };
    match bucket {
        Bucket::Hour => {
            let mut start = prev_hour_boundary(&zone.tz, from_ms)?;
            while start < to_ms {
                let end = next_hour_boundary(&zone.tz, start)?;
                push(Span {
                    start_ms: start,
                    end_ms: end,
                })?;
                start = end;
            }
        }
        Bucket::Day | Bucket::Month => {
            let step = |d: Date, forward: bool| -> Result<Date, ParamError> {
                let r = match (bucket, forward) {
                    (Bucket::Month, true) => d.checked_add(1.month()),
                    (Bucket::Month, false) => d.checked_sub(1.month()),
                    (_, true) => d.tomorrow(),
                    (_, false) => d.yesterday(),
                };
                r.map_err(|_| ParamError::new("to_ms", "outside the supported time range"))
            };
            let local = zone.tz.to_datetime(ts(from_ms, "from_ms")?).date();
            let mut label = match bucket {
                Bucket::Month => local.first_of_month(),
                _ => local,
            };
            let mut start = day_start(&zone.tz, label)?;
            // A repeated evening (a fall-back across midnight) can put an
            // instant of date D before the start of D: step back until the
            // bucket really begins at or before `from_ms`.
            while start > from_ms {
                label = step(label, false)?;
                start = day_start(&zone.tz, label)?;
            }
            while start < to_ms {
                label = step(label, true)?;
                let end = day_start(&zone.tz, label)?;
                if end > start {
                    push(Span {
                        start_ms: start,
                        end_ms: end,
                    })?;
                    start = end;
                }
            }
        }
    }
    Ok(out)
}

/// The first instant of local date `date` (see the module docs).
fn day_start(tz: &TimeZone, date: Date) -> Result<i64, ParamError> {
    tz.to_ambiguous_timestamp(date.at(0, 0, 0, 0))
        .compatible()
        .map(Timestamp::as_millisecond)
        .map_err(|_| ParamError::new("to_ms", "outside the supported time range"))
}

fn offset_at(tz: &TimeZone, ms: i64) -> Result<i64, ParamError> {
    Ok(i64::from(tz.to_offset(ts(ms, "to_ms")?).seconds()) * 1000)
}

/// The latest hour boundary at or before `ms`.
fn prev_hour_boundary(tz: &TimeZone, ms: i64) -> Result<i64, ParamError> {
    let mut t = ms;
    loop {
        let off = offset_at(tz, t)?;
        let candidate = t - (t + off).rem_euclid(HOUR_MS);
        // The latest transition at or before `t` (`preceding` is strict).
        let last_change = tz
            .preceding(ts(t.saturating_add(1), "from_ms")?)
            .next()
            .map(|tr| tr.timestamp().as_millisecond());
        match last_change {
            // The offset changed after the candidate: under the offset in
            // force at `t` no whole hour shows in [change, t]; look in the
            // span before.
            Some(change) if change > candidate => t = change - 1,
            _ => return Ok(candidate),
        }
    }
}

/// The first hour boundary strictly after `ms`.
fn next_hour_boundary(tz: &TimeZone, ms: i64) -> Result<i64, ParamError> {
    let mut t = ms;
    loop {
        let off = offset_at(tz, t)?;
        let candidate = t + HOUR_MS - (t + off).rem_euclid(HOUR_MS);
        let next_change = tz
            .following(ts(t, "to_ms")?)
            .next()
            .map(|tr| tr.timestamp().as_millisecond());
        match next_change {
            Some(change) if change <= candidate => {
                // The offset changes first: the change instant is a boundary
                // if the clock shows a whole hour right there; otherwise
                // continue under the new offset.
                if (change + offset_at(tz, change)?).rem_euclid(HOUR_MS) == 0 {
                    return Ok(change);
                }
                t = change;
            }
            _ => return Ok(candidate),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = HOUR_MS;

    fn zone(name: &str) -> Zone {
        Zone::parse(name).unwrap()
    }

    /// Unix ms of an RFC 3339 instant.
    fn at(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn lens(spans: &[Span]) -> Vec<i64> {
        spans.iter().map(|s| s.len_ms()).collect()
    }

    fn assert_contiguous(spans: &[Span]) {
        for w in spans.windows(2) {
            assert_eq!(w[0].end_ms, w[1].start_ms, "{spans:?}");
        }
        for s in spans {
            assert!(s.start_ms < s.end_ms, "{s:?}");
        }
    }

    #[test]
    fn parameters_parse_and_errors_name_the_parameter() {
        assert_eq!(Bucket::parse("hour"), Ok(Bucket::Hour));
        assert_eq!(Bucket::parse("day"), Ok(Bucket::Day));
        assert_eq!(Bucket::parse("month"), Ok(Bucket::Month));
        for bad in ["", "Day", "week", "days"] {
            let e = Bucket::parse(bad).unwrap_err();
            assert_eq!(e.param, "bucket");
            assert!(e.to_string().starts_with("bucket: "), "{e}");
        }
        assert_eq!(zone("Europe/Berlin").name(), "Europe/Berlin");
        assert_eq!(zone("europe/berlin").name(), "Europe/Berlin");
        assert_eq!(zone("UTC").name(), "UTC");
        assert_eq!(zone("utc").name(), "UTC");
        assert_eq!(zone("Asia/Kathmandu").name(), "Asia/Kathmandu");
        for bad in [
            "",
            "Mars/Olympus",
            "Etc/Unknown",
            "+05:30",
            "EST5EDT,M3.2.0,M11.1.0",
            "../../etc/passwd",
            &"A/".repeat(40),
        ] {
            let e = Zone::parse(bad).unwrap_err();
            assert_eq!(e.param, "tz", "{bad:?}");
            assert!(e.to_string().starts_with("tz: "), "{e}");
        }
        let e = buckets(&Zone::utc(), Bucket::Day, 5, 4).unwrap_err();
        assert_eq!(e.param, "from_ms");
        let e = buckets(&Zone::utc(), Bucket::Day, i64::MIN, 4).unwrap_err();
        assert_eq!(e.param, "from_ms");
        let e = buckets(&Zone::utc(), Bucket::Day, 0, i64::MAX).unwrap_err();
        assert_eq!(e.param, "to_ms");
        let e = buckets(&Zone::utc(), Bucket::Hour, 0, 200_000 * H).unwrap_err();
        assert_eq!(e.param, "to_ms");
        assert!(e.detail.contains("100000 hour buckets"), "{e}");
        assert_eq!(
            buckets(&Zone::utc(), Bucket::Hour, 0, MAX_BUCKETS as i64 * H)
                .unwrap()
                .len(),
            MAX_BUCKETS
        );
    }

    #[test]
    fn the_time_zone_database_is_embedded() {
        // CI runs this module's tests once more with TZDIR=/nonexistent; the
        // build has no tzdb-zoneinfo feature, so no host file is ever read.
        let berlin = zone("Europe/Berlin");
        assert_eq!(berlin.offset_ms(at("2026-01-15T12:00:00Z")), Some(H));
        assert_eq!(berlin.offset_ms(at("2026-07-15T12:00:00Z")), Some(2 * H));
    }

    #[test]
    fn range_snaps_outward_and_empty_range_is_empty() {
        let utc = Zone::utc();
        let d = 24 * H;
        assert!(buckets(&utc, Bucket::Day, 5, 5).unwrap().is_empty());
        assert_eq!(
            buckets(&utc, Bucket::Day, d + 5, d + 6).unwrap(),
            vec![Span {
                start_ms: d,
                end_ms: 2 * d
            }]
        );
        // Exactly on boundaries: nothing extra on either side.
        let b = buckets(&utc, Bucket::Day, d, 3 * d).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!((b[0].start_ms, b[1].end_ms), (d, 3 * d));
        // One ms past a boundary pulls in the next bucket.
        assert_eq!(buckets(&utc, Bucket::Day, d, 3 * d + 1).unwrap().len(), 3);
        // Negative times (before 1970) work.
        let b = buckets(&utc, Bucket::Hour, -1, 0).unwrap();
        assert_eq!(
            b,
            vec![Span {
                start_ms: -H,
                end_ms: 0
            }]
        );
    }

    #[test]
    fn berlin_dst_days_are_23_and_25_hours() {
        let berlin = zone("Europe/Berlin");
        let spring = buckets(
            &berlin,
            Bucket::Day,
            at("2026-03-28T12:00:00Z"),
            at("2026-03-30T12:00:00Z"),
        )
        .unwrap();
        assert_eq!(lens(&spring), vec![24 * H, 23 * H, 24 * H]);
        assert_eq!(spring[1].start_ms, at("2026-03-28T23:00:00Z"));
        assert_eq!(spring[1].end_ms, at("2026-03-29T22:00:00Z"));
        let autumn = buckets(
            &berlin,
            Bucket::Day,
            at("2026-10-25T00:00:00Z"),
            at("2026-10-25T12:00:00Z"),
        )
        .unwrap();
        assert_eq!(lens(&autumn), vec![25 * H]);
        assert_eq!(autumn[0].start_ms, at("2026-10-24T22:00:00Z"));
        assert_eq!(autumn[0].end_ms, at("2026-10-25T23:00:00Z"));
    }

    #[test]
    fn berlin_hours_across_both_transitions() {
        let berlin = zone("Europe/Berlin");
        // Spring: local 02:00 never shows; 23 hour buckets of 1 h each.
        let day = buckets(
            &berlin,
            Bucket::Hour,
            at("2026-03-28T23:00:00Z"),
            at("2026-03-29T22:00:00Z"),
        )
        .unwrap();
        assert_eq!(day.len(), 23);
        assert!(day.iter().all(|s| s.len_ms() == H));
        assert_contiguous(&day);
        // 01:00 CET is 00:00Z; the next bucket is 03:00 CEST = 01:00Z.
        assert_eq!(day[1].start_ms, at("2026-03-29T00:00:00Z"));
        assert_eq!(day[2].start_ms, at("2026-03-29T01:00:00Z"));
        // Autumn: 02:00 shows twice (CEST then CET): two distinct buckets.
        let day = buckets(
            &berlin,
            Bucket::Hour,
            at("2026-10-24T22:00:00Z"),
            at("2026-10-25T23:00:00Z"),
        )
        .unwrap();
        assert_eq!(day.len(), 25);
        assert!(day.iter().all(|s| s.len_ms() == H));
        assert_eq!(day[2].start_ms, at("2026-10-25T00:00:00Z")); // 02:00 CEST
        assert_eq!(day[3].start_ms, at("2026-10-25T01:00:00Z")); // 02:00 CET
        assert_eq!(day[4].start_ms, at("2026-10-25T02:00:00Z")); // 03:00 CET
                                                                 // A range inside the repeated hour snaps to the right one of the two.
        let b = buckets(
            &berlin,
            Bucket::Hour,
            at("2026-10-25T01:10:00Z"),
            at("2026-10-25T01:20:00Z"),
        )
        .unwrap();
        assert_eq!(b[0].start_ms, at("2026-10-25T01:00:00Z"));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn half_and_quarter_hour_zones() {
        let kolkata = zone("Asia/Kolkata");
        let b = buckets(
            &kolkata,
            Bucket::Day,
            at("2026-01-01T00:00:00Z"),
            at("2026-01-01T00:00:00.001Z"),
        )
        .unwrap();
        // Local midnight of Jan 1 is 18:30Z the day before.
        assert_eq!(b[0].start_ms, at("2025-12-31T18:30:00Z"));
        assert_eq!(b[0].len_ms(), 24 * H);
        let h = buckets(
            &kolkata,
            Bucket::Hour,
            at("2026-01-01T00:00:00Z"),
            at("2026-01-01T01:00:00Z"),
        )
        .unwrap();
        assert_eq!(h[0].start_ms, at("2025-12-31T23:30:00Z"));
        assert_eq!(h.len(), 2);
        let kathmandu = zone("Asia/Kathmandu");
        let b = buckets(
            &kathmandu,
            Bucket::Day,
            at("2026-06-10T00:00:00Z"),
            at("2026-06-12T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(b[0].start_ms, at("2026-06-09T18:15:00Z"));
        assert_eq!(b[1].start_ms, at("2026-06-10T18:15:00Z"));
        assert_eq!(b.len(), 3);
        assert!(b.iter().all(|s| s.is_slot_aligned()));
        let h = buckets(
            &kathmandu,
            Bucket::Hour,
            at("2026-06-10T00:00:00Z"),
            at("2026-06-10T00:00:01Z"),
        )
        .unwrap();
        assert_eq!(h[0].start_ms, at("2026-06-09T23:15:00Z"));
        // Kathmandu moved from +05:30 to +05:45 in 1986: the day holding the
        // change is 23 h 45 min.
        let b = buckets(
            &kathmandu,
            Bucket::Day,
            at("1985-12-31T12:00:00Z"),
            at("1986-01-01T12:00:00Z"),
        )
        .unwrap();
        assert_eq!(lens(&b), vec![24 * H, 24 * H - 15 * 60_000]);
    }

    #[test]
    fn lord_howe_half_hour_dst() {
        let lh = zone("Australia/Lord_Howe");
        // 2026-04-05 02:00 +11 → 01:30 +10:30; 2026-10-04 02:00 +10:30 → 02:30 +11.
        let autumn = buckets(
            &lh,
            Bucket::Day,
            at("2026-04-04T14:00:00Z"),
            at("2026-04-04T14:00:01Z"),
        )
        .unwrap();
        assert_eq!(autumn[0].start_ms, at("2026-04-04T13:00:00Z"));
        assert_eq!(autumn[0].len_ms(), 24 * H + 30 * 60_000);
        let hours = buckets(&lh, Bucket::Hour, autumn[0].start_ms, autumn[0].end_ms).unwrap();
        assert_eq!(hours.len(), 24);
        assert_contiguous(&hours);
        // 01:00 +11 = 14:00Z runs until 02:00 +10:30 = 15:30Z.
        assert_eq!(hours[1].start_ms, at("2026-04-04T14:00:00Z"));
        assert_eq!(hours[1].len_ms(), 90 * 60_000);
        let spring = buckets(
            &lh,
            Bucket::Day,
            at("2026-10-03T14:00:00Z"),
            at("2026-10-03T14:00:01Z"),
        )
        .unwrap();
        assert_eq!(spring[0].start_ms, at("2026-10-03T13:30:00Z"));
        assert_eq!(spring[0].len_ms(), 24 * H - 30 * 60_000);
        let hours = buckets(&lh, Bucket::Hour, spring[0].start_ms, spring[0].end_ms).unwrap();
        assert_eq!(hours.len(), 23);
        // 01:00 +10:30 = 14:30Z runs until 03:00 +11 = 16:00Z.
        assert_eq!(hours[1].start_ms, at("2026-10-03T14:30:00Z"));
        assert_eq!(hours[1].len_ms(), 90 * 60_000);
        assert!(hours.iter().all(|s| s.is_slot_aligned()));
    }

    #[test]
    fn transitions_at_one_minute_past_are_no_boundaries() {
        // St. John's changed at 00:01 local until 2011 (03:31Z in spring).
        let sj = zone("America/St_Johns");
        let day = buckets(
            &sj,
            Bucket::Day,
            at("2010-03-14T12:00:00Z"),
            at("2010-03-14T12:00:01Z"),
        )
        .unwrap();
        assert_eq!(day[0].start_ms, at("2010-03-14T03:30:00Z"));
        assert_eq!(day[0].len_ms(), 23 * H);
        let hours = buckets(&sj, Bucket::Hour, day[0].start_ms, day[0].end_ms).unwrap();
        assert!(hours.iter().all(|s| s.is_slot_aligned()), "{hours:?}");
        assert_eq!(hours.len(), 23);
        // Autumn: 00:01 NDT → 23:01 NST of the day before. Midnight shows
        // twice; each whole hour the clock shows is a boundary.
        let day = buckets(
            &sj,
            Bucket::Day,
            at("2010-11-07T12:00:00Z"),
            at("2010-11-07T12:00:01Z"),
        )
        .unwrap();
        assert_eq!(day[0].start_ms, at("2010-11-07T02:30:00Z"));
        assert!(day.iter().all(|s| s.is_slot_aligned()));
        let hours = buckets(&sj, Bucket::Hour, day[0].start_ms, day[0].end_ms).unwrap();
        assert!(hours.iter().all(|s| s.is_slot_aligned()), "{hours:?}");
        assert_eq!(hours.len() as i64 * H, day[0].len_ms());
        // The instant in the repeated evening (23:30 NST of Nov 6, 03:00Z)
        // lies in the day bucket of Nov 7, which starts at 02:30Z: snapping
        // still covers it.
        let b = buckets(
            &sj,
            Bucket::Day,
            at("2010-11-07T03:00:00Z"),
            at("2010-11-07T03:00:01Z"),
        )
        .unwrap();
        assert!(b[0].start_ms <= at("2010-11-07T03:00:00Z"));
        assert!(b.last().unwrap().end_ms > at("2010-11-07T03:00:00Z"));
        assert_contiguous(&b);
    }

    #[test]
    fn months_and_utc() {
        let utc = Zone::utc();
        let m = buckets(
            &utc,
            Bucket::Month,
            at("2024-01-15T00:00:00Z"),
            at("2024-03-01T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].start_ms, at("2024-01-01T00:00:00Z"));
        assert_eq!(lens(&m), vec![31 * 24 * H, 29 * 24 * H]);
        let berlin = zone("Europe/Berlin");
        let m = buckets(
            &berlin,
            Bucket::Month,
            at("2026-01-01T00:00:00Z"),
            at("2027-01-01T00:00:00Z"),
        )
        .unwrap();
        // Local months start at 23:00Z (22:00Z in summer), so the UTC year
        // touches 13 local months: its last hour is in January 2027.
        assert_eq!(m.len(), 13);
        assert_eq!(m[0].start_ms, at("2025-12-31T23:00:00Z"));
        assert_eq!(m[2].len_ms(), 31 * 24 * H - H); // March: 23 h day
        assert_eq!(m[9].len_ms(), 31 * 24 * H + H); // October: 25 h day
        assert_contiguous(&m);
        let d = buckets(
            &utc,
            Bucket::Day,
            at("2026-03-28T00:00:00Z"),
            at("2026-11-01T00:00:00Z"),
        )
        .unwrap();
        assert!(d.iter().all(|s| s.len_ms() == 24 * H));
    }

    #[test]
    fn a_skipped_date_has_no_bucket() {
        // Samoa skipped 2011-12-30 when it moved across the date line.
        let apia = zone("Pacific/Apia");
        let b = buckets(
            &apia,
            Bucket::Day,
            at("2011-12-29T12:00:00Z"),
            at("2011-12-30T12:00:00Z"),
        )
        .unwrap();
        assert_contiguous(&b);
        let dates: Vec<String> = b
            .iter()
            .map(|s| {
                apia.tz
                    .to_datetime(Timestamp::from_millisecond(s.start_ms).unwrap())
                    .date()
                    .to_string()
            })
            .collect();
        assert_eq!(dates, vec!["2011-12-29", "2011-12-31"]);
    }

    #[test]
    fn offsets_off_the_quarter_hour_give_unaligned_buckets() {
        // Liberia kept −00:44:30 until 1972-01-07.
        let monrovia = zone("Africa/Monrovia");
        let d = buckets(
            &monrovia,
            Bucket::Day,
            at("1971-06-01T12:00:00Z"),
            at("1971-06-01T12:00:01Z"),
        )
        .unwrap();
        assert_eq!(d[0].start_ms, at("1971-06-01T00:44:30Z"));
        assert!(!d[0].is_slot_aligned());
        let d = buckets(
            &monrovia,
            Bucket::Day,
            at("1973-06-01T12:00:00Z"),
            at("1973-06-01T12:00:01Z"),
        )
        .unwrap();
        assert!(d[0].is_slot_aligned());
        // Berlin's local mean time before 1893 (+00:53:28).
        let h = buckets(
            &zone("Europe/Berlin"),
            Bucket::Hour,
            at("1880-01-01T00:00:00Z"),
            at("1880-01-01T00:00:01Z"),
        )
        .unwrap();
        assert!(!h[0].is_slot_aligned());
    }

    #[test]
    fn every_zone_has_quarter_hour_offsets_since_1980() {
        let from = Timestamp::from_second(315_532_800).unwrap(); // 1980-01-01
        let mut checked = 0;
        for name in jiff::tz::db().available() {
            let tz = TimeZone::get(name.as_str()).unwrap();
            assert_eq!(
                tz.to_offset(from).seconds() % 900,
                0,
                "{name} at 1980-01-01"
            );
            for tr in tz
                .following(from)
                .take_while(|t| t.timestamp().as_second() < 4e9 as i64)
            {
                assert_eq!(
                    tr.offset().seconds() % 900,
                    0,
                    "{name} at {}",
                    tr.timestamp()
                );
            }
            checked += 1;
        }
        assert!(
            checked > 400,
            "only {checked} zones in the bundled database"
        );
    }

    #[test]
    fn hour_buckets_tile_days_in_every_test_zone() {
        for name in [
            "UTC",
            "Europe/Berlin",
            "Asia/Kolkata",
            "Asia/Kathmandu",
            "America/St_Johns",
            "Australia/Lord_Howe",
        ] {
            let z = zone(name);
            let (from, to) = (at("2009-12-20T00:00:00Z"), at("2011-01-10T00:00:00Z"));
            let days = buckets(&z, Bucket::Day, from, to).unwrap();
            let hours = buckets(
                &z,
                Bucket::Hour,
                days[0].start_ms,
                days[days.len() - 1].end_ms,
            )
            .unwrap();
            assert_contiguous(&days);
            assert_contiguous(&hours);
            assert!(hours.iter().all(|s| s.is_slot_aligned()), "{name}");
            // Every day boundary is an hour boundary.
            let starts: std::collections::HashSet<i64> = hours.iter().map(|s| s.start_ms).collect();
            for d in &days {
                assert!(starts.contains(&d.start_ms), "{name} {d:?}");
            }
            assert!(hours
                .iter()
                .all(|s| s.len_ms() >= 30 * 60_000 && s.len_ms() <= 90 * 60_000));
        }
    }
}
