//! Energy on top of the store: the [`EnergyStore`] interface (slots for the
//! rollup endpoint, raw rows for its exact fallback, pages for the export),
//! and the backend-independent bookkeeping every backend runs inside its
//! insert transaction ([`write_batch`]) and when it rebuilds the slots
//! ([`Rebuilder`]). The rule and the slot arithmetic are pure code in
//! [`crate::energy`]; this module decides what to read and write and in
//! which order.
//!
//! ## Per commit (inside the insert's transaction)
//! 1. The state of every meter in the batch: its latest slot (the *tail*)
//!    and its latest energy reading — from the writer's cache (SQLite) or
//!    read in the transaction (PostgreSQL).
//! 2. Flags of every row ([`crate::energy::flags::reading_flags`]) against
//!    the meter's previous energy reading in `(ts, epoch, seq)` order as
//!    stored at that moment: for rows after the tail the chain runs on from
//!    the meter's last energy reading; for a late row (at or before the
//!    tail's last reading) the stored rows of its slot and the latest energy
//!    reading before that slot decide. A stored row that *follows* a late
//!    row keeps its flags (they are not rewritten; a rebuild rewrites them).
//! 3. The insert, which tells which rows were really stored (a duplicate is
//!    not, and changes nothing below).
//! 4. [`plan_commit`] over the stored rows: in-order rows are appended to
//!    the tail in memory and upserted (one row per meter and slot), the
//!    slots of late rows are recomputed from their stored rows.
//!
//! ## Rebuild
//! When the slot table is empty of limits (a database that had readings
//! before the table existed, or a fresh one) or was built with other
//! `--max-power-w`/`--max-gap-ms`, the backend streams every reading in
//! `(device_id, ts, epoch, seq)` order through a [`Rebuilder`], which
//! appends into one current slot per meter, writes a slot when the next
//! one starts, and recomputes every row's flags (only rows whose flags
//! change are updated). One transaction: a rebuild that fails leaves the
//! old slots and is tried again. The hub rebuilds on the writer's
//! connection only, while it serves; its other handles defer
//! ([`EnergyStore::defer_energy`]) and read no slots until the rebuild
//! committed.

use std::collections::HashMap;
use std::sync::Arc;

use ems_shared::Reading;

use super::{Row, StoreError};
use crate::energy::answer::{EnergyAnswer, MeterEnergy};
use crate::energy::buckets::{slot_of, Bucket, Span, SLOT_MS};
use crate::energy::flags::reading_flags;
use crate::energy::flags::FlagCounts;
use crate::energy::rule::{rollup_brute, Limits, MeterReading, ReadingKey};
use crate::energy::slots::{combine, plan_commit, Point, Slot, SlotError};

mod fleet;
mod rebuild;

pub(crate) use fleet::group_slots;
pub use fleet::{fleet_energy, DeviceEnergy, MeterSlots};
pub(crate) use rebuild::{
    walk, PagePos, PageStart, RebuildRow, RebuildSink, RebuildSource, Rebuilder,
};

/// A stored reading with its plausibility flags (the export).
#[derive(Debug, Clone, PartialEq)]
pub struct FlaggedReading {
    /// The reading as stored.
    pub reading: Reading,
    /// Its `flags` column.
    pub flags: u32,
}

impl FlaggedReading {
    /// Its place in the export's `(ts, epoch, seq)` order: where the next
    /// page starts.
    pub fn key(&self) -> crate::energy::rule::ReadingKey {
        crate::energy::rule::ReadingKey {
            ts_ms: self.reading.ts_ms,
            epoch: self.reading.epoch,
            seq: self.reading.seq,
        }
    }
}

/// What [`EnergyStore::prepare_energy`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    /// The slots already matched the limits.
    UpToDate,
    /// The slots were (re)built.
    Rebuilt {
        /// Readings streamed.
        readings: u64,
        /// Slots written.
        slots: u64,
        /// Rows whose flags changed.
        flags_changed: u64,
    },
}

/// The energy side of a store: slots kept by the writer, and what the
/// rollup and export endpoints read.
pub trait EnergyStore: Send {
    /// Sets the limits this handle works with and makes the slots agree
    /// with them, rebuilding them (logged, one transaction) when they were
    /// built with other limits or never. `flag_counts`, when given, is
    /// bumped after every commit by the flags of the rows it stored. The
    /// hub calls this on the writer's handle before it writes (its other
    /// handles call [`EnergyStore::defer_energy`]); without either call a
    /// handle works with the default limits and checks them (rebuilding if
    /// needed) at first use.
    fn prepare_energy(
        &mut self,
        limits: Limits,
        flag_counts: Option<Arc<FlagCounts>>,
    ) -> Result<Prepared, StoreError>;

    /// Sets the limits and the flag counter of this handle without
    /// touching the database, for a handle that must never wait for a
    /// rebuild (the hub's reading handles: another connection, the
    /// writer's, runs [`EnergyStore::prepare_energy`]). Until the stored
    /// slots were built with `limits`, every read of the slots fails with
    /// [`StoreError::Rebuilding`] rather than answer from incomplete
    /// slots; the export's pages (raw rows) are not affected.
    fn defer_energy(&mut self, limits: Limits, flag_counts: Option<Arc<FlagCounts>>);

    /// Whether [`EnergyStore::prepare_energy`] with `limits` is quick (a
    /// few statements): the slots already agree with them, or there are
    /// no readings to rebuild from. The hub runs such a preparation before
    /// it serves and leaves any other to the writer's task.
    fn energy_prepare_is_quick(&mut self, limits: &Limits) -> Result<bool, StoreError>;

    /// The limits of this handle.
    fn energy_limits(&self) -> Limits;

    /// The meters of a device that have readings, in id order.
    fn energy_meters(&mut self, device_id: &str) -> Result<Vec<String>, StoreError>;

    /// The slots of one meter with `start_ms <= slot < end_ms`, plus the
    /// nearest slot with an energy reading on either side (before
    /// `start_ms`, at or after `end_ms`), in order: what
    /// [`crate::energy::slots::combine`] needs for buckets covering
    /// `[start_ms, end_ms)`.
    fn energy_slots(
        &mut self,
        device_id: &str,
        meter: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Vec<Slot>, StoreError>;

    /// What [`EnergyStore::energy_slots`] answers, for every meter at once
    /// and in one query whatever their number: each meter's slots with
    /// `start_ms <= slot < end_ms` plus its nearest slot with an energy
    /// reading on either side; one entry per meter that has any, each in
    /// order ([`fleet_energy`]).
    fn fleet_slots(&mut self, start_ms: i64, end_ms: i64) -> Result<Vec<MeterSlots>, StoreError>;

    /// The stored readings of one meter with `from_ms <= ts < to_ms`, in
    /// `(ts, epoch, seq)` order, as the energy rule sees them.
    fn meter_readings(
        &mut self,
        device_id: &str,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<MeterReading>, StoreError>;

    /// One page of a device's readings with `from_ms <= ts < to_ms` in
    /// `(ts, epoch, seq)` order, starting after `after` (keyset paging:
    /// each page is one short indexed query).
    fn export_page(
        &mut self,
        device_id: &str,
        from_ms: i64,
        to_ms: i64,
        after: Option<ReadingKey>,
        limit: usize,
    ) -> Result<Vec<FlaggedReading>, StoreError>;

    /// Readings per page of this handle's slot rebuilds (the default
    /// unless set; tests set tiny pages to walk page edges).
    #[doc(hidden)]
    fn set_rebuild_page(&mut self, rows: usize);
}

/// The rollup of one device over `spans` (contiguous buckets from
/// [`crate::energy::buckets::buckets`]): one entry per meter, every bucket
/// present. Slot-aligned buckets come from the slots; buckets off the slot
/// grid (zones whose offset was not a multiple of 15 minutes, before 1980)
/// are answered exactly from the raw rows.
pub fn rollup<S: EnergyStore + ?Sized>(
    store: &mut S,
    device_id: &str,
    tz: &str,
    bucket: Bucket,
    spans: &[Span],
) -> Result<EnergyAnswer, StoreError> {
    let limits = store.energy_limits();
    let mut meters = Vec::new();
    let (Some(first), Some(last)) = (spans.first(), spans.last()) else {
        return Ok(EnergyAnswer {
            device_id: device_id.to_owned(),
            tz: tz.to_owned(),
            bucket,
            meters,
        });
    };
    // The slot range holding every bucket (wider than the buckets when
    // they are off the grid).
    let lo = slot_of(first.start_ms);
    let hi = slot_of(last.end_ms - 1) + SLOT_MS;
    for meter in store.energy_meters(device_id)? {
        let slots = store.energy_slots(device_id, &meter, lo, hi)?;
        let buckets = match combine(&slots, spans, &limits) {
            Ok(b) => b,
            Err(SlotError::Unaligned { .. }) => {
                let mut rows = store.meter_readings(device_id, &meter, lo, hi)?;
                // The edge energy readings the stored neighbours hold close
                // the pairs straddling the range (their epoch/seq do not
                // matter: they lie outside every bucket).
                let edge = |ts_ms, wh| MeterReading {
                    key: ReadingKey {
                        ts_ms,
                        epoch: 0,
                        seq: 0,
                    },
                    energy_wh: Some(wh),
                    power_w: None,
                };
                if let Some(e) = slots
                    .first()
                    .filter(|s| s.start_ms < lo)
                    .and_then(|s| s.energy)
                {
                    rows.push(edge(e.last.ts_ms, e.last.value));
                }
                if let Some(e) = slots
                    .last()
                    .filter(|s| s.start_ms >= hi)
                    .and_then(|s| s.energy)
                {
                    rows.push(edge(e.first.ts_ms, e.first.value));
                }
                rollup_brute(&rows, spans, &limits)
            }
            Err(e) => return Err(StoreError::Db(format!("energy slots: {e}"))),
        };
        meters.push(MeterEnergy { meter, buckets });
    }
    Ok(EnergyAnswer {
        device_id: device_id.to_owned(),
        tz: tz.to_owned(),
        bucket,
        meters,
    })
}

/// What the writer knows about one meter before a commit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct MeterState {
    /// The meter's latest slot (its last reading is the meter's last).
    pub tail: Option<Slot>,
    /// The meter's latest energy reading, with the slot holding it.
    pub last_energy: Option<(i64, Point)>,
}

impl MeterState {
    /// The state given the latest slot and the latest slot with energy.
    pub fn from_slots(tail: Option<Slot>, energy: Option<Slot>) -> MeterState {
        let last_energy = tail
            .and_then(|t| t.energy.map(|e| (t.start_ms, e.last)))
            .or_else(|| energy.and_then(|s| s.energy.map(|e| (s.start_ms, e.last))));
        MeterState { tail, last_energy }
    }
}

/// One meter of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct MeterKey<'a> {
    pub device_id: &'a str,
    pub meter: &'a str,
}

/// What a backend does for [`write_batch`], inside its transaction.
pub(crate) trait SlotIo {
    /// The state of each meter (same order).
    fn states(&mut self, meters: &[MeterKey<'_>]) -> Result<Vec<MeterState>, StoreError>;
    /// The stored readings of a meter in one slot, in order.
    fn slot_rows(&mut self, m: MeterKey<'_>, slot_ms: i64)
        -> Result<Vec<MeterReading>, StoreError>;
    /// The latest slot with an energy reading strictly before `slot_ms`.
    fn energy_slot_before(
        &mut self,
        m: MeterKey<'_>,
        slot_ms: i64,
    ) -> Result<Option<Slot>, StoreError>;
    /// Inserts the rows with their flags, skipping duplicates; per row,
    /// whether it was stored.
    fn insert(&mut self, rows: &[Row], flags: &[u32]) -> Result<Vec<bool>, StoreError>;
    /// Applies the slot changes.
    fn write_slots(&mut self, w: &SlotWrites<'_>) -> Result<(), StoreError>;
}

/// Slot changes of one commit.
#[derive(Debug, Default)]
pub(crate) struct SlotWrites<'a> {
    /// Slots to insert or replace.
    pub upserts: Vec<(MeterKey<'a>, Slot)>,
    /// Slots left without readings (never after an insert; kept for
    /// completeness).
    pub deletes: Vec<(MeterKey<'a>, i64)>,
    /// Meters seen for the first time.
    pub new_meters: Vec<MeterKey<'a>>,
}

/// What a commit did, for the writer's cache and the metrics (applied once
/// the transaction committed).
#[derive(Debug, Default)]
pub(crate) struct Committed {
    /// The new state of every meter of the batch.
    pub states: Vec<(Arc<str>, String, MeterState)>,
    /// Stored rows per flag bit (in [`crate::energy::flags::ALL`] order).
    pub flag_counts: [u64; 4],
}

/// The later of two energy readings known by their slots (on the same slot
/// the second wins: callers pass the fresher knowledge second).
fn later(a: Option<(i64, Point)>, b: Option<(i64, Point)>) -> Option<(i64, Point)> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.0 >= x.0 { y } else { x }),
        (x, y) => y.or(x),
    }
}

fn point_of(r: &Reading) -> Option<Point> {
    r.energy_wh.filter(|v| v.is_finite()).map(|value| Point {
        ts_ms: r.ts_ms,
        value,
    })
}

fn key_of(r: &Reading) -> ReadingKey {
    ReadingKey {
        ts_ms: r.ts_ms,
        epoch: r.epoch,
        seq: r.seq,
    }
}

/// Flags, insert and slot maintenance of one batch, inside the caller's
/// transaction (see the module docs). The caller commits and then applies
/// [`Committed`].
pub(crate) fn write_batch(
    io: &mut dyn SlotIo,
    rows: &[Row],
    limits: &Limits,
) -> Result<Committed, StoreError> {
    let (keys, mut members) = meters_of(rows);
    let states = io.states(&keys)?;
    let mut flags = vec![0u32; rows.len()];
    for ((&m, idx), state) in keys.iter().zip(members.iter_mut()).zip(&states) {
        idx.sort_by_key(|&i| key_of(&rows[i].reading));
        let tail_last = state.tail.map(|t| t.last);
        let (late, in_order): (Vec<usize>, Vec<usize>) = idx
            .iter()
            .partition(|&&i| tail_last.is_some_and(|t| key_of(&rows[i].reading) <= t));
        let carried = flag_late_rows(io, m, rows, &late, &mut flags, limits)?;
        // In-order rows: the chain runs on from the latest energy reading.
        let mut prev = later(state.last_energy, carried);
        for &i in &in_order {
            let r = &rows[i].reading;
            flags[i] = reading_flags(r, prev.map(|p| p.1), limits);
            if let Some(p) = point_of(r) {
                prev = Some((slot_of(r.ts_ms), p));
            }
        }
    }

    let stored = io.insert(rows, &flags)?;

    let mut out = Committed::default();
    let mut writes = SlotWrites::default();
    for ((&m, idx), state) in keys.iter().zip(&members).zip(&states) {
        let is_stored = |i: &&usize| stored.get(**i).copied().unwrap_or(false);
        for &i in idx.iter().filter(is_stored) {
            for (n, (bit, _)) in crate::energy::flags::ALL.iter().enumerate() {
                if flags[i] & bit != 0 {
                    out.flag_counts[n] += 1;
                }
            }
        }
        let mut inserted: Vec<MeterReading> = idx
            .iter()
            .filter(is_stored)
            .map(|&i| MeterReading::from_reading(&rows[i].reading))
            .collect();
        let row0 = &rows[idx[0]];
        let next = if inserted.is_empty() {
            *state
        } else {
            slots_after_commit(io, m, state, &mut inserted, limits, &mut writes)?
        };
        out.states
            .push((row0.device_id.clone(), row0.reading.meter.clone(), next));
    }
    io.write_slots(&writes)?;
    Ok(out)
}

/// The meters of a batch in first-seen order, each with its rows' indexes.
fn meters_of(rows: &[Row]) -> (Vec<MeterKey<'_>>, Vec<Vec<usize>>) {
    let mut index: HashMap<MeterKey<'_>, usize> = HashMap::new();
    let mut keys: Vec<MeterKey<'_>> = Vec::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let k = MeterKey {
            device_id: &row.device_id,
            meter: &row.reading.meter,
        };
        let n = *index.entry(k).or_insert_with(|| {
            keys.push(k);
            members.push(Vec::new());
            keys.len() - 1
        });
        members[n].push(i);
    }
    (keys, members)
}

/// Flags of one meter's late rows (`late`, in key order), slot by slot,
/// against the stored rows around them. Returns the latest energy reading
/// the late rows leave behind in the last slot they touched, for the
/// in-order rows to continue from.
fn flag_late_rows(
    io: &mut dyn SlotIo,
    m: MeterKey<'_>,
    rows: &[Row],
    late: &[usize],
    flags: &mut [u32],
    limits: &Limits,
) -> Result<Option<(i64, Point)>, StoreError> {
    let mut carried: Option<(i64, Point)> = None;
    let mut at = 0;
    while at < late.len() {
        let slot = slot_of(rows[late[at]].reading.ts_ms);
        let mut end = at;
        while end < late.len() && slot_of(rows[late[end]].reading.ts_ms) == slot {
            end += 1;
        }
        let batch = &late[at..end];
        at = end;
        let stored = io.slot_rows(m, slot)?;
        let mut prev = None;
        if batch.iter().any(|&i| point_of(&rows[i].reading).is_some()) {
            let before = io
                .energy_slot_before(m, slot)?
                .and_then(|s| s.energy.map(|e| (s.start_ms, e.last)));
            prev = later(before, carried);
        }
        let (mut s, mut b) = (0, 0);
        while s < stored.len() || b < batch.len() {
            let bk = batch.get(b).map(|&i| key_of(&rows[i].reading));
            let sk = stored.get(s).map(|r| r.key);
            let take_stored = match (sk, bk) {
                (Some(x), Some(y)) => x <= y,
                (Some(_), None) => true,
                _ => false,
            };
            if take_stored {
                let r = &stored[s];
                if bk == Some(r.key) {
                    // A resend of a stored row: not inserted, no flags.
                    b += 1;
                }
                if let Some(v) = r.energy() {
                    let ts_ms = r.ts_ms();
                    prev = Some((slot, Point { ts_ms, value: v }));
                }
                s += 1;
            } else {
                let i = batch[b];
                let r = &rows[i].reading;
                flags[i] = reading_flags(r, prev.map(|p| p.1), limits);
                if let Some(p) = point_of(r) {
                    prev = Some((slot, p));
                }
                b += 1;
            }
        }
        if prev.is_some_and(|p| p.0 == slot) {
            carried = prev;
        }
    }
    Ok(carried)
}

/// The slot writes of one meter's stored rows (`inserted`, not empty) and
/// the meter's state after them.
fn slots_after_commit<'a>(
    io: &mut dyn SlotIo,
    m: MeterKey<'a>,
    state: &MeterState,
    inserted: &mut [MeterReading],
    limits: &Limits,
    writes: &mut SlotWrites<'a>,
) -> Result<MeterState, StoreError> {
    let plan = plan_commit(state.tail, inserted, limits);
    let mut changed: Vec<Slot> = plan.upsert.clone();
    for &slot in &plan.recompute {
        let rows_now = io.slot_rows(m, slot)?;
        match Slot::from_readings(&rows_now, limits)
            .map_err(|e| StoreError::Db(format!("recomputing an energy slot: {e}")))?
        {
            Some(s) => changed.push(s),
            None => writes.deletes.push((m, slot)),
        }
    }
    for s in &changed {
        writes.upserts.push((m, *s));
    }
    if state.tail.is_none() {
        writes.new_meters.push(m);
    }
    let mut next = *state;
    for s in &changed {
        if next.tail.map_or(true, |t| s.start_ms >= t.start_ms) {
            next.tail = Some(*s);
        }
        if let Some(e) = s.energy {
            next.last_energy = later(next.last_energy, Some((s.start_ms, e.last)));
        } else if next.last_energy.is_some_and(|(slot, _)| slot == s.start_ms) {
            // Cannot happen (a slot never loses its readings); forget
            // rather than keep a stale point.
            next.last_energy = None;
        }
    }
    Ok(next)
}

/// The writer's per-meter state between commits (SQLite: one process owns
/// the database's writes; see the backend for how it notices another
/// connection's commit).
#[derive(Debug, Default)]
pub(crate) struct StateCache {
    by_device: HashMap<Arc<str>, HashMap<String, MeterState>>,
}

impl StateCache {
    /// The cached state of a meter.
    pub fn get(&self, m: MeterKey<'_>) -> Option<MeterState> {
        self.by_device.get(m.device_id)?.get(m.meter).copied()
    }

    /// Remembers the states of a committed batch.
    pub fn apply(&mut self, states: Vec<(Arc<str>, String, MeterState)>) {
        for (device, meter, state) in states {
            self.by_device
                .entry(device)
                .or_default()
                .insert(meter, state);
        }
    }

    /// Forgets everything (another connection wrote, or a rebuild ran).
    pub fn clear(&mut self) {
        self.by_device.clear();
    }
}

/// Energy settings and state of one store handle (default limits until
/// [`EnergyStore::prepare_energy`] sets others).
#[derive(Debug, Default)]
pub(crate) struct EnergyState {
    /// Limits of this handle.
    pub limits: Limits,
    /// Whether the slots were checked against `limits`.
    pub prepared: bool,
    /// Where to count committed flags.
    pub flag_counts: Option<Arc<FlagCounts>>,
    /// The writer's cache (SQLite only).
    pub cache: StateCache,
    /// Readings per page of a slot rebuild; 0: [`REBUILD_PAGE`].
    pub rebuild_page: usize,
    /// Set by [`EnergyStore::defer_energy`]: this handle checks the stored
    /// limits but never rebuilds.
    pub deferred: bool,
}

/// Readings per page of a slot rebuild ([`walk`]): a page is one indexed
/// query; about 3 MB of rows in memory.
pub(crate) const REBUILD_PAGE: usize = 20_000;

impl EnergyState {
    /// Readings per page of a slot rebuild.
    pub fn rebuild_page(&self) -> usize {
        match self.rebuild_page {
            0 => REBUILD_PAGE,
            n => n,
        }
    }

    /// Takes `limits` without checking the stored slots: this handle
    /// checks them when it reads slots and never rebuilds them
    /// ([`EnergyStore::defer_energy`]).
    pub fn defer(&mut self, limits: Limits, flag_counts: Option<Arc<FlagCounts>>) {
        self.limits = limits;
        self.flag_counts = flag_counts;
        self.deferred = true;
        self.prepared = false;
    }

    /// Counts the flags of a committed batch.
    pub fn count(&self, c: &Committed) {
        if let Some(counts) = &self.flag_counts {
            counts.add(&c.flag_counts);
        }
    }
}

/// Whether stored limits are the same as `limits` (bit-exact: the slots
/// were computed with exactly these).
pub(crate) fn same_limits(stored: Option<(f64, i64)>, limits: &Limits) -> bool {
    stored
        .is_some_and(|(p, g)| p.to_bits() == limits.max_power_w.to_bits() && g == limits.max_gap_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::energy::flags::{COUNTER_RESET, ENERGY_GLITCH, FREQUENCY_RANGE};
    use crate::energy::slots::build_slots;
    use std::collections::BTreeMap;

    /// An in-memory backend: rows and slots in maps, inserts dedup on
    /// (device, epoch, seq).
    #[derive(Default)]
    struct Mem {
        rows: BTreeMap<(String, String, ReadingKey), (Reading, u32)>,
        keys: std::collections::HashSet<(String, u64, u64)>,
        slots: BTreeMap<(String, String, i64), Slot>,
        meters: std::collections::BTreeSet<(String, String)>,
    }

    impl SlotIo for Mem {
        fn states(&mut self, meters: &[MeterKey<'_>]) -> Result<Vec<MeterState>, StoreError> {
            Ok(meters
                .iter()
                .map(|m| {
                    let of_meter = || {
                        self.slots
                            .iter()
                            .filter(move |((d, mt, _), _)| d == m.device_id && mt == m.meter)
                    };
                    let tail = of_meter().next_back().map(|(_, s)| *s);
                    let energy = of_meter()
                        .rfind(|(_, s)| s.energy.is_some())
                        .map(|(_, s)| *s);
                    MeterState::from_slots(tail, energy)
                })
                .collect())
        }
        fn slot_rows(
            &mut self,
            m: MeterKey<'_>,
            slot_ms: i64,
        ) -> Result<Vec<MeterReading>, StoreError> {
            Ok(self
                .rows
                .iter()
                .filter(|((d, mt, k), _)| {
                    d == m.device_id && mt == m.meter && slot_of(k.ts_ms) == slot_ms
                })
                .map(|(_, (r, _))| MeterReading::from_reading(r))
                .collect())
        }
        fn energy_slot_before(
            &mut self,
            m: MeterKey<'_>,
            slot_ms: i64,
        ) -> Result<Option<Slot>, StoreError> {
            Ok(self
                .slots
                .iter()
                .rfind(|((d, mt, s), sl)| {
                    d == m.device_id && mt == m.meter && *s < slot_ms && sl.energy.is_some()
                })
                .map(|(_, s)| *s))
        }
        fn insert(&mut self, rows: &[Row], flags: &[u32]) -> Result<Vec<bool>, StoreError> {
            Ok(rows
                .iter()
                .zip(flags)
                .map(|(row, &f)| {
                    let r = &row.reading;
                    if !self
                        .keys
                        .insert((row.device_id.to_string(), r.epoch, r.seq))
                    {
                        return false;
                    }
                    self.rows.insert(
                        (row.device_id.to_string(), r.meter.clone(), key_of(r)),
                        (r.clone(), f),
                    );
                    true
                })
                .collect())
        }
        fn write_slots(&mut self, w: &SlotWrites<'_>) -> Result<(), StoreError> {
            for (m, s) in &w.upserts {
                self.slots
                    .insert((m.device_id.into(), m.meter.into(), s.start_ms), *s);
            }
            for (m, s) in &w.deletes {
                self.slots.remove(&(m.device_id.into(), m.meter.into(), *s));
            }
            for m in &w.new_meters {
                self.meters.insert((m.device_id.into(), m.meter.into()));
            }
            Ok(())
        }
    }

    fn row(seq: u64, ts_ms: i64, energy: Option<f64>) -> Row {
        Row {
            device_id: Arc::from("d1"),
            received_at_ms: 0,
            reading: Reading {
                epoch: 1,
                seq,
                ts_ms,
                meter: "main".into(),
                energy_wh: energy,
                power_w: Some(100.0),
                ..Default::default()
            },
        }
    }

    /// Slots and flags the store would have if every row had come in
    /// order, once.
    fn from_scratch(mem: &Mem, limits: &Limits) -> (Vec<Slot>, Vec<u32>) {
        let rs: Vec<MeterReading> = mem
            .rows
            .values()
            .map(|(r, _)| MeterReading::from_reading(r))
            .collect();
        let slots = build_slots(&rs, limits).unwrap();
        let mut prev = None;
        let flags = mem
            .rows
            .values()
            .map(|(r, _)| {
                let f = reading_flags(r, prev, limits);
                if let Some(p) = point_of(r) {
                    prev = Some(p);
                }
                f
            })
            .collect();
        (slots, flags)
    }

    #[test]
    fn in_order_batches_flag_resets_and_glitches_and_keep_slots_exact() {
        let l = Limits::default();
        let mut mem = Mem::default();
        let b1 = [row(0, 0, Some(10.0)), row(1, 60_000, Some(11.0))];
        let c = write_batch(&mut mem, &b1, &l).unwrap();
        assert_eq!(c.flag_counts, [0; 4]);
        // Next batch: a reset, then a jump of 1e9 Wh in a minute.
        let b2 = [row(2, 120_000, Some(5.0)), row(3, 180_000, Some(1e9))];
        let c = write_batch(&mut mem, &b2, &l).unwrap();
        assert_eq!(c.flag_counts, [0, 0, 1, 1]);
        let stored: Vec<u32> = mem.rows.values().map(|(_, f)| *f).collect();
        assert_eq!(stored, vec![0, 0, COUNTER_RESET, ENERGY_GLITCH]);
        let (slots, flags) = from_scratch(&mem, &l);
        assert_eq!(mem.slots.values().copied().collect::<Vec<_>>(), slots);
        assert_eq!(stored, flags);
        assert_eq!(mem.meters.len(), 1);
        // A resend changes nothing and counts nothing.
        let before = mem.slots.clone();
        let c = write_batch(&mut mem, &b2, &l).unwrap();
        assert_eq!(c.flag_counts, [0; 4]);
        assert_eq!(mem.slots, before);
    }

    #[test]
    fn late_rows_recompute_their_slot_and_are_flagged_against_their_neighbours() {
        let l = Limits::default();
        let mut mem = Mem::default();
        // Two slots of readings, then a late one into the first slot that
        // goes backwards relative to its predecessor there.
        let b1 = [
            row(0, 0, Some(100.0)),
            row(2, 120_000, Some(102.0)),
            row(3, SLOT_MS + 60_000, Some(200.0)),
        ];
        write_batch(&mut mem, &b1, &l).unwrap();
        let late = [
            row(1, 60_000, Some(50.0)),
            row(4, SLOT_MS + 120_000, Some(201.0)),
        ];
        let c = write_batch(&mut mem, &late, &l).unwrap();
        assert_eq!(c.flag_counts, [0, 0, 0, 1]);
        let stored: Vec<u32> = mem.rows.values().map(|(_, f)| *f).collect();
        // The late reading is a reset against 100 Wh; the reading after it
        // (102 Wh, stored before) keeps its flags until a rebuild.
        assert_eq!(stored, vec![0, COUNTER_RESET, 0, 0, 0]);
        let (slots, flags) = from_scratch(&mem, &l);
        assert_eq!(mem.slots.values().copied().collect::<Vec<_>>(), slots);
        assert_eq!(flags, vec![0, COUNTER_RESET, 0, 0, 0]);
        // A late row into a slot before any energy: flagged against the
        // latest energy reading of an earlier slot.
        let mut mem = Mem::default();
        write_batch(
            &mut mem,
            &[row(0, 0, Some(100.0)), row(9, 3 * SLOT_MS, None)],
            &l,
        )
        .unwrap();
        let c = write_batch(&mut mem, &[row(5, 2 * SLOT_MS, Some(90.0))], &l).unwrap();
        assert_eq!(c.flag_counts, [0, 0, 0, 1]);
        // And a later in-order energy reading chains from that late one.
        let c = write_batch(&mut mem, &[row(10, 3 * SLOT_MS + 1000, Some(91.0))], &l).unwrap();
        assert_eq!(c.flag_counts, [0; 4]);
        let (slots, flags) = from_scratch(&mem, &l);
        assert_eq!(mem.slots.values().copied().collect::<Vec<_>>(), slots);
        let stored: Vec<u32> = mem.rows.values().map(|(_, f)| *f).collect();
        assert_eq!(stored, flags);
    }

    #[test]
    fn non_energy_flags_and_state_after_commit() {
        let l = Limits::default();
        let mut mem = Mem::default();
        let mut r = row(0, 0, None);
        r.reading.frequency_hz = Some(80.0);
        let c = write_batch(&mut mem, &[r], &l).unwrap();
        assert_eq!(c.flag_counts, [0, 1, 0, 0]);
        assert_eq!(mem.rows.values().next().unwrap().1, FREQUENCY_RANGE);
        let (_, _, st) = &c.states[0];
        assert!(st.tail.is_some() && st.last_energy.is_none());
    }

    #[test]
    fn limits_compare_exactly() {
        let l = Limits::default();
        assert!(same_limits(Some((1e6, 900_000)), &l));
        assert!(!same_limits(Some((1e6, 900_001)), &l));
        assert!(!same_limits(None, &l));
    }
}
