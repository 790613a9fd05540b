//! The slot rebuild: every stored reading streamed in key order through
//! a [`Rebuilder`], which writes each meter's slots and rewrites the flags
//! that change (see the parent module's docs), and [`walk`], which reads
//! the readings for it in bounded pages from a [`RebuildSource`].
//!
//! ## Why pages in `(device_id, ts)` order
//! One `ORDER BY device_id, ts, epoch, seq` over the whole table let
//! PostgreSQL choose a sequential scan and an external sort: temporary
//! files about as large as the table. [`walk`] asks only for what the
//! `(device_id, ts)` index yields in order — the readings after a
//! `(device_id, ts)` position, a bounded page at a time — and puts
//! readings with the same `ts` into `(epoch, seq)` order itself. A page
//! spans as many devices as fit in it: the number of queries follows the
//! number of readings, not of devices (a fleet of devices with a few
//! readings each is a few queries, not a few per device). A page that ends
//! inside a run of equal timestamps leaves that run to the next page
//! (asked from that timestamp on); a run longer than a page is read on its
//! own ([`RebuildSource::at`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ems_shared::Reading;

use super::{point_of, Prepared};
use crate::energy::flags::reading_flags;
use crate::energy::rule::{Limits, MeterReading};
use crate::energy::slots::{Point, Slot};
use crate::store::StoreError;

/// One stored reading as a rebuild streams it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RebuildRow {
    /// The device.
    pub device_id: String,
    /// The reading.
    pub reading: Reading,
    /// Its stored flags.
    pub flags: u32,
}

/// Where a rebuild sends what it produced.
pub(crate) trait RebuildSink {
    /// A finished slot of a meter.
    fn slot(&mut self, device_id: &str, meter: &str, slot: &Slot) -> Result<(), StoreError>;
    /// A meter that has readings.
    fn meter(&mut self, device_id: &str, meter: &str) -> Result<(), StoreError>;
    /// A row whose flags must change.
    fn flags(
        &mut self,
        device_id: &str,
        epoch: u64,
        seq: u64,
        flags: u32,
    ) -> Result<(), StoreError>;
}

/// Where [`walk`] reads the stored readings from.
pub(crate) trait RebuildSource {
    /// Up to `limit` readings after `from` (`None`: from the first): the
    /// rows of `from`'s device from its position on, then the devices
    /// after it. Each device's rows come together, ordered by `ts` (equal
    /// `ts` in any order); devices come in the source's own fixed order
    /// (ascending or descending `device_id`).
    fn page(&mut self, from: Option<&PagePos>, limit: usize)
        -> Result<Vec<RebuildRow>, StoreError>;
    /// Every reading of `device_id` at `ts_ms` (in any order).
    fn at(&mut self, device_id: &str, ts_ms: i64) -> Result<Vec<RebuildRow>, StoreError>;
    /// Where the rows pushed go.
    fn sink(&mut self) -> &mut dyn RebuildSink;
    /// Called after each page was pushed (a backend may write what its
    /// sink buffered).
    fn page_done(&mut self) -> Result<(), StoreError>;
}

/// Where a page starts: a device and a position in its readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PagePos {
    /// The device the page starts in.
    pub device_id: String,
    /// Where in that device's readings.
    pub start: PageStart,
}

/// Where a page starts in a device's readings: at or after a timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PageStart {
    /// `ts >= ms`.
    AtOrAfter(i64),
    /// `ts > ms`.
    After(i64),
}

/// Pushes every stored reading through `rebuild`, each device's in
/// `(ts, epoch, seq)` order, reading at most about `page` rows at a time
/// (see the module docs).
pub(crate) fn walk(
    rebuild: &mut Rebuilder,
    src: &mut dyn RebuildSource,
    page: usize,
) -> Result<(), StoreError> {
    let page = page.max(1);
    let mut from: Option<PagePos> = None;
    loop {
        let mut rows = src.page(from.as_ref(), page)?;
        let next = match rows.last() {
            Some(last) if rows.len() >= page => {
                // The run of the last timestamp may go on: next page.
                let (device_id, ts) = (last.device_id.clone(), last.reading.ts_ms);
                let run = rows
                    .iter()
                    .rev()
                    .take_while(|r| r.device_id == device_id && r.reading.ts_ms == ts)
                    .count();
                let cut = rows.len() - run;
                if cut == 0 {
                    // One timestamp fills the page: read it whole.
                    rows = src.at(&device_id, ts)?;
                    Some(PagePos {
                        device_id,
                        start: PageStart::After(ts),
                    })
                } else {
                    rows.truncate(cut);
                    Some(PagePos {
                        device_id,
                        start: PageStart::AtOrAfter(ts),
                    })
                }
            }
            _ => None,
        };
        // Each device's rows in key order; stable and linear on a sorted
        // run: only ties move.
        for group in rows.chunk_by_mut(|a, b| a.device_id == b.device_id) {
            group.sort_by_key(|r| (r.reading.ts_ms, r.reading.epoch, r.reading.seq));
        }
        for row in rows {
            rebuild.push(row, src.sink())?;
        }
        src.page_done()?;
        match next {
            Some(p) => from = Some(p),
            None => break,
        }
    }
    rebuild.flush(src.sink())?;
    src.page_done()
}

/// Streams a device's readings in `(ts, epoch, seq)` order into slots and
/// flags; devices one after another (see the module docs).
pub(crate) struct Rebuilder {
    limits: Limits,
    device: Option<String>,
    /// Per meter of the current device: the open slot and the last energy
    /// reading.
    meters: HashMap<String, (Slot, Option<Point>)>,
    pub readings: u64,
    pub slots: u64,
    pub flags_changed: u64,
    started: Instant,
    last_log: Instant,
    what: String,
}

/// Interval between progress lines of a rebuild.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

impl Rebuilder {
    /// A rebuild with `limits`; `what` names the store in progress lines.
    pub fn new(limits: Limits, what: &str) -> Rebuilder {
        let now = Instant::now();
        Rebuilder {
            limits,
            device: None,
            meters: HashMap::new(),
            readings: 0,
            slots: 0,
            flags_changed: 0,
            started: now,
            last_log: now,
            what: what.to_owned(),
        }
    }

    /// Takes the next row (rows of one device together, each device's in
    /// order).
    pub fn push(&mut self, row: RebuildRow, sink: &mut dyn RebuildSink) -> Result<(), StoreError> {
        if self.device.as_deref() != Some(row.device_id.as_str()) {
            self.flush(sink)?;
            self.device = Some(row.device_id.clone());
        }
        self.readings += 1;
        let r = &row.reading;
        let mr = MeterReading::from_reading(r);
        let entry = self.meters.get_mut(r.meter.as_str());
        let prev_energy = entry.as_ref().and_then(|(_, e)| *e);
        let flags = reading_flags(r, prev_energy, &self.limits);
        if flags != row.flags {
            sink.flags(&row.device_id, r.epoch, r.seq, flags)?;
            self.flags_changed += 1;
        }
        match entry {
            Some((slot, last_energy)) => {
                match slot.append(&mr, &self.limits) {
                    Ok(()) => {}
                    Err(crate::energy::slots::AppendRefused::LaterSlot) => {
                        sink.slot(&row.device_id, &r.meter, slot)?;
                        self.slots += 1;
                        *slot = Slot::start(&mr);
                    }
                    Err(crate::energy::slots::AppendRefused::NotAfterLast) => {
                        return Err(StoreError::Db(
                            "rebuilding energy slots: readings not in (ts, epoch, seq) order"
                                .into(),
                        ))
                    }
                }
                if let Some(p) = point_of(r) {
                    *last_energy = Some(p);
                }
            }
            None => {
                sink.meter(&row.device_id, &r.meter)?;
                self.meters
                    .insert(r.meter.clone(), (Slot::start(&mr), point_of(r)));
            }
        }
        if self.readings % 65_536 == 0 && self.last_log.elapsed() >= PROGRESS_EVERY {
            self.last_log = Instant::now();
            log::info!(
                "{}: rebuilding energy slots: {} readings, {} slots so far ({:.0} s)",
                self.what,
                self.readings,
                self.slots,
                self.started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }

    /// Writes the open slots of the current device.
    pub fn flush(&mut self, sink: &mut dyn RebuildSink) -> Result<(), StoreError> {
        if let Some(device) = self.device.take() {
            let mut open: Vec<(String, (Slot, Option<Point>))> = self.meters.drain().collect();
            open.sort_by(|a, b| a.0.cmp(&b.0));
            for (meter, (slot, _)) in open {
                sink.slot(&device, &meter, &slot)?;
                self.slots += 1;
            }
        }
        Ok(())
    }

    /// The summary once every row was pushed and [`Rebuilder::flush`]ed.
    pub fn finish(&self) -> Prepared {
        log::info!(
            "{}: energy slots rebuilt: {} readings, {} slots, {} flags changed in {:.1} s",
            self.what,
            self.readings,
            self.slots,
            self.flags_changed,
            self.started.elapsed().as_secs_f64()
        );
        Prepared::Rebuilt {
            readings: self.readings,
            slots: self.slots,
            flags_changed: self.flags_changed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything a sink was told, in order.
    #[derive(Default, Debug, PartialEq)]
    struct Log(Vec<String>);

    impl RebuildSink for Log {
        fn slot(&mut self, device_id: &str, meter: &str, slot: &Slot) -> Result<(), StoreError> {
            self.0.push(format!("slot {device_id} {meter} {slot:?}"));
            Ok(())
        }
        fn meter(&mut self, device_id: &str, meter: &str) -> Result<(), StoreError> {
            self.0.push(format!("meter {device_id} {meter}"));
            Ok(())
        }
        fn flags(&mut self, d: &str, epoch: u64, seq: u64, flags: u32) -> Result<(), StoreError> {
            self.0.push(format!("flags {d} {epoch} {seq} {flags}"));
            Ok(())
        }
    }

    /// A table of rows answering pages like the backends: by `ts` only,
    /// equal timestamps in reverse key order (the worst case for the
    /// walker).
    struct Table {
        rows: Vec<RebuildRow>,
        log: Log,
        pages: usize,
        largest: usize,
    }

    impl Table {
        fn of(&self, device_id: &str) -> Vec<RebuildRow> {
            let mut rows: Vec<RebuildRow> = self
                .rows
                .iter()
                .filter(|r| r.device_id == device_id)
                .cloned()
                .collect();
            rows.sort_by_key(|r| {
                (
                    r.reading.ts_ms,
                    std::cmp::Reverse((r.reading.epoch, r.reading.seq)),
                )
            });
            rows
        }
    }

    impl RebuildSource for Table {
        fn page(
            &mut self,
            from: Option<&PagePos>,
            limit: usize,
        ) -> Result<Vec<RebuildRow>, StoreError> {
            self.pages += 1;
            let mut ids: Vec<String> = self.rows.iter().map(|r| r.device_id.clone()).collect();
            ids.sort();
            ids.dedup();
            let rows: Vec<RebuildRow> = ids
                .iter()
                .flat_map(|d| self.of(d))
                .filter(|r| match from {
                    None => true,
                    Some(p) if r.device_id != p.device_id => r.device_id > p.device_id,
                    Some(p) => match p.start {
                        PageStart::AtOrAfter(ms) => r.reading.ts_ms >= ms,
                        PageStart::After(ms) => r.reading.ts_ms > ms,
                    },
                })
                .take(limit)
                .collect();
            self.largest = self.largest.max(rows.len());
            Ok(rows)
        }
        fn at(&mut self, device_id: &str, ts_ms: i64) -> Result<Vec<RebuildRow>, StoreError> {
            Ok(self
                .of(device_id)
                .into_iter()
                .filter(|r| r.reading.ts_ms == ts_ms)
                .collect())
        }
        fn sink(&mut self) -> &mut dyn RebuildSink {
            &mut self.log
        }
        fn page_done(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn row(device: &str, meter: &str, seq: u64, ts_ms: i64, wh: f64, flags: u32) -> RebuildRow {
        RebuildRow {
            device_id: device.into(),
            reading: Reading {
                epoch: 1,
                seq,
                ts_ms,
                meter: meter.into(),
                energy_wh: Some(wh),
                power_w: Some(100.0),
                ..Default::default()
            },
            flags,
        }
    }

    /// Two devices, two meters; runs of equal timestamps shorter and
    /// longer than a page, a counter reset, stale flags.
    fn rows() -> Vec<RebuildRow> {
        let mut out = Vec::new();
        let mut seq = 0;
        for device in ["b", "a"] {
            let mut ts = 1_700_000_000_000;
            let mut wh = 10.0;
            for i in 0..300u64 {
                ts += match i % 50 {
                    10..=14 => 0, // a run of 6 equal timestamps
                    20..=40 => 0, // a run of 22
                    _ => 7_000,
                };
                wh = if i == 200 { 1.0 } else { wh + 0.5 };
                let meter = if i % 3 == 0 { "pv" } else { "main" };
                out.push(row(device, meter, seq, ts, wh, (i % 7 == 0) as u32));
                seq += 1;
            }
        }
        out
    }

    /// What one pass over every row in key order gives.
    fn expected(rows: &[RebuildRow]) -> (Log, Prepared) {
        let mut sorted = rows.to_vec();
        sorted.sort_by(|a, b| {
            (
                &a.device_id,
                a.reading.ts_ms,
                a.reading.epoch,
                a.reading.seq,
            )
                .cmp(&(
                    &b.device_id,
                    b.reading.ts_ms,
                    b.reading.epoch,
                    b.reading.seq,
                ))
        });
        let mut log = Log::default();
        let mut r = Rebuilder::new(Limits::default(), "test");
        for row in sorted {
            r.push(row, &mut log).unwrap();
        }
        r.flush(&mut log).unwrap();
        let done = r.finish();
        (log, done)
    }

    #[test]
    fn paged_walk_equals_one_pass_in_key_order() {
        let rows = rows();
        let (want, want_done) = expected(&rows);
        assert!(want.0.iter().any(|l| l.starts_with("flags")));
        for page in [1, 2, 3, 5, 7, 21, 22, 23, 100, 10_000] {
            let mut t = Table {
                rows: rows.clone(),
                log: Log::default(),
                pages: 0,
                largest: 0,
            };
            let mut r = Rebuilder::new(Limits::default(), "test");
            walk(&mut r, &mut t, page).unwrap();
            assert_eq!(t.log, want, "page {page}");
            assert_eq!(r.finish(), want_done, "page {page}");
            assert!(t.largest <= page, "page {page}: {} rows read", t.largest);
            if page < 100 {
                assert!(t.pages >= 10, "page {page}: {} pages", t.pages);
            }
        }
    }

    #[test]
    fn empty_table_builds_nothing() {
        let mut t = Table {
            rows: Vec::new(),
            log: Log::default(),
            pages: 0,
            largest: 0,
        };
        let mut r = Rebuilder::new(Limits::default(), "test");
        walk(&mut r, &mut t, 10).unwrap();
        assert!(t.log.0.is_empty());
        assert_eq!(t.pages, 1);
    }

    #[test]
    fn pages_span_devices_so_queries_follow_readings_not_devices() {
        let rows: Vec<RebuildRow> = (0..1000)
            .map(|i| row(&format!("dev-{i:04}"), "main", 0, 1_700_000_000_000, 1.0, 0))
            .collect();
        let (want, _) = expected(&rows);
        let mut t = Table {
            rows,
            log: Log::default(),
            pages: 0,
            largest: 0,
        };
        let mut r = Rebuilder::new(Limits::default(), "test");
        walk(&mut r, &mut t, 300).unwrap();
        assert_eq!(t.log, want);
        // 1,000 readings in pages of 300 (each page gives up its last run
        // of equal timestamps to the next): 4 pages, not 1,000.
        assert!(t.pages <= 5, "{} pages", t.pages);
    }
}
