//! One logger per test process, shared by every test in it: prints what
//! `EMS_TEST_LOG` asks for (warnings by default) and, once a test asked
//! for it, also keeps every line of chosen targets so the test can check
//! what was logged (e.g. that a secret never was).
//!
//! A process has only one logger, so tests that read log lines and tests
//! that only print them must share it: a test binary installs it through
//! [`init`] (which [`crate::TestHub`] calls) and nothing else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once, RwLock};

use log::{LevelFilter, Log, Metadata, Record};

/// Prints up to the `EMS_TEST_LOG` level; keeps captured lines.
struct TestLogger {
    /// Highest level printed to stderr.
    print: LevelFilter,
}

/// Whether some test asked for lines to be kept.
static CAPTURING: AtomicBool = AtomicBool::new(false);
/// Target prefixes whose lines are kept, at every level.
static TARGETS: RwLock<Vec<String>> = RwLock::new(Vec::new());
/// The kept lines: `LEVEL target: message`.
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

impl TestLogger {
    fn captured(&self, target: &str) -> bool {
        CAPTURING.load(Ordering::Relaxed)
            && TARGETS
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|t| target.starts_with(t.as_str()))
    }
}

impl Log for TestLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= self.print || self.captured(m.target())
    }

    fn log(&self, r: &Record) {
        if r.level() <= self.print {
            eprintln!("{:<5} [{}] {}", r.level(), r.target(), r.args());
        }
        if self.captured(r.target()) {
            let line = format!("{} {}: {}", r.level(), r.target(), r.args());
            LINES.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    }

    fn flush(&self) {}
}

/// Installs the process's logger (once; later calls do nothing). If some
/// other logger was installed first, captured lines stay empty and
/// [`lines`] says so.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let print = std::env::var("EMS_TEST_LOG")
            .ok()
            .and_then(|l| l.parse().ok())
            .unwrap_or(LevelFilter::Warn);
        let logger: &'static TestLogger = Box::leak(Box::new(TestLogger { print }));
        if log::set_logger(logger).is_ok() {
            log::set_max_level(print);
        }
    });
}

/// From now on, keeps every line (any level) whose target starts with one
/// of `targets` (e.g. `"ems_hub"`, `"rumqttc"`), for [`lines`].
pub fn capture(targets: &[&str]) {
    init();
    {
        let mut t = TARGETS.write().unwrap_or_else(|p| p.into_inner());
        for target in targets {
            if !t.iter().any(|x| x == target) {
                t.push((*target).to_string());
            }
        }
    }
    CAPTURING.store(true, Ordering::Relaxed);
    log::set_max_level(LevelFilter::Trace);
}

/// Every line kept so far, in order.
pub fn lines() -> Vec<String> {
    LINES.lock().unwrap_or_else(|p| p.into_inner()).clone()
}
