//! Access tokens: generation, hashing and cheap syntactic checks.
//!
//! This module owns the token *format*; the store only ever sees
//! [`hash`]es. The format follows GitHub's token design:
//!
//! ```text
//! emsd_ 4Vb0…(43 base62 chars)…x9 3fKq0Z
//! ^^^^^ ^^^^^^^^^^^^^^^^^^^^^^^^^^ ^^^^^^
//! kind  256 bits from the OS CSPRNG  CRC32 of prefix+body, 6 base62 chars
//! ```
//!
//! (without the spaces). Prefixes: `emsd_` device, `emsv_` viewer, `emsa_`
//! admin. Every character is URL-safe (`[A-Za-z0-9_]`), a token is one
//! "word" for double-click selection, secret scanners can match the prefix,
//! and [`kind_of`] rejects typos and garbage with a checksum before the
//! database is touched.
//!
//! Tokens are plain `String`s only at the edges (printed once by the admin
//! CLI, read once from an `Authorization` header). Nothing in this crate
//! stores, logs or `Debug`-prints them.

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::store::TokenHash;

/// What a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// Streams readings of exactly one device (`emsd_`).
    Device,
    /// Watches the devices in its scope on dashboards (`emsv_`).
    Viewer,
    /// Administers the hub (`emsa_`).
    Admin,
}

impl TokenKind {
    /// The token prefix for this kind, including the trailing `_`.
    pub fn prefix(self) -> &'static str {
        match self {
            TokenKind::Device => "emsd_",
            TokenKind::Viewer => "emsv_",
            TokenKind::Admin => "emsa_",
        }
    }
}

/// Base62 alphabet (digits, upper, lower), as GitHub uses.
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Length of every prefix.
const PREFIX_LEN: usize = 5;
/// Random base62 characters: 43 × log2(62) ≈ 256.04 bits.
const BODY_LEN: usize = 43;
/// Base62 characters of the CRC32 checksum (62^6 > 2^32).
const CHECK_LEN: usize = 6;
/// Total length of every token.
pub const TOKEN_LEN: usize = PREFIX_LEN + BODY_LEN + CHECK_LEN;

/// Token generation failed: the OS random source is unavailable.
#[derive(Debug, Error)]
#[error("the operating system's random number generator failed: {0}")]
pub struct TokenError(String);

/// A new random token of `kind`, or an error if the OS CSPRNG fails.
pub fn try_generate(kind: TokenKind) -> Result<String, TokenError> {
    let mut out = String::with_capacity(TOKEN_LEN);
    out.push_str(kind.prefix());
    // Rejection sampling keeps every character uniform: bytes 0..248 map
    // to 0..62 four times each, 248..=255 are thrown away.
    let mut buf = [0u8; 64];
    let mut body = 0;
    while body < BODY_LEN {
        getrandom::fill(&mut buf).map_err(|e| TokenError(e.to_string()))?;
        for &b in buf.iter() {
            if body == BODY_LEN {
                break;
            }
            if b < 248 {
                out.push(char::from(ALPHABET[usize::from(b % 62)]));
                body += 1;
            }
        }
    }
    buf.fill(0);
    let crc = crc32(out.as_bytes());
    push_base62_fixed(&mut out, crc);
    Ok(out)
}

/// A new random token of `kind`.
///
/// # Panics
/// If the operating system's random number generator is unavailable, in
/// which case no secure token can be made at all. Use [`try_generate`] to
/// handle that as an error.
pub fn generate(kind: TokenKind) -> String {
    match try_generate(kind) {
        Ok(t) => t,
        // The message names the RNG failure only, never a token.
        Err(e) => panic!("{e}"),
    }
}

/// SHA-256 of the token's UTF-8 bytes: the only form a database stores.
pub fn hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// The kind of a well-formed token: right prefix, length, alphabet and
/// checksum. `None` for anything else. Constant work bounded by
/// [`TOKEN_LEN`]; never panics, whatever the input.
pub fn kind_of(token: &str) -> Option<TokenKind> {
    let bytes = token.as_bytes();
    if bytes.len() != TOKEN_LEN {
        return None;
    }
    let kind = match bytes.get(..PREFIX_LEN)? {
        b"emsd_" => TokenKind::Device,
        b"emsv_" => TokenKind::Viewer,
        b"emsa_" => TokenKind::Admin,
        _ => return None,
    };
    let (signed, check) = bytes.split_at(PREFIX_LEN + BODY_LEN);
    if !signed[PREFIX_LEN..].iter().all(u8::is_ascii_alphanumeric) {
        return None;
    }
    let mut want = 0u64;
    for &c in check {
        want = want * 62 + u64::from(base62_value(c)?);
    }
    (want == u64::from(crc32(signed))).then_some(kind)
}

fn base62_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'Z' => Some(c - b'A' + 10),
        b'a'..=b'z' => Some(c - b'a' + 36),
        _ => None,
    }
}

/// Appends `v` as exactly [`CHECK_LEN`] base62 digits, most significant
/// first.
fn push_base62_fixed(out: &mut String, v: u32) {
    let mut digits = [b'0'; CHECK_LEN];
    let mut v = u64::from(v);
    for d in digits.iter_mut().rev() {
        *d = ALPHABET[(v % 62) as usize];
        v /= 62;
    }
    out.extend(digits.iter().map(|&b| char::from(b)));
}

/// CRC-32 (IEEE 802.3, as zlib/PNG), table-driven.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn crc32_known_vector() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn generated_tokens_have_the_documented_shape() {
        for kind in [TokenKind::Device, TokenKind::Viewer, TokenKind::Admin] {
            let t = generate(kind);
            assert_eq!(t.len(), 54);
            assert!(t.starts_with(kind.prefix()));
            assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
            assert_eq!(t.matches('_').count(), 1);
            assert_eq!(kind_of(&t), Some(kind));
        }
    }

    #[test]
    fn prefixes_are_written_out() {
        assert_eq!(TokenKind::Device.prefix(), "emsd_");
        assert_eq!(TokenKind::Viewer.prefix(), "emsv_");
        assert_eq!(TokenKind::Admin.prefix(), "emsa_");
    }

    #[test]
    fn tokens_are_unique_and_use_the_whole_alphabet() {
        let mut seen = HashSet::new();
        let mut chars = HashSet::new();
        for _ in 0..2000 {
            let t = generate(TokenKind::Device);
            chars.extend(t.as_bytes()[5..48].iter().copied());
            assert!(seen.insert(t));
        }
        assert_eq!(chars.len(), 62);
    }

    #[test]
    fn every_single_character_typo_is_rejected() {
        let t = generate(TokenKind::Viewer);
        let bytes = t.as_bytes();
        for i in 5..bytes.len() {
            for &c in ALPHABET.iter() {
                if c == bytes[i] {
                    continue;
                }
                let mut m = bytes.to_vec();
                m[i] = c;
                let s = String::from_utf8(m).unwrap();
                assert_eq!(kind_of(&s), None, "typo at {i} accepted");
            }
        }
    }

    #[test]
    fn changing_the_prefix_breaks_the_checksum() {
        let t = generate(TokenKind::Viewer);
        let as_device = format!("emsd_{}", &t[5..]);
        assert_eq!(kind_of(&as_device), None);
    }

    #[test]
    fn garbage_is_rejected_without_panicking() {
        let t = generate(TokenKind::Admin);
        let huge = "x".repeat(10_000_000);
        let cases = [
            String::new(),
            "emsd_".into(),
            "Bearer x".into(),
            huge,
            format!("{t} "),
            format!(" {t}"),
            t[..53].to_string(),
            format!("{}é", &t[..52]),
            format!("emsd_{}", "é".repeat(24)),
            "emsx_".to_string() + &t[5..],
            "\u{0}".repeat(54),
            format!("{}~{}", &t[..20], &t[21..]),
        ];
        for c in &cases {
            assert_eq!(kind_of(c), None);
        }
        // Every 54-byte string whose prefix fits but whose checksum is
        // not base62 or not right.
        assert_eq!(kind_of(&format!("{}!!!!!!", &t[..48])), None);
        assert_eq!(kind_of(&format!("{}zzzzzz", &t[..48])), None);
    }

    #[test]
    fn hash_is_sha256_of_the_utf8_bytes() {
        // SHA-256("abc"), FIPS 180-2 test vector.
        let want = [
            0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae,
            0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61,
            0xf2, 0x00, 0x15, 0xad,
        ];
        assert_eq!(hash("abc"), want);
        let t = generate(TokenKind::Device);
        assert_eq!(hash(&t), hash(&t.clone()));
        assert_ne!(hash(&t), hash(&generate(TokenKind::Device)));
    }

    #[test]
    fn base62_checksum_is_fixed_width() {
        let mut s = String::new();
        push_base62_fixed(&mut s, 0);
        assert_eq!(s, "000000");
        let mut s = String::new();
        push_base62_fixed(&mut s, u32::MAX);
        assert_eq!(s.len(), 6);
        let v = s
            .bytes()
            .fold(0u64, |a, c| a * 62 + u64::from(base62_value(c).unwrap()));
        assert_eq!(v, u64::from(u32::MAX));
    }
}
