//! The energy tables on SQLite: the slot rebuild, the rollup's queries and
//! the export's pages ([`EnergyStore`]). The per-commit slot upkeep is in
//! `insert.rs`.

use std::sync::{Arc, LazyLock};

use rusqlite::{params, Transaction, TransactionBehavior};

use super::queries::reading_of;
use super::{db, SqliteStore};
use crate::energy::flags::FlagCounts;
use crate::energy::rule::{Limits, MeterReading, ReadingKey};
use crate::energy::slots::Slot;
use crate::store::columns::{select_columns, AFTER_MEASUREMENTS};
use crate::store::energy::{
    group_slots, same_limits, walk, EnergyStore, FlaggedReading, MeterSlots, PagePos, PageStart,
    Prepared, RebuildRow, RebuildSink, RebuildSource, Rebuilder,
};
use crate::store::StoreError;

/// The latest slot of a meter.
pub(super) const TAIL: &str = "SELECT slot_ms, data FROM energy_slots \
     WHERE device_id = ?1 AND meter = ?2 ORDER BY slot_ms DESC LIMIT 1";

/// The latest slot with an energy reading before a slot.
pub(super) const SLOT_BEFORE: &str = "SELECT slot_ms, data FROM energy_slots \
     WHERE device_id = ?1 AND meter = ?2 AND has_energy AND slot_ms < ?3 \
     ORDER BY slot_ms DESC LIMIT 1";

/// A meter's readings in a time range, as the energy rule sees them.
pub(super) const SLOT_READINGS: &str = "SELECT ts, epoch, seq, energy_wh, power_w FROM readings \
     WHERE device_id = ?1 AND meter = ?2 AND ts >= ?3 AND ts < ?4 ORDER BY ts, epoch, seq";

/// Every slot `combine` needs for `[?3, ?4)` (see `crate::energy`). No
/// outer `ORDER BY`: the range comes in primary-key order, and merging the
/// three parts in SQL made the read about half as slow again (a
/// meter-year's 35,040 slots in the `sqlite3` shell: ~33 against ~22 ms);
/// the caller sorts the (at most two) edge slots into place.
const RANGE_SLOTS: &str = "SELECT slot_ms, data FROM energy_slots \
     WHERE device_id = ?1 AND meter = ?2 AND slot_ms >= ?3 AND slot_ms < ?4 \
     UNION ALL SELECT * FROM (SELECT slot_ms, data FROM energy_slots \
     WHERE device_id = ?1 AND meter = ?2 AND has_energy AND slot_ms < ?3 \
     ORDER BY slot_ms DESC LIMIT 1) \
     UNION ALL SELECT * FROM (SELECT slot_ms, data FROM energy_slots \
     WHERE device_id = ?1 AND meter = ?2 AND has_energy AND slot_ms >= ?4 \
     ORDER BY slot_ms LIMIT 1)";

/// Every meter's slots `combine` needs for `[?1, ?2)`: the range through
/// each meter's primary key, and the nearest slot with an energy reading
/// on either side through the partial index.
const FLEET_SLOTS: &str = "SELECT s.device_id, s.meter, s.slot_ms, s.data \
     FROM energy_meters AS m JOIN energy_slots AS s \
     ON s.device_id = m.device_id AND s.meter = m.meter AND s.slot_ms >= ?1 AND s.slot_ms < ?2 \
     UNION ALL SELECT s.device_id, s.meter, s.slot_ms, s.data \
     FROM energy_meters AS m JOIN energy_slots AS s \
     ON s.device_id = m.device_id AND s.meter = m.meter AND s.slot_ms = \
     (SELECT max(e.slot_ms) FROM energy_slots AS e WHERE e.device_id = m.device_id \
      AND e.meter = m.meter AND e.has_energy AND e.slot_ms < ?1) \
     UNION ALL SELECT s.device_id, s.meter, s.slot_ms, s.data \
     FROM energy_meters AS m JOIN energy_slots AS s \
     ON s.device_id = m.device_id AND s.meter = m.meter AND s.slot_ms = \
     (SELECT min(e.slot_ms) FROM energy_slots AS e WHERE e.device_id = m.device_id \
      AND e.meter = m.meter AND e.has_energy AND e.slot_ms >= ?2)";

/// Columns of an exported reading: a reading's, then `flags`.
static EXPORT_COLUMNS: LazyLock<String> = LazyLock::new(|| format!("{}, flags", select_columns()));

/// The readings for the rebuild's pages (see
/// `crate::store::energy::walk`): a reading's columns, then `flags`, then
/// `device_id`. Ordered by `(device_id, ts)`, which the `(device_id, ts)`
/// index yields: no sorter; a row-value bound starts the index scan at
/// the page's position.
fn rebuild_page_sql(cond: &str) -> String {
    format!(
        "SELECT {}, flags, device_id FROM readings {cond} ORDER BY device_id, ts LIMIT ?1",
        select_columns()
    )
}

static REBUILD_FIRST: LazyLock<String> = LazyLock::new(|| rebuild_page_sql(""));
static REBUILD_AT_OR_AFTER: LazyLock<String> =
    LazyLock::new(|| rebuild_page_sql("WHERE (device_id, ts) >= (?2, ?3)"));
static REBUILD_AFTER: LazyLock<String> =
    LazyLock::new(|| rebuild_page_sql("WHERE (device_id, ts) > (?2, ?3)"));
static REBUILD_AT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {}, flags, device_id FROM readings WHERE device_id = ?1 AND ts = ?2",
        select_columns()
    )
});

/// A row of [`SLOT_READINGS`].
pub(super) fn decode_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MeterReading> {
    Ok(MeterReading {
        key: ReadingKey {
            ts_ms: r.get(0)?,
            epoch: r.get::<_, i64>(1)? as u64,
            seq: r.get::<_, i64>(2)? as u64,
        },
        energy_wh: r.get(3)?,
        power_w: r.get(4)?,
    })
}

fn flagged(r: &rusqlite::Row<'_>) -> rusqlite::Result<FlaggedReading> {
    Ok(FlaggedReading {
        reading: reading_of(r)?,
        flags: r.get::<_, i64>(AFTER_MEASUREMENTS)? as u32,
    })
}

impl SqliteStore {
    /// Checks the slots against this handle's limits once (rebuilding
    /// them if needed, unless the handle defers to another connection:
    /// then [`StoreError::Rebuilding`] until they match).
    pub(super) fn ensure_energy(&mut self) -> Result<(), StoreError> {
        if !self.energy.prepared {
            let limits = self.energy.limits;
            if self.energy.deferred {
                if !same_limits(self.stored_limits()?, &limits) {
                    return Err(StoreError::Rebuilding);
                }
                self.energy.prepared = true;
                return Ok(());
            }
            let counts = self.energy.flag_counts.clone();
            self.prepare_energy(limits, counts)?;
        }
        Ok(())
    }

    /// The limits the stored slots were built with.
    fn stored_limits(&mut self) -> Result<Option<(f64, i64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT max_power_w, max_gap_ms FROM energy_limits LIMIT 1")
            .map_err(db)?;
        let mut rows = stmt.query([]).map_err(db)?;
        match rows.next().map_err(db)? {
            Some(r) => Ok(Some((r.get(0).map_err(db)?, r.get(1).map_err(db)?))),
            None => Ok(None),
        }
    }

    fn label(&self) -> String {
        format!("store sqlite:{}", self.conn.path().unwrap_or(""))
    }
}

/// Writes what a rebuild produces into the open transaction.
struct Sink<'a> {
    tx: &'a Transaction<'a>,
}

impl RebuildSink for Sink<'_> {
    fn slot(&mut self, device_id: &str, meter: &str, slot: &Slot) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(
                "INSERT INTO energy_slots (device_id, meter, slot_ms, has_energy, data) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(db)?
            .execute(params![
                device_id,
                meter,
                slot.start_ms,
                slot.energy.is_some(),
                &slot.encode()[..]
            ])
            .map_err(db)?;
        Ok(())
    }

    fn meter(&mut self, device_id: &str, meter: &str) -> Result<(), StoreError> {
        self.tx
            .prepare_cached("INSERT INTO energy_meters (device_id, meter) VALUES (?1, ?2)")
            .map_err(db)?
            .execute(params![device_id, meter])
            .map_err(db)?;
        Ok(())
    }

    fn flags(
        &mut self,
        device_id: &str,
        epoch: u64,
        seq: u64,
        flags: u32,
    ) -> Result<(), StoreError> {
        // Into a side table: changing `readings` while a statement scans it
        // is not defined in SQLite; applied after the scan.
        self.tx
            .prepare_cached(
                "INSERT INTO temp.energy_flag_fix (device_id, epoch, seq, flags) \
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .map_err(db)?
            .execute(params![device_id, epoch as i64, seq as i64, flags])
            .map_err(db)?;
        Ok(())
    }
}

impl Sink<'_> {
    fn rows(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<RebuildRow>, StoreError> {
        let mut stmt = self.tx.prepare_cached(sql).map_err(db)?;
        let rows = stmt
            .query_map(params, |r| {
                Ok(RebuildRow {
                    reading: reading_of(r)?,
                    flags: r.get::<_, i64>(AFTER_MEASUREMENTS)? as u32,
                    device_id: r.get(AFTER_MEASUREMENTS + 1)?,
                })
            })
            .map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
    }
}

impl RebuildSource for Sink<'_> {
    fn page(
        &mut self,
        from: Option<&PagePos>,
        limit: usize,
    ) -> Result<Vec<RebuildRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        match from {
            None => self.rows(&REBUILD_FIRST, params![limit]),
            Some(PagePos {
                device_id,
                start: PageStart::AtOrAfter(ms),
            }) => self.rows(&REBUILD_AT_OR_AFTER, params![limit, device_id, ms]),
            Some(PagePos {
                device_id,
                start: PageStart::After(ms),
            }) => self.rows(&REBUILD_AFTER, params![limit, device_id, ms]),
        }
    }

    fn at(&mut self, device_id: &str, ts_ms: i64) -> Result<Vec<RebuildRow>, StoreError> {
        self.rows(&REBUILD_AT, params![device_id, ts_ms])
    }

    fn sink(&mut self) -> &mut dyn RebuildSink {
        self
    }

    fn page_done(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

impl EnergyStore for SqliteStore {
    fn prepare_energy(
        &mut self,
        limits: Limits,
        flag_counts: Option<Arc<FlagCounts>>,
    ) -> Result<Prepared, StoreError> {
        self.energy.limits = limits;
        self.energy.flag_counts = flag_counts;
        self.energy.deferred = false;
        let what = self.label();
        let page = self.energy.rebuild_page();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let stored: Option<(f64, i64)> = {
            let mut stmt = tx
                .prepare("SELECT max_power_w, max_gap_ms FROM energy_limits LIMIT 1")
                .map_err(db)?;
            let mut rows = stmt.query([]).map_err(db)?;
            match rows.next().map_err(db)? {
                Some(r) => Some((r.get(0).map_err(db)?, r.get(1).map_err(db)?)),
                None => None,
            }
        };
        if same_limits(stored, &limits) {
            tx.commit().map_err(db)?;
            self.energy.prepared = true;
            return Ok(Prepared::UpToDate);
        }
        match stored {
            Some((p, g)) => log::info!(
                "{what}: energy slots were built with --max-power-w {p} --max-gap-ms {g}; \
                 rebuilding for {} and {}",
                limits.max_power_w,
                limits.max_gap_ms
            ),
            None => log::info!("{what}: building the energy slots and flags of stored readings"),
        }
        tx.execute_batch(
            "DELETE FROM energy_slots; DELETE FROM energy_meters; DELETE FROM energy_limits;
             CREATE TEMP TABLE IF NOT EXISTS energy_flag_fix (
                 device_id TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
                 flags INTEGER NOT NULL);
             DELETE FROM temp.energy_flag_fix;",
        )
        .map_err(db)?;
        let mut rebuild = Rebuilder::new(limits, &what);
        walk(&mut rebuild, &mut Sink { tx: &tx }, page)?;
        tx.execute_batch(
            "UPDATE readings SET flags = f.flags FROM temp.energy_flag_fix AS f \
             WHERE readings.device_id = f.device_id AND readings.epoch = f.epoch \
             AND readings.seq = f.seq;
             DELETE FROM temp.energy_flag_fix;",
        )
        .map_err(db)?;
        tx.execute(
            "INSERT INTO energy_limits (max_power_w, max_gap_ms) VALUES (?1, ?2)",
            params![limits.max_power_w, limits.max_gap_ms],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        self.energy.cache.clear();
        self.energy.prepared = true;
        Ok(rebuild.finish())
    }

    fn energy_prepare_is_quick(&mut self, limits: &Limits) -> Result<bool, StoreError> {
        if same_limits(self.stored_limits()?, limits) {
            return Ok(true);
        }
        let any: bool = self
            .conn
            .query_row("SELECT EXISTS (SELECT 1 FROM readings)", [], |r| r.get(0))
            .map_err(db)?;
        Ok(!any)
    }

    fn defer_energy(&mut self, limits: Limits, flag_counts: Option<Arc<FlagCounts>>) {
        self.energy.defer(limits, flag_counts);
    }

    fn set_rebuild_page(&mut self, rows: usize) {
        self.energy.rebuild_page = rows;
    }

    fn energy_limits(&self) -> Limits {
        self.energy.limits
    }

    fn energy_meters(&mut self, device_id: &str) -> Result<Vec<String>, StoreError> {
        self.ensure_energy()?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT meter FROM energy_meters WHERE device_id = ?1 ORDER BY meter")
            .map_err(db)?;
        let rows = stmt.query_map([device_id], |r| r.get(0)).map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<String>>>().map_err(db)
    }

    fn energy_slots(
        &mut self,
        device_id: &str,
        meter: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Vec<Slot>, StoreError> {
        self.ensure_energy()?;
        let mut stmt = self.conn.prepare_cached(RANGE_SLOTS).map_err(db)?;
        let mut rows = stmt
            .query(params![device_id, meter, start_ms, end_ms])
            .map_err(db)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(db)? {
            let start: i64 = r.get(0).map_err(db)?;
            let data = r
                .get_ref(1)
                .map_err(db)?
                .as_blob()
                .map_err(|e| db(e.into()))?;
            out.push(
                Slot::decode(start, data)
                    .map_err(|e| StoreError::Db(format!("energy slot: {e}")))?,
            );
        }
        // In order but for the edge slots (a stable sort of a nearly
        // sorted run is linear).
        out.sort_by_key(|s| s.start_ms);
        Ok(out)
    }

    fn fleet_slots(&mut self, start_ms: i64, end_ms: i64) -> Result<Vec<MeterSlots>, StoreError> {
        self.ensure_energy()?;
        let mut stmt = self.conn.prepare_cached(FLEET_SLOTS).map_err(db)?;
        let mut rows = stmt.query(params![start_ms, end_ms]).map_err(db)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(db)? {
            let device: String = r.get(0).map_err(db)?;
            let meter: String = r.get(1).map_err(db)?;
            let start: i64 = r.get(2).map_err(db)?;
            let data = r
                .get_ref(3)
                .map_err(db)?
                .as_blob()
                .map_err(|e| db(e.into()))?;
            let slot = Slot::decode(start, data)
                .map_err(|e| StoreError::Db(format!("energy slot: {e}")))?;
            out.push((device, meter, slot));
        }
        Ok(group_slots(out))
    }

    fn meter_readings(
        &mut self,
        device_id: &str,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<MeterReading>, StoreError> {
        let mut stmt = self.conn.prepare_cached(SLOT_READINGS).map_err(db)?;
        let rows = stmt
            .query_map(params![device_id, meter, from_ms, to_ms], decode_row)
            .map_err(db)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
    }

    fn export_page(
        &mut self,
        device_id: &str,
        from_ms: i64,
        to_ms: i64,
        after: Option<ReadingKey>,
        limit: usize,
    ) -> Result<Vec<FlaggedReading>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match after {
            None => {
                let mut stmt = self
                    .conn
                    .prepare_cached(&format!(
                        "SELECT {} FROM readings \
                         WHERE device_id = ?1 AND ts >= ?2 AND ts < ?3 \
                         ORDER BY ts, epoch, seq LIMIT ?4",
                        *EXPORT_COLUMNS
                    ))
                    .map_err(db)?;
                let rows = stmt
                    .query_map(params![device_id, from_ms, to_ms, limit], flagged)
                    .map_err(db)?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            }
            Some(k) => {
                let mut stmt = self
                    .conn
                    .prepare_cached(&format!(
                        "SELECT {} FROM readings \
                         WHERE device_id = ?1 AND ts >= ?2 AND ts < ?3 \
                         AND (ts > ?2 OR (epoch, seq) > (?4, ?5)) \
                         ORDER BY ts, epoch, seq LIMIT ?6",
                        *EXPORT_COLUMNS
                    ))
                    .map_err(db)?;
                let rows = stmt
                    .query_map(
                        params![
                            device_id,
                            k.ts_ms,
                            to_ms,
                            k.epoch as i64,
                            k.seq as i64,
                            limit
                        ],
                        flagged,
                    )
                    .map_err(db)?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            }
        };
        rows.map_err(db)
    }
}
