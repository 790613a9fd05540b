//! The PostgreSQL schema: creation and migration under an advisory lock,
//! the session-local staging table, and TimescaleDB mode (hypertable,
//! retention and compression policies).

use postgres::Client;

use super::{pg_message, PgMode, PgOptions, TimescaleMode};

/// The schema's history, oldest first: each entry upgrades a database of
/// the previous version to its own. Append only — a released step is never
/// edited, so every database reaches the same schema whatever version it
/// started from. TimescaleDB mode is applied after the last step.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, SCHEMA_V1),
    (2, SCHEMA_QUARANTINE),
    (3, SCHEMA_TOKEN_CHANGES),
    (4, SCHEMA_ENERGY),
    (5, SCHEMA_DEVICE_STATE),
];

/// Schema version this code writes and expects: the last migration's.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Key of the advisory lock held while migrating ("ems_hub" in ASCII).
pub const MIGRATION_LOCK_KEY: i64 = 0x0065_6d73_5f68_7562;

/// Version 1 of the schema (plain mode; TimescaleDB mode converts
/// `readings` afterwards, see [`timescale_sql`]).
const SCHEMA_V1: &str = "
CREATE TABLE devices (
    device_id  text PRIMARY KEY,
    token_hash bytea NOT NULL,
    created_ms bigint NOT NULL,
    revoked_ms bigint
);
CREATE TABLE viewers (
    viewer_id   bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    token_hash  bytea NOT NULL UNIQUE,
    all_devices boolean NOT NULL,
    created_ms  bigint NOT NULL,
    revoked_ms  bigint
);
CREATE TABLE viewer_devices (
    viewer_id bigint NOT NULL REFERENCES viewers (viewer_id) ON DELETE CASCADE,
    device_id text NOT NULL,
    PRIMARY KEY (viewer_id, device_id)
);
CREATE TABLE admins (
    name       text PRIMARY KEY,
    token_hash bytea NOT NULL UNIQUE,
    created_ms bigint NOT NULL,
    revoked_ms bigint
);
CREATE TABLE readings (
    device_id          text NOT NULL,
    meter              text NOT NULL,
    ts                 timestamptz NOT NULL,
    received_at        timestamptz NOT NULL,
    epoch              bigint NOT NULL,
    seq                bigint NOT NULL,
    voltage_v          double precision,
    current_a          double precision,
    power_w            double precision,
    energy_wh          double precision,
    frequency_hz       double precision,
    power_factor       double precision,
    reactive_power_var double precision
);
CREATE UNIQUE INDEX readings_dedup ON readings (device_id, epoch, seq);
CREATE INDEX readings_device_ts ON readings (device_id, ts DESC);
";

/// The `quarantine` table (see docs/storage/schema.md): refused frames and
/// readings the database refused, kept with the reason. A plain table in
/// TimescaleDB mode too. `epoch`/`seq` are NULL for a frame without
/// readable ids; `raw` is NULL for a binary frame. A resent frame is
/// quarantined once (NULLs never collide in the unique index).
const SCHEMA_QUARANTINE: &str = "
CREATE TABLE quarantine (
    device_id   text NOT NULL,
    received_at timestamptz NOT NULL,
    epoch       bigint,
    seq         bigint,
    reason      text NOT NULL,
    detail      text NOT NULL,
    raw         text
);
CREATE UNIQUE INDEX quarantine_dedup ON quarantine (device_id, epoch, seq);
CREATE INDEX quarantine_received ON quarantine (received_at DESC);
CREATE INDEX quarantine_device_received ON quarantine (device_id, received_at DESC);
";

/// The token change counter: one row that statement triggers bump, inside
/// the changing transaction, on every change to a device's id, token or
/// revocation, to a viewer, a viewer's scope, or an admin. The hub reads
/// this one integer per revocation poll and reloads its tokens only when
/// it moved (`TokenStore`). A row (not a sequence): a sequence moves
/// before the change commits, so a poll could read the new number with
/// the old tokens and never look again.
const SCHEMA_TOKEN_CHANGES: &str = "
CREATE TABLE token_changes (
    id integer PRIMARY KEY CHECK (id = 1),
    n  bigint NOT NULL
);
INSERT INTO token_changes (id, n) VALUES (1, 0);
CREATE FUNCTION ems_token_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE token_changes SET n = n + 1 WHERE id = 1;
    RETURN NULL;
END
$$;
CREATE TRIGGER devices_changes
    AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF device_id, token_hash, revoked_ms
    ON devices FOR EACH STATEMENT EXECUTE FUNCTION ems_token_changed();
CREATE TRIGGER viewers_changes
    AFTER INSERT OR DELETE OR TRUNCATE
          OR UPDATE OF viewer_id, name, token_hash, all_devices, revoked_ms
    ON viewers FOR EACH STATEMENT EXECUTE FUNCTION ems_token_changed();
CREATE TRIGGER viewer_devices_changes
    AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE
    ON viewer_devices FOR EACH STATEMENT EXECUTE FUNCTION ems_token_changed();
CREATE TRIGGER admins_changes
    AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF name, token_hash, revoked_ms
    ON admins FOR EACH STATEMENT EXECUTE FUNCTION ems_token_changed();
";

/// Shared device state (docs/storage/schema.md, `PresenceStore`): one row
/// per device that ever connected — presence with its hub and lease, the
/// connection generation, last seen, the edge's last status and the last
/// reading per meter (JSON text). Times are Unix ms.
const SCHEMA_DEVICE_STATE: &str = "
CREATE TABLE device_state (
    device_id         text PRIMARY KEY,
    online            boolean NOT NULL DEFAULT false,
    hub               text,
    online_since_ms   bigint,
    lease_until_ms    bigint NOT NULL DEFAULT 0,
    generation        bigint NOT NULL DEFAULT 0,
    last_seen_ms      bigint,
    status_rx_ms      bigint,
    outbox_depth      bigint,
    behind_ms         bigint,
    dropped           bigint,
    unwritten         bigint,
    dropped_disk_full bigint,
    dropped_damaged   bigint,
    last_readings     text
);
CREATE INDEX device_state_generation ON device_state (generation);
CREATE INDEX device_state_hub ON device_state (hub) WHERE online;
";

/// Plausibility flags on every reading and the energy slots (see
/// docs/storage/schema.md). Adding a column with a constant default does
/// not rewrite the table; `flags` of the rows already stored start as 0 and
/// are computed by the slot rebuild that the first hub start after the
/// upgrade runs (`energy_limits` is empty until then).
const SCHEMA_ENERGY: &str = "
ALTER TABLE readings ADD COLUMN flags integer NOT NULL DEFAULT 0;
CREATE TABLE energy_slots (
    device_id  text    NOT NULL,
    meter      text    NOT NULL,
    slot_ms    bigint  NOT NULL,
    has_energy boolean NOT NULL,
    data       bytea   NOT NULL,
    PRIMARY KEY (device_id, meter, slot_ms)
);
CREATE INDEX energy_slots_with_energy ON energy_slots (device_id, meter, slot_ms)
    WHERE has_energy;
CREATE TABLE energy_meters (
    device_id text NOT NULL,
    meter     text NOT NULL,
    PRIMARY KEY (device_id, meter)
);
CREATE TABLE energy_limits (
    max_power_w double precision NOT NULL,
    max_gap_ms  bigint           NOT NULL
);
";

/// The session-local staging table for binary COPY. Emptied at every
/// commit (and discarded with a rolled-back transaction).
pub(super) const CREATE_STAGE: &str = "
CREATE TEMP TABLE IF NOT EXISTS readings_stage (
    device_id          text NOT NULL,
    meter              text NOT NULL,
    ts                 timestamptz NOT NULL,
    received_at        timestamptz NOT NULL,
    epoch              bigint NOT NULL,
    seq                bigint NOT NULL,
    voltage_v          double precision,
    current_a          double precision,
    power_w            double precision,
    energy_wh          double precision,
    frequency_hz       double precision,
    power_factor       double precision,
    reactive_power_var double precision,
    flags              integer NOT NULL
) ON COMMIT DELETE ROWS";

/// Makes the `timescaledb` extension available in this database.
pub const CREATE_TIMESCALE_EXTENSION: &str = "CREATE EXTENSION IF NOT EXISTS timescaledb";

/// What the database already has, for [`timescale_sql`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimescaleState {
    /// `readings` is already a hypertable.
    pub is_hypertable: bool,
    /// Compression is already enabled on it (its settings cannot be
    /// changed once chunks are compressed, so they are set only once).
    pub compression_enabled: bool,
}

/// The statements that make `readings` a TimescaleDB 2.x hypertable on
/// `ts` (keeping existing rows) and apply the policies configured in
/// `opts`, given what the database already has. Running them again is
/// harmless.
///
/// The unique index gains `ts` because TimescaleDB requires the
/// partitioning column in every unique index; a resent reading carries the
/// same `ts` as the original, so the dedup still holds.
pub fn timescale_sql(opts: &PgOptions, state: TimescaleState) -> Vec<String> {
    let mut sql = Vec::new();
    if !state.is_hypertable {
        sql.push(
            "CREATE UNIQUE INDEX IF NOT EXISTS readings_dedup_ts \
             ON readings (device_id, epoch, seq, ts)"
                .to_string(),
        );
        sql.push("DROP INDEX IF EXISTS readings_dedup".to_string());
        sql.push(
            "SELECT create_hypertable('readings', 'ts', if_not_exists => TRUE, \
             migrate_data => TRUE)"
                .to_string(),
        );
    }
    if let Some(days) = opts.retention_days {
        sql.push("SELECT remove_retention_policy('readings', if_exists => TRUE)".to_string());
        sql.push(format!(
            "SELECT add_retention_policy('readings', INTERVAL '{days} days', \
             if_not_exists => TRUE)"
        ));
    }
    if let Some(days) = opts.compress_after_days {
        if !state.compression_enabled {
            // segmentby + orderby cover every column of the unique index.
            sql.push(
                "ALTER TABLE readings SET (timescaledb.compress, \
                 timescaledb.compress_segmentby = 'device_id', \
                 timescaledb.compress_orderby = 'ts DESC, epoch, seq')"
                    .to_string(),
            );
        }
        sql.push("SELECT remove_compression_policy('readings', if_exists => TRUE)".to_string());
        sql.push(format!(
            "SELECT add_compression_policy('readings', INTERVAL '{days} days', \
             if_not_exists => TRUE)"
        ));
    }
    sql
}

/// Creates/migrates the schema and sets up the mode, in one transaction
/// under an advisory lock. Returns the mode.
pub(super) fn migrate(client: &mut Client, opts: &PgOptions) -> Result<PgMode, String> {
    let mut tx = client.transaction().map_err(|e| e.to_string())?;
    let step = |what: &str, e: postgres::Error| format!("{what}: {}", pg_message(&e));
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .map_err(|e| step("taking the migration lock", e))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        .map_err(|e| step("creating schema_version", e))?;
    let current: Option<i32> = tx
        .query_one("SELECT max(version) FROM schema_version", &[])
        .and_then(|r| r.try_get(0))
        .map_err(|e| step("reading schema_version", e))?;
    let current = current.unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(format!(
            "database schema version {current} is newer than this ems-hub understands \
             ({SCHEMA_VERSION}); upgrade ems-hub"
        ));
    }
    for (version, sql) in MIGRATIONS {
        if *version > current {
            tx.batch_execute(sql)
                .map_err(|e| step(&format!("migrating the schema to version {version}"), e))?;
        }
    }
    if current < SCHEMA_VERSION {
        tx.execute("DELETE FROM schema_version", &[])
            .and_then(|_| {
                tx.execute(
                    "INSERT INTO schema_version (version) VALUES ($1)",
                    &[&SCHEMA_VERSION],
                )
            })
            .map_err(|e| step("writing schema_version", e))?;
    }

    let mode = if opts.timescale == TimescaleMode::Off {
        PgMode::Plain
    } else {
        let installed = extension_installed(&mut tx).map_err(|e| step("checking extensions", e))?
            || try_create_extension(&mut tx)?;
        if installed {
            let state = tx
                .query_opt(
                    "SELECT compression_enabled FROM timescaledb_information.hypertables \
                     WHERE hypertable_name = 'readings' \
                     AND hypertable_schema = current_schema()",
                    &[],
                )
                .and_then(|r| {
                    Ok(match r {
                        None => TimescaleState::default(),
                        Some(r) => TimescaleState {
                            is_hypertable: true,
                            compression_enabled: r.try_get(0)?,
                        },
                    })
                })
                .map_err(|e| step("checking the hypertable", e))?;
            let sql = timescale_sql(opts, state);
            for s in sql {
                tx.batch_execute(&s)
                    .map_err(|e| step("setting up TimescaleDB", e))?;
            }
            PgMode::Timescale
        } else {
            PgMode::Plain
        }
    };
    if opts.timescale == TimescaleMode::Require && mode != PgMode::Timescale {
        return Err(
            "TimescaleDB is required but the timescaledb extension is not available \
                    (install it and add it to shared_preload_libraries)"
                .into(),
        );
    }
    if mode == PgMode::Plain
        && (opts.retention_days.is_some() || opts.compress_after_days.is_some())
    {
        log::warn!("retention/compression policies need TimescaleDB; ignored in plain mode");
    }
    tx.commit().map_err(|e| step("committing the schema", e))?;
    Ok(mode)
}

fn extension_installed(tx: &mut postgres::Transaction<'_>) -> Result<bool, postgres::Error> {
    tx.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
        &[],
    )?
    .try_get(0)
}

/// Creates the extension if the server offers it; a failure (no
/// privilege, not preloaded) is logged and means plain mode.
fn try_create_extension(tx: &mut postgres::Transaction<'_>) -> Result<bool, String> {
    let available: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')",
            &[],
        )
        .and_then(|r| r.try_get(0))
        .map_err(|e| format!("checking available extensions: {}", pg_message(&e)))?;
    if !available {
        return Ok(false);
    }
    let mut sp = tx
        .transaction()
        .map_err(|e| format!("savepoint: {}", pg_message(&e)))?;
    match sp.batch_execute(CREATE_TIMESCALE_EXTENSION) {
        Ok(()) => {
            sp.commit()
                .map_err(|e| format!("creating timescaledb: {}", pg_message(&e)))?;
            Ok(true)
        }
        Err(e) => {
            log::warn!(
                "timescaledb is available but CREATE EXTENSION failed ({}); using plain mode",
                pg_message(&e)
            );
            sp.rollback()
                .map_err(|e| format!("rolling back savepoint: {}", pg_message(&e)))?;
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timescale_sql_is_what_timescaledb_2_expects() {
        assert_eq!(
            CREATE_TIMESCALE_EXTENSION,
            "CREATE EXTENSION IF NOT EXISTS timescaledb"
        );
        let fresh = TimescaleState::default();
        let plain = timescale_sql(&PgOptions::default(), fresh);
        assert_eq!(
            plain,
            vec![
                "CREATE UNIQUE INDEX IF NOT EXISTS readings_dedup_ts \
                 ON readings (device_id, epoch, seq, ts)",
                "DROP INDEX IF EXISTS readings_dedup",
                "SELECT create_hypertable('readings', 'ts', if_not_exists => TRUE, \
                 migrate_data => TRUE)",
            ]
        );
        let opts = PgOptions {
            retention_days: Some(365),
            compress_after_days: Some(7),
            ..PgOptions::default()
        };
        let with_policies = timescale_sql(&opts, fresh);
        assert_eq!(with_policies.len(), 3 + 2 + 3);
        assert_eq!(
            &with_policies[3..],
            &[
                "SELECT remove_retention_policy('readings', if_exists => TRUE)",
                "SELECT add_retention_policy('readings', INTERVAL '365 days', \
                 if_not_exists => TRUE)",
                "ALTER TABLE readings SET (timescaledb.compress, \
                 timescaledb.compress_segmentby = 'device_id', \
                 timescaledb.compress_orderby = 'ts DESC, epoch, seq')",
                "SELECT remove_compression_policy('readings', if_exists => TRUE)",
                "SELECT add_compression_policy('readings', INTERVAL '7 days', \
                 if_not_exists => TRUE)",
            ]
        );
        // Already a hypertable: nothing to convert; policies only.
        let hyper = TimescaleState {
            is_hypertable: true,
            compression_enabled: false,
        };
        assert!(timescale_sql(&PgOptions::default(), hyper).is_empty());
        assert_eq!(timescale_sql(&opts, hyper), &with_policies[3..]);
        // Compression settings are never changed once enabled.
        let compressed = TimescaleState {
            is_hypertable: true,
            compression_enabled: true,
        };
        let again = timescale_sql(&opts, compressed);
        assert_eq!(again.len(), 4);
        assert!(again.iter().all(|s| !s.starts_with("ALTER TABLE")));
        // Every unique index on a hypertable must include the time column.
        for s in &with_policies {
            if s.contains("UNIQUE") {
                assert!(s.contains(", ts)"), "{s}");
            }
        }
    }
}
