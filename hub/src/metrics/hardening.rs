//! Counters of the defences: write deadlines, connection and query
//! limits, and the tokens held in memory.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A limit that refused a connection or a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--max-connections` (503 + `Retry-After`).
    Connections,
    /// `--max-connections-per-ip` (429).
    PerAddress,
    /// `--max-dashboards-per-token` (429).
    DashboardsPerToken,
    /// One heavy query at a time per viewer token (429).
    HeavyQueries,
}

impl Limit {
    const ALL: [Limit; 4] = [
        Limit::Connections,
        Limit::PerAddress,
        Limit::DashboardsPerToken,
        Limit::HeavyQueries,
    ];

    fn label(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::PerAddress => "per_address",
            Limit::DashboardsPerToken => "dashboards_per_token",
            Limit::HeavyQueries => "heavy_queries",
        }
    }
}

/// Counters of the defences against clients that stop reading, open too
/// much, or forge tokens; and of the tokens held in memory.
#[derive(Debug, Default)]
pub struct Hardening {
    /// Connections cut because a write stayed blocked past its deadline.
    pub write_timeouts: AtomicU64,
    /// Refusals by limit, indexed like `Limit::ALL`.
    refusals: [AtomicU64; 4],
    /// Connections holding a slot of `--max-connections` (gauge).
    pub connections: AtomicI64,
    /// Reads of the token change counter.
    pub token_reads: AtomicU64,
    /// Reloads of every token (the counter had moved).
    pub token_reloads: AtomicU64,
    /// Tokens held in memory (gauge).
    pub tokens_held: AtomicI64,
    /// When the accept loop last turned (ms on the process's monotonic
    /// clock; for the systemd watchdog, not rendered).
    pub accept_alive_ms: AtomicU64,
}

impl Hardening {
    /// Counts one refusal by `limit`.
    pub fn refused(&self, limit: Limit) {
        if let Some(i) = Limit::ALL.iter().position(|l| *l == limit) {
            self.refusals[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn render(&self, o: &mut String) {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            o,
            "ems_write_timeouts_total",
            "counter",
            "Connections cut because a write to a peer that stopped reading passed its deadline.",
        );
        let _ = writeln!(o, "ems_write_timeouts_total {}", ld(&self.write_timeouts));
        head(
            o,
            "ems_limit_refusals_total",
            "counter",
            "Connections and requests refused by a limit.",
        );
        for (i, l) in Limit::ALL.iter().enumerate() {
            let _ = writeln!(
                o,
                "ems_limit_refusals_total{{limit=\"{}\"}} {}",
                l.label(),
                ld(&self.refusals[i])
            );
        }
        head(
            o,
            "ems_http_connections",
            "gauge",
            "Connections holding a slot of --max-connections (upgraded sockets included).",
        );
        let _ = writeln!(
            o,
            "ems_http_connections {}",
            self.connections.load(Ordering::Relaxed).max(0)
        );
        head(
            o,
            "ems_token_reads_total",
            "counter",
            "Reads of the store's token change counter.",
        );
        let _ = writeln!(o, "ems_token_reads_total {}", ld(&self.token_reads));
        head(
            o,
            "ems_token_reloads_total",
            "counter",
            "Reloads of every token after the change counter moved.",
        );
        let _ = writeln!(o, "ems_token_reloads_total {}", ld(&self.token_reloads));
        head(
            o,
            "ems_tokens_held",
            "gauge",
            "Device, viewer and admin tokens held in memory.",
        );
        let _ = writeln!(
            o,
            "ems_tokens_held {}",
            self.tokens_held.load(Ordering::Relaxed).max(0)
        );
    }
}
