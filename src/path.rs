//! The request path as the upstream will route on it.
//!
//! The gateway must match routes on the same path the upstream routes on, or a request can
//! be checked as one route and served as another (`/api/v1/auth/%6cogin` is the login handler
//! to a Go `net/http` upstream, which routes on the percent-decoded path). So the path is
//! normalised once, before routing, and the normalised target is what goes upstream:
//!
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - _ ~`) are decoded, which RFC 3986
//!   6.2.2.2 says never changes what a URI means; every other escape stays as it came;
//! - paths that could mean different resources to different servers are refused: not starting
//!   with `/`, empty (`//`) or dot (`.`, `..`) segments, backslashes, spaces, control bytes,
//!   malformed escapes, and escaped dots, slashes, backslashes or control bytes.
//!
//! Route prefixes hold only unreserved characters and `/` (checked at load by
//! [`is_route_prefix`]), so an escape left in a normalised path can never be part of a route
//! match: a server that decodes it sees a character no prefix contains, and the gateway sees
//! `%`, which no prefix contains either. Both pick the same route.

use std::borrow::Cow;

/// The path cannot be routed safely: answer 400 `invalid request path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid;

/// `path` normalised for routing and forwarding (see the module docs); borrowed when it is
/// canonical already, which is the case for nearly every request.
pub fn normalise(path: &str) -> Result<Cow<'_, str>, Invalid> {
    let decoded = if memchr::memchr(b'%', path.as_bytes()).is_none() {
        Cow::Borrowed(path)
    } else {
        decode_unreserved(path)?
    };
    check_segments(decoded.as_bytes())?;
    Ok(decoded)
}

/// True for a prefix a route may be configured with: `/` followed by unreserved characters
/// and non-empty, non-dot segments.
pub fn is_route_prefix(prefix: &str) -> bool {
    prefix.starts_with('/')
        && prefix.bytes().all(|b| b == b'/' || is_unreserved(b))
        && check_segments(prefix.as_bytes()).is_ok()
}

/// RFC 3986 2.3 unreserved characters, `.` aside (escaped dots are refused, see module docs).
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~' | b'.')
}

/// Validates every escape and decodes those of unreserved characters.
fn decode_unreserved(path: &str) -> Result<Cow<'_, str>, Invalid> {
    let bytes = path.as_bytes();
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0; // bytes of `path` already in `out`
    let mut i = 0;
    while let Some(at) = memchr::memchr(b'%', &bytes[i..]) {
        let at = i + at;
        let (Some(hi), Some(lo)) = (
            bytes.get(at + 1).and_then(hex),
            bytes.get(at + 2).and_then(hex),
        ) else {
            return Err(Invalid);
        };
        let decoded = hi << 4 | lo;
        if matches!(decoded, b'.' | b'/' | b'\\') || decoded.is_ascii_control() {
            return Err(Invalid);
        }
        if is_unreserved(decoded) {
            let out = out.get_or_insert_with(|| Vec::with_capacity(bytes.len()));
            out.extend_from_slice(&bytes[copied..at]);
            out.push(decoded);
            copied = at + 3;
        }
        i = at + 3;
    }
    match out {
        None => Ok(Cow::Borrowed(path)),
        Some(mut out) => {
            out.extend_from_slice(&bytes[copied..]);
            // Only ASCII bytes replaced ASCII escapes: still UTF-8.
            String::from_utf8(out).map(Cow::Owned).map_err(|_| Invalid)
        }
    }
}

/// Refuses what could make two servers disagree about which resource is meant (escapes are
/// validated apart).
fn check_segments(bytes: &[u8]) -> Result<(), Invalid> {
    if bytes.first() != Some(&b'/') {
        return Err(Invalid);
    }
    let dot_segment = |seg: &[u8]| seg == b"." || seg == b"..";
    let mut segment_start = 1;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        match b {
            b'/' => {
                let segment = &bytes[segment_start..i];
                if segment.is_empty() || dot_segment(segment) {
                    return Err(Invalid);
                }
                segment_start = i + 1;
            }
            b'\\' | b' ' => return Err(Invalid),
            b if b.is_ascii_control() => return Err(Invalid),
            _ => {}
        }
    }
    if dot_segment(&bytes[segment_start..]) {
        return Err(Invalid);
    }
    Ok(())
}

/// The value of one hex digit.
fn hex(b: &u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreserved_escapes_are_decoded_in_any_case_and_mix() {
        for (raw, want) in [
            ("/api/v1/auth/%6cogin", "/api/v1/auth/login"),
            ("/api/v1/auth/%6Cogin", "/api/v1/auth/login"),
            ("/api/v1/auth/%6C%6F%67%69%6E", "/api/v1/auth/login"),
            ("/%61pi/v1/n%6fdes/%72egister", "/api/v1/nodes/register"),
            ("/a/%7e%7E%2d%5F%30%39%41%5a", "/a/~~-_09AZ"),
            // Reserved and non-ASCII escapes stay as they came.
            ("/a/%20b/%3A%3a/%C3%A9", "/a/%20b/%3A%3a/%C3%A9"),
            ("/a/%2541", "/a/%2541"),
            ("/a/%25%6c", "/a/%25l"),
        ] {
            assert_eq!(normalise(raw).unwrap(), want, "{raw}");
        }
        assert!(matches!(normalise("/api/v1/x"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalise("/a/%20"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn paths_that_servers_may_read_differently_are_refused() {
        for p in [
            "/api/v1/../admin",
            "/api/v1/./x",
            "//api/v1/x",
            "/api/v1//x",
            "/api/v1/%2e%2e/x",
            "/api/v1/%2E/x",
            "/a/%2ex",
            "/api/v1%2fx",
            "/api/v1%2Fx",
            "/api/v1/%5cx",
            "/api/v1/%zz",
            "/api/v1/%0a",
            "/api/v1/%7f",
            "/api\\v1",
            "api/v1",
            "",
            "/api/..",
            "/.",
            "/a/.",
            "/a/%2",
            "/a/%",
            "/a%00",
            "/a b",
            "/a\tb",
            // Decoding must not smuggle what the raw checks refuse.
            "/a/%2f%6c",
        ] {
            assert_eq!(normalise(p), Err(Invalid), "{p}");
        }
        for p in [
            "/",
            "/api/v1/",
            "/api/v1/x%20y",
            "/a/b.c/..d",
            "/api/v1/users/1",
            "/a/.../b",
            "/a/.b/",
        ] {
            assert!(normalise(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn route_prefixes_hold_only_unreserved_characters() {
        for ok in ["/", "/api/v1/", "/api/v1/auth/login", "/ws/", "/a-b_c~d.e"] {
            assert!(is_route_prefix(ok), "{ok}");
        }
        for bad in [
            "", "api", "/a b", "/a%41", "/a:b", "/a+b", "/a;b", "/é", "//", "/a/../b", "/a/.",
        ] {
            assert!(!is_route_prefix(bad), "{bad}");
        }
    }
}
