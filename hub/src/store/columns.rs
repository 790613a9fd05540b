//! The columns of `readings` as both backends write and read them: the
//! key columns, then one column per measurement in the order of
//! [`Measurement::ALL`] (the column name is the measurement's JSON key),
//! then (when inserting) the reading's plausibility flags.
//! Adding a measurement adds its column here by itself; the table needs a
//! migration in each backend.

use ems_shared::Measurement;

/// The columns before the measurements, in insert order.
pub(crate) const KEY_COLUMNS: [&str; 6] =
    ["device_id", "meter", "ts", "received_at", "epoch", "seq"];

/// The column an insert writes after the measurements: the reading's
/// plausibility flags ([`crate::energy::flags`]).
pub(crate) const FLAGS_COLUMN: &str = "flags";

/// Index (from 0) of the flags parameter of an inserted row.
pub(crate) const FLAGS_PARAM: usize = KEY_COLUMNS.len() + Measurement::COUNT;

/// Parameters of one inserted row: the key columns, the measurements, the
/// flags.
pub(crate) const ROW_COLUMNS: usize = FLAGS_PARAM + 1;

/// `device_id, meter, ts, received_at, epoch, seq, voltage_v, …, flags`:
/// every column an insert writes, in parameter order.
pub(crate) fn insert_columns() -> String {
    format!(
        "{}, {}, {FLAGS_COLUMN}",
        KEY_COLUMNS.join(", "),
        Measurement::COLUMNS
    )
}

/// The columns a reading is read back from, in this order: `epoch, seq,
/// ts, meter`, then the measurements from index [`FIRST_MEASUREMENT`].
pub(crate) fn select_columns() -> String {
    format!("epoch, seq, ts, meter, {}", Measurement::COLUMNS)
}

/// Index of the first measurement in [`select_columns`]; the one after the
/// last measurement is [`AFTER_MEASUREMENTS`].
pub(crate) const FIRST_MEASUREMENT: usize = 4;

/// Index of the first column after the measurements in
/// [`select_columns`] (where a query's extra column, e.g. `received_at`,
/// goes).
pub(crate) const AFTER_MEASUREMENTS: usize = FIRST_MEASUREMENT + Measurement::COUNT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_column_lists_follow_the_measurement_list() {
        assert_eq!(
            insert_columns(),
            "device_id, meter, ts, received_at, epoch, seq, voltage_v, current_a, power_w, \
             energy_wh, frequency_hz, power_factor, reactive_power_var, flags"
        );
        assert_eq!(
            select_columns(),
            "epoch, seq, ts, meter, voltage_v, current_a, power_w, energy_wh, frequency_hz, \
             power_factor, reactive_power_var"
        );
        assert_eq!(ROW_COLUMNS, 14);
        assert_eq!(FLAGS_PARAM, 13);
        assert_eq!(AFTER_MEASUREMENTS, 11);
    }
}
