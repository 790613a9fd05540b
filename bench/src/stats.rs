//! Shared measurement state: HDR histograms, counters, per-device send-time
//! rings, and the server process's CPU time and RSS from `/proc`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// A latency histogram in microseconds (1 µs .. 10 min, 3 significant
/// digits), shared by every task behind a short lock.
pub struct Latency {
    hist: Mutex<Histogram<u64>>,
}

impl Latency {
    pub fn new() -> Self {
        let hist = Histogram::new_with_bounds(1, 600_000_000, 3)
            .expect("static histogram bounds are valid");
        Latency {
            hist: Mutex::new(hist),
        }
    }

    pub fn record(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 600_000_000);
        let mut h = self.hist.lock().unwrap_or_else(|p| p.into_inner());
        let _ = h.record(us);
    }

    pub fn count(&self) -> u64 {
        self.hist.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// `name: n=… p50=… p99=… p99.9=… max=…` in milliseconds.
    pub fn line(&self, name: &str) -> String {
        let h = self.hist.lock().unwrap_or_else(|p| p.into_inner());
        if h.is_empty() {
            return format!("{name:<22} n=0");
        }
        let ms = |v: u64| v as f64 / 1000.0;
        format!(
            "{name:<22} n={} p50={:.3}ms p99={:.3}ms p99.9={:.3}ms max={:.3}ms mean={:.3}ms",
            h.len(),
            ms(h.value_at_quantile(0.50)),
            ms(h.value_at_quantile(0.99)),
            ms(h.value_at_quantile(0.999)),
            ms(h.max()),
            h.mean() / 1000.0
        )
    }
}

/// Send times of one device's readings, indexed by `seq % len`, as
/// nanoseconds since the run's base instant (+1; 0 = empty). The device
/// task writes, subscribers read.
pub struct SendRing {
    slots: Box<[AtomicU64]>,
    mask: u64,
}

impl SendRing {
    pub fn new(len: usize) -> Self {
        let len = len.next_power_of_two().max(8);
        SendRing {
            slots: (0..len).map(|_| AtomicU64::new(0)).collect(),
            mask: len as u64 - 1,
        }
    }

    pub fn put(&self, seq: u64, nanos: u64) {
        self.slots[(seq & self.mask) as usize].store(nanos + 1, Ordering::Relaxed);
    }

    pub fn get(&self, seq: u64) -> Option<u64> {
        match self.slots[(seq & self.mask) as usize].load(Ordering::Relaxed) {
            0 => None,
            v => Some(v - 1),
        }
    }
}

/// Per-device state shared between its sender and its subscribers.
pub struct DeviceShared {
    pub ring: SendRing,
    /// Readings sent (the next seq to send, as seqs start at 0).
    pub sent: AtomicU64,
}

/// Everything a run measures.
pub struct Stats {
    pub base: Instant,
    /// `base` as Unix time in nanoseconds (to line the ack log up with
    /// other tools' clocks).
    pub base_unix_ns: u64,
    /// Every ack as (send time in `nanos()`, latency in µs), when the run
    /// writes an ack log.
    pub ack_log: Option<Mutex<Vec<(u64, u32)>>>,
    pub ack: Latency,
    pub live: Latency,
    pub connect: Latency,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub delivered: AtomicU64,
    /// When the last live delivery arrived (`nanos()`).
    pub last_delivery_ns: AtomicU64,
    pub rejected: AtomicU64,
    pub errors: AtomicU64,
    pub connect_errors: AtomicU64,
    pub closed_early: AtomicU64,
    pub devices: Vec<DeviceShared>,
}

impl Stats {
    pub fn new(devices: usize, ring: usize, ack_log: bool) -> Arc<Self> {
        let base_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Arc::new(Stats {
            base: Instant::now(),
            base_unix_ns,
            ack_log: ack_log.then(|| Mutex::new(Vec::new())),
            ack: Latency::new(),
            live: Latency::new(),
            connect: Latency::new(),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            closed_early: AtomicU64::new(0),
            devices: (0..devices)
                .map(|_| DeviceShared {
                    ring: SendRing::new(ring),
                    sent: AtomicU64::new(0),
                })
                .collect(),
        })
    }

    pub fn nanos(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Records the ack of a reading sent at `sent` (`nanos()`), received
    /// at `now`.
    pub fn record_ack(&self, sent: u64, now: u64) {
        let lat = Duration::from_nanos(now.saturating_sub(sent));
        self.ack.record(lat);
        self.acked.fetch_add(1, Ordering::Relaxed);
        if let Some(log) = &self.ack_log {
            let us = lat.as_micros().min(u32::MAX as u128) as u32;
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((sent, us));
        }
    }

    /// Writes the ack log: one line per ack, `SEND_UNIX_S LATENCY_US`,
    /// in the order the acks arrived.
    pub fn write_ack_log(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        let Some(log) = &self.ack_log else {
            return Ok(());
        };
        let log = log.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for &(sent, us) in log.iter() {
            let unix = self.base_unix_ns + sent;
            writeln!(
                out,
                "{}.{:06} {us}",
                unix / 1_000_000_000,
                unix % 1_000_000_000 / 1000
            )?;
        }
        out.flush()
    }

    /// Records a live delivery of `seq` of device `dev` received now.
    pub fn delivered(&self, dev: usize, seq: u64) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let now = self.nanos();
        self.last_delivery_ns.fetch_max(now, Ordering::Relaxed);
        if let Some(t) = self.devices.get(dev).and_then(|d| d.ring.get(seq)) {
            self.live
                .record(Duration::from_nanos(now.saturating_sub(t)));
        }
    }
}

/// Finds `"seq":N` in a reading's JSON without a full parse.
pub fn find_seq(text: &[u8]) -> Option<u64> {
    find_u64(text, b"\"seq\":")
}

/// Finds `"epoch":N` in a reading's JSON without a full parse.
pub fn find_epoch(text: &[u8]) -> Option<u64> {
    find_u64(text, b"\"epoch\":")
}

/// The unsigned integer after `key` (a quoted key with its colon).
fn find_u64(text: &[u8], key: &[u8]) -> Option<u64> {
    // Compare only where a quote starts (`windows().position()` calls
    // memcmp at every byte).
    let pos = text
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'"')
        .map(|(i, _)| i)
        .find(|&i| text[i..].starts_with(key))?;
    let mut n: u64 = 0;
    let mut any = false;
    for &b in &text[pos + key.len()..] {
        if b.is_ascii_digit() {
            n = n.checked_mul(10)?.checked_add((b - b'0') as u64)?;
            any = true;
        } else if b == b' ' && !any {
            continue;
        } else {
            break;
        }
    }
    any.then_some(n)
}

/// CPU time and memory of a process, from `/proc/<pid>/stat` and
/// `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// utime + stime in seconds.
    pub cpu_s: f64,
    /// VmRSS in KiB.
    pub rss_kib: u64,
    /// VmHWM (peak RSS) in KiB.
    pub hwm_kib: u64,
    pub threads: u64,
}

pub fn proc_sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`, which may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let threads: u64 = f.get(17)?.parse().ok()?;
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        cpu_s: (utime + stime) / tck.max(1.0),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        threads,
    })
}

/// Samples the server's RSS every 250 ms to report the peak within a window
/// (VmHWM covers the whole process life).
pub struct RssWatch {
    pub peak_kib: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl RssWatch {
    pub fn start(pid: Option<u32>) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(pid) = pid {
            let (p, s) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Some(x) = proc_sample(pid) {
                        p.fetch_max(x.rss_kib, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            });
        }
        RssWatch {
            peak_kib: peak,
            stop,
        }
    }

    pub fn stop(&self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.peak_kib.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_seq() {
        assert_eq!(
            find_seq(br#"{"type":"reading","epoch":1,"seq":12345,"ts_ms":1}"#),
            Some(12345)
        );
        assert_eq!(find_seq(br#"{"seq": 7}"#), Some(7));
        assert_eq!(find_seq(br#"{"epoch":1}"#), None);
        assert_eq!(
            find_epoch(br#"{"type":"reading","epoch":1764000000123,"seq":5}"#),
            Some(1_764_000_000_123)
        );
        assert_eq!(find_epoch(br#"{"seq":5}"#), None);
    }

    #[test]
    fn ring_round_trip() {
        let r = SendRing::new(10);
        assert_eq!(r.get(3), None);
        r.put(3, 0);
        assert_eq!(r.get(3), Some(0));
        r.put(19, 42);
        assert_eq!(r.get(3), Some(42));
    }

    #[test]
    fn proc_of_self() {
        let s = proc_sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0);
        assert!(s.threads >= 1);
    }
}
