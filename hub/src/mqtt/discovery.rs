//! Pure builders of everything the bridge publishes: topic names, Home
//! Assistant discovery configs, state payloads. No I/O.
//!
//! Topic layout (`<d>` = discovery prefix, `<p>` = topic prefix, `<node>`
//! = the topic prefix with every character outside `[A-Za-z0-9_-]` made
//! `_`):
//! - `<d>/sensor/<node>/<object>/config`: one retained discovery config
//!   per device, meter and measurement. `<object>` is
//!   `<device>_<meter>_<measurement>_<h>` (`.` in the device id made `_`;
//!   `<h>` = 8 hex digits of SHA-256 of `<device>/<meter>`, because `_`
//!   may occur in device and meter ids, so the readable part alone could
//!   name two different pairs). `unique_id` is `<node>_<object>`. All of
//!   one hub's configs share the node level, so one subscription
//!   (`<d>/sensor/<node>/+/config`) finds the configs an earlier hub
//!   process left on the broker.
//! - `<p>/<device>/<meter>/state`: the latest reading, JSON.
//! - `<p>/<device>/availability`: `online`/`offline`, retained.
//! - `<p>/hub/availability`: the hub's own, retained, `offline` by last
//!   will. (A device whose id is `hub` would share this topic; the bridge
//!   leaves such a device out.)

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use ems_shared::{Measured, Reading};

use ems_shared::Measurement as Kind;

/// `payload_available` everywhere.
pub const ONLINE: &str = "online";
/// `payload_not_available` everywhere.
pub const OFFLINE: &str = "offline";
/// The manufacturer shown for every device.
pub const MANUFACTURER: &str = "EMS";
/// The device id the bridge never publishes (its availability topic is
/// the hub's own).
pub const RESERVED_DEVICE_ID: &str = "hub";

/// One measurement of a reading and how Home Assistant should see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Which measurement of the reading; its name (`energy_wh`) is the
    /// state payload's key.
    pub kind: Kind,
    /// Entity name after the meter id (`energy` → "main energy").
    pub name: &'static str,
    /// Home Assistant sensor `device_class`.
    pub device_class: &'static str,
    /// `unit_of_measurement`; `None` for the unitless power factor.
    pub unit: Option<&'static str>,
    /// `state_class`.
    pub state_class: &'static str,
}

/// Every measurement, in payload order. Energy stays in Wh (the unit on
/// the wire and in the store, so published values equal stored ones
/// exactly); Home Assistant accepts Wh for the `energy` device class and
/// its Energy dashboard converts.
pub const MEASUREMENTS: [Measurement; Kind::COUNT] = [
    Measurement {
        kind: Kind::EnergyWh,
        name: "energy",
        device_class: "energy",
        unit: Some("Wh"),
        state_class: "total_increasing",
    },
    Measurement {
        kind: Kind::PowerW,
        name: "power",
        device_class: "power",
        unit: Some("W"),
        state_class: "measurement",
    },
    Measurement {
        kind: Kind::VoltageV,
        name: "voltage",
        device_class: "voltage",
        unit: Some("V"),
        state_class: "measurement",
    },
    Measurement {
        kind: Kind::CurrentA,
        name: "current",
        device_class: "current",
        unit: Some("A"),
        state_class: "measurement",
    },
    Measurement {
        kind: Kind::FrequencyHz,
        name: "frequency",
        device_class: "frequency",
        unit: Some("Hz"),
        state_class: "measurement",
    },
    Measurement {
        kind: Kind::PowerFactor,
        name: "power factor",
        device_class: "power_factor",
        unit: None,
        state_class: "measurement",
    },
    Measurement {
        kind: Kind::ReactivePowerVar,
        name: "reactive power",
        device_class: "reactive_power",
        unit: Some("var"),
        state_class: "measurement",
    },
];

/// The values of a reading in [`MEASUREMENTS`] order.
pub fn values(r: &Reading) -> [Option<f64>; Kind::COUNT] {
    MEASUREMENTS.map(|m| r.get(m.kind))
}

/// Which measurements `values` has, as a bit set over [`MEASUREMENTS`].
pub fn mask(values: &[Option<f64>; Kind::COUNT]) -> u8 {
    values
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_some())
        .fold(0, |m, (i, _)| m | (1 << i))
}

/// The topic names and fixed discovery fields of one bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Home Assistant's discovery prefix.
    pub discovery_prefix: String,
    /// Prefix of state and availability topics.
    pub topic_prefix: String,
    /// The node level of the config topics (the sanitised topic prefix).
    pub node: String,
    /// `sw_version` of devices and origin.
    pub sw_version: String,
    /// `configuration_url` of devices.
    pub configuration_url: Option<String>,
    /// `expire_after` of sensors, seconds.
    pub expire_after_s: Option<u64>,
}

impl Layout {
    /// The layout for `config`.
    pub fn new(config: &super::MqttConfig) -> Self {
        Layout {
            discovery_prefix: config.discovery_prefix.clone(),
            topic_prefix: config.topic_prefix.clone(),
            node: sanitize(&config.topic_prefix),
            sw_version: config.sw_version.clone(),
            configuration_url: config
                .public_url
                .as_ref()
                .map(|u| format!("{}/", u.trim_end_matches('/'))),
            expire_after_s: config
                .expire_after
                .filter(|d| !d.is_zero())
                .map(|d| d.as_secs().max(1)),
        }
    }

    /// `<p>/hub/availability`.
    pub fn hub_availability_topic(&self) -> String {
        format!("{}/hub/availability", self.topic_prefix)
    }

    /// `<p>/<device>/availability`.
    pub fn availability_topic(&self, device: &str) -> String {
        format!("{}/{device}/availability", self.topic_prefix)
    }

    /// `<p>/<device>/<meter>/state`.
    pub fn state_topic(&self, device: &str, meter: &str) -> String {
        format!("{}/{device}/{meter}/state", self.topic_prefix)
    }

    /// The `<object>` level of a config topic.
    pub fn object_id(&self, device: &str, meter: &str, m: &Measurement) -> String {
        let h = Sha256::digest(format!("{device}/{meter}").as_bytes());
        format!(
            "{}_{meter}_{}_{:02x}{:02x}{:02x}{:02x}",
            sanitize(device),
            m.kind.name(),
            h[0],
            h[1],
            h[2],
            h[3]
        )
    }

    /// The sensor's `unique_id`: `<node>_<object>`.
    pub fn unique_id(&self, device: &str, meter: &str, m: &Measurement) -> String {
        format!("{}_{}", self.node, self.object_id(device, meter, m))
    }

    /// `<d>/sensor/<node>/<object>/config`.
    pub fn config_topic(&self, device: &str, meter: &str, m: &Measurement) -> String {
        format!(
            "{}/sensor/{}/{}/config",
            self.discovery_prefix,
            self.node,
            self.object_id(device, meter, m)
        )
    }

    /// The filter matching every config topic of this bridge.
    pub fn config_filter(&self) -> String {
        format!("{}/sensor/{}/+/config", self.discovery_prefix, self.node)
    }

    /// The filter matching every availability topic (devices and hub).
    pub fn availability_filter(&self) -> String {
        format!("{}/+/availability", self.topic_prefix)
    }

    /// Whether `topic` is one of this bridge's config topics.
    pub fn is_config_topic(&self, topic: &str) -> bool {
        topic
            .strip_prefix(&self.discovery_prefix)
            .and_then(|t| t.strip_prefix("/sensor/"))
            .and_then(|t| t.strip_prefix(&self.node))
            .and_then(|t| t.strip_prefix('/'))
            .and_then(|t| t.strip_suffix("/config"))
            .is_some_and(|object| !object.is_empty() && !object.contains('/'))
    }

    /// The device of an availability topic (`None` for other topics and
    /// for the hub's own).
    pub fn device_of_availability_topic<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let device = topic
            .strip_prefix(&self.topic_prefix)?
            .strip_prefix('/')?
            .strip_suffix("/availability")?;
        (device != RESERVED_DEVICE_ID && ems_shared::validate_device_id(device).is_ok())
            .then_some(device)
    }

    /// The device and meter of a state topic.
    pub fn parse_state_topic<'t>(&self, topic: &'t str) -> Option<(&'t str, &'t str)> {
        let rest = topic
            .strip_prefix(&self.topic_prefix)?
            .strip_prefix('/')?
            .strip_suffix("/state")?;
        let (device, meter) = rest.split_once('/')?;
        (ems_shared::validate_device_id(device).is_ok()
            && ems_shared::validate_meter_id(meter).is_ok())
        .then_some((device, meter))
    }

    /// The device a retained discovery config (found on the broker)
    /// belongs to, read from its `state_topic`.
    pub fn device_of_config(&self, payload: &[u8]) -> Option<String> {
        let v: Value = serde_json::from_slice(payload).ok()?;
        let st = v.get("state_topic")?.as_str()?;
        self.parse_state_topic(st).map(|(d, _)| d.to_string())
    }

    /// The discovery config of one sensor. `model` is the meter's kind when
    /// known.
    pub fn discovery_config(
        &self,
        device: &str,
        meter: &str,
        m: &Measurement,
        model: Option<&str>,
    ) -> Value {
        let availability = |topic: String| {
            json!({
                "topic": topic,
                "payload_available": ONLINE,
                "payload_not_available": OFFLINE,
            })
        };
        let mut dev = Map::new();
        dev.insert("identifiers".into(), json!([device]));
        dev.insert("name".into(), json!(device));
        dev.insert("manufacturer".into(), json!(MANUFACTURER));
        if let Some(model) = model {
            dev.insert("model".into(), json!(model));
        }
        dev.insert("sw_version".into(), json!(self.sw_version));
        if let Some(url) = &self.configuration_url {
            dev.insert("configuration_url".into(), json!(url));
        }
        let mut c = Map::new();
        c.insert("name".into(), json!(format!("{meter} {}", m.name)));
        c.insert("unique_id".into(), json!(self.unique_id(device, meter, m)));
        c.insert("state_topic".into(), json!(self.state_topic(device, meter)));
        c.insert(
            "value_template".into(),
            json!(format!("{{{{ value_json.{} }}}}", m.kind.name())),
        );
        c.insert(
            "availability".into(),
            json!([
                availability(self.hub_availability_topic()),
                availability(self.availability_topic(device)),
            ]),
        );
        c.insert("availability_mode".into(), json!("all"));
        c.insert("device_class".into(), json!(m.device_class));
        if let Some(unit) = m.unit {
            c.insert("unit_of_measurement".into(), json!(unit));
        }
        c.insert("state_class".into(), json!(m.state_class));
        if let Some(s) = self.expire_after_s {
            c.insert("expire_after".into(), json!(s));
        }
        c.insert("device".into(), Value::Object(dev));
        c.insert(
            "origin".into(),
            json!({ "name": "ems-hub", "sw_version": self.sw_version }),
        );
        Value::Object(c)
    }
}

/// The state payload: the measurements present and `ts`, the reading's
/// sample time in RFC 3339 (UTC, milliseconds).
pub fn state_payload(ts_ms: i64, values: &[Option<f64>; Kind::COUNT]) -> String {
    let mut o = Map::new();
    for (m, v) in MEASUREMENTS.iter().zip(values) {
        if let Some(v) = v {
            o.insert(m.kind.name().into(), json!(v));
        }
    }
    o.insert("ts".into(), json!(rfc3339_ms(ts_ms)));
    Value::Object(o).to_string()
}

/// Every character outside `[A-Za-z0-9_-]` made `_`.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds
/// (`2024-05-01T12:00:00.123Z`).
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::{BrokerUrl, MqttConfig};

    fn layout() -> Layout {
        let mut c = MqttConfig::new(BrokerUrl::parse("mqtt://h").unwrap());
        c.sw_version = "1.2.3".into();
        Layout::new(&c)
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_714_564_800_123), "2024-05-01T12:00:00.123Z");
        assert_eq!(rfc3339_ms(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn topics() {
        let l = layout();
        assert_eq!(l.node, "ems");
        assert_eq!(l.hub_availability_topic(), "ems/hub/availability");
        assert_eq!(l.availability_topic("d1"), "ems/d1/availability");
        assert_eq!(l.state_topic("d1", "main"), "ems/d1/main/state");
        let e = &MEASUREMENTS[0];
        let t = l.config_topic("pi.kitchen", "main", e);
        assert!(t.starts_with("homeassistant/sensor/ems/pi_kitchen_main_energy_wh_"));
        assert!(l.is_config_topic(&t));
        assert!(!l.is_config_topic("homeassistant/sensor/other/x/config"));
        assert!(!l.is_config_topic("homeassistant/sensor/ems/a/b/config"));
        assert!(!l.is_config_topic("homeassistant/sensor/ems//config"));
        assert_eq!(l.config_filter(), "homeassistant/sensor/ems/+/config");
        assert_eq!(l.availability_filter(), "ems/+/availability");
        assert_eq!(
            l.device_of_availability_topic("ems/d1/availability"),
            Some("d1")
        );
        assert_eq!(l.device_of_availability_topic("ems/hub/availability"), None);
        assert_eq!(l.device_of_availability_topic("x/d1/availability"), None);
        assert_eq!(
            l.parse_state_topic("ems/d.1/main/state"),
            Some(("d.1", "main"))
        );
        assert_eq!(l.parse_state_topic("ems/d1/Main/state"), None);
        // Object ids only use the characters Home Assistant allows.
        let o = l.object_id("A.b-C_9", "m-1_x", &MEASUREMENTS[6]);
        assert!(o
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let l = layout();
        let e = &MEASUREMENTS[0];
        // Same readable part, different (device, meter): different ids.
        let a = l.unique_id("a_b", "c", e);
        let b = l.unique_id("a", "b_c", e);
        let c = l.unique_id("a.b", "c", e);
        assert_ne!(a, b);
        assert_ne!(a, c);
        // Stable: SHA-256("a_b/c") starts with these bytes.
        let h = Sha256::digest(b"a_b/c");
        assert_eq!(
            a,
            format!(
                "ems_a_b_c_energy_wh_{:02x}{:02x}{:02x}{:02x}",
                h[0], h[1], h[2], h[3]
            )
        );
        // Every measurement of a meter gets its own id.
        let ids: std::collections::HashSet<_> = MEASUREMENTS
            .iter()
            .map(|m| l.unique_id("d", "m", m))
            .collect();
        assert_eq!(ids.len(), 7);
    }

    #[test]
    fn discovery_config_fields() {
        let mut l = layout();
        l.configuration_url = Some("https://ems.example.com/".into());
        let c = l.discovery_config("d1", "main", &MEASUREMENTS[0], Some("pzem004t"));
        assert_eq!(c["name"], "main energy");
        assert_eq!(c["unique_id"], l.unique_id("d1", "main", &MEASUREMENTS[0]));
        assert_eq!(c["state_topic"], "ems/d1/main/state");
        assert_eq!(c["value_template"], "{{ value_json.energy_wh }}");
        assert_eq!(c["device_class"], "energy");
        assert_eq!(c["unit_of_measurement"], "Wh");
        assert_eq!(c["state_class"], "total_increasing");
        assert_eq!(c["availability_mode"], "all");
        assert_eq!(c["availability"][0]["topic"], "ems/hub/availability");
        assert_eq!(c["availability"][1]["topic"], "ems/d1/availability");
        for a in c["availability"].as_array().unwrap() {
            assert_eq!(a["payload_available"], "online");
            assert_eq!(a["payload_not_available"], "offline");
        }
        assert_eq!(c["device"]["identifiers"], json!(["d1"]));
        assert_eq!(c["device"]["name"], "d1");
        assert_eq!(c["device"]["manufacturer"], "EMS");
        assert_eq!(c["device"]["model"], "pzem004t");
        assert_eq!(c["device"]["sw_version"], "1.2.3");
        assert_eq!(c["device"]["configuration_url"], "https://ems.example.com/");
        assert_eq!(c["origin"]["name"], "ems-hub");
        assert!(c.get("expire_after").is_none());
        assert!(c.get("object_id").is_none());

        let l = layout();
        let c = l.discovery_config("d1", "main", &MEASUREMENTS[5], None);
        assert_eq!(c["device_class"], "power_factor");
        assert!(c.get("unit_of_measurement").is_none());
        assert!(c["device"].get("model").is_none());
        assert!(c["device"].get("configuration_url").is_none());
        assert_eq!(
            l.device_of_config(c.to_string().as_bytes()).as_deref(),
            Some("d1")
        );
        assert_eq!(l.device_of_config(b"not json"), None);
        assert_eq!(
            l.device_of_config(br#"{"state_topic":"x/d/m/state"}"#),
            None
        );
    }

    #[test]
    fn expire_after_and_url() {
        let mut c = MqttConfig::new(BrokerUrl::parse("mqtt://h").unwrap());
        c.expire_after = Some(std::time::Duration::from_secs(90));
        c.public_url = Some("https://ems.example.com".into());
        c.topic_prefix = "home/ems.1".into();
        let l = Layout::new(&c);
        assert_eq!(l.node, "home_ems_1");
        assert_eq!(l.expire_after_s, Some(90));
        assert_eq!(
            l.configuration_url.as_deref(),
            Some("https://ems.example.com/")
        );
        let cfg = l.discovery_config("d", "m", &MEASUREMENTS[1], None);
        assert_eq!(cfg["expire_after"], 90);
        assert_eq!(cfg["state_topic"], "home/ems.1/d/m/state");
    }

    #[test]
    fn state_payloads() {
        let mut v = [None; 7];
        v[0] = Some(1234.5);
        v[1] = Some(-250.0);
        v[5] = Some(0.98);
        let p: Value = serde_json::from_str(&state_payload(1_714_564_800_123, &v)).unwrap();
        assert_eq!(p["energy_wh"], 1234.5);
        assert_eq!(p["power_w"], -250.0);
        assert_eq!(p["power_factor"], 0.98);
        assert_eq!(p["ts"], "2024-05-01T12:00:00.123Z");
        assert_eq!(p.as_object().unwrap().len(), 4);
        assert_eq!(mask(&v), 0b0010_0011);
    }

    #[test]
    fn values_follow_the_table() {
        let r: Reading = serde_json::from_str(
            r#"{"type":"reading","epoch":1,"seq":0,"ts_ms":0,"meter":"m",
                "energy_wh":1,"power_w":2,"voltage_v":3,"current_a":4,
                "frequency_hz":5,"power_factor":0.6,"reactive_power_var":7}"#,
        )
        .unwrap();
        let v = values(&r);
        // Each value sits at the index of its measurement's key.
        let json: Value = serde_json::to_value(&r).unwrap();
        for (m, v) in MEASUREMENTS.iter().zip(v) {
            assert_eq!(json[m.kind.name()].as_f64(), v, "{}", m.kind);
        }
    }

    #[test]
    fn every_measurement_of_the_list_is_published_once() {
        let mut kinds: Vec<Kind> = MEASUREMENTS.iter().map(|m| m.kind).collect();
        kinds.sort();
        assert_eq!(kinds, Kind::ALL.to_vec());
    }
}
