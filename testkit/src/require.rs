//! The one place that decides what a test does when something it needs
//! (PostgreSQL, a browser, Mosquitto, a tmpfs mount) is missing: a loud
//! SKIP on a developer's machine, a failure where the matching
//! `EMS_REQUIRE_*=1` is set (CI sets all four).
//!
//! Every skip in the test suites goes through [`require_or_skip`]; a test
//! never returns early on a missing dependency without calling it.

use std::io::Write;
use std::sync::Mutex;

/// Something outside the workspace a test may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// A PostgreSQL server: the private cluster (PostgreSQL 15 binaries)
    /// or `EMS_TEST_DATABASE_URL`.
    Postgres,
    /// Debian's `chromium` and `chromium-driver`.
    Browser,
    /// A Mosquitto broker binary.
    Mqtt,
    /// Mounting a size-limited tmpfs (root).
    Tmpfs,
}

impl Feature {
    /// The environment variable that makes this feature mandatory.
    pub const fn env(self) -> &'static str {
        match self {
            Feature::Postgres => "EMS_REQUIRE_POSTGRES",
            Feature::Browser => "EMS_REQUIRE_BROWSER",
            Feature::Mqtt => "EMS_REQUIRE_MQTT",
            Feature::Tmpfs => "EMS_REQUIRE_TMPFS",
        }
    }

    /// What it is, for messages.
    pub const fn what(self) -> &'static str {
        match self {
            Feature::Postgres => "PostgreSQL",
            Feature::Browser => "a browser (chromium + chromedriver)",
            Feature::Mqtt => "Mosquitto",
            Feature::Tmpfs => "a size-limited tmpfs (mount -t tmpfs, as root)",
        }
    }

    /// How to provide it.
    pub const fn how(self) -> &'static str {
        match self {
            Feature::Postgres => {
                "install postgresql-15 (a private cluster is started) or set \
                 EMS_TEST_DATABASE_URL to a role that may CREATE DATABASE"
            }
            Feature::Browser => "install Debian's chromium and chromium-driver",
            Feature::Mqtt => "install mosquitto (or set EMS_MOSQUITTO to its binary)",
            Feature::Tmpfs => "run the tests as root",
        }
    }
}

/// Whether `feature` is mandatory here (`EMS_REQUIRE_…=1`).
pub fn required(feature: Feature) -> bool {
    std::env::var(feature.env()).is_ok_and(|v| v == "1")
}

/// Reports that a test cannot run because `feature` is missing, for
/// `reason`: panics when the feature is required, else prints a loud SKIP
/// (once per feature and reason in a process, straight to the stderr
/// stream so the test harness's capture does not hide it). The caller then
/// returns.
pub fn require_or_skip(feature: Feature, reason: &str) {
    if required(feature) {
        panic!(
            "{} is required ({}=1) but {reason}",
            feature.what(),
            feature.env()
        );
    }
    static SHOWN: Mutex<Vec<(&str, String)>> = Mutex::new(Vec::new());
    let mut shown = SHOWN.lock().unwrap_or_else(|p| p.into_inner());
    if shown
        .iter()
        .any(|(f, r)| *f == feature.env() && r == reason)
    {
        return;
    }
    shown.push((feature.env(), reason.to_string()));
    let _ = writeln!(
        std::io::stderr(),
        "\n********************************************************************\n\
         SKIP: a test needing {} skipped: {reason}.\n\
         To run it: {}.\n\
         {}=1 turns this into a failure (CI).\n\
         ********************************************************************\n",
        feature.what(),
        feature.how(),
        feature.env(),
    );
}

/// [`require_or_skip`] for code that returns an `Option`: `None` after the
/// SKIP.
pub fn skipped<T>(feature: Feature, reason: &str) -> Option<T> {
    require_or_skip(feature, reason);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_feature_has_its_own_flag() {
        let all = [
            Feature::Postgres,
            Feature::Browser,
            Feature::Mqtt,
            Feature::Tmpfs,
        ];
        let envs: std::collections::BTreeSet<_> = all.iter().map(|f| f.env()).collect();
        assert_eq!(envs.len(), all.len());
        assert!(envs.iter().all(|e| e.starts_with("EMS_REQUIRE_")));
    }
}
