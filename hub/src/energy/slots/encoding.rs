//! A [`Slot`] as a fixed-size little-endian record for a `BLOB`/`BYTEA`
//! column, and back.

use super::{EnergyAgg, Point, PowerAgg, Slot, SlotError};
use crate::energy::buckets::{slot_of, SLOT_MS};
use crate::energy::rule::ReadingKey;

/// Length of [`Slot::encode`]'s output.
pub const SLOT_BYTES: usize = 150;

/// First byte of an encoded slot; a new layout gets a new value.
const SLOT_FORMAT: u8 = 1;

/// Bits of the second byte of an encoded slot.
const HAS_ENERGY: u8 = 1;
const HAS_POWER: u8 = 2;

impl Slot {
    /// The slot as a fixed-size little-endian record for a `BLOB`/`BYTEA`
    /// column (the slot start is the row key and not repeated): format byte,
    /// presence bits, samples, last key, energy block, power block. Absent
    /// blocks are zeros.
    pub fn encode(&self) -> [u8; SLOT_BYTES] {
        let mut out = [0u8; SLOT_BYTES];
        let mut w = Cursor {
            buf: &mut out,
            at: 0,
        };
        w.put(&[SLOT_FORMAT]);
        let bits = if self.energy.is_some() { HAS_ENERGY } else { 0 }
            | if self.power.is_some() { HAS_POWER } else { 0 };
        w.put(&[bits]);
        w.put(&self.samples.to_le_bytes());
        w.put(&self.last.ts_ms.to_le_bytes());
        w.put(&self.last.epoch.to_le_bytes());
        w.put(&self.last.seq.to_le_bytes());
        let e = self.energy.unwrap_or(EnergyAgg {
            first: Point::default(),
            last: Point::default(),
            delta_wh: 0.0,
            covered_ms: 0,
            resets: 0,
            flagged: 0,
        });
        for p in [e.first, e.last] {
            w.put(&p.ts_ms.to_le_bytes());
            w.put(&p.value.to_le_bytes());
        }
        w.put(&e.delta_wh.to_le_bytes());
        w.put(&e.covered_ms.to_le_bytes());
        w.put(&e.resets.to_le_bytes());
        w.put(&e.flagged.to_le_bytes());
        let p = self.power.unwrap_or(PowerAgg {
            first: Point::default(),
            last: Point::default(),
            min_w: 0.0,
            max_w: 0.0,
            held_wms: 0.0,
            held_ms: 0,
        });
        for pt in [p.first, p.last] {
            w.put(&pt.ts_ms.to_le_bytes());
            w.put(&pt.value.to_le_bytes());
        }
        w.put(&p.min_w.to_le_bytes());
        w.put(&p.max_w.to_le_bytes());
        w.put(&p.held_wms.to_le_bytes());
        w.put(&p.held_ms.to_le_bytes());
        debug_assert_eq!(w.at, SLOT_BYTES);
        out
    }

    /// Reads a slot written by [`Slot::encode`] back; `start_ms` is the
    /// row's key.
    pub fn decode(start_ms: i64, bytes: &[u8]) -> Result<Slot, SlotError> {
        if bytes.len() != SLOT_BYTES {
            return Err(SlotError::BadEncoding("wrong length"));
        }
        if start_ms.rem_euclid(SLOT_MS) != 0 {
            return Err(SlotError::BadEncoding("start off the slot grid"));
        }
        let mut r = Reader { buf: bytes, at: 0 };
        if r.take::<1>()[0] != SLOT_FORMAT {
            return Err(SlotError::BadEncoding("unknown format"));
        }
        let bits = r.take::<1>()[0];
        let samples = u32::from_le_bytes(r.take());
        let last = ReadingKey {
            ts_ms: i64::from_le_bytes(r.take()),
            epoch: u64::from_le_bytes(r.take()),
            seq: u64::from_le_bytes(r.take()),
        };
        let point = |r: &mut Reader<'_>| Point {
            ts_ms: i64::from_le_bytes(r.take()),
            value: f64::from_le_bytes(r.take()),
        };
        let energy = EnergyAgg {
            first: point(&mut r),
            last: point(&mut r),
            delta_wh: f64::from_le_bytes(r.take()),
            covered_ms: i64::from_le_bytes(r.take()),
            resets: u32::from_le_bytes(r.take()),
            flagged: u32::from_le_bytes(r.take()),
        };
        let power = PowerAgg {
            first: point(&mut r),
            last: point(&mut r),
            min_w: f64::from_le_bytes(r.take()),
            max_w: f64::from_le_bytes(r.take()),
            held_wms: f64::from_le_bytes(r.take()),
            held_ms: i64::from_le_bytes(r.take()),
        };
        let slot = Slot {
            start_ms,
            samples,
            last,
            energy: (bits & HAS_ENERGY != 0).then_some(energy),
            power: (bits & HAS_POWER != 0).then_some(power),
        };
        let inside = |ts: i64| slot_of(ts) == start_ms;
        let consistent = samples > 0
            && inside(last.ts_ms)
            && slot
                .energy
                .map_or(true, |e| inside(e.first.ts_ms) && inside(e.last.ts_ms))
            && slot
                .power
                .map_or(true, |p| inside(p.first.ts_ms) && inside(p.last.ts_ms));
        if !consistent {
            return Err(SlotError::BadEncoding("readings outside the slot"));
        }
        Ok(slot)
    }
}

/// Writes fixed-size fields into an encoded slot.
struct Cursor<'a> {
    buf: &'a mut [u8; SLOT_BYTES],
    at: usize,
}

impl Cursor<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
}

/// Reads fixed-size fields from an encoded slot of checked length.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = self.buf.get(self.at..self.at + N) {
            out.copy_from_slice(src);
        }
        self.at += N;
        out
    }
}
