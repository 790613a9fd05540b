//! Reaching the database: the URL and its TLS options, the rustls
//! connector, and the redaction that keeps the password out of every
//! message.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use postgres::config::SslMode;
use postgres::{Client, NoTls};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{error_chain, PgOptions, StoreError};

/// How to reach the database: everything needed to (re)connect.
pub(super) struct Target {
    /// Parsed connection parameters (holds the password; never shown).
    pub(super) config: postgres::Config,
    /// The TLS connector, when the URL asks for TLS.
    pub(super) tls: Option<MakeRustlsConnect>,
    /// The URL without its password, for messages.
    pub(super) redacted: String,
}

impl Target {
    pub(super) fn parse(url: &str, opts: &PgOptions) -> Result<Target, StoreError> {
        let redacted = redact(url);
        let fail = |reason: String| StoreError::Open {
            url: redacted.clone(),
            reason,
        };
        let (base, params) = split_query(url);
        let mut sslmode = None;
        let mut rootcert = None;
        let mut rest = Vec::new();
        for kv in params.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "sslmode" => sslmode = Some(percent_decode(v)),
                "sslrootcert" => rootcert = Some(percent_decode(v)),
                "sslcert" | "sslkey" | "sslpassword" | "sslcrl" => {
                    return Err(fail(format!("{k} (client certificates) is not supported")))
                }
                _ => rest.push(kv),
            }
        }
        let cleaned = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let mut config = postgres::Config::from_str(&cleaned).map_err(|e| {
            fail(format!(
                "invalid connection URL: {}",
                scrub(&e.to_string(), url)
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(opts.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("ems-hub");
        }
        // A dead link without a reset (NAT timeout, pulled cable) must fail
        // a write within about a minute, not after the kernel's ~15 min of
        // retransmissions, so that the writer reconnects.
        let has = |key: &str| rest.iter().any(|kv| kv.split('=').next() == Some(key));
        if !has("keepalives_idle") {
            config.keepalives_idle(Duration::from_secs(30));
        }
        if !has("keepalives_interval") {
            config.keepalives_interval(Duration::from_secs(10));
        }
        if !has("keepalives_retries") {
            config.keepalives_retries(3);
        }
        if !has("tcp_user_timeout") {
            config.tcp_user_timeout(Duration::from_secs(60));
        }
        let ssl = match sslmode.as_deref() {
            None | Some("disable") | Some("allow") => None,
            Some("prefer") => Some(SslMode::Prefer),
            Some("require") | Some("verify-ca") | Some("verify-full") => Some(SslMode::Require),
            Some(other) => {
                return Err(fail(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                )))
            }
        };
        let tls = match ssl {
            None => {
                config.ssl_mode(SslMode::Disable);
                None
            }
            Some(mode) => {
                config.ssl_mode(mode);
                Some(tls_connector(rootcert.as_deref()).map_err(fail)?)
            }
        };
        Ok(Target {
            config,
            tls,
            redacted,
        })
    }

    pub(super) fn connect(&self) -> Result<Client, StoreError> {
        let client = match &self.tls {
            None => self.config.connect(NoTls),
            Some(tls) => self.config.connect(tls.clone()),
        };
        client.map_err(|e| StoreError::Db(format!("cannot connect: {}", error_chain(&e))))
    }
}

/// A rustls client verifying the server against the Mozilla roots plus
/// the certificates in `rootcert` (a PEM file), with the ring provider.
fn tls_connector(rootcert: Option<&str>) -> Result<MakeRustlsConnect, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = rootcert {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read sslrootcert {path}: {e}"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot parse sslrootcert {path}: {e}"))?;
        if certs.is_empty() {
            return Err(format!("sslrootcert {path} holds no certificate"));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("bad certificate in sslrootcert {path}: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Decodes `%XX` escapes (invalid escapes are kept as they are).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `url` with any password replaced by `***`, safe to log. Handles
/// `postgres://user:PASSWORD@host/db`, a `password=` query parameter and
/// key/value connection strings (`host=h password=PASSWORD`).
///
/// A password may hold characters that a URL parser would take for
/// delimiters (`@`, `/`, `?`, `#`, `%`, `&`), typed without
/// percent-encoding: the user information ends at the *last* `@` (a host
/// never holds one), the query starts at the first `?` after it, and a
/// password parameter's value runs to the next `&`. When in doubt, more is
/// hidden, never less.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return redact_conninfo(url);
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let mut out = String::from(scheme);
    let after = match userinfo(rest) {
        Some((user, had_password, after)) => {
            out.push_str(user);
            if had_password {
                out.push_str(":***");
            }
            out.push('@');
            after
        }
        None => rest,
    };
    let (main, query) = match after.find('?') {
        Some(q) => (&after[..q], Some(&after[q + 1..])),
        None => (after, None),
    };
    out.push_str(main);
    if let Some(query) = query {
        out.push('?');
        out.push_str(&redact_query(query));
    }
    out
}

/// The user name of a URL's user information, whether a password
/// followed it, and the text after the `@` (`rest` is the URL after
/// `scheme://`). `None` when there is no user information, or when the
/// text before the last `@` is no user name (then the `@` belongs to a
/// query value).
fn userinfo(rest: &str) -> Option<(&str, bool, &str)> {
    let at = rest.rfind('@')?;
    let info = &rest[..at];
    // `host/db?password=a@b`: the `@` is in a password parameter's value.
    if let Some(q) = info.find('?') {
        let in_query = info[q + 1..]
            .split('&')
            .any(|kv| kv.split_once('=').is_some_and(|(k, _)| is_password_key(k)));
        if in_query {
            return None;
        }
    }
    let (user, had_password) = match info.find(':') {
        Some(c) => (&info[..c], true),
        None => (info, false),
    };
    let clean = !user.contains(['/', '?', '#', '&', '=', '@']);
    clean.then_some((user, had_password, &rest[at + 1..]))
}

/// A URL's query with every password parameter's value hidden; a piece
/// without `=` after a password (a value that held an `&`) is hidden too.
fn redact_query(query: &str) -> String {
    let mut after_password = false;
    query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if is_password_key(k) => {
                after_password = true;
                format!("{k}=***")
            }
            None if after_password => "***".to_string(),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn is_password_key(k: &str) -> bool {
    k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("sslpassword")
}

/// A URL split into the part before its query and the query (empty when
/// there is none), the query starting at the first `?` after the user
/// information. A key/value connection string has no query.
fn split_query(url: &str) -> (&str, &str) {
    let Some(scheme_end) = url.find("://") else {
        return (url, "");
    };
    let start = scheme_end + 3;
    let host_start = match userinfo(&url[start..]) {
        Some((_, _, after)) => url.len() - after.len(),
        None => start,
    };
    match url[host_start..].find('?') {
        Some(q) => (&url[..host_start + q], &url[host_start + q + 1..]),
        None => (url, ""),
    }
}

/// `text` (an error message about `url`) with the URL's password, as the
/// rules of [`redact`] find it, replaced by `***`.
fn scrub(text: &str, url: &str) -> String {
    let mut secrets: Vec<&str> = Vec::new();
    if let Some(start) = url.find("://").map(|i| i + 3) {
        let rest = &url[start..];
        if let (Some(at), Some((_, true, _))) = (rest.rfind('@'), userinfo(rest)) {
            if let Some(c) = rest[..at].find(':') {
                secrets.push(&rest[c + 1..at]);
            }
        }
        let (_, query) = split_query(url);
        let mut in_password = false;
        for kv in query.split('&') {
            match kv.split_once('=') {
                Some((k, v)) if is_password_key(k) => {
                    in_password = true;
                    secrets.push(v);
                }
                None if in_password => secrets.push(kv),
                _ => {}
            }
        }
    }
    let mut out = text.to_string();
    for s in secrets.into_iter().filter(|s| !s.is_empty()) {
        out = out.replace(s, "***");
    }
    out
}

/// Redacts `password=…` in a libpq key/value string, including quoted
/// values with spaces and escaped quotes.
fn redact_conninfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = find_ignore_case(rest, "password") {
        let (before, after) = rest.split_at(pos);
        out.push_str(before);
        let key_end = "password".len();
        let after_key = &after[key_end..];
        let trimmed = after_key.trim_start();
        // Only a key if it is a word on its own followed by `=`.
        let at_word_start = before.chars().last().map_or(true, char::is_whitespace);
        if !at_word_start || !trimmed.starts_with('=') {
            out.push_str(&after[..key_end]);
            rest = after_key;
            continue;
        }
        out.push_str("password=***");
        let value = trimmed[1..].trim_start();
        rest = skip_value(value);
    }
    out.push_str(rest);
    out
}

fn find_ignore_case(hay: &str, needle: &str) -> Option<usize> {
    hay.to_ascii_lowercase().find(needle)
}

/// The text after a conninfo value (quoted or bare).
fn skip_value(v: &str) -> &str {
    if let Some(q) = v.strip_prefix('\'') {
        let mut escaped = false;
        for (i, c) in q.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '\'' if !escaped => return &q[i + 1..],
                _ => escaped = false,
            }
        }
        ""
    } else {
        match v.find(char::is_whitespace) {
            Some(i) => &v[i..],
            None => "",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_everywhere() {
        let cases = [
            (
                "postgres://ems:s3cret@db.example:5432/ems?sslmode=require",
                "postgres://ems:***@db.example:5432/ems?sslmode=require",
            ),
            (
                "postgresql://ems@localhost/ems",
                "postgresql://ems@localhost/ems",
            ),
            ("postgres://localhost/ems", "postgres://localhost/ems"),
            ("postgres://u:p%40ss/w@h/db", "postgres://u:***@h/db"),
            (
                "postgres://h/db?user=u&password=s3cret&sslmode=verify-full",
                "postgres://h/db?user=u&password=***&sslmode=verify-full",
            ),
            (
                "host=h user=u password=s3cret dbname=ems",
                "host=h user=u password=*** dbname=ems",
            ),
            (
                "host=h password = 'a b\\' c' dbname=ems",
                "host=h password=*** dbname=ems",
            ),
            ("host=h PASSWORD=x", "host=h password=***"),
            ("host=h passwordless=1", "host=h passwordless=1"),
            // Characters a URL parser trips over, typed unencoded.
            ("postgres://u:s3cret?x@h/db", "postgres://u:***@h/db"),
            (
                "postgres://u:s3cret@x@h/db?a=1",
                "postgres://u:***@h/db?a=1",
            ),
            ("postgres://u:s3cret#x@h:5/db", "postgres://u:***@h:5/db"),
            ("postgres://u:s3cret/x@h/db", "postgres://u:***@h/db"),
            ("postgres://u:s3c%25ret@h/db", "postgres://u:***@h/db"),
            (
                "postgres://u:a?b@c#d%25e/f@h/db?x=1",
                "postgres://u:***@h/db?x=1",
            ),
            (
                "postgres://h/db?user=u&password=s3cret?x@y#z/w&sslmode=require",
                "postgres://h/db?user=u&password=***&sslmode=require",
            ),
            // A port looks like `user:password` before that `@`.
            (
                "postgres://h:5432/db?user=u&password=s3cret?x@y#z/w&sslmode=require",
                "postgres://h:5432/db?user=u&password=***&sslmode=require",
            ),
            (
                "postgres://h/db?password=s3cret&x&sslmode=require",
                "postgres://h/db?password=***&***&sslmode=require",
            ),
            // An `@` in a query value: more is hidden, never less.
            (
                "postgres://u:s3cret@h/db?application_name=a@b",
                "postgres://u:***@b",
            ),
        ];
        for (input, want) in cases {
            let got = redact(input);
            assert_eq!(got, want, "{input}");
            assert!(!got.contains("s3cret"));
        }
    }

    #[test]
    fn url_options_are_checked() {
        let o = PgOptions::default();
        let bad = |u: &str| Target::parse(u, &o).err().map(|e| e.to_string());
        assert!(bad("postgres://u:pw@h/db?sslmode=bogus")
            .unwrap()
            .contains("sslmode=bogus"));
        assert!(bad("postgres://u:pw@h/db?sslcert=/x")
            .unwrap()
            .contains("sslcert"));
        assert!(
            bad("postgres://u:pw@h/db?sslmode=require&sslrootcert=/nonexistent")
                .unwrap()
                .contains("sslrootcert")
        );
        let t = Target::parse("postgres://u:pw@h/db?sslmode=verify-full", &o).unwrap();
        assert!(t.tls.is_some());
        assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
        let t = Target::parse("postgres://u:pw@h/db?application_name=x", &o).unwrap();
        assert!(t.tls.is_none());
        assert_eq!(t.config.get_ssl_mode(), SslMode::Disable);
        assert_eq!(t.config.get_application_name(), Some("x"));
        assert_eq!(
            t.config.get_connect_timeout(),
            Some(&Duration::from_secs(10))
        );
    }

    #[test]
    fn the_query_starts_after_the_user_information() {
        assert_eq!(
            split_query("postgres://u:p?w@h/db?sslmode=require"),
            ("postgres://u:p?w@h/db", "sslmode=require")
        );
        assert_eq!(split_query("postgres://h/db"), ("postgres://h/db", ""));
        assert_eq!(
            split_query("host=h password='a?b'"),
            ("host=h password='a?b'", "")
        );
        let scrubbed = scrub(
            "bad value s3c?ret and x&y",
            "postgres://u:s3c?ret@h/db?password=x&y",
        );
        assert_eq!(scrubbed, "bad value *** and ***&***");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("%2Fetc%2Fca.pem"), "/etc/ca.pem");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a%zz"), "a%zz");
        assert_eq!(percent_decode("%"), "%");
    }
}
