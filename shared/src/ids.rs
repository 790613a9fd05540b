//! Identifier syntax: device ids (`[A-Za-z0-9_.-]{1,64}`) and meter ids
//! (`[a-z0-9_-]{1,32}`).

use thiserror::Error;

/// Why an identifier was refused. Never echoes the identifier itself, so
/// it is safe to log even when a client sent garbage.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdError {
    /// Empty string.
    #[error("identifier is empty")]
    Empty,
    /// Longer than allowed.
    #[error("identifier is longer than {max} characters")]
    TooLong {
        /// The maximum length.
        max: usize,
    },
    /// Contains a character outside the allowed set.
    #[error("identifier contains a character outside {allowed}")]
    BadChar {
        /// The allowed set, for the message.
        allowed: &'static str,
    },
}

fn check(s: &str, max: usize, allowed: &'static str, ok: fn(u8) -> bool) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > max {
        return Err(IdError::TooLong { max });
    }
    if !s.bytes().all(ok) {
        return Err(IdError::BadChar { allowed });
    }
    Ok(())
}

/// A device id: 1–64 characters of `[A-Za-z0-9_.-]`.
pub fn validate_device_id(s: &str) -> Result<(), IdError> {
    check(s, 64, "[A-Za-z0-9_.-]", |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
    })
}

/// A meter id: 1–32 characters of `[a-z0-9_-]`.
pub fn validate_meter_id(s: &str) -> Result<(), IdError> {
    check(s, 32, "[a-z0-9_-]", |b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        assert!(validate_device_id("ems_001").is_ok());
        assert!(validate_device_id("A.b-C_9").is_ok());
        assert!(validate_device_id(&"a".repeat(64)).is_ok());
        assert_eq!(validate_device_id(""), Err(IdError::Empty));
        assert!(matches!(
            validate_device_id(&"a".repeat(65)),
            Err(IdError::TooLong { .. })
        ));
        for bad in ["a b", "a/b", "ä", "a?x", "a%20", "a\0"] {
            assert!(
                matches!(validate_device_id(bad), Err(IdError::BadChar { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn meter_ids() {
        assert!(validate_meter_id("main").is_ok());
        assert!(validate_meter_id("phase_a-1").is_ok());
        assert!(validate_meter_id("Main").is_err());
        assert!(validate_meter_id("a.b").is_err());
        assert!(validate_meter_id(&"m".repeat(33)).is_err());
        assert!(validate_meter_id("").is_err());
    }
}
