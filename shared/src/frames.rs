//! Frames the hub sends: to the edge (`ack`, `rejected`) and to dashboards
//! (a reading plus `device_id` and `rx_ms`).

use serde::{Deserialize, Serialize};

use crate::{Measured, Reading};

/// Hub → edge frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HubFrame {
    /// Cumulative durable acknowledgement (see the crate docs).
    Ack {
        /// Epoch of the acknowledged readings.
        epoch: u64,
        /// Highest acknowledged seq of that epoch on this connection.
        seq: u64,
    },
    /// The reading `(epoch, seq)` was refused. With reason
    /// `rate_limited: …` it was not taken and must be resent later (slower);
    /// with any other reason it is invalid and will never be stored.
    Rejected {
        /// Epoch of the refused reading.
        epoch: u64,
        /// Seq of the refused reading.
        seq: u64,
        /// `code: detail`, the code being a [`crate::RejectReason::code`].
        reason: String,
    },
}

impl HubFrame {
    /// The wire JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

crate::measurement_struct! {
    serde:
    /// Hub → dashboard: a reading as the device sent it, plus where it came
    /// from and when the hub received it. Decoding is lenient (unknown fields
    /// are ignored) so that dashboards keep working when fields are added.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct DashboardReading {
        /// `"reading"`.
        #[serde(rename = "type")]
        pub frame_type: String,
        /// The device that sent it.
        pub device_id: String,
        /// Hub receive time, Unix ms.
        pub rx_ms: i64,
        /// As in [`crate::Reading`].
        pub epoch: u64,
        /// As in [`crate::Reading`].
        pub seq: u64,
        /// As in [`crate::Reading`].
        pub ts_ms: i64,
        /// As in [`crate::Reading`].
        pub meter: String,
    }
}

impl DashboardReading {
    /// The dashboard frame of a stored reading of `device_id`, received by
    /// the hub at `rx_ms`.
    pub fn new(device_id: &str, rx_ms: i64, reading: Reading) -> Self {
        let mut d = DashboardReading {
            frame_type: "reading".into(),
            device_id: device_id.to_owned(),
            rx_ms,
            epoch: reading.epoch,
            seq: reading.seq,
            ts_ms: reading.ts_ms,
            ..Default::default()
        };
        d.set_measurements_from(&reading);
        d.meter = reading.meter;
        d
    }
}

/// Builds the dashboard frame from the reading's raw JSON text, which must
/// already have passed [`crate::decode_reading`] (so it is a non-empty JSON
/// object). The reading's bytes are reused as they came, not re-encoded:
/// one allocation per reading, shared by every subscriber.
pub fn dashboard_frame(raw_reading: &str, device_id: &str, rx_ms: i64) -> String {
    let body = raw_reading.trim_end();
    let body = body.strip_suffix('}').unwrap_or(body);
    let mut out = String::with_capacity(body.len() + device_id.len() + 48);
    out.push_str(body);
    out.push_str(",\"device_id\":");
    // Device ids are `[A-Za-z0-9_.-]`, but encode properly anyway.
    out.push_str(&serde_json::to_string(device_id).unwrap_or_else(|_| "\"\"".into()));
    out.push_str(",\"rx_ms\":");
    out.push_str(&rx_ms.to_string());
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_frames_encode() {
        assert_eq!(
            HubFrame::Ack { epoch: 1, seq: 2 }.to_json(),
            r#"{"type":"ack","epoch":1,"seq":2}"#
        );
        let r = HubFrame::Rejected {
            epoch: 1,
            seq: 2,
            reason: "out_of_range: x".into(),
        };
        assert_eq!(serde_json::from_str::<HubFrame>(&r.to_json()).unwrap(), r);
    }

    #[test]
    fn dashboard_frame_splices_and_parses() {
        let raw = "{\"type\":\"reading\",\"epoch\":1,\"seq\":2,\"ts_ms\":3,\"meter\":\"main\",\"power_w\":5.5} \n";
        let f = dashboard_frame(raw, "ems_001", 99);
        let d: DashboardReading = serde_json::from_str(&f).unwrap();
        assert_eq!(d.device_id, "ems_001");
        assert_eq!(d.rx_ms, 99);
        assert_eq!(d.power_w, Some(5.5));
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 8);
    }
}
