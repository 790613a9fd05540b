//! The slot rebuild: every stored reading streamed in key order through
//! a [`Rebuilder`], which writes each meter's slots and rewrites the flags
//! that change (see the parent module's docs).

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
