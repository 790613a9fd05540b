//! What a meter yields and its wire form: the only place that converts
//! between a [`Measurement`] and an [`ems_shared::Reading`].

use ems_shared::Reading;

/// One meter's values at one instant, in wire units. `meter` is the id the
/// reading carries (`[a-z0-9_-]{1,32}`); a multi-channel meter (e.g. one
/// per phase) yields several.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measurement {
    /// Meter id as sent on the wire.
    pub meter: String,
    /// Volts.
    pub voltage_v: Option<f64>,
    /// Amperes.
    pub current_a: Option<f64>,
    /// Watts.
    pub power_w: Option<f64>,
    /// Watt-hours, monotonically increasing.
    pub energy_wh: Option<f64>,
    /// Hertz.
    pub frequency_hz: Option<f64>,
    /// −1 … 1.
    pub power_factor: Option<f64>,
    /// var.
    pub reactive_power_var: Option<f64>,
}

impl Measurement {
    /// The wire reading of this measurement, stamped with its identity
    /// (`epoch`, `seq`) and sample time.
    pub fn into_reading(self, epoch: u64, seq: u64, ts_ms: i64) -> Reading {
        Reading {
            epoch,
            seq,
            ts_ms,
            meter: self.meter,
            voltage_v: self.voltage_v,
            current_a: self.current_a,
            power_w: self.power_w,
            energy_wh: self.energy_wh,
            frequency_hz: self.frequency_hz,
            power_factor: self.power_factor,
            reactive_power_var: self.reactive_power_var,
            ..Default::default()
        }
    }

    /// The measurement a wire reading carries (its stamp is dropped).
    pub fn from_reading(r: Reading) -> Measurement {
        Measurement {
            meter: r.meter,
            voltage_v: r.voltage_v,
            current_a: r.current_a,
            power_w: r.power_w,
            energy_wh: r.energy_wh,
            frequency_hz: r.frequency_hz,
            power_factor: r.power_factor,
            reactive_power_var: r.reactive_power_var,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_survives_the_round_trip_through_the_wire() {
        let m = Measurement {
            meter: "main".into(),
            voltage_v: Some(230.1),
            current_a: Some(-1.5),
            power_w: Some(-345.0),
            energy_wh: Some(12.0),
            frequency_hz: Some(50.01),
            power_factor: Some(0.98),
            reactive_power_var: Some(-20.0),
        };
        let r = m.clone().into_reading(7, 3, 1_764_000_000_000);
        assert_eq!((r.epoch, r.seq, r.ts_ms), (7, 3, 1_764_000_000_000));
        let json = r.to_json();
        let back: Reading = serde_json::from_str(&json).unwrap();
        assert_eq!(Measurement::from_reading(back), m);
        // Absent values stay absent.
        let sparse = Measurement {
            meter: "s0".into(),
            energy_wh: Some(1.0),
            ..Default::default()
        };
        assert_eq!(
            Measurement::from_reading(sparse.clone().into_reading(1, 1, 0)),
            sparse
        );
    }
}
