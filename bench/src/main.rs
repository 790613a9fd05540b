//! `ems-bench`: load generator for the EMS hub (and the same pattern against
//! Mosquitto, for a side-by-side comparison).
//!
//! - `ems-bench provision --database URL --count N --out FILE` provisions N
//!   devices (and one all-devices viewer) in bulk and writes their tokens.
//! - `ems-bench run --tokens FILE …` opens dashboards and devices, streams
//!   readings at R Hz for a bounded time and prints HDR latency lines
//!   (device→dashboard, device→ack, connect), throughput, loss, errors and the
//!   server's CPU/RSS from `/proc/<pid>` (`--server-pid`).
//! - `ems-bench run --mode mqtt --target mqtt://127.0.0.1:1883 …` runs the
//!   same pattern against an MQTT broker.
//! - `ems-bench watch --device ID --duration SECS --out FILE` is one
//!   dashboard subscriber that logs every live reading's arrival time in
//!   microseconds (the edge scenario, `bench/scripts/edge.sh`).
//! - `ems-bench forge --rate HZ --duration SECS` floods a hub with
//!   handshakes carrying well-formed unknown device tokens and prints how
//!   it answered (`bench/scripts/forged.sh` runs it beside real devices).
//!
//! Only loopback targets are accepted; every run stops by itself.

mod forge;
mod hub;
mod mqtt;
mod payload;
mod provision;
mod stats;
mod tally;
mod watch;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};

use stats::{proc_sample, ProcSample, RssWatch, Stats};
use tally::{LiveAccount, SeqTally};

#[derive(Parser)]
#[command(
    name = "ems-bench",
    version,
    about = "EMS load generator (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Provision devices in bulk (and one all-devices viewer); writes
    /// `ID TOKEN` lines (and `@viewer TOKEN`) to --out.
    Provision(provision::Args),
    /// Run a load scenario against a running hub or MQTT broker.
    Run(RunArgs),
    /// Follow one device as a dashboard and log each reading's arrival
    /// time in microseconds (viewer token in EMS_VIEWER_TOKEN).
    Watch(watch::Args),
    /// Flood a hub with handshakes carrying well-formed unknown tokens.
    Forge(forge::Args),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// ems-hub WebSockets.
    Hub,
    /// An MQTT broker (QoS 1 publishes = acks, QoS 0 subscriptions = live).
    Mqtt,
}

#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// What to drive.
    #[arg(long, value_enum, default_value_t = Mode::Hub)]
    pub mode: Mode,
    /// Server URL: ws://127.0.0.1:8080 (hub) or mqtt://127.0.0.1:1883.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub target: String,
    /// Token file from `ems-bench provision` (hub mode).
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// Device connections.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// The ack window devices announce in their handshake, in ms (as
    /// `ems-edge` does with its default `ack_window_ms`); 0: none, the hub
    /// answers each reading as soon as its commit cadence allows.
    #[arg(long, default_value_t = 4000)]
    pub ack_window_ms: u64,
    /// Readings per second per device (0: connect and hold only).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Dashboards.
    #[arg(long, default_value_t = 0)]
    pub dashboards: usize,
    /// Devices each dashboard follows (hub: one subscription socket per
    /// device; MQTT: one connection with that many subscriptions).
    #[arg(long, default_value_t = 1)]
    pub follow: usize,
    /// Fan-out: every dashboard follows device 0 (use --devices 1).
    #[arg(long)]
    pub fanout: bool,
    /// Seconds of sending (or of holding, with --rate 0).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds to wait at most for outstanding acks/deliveries afterwards.
    #[arg(long, default_value_t = 15.0)]
    pub drain: f64,
    /// Handshakes in flight at once during the connect phase.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Source addresses 127.0.0.1..=127.0.0.N (more ephemeral ports; hub mode).
    #[arg(long, default_value_t = 1)]
    pub source_ips: u8,
    /// Server process to read CPU time and RSS from (/proc/PID).
    #[arg(long, alias = "hub-pid")]
    pub server_pid: Option<u32>,
    /// Fraction of dashboard subscriptions that stop reading after
    /// --stall-after seconds.
    #[arg(long, default_value_t = 0.0)]
    pub stall_fraction: f64,
    /// Seconds after the start when stalling subscriptions stop reading.
    #[arg(long, default_value_t = 2.0)]
    pub stall_after: f64,
    /// SQLite file whose write lock the tool holds for --pause-for seconds
    /// (simulates a database pause).
    #[arg(long)]
    pub pause_db: Option<PathBuf>,
    /// Seconds after the start when the database pause begins.
    #[arg(long, default_value_t = 5.0)]
    pub pause_at: f64,
    /// Length of the database pause in seconds.
    #[arg(long, default_value_t = 30.0)]
    pub pause_for: f64,
    /// Tokio worker threads of the generator.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Upper bound on connections this run may open.
    #[arg(long, default_value_t = 40_000)]
    pub max_connections: usize,
    /// Label printed with the results.
    #[arg(long, default_value = "run")]
    pub label: String,
    /// Write every ack to this file as `SEND_UNIX_S LATENCY_US` (hub
    /// and MQTT mode), to compare acks by when their readings were sent.
    #[arg(long)]
    pub ack_log: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Provision(a) => provision::run(a),
        Command::Watch(a) => watch::run(a),
        Command::Forge(a) => {
            raise_nofile();
            forge::run(a)
        }
        Command::Run(a) => {
            raise_nofile();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(a.threads.max(1))
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            let ok = rt.block_on(run(a))?;
            rt.shutdown_timeout(Duration::from_secs(1));
            if !ok {
                std::process::exit(2);
            }
            Ok(())
        }
    }
}

/// Raises RLIMIT_NOFILE to its hard limit.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            // Root may raise the hard limit too; otherwise take the hard one.
            let want = libc::rlimit {
                rlim_cur: 262_144,
                rlim_max: lim.rlim_max.max(262_144),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                lim.rlim_cur = lim.rlim_max;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    eprintln!("warning: cannot raise RLIMIT_NOFILE");
                }
            }
        }
    }
}

/// Host and port of the target URL; refuses anything but loopback.
pub async fn loopback_target(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .context("target must look like ws://127.0.0.1:8080 or mqtt://127.0.0.1:1883")?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(hostport)
        .await
        .with_context(|| format!("cannot resolve {hostport}"))?
        .collect();
    if addrs.is_empty() {
        bail!("{hostport} resolves to nothing");
    }
    if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        bail!("refusing non-loopback target {a}: ems-bench only loads servers on this machine");
    }
    Ok(addrs[0])
}

/// The `i`-th source address (127.0.0.1 ..= 127.0.0.n).
pub fn source_ip(i: usize, n: u8) -> IpAddr {
    let k = (i % n.max(1) as usize) as u8 + 1;
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, k))
}

/// The plan every task of a run shares.
pub struct Plan {
    pub args: RunArgs,
    pub addr: SocketAddr,
    pub epoch: u64,
    /// Tokio instants of the sending window.
    pub start: tokio::time::Instant,
    pub stop: tokio::time::Instant,
    pub deadline: tokio::time::Instant,
    pub stats: Arc<Stats>,
    /// Set once every sender has finished (acks drained or deadline).
    pub senders_done: std::sync::atomic::AtomicBool,
}

/// Which device each dashboard subscription follows: dashboard `d` follows
/// `follow` consecutive devices starting at `d * follow` (wrapping), so
/// subscriptions spread evenly over the devices.
pub fn subscriptions(a: &RunArgs) -> Vec<Vec<usize>> {
    (0..a.dashboards)
        .map(|d| {
            if a.fanout {
                vec![0]
            } else {
                (0..a.follow.max(1))
                    .map(|k| (d * a.follow.max(1) + k) % a.devices.max(1))
                    .collect()
            }
        })
        .collect()
}

fn fmt_rate(n: u64, secs: f64) -> String {
    format!("{:.0}/s", n as f64 / secs.max(1e-9))
}

async fn run(a: RunArgs) -> anyhow::Result<bool> {
    if a.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if a.fanout && a.devices != 1 {
        bail!("--fanout uses one device: pass --devices 1");
    }
    let subs = subscriptions(&a);
    let sub_conns: usize = match a.mode {
        Mode::Hub => subs.iter().map(Vec::len).sum(),
        Mode::Mqtt => subs.len(),
    };
    let total_conns = a.devices + sub_conns;
    if total_conns > a.max_connections {
        bail!(
            "{total_conns} connections exceed --max-connections {}",
            a.max_connections
        );
    }
    if a.duration > 3600.0 || a.drain > 600.0 {
        bail!("--duration is capped at 3600 s and --drain at 600 s");
    }
    let addr = loopback_target(&a.target).await?;
    let ring = ((a.rate * 64.0) as usize).clamp(64, 1 << 20);
    let stats = Stats::new(a.devices, ring, a.ack_log.is_some());
    let pid = a.server_pid;
    let s0 = pid.and_then(proc_sample);

    println!(
        "== {} mode={:?} target={} devices={} rate={}Hz dashboards={} follow={} fanout={} subscriptions={} duration={}s",
        a.label,
        a.mode,
        a.target,
        a.devices,
        a.rate,
        a.dashboards,
        a.follow,
        a.fanout,
        subs.iter().map(Vec::len).sum::<usize>(),
        a.duration
    );

    // Connect phase: dashboards first (so they see every reading), then devices.
    let t_conn = Instant::now();
    let conns = match a.mode {
        Mode::Hub => AnyConns::Hub(hub::connect_all(&a, addr, &stats, &subs).await?),
        Mode::Mqtt => AnyConns::Mqtt(mqtt::connect_all(&a, addr, &stats, &subs).await?),
    };
    let conn_secs = t_conn.elapsed().as_secs_f64();
    let n_dev = conns.devices_connected();
    let n_sub = conns.subscribers_connected();
    let dev_secs = conns.device_connect_secs();
    println!(
        "connect: {} subscriber conns, {} devices in {:.2}s; device handshakes {:.2}s = {} ({} errors)",
        n_sub,
        n_dev,
        conn_secs,
        dev_secs,
        fmt_rate(n_dev as u64, dev_secs),
        stats.connect_errors.load(Ordering::Relaxed)
    );
    println!("{}", stats.connect.line("connect latency"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s1 = pid.and_then(proc_sample);
    if let (Some(b), Some(c)) = (s0, s1) {
        let per = (c.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / (n_dev + n_sub).max(1) as f64;
        println!(
            "server memory: rss before={:.1}MB after connect={:.1}MB -> {:.0} bytes/connection ({} connections), threads={}",
            b.rss_kib as f64 / 1024.0,
            c.rss_kib as f64 / 1024.0,
            per,
            n_dev + n_sub,
            c.threads
        );
    }

    let now = tokio::time::Instant::now();
    let start = now + Duration::from_millis(200);
    let stop = start + Duration::from_secs_f64(a.duration);
    let deadline = stop + Duration::from_secs_f64(a.drain);
    let plan = Arc::new(Plan {
        args: a.clone(),
        addr,
        epoch: payload::now_ms() as u64,
        start,
        stop,
        deadline,
        stats: stats.clone(),
        senders_done: std::sync::atomic::AtomicBool::new(false),
    });
    let watch = RssWatch::start(pid);
    let pauser = a
        .pause_db
        .clone()
        .map(|p| spawn_db_pause(p, a.pause_at + 0.2, a.pause_for));
    let progress = tokio::spawn(progress(plan.clone()));
    // The server's memory once the connections have been held for the
    // whole sending window, just before they close: with `--rate 0`, its
    // idle memory after whatever it does once a storm is over.
    let held = tokio::spawn(async move {
        tokio::time::sleep_until(stop - Duration::from_millis(100)).await;
        pid.and_then(proc_sample)
    });
    let t_run = Instant::now();
    let c0 = pid.and_then(proc_sample);
    let received = match conns {
        AnyConns::Hub(c) => hub::run_all(plan.clone(), c).await,
        AnyConns::Mqtt(c) => mqtt::run_all(plan.clone(), c).await,
    };
    let c1 = pid.and_then(proc_sample);
    if let (Some(b), Ok(Some(h))) = (s0, held.await) {
        let per = (h.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / (n_dev + n_sub).max(1) as f64;
        println!(
            "server memory held: rss={:.1}MB at the end of the sending window -> {:.0} bytes/connection",
            h.rss_kib as f64 / 1024.0,
            per
        );
    }
    let run_secs = t_run.elapsed().as_secs_f64();
    progress.abort();
    let peak = watch.stop();
    if let Some(h) = pauser {
        let _ = h.join();
    }
    if let Some(path) = &a.ack_log {
        stats
            .write_ack_log(path)
            .with_context(|| format!("cannot write the ack log {}", path.display()))?;
    }
    Ok(report(&plan, &received, c0, c1, peak, run_secs))
}

/// The connections of a run, ready to start.
pub struct Conns<D, S> {
    /// (device index, connection).
    pub devices: Vec<(usize, D)>,
    /// (devices followed, connection); hub mode has one device per entry.
    pub subs: Vec<(Vec<usize>, S)>,
    /// Wall time of the device connect phase.
    pub device_connect_secs: f64,
}

pub enum AnyConns {
    Hub(Conns<hub::Ws, hub::Ws>),
    Mqtt(Conns<mqtt::Client, mqtt::Client>),
}

impl AnyConns {
    fn devices_connected(&self) -> usize {
        match self {
            AnyConns::Hub(c) => c.devices.len(),
            AnyConns::Mqtt(c) => c.devices.len(),
        }
    }
    fn subscribers_connected(&self) -> usize {
        match self {
            AnyConns::Hub(c) => c.subs.len(),
            AnyConns::Mqtt(c) => c.subs.len(),
        }
    }
    fn device_connect_secs(&self) -> f64 {
        match self {
            AnyConns::Hub(c) => c.device_connect_secs,
            AnyConns::Mqtt(c) => c.device_connect_secs,
        }
    }
}

/// Per-subscription outcome: device followed, readings received, stalled,
/// and which readings they were.
pub struct SubResult {
    pub device: usize,
    /// Reading frames delivered (duplicates included).
    pub received: u64,
    pub stalled: bool,
    /// The `(epoch, seq)` keys received, for the gap and duplicate count.
    pub tally: SeqTally,
}

/// Holds the database's write lock for `secs` starting `at` seconds from now.
fn spawn_db_pause(path: PathBuf, at: f64, secs: f64) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs_f64(at));
        let r = (|| -> anyhow::Result<()> {
            let conn = rusqlite::Connection::open(&path)?;
            conn.busy_timeout(Duration::from_secs(30))?;
            conn.execute_batch("BEGIN EXCLUSIVE")?;
            println!(
                "db pause: write lock held on {} for {secs}s",
                path.display()
            );
            std::thread::sleep(Duration::from_secs_f64(secs));
            conn.execute_batch("COMMIT")?;
            println!("db pause: released");
            Ok(())
        })();
        if let Err(e) = r {
            eprintln!("db pause failed: {e:#}");
        }
    })
}

async fn progress(plan: Arc<Plan>) {
    let s = &plan.stats;
    let mut tick =
        tokio::time::interval_at(plan.start + Duration::from_secs(5), Duration::from_secs(5));
    let t0 = Instant::now();
    loop {
        tick.tick().await;
        let mem = plan
            .args
            .server_pid
            .and_then(proc_sample)
            .map(|p| {
                format!(
                    " server rss={:.1}MB cpu={:.2}s",
                    p.rss_kib as f64 / 1024.0,
                    p.cpu_s
                )
            })
            .unwrap_or_default();
        println!(
            "  t={:>5.1}s sent={} acked={} delivered={} errors={}{mem}",
            t0.elapsed().as_secs_f64(),
            s.sent.load(Ordering::Relaxed),
            s.acked.load(Ordering::Relaxed),
            s.delivered.load(Ordering::Relaxed),
            s.errors.load(Ordering::Relaxed) + s.closed_early.load(Ordering::Relaxed),
        );
    }
}

fn report(
    plan: &Plan,
    subs: &[SubResult],
    c0: Option<ProcSample>,
    c1: Option<ProcSample>,
    peak_kib: u64,
    run_secs: f64,
) -> bool {
    let s = &plan.stats;
    let a = &plan.args;
    let sent = s.sent.load(Ordering::Relaxed);
    let acked = s.acked.load(Ordering::Relaxed);
    let delivered = s.delivered.load(Ordering::Relaxed);
    let errors = s.errors.load(Ordering::Relaxed);
    let closed = s.closed_early.load(Ordering::Relaxed);
    let rejected = s.rejected.load(Ordering::Relaxed);
    let connect_errors = s.connect_errors.load(Ordering::Relaxed);
    let mut expected = 0u64;
    let mut stalled = 0usize;
    let mut live = LiveAccount::default();
    for r in subs {
        let dev_sent = s.devices[r.device].sent.load(Ordering::Relaxed);
        if r.stalled {
            stalled += 1;
        } else {
            expected += dev_sent;
        }
        live.add(r.tally.account(plan.epoch, dev_sent), r.stalled);
    }
    let live_lost = live.total.missing;
    let ack_lost = sent - acked.min(sent);
    let dur = a.duration.max(1e-9);
    println!("--- results: {}", a.label);
    println!(
        "sent={sent} ({:.0}/s) acked={acked} ack_lost={ack_lost} rejected={rejected}",
        sent as f64 / dur
    );
    // Sustained rate: deliveries over the time from the first send to the
    // last delivery. A server that falls behind keeps delivering in the
    // drain window; "over the sending window" alone would credit it with
    // those deliveries as if they had been made in time.
    let first_send_ns = plan
        .start
        .into_std()
        .saturating_duration_since(s.base)
        .as_nanos() as u64;
    let last_ns = s.last_delivery_ns.load(Ordering::Relaxed);
    let span = Duration::from_nanos(last_ns.saturating_sub(first_send_ns))
        .as_secs_f64()
        .max(dur);
    println!(
        "sustained deliveries={delivered} over {span:.1}s from the first send to the last delivery = {:.0}/s",
        delivered as f64 / span
    );
    println!(
        "deliveries={delivered} ({:.0}/s over the sending window) expected={expected} live_lost={live_lost} duplicates={} unexpected={} stalled_subscriptions={stalled}",
        delivered as f64 / dur,
        live.total.duplicates,
        live.total.unexpected,
    );
    println!(
        "per subscription: checked={} with_gaps={} with_duplicates={} with_unexpected={}",
        live.checked, live.subs_with_gaps, live.subs_with_duplicates, live.subs_with_unexpected
    );
    println!(
        "errors={errors} closed_early={closed} connect_errors={connect_errors} run={run_secs:.1}s"
    );
    println!("{}", s.live.line("latency send->dashboard"));
    println!("{}", s.ack.line("latency send->ack"));
    if let (Some(b), Some(e)) = (c0, c1) {
        let cpu = e.cpu_s - b.cpu_s;
        let per_reading = if sent > 0 {
            cpu * 1e6 / sent as f64
        } else {
            0.0
        };
        let per_delivery = if delivered > 0 {
            cpu * 1e6 / delivered as f64
        } else {
            0.0
        };
        println!(
            "server cpu={cpu:.2}s over {run_secs:.1}s ({:.0}% of a core) = {per_reading:.1} cpu-us/reading, {per_delivery:.2} cpu-us/delivery; rss end={:.1}MB peak(window)={:.1}MB hwm={:.1}MB",
            cpu * 100.0 / run_secs.max(1e-9),
            e.rss_kib as f64 / 1024.0,
            peak_kib as f64 / 1024.0,
            e.hwm_kib as f64 / 1024.0
        );
    }
    let ok = ack_lost == 0
        && live.is_clean()
        && errors == 0
        && closed == 0
        && connect_errors == 0
        && rejected == 0;
    println!(
        "verdict: {}",
        if ok {
            "OK (no loss, no duplicates, no errors)"
        } else {
            "LOSS, DUPLICATES OR ERRORS"
        }
    );
    ok
}
