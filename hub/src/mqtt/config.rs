//! The bridge's configuration, validated once: the broker URL, the
//! credentials (the password only ever as a [`Secret`]), the topic layout
//! and the pacing knobs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a bridge configuration was refused. No variant carries the
/// password or the URL text it was given (a URL may hold credentials).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MqttConfigError {
    /// The URL scheme is not `mqtt://` or `mqtts://`.
    #[error("the MQTT URL must start with mqtt:// or mqtts://")]
    Scheme,
    /// The URL carries a user name or password (`mqtt://user:pw@host`).
    #[error(
        "the MQTT URL must not contain credentials; use --mqtt-username and \
         EMS_MQTT_PASSWORD or --mqtt-password-file"
    )]
    CredentialsInUrl,
    /// No host, or a host with characters a host name cannot have.
    #[error("the MQTT URL has no valid host")]
    Host,
    /// The port is not a number in 1..=65535.
    #[error("the MQTT URL has an invalid port")]
    Port,
    /// A path, query or fragment after the host.
    #[error("the MQTT URL must be just mqtt[s]://HOST[:PORT] (no path, query or fragment)")]
    Trailing,
    /// `--mqtt-ca-file` with a plain `mqtt://` URL.
    #[error("--mqtt-ca-file needs an mqtts:// URL")]
    CaWithoutTls,
    /// A password without a user name.
    #[error("an MQTT password needs --mqtt-username")]
    PasswordWithoutUser,
    /// An empty user name.
    #[error("--mqtt-username must not be empty")]
    EmptyUser,
    /// A topic prefix that is empty, has empty levels, wildcards or
    /// characters outside `[A-Za-z0-9_.-]` (levels separated by `/`).
    #[error(
        "{flag} must be one or more /-separated levels of [A-Za-z0-9_.-] \
         (no wildcards, no leading or trailing /)"
    )]
    Prefix {
        /// The flag the prefix came from.
        flag: &'static str,
    },
    /// The interval is shorter than 100 ms.
    #[error("--mqtt-interval-ms must be at least 100")]
    Interval,
    /// A queue capacity of zero.
    #[error("the MQTT queue capacity must be at least 1")]
    Queue,
    /// `--public-url` is not an http(s) URL.
    #[error("the public URL must start with http:// or https://")]
    PublicUrl,
    /// The password file could not be read or is empty.
    #[error("cannot use the MQTT password file {path}: {why}")]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// What went wrong (never the file's content).
        why: String,
    },
}

/// A password: its `Debug` and `Display` never show it, so it can sit in
/// a configuration struct that is logged or printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// Reads a password file: its content without one trailing newline
    /// (`\n` or `\r\n`). An empty password is refused.
    pub fn from_file(path: &Path) -> Result<Self, MqttConfigError> {
        let err = |why: String| MqttConfigError::PasswordFile {
            path: path.to_path_buf(),
            why,
        };
        let mut text = std::fs::read_to_string(path).map_err(|e| err(e.kind().to_string()))?;
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        if text.is_empty() {
            return Err(err("the file is empty".into()));
        }
        Ok(Secret(text))
    }

    /// The password itself, for the MQTT CONNECT packet only.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A parsed broker URL: `mqtt://HOST[:PORT]` (default port 1883) or
/// `mqtts://HOST[:PORT]` (TLS, default port 8883). IPv6 hosts in
/// brackets. Its `Display` is the canonical URL (it can hold no secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// `mqtts://`: TLS to the broker.
    pub tls: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl BrokerUrl {
    /// Parses and checks `url`. Errors never echo the URL.
    pub fn parse(url: &str) -> Result<Self, MqttConfigError> {
        let (tls, rest) = if let Some(r) = strip_prefix_ci(url, "mqtts://") {
            (true, r)
        } else if let Some(r) = strip_prefix_ci(url, "mqtt://") {
            (false, r)
        } else {
            return Err(MqttConfigError::Scheme);
        };
        // Checked before anything else, on the whole rest (a password may
        // contain `/`): no valid broker URL has an `@`.
        if rest.contains('@') {
            return Err(MqttConfigError::CredentialsInUrl);
        }
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if !(tail.is_empty() || tail == "/") {
            return Err(MqttConfigError::Trailing);
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let close = v6.find(']').ok_or(MqttConfigError::Host)?;
            let host = &v6[..close];
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(MqttConfigError::Host);
            }
            let after = &v6[close + 1..];
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(MqttConfigError::Host),
            };
            (host, port)
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && (host.contains(':') // IPv6, already checked
                || host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
        if !host_ok {
            return Err(MqttConfigError::Host);
        }
        let port = match port {
            None => {
                if tls {
                    8883
                } else {
                    1883
                }
            }
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(MqttConfigError::Port),
            },
        };
        Ok(BrokerUrl {
            tls,
            host: host.to_string(),
            port,
        })
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = MqttConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BrokerUrl::parse(s)
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix))
    .then(|| &s[prefix.len()..])
}

/// Everything the bridge needs. Build with [`MqttConfig::new`], adjust the
/// public fields, then hand it to [`super::MqttBridge::spawn`], which
/// calls [`MqttConfig::validate`]. `Debug` shows no password.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// The broker (`--mqtt-url`).
    pub broker: BrokerUrl,
    /// PEM file with the CA certificate(s) the broker's certificate must
    /// chain to (`--mqtt-ca-file`, mqtts only). Without it, the public web
    /// PKI roots (webpki-roots) are trusted instead.
    pub ca_file: Option<PathBuf>,
    /// MQTT user name (`--mqtt-username`).
    pub username: Option<String>,
    /// MQTT password (`EMS_MQTT_PASSWORD` or `--mqtt-password-file`).
    pub password: Option<Secret>,
    /// Home Assistant's discovery prefix (`--mqtt-discovery-prefix`).
    pub discovery_prefix: String,
    /// Prefix of the state and availability topics (`--mqtt-topic-prefix`).
    pub topic_prefix: String,
    /// At most one state message per meter per interval
    /// (`--mqtt-interval-ms`).
    pub interval: Duration,
    /// The hub's public URL (`--public-url`): the devices'
    /// `configuration_url` in Home Assistant.
    pub public_url: Option<String>,
    /// The hub's version: `sw_version` of the devices and the discovery
    /// `origin`.
    pub sw_version: String,
    /// Capacity of the queue between the hub and the bridge task; a full
    /// queue drops (and counts) instead of making the caller wait.
    pub queue_capacity: usize,
    /// A reading that arrives this much later than its timestamp is
    /// backlog and never published as the current state (the hub's
    /// `--backfill-after-s`).
    pub backfill_after: Duration,
    /// MQTT keep-alive: a broker that stops answering is noticed within
    /// about twice this.
    pub keep_alive: Duration,
    /// Home Assistant marks a sensor unavailable when no state arrived for
    /// this long (`expire_after`); `None` leaves it to the availability
    /// topics.
    pub expire_after: Option<Duration>,
    /// MQTT client id; `None`: `ems-hub-<topic prefix>` (one hub per
    /// topic prefix and broker).
    pub client_id: Option<String>,
}

impl MqttConfig {
    /// The defaults for a bridge to `broker`.
    pub fn new(broker: BrokerUrl) -> Self {
        MqttConfig {
            broker,
            ca_file: None,
            username: None,
            password: None,
            discovery_prefix: "homeassistant".into(),
            topic_prefix: "ems".into(),
            interval: Duration::from_millis(5000),
            public_url: None,
            sw_version: env!("CARGO_PKG_VERSION").into(),
            // A burst of this many readings between two runs of the bridge
            // task; at ~150 bytes each, about 1.5 MB at most.
            queue_capacity: 10_000,
            backfill_after: Duration::from_secs(60),
            keep_alive: Duration::from_secs(30),
            expire_after: None,
            client_id: None,
        }
    }

    /// Checks every field that can be wrong.
    pub fn validate(&self) -> Result<(), MqttConfigError> {
        if self.ca_file.is_some() && !self.broker.tls {
            return Err(MqttConfigError::CaWithoutTls);
        }
        if self.username.as_deref() == Some("") {
            return Err(MqttConfigError::EmptyUser);
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(MqttConfigError::PasswordWithoutUser);
        }
        check_prefix(&self.discovery_prefix, "--mqtt-discovery-prefix")?;
        check_prefix(&self.topic_prefix, "--mqtt-topic-prefix")?;
        if self.interval < Duration::from_millis(100) {
            return Err(MqttConfigError::Interval);
        }
        if self.queue_capacity == 0 {
            return Err(MqttConfigError::Queue);
        }
        if let Some(u) = &self.public_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(MqttConfigError::PublicUrl);
            }
        }
        Ok(())
    }
}

fn check_prefix(p: &str, flag: &'static str) -> Result<(), MqttConfigError> {
    let ok = !p.is_empty()
        && p.len() <= 128
        && p.split('/').all(|level| {
            !level.is_empty()
                && level
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(MqttConfigError::Prefix { flag })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Result<BrokerUrl, MqttConfigError> {
        BrokerUrl::parse(s)
    }

    #[test]
    fn broker_urls() {
        let u = url("mqtt://broker.local").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (false, "broker.local", 1883)
        );
        let u = url("mqtts://broker.local").unwrap();
        assert_eq!((u.tls, u.port), (true, 8883));
        let u = url("MQTT://10.0.0.2:1884/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("10.0.0.2", 1884));
        let u = url("mqtt://[::1]:1883").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.to_string(), "mqtt://[::1]:1883");
        assert_eq!(
            url("mqtts://ha.example.com:8884").unwrap().to_string(),
            "mqtts://ha.example.com:8884"
        );
        assert_eq!(url("mqtt://[::1]").unwrap().port, 1883);
    }

    #[test]
    fn bad_broker_urls() {
        use MqttConfigError::*;
        for (u, want) in [
            ("http://host", Scheme),
            ("tcp://host:1883", Scheme),
            ("host:1883", Scheme),
            ("mqtt://", Host),
            ("mqtt://:1883", Host),
            ("mqtt://ho st", Host),
            ("mqtt://[nope]:1883", Host),
            ("mqtt://[::1]x", Host),
            ("mqtt://host:0", Port),
            ("mqtt://host:65536", Port),
            ("mqtt://host:+1", Port),
            ("mqtt://host:", Port),
            ("mqtt://host/path", Trailing),
            ("mqtt://host?x=1", Trailing),
            ("mqtt://host#f", Trailing),
        ] {
            assert_eq!(url(u), Err(want), "{u}");
        }
    }

    #[test]
    fn credentials_in_the_url_are_refused_without_echo() {
        for u in [
            "mqtt://user:hunter2-secret@host:1883",
            "mqtts://user:hunter2-secret@host",
            "mqtt://hunter2-secret@host",
            "mqtt://user:hunter2-secret@[::1]:1883",
        ] {
            let e = url(u).unwrap_err();
            assert_eq!(e, MqttConfigError::CredentialsInUrl);
            let text = format!("{e} {e:?}");
            assert!(!text.contains("hunter2"), "{text}");
            assert!(!text.contains("user:"), "{text}");
        }
        // A password with a `/` in it is still recognised as credentials.
        let e = url("mqtt://user:hun/ter2-secret@host").unwrap_err();
        assert_eq!(e, MqttConfigError::CredentialsInUrl);
        assert!(!format!("{e} {e:?}").contains("ter2"));
    }

    #[test]
    fn secrets_never_show() {
        let s = Secret::new("hunter2-secret");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
        assert_eq!(s.expose(), "hunter2-secret");
        let mut c = MqttConfig::new(url("mqtt://h").unwrap());
        c.username = Some("ems".into());
        c.password = Some(s);
        let dbg = format!("{c:?} {c:#?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("[redacted]"));
    }

    #[test]
    fn password_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "hunter2-secret\r\n").unwrap();
        assert_eq!(Secret::from_file(&p).unwrap().expose(), "hunter2-secret");
        std::fs::write(&p, "with trailing space \n").unwrap();
        assert_eq!(
            Secret::from_file(&p).unwrap().expose(),
            "with trailing space "
        );
        std::fs::write(&p, "\n").unwrap();
        let e = Secret::from_file(&p).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = Secret::from_file(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn validation() {
        use MqttConfigError::*;
        let base = MqttConfig::new(url("mqtt://h").unwrap());
        assert_eq!(base.validate(), Ok(()));
        assert_eq!(base.discovery_prefix, "homeassistant");
        assert_eq!(base.topic_prefix, "ems");
        assert_eq!(base.interval, Duration::from_millis(5000));

        let mut c = base.clone();
        c.ca_file = Some("ca.pem".into());
        assert_eq!(c.validate(), Err(CaWithoutTls));
        c.broker = url("mqtts://h").unwrap();
        assert_eq!(c.validate(), Ok(()));

        let mut c = base.clone();
        c.password = Some(Secret::new("x"));
        assert_eq!(c.validate(), Err(PasswordWithoutUser));
        c.username = Some(String::new());
        assert_eq!(c.validate(), Err(EmptyUser));
        c.username = Some("u".into());
        assert_eq!(c.validate(), Ok(()));

        for bad in [
            "", "/ems", "ems/", "a//b", "ems/+", "ems/#", "e m s", "ems\0",
        ] {
            let mut c = base.clone();
            c.topic_prefix = bad.into();
            assert_eq!(
                c.validate(),
                Err(Prefix {
                    flag: "--mqtt-topic-prefix"
                }),
                "{bad:?}"
            );
            let mut c = base.clone();
            c.discovery_prefix = bad.into();
            assert!(c.validate().is_err(), "{bad:?}");
        }
        let mut c = base.clone();
        c.topic_prefix = "home/energy.ems-1".into();
        assert_eq!(c.validate(), Ok(()));

        let mut c = base.clone();
        c.interval = Duration::from_millis(99);
        assert_eq!(c.validate(), Err(Interval));
        let mut c = base.clone();
        c.queue_capacity = 0;
        assert_eq!(c.validate(), Err(Queue));
        let mut c = base;
        c.public_url = Some("ems.example.com".into());
        assert_eq!(c.validate(), Err(PublicUrl));
    }
}
