//! Prometheus metrics of a running hub, served at `GET /metrics` in the
//! text exposition format (version 0.0.4).
//!
//! Why a hand-written module instead of a crate such as `prometheus-client`:
//! the set is small and fixed (no dynamic label sets except the reject
//! reasons, which are a closed enum), every update on the hot path is one
//! relaxed atomic add, and rendering is a few dozen lines — a dependency
//! would add more code than it saves. Labels are closed sets only (roles,
//! outcomes, reasons): no device id, peer address, token or URL ever
//! becomes a label or a value, so `/metrics` cannot leak secrets and its
//! series count does not grow with the fleet.
//!
//! The edge outbox status (the `status` frame) is exported as fleet-wide
//! aggregates computed at scrape time from the [`crate::fanout::registry`]: the
//! number of devices reporting a backlog, the largest backlog and the
//! largest lag — per-device detail is in the registry for the dashboard and
//! admin API, not in Prometheus.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use ems_shared::RejectReason;

use crate::store::QuarantineReason;

mod edge;
mod hardening;
mod histogram;
mod quarantine;

pub use crate::energy::flags::FlagCounts;
pub use edge::EdgeSummary;
pub use hardening::{Hardening, Limit};
pub use histogram::Histogram;
use histogram::{BATCH_BOUNDS, LATENCY_BOUNDS};
pub use quarantine::QuarantineMetrics;

/// Outcome of one HTTP request on a WebSocket route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// 101: upgraded.
    Upgraded,
    /// 401: no bearer token.
    Unauthorized,
    /// 403: wrong, unknown, revoked or other-device token.
    Forbidden,
    /// 400: query string, bad device id, malformed header.
    BadRequest,
    /// 426/405: not a WebSocket upgrade.
    NotUpgrade,
    /// 503/500: the store could not be asked.
    Unavailable,
}

impl Handshake {
    const ALL: [Handshake; 6] = [
        Handshake::Upgraded,
        Handshake::Unauthorized,
        Handshake::Forbidden,
        Handshake::BadRequest,
        Handshake::NotUpgrade,
        Handshake::Unavailable,
    ];

    fn label(self) -> &'static str {
        match self {
            Handshake::Upgraded => "upgraded",
            Handshake::Unauthorized => "unauthorized",
            Handshake::Forbidden => "forbidden",
            Handshake::BadRequest => "bad_request",
            Handshake::NotUpgrade => "not_upgrade",
            Handshake::Unavailable => "unavailable",
        }
    }
}

/// Connection role, for per-role series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `/ws/device/…`
    Device,
    /// `/ws/dashboard/…`
    Dashboard,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Dashboard => "dashboard",
        }
    }
}

/// Every counter and gauge of the hub. One instance per [`crate::run`],
/// shared by reference; all updates are relaxed atomic operations.
#[derive(Debug)]
pub struct Metrics {
    /// Open device connections (gauge).
    pub devices_connected: AtomicI64,
    /// Open dashboard connections (gauge).
    pub dashboards_connected: AtomicI64,
    /// Handshake outcomes, indexed like `Handshake::ALL`.
    handshakes: [AtomicU64; 6],
    /// Text and binary frames received from devices.
    pub frames_received: AtomicU64,
    /// Readings that passed the gatekeeper.
    pub readings_valid: AtomicU64,
    /// Refused frames, indexed like `RejectReason::ALL`.
    rejected: Vec<AtomicU64>,
    /// `status` frames received from edges.
    pub status_frames: AtomicU64,
    /// Frames written to dashboard subscribers.
    pub broadcast_deliveries: AtomicU64,
    /// Subscribers dropped because they could not keep up.
    pub subscribers_dropped_slow: AtomicU64,
    /// Device connections replaced by a newer one (4000).
    pub takeovers: AtomicU64,
    /// Connections closed or refused for a takeover loop (4002).
    pub takeover_conflicts: AtomicU64,
    /// Connections closed because their token was revoked or rotated (4001).
    pub revoked_closes: AtomicU64,
    /// Connections closed for persistent rate-limit abuse (1008).
    pub abuse_closes: AtomicU64,
    /// Ack frames sent to devices.
    pub acks_sent: AtomicU64,
    /// Connections declared dead after missed pongs, per role.
    heartbeat_deaths: [AtomicU64; 2],
    /// Readings in the writer queue (gauge, updated by sessions and writer).
    pub queue_depth: AtomicI64,
    /// Capacity of the writer queue (constant).
    pub queue_capacity: AtomicI64,
    /// Rows per committed batch.
    pub batch_size: Histogram,
    /// Seconds from the start of a commit to its success (retries included).
    pub commit_latency: Histogram,
    /// Failed commit attempts (each is retried).
    pub commit_failures: AtomicU64,
    /// 1 while the writer's last commit succeeded (or it has not failed yet).
    pub store_writer_ok: AtomicI64,
    /// 1 while the last store poll (revocation check) succeeded.
    pub store_poll_ok: AtomicI64,
    /// The quarantine and what the writer could not store.
    pub quarantine: QuarantineMetrics,
    /// Write deadlines, limits, and the tokens held in memory.
    pub hardening: Hardening,
    /// Stored readings by plausibility flag (the writer's store bumps it).
    pub reading_flags: std::sync::Arc<FlagCounts>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All zero; the store counts as healthy until proven otherwise.
    pub fn new() -> Self {
        Metrics {
            devices_connected: AtomicI64::new(0),
            dashboards_connected: AtomicI64::new(0),
            handshakes: Default::default(),
            frames_received: AtomicU64::new(0),
            readings_valid: AtomicU64::new(0),
            rejected: RejectReason::ALL
                .iter()
                .map(|_| AtomicU64::new(0))
                .collect(),
            status_frames: AtomicU64::new(0),
            broadcast_deliveries: AtomicU64::new(0),
            subscribers_dropped_slow: AtomicU64::new(0),
            takeovers: AtomicU64::new(0),
            takeover_conflicts: AtomicU64::new(0),
            revoked_closes: AtomicU64::new(0),
            abuse_closes: AtomicU64::new(0),
            acks_sent: AtomicU64::new(0),
            heartbeat_deaths: Default::default(),
            queue_depth: AtomicI64::new(0),
            queue_capacity: AtomicI64::new(0),
            batch_size: Histogram::new(BATCH_BOUNDS),
            commit_latency: Histogram::new(LATENCY_BOUNDS),
            commit_failures: AtomicU64::new(0),
            store_writer_ok: AtomicI64::new(1),
            store_poll_ok: AtomicI64::new(1),
            quarantine: QuarantineMetrics::default(),
            hardening: Hardening::default(),
            reading_flags: Default::default(),
        }
    }

    /// Counts one row committed to quarantine.
    pub fn quarantined(&self, reason: QuarantineReason) {
        self.quarantine.add(reason);
    }

    /// Counts one handshake outcome.
    pub fn handshake(&self, outcome: Handshake) {
        if let Some(i) = Handshake::ALL.iter().position(|h| *h == outcome) {
            self.handshakes[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one refused frame.
    pub fn rejected(&self, reason: RejectReason) {
        if let Some(i) = RejectReason::ALL.iter().position(|r| *r == reason) {
            if let Some(c) = self.rejected.get(i) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Refused frames so far for `reason`.
    pub fn rejected_count(&self, reason: RejectReason) -> u64 {
        RejectReason::ALL
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.rejected.get(i))
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Counts a connection declared dead by the heartbeat.
    pub fn heartbeat_death(&self, role: Role) {
        self.heartbeat_deaths[role as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Adjusts the open-connection gauge of `role` by `delta`.
    pub fn connection(&self, role: Role, delta: i64) {
        match role {
            Role::Device => self.devices_connected.fetch_add(delta, Ordering::Relaxed),
            Role::Dashboard => self
                .dashboards_connected
                .fetch_add(delta, Ordering::Relaxed),
        };
    }

    /// Records a committed batch of `rows` that took `took` (retries included).
    pub fn committed(&self, rows: usize, took: Duration) {
        self.batch_size.observe(rows as f64);
        self.commit_latency.observe(took.as_secs_f64());
        self.store_writer_ok.store(1, Ordering::Relaxed);
    }

    /// Whether the store is reachable (writer and poller both healthy) and
    /// the writer queue has room: the `/readyz` rule.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.store_writer_ok.load(Ordering::Relaxed) == 0 {
            return Err("store writer failing");
        }
        if self.store_poll_ok.load(Ordering::Relaxed) == 0 {
            return Err("store unreachable");
        }
        let cap = self.queue_capacity.load(Ordering::Relaxed);
        if cap > 0 && self.queue_depth.load(Ordering::Relaxed) >= cap {
            return Err("writer queue full");
        }
        Ok(())
    }

    /// The text exposition. `edge` is the fleet's outbox summary.
    pub fn render(&self, edge: &EdgeSummary) -> String {
        let mut o = String::with_capacity(8 * 1024);
        let g = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let li = |a: &AtomicI64| a.load(Ordering::Relaxed);

        g(
            &mut o,
            "ems_connections",
            "gauge",
            "Open WebSocket connections by role.",
        );
        let _ = writeln!(
            o,
            "ems_connections{{role=\"device\"}} {}",
            li(&self.devices_connected)
        );
        let _ = writeln!(
            o,
            "ems_connections{{role=\"dashboard\"}} {}",
            li(&self.dashboards_connected)
        );

        g(
            &mut o,
            "ems_handshakes_total",
            "counter",
            "WebSocket handshakes by outcome.",
        );
        for (i, h) in Handshake::ALL.iter().enumerate() {
            let _ = writeln!(
                o,
                "ems_handshakes_total{{outcome=\"{}\"}} {}",
                h.label(),
                ld(&self.handshakes[i])
            );
        }

        g(
            &mut o,
            "ems_frames_received_total",
            "counter",
            "Frames received from devices (valid or not).",
        );
        let _ = writeln!(o, "ems_frames_received_total {}", ld(&self.frames_received));
        g(
            &mut o,
            "ems_readings_valid_total",
            "counter",
            "Readings that passed the gatekeeper.",
        );
        let _ = writeln!(o, "ems_readings_valid_total {}", ld(&self.readings_valid));
        g(
            &mut o,
            "ems_readings_rejected_total",
            "counter",
            "Refused frames by reason.",
        );
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            let n = self.rejected.get(i).map(ld).unwrap_or(0);
            let _ = writeln!(
                o,
                "ems_readings_rejected_total{{reason=\"{}\"}} {n}",
                r.code()
            );
        }
        g(
            &mut o,
            "ems_status_frames_total",
            "counter",
            "Edge outbox status frames received.",
        );
        let _ = writeln!(o, "ems_status_frames_total {}", ld(&self.status_frames));

        g(
            &mut o,
            "ems_broadcast_deliveries_total",
            "counter",
            "Frames written to dashboard subscribers.",
        );
        let _ = writeln!(
            o,
            "ems_broadcast_deliveries_total {}",
            ld(&self.broadcast_deliveries)
        );
        g(
            &mut o,
            "ems_subscribers_dropped_slow_total",
            "counter",
            "Dashboard subscribers dropped for not keeping up.",
        );
        let _ = writeln!(
            o,
            "ems_subscribers_dropped_slow_total {}",
            ld(&self.subscribers_dropped_slow)
        );

        g(
            &mut o,
            "ems_takeovers_total",
            "counter",
            "Device connections replaced by a newer one (close 4000).",
        );
        let _ = writeln!(o, "ems_takeovers_total {}", ld(&self.takeovers));
        g(
            &mut o,
            "ems_takeover_conflicts_total",
            "counter",
            "Connections refused or closed for a takeover loop (close 4002).",
        );
        let _ = writeln!(
            o,
            "ems_takeover_conflicts_total {}",
            ld(&self.takeover_conflicts)
        );
        g(
            &mut o,
            "ems_revoked_closes_total",
            "counter",
            "Device connections closed because their token was revoked or rotated (close 4001).",
        );
        let _ = writeln!(o, "ems_revoked_closes_total {}", ld(&self.revoked_closes));
        g(
            &mut o,
            "ems_abuse_closes_total",
            "counter",
            "Device connections closed for persistent rate-limit abuse (close 1008).",
        );
        let _ = writeln!(o, "ems_abuse_closes_total {}", ld(&self.abuse_closes));
        g(
            &mut o,
            "ems_acks_sent_total",
            "counter",
            "Ack frames sent to devices.",
        );
        let _ = writeln!(o, "ems_acks_sent_total {}", ld(&self.acks_sent));
        g(
            &mut o,
            "ems_heartbeat_deaths_total",
            "counter",
            "Connections declared dead after unanswered pings.",
        );
        for role in [Role::Device, Role::Dashboard] {
            let _ = writeln!(
                o,
                "ems_heartbeat_deaths_total{{role=\"{}\"}} {}",
                role.label(),
                ld(&self.heartbeat_deaths[role as usize])
            );
        }

        g(
            &mut o,
            "ems_store_queue_depth",
            "gauge",
            "Readings queued for the store writer.",
        );
        let _ = writeln!(o, "ems_store_queue_depth {}", li(&self.queue_depth).max(0));
        g(
            &mut o,
            "ems_store_queue_capacity",
            "gauge",
            "Capacity of the store writer queue.",
        );
        let _ = writeln!(o, "ems_store_queue_capacity {}", li(&self.queue_capacity));
        self.batch_size
            .render(&mut o, "ems_store_batch_rows", "Rows per committed batch.");
        self.commit_latency.render(
            &mut o,
            "ems_store_commit_seconds",
            "Time to commit a batch, retries included.",
        );
        g(
            &mut o,
            "ems_store_commit_failures_total",
            "counter",
            "Failed commit attempts (retried until they succeed).",
        );
        let _ = writeln!(
            o,
            "ems_store_commit_failures_total {}",
            ld(&self.commit_failures)
        );
        g(
            &mut o,
            "ems_store_up",
            "gauge",
            "1 when the store is reachable (writer and poller healthy).",
        );
        let up = i64::from(self.ready_store());
        let _ = writeln!(o, "ems_store_up {up}");

        g(
            &mut o,
            "ems_edge_devices_reporting",
            "gauge",
            "Connected devices that sent an outbox status.",
        );
        let _ = writeln!(o, "ems_edge_devices_reporting {}", edge.reporting);
        g(
            &mut o,
            "ems_edge_devices_behind",
            "gauge",
            "Connected devices whose outbox holds readings older than 60 s.",
        );
        let _ = writeln!(o, "ems_edge_devices_behind {}", edge.behind);
        g(
            &mut o,
            "ems_edge_outbox_readings_max",
            "gauge",
            "Largest outbox depth reported by a connected device.",
        );
        let _ = writeln!(o, "ems_edge_outbox_readings_max {}", edge.max_depth);
        g(
            &mut o,
            "ems_edge_outbox_readings_sum",
            "gauge",
            "Sum of the outbox depths reported by connected devices.",
        );
        let _ = writeln!(o, "ems_edge_outbox_readings_sum {}", edge.sum_depth);
        g(
            &mut o,
            "ems_edge_behind_seconds_max",
            "gauge",
            "Largest age of an unsent reading among connected devices.",
        );
        let _ = writeln!(
            o,
            "ems_edge_behind_seconds_max {}",
            edge.max_behind_ms as f64 / 1000.0
        );
        edge.render_losses(&mut o);
        self.quarantine.render(&mut o);
        self.hardening.render(&mut o);
        self.reading_flags.render(&mut o);
        o
    }

    pub(crate) fn ready_store(&self) -> bool {
        self.store_writer_ok.load(Ordering::Relaxed) == 1
            && self.store_poll_ok.load(Ordering::Relaxed) == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_zeros() {
        let m = Metrics::new();
        m.handshake(Handshake::Forbidden);
        m.rejected(RejectReason::RateLimited);
        m.batch_size.observe(3.0);
        m.commit_latency.observe(0.002);
        let text = m.render(&EdgeSummary::default());
        assert!(
            text.contains("ems_handshakes_total{outcome=\"forbidden\"} 1"),
            "{text}"
        );
        assert!(text.contains("ems_readings_rejected_total{reason=\"rate_limited\"} 1"));
        assert!(text.contains("ems_readings_rejected_total{reason=\"invalid_json\"} 0"));
        assert!(text.contains("ems_store_batch_rows_bucket{le=\"5\"} 1"));
        assert!(text.contains("ems_store_batch_rows_bucket{le=\"+Inf\"} 1"));
        assert!(text.contains("ems_store_batch_rows_bucket{le=\"2\"} 0"));
        assert!(text.contains("ems_store_commit_seconds_count 1"));
        m.quarantined(QuarantineReason::StoreError);
        let text = m.render(&EdgeSummary::default());
        assert!(text.contains("ems_quarantined_total{reason=\"store_error\"} 1"));
        assert!(text.contains("ems_quarantined_total{reason=\"out_of_range\"} 0"));
        assert!(text.contains("ems_store_readings_abandoned_total 0"));
        assert!(text.contains("ems_edge_dropped_readings_sum{cause=\"disk_full\"} 0"));
        m.reading_flags.add(&[0, 2, 0, 1]);
        let text = m.render(&EdgeSummary::default());
        assert!(text.contains("ems_reading_flags_total{flag=\"frequency_range\"} 2"));
        assert!(text.contains("ems_reading_flags_total{flag=\"counter_reset\"} 1"));
        assert!(text.contains("ems_reading_flags_total{flag=\"power_mismatch\"} 0"));
        // Every sample line is `name{labels} value` with a numeric value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let v = line.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn hardening_counters_are_rendered() {
        let m = Metrics::new();
        m.hardening.refused(Limit::PerAddress);
        m.hardening.write_timeouts.fetch_add(2, Ordering::Relaxed);
        let text = m.render(&EdgeSummary::default());
        assert!(text.contains("ems_limit_refusals_total{limit=\"per_address\"} 1"));
        assert!(text.contains("ems_limit_refusals_total{limit=\"connections\"} 0"));
        assert!(text.contains("ems_write_timeouts_total 2"));
        assert!(text.contains("ems_tokens_held 0"));
    }

    #[test]
    fn readiness_follows_store_and_queue() {
        let m = Metrics::new();
        m.queue_capacity.store(10, Ordering::Relaxed);
        assert!(m.ready().is_ok());
        m.queue_depth.store(10, Ordering::Relaxed);
        assert_eq!(m.ready(), Err("writer queue full"));
        m.queue_depth.store(3, Ordering::Relaxed);
        m.store_poll_ok.store(0, Ordering::Relaxed);
        assert_eq!(m.ready(), Err("store unreachable"));
    }
}
