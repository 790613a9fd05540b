//! The bridge's counters: the atomics the tasks and the handle share, and
//! the snapshot `/metrics` renders.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The counters behind [`MqttStats`], shared by the handle and the tasks.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// The client is connected to the broker.
    pub(crate) connected: AtomicBool,
    /// PUBLISH packets written to the broker connection.
    pub(crate) published: AtomicU64,
    /// Hub calls refused: the bridge queue was full (or the bridge had
    /// stopped).
    pub(crate) dropped_queue_full: AtomicU64,
    /// State messages that were due but never reached the broker (it was
    /// slow, unreachable, or the connection dropped them).
    pub(crate) dropped_backlog: AtomicU64,
    /// Readings not taken as a state: not newer than the meter's newest,
    /// or backlog on arrival.
    pub(crate) backfill_ignored: AtomicU64,
    /// Readings of removed devices or of the reserved device id `hub`.
    pub(crate) ignored: AtomicU64,
    /// Successful connects after the first.
    pub(crate) reconnects: AtomicU64,
    /// Connection errors (failed connects and lost connections).
    pub(crate) errors: AtomicU64,
}

impl Counters {
    /// The counters now.
    pub(crate) fn snapshot(&self) -> MqttStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MqttStats {
            connected: self.connected.load(Ordering::Relaxed),
            published: l(&self.published),
            dropped_queue_full: l(&self.dropped_queue_full),
            dropped_backlog: l(&self.dropped_backlog),
            backfill_ignored: l(&self.backfill_ignored),
            ignored: l(&self.ignored),
            reconnects: l(&self.reconnects),
            errors: l(&self.errors),
        }
    }
}

/// A snapshot of the bridge's counters, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MqttStats {
    /// Connected to the broker right now.
    pub connected: bool,
    /// PUBLISH packets written to the broker connection.
    pub published: u64,
    /// Hub calls dropped because the bridge queue was full (or the bridge
    /// had stopped).
    pub dropped_queue_full: u64,
    /// State messages that were due but never reached the broker (slow or
    /// unreachable broker, lost connection).
    pub dropped_backlog: u64,
    /// Readings not published as state by design: not newer than the
    /// meter's newest, or backlog on arrival.
    pub backfill_ignored: u64,
    /// Readings of removed devices or of the reserved device id `hub`.
    pub ignored: u64,
    /// Successful reconnects.
    pub reconnects: u64,
    /// Connection errors (failed attempts and lost connections).
    pub errors: u64,
}

impl MqttStats {
    /// Appends the Prometheus text exposition of these counters.
    pub fn render_prometheus(&self, out: &mut String) {
        use std::fmt::Write;
        let mut g = |name: &str, kind: &str, help: &str, lines: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        g(
            "ems_mqtt_connected",
            "gauge",
            "Whether the MQTT bridge is connected to its broker.",
            &[("", u64::from(self.connected))],
        );
        g(
            "ems_mqtt_published_total",
            "counter",
            "MQTT messages written to the broker.",
            &[("", self.published)],
        );
        g(
            "ems_mqtt_dropped_total",
            "counter",
            "MQTT bridge losses: hub events refused on a full queue, due state messages that never reached the broker.",
            &[
                ("{reason=\"queue_full\"}", self.dropped_queue_full),
                ("{reason=\"backlog\"}", self.dropped_backlog),
            ],
        );
        g(
            "ems_mqtt_backfill_ignored_total",
            "counter",
            "Readings not published as current state because they were backlog.",
            &[("", self.backfill_ignored)],
        );
        g(
            "ems_mqtt_ignored_total",
            "counter",
            "Readings of removed devices (or the reserved id hub) not published.",
            &[("", self.ignored)],
        );
        g(
            "ems_mqtt_reconnects_total",
            "counter",
            "Reconnects of the MQTT bridge.",
            &[("", self.reconnects)],
        );
        g(
            "ems_mqtt_errors_total",
            "counter",
            "MQTT connection errors (failed attempts and lost connections).",
            &[("", self.errors)],
        );
    }
}
