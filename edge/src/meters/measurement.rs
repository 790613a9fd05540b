//! What a meter yields and its wire form: the only place that converts
//! between a [`Measurement`] and an [`ems_shared::Reading`].

use ems_shared::{Measured, Reading};

ems_shared::measurement_struct! {
    /// One meter's values at one instant, in wire units: one optional
    /// field per measurement of the protocol's list
    /// ([`ems_shared::Measurement::ALL`]), so a measurement added there
    /// appears here without a change to the edge. `meter` is the id the
    /// reading carries (`[a-z0-9_-]{1,32}`); a multi-channel meter (e.g. one
    /// per phase) yields several.
    #[derive(Debug, Clone, Default, PartialEq)]
    pub struct Measurement {
        /// Meter id as sent on the wire.
        pub meter: String,
    }
}

impl Measurement {
    /// The wire reading of this measurement, stamped with its identity
    /// (`epoch`, `seq`) and sample time.
    pub fn into_reading(self, epoch: u64, seq: u64, ts_ms: i64) -> Reading {
        let mut r = Reading {
            epoch,
            seq,
            ts_ms,
            ..Default::default()
        };
        r.set_measurements_from(&self);
        r.meter = self.meter;
        r
    }

    /// The measurement a wire reading carries (its stamp is dropped).
    pub fn from_reading(r: Reading) -> Measurement {
        let mut m = Measurement::default();
        m.set_measurements_from(&r);
        m.meter = r.meter;
        m
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
