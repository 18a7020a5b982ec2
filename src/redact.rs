//! Credentials never reach a log line, whoever writes it.
//!
//! The gateway's own lines hold no credential, but Pingora's do at debug level (it prints
//! whole request heads: `?token=` targets, `Authorization` values), and a dependency may do
//! the same tomorrow. So every formatted line passes through [`redact`] on its way to stderr:
//! JWT-shaped strings, `token=` values and `Bearer`/`Basic` credentials become `[redacted]`.

use std::borrow::Cow;
use std::io::Write;

/// What replaces a credential.
const REDACTED: &[u8] = b"[redacted]";

/// Whether `text` may hold a credential: `eyJ` (a JWT), `oken=`/`OKEN=` (a token parameter),
/// or a `Bearer`/`Basic` scheme. Three byte scans (`J`, `=`, `b`/`B`), each checking what
/// precedes a hit: cheap enough for every access line's client fields.
pub fn suspicious(text: &[u8]) -> bool {
    let before = |i: usize, mark: &[u8]| i >= mark.len() && &text[i - mark.len()..i] == mark;
    memchr::memchr_iter(b'J', text).any(|i| before(i, b"ey"))
        || memchr::memchr_iter(b'=', text).any(|i| before(i, b"oken") || before(i, b"OKEN"))
        || has_scheme(text)
}

/// `line` with every credential in it replaced by `[redacted]`; borrowed when it holds none.
pub fn redact(line: &[u8]) -> Cow<'_, [u8]> {
    if !suspicious(line) {
        return Cow::Borrowed(line);
    }
    let mut out = Vec::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        if let Some(end) = jwt_at(line, i) {
            out.extend_from_slice(REDACTED);
            i = end;
        } else if let Some(start) = value_after(line, i, b"token=") {
            out.extend_from_slice(&line[i..start]);
            out.extend_from_slice(REDACTED);
            i = skip_value(line, start);
        } else if let Some(start) = scheme_at(line, i) {
            out.extend_from_slice(&line[i..start]);
            out.extend_from_slice(REDACTED);
            i = skip_value(line, start);
        } else {
            out.push(line[i]);
            i += 1;
        }
    }
    Cow::Owned(out)
}

fn has_scheme(line: &[u8]) -> bool {
    memchr::memchr2_iter(b'b', b'B', line).any(|i| scheme_at(line, i).is_some())
}

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// The end of a JWT starting at `i` (`eyJ...` with three dot-separated base64url parts).
fn jwt_at(line: &[u8], i: usize) -> Option<usize> {
    if !line[i..].starts_with(b"eyJ") || (i > 0 && is_b64url(line[i - 1])) {
        return None;
    }
    let mut j = i;
    for part in 0..3 {
        let start = j;
        while j < line.len() && is_b64url(line[j]) {
            j += 1;
        }
        if j == start && part < 2 {
            return None;
        }
        if part < 2 {
            if line.get(j) != Some(&b'.') {
                return None;
            }
            j += 1;
        }
    }
    Some(j)
}

/// Where the value after `key` (case-insensitive) starts, when `key` starts at `i`.
fn value_after(line: &[u8], i: usize, key: &[u8]) -> Option<usize> {
    let end = i + key.len();
    (end <= line.len() && line[i..end].eq_ignore_ascii_case(key)).then_some(end)
}

/// Where the credential after `Bearer ` or `Basic ` (any case) starts, when the scheme starts
/// at `i`.
fn scheme_at(line: &[u8], i: usize) -> Option<usize> {
    if i > 0 && line[i - 1].is_ascii_alphanumeric() {
        return None;
    }
    let after = value_after(line, i, b"bearer").or_else(|| value_after(line, i, b"basic"))?;
    let mut j = after;
    while matches!(line.get(j), Some(b' ' | b'\t')) {
        j += 1;
    }
    (j > after && j < line.len() && !matches!(line[j], b'"' | b'\'' | b'\\')).then_some(j)
}

/// The end of a credential value: up to a separator, quote or space.
fn skip_value(line: &[u8], mut j: usize) -> usize {
    while j < line.len()
        && !matches!(
            line[j],
            b'&' | b'"' | b'\'' | b' ' | b',' | b';' | b'\\' | b'\n' | b'\t' | b'}' | b')'
        )
    {
        j += 1;
    }
    j
}

/// A writer that redacts each formatted line before it reaches `inner` (see the module docs).
pub struct Redacting<W>(pub W);

impl<W: Write> Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The formatter hands over one whole line per call.
        self.0.write_all(&redact(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> String {
        String::from_utf8(redact(s.as_bytes()).into_owned()).unwrap()
    }

    const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl_-x";

    #[test]
    fn credentials_are_redacted_wherever_they_stand() {
        for (line, want) in [
            (
                format!("GET /ws/agent?token={JWT}&x=1, Host: a"),
                "GET /ws/agent?token=[redacted]&x=1, Host: a".to_string(),
            ),
            (
                "uri: /ws?TOKEN=abc def".to_string(),
                "uri: /ws?TOKEN=[redacted] def".into(),
            ),
            (
                format!(r#"headers: {{"authorization": "Bearer {JWT}"}}"#),
                r#"headers: {"authorization": "Bearer [redacted]"}"#.into(),
            ),
            (
                "authorization: bearer node-key-123, next".into(),
                "authorization: bearer [redacted], next".into(),
            ),
            ("Basic dXNlcjpwYXNz".into(), "Basic [redacted]".into()),
            (format!("a {JWT} b"), "a [redacted] b".into()),
            (
                format!("access_token={JWT}"),
                "access_token=[redacted]".into(),
            ),
        ] {
            assert_eq!(r(&line), want, "{line}");
        }
    }

    #[test]
    fn ordinary_lines_pass_unchanged_and_borrowed() {
        for line in [
            r#"{"level":"INFO","target":"access","path":"/api/v1/calls","status":200}"#,
            "eyJ alone is not a token",
            "Bearer",
        ] {
            assert_eq!(r(line), line);
        }
        assert!(matches!(redact(b"plain line"), Cow::Borrowed(_)));
    }
}
