//! Energy you can bill on: counter-aware rollups in local time, their
//! pre-aggregation, plausibility flags and the export encoders — all pure
//! code, no I/O; the store and the HTTP layer call into it.
//!
//! ## Layout
//! - [`buckets`]: the `bucket` and `tz` parameters, the IANA database
//!   bundled into the binary, and the exact UTC spans of local hours, days
//!   and months (DST, half- and quarter-hour zones, `from_ms`/`to_ms`
//!   snapped outward).
//! - [`rule`]: the energy rule (pairs, resets, glitches, gaps, coverage,
//!   time-weighted power) as a brute-force reference, [`rule::rollup_brute`].
//! - [`slots`]: 15-minute UTC slots — the in-order append path for the
//!   writer, recomputation from raw rows for late readings, the per-commit
//!   plan, the stored encoding, and [`slots::combine`], which turns slots
//!   into local buckets with the same answer as the reference.
//! - [`flags`]: the bits of the `flags` column.
//! - [`csv`]: CSV and JSON Lines row encoders for the export.
//! - [`answer`]: the JSON answer of the energy endpoint.
//!
//! ## Why slots hold no straddling pair
//! A slot aggregates the pairs whose two readings both lie in it and keeps
//! its first and last energy and power readings; a pair that crosses a slot
//! edge is evaluated by `combine` from the neighbouring slots' edge
//! readings. So a slot depends on its own readings only: an in-order
//! reading updates one slot, a late reading dirties exactly the slot it
//! lands in, and a duplicate the store ignores dirties nothing.
//!
//! ## Storage (for the store backends)
//! One row per (device, meter, slot) that has readings. SQLite:
//!
//! ```sql
//! CREATE TABLE energy_slots (
//!     device_id  TEXT    NOT NULL,
//!     meter      TEXT    NOT NULL,
//!     slot_ms    INTEGER NOT NULL,      -- multiple of 900000
//!     has_energy INTEGER NOT NULL,      -- 0/1: the slot has an energy reading
//!     data       BLOB    NOT NULL,      -- Slot::encode(), SLOT_BYTES long
//!     PRIMARY KEY (device_id, meter, slot_ms)
//! ) WITHOUT ROWID;
//! CREATE TABLE energy_meters (          -- every meter that has slots
//!     device_id TEXT NOT NULL, meter TEXT NOT NULL,
//!     PRIMARY KEY (device_id, meter)
//! ) WITHOUT ROWID;
//! CREATE TABLE energy_limits (          -- the limits the slots were built with
//!     max_power_w REAL NOT NULL, max_gap_ms INTEGER NOT NULL
//! );
//! ```
//!
//! PostgreSQL: the same with `BIGINT`, `BOOLEAN`, `BYTEA` and
//! `DOUBLE PRECISION`, primary keys as above (a plain table also under
//! TimescaleDB: a meter-year is 35,040 rows).
//!
//! **Writer, in the insert's transaction**, per (device, meter) among the
//! rows the store *actually inserted* (SQLite: `changes()` of each `INSERT
//! OR IGNORE`; PostgreSQL: `… ON CONFLICT DO NOTHING RETURNING epoch, seq`):
//! 1. `tail` = the meter's latest slot (`ORDER BY slot_ms DESC LIMIT 1`; a
//!    per-meter cache in the writer saves the read).
//! 2. [`slots::plan_commit`]`(tail, inserted, limits)`.
//! 3. Upsert every `plan.upsert` slot (`INSERT … ON CONFLICT (device_id,
//!    meter, slot_ms) DO UPDATE SET has_energy = excluded.has_energy, data =
//!    excluded.data`).
//! 4. For each `plan.recompute` slot: `SELECT ts, epoch, seq, energy_wh,
//!    power_w FROM readings WHERE device_id = ? AND meter = ? AND ts >= ?slot
//!    AND ts < ?slot + 900000 ORDER BY ts, epoch, seq` →
//!    [`slots::Slot::from_readings`] → upsert, or delete the row on `None`.
//! 5. `INSERT … ON CONFLICT DO NOTHING` into `energy_meters` for a meter
//!    seen for the first time (`tail` was `None`).
//!
//! In-order readings cost one upsert per meter and commit; a backfill after
//! days offline costs one 15-minute row scan per touched slot.
//!
//! **Limits and migration.** Slots depend on `--max-power-w` and
//! `--max-gap-ms`. When the store opens with limits that differ from
//! `energy_limits`, or on the migration that creates the tables for an
//! existing database, it rebuilds: stream `readings` of each device in
//! `(ts, epoch, seq)` order (the `(device_id, ts)` index), keep one current
//! slot per meter, [`slots::Slot::append`], write a slot when the next
//! starts.
//!
//! ## The endpoint's query
//! Per meter of `energy_meters` for the device, one statement returns every
//! slot `combine` needs — the slots inside the snapped range `[s, e)` and the
//! nearest slot with energy on either side (they close the pairs that
//! straddle the range's edges):
//!
//! ```sql
//! SELECT slot_ms, data FROM energy_slots
//!  WHERE device_id = ?1 AND meter = ?2 AND slot_ms >= ?3 AND slot_ms < ?4
//! UNION ALL SELECT * FROM (SELECT slot_ms, data FROM energy_slots
//!  WHERE device_id = ?1 AND meter = ?2 AND slot_ms < ?3 AND has_energy
//!  ORDER BY slot_ms DESC LIMIT 1)
//! UNION ALL SELECT * FROM (SELECT slot_ms, data FROM energy_slots
//!  WHERE device_id = ?1 AND meter = ?2 AND slot_ms >= ?4 AND has_energy
//!  ORDER BY slot_ms LIMIT 1)
//! ORDER BY slot_ms
//! ```
//!
//! (PostgreSQL orders the first branch and the caller sorts the two edge
//! slots into place instead of the outer `ORDER BY`, which made the planner
//! sort a meter-year of slots again.) Then [`slots::Slot::decode`] each row
//! and [`slots::combine`]. If a
//! bucket is not on the slot grid (zones whose offset is not a multiple of
//! 15 minutes: Africa/Monrovia before 1972, Pacific/Kiritimati before
//! 1979-10, local mean times), `combine` answers [`slots::SlotError::Unaligned`]
//! and the endpoint answers exactly from raw rows instead: the readings in
//! `[s, e)` plus the meter's last energy reading before `s` and first at or
//! after `e`, through [`rule::rollup_brute`].
//!
//! ## Why not a TimescaleDB continuous aggregate
//! The per-slot sums need the previous reading of each reading (a window
//! function, which continuous aggregates do not take), the glitch and reset
//! rule is not `counter_agg`'s (which treats a drop as a restart from 0 and
//! knows no power limit), and a continuous aggregate is refreshed by a
//! background policy: a backfill below its watermark stays invisible until
//! the next refresh, so the two stores would answer differently right after
//! a commit. The writer-maintained table gives the same answer on SQLite,
//! PostgreSQL and TimescaleDB, at commit time.

pub mod answer;
pub mod buckets;
pub mod csv;
pub mod flags;
pub mod rule;
pub mod slots;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod proptests;
