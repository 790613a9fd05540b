//! The JSON answer of `GET /api/devices/{id}/energy`.
//!
//! ```json
//! {"device_id":"d1","tz":"Europe/Berlin","bucket":"day","meters":[
//!   {"meter":"main","buckets":[
//!     {"start_ms":0,"end_ms":0,"energy_wh":0.0,"samples":0,"coverage":0.0,"resets":0,"flagged":0,
//!      "power_w":{"min":0.0,"avg":0.0,"max":0.0}}]}]}
//! ```
//!
//! Every bucket of the snapped range is present for every meter, empty ones
//! with `samples` 0, `energy_wh` 0 and `coverage` 0; `power_w` is `null` in
//! a bucket without power readings.

use serde::Serialize;

use super::buckets::Bucket;
use super::rule::BucketResult;

/// The whole answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnergyAnswer {
    /// The device asked about.
    pub device_id: String,
    /// Canonical IANA name of the zone the buckets are cut in.
    pub tz: String,
    /// `hour`, `day` or `month`.
    pub bucket: Bucket,
    /// One entry per meter, in meter id order.
    pub meters: Vec<MeterEnergy>,
}

/// The buckets of one meter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeterEnergy {
    /// Meter id on the device.
    pub meter: String,
    /// In time order, contiguous.
    pub buckets: Vec<BucketResult>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::energy::rule::PowerStats;

    fn bucket(power_w: Option<PowerStats>) -> BucketResult {
        BucketResult {
            start_ms: 0,
            end_ms: 0,
            energy_wh: 0.0,
            samples: 0,
            coverage: 0.0,
            resets: 0,
            flagged: 0,
            power_w,
        }
    }

    #[test]
    fn golden_field_names_and_order() {
        let answer = EnergyAnswer {
            device_id: "d1".into(),
            tz: "Europe/Berlin".into(),
            bucket: Bucket::Day,
            meters: vec![MeterEnergy {
                meter: "main".into(),
                buckets: vec![bucket(Some(PowerStats {
                    min: 0.0,
                    avg: 0.0,
                    max: 0.0,
                }))],
            }],
        };
        assert_eq!(
            serde_json::to_string(&answer).unwrap(),
            concat!(
                r#"{"device_id":"d1","tz":"Europe/Berlin","bucket":"day","meters":["#,
                r#"{"meter":"main","buckets":["#,
                r#"{"start_ms":0,"end_ms":0,"energy_wh":0.0,"samples":0,"coverage":0.0,"resets":0,"flagged":0,"#,
                r#""power_w":{"min":0.0,"avg":0.0,"max":0.0}}]}]}"#
            )
        );
        let empty = serde_json::to_string(&bucket(None)).unwrap();
        assert!(empty.ends_with(r#""flagged":0,"power_w":null}"#), "{empty}");
        for (b, s) in [
            (Bucket::Hour, "\"hour\""),
            (Bucket::Day, "\"day\""),
            (Bucket::Month, "\"month\""),
        ] {
            assert_eq!(serde_json::to_string(&b).unwrap(), s);
        }
    }
}
