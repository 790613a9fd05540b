//! Energy of every device at once (the fleet endpoint): the slots of all
//! meters over a range in one store query ([`EnergyStore::fleet_slots`]),
//! combined per meter with the same rule as [`super::rollup`] and summed
//! per device.

use std::collections::BTreeMap;

use serde::Serialize;

use super::EnergyStore;
use crate::energy::buckets::Span;
use crate::energy::slots::{combine, Slot};
use crate::store::StoreError;

/// The slots of one meter, as [`EnergyStore::fleet_slots`] answers them.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterSlots {
    /// The device.
    pub device_id: String,
    /// The meter.
    pub meter: String,
    /// Its slots in the range plus the nearest slot with an energy reading
    /// on either side, in order.
    pub slots: Vec<Slot>,
}

/// One device's energy over a range.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceEnergy {
    /// The device.
    pub device_id: String,
    /// Energy over the range, all meters summed, Wh.
    pub energy_wh: f64,
    /// The fraction of the range the readings cover (0 to 1): the
    /// least-covered meter's, weighted by bucket length; 0 without slots.
    pub coverage: f64,
}

/// Groups `(device, meter, slot)` rows in any order into one entry per
/// meter with its slots in order (the backends' side of
/// [`EnergyStore::fleet_slots`]).
pub(crate) fn group_slots(
    rows: impl IntoIterator<Item = (String, String, Slot)>,
) -> Vec<MeterSlots> {
    let mut by_meter: BTreeMap<(String, String), Vec<Slot>> = BTreeMap::new();
    for (device_id, meter, slot) in rows {
        by_meter.entry((device_id, meter)).or_default().push(slot);
    }
    by_meter
        .into_iter()
        .map(|((device_id, meter), mut slots)| {
            slots.sort_by_key(|s| s.start_ms);
            MeterSlots {
                device_id,
                meter,
                slots,
            }
        })
        .collect()
}

/// The energy of every device `keep` accepts over `spans` (contiguous,
/// slot-aligned buckets from [`crate::energy::buckets::buckets`]), one
/// entry per device that has slots, in device id order. One store query
/// whatever the number of devices. Off-grid buckets are an error here (the
/// per-device rollup answers them from the raw rows).
pub fn fleet_energy<S: EnergyStore + ?Sized>(
    store: &mut S,
    spans: &[Span],
    keep: &dyn Fn(&str) -> bool,
) -> Result<Vec<DeviceEnergy>, StoreError> {
    let (Some(first), Some(last)) = (spans.first(), spans.last()) else {
        return Ok(Vec::new());
    };
    let limits = store.energy_limits();
    let total_ms: i64 = spans.iter().map(|s| s.len_ms()).sum();
    let mut out: Vec<DeviceEnergy> = Vec::new();
    for m in store.fleet_slots(first.start_ms, last.end_ms)? {
        if !keep(&m.device_id) {
            continue;
        }
        let buckets = combine(&m.slots, spans, &limits)
            .map_err(|e| StoreError::Db(format!("energy slots of {}: {e}", m.device_id)))?;
        let energy_wh: f64 = buckets.iter().map(|b| b.energy_wh).sum();
        let covered: f64 = buckets
            .iter()
            .map(|b| b.coverage * (b.end_ms - b.start_ms) as f64)
            .sum();
        let coverage = if total_ms > 0 {
            (covered / total_ms as f64).clamp(0.0, 1.0)
        } else {
            0.0
        };
        match out.last_mut() {
            Some(d) if d.device_id == m.device_id => {
                d.energy_wh += energy_wh;
                d.coverage = d.coverage.min(coverage);
            }
            _ => out.push(DeviceEnergy {
                device_id: m.device_id,
                energy_wh,
                coverage,
            }),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_sorts_each_meter_and_keeps_meters_apart() {
        let s = |ms| Slot {
            start_ms: ms,
            samples: 1,
            last: crate::energy::rule::ReadingKey {
                ts_ms: ms,
                epoch: 1,
                seq: 0,
            },
            energy: None,
            power: None,
        };
        let rows = vec![
            ("b".to_owned(), "main".to_owned(), s(1_800_000)),
            ("a".to_owned(), "pv".to_owned(), s(900_000)),
            ("b".to_owned(), "main".to_owned(), s(0)),
            ("a".to_owned(), "main".to_owned(), s(0)),
        ];
        let g = group_slots(rows);
        let keys: Vec<(&str, &str, Vec<i64>)> = g
            .iter()
            .map(|m| {
                (
                    m.device_id.as_str(),
                    m.meter.as_str(),
                    m.slots.iter().map(|s| s.start_ms).collect(),
                )
            })
            .collect();
        assert_eq!(
            keys,
            vec![
                ("a", "main", vec![0]),
                ("a", "pv", vec![900_000]),
                ("b", "main", vec![0, 1_800_000]),
            ]
        );
    }
}
