//! The PostgreSQL / TimescaleDB backend (`postgres://…`).
//!
//! (Phase 1 placeholder: URL redaction and options; the backend follows.)

use super::{DeviceInfo, Row, Store, StoreError, TokenHash, ViewerScope};
use ems_shared::Reading;

/// Options for the PostgreSQL backend that do not belong in the URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgOptions {
    /// TimescaleDB only: drop chunks older than this many days.
    pub retention_days: Option<u32>,
    /// TimescaleDB only: compress chunks older than this many days.
    pub compress_after_days: Option<u32>,
}

/// A PostgreSQL database handle.
pub struct PgStore {
    _private: (),
}

impl PgStore {
    /// Connects to `url` and brings the schema up to date.
    pub fn open(url: &str, _opts: &PgOptions) -> Result<Self, StoreError> {
        Err(StoreError::Open {
            url: redact(url),
            reason: "the PostgreSQL backend is not available yet".into(),
        })
    }
}

impl Store for PgStore {
    fn insert_batch(&mut self, _rows: &[Row]) -> Result<(), StoreError> {
        Err(unavailable())
    }
    fn device_token_valid(&mut self, _: &str, _: &TokenHash) -> Result<bool, StoreError> {
        Err(unavailable())
    }
    fn viewer_scope(&mut self, _: &TokenHash) -> Result<Option<ViewerScope>, StoreError> {
        Err(unavailable())
    }
    fn add_device(&mut self, _: &str, _: &TokenHash, _: i64) -> Result<(), StoreError> {
        Err(unavailable())
    }
    fn list_devices(&mut self) -> Result<Vec<DeviceInfo>, StoreError> {
        Err(unavailable())
    }
    fn revoke_device(&mut self, _: &str, _: i64) -> Result<(), StoreError> {
        Err(unavailable())
    }
    fn rotate_device(&mut self, _: &str, _: &TokenHash) -> Result<(), StoreError> {
        Err(unavailable())
    }
    fn add_viewer(
        &mut self,
        _: &str,
        _: &TokenHash,
        _: &ViewerScope,
        _: i64,
    ) -> Result<(), StoreError> {
        Err(unavailable())
    }
    fn readings(&mut self, _: &str, _: i64, _: i64, _: usize) -> Result<Vec<Reading>, StoreError> {
        Err(unavailable())
    }
}

fn unavailable() -> StoreError {
    StoreError::Db("the PostgreSQL backend is not available yet".into())
}

/// `url` with any password replaced by `***`, safe to log. Handles
/// `postgres://user:PASSWORD@host/db`, a `password=` query parameter and
/// key/value connection strings (`host=h password=PASSWORD`).
pub fn redact(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let (scheme, rest) = url.split_at(scheme_end + 3);
        let (main, query) = match rest.find('?') {
            Some(q) => (&rest[..q], Some(&rest[q + 1..])),
            None => (rest, None),
        };
        let mut out = String::from(scheme);
        match main.rfind('@') {
            Some(at) => {
                let userinfo = &main[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&main[at..]);
            }
            None => out.push_str(main),
        }
        if let Some(query) = query {
            out.push('?');
            let parts: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            out.push_str(&parts.join("&"));
        }
        return out;
    }
    redact_conninfo(url)
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
        ];
        for (input, want) in cases {
            let got = redact(input);
            assert_eq!(got, want, "{input}");
            assert!(!got.contains("s3cret"));
        }
    }
}
