//! The energy tables on PostgreSQL: the slot rebuild, the rollup's queries
//! and the export's pages ([`EnergyStore`]). The per-commit slot upkeep is
//! in `insert.rs`.

use std::sync::{Arc, LazyLock};

use postgres::Transaction;

use super::queries::reading_of;
use super::time::{clamp_ms, PgTime};
use super::{db, PgStore, MIGRATION_LOCK_KEY};

/// The advisory lock a slot rebuild holds: not the migration's, so that
/// connections opening (and migrating) meanwhile do not wait for it.
const REBUILD_LOCK_KEY: i64 = MIGRATION_LOCK_KEY + 2;
use crate::energy::flags::FlagCounts;
use crate::energy::rule::{Limits, MeterReading, ReadingKey};
use crate::energy::slots::Slot;
use crate::store::columns::{select_columns, AFTER_MEASUREMENTS};
use crate::store::energy::{
    group_slots, same_limits, walk, EnergyStore, FlaggedReading, MeterSlots, PagePos, PageStart,
    Prepared, RebuildRow, RebuildSink, RebuildSource, Rebuilder,
};
use crate::store::StoreError;

/// Writes slots (upsert), one statement per batch (the writer's commit
/// and the rebuild).
pub(super) const UPSERT_SLOTS: &str =
    "INSERT INTO energy_slots (device_id, meter, slot_ms, has_energy, data) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::bool[], $5::bytea[]) \
     ON CONFLICT (device_id, meter, slot_ms) DO UPDATE \
     SET has_energy = excluded.has_energy, data = excluded.data";

/// Records the meters that have slots.
pub(super) const ADD_METERS: &str = "INSERT INTO energy_meters (device_id, meter) \
     SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING";

/// A meter's readings in a time range, as the energy rule sees them.
pub(super) const SLOT_READINGS: &str = "SELECT ts, epoch, seq, energy_wh, power_w FROM readings \
     WHERE device_id = $1 AND meter = $2 AND ts >= $3 AND ts < $4 ORDER BY ts, epoch, seq";

/// The latest slot with an energy reading before a slot.
pub(super) const ENERGY_SLOT_BEFORE: &str = "SELECT slot_ms, data FROM energy_slots \
     WHERE device_id = $1 AND meter = $2 AND has_energy AND slot_ms < $3 \
     ORDER BY slot_ms DESC LIMIT 1";

/// Every slot `combine` needs for `[$3, $4)` (see `crate::energy`).
///
/// No `ORDER BY` over the union: the planner sorted the range again (on
/// disk, beyond `work_mem`, for a meter-year) although the primary key
/// already yields it in order. Each branch is ordered by its index and the
/// caller sorts the (at most two) edge slots into place.
const RANGE_SLOTS: &str = "(SELECT slot_ms, data FROM energy_slots \
     WHERE device_id = $1 AND meter = $2 AND slot_ms >= $3 AND slot_ms < $4 \
     ORDER BY slot_ms) \
     UNION ALL (SELECT slot_ms, data FROM energy_slots \
     WHERE device_id = $1 AND meter = $2 AND has_energy AND slot_ms < $3 \
     ORDER BY slot_ms DESC LIMIT 1) \
     UNION ALL (SELECT slot_ms, data FROM energy_slots \
     WHERE device_id = $1 AND meter = $2 AND has_energy AND slot_ms >= $4 \
     ORDER BY slot_ms LIMIT 1)";

/// Every meter's slots `combine` needs for `[$1, $2)`: the range through
/// each meter's primary key, and the nearest slot with an energy reading
/// on either side through the partial index. No `ORDER BY`: the caller
/// groups and sorts per meter.
const FLEET_SLOTS: &str = "SELECT s.device_id, s.meter, s.slot_ms, s.data \
     FROM energy_meters AS m JOIN energy_slots AS s \
     ON s.device_id = m.device_id AND s.meter = m.meter AND s.slot_ms >= $1 AND s.slot_ms < $2 \
     UNION ALL SELECT m.device_id, m.meter, b.slot_ms, b.data FROM energy_meters AS m \
     CROSS JOIN LATERAL (SELECT e.slot_ms, e.data FROM energy_slots AS e \
      WHERE e.device_id = m.device_id AND e.meter = m.meter AND e.has_energy \
      AND e.slot_ms < $1 ORDER BY e.slot_ms DESC LIMIT 1) AS b \
     UNION ALL SELECT m.device_id, m.meter, a.slot_ms, a.data FROM energy_meters AS m \
     CROSS JOIN LATERAL (SELECT e.slot_ms, e.data FROM energy_slots AS e \
      WHERE e.device_id = m.device_id AND e.meter = m.meter AND e.has_energy \
      AND e.slot_ms >= $2 ORDER BY e.slot_ms LIMIT 1) AS a";

/// Columns of an exported reading.
static EXPORT_COLUMNS: LazyLock<String> = LazyLock::new(|| format!("{}, flags", select_columns()));

/// The readings for the rebuild's pages (see
/// `crate::store::energy::walk`): a reading's columns, then `flags`, then
/// `device_id`. Ordered by `device_id DESC, ts`, which the
/// `(device_id, ts DESC)` index yields read backwards: no sort, no
/// temporary files. After a position: the rest of its device, then the
/// devices before it, each half one index range.
fn rebuild_page_sql(cond: &str) -> String {
    let cols = format!("{}, flags, device_id", select_columns());
    if cond.is_empty() {
        return format!("SELECT {cols} FROM readings ORDER BY device_id DESC, ts LIMIT $1");
    }
    format!(
        "SELECT * FROM ((SELECT {cols} FROM readings WHERE device_id = $2 AND {cond} \
         ORDER BY ts LIMIT $1) UNION ALL (SELECT {cols} FROM readings WHERE device_id < $2 \
         ORDER BY device_id DESC, ts LIMIT $1)) AS p ORDER BY device_id DESC, ts LIMIT $1"
    )
}

static REBUILD_FIRST: LazyLock<String> = LazyLock::new(|| rebuild_page_sql(""));
static REBUILD_AT_OR_AFTER: LazyLock<String> = LazyLock::new(|| rebuild_page_sql("ts >= $3"));
static REBUILD_AFTER: LazyLock<String> = LazyLock::new(|| rebuild_page_sql("ts > $3"));
static REBUILD_AT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {}, flags, device_id FROM readings WHERE device_id = $1 AND ts = $2",
        select_columns()
    )
});

/// A stored slot.
pub(super) fn slot_from(start_ms: i64, data: &[u8]) -> Result<Slot, StoreError> {
    Slot::decode(start_ms, data).map_err(|e| StoreError::Db(format!("energy slot: {e}")))
}

/// A row of [`SLOT_READINGS`].
pub(super) fn meter_reading(r: &postgres::Row) -> Result<MeterReading, StoreError> {
    let ts: PgTime = r.try_get(0).map_err(db)?;
    let epoch: i64 = r.try_get(1).map_err(db)?;
    let seq: i64 = r.try_get(2).map_err(db)?;
    Ok(MeterReading {
        key: ReadingKey {
            ts_ms: ts.0,
            epoch: epoch as u64,
            seq: seq as u64,
        },
        energy_wh: r.try_get(3).map_err(db)?,
        power_w: r.try_get(4).map_err(db)?,
    })
}

fn flagged(r: &postgres::Row) -> Result<FlaggedReading, StoreError> {
    let flags: i32 = r.try_get(AFTER_MEASUREMENTS).map_err(db)?;
    Ok(FlaggedReading {
        reading: reading_of(r)?,
        flags: flags as u32,
    })
}

/// What a rebuild produced since the last flush.
#[derive(Default)]
struct Buffer {
    slots: Vec<(String, String, Slot)>,
    meters: Vec<(String, String)>,
    flags: Vec<(String, i64, i64, i32)>,
}

impl RebuildSink for Buffer {
    fn slot(&mut self, device_id: &str, meter: &str, slot: &Slot) -> Result<(), StoreError> {
        self.slots
            .push((device_id.to_owned(), meter.to_owned(), *slot));
        Ok(())
    }

    fn meter(&mut self, device_id: &str, meter: &str) -> Result<(), StoreError> {
        self.meters.push((device_id.to_owned(), meter.to_owned()));
        Ok(())
    }

    fn flags(
        &mut self,
        device_id: &str,
        epoch: u64,
        seq: u64,
        flags: u32,
    ) -> Result<(), StoreError> {
        self.flags
            .push((device_id.to_owned(), epoch as i64, seq as i64, flags as i32));
        Ok(())
    }
}

impl Buffer {
    /// Writes and empties the buffer.
    fn flush(&mut self, tx: &mut Transaction<'_>) -> Result<(), postgres::Error> {
        if !self.slots.is_empty() {
            let data: Vec<[u8; crate::energy::slots::SLOT_BYTES]> =
                self.slots.iter().map(|(_, _, s)| s.encode()).collect();
            let devices: Vec<&str> = self.slots.iter().map(|(d, _, _)| d.as_str()).collect();
            let meters: Vec<&str> = self.slots.iter().map(|(_, m, _)| m.as_str()).collect();
            let starts: Vec<i64> = self.slots.iter().map(|(_, _, s)| s.start_ms).collect();
            let energy: Vec<bool> = self
                .slots
                .iter()
                .map(|(_, _, s)| s.energy.is_some())
                .collect();
            let blobs: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
            tx.execute(UPSERT_SLOTS, &[&devices, &meters, &starts, &energy, &blobs])?;
            self.slots.clear();
        }
        if !self.meters.is_empty() {
            let devices: Vec<&str> = self.meters.iter().map(|(d, _)| d.as_str()).collect();
            let meters: Vec<&str> = self.meters.iter().map(|(_, m)| m.as_str()).collect();
            tx.execute(ADD_METERS, &[&devices, &meters])?;
            self.meters.clear();
        }
        if !self.flags.is_empty() {
            let devices: Vec<&str> = self.flags.iter().map(|f| f.0.as_str()).collect();
            let epochs: Vec<i64> = self.flags.iter().map(|f| f.1).collect();
            let seqs: Vec<i64> = self.flags.iter().map(|f| f.2).collect();
            let flags: Vec<i32> = self.flags.iter().map(|f| f.3).collect();
            tx.execute(
                "UPDATE readings r SET flags = f.flags \
                 FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int4[]) \
                 AS f(device_id, epoch, seq, flags) \
                 WHERE r.device_id = f.device_id AND r.epoch = f.epoch AND r.seq = f.seq",
                &[&devices, &epochs, &seqs, &flags],
            )?;
            self.flags.clear();
        }
        Ok(())
    }
}

/// The rebuild's reads and writes in its transaction.
struct Source<'a, 'b> {
    tx: &'a mut Transaction<'b>,
    buf: Buffer,
}

impl Source<'_, '_> {
    fn rows(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<RebuildRow>, StoreError> {
        self.tx
            .query(sql, params)
            .map_err(db)?
            .iter()
            .map(|r| {
                let flags: i32 = r.try_get(AFTER_MEASUREMENTS).map_err(db)?;
                Ok(RebuildRow {
                    reading: reading_of(r)?,
                    flags: flags as u32,
                    device_id: r.try_get(AFTER_MEASUREMENTS + 1).map_err(db)?,
                })
            })
            .collect()
    }
}

impl RebuildSource for Source<'_, '_> {
    fn page(
        &mut self,
        from: Option<&PagePos>,
        limit: usize,
    ) -> Result<Vec<RebuildRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        match from {
            None => self.rows(&REBUILD_FIRST, &[&limit]),
            Some(PagePos {
                device_id,
                start: PageStart::AtOrAfter(ms),
            }) => self.rows(&REBUILD_AT_OR_AFTER, &[&limit, device_id, &clamp_ms(*ms)]),
            Some(PagePos {
                device_id,
                start: PageStart::After(ms),
            }) => self.rows(&REBUILD_AFTER, &[&limit, device_id, &clamp_ms(*ms)]),
        }
    }

    fn at(&mut self, device_id: &str, ts_ms: i64) -> Result<Vec<RebuildRow>, StoreError> {
        self.rows(&REBUILD_AT, &[&device_id, &clamp_ms(ts_ms)])
    }

    fn sink(&mut self) -> &mut dyn RebuildSink {
        &mut self.buf
    }

    fn page_done(&mut self) -> Result<(), StoreError> {
        self.buf.flush(self.tx).map_err(db)
    }
}

impl PgStore {
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
        self.with(|c| {
            c.client
                .query_opt("SELECT max_power_w, max_gap_ms FROM energy_limits", &[])
                .map_err(db)?
                .map(|r| Ok((r.try_get(0).map_err(db)?, r.try_get(1).map_err(db)?)))
                .transpose()
        })
    }

    fn rebuild(
        tx: &mut Transaction<'_>,
        limits: &Limits,
        what: &str,
        page: usize,
    ) -> Result<Prepared, StoreError> {
        let stored: Option<(f64, i64)> = tx
            .query_opt(
                "SELECT max_power_w, max_gap_ms FROM energy_limits FOR UPDATE",
                &[],
            )
            .map_err(db)?
            .map(|r| Ok::<_, postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
            .transpose()
            .map_err(db)?;
        if same_limits(stored, limits) {
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
        tx.batch_execute("DELETE FROM energy_slots; DELETE FROM energy_meters")
            .map_err(db)?;
        let mut rebuild = Rebuilder::new(*limits, what);
        let mut source = Source {
            tx,
            buf: Buffer::default(),
        };
        walk(&mut rebuild, &mut source, page)?;
        tx.execute("DELETE FROM energy_limits", &[]).map_err(db)?;
        tx.execute(
            "INSERT INTO energy_limits (max_power_w, max_gap_ms) VALUES ($1, $2)",
            &[&limits.max_power_w, &limits.max_gap_ms],
        )
        .map_err(db)?;
        Ok(rebuild.finish())
    }
}

impl EnergyStore for PgStore {
    fn prepare_energy(
        &mut self,
        limits: Limits,
        flag_counts: Option<Arc<FlagCounts>>,
    ) -> Result<Prepared, StoreError> {
        self.energy.limits = limits;
        self.energy.flag_counts = flag_counts;
        self.energy.deferred = false;
        let what = format!("store {}", self.target.redacted);
        let page = self.energy.rebuild_page();
        let done = self.with(|c| {
            let mut tx = c.client.transaction().map_err(db)?;
            // Hubs starting together: one rebuilds, the others then find
            // the limits in place.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&REBUILD_LOCK_KEY])
                .map_err(db)?;
            let done = PgStore::rebuild(&mut tx, &limits, &what, page)?;
            tx.commit().map_err(db)?;
            Ok(done)
        })?;
        self.energy.prepared = true;
        Ok(done)
    }

    fn energy_prepare_is_quick(&mut self, limits: &Limits) -> Result<bool, StoreError> {
        if same_limits(self.stored_limits()?, limits) {
            return Ok(true);
        }
        let any: bool = self.with(|c| {
            c.client
                .query_one("SELECT EXISTS (SELECT 1 FROM readings)", &[])
                .and_then(|r| r.try_get(0))
                .map_err(db)
        })?;
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
        self.with(|c| {
            c.client
                .query(
                    "SELECT meter FROM energy_meters WHERE device_id = $1 ORDER BY meter",
                    &[&device_id],
                )
                .map_err(db)?
                .iter()
                .map(|r| r.try_get(0).map_err(db))
                .collect()
        })
    }

    fn energy_slots(
        &mut self,
        device_id: &str,
        meter: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Vec<Slot>, StoreError> {
        self.ensure_energy()?;
        self.with(|c| {
            let mut slots = c
                .client
                .query(RANGE_SLOTS, &[&device_id, &meter, &start_ms, &end_ms])
                .map_err(db)?
                .iter()
                .map(|r| {
                    let start: i64 = r.try_get(0).map_err(db)?;
                    let data: &[u8] = r.try_get(1).map_err(db)?;
                    slot_from(start, data)
                })
                .collect::<Result<Vec<_>, _>>()?;
            // Already in order but for the edge slots (a stable sort of a
            // nearly sorted run is linear).
            slots.sort_by_key(|s| s.start_ms);
            Ok(slots)
        })
    }

    fn fleet_slots(&mut self, start_ms: i64, end_ms: i64) -> Result<Vec<MeterSlots>, StoreError> {
        self.ensure_energy()?;
        self.with(|c| {
            let rows = c
                .client
                .query(FLEET_SLOTS, &[&start_ms, &end_ms])
                .map_err(db)?
                .iter()
                .map(|r| {
                    let device: String = r.try_get(0).map_err(db)?;
                    let meter: String = r.try_get(1).map_err(db)?;
                    let start: i64 = r.try_get(2).map_err(db)?;
                    let data: &[u8] = r.try_get(3).map_err(db)?;
                    Ok((device, meter, slot_from(start, data)?))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(group_slots(rows))
        })
    }

    fn meter_readings(
        &mut self,
        device_id: &str,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<MeterReading>, StoreError> {
        let (from, to) = (clamp_ms(from_ms), clamp_ms(to_ms));
        self.with(|c| {
            c.client
                .query(SLOT_READINGS, &[&device_id, &meter, &from, &to])
                .map_err(db)?
                .iter()
                .map(meter_reading)
                .collect()
        })
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
        let to = clamp_ms(to_ms);
        self.with(|c| {
            let rows = match after {
                None => c.client.query(
                    &format!(
                        "SELECT {} FROM readings \
                         WHERE device_id = $1 AND ts >= $2 AND ts < $3 \
                         ORDER BY ts, epoch, seq LIMIT $4",
                        *EXPORT_COLUMNS
                    ),
                    &[&device_id, &clamp_ms(from_ms), &to, &limit],
                ),
                Some(k) => c.client.query(
                    &format!(
                        "SELECT {} FROM readings \
                         WHERE device_id = $1 AND ts >= $2 AND ts < $3 \
                         AND (ts, epoch, seq) > ($2, $4, $5) \
                         ORDER BY ts, epoch, seq LIMIT $6",
                        *EXPORT_COLUMNS
                    ),
                    &[
                        &device_id,
                        &clamp_ms(k.ts_ms),
                        &to,
                        &(k.epoch as i64),
                        &(k.seq as i64),
                        &limit,
                    ],
                ),
            }
            .map_err(db)?;
            rows.iter().map(flagged).collect()
        })
    }
}
