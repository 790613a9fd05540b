//! Edge configuration: the TOML file, parsed strictly and validated once.
//!
//! [`RawConfig`] ([`raw`]) mirrors the file. [`Config::from_toml`] turns it
//! into a validated [`Config`]; nothing after that sees raw input. The
//! device token is never part of the file: [`DeviceToken::from_env`] reads
//! it from `EMS_DEVICE_TOKEN` or `$CREDENTIALS_DIRECTORY/ems-device-token`,
//! and its `Debug`/`Display` never print it. Each meter kind checks its own
//! table when it is opened (`validate` in its module under
//! [`crate::meters`]).

pub mod hub_url;
pub mod raw;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::meters::MeterConfig;

pub use hub_url::{parse_hub_url, HubEndpoint};
pub use raw::{RawConfig, RawLink, DEFAULT_SPOOL_DIR, DEFAULT_SPOOL_MAX_BYTES};

/// Default config path.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ems-edge/edge.toml";
/// Environment variable holding the device token.
pub const TOKEN_ENV: &str = "EMS_DEVICE_TOKEN";
/// File name of the token inside `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential`).
pub const TOKEN_CREDENTIAL: &str = "ems-device-token";

/// Why the configuration could not be loaded. Messages never contain the token.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {error}")]
    Read {
        /// The config path.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// TOML syntax error, unknown key, wrong type (the message names key and line).
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The config path.
        path: PathBuf,
        /// toml's message, with line and column.
        message: String,
    },
    /// A value that parses but makes no sense.
    #[error("invalid config {path}: {message}")]
    Invalid {
        /// The config path.
        path: PathBuf,
        /// What to fix.
        message: String,
    },
    /// No token in the environment or the credentials directory.
    #[error("no device token: set {TOKEN_ENV} (systemd EnvironmentFile=, mode 0600) or provide the credential {TOKEN_CREDENTIAL} (systemd LoadCredential=)")]
    MissingToken,
    /// The token is present but unusable (the token itself is not shown).
    #[error("device token from {source_name} is unusable: {why}")]
    BadToken {
        /// Where it came from.
        source_name: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// The device token. Sent only in the `Authorization` header; `Debug` and
/// `Display` print `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceToken(String);

impl DeviceToken {
    /// Wraps a token, checking that it can travel in an HTTP header.
    pub fn new(token: &str, source_name: &str) -> Result<Self, ConfigError> {
        let t = token.trim();
        let bad = |why| ConfigError::BadToken {
            source_name: source_name.to_string(),
            why,
        };
        if t.is_empty() {
            return Err(bad("it is empty"));
        }
        if t.len() > 1024 {
            return Err(bad("it is longer than 1024 bytes"));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("it contains whitespace or non-ASCII characters"));
        }
        Ok(DeviceToken(t.to_string()))
    }

    /// Reads the token from `EMS_DEVICE_TOKEN`, else from
    /// `$CREDENTIALS_DIRECTORY/ems-device-token`.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_sources(
            std::env::var(TOKEN_ENV).ok(),
            std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        )
    }

    /// [`DeviceToken::from_env`] with the environment passed in (testable).
    pub fn from_sources(
        env_value: Option<String>,
        credentials_dir: Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        if let Some(v) = env_value.filter(|v| !v.trim().is_empty()) {
            return Self::new(&v, TOKEN_ENV);
        }
        if let Some(dir) = credentials_dir {
            let path = dir.join(TOKEN_CREDENTIAL);
            match std::fs::read_to_string(&path) {
                Ok(v) => return Self::new(&v, &path.display().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => {
                    return Err(ConfigError::BadToken {
                        source_name: path.display().to_string(),
                        why: "the file cannot be read",
                    })
                }
            }
        }
        Err(ConfigError::MissingToken)
    }

    /// The secret, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceToken([redacted])")
    }
}

impl fmt::Display for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Link tuning, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// First backoff ceiling.
    pub backoff_base: Duration,
    /// Backoff cap.
    pub backoff_cap: Duration,
    /// Uptime that resets the backoff.
    pub stable_after: Duration,
    /// Handshake timeout.
    pub connect_timeout: Duration,
    /// Silence before the edge pings.
    pub ping_after: Duration,
    /// Silence before the link is declared dead.
    pub dead_after: Duration,
    /// In-flight window.
    pub max_in_flight: usize,
    /// Send-rate ceiling, readings per second.
    pub max_send_rate: f64,
    /// Status frame period.
    pub status_every: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was loaded from (for messages).
    pub path: PathBuf,
    /// Device id.
    pub device_id: String,
    /// Hub endpoint.
    pub hub: HubEndpoint,
    /// `ws://` was permitted explicitly.
    pub allow_insecure: bool,
    /// Sample period.
    pub sample_interval: Duration,
    /// Extra trust roots.
    pub ca_file: Option<PathBuf>,
    /// Spool directory.
    pub spool_dir: PathBuf,
    /// Spool bound.
    pub spool_max_bytes: u64,
    /// Write + fsync period of the spool.
    pub spool_sync_interval: Duration,
    /// How long a reading on the wire of a live connection may wait for
    /// its ack before it is written; announced to the hub, which may hold
    /// readings for half of it (never shorter than the sync interval).
    pub ack_window: Duration,
    /// How far ahead of an energy counter its saved ceiling runs (at the
    /// recent power): the most energy a crash can add to a counter.
    pub energy_headroom: Duration,
    /// Trust the wall clock from the start.
    pub trust_clock: bool,
    /// Override of the synchronization check.
    pub clock_sync_file: Option<PathBuf>,
    /// Link tuning.
    pub link: LinkConfig,
    /// Meters (at least one, unique ids).
    pub meters: Vec<MeterConfig>,
    /// Keys present in the file that are no longer used (warned about at
    /// start).
    pub ignored_keys: Vec<&'static str>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Self::validate(raw, path)
    }

    fn validate(raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        ems_shared::validate_device_id(&raw.device_id)
            .map_err(|e| invalid(format!("device_id: {e}")))?;
        let hub = parse_hub_url(&raw.hub_url, &raw.device_id, raw.allow_insecure)
            .map_err(|m| invalid(format!("hub_url: {m}")))?;
        check_intervals_and_spool(&raw).map_err(invalid)?;
        let link = validate_link(&raw.link).map_err(invalid)?;
        check_meters(&raw.meters).map_err(invalid)?;
        let ms = Duration::from_millis;
        Ok(Config {
            path: path.to_path_buf(),
            device_id: raw.device_id,
            hub,
            allow_insecure: raw.allow_insecure,
            sample_interval: ms(raw.sample_interval_ms),
            ca_file: raw.ca_file,
            spool_dir: raw.spool_dir,
            spool_max_bytes: raw.spool_max_bytes,
            spool_sync_interval: ms(raw.spool_sync_interval_ms),
            ack_window: ms(raw.ack_window_ms.max(raw.spool_sync_interval_ms)),
            energy_headroom: Duration::from_secs(raw.energy_headroom_s),
            trust_clock: raw.trust_clock,
            clock_sync_file: raw.clock_sync_file,
            ignored_keys: if raw.link.poll_ms.is_some() {
                vec!["link.poll_ms"]
            } else {
                vec![]
            },
            link,
            meters: raw.meters,
        })
    }
}

/// The top-level intervals and the spool settings.
fn check_intervals_and_spool(raw: &RawConfig) -> Result<(), String> {
    if !(10..=3_600_000).contains(&raw.sample_interval_ms) {
        return Err("sample_interval_ms must be between 10 and 3600000".into());
    }
    if raw.spool_max_bytes < 64 * 1024 {
        return Err("spool_max_bytes must be at least 65536".into());
    }
    if !(10..=60_000).contains(&raw.spool_sync_interval_ms) {
        return Err("spool_sync_interval_ms must be between 10 and 60000".into());
    }
    if !(1..=ems_shared::MAX_ACK_WINDOW_MS).contains(&raw.ack_window_ms) {
        return Err(format!(
            "ack_window_ms must be between 1 and {}",
            ems_shared::MAX_ACK_WINDOW_MS
        ));
    }
    if !(5..=3600).contains(&raw.energy_headroom_s) {
        return Err("energy_headroom_s must be between 5 and 3600".into());
    }
    if raw.energy_headroom_s * 1000 < 4 * raw.spool_sync_interval_ms {
        return Err(
            "energy_headroom_s must be at least 4 sync intervals (spool_sync_interval_ms / 250)"
                .into(),
        );
    }
    if raw.spool_dir.as_os_str().is_empty() {
        return Err("spool_dir must not be empty".into());
    }
    Ok(())
}

/// The `[link]` table.
fn validate_link(l: &RawLink) -> Result<LinkConfig, String> {
    if l.backoff_base_ms == 0 || l.backoff_cap_ms < l.backoff_base_ms {
        return Err("link.backoff_base_ms must be > 0 and <= link.backoff_cap_ms".into());
    }
    const DAY_MS: u64 = 86_400_000;
    let durations = [
        ("backoff_cap_ms", l.backoff_cap_ms),
        ("stable_after_ms", l.stable_after_ms),
        ("connect_timeout_ms", l.connect_timeout_ms),
        ("ping_after_ms", l.ping_after_ms),
        ("dead_after_ms", l.dead_after_ms),
        ("status_every_ms", l.status_every_ms),
    ];
    if let Some((name, _)) = durations.iter().find(|(_, v)| *v > DAY_MS) {
        return Err(format!("link.{name} must be at most 86400000 (a day)"));
    }
    if l.connect_timeout_ms == 0 || l.ping_after_ms == 0 || l.dead_after_ms <= l.ping_after_ms {
        return Err("link timeouts must be > 0 and link.dead_after_ms > link.ping_after_ms".into());
    }
    if l.max_in_flight == 0 {
        return Err("link.max_in_flight must be at least 1".into());
    }
    if !(l.max_send_rate.is_finite() && l.max_send_rate >= 5.0) {
        return Err("link.max_send_rate must be at least 5".into());
    }
    if l.status_every_ms < 100 {
        return Err("link.status_every_ms must be at least 100".into());
    }
    let ms = Duration::from_millis;
    Ok(LinkConfig {
        backoff_base: ms(l.backoff_base_ms),
        backoff_cap: ms(l.backoff_cap_ms),
        stable_after: ms(l.stable_after_ms),
        connect_timeout: ms(l.connect_timeout_ms),
        ping_after: ms(l.ping_after_ms),
        dead_after: ms(l.dead_after_ms),
        max_in_flight: l.max_in_flight,
        max_send_rate: l.max_send_rate,
        status_every: ms(l.status_every_ms),
    })
}

/// At least one meter, valid and unique ids.
fn check_meters(meters: &[MeterConfig]) -> Result<(), String> {
    if meters.is_empty() {
        return Err("at least one [[meter]] table is required (e.g. kind = \"simulated\")".into());
    }
    let mut seen = std::collections::HashSet::new();
    for m in meters {
        ems_shared::validate_meter_id(m.id()).map_err(|e| format!("meter id {:?}: {e}", m.id()))?;
        if !seen.insert(m.id().to_string()) {
            return Err(format!("meter id {:?} is used twice", m.id()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
device_id = "ems_001"
hub_url = "wss://hub.example.org"

[[meter]]
id = "main"
kind = "simulated"
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::from_toml(s, Path::new("edge.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.device_id, "ems_001");
        assert_eq!(c.hub.url, "wss://hub.example.org:443/ws/device/ems_001");
        assert_eq!(c.sample_interval, Duration::from_secs(1));
        assert_eq!(c.spool_dir, PathBuf::from("/var/lib/ems-edge"));
        assert!(c.spool_max_bytes >= 7 * 86_400 * 240);
        assert!(!c.trust_clock);
        assert_eq!(c.link.backoff_base, Duration::from_secs(1));
        assert_eq!(c.link.backoff_cap, Duration::from_secs(60));
        assert_eq!(c.energy_headroom, Duration::from_secs(30));
        assert_eq!(c.meters.len(), 1);
        assert!(c.ignored_keys.is_empty());
    }

    #[test]
    fn the_ack_window_defaults_to_four_seconds_and_is_never_below_the_sync_interval() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.ack_window, Duration::from_secs(4));
        let short = parse(&format!(
            "spool_sync_interval_ms = 2000
ack_window_ms = 500
{MIN}"
        ))
        .unwrap();
        assert_eq!(short.ack_window, Duration::from_secs(2));
        for bad in ["ack_window_ms = 0", "ack_window_ms = 600001"] {
            let e = parse(&format!(
                "{bad}
{MIN}"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("ack_window_ms"), "{e}");
        }
    }

    #[test]
    fn the_energy_headroom_is_bounded_and_poll_ms_is_ignored() {
        let c = parse(&format!(
            "energy_headroom_s = 120
{MIN}"
        ))
        .unwrap();
        assert_eq!(c.energy_headroom, Duration::from_secs(120));
        for bad in ["energy_headroom_s = 4", "energy_headroom_s = 3601"] {
            let e = parse(&format!(
                "{bad}
{MIN}"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("energy_headroom_s"), "{e}");
        }
        // A minute between syncs needs at least four minutes of headroom.
        let slow = format!(
            "spool_sync_interval_ms = 60000
energy_headroom_s = 60
{MIN}"
        );
        assert!(parse(&slow).unwrap_err().to_string().contains("4 sync"));
        // Older files with the polling link's key still load.
        let old = parse(&format!(
            "{MIN}
[link]
poll_ms = 50
"
        ))
        .unwrap();
        assert_eq!(old.ignored_keys, ["link.poll_ms"]);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = format!("{MIN}\n[link]\nbackof_cap_ms = 5\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("backof_cap_ms"), "{e}");
        assert!(e.contains("line 10"), "{e}");
        let e = parse(&MIN.replace("hub_url", "hub_ulr"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hub_ulr") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn unknown_key_in_meter_is_an_error() {
        let e = parse(&format!("{MIN}colour = \"red\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn token_is_never_a_config_key() {
        let e = parse(&format!("token = \"secret\"\n{MIN}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `token`"), "{e}");
    }

    #[test]
    fn insecure_needs_opt_in() {
        let ws = MIN.replace("wss://hub.example.org", "ws://127.0.0.1:8080");
        assert!(parse(&ws)
            .unwrap_err()
            .to_string()
            .contains("allow_insecure"));
        let ok = parse(&format!("allow_insecure = true\n{ws}")).unwrap();
        assert_eq!(ok.hub.url, "ws://127.0.0.1:8080/ws/device/ems_001");
        assert!(!ok.hub.tls);
    }

    #[test]
    fn bad_values_are_explained() {
        assert!(parse(&MIN.replace("ems_001", "bad id")).is_err());
        assert!(parse(&format!("sample_interval_ms = 0\n{MIN}")).is_err());
        let huge = format!("{MIN}\n[link]\nbackoff_cap_ms = 18446744073709551615\n");
        assert!(parse(&huge)
            .unwrap_err()
            .to_string()
            .contains("backoff_cap_ms"));
        let two = format!("{MIN}\n[[meter]]\nid = \"main\"\nkind = \"simulated\"\n");
        assert!(parse(&two).unwrap_err().to_string().contains("twice"));
        let none = "device_id = \"d\"\nhub_url = \"wss://h\"\n";
        assert!(parse(none).unwrap_err().to_string().contains("[[meter]]"));
    }

    #[test]
    fn token_sources_and_redaction() {
        let t = DeviceToken::from_sources(Some("emsd_abc\n".into()), None).unwrap();
        assert_eq!(t.expose(), "emsd_abc");
        assert_eq!(format!("{t} {t:?}"), "[redacted] DeviceToken([redacted])");
        assert!(matches!(
            DeviceToken::from_sources(None, None),
            Err(ConfigError::MissingToken)
        ));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKEN_CREDENTIAL), "emsd_fromfile\n").unwrap();
        let t = DeviceToken::from_sources(Some(" ".into()), Some(dir.path().into())).unwrap();
        assert_eq!(t.expose(), "emsd_fromfile");
        let e = DeviceToken::from_sources(Some("has space inside".into()), None).unwrap_err();
        assert!(!e.to_string().contains("space inside"));
    }
}
