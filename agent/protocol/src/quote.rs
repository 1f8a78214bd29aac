//! Names fit for a message: the one place that turns untrusted bytes (an archive entry name,
//! a path from an AppSpec, a value from a command) into text that can go into an error, a log
//! line, a journal or a status record without letting the input choose the output's size or
//! smuggle in control characters.
//!
//! The rules: printable characters are kept; control characters, `\` and `"` are escaped
//! (`\n`, `\t`, `\u{1b}`, `\\`, `\"`); bytes that are not UTF-8 are shown as `\xNN`; and the
//! result is cut after [`MAX_MESSAGE_CHARS`] characters with a `…`. [`quote_bytes`] also wraps
//! the result in double quotes, which is how every entry name appears in pier's messages.

use std::fmt::Write as _;

/// How many characters of a name (after escaping) a message shows before cutting it with `…`.
pub const MAX_MESSAGE_CHARS: usize = 200;

/// `raw` quoted for a message: `"name"`, escaped and cut as the module says.
pub fn quote_bytes(raw: &[u8]) -> String {
    format!("\"{}\"", escape_bytes(raw, MAX_MESSAGE_CHARS))
}

/// [`quote_bytes`] for text.
pub fn quote(s: &str) -> String {
    quote_bytes(s.as_bytes())
}

/// Free text from outside (a parser's message that may echo its input) cut to `max`
/// characters and escaped, without quotes.
pub fn bounded(s: &str, max: usize) -> String {
    escape_bytes(s.as_bytes(), max)
}

/// Escapes `raw` and cuts it after `max` output characters, appending `…` when cut.
pub fn escape_bytes(raw: &[u8], max: usize) -> String {
    let mut out = String::with_capacity(raw.len().min(max) + 8);
    let mut shown = 0usize;
    // Each piece is pushed whole or not at all, so an escape is never cut in half.
    let mut push = |out: &mut String, piece: &str| -> bool {
        let n = piece.chars().count();
        if shown + n > max {
            return false;
        }
        out.push_str(piece);
        shown += n;
        true
    };
    let mut rest = raw;
    let mut piece = String::with_capacity(12);
    while !rest.is_empty() {
        let (valid, bad) = match std::str::from_utf8(rest) {
            Ok(s) => (s, None),
            Err(e) => {
                let (v, b) = rest.split_at(e.valid_up_to());
                let len = e.error_len().unwrap_or(b.len());
                // valid_up_to promises this prefix is UTF-8.
                let v = std::str::from_utf8(v).unwrap_or_default();
                (v, Some(&b[..len]))
            }
        };
        for c in valid.chars() {
            piece.clear();
            match c {
                '\\' => piece.push_str("\\\\"),
                '"' => piece.push_str("\\\""),
                '\n' => piece.push_str("\\n"),
                '\t' => piece.push_str("\\t"),
                '\r' => piece.push_str("\\r"),
                c if c.is_control() => {
                    let _ = write!(piece, "\\u{{{:x}}}", c as u32);
                }
                c => piece.push(c),
            }
            if !push(&mut out, &piece) {
                out.push('…');
                return out;
            }
        }
        let consumed = valid.len();
        match bad {
            None => break,
            Some(b) => {
                for byte in b {
                    piece.clear();
                    let _ = write!(piece, "\\x{byte:02x}");
                    if !push(&mut out, &piece) {
                        out.push('…');
                        return out;
                    }
                }
                rest = &rest[consumed + b.len()..];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_quoted_as_they_are() {
        assert_eq!(quote("app/bin/run.sh"), "\"app/bin/run.sh\"");
    }

    #[test]
    fn control_characters_and_bad_bytes_are_escaped() {
        assert_eq!(
            quote_bytes(b"a\nb\x1b[31m\xff\"\\"),
            "\"a\\nb\\u{1b}[31m\\xff\\\"\\\\\""
        );
        assert_eq!(quote_bytes("é\u{7f}".as_bytes()), "\"é\\u{7f}\"");
    }

    #[test]
    fn long_names_are_cut_whatever_their_size() {
        let long = vec![b'a'; 1 << 20];
        let q = quote_bytes(&long);
        assert_eq!(q.chars().count(), MAX_MESSAGE_CHARS + 3);
        assert!(q.ends_with("…\""), "{q}");
        let bad = vec![0xffu8; 1 << 16];
        let q = quote_bytes(&bad);
        assert!(q.chars().count() <= MAX_MESSAGE_CHARS + 3, "{q}");
        assert!(q.starts_with("\"\\xff\\xff"), "{q}");
    }
}
