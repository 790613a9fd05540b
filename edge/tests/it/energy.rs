//! Energy counters never go backwards: whatever stops the edge (SIGKILL,
//! a SIGTERM while a slow meter holds the sampler), the first reading of a
//! meter after the restart has `energy_wh` ≥ the last one that left the
//! edge. Checked on the simulated meter, which persists its counter like
//! the hardware drivers, against everything the hub stored, in (epoch,
//! seq) order.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use crate::harness::*;

/// The edge config with the simulated meter's counter starting low, so a
/// restart that forgot it shows at once.
fn config_starting_low(w: &World, name: &str, extra_meters: &str) -> PathBuf {
    let path = w.config(name, "", "");
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace("seed = 1\n", "seed = 1\nstart_energy_wh = 1000.0\n");
    fs::write(&path, format!("{text}{extra_meters}")).unwrap();
    path
}

/// Every stored reading of `meter`, in (epoch, seq) order: (epoch, seq,
/// energy_wh).
fn energy_series(w: &World, meter: &str) -> Vec<(u64, u64, f64)> {
    let mut epochs: Vec<u64> = w.stored().into_iter().map(|(e, _)| e).collect();
    epochs.dedup();
    let mut out = vec![];
    for epoch in epochs {
        for (seq, _, m, e) in w.rows_of(epoch) {
            if m == meter {
                out.push((epoch, seq, e.expect("energy_wh")));
            }
        }
    }
    out
}

fn assert_non_decreasing(series: &[(u64, u64, f64)]) {
    assert!(!series.is_empty());
    for pair in series.windows(2) {
        let ((e0, s0, v0), (e1, s1, v1)) = (pair[0], pair[1]);
        assert!(
            v1 >= v0,
            "energy_wh went back from {v0} (epoch {e0} seq {s0}) to {v1} (epoch {e1} seq {s1})"
        );
    }
}

#[test]
fn energy_never_goes_backwards_across_sigkills() {
    let w = World::new();
    let _hub = w.hub();
    let config = config_starting_low(&w, "edge.toml", "");
    let mut rng = fastrand::Rng::with_seed(14);
    let mut epochs = BTreeMap::new();
    for round in 0..6 {
        let mut edge = w.edge(&config);
        let epoch = edge.epoch();
        wait_for("readings of this epoch stored", SOON, || {
            w.seqs_of(epoch).len() >= 10
        });
        // Kill at a random moment: between samples, mid-flush, mid-send.
        std::thread::sleep(Duration::from_millis(rng.u64(0..700)));
        edge.sigkill();
        epochs.insert(round, epoch);
        edge.assert_token_not_logged();
    }
    let mut last = w.edge(&config);
    let epoch = last.epoch();
    wait_for("the last epoch streaming", SOON, || {
        w.seqs_of(epoch).len() >= 10
    });
    let (status, _) = last.terminate();
    assert!(status.success());
    let series = energy_series(&w, "main");
    assert_non_decreasing(&series);
    eprintln!(
        "{} readings over {} epochs, energy {} → {} Wh",
        series.len(),
        epochs.len() + 1,
        series[0].2,
        series[series.len() - 1].2
    );
    last.assert_token_not_logged();
}

/// A pseudo-terminal whose other end never answers: a Modbus meter on it
/// times out on every request (held open for the test's duration).
struct SilentLine {
    _master: fs::File,
    slave: PathBuf,
}

impl SilentLine {
    fn open() -> SilentLine {
        use std::os::fd::FromRawFd;
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two descriptors we then own.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty");
        let path = fs::read_link(format!("/proc/self/fd/{slave}")).unwrap();
        // SAFETY: the descriptors are ours; the slave's is closed (the edge
        // opens the device by name), the master's is kept open.
        unsafe {
            libc::close(slave);
        }
        SilentLine {
            _master: unsafe { fs::File::from_raw_fd(master) },
            slave: path,
        }
    }
}

#[test]
fn a_sampler_held_by_a_slow_meter_at_shutdown_loses_no_energy() {
    let w = World::new();
    let _hub = w.hub();
    let line = SilentLine::open();
    // Every request of this meter takes 3 × 2 s: the sampler is almost
    // always inside its read.
    let slow = format!(
        r#"
[[meter]]
id = "slow"
kind = "modbus"
profile = "sdm120"
port = "{}"
timeout_ms = 2000
retries = 2
"#,
        line.slave.display()
    );
    let config = config_starting_low(&w, "slow.toml", &slow);
    let mut edge = w.edge(&config);
    let epoch = edge.epoch();
    wait_for(
        "two readings of the simulated meter",
        Duration::from_secs(60),
        || w.rows_of(epoch).iter().filter(|r| r.2 == "main").count() >= 2,
    );
    // Stop while the slow meter holds the sampler.
    let (status, took) = edge.terminate();
    assert!(status.success());
    assert!(took < Duration::from_secs(6), "{took:?}");
    edge.assert_token_not_logged();
    // The next start, without the slow meter.
    let fast = config_starting_low(&w, "fast.toml", "");
    let mut again = w.edge(&fast);
    let epoch2 = again.epoch();
    wait_for("readings after the restart", SOON, || {
        w.seqs_of(epoch2).len() >= 5
    });
    again.terminate();
    assert_non_decreasing(&energy_series(&w, "main"));
    again.assert_token_not_logged();
}
