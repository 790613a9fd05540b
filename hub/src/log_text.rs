//! Text that a client controls (a device's field names and values quoted
//! in an error, a request path) made safe for a log line: control
//! characters (line breaks, carriage returns, terminal escapes) become
//! visible escapes, so nobody can end a log line and forge the next one
//! or rewrite the terminal; and it is cut to a bounded length.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Most characters of client text kept in one log line.
const MAX_CHARS: usize = 240;

/// `text` with every control character escaped (`\n`, `\r`, `\t`, `\\`,
/// else `\u{…}`) and cut to [`MAX_CHARS`] characters (marked with `…`).
pub(crate) fn escape(text: &str) -> Cow<'_, str> {
    let clean =
        text.chars().count() <= MAX_CHARS && !text.chars().any(|c| c.is_control() || c == '\\');
    if clean {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().min(MAX_CHARS * 2));
    for (i, c) in text.chars().enumerate() {
        if i == MAX_CHARS {
            out.push('…');
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_break_a_line() {
        assert!(matches!(escape("plain text"), Cow::Borrowed(_)));
        assert_eq!(
            escape("a\nERROR forged\r\u{1b}[2K\u{85}x\\y"),
            "a\\nERROR forged\\r\\u{1b}[2K\\u{85}x\\\\y"
        );
        let long = "é".repeat(1000);
        let cut = escape(&long);
        assert_eq!(cut.chars().count(), MAX_CHARS + 1);
        assert!(cut.ends_with('…'));
        for c in '\0'..='\u{a0}' {
            let e = escape(&c.to_string()).into_owned();
            assert!(!e.chars().any(char::is_control), "{c:?} -> {e:?}");
        }
    }
}
