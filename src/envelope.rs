//! The Get2Dial error envelope `{"status":"error","message":"..."}`: default messages, the
//! bytes of an envelope, and turning an upstream's error body into one.

use bytes::Bytes;
use http::header::HeaderName;
use serde::Deserialize;

/// Content type of every envelope.
pub const CONTENT_TYPE: &str = "application/json";

/// Longest message taken over from an upstream 4xx body, in characters.
const MAX_UPSTREAM_MESSAGE_CHARS: usize = 200;

/// The default message for `status`: fixed by the contract where it fixes one, otherwise the
/// lowercase reason phrase.
pub fn default_message(status: u16) -> &'static str {
    match status {
        400 => "invalid request body",
        401 => "missing or invalid authorization header",
        403 => "forbidden",
        404 => "not found",
        405 => "method not allowed",
        408 => "request timeout",
        409 => "conflict",
        410 => "gone",
        411 => "length required",
        412 => "precondition failed",
        413 => "request body too large",
        414 => "uri too long",
        415 => "unsupported media type",
        416 => "range not satisfiable",
        417 => "expectation failed",
        421 => "misdirected request",
        422 => "unprocessable entity",
        423 => "locked",
        424 => "failed dependency",
        425 => "too early",
        426 => "upgrade required",
        428 => "precondition required",
        429 => "rate limit exceeded",
        431 => "request header fields too large",
        451 => "unavailable for legal reasons",
        500 => "internal server error",
        501 => "not implemented",
        502 => "upstream unavailable",
        503 => "service unavailable",
        504 => "upstream timeout",
        _ => reason_phrase(status),
    }
}

/// The registered reason phrase of `status` in lowercase (`http`'s table: "payment required",
/// "not extended"); "request failed" or "internal server error" for unregistered codes.
fn reason_phrase(status: u16) -> &'static str {
    static PHRASES: std::sync::OnceLock<Vec<Option<String>>> = std::sync::OnceLock::new();
    let phrases = PHRASES.get_or_init(|| {
        (400..600)
            .map(|code| {
                http::StatusCode::from_u16(code)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .map(str::to_lowercase)
            })
            .collect()
    });
    let registered = status
        .checked_sub(400)
        .and_then(|i| phrases.get(usize::from(i)))
        .and_then(Option::as_deref);
    match registered {
        Some(phrase) => phrase,
        None if (400..500).contains(&status) => "request failed",
        None => "internal server error",
    }
}

/// The envelope bytes for `message`, JSON-escaped.
pub fn body(message: &str) -> Bytes {
    // Serialising a struct of two strings cannot fail; fall back to a fixed text all the same.
    let json = serde_json::to_vec(&Wire {
        status: "error",
        message,
    })
    .unwrap_or_else(|_| br#"{"status":"error","message":"internal server error"}"#.to_vec());
    Bytes::from(json)
}

/// The envelope bytes for `status` with its default message.
pub fn default_body(status: u16) -> Bytes {
    body(default_message(status))
}

#[derive(serde::Serialize)]
struct Wire<'a> {
    status: &'static str,
    message: &'a str,
}

/// True when `bytes` is exactly a well-formed error envelope: a JSON object with
/// `"status":"error"`, a non-empty string `message`, and nothing else.
pub fn is_envelope(bytes: &[u8]) -> bool {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Strict<'a> {
        #[serde(borrow)]
        status: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        message: std::borrow::Cow<'a, str>,
    }
    match serde_json::from_slice::<Strict>(bytes) {
        Ok(e) => e.status == "error" && !e.message.trim().is_empty(),
        Err(_) => false,
    }
}

/// The message a 4xx upstream body may lend the envelope: the first of the JSON string fields
/// `message`, `error`, `detail`, `title` that is one short line of printable text.
pub fn upstream_message(bytes: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let object = value.as_object()?;
    ["message", "error", "detail", "title"]
        .iter()
        .filter_map(|k| object.get(*k)?.as_str())
        .map(str::trim)
        .find(|m| is_safe_message(m))
        .map(str::to_owned)
}

fn is_safe_message(m: &str) -> bool {
    !m.is_empty()
        && m.chars().count() <= MAX_UPSTREAM_MESSAGE_CHARS
        && !m.chars().any(char::is_control)
}

/// What an upstream error answer becomes: its own bytes when it already is an envelope,
/// otherwise an envelope whose message depends on the status: a 4xx keeps a short upstream
/// message (see [`upstream_message`]), a 5xx never does (nothing leaks).
pub fn normalise(status: u16, body_bytes: &[u8]) -> Bytes {
    if is_envelope(body_bytes) {
        return Bytes::copy_from_slice(body_bytes);
    }
    replacement(status, body_bytes)
}

/// The envelope for an upstream error body that is not one (see [`normalise`]).
pub fn replacement(status: u16, body_bytes: &[u8]) -> Bytes {
    if (400..500).contains(&status) {
        if let Some(m) = upstream_message(body_bytes) {
            return body(&m);
        }
    }
    default_body(status)
}

/// Header carrying the request id on every answer. A `&'static str` for Pingora's inserts,
/// which take it without copying; [`REQUEST_ID_HEADER`] for lookups and plain header maps.
pub const REQUEST_ID: &str = "x-request-id";
/// [`REQUEST_ID`] as a parsed header name.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static(REQUEST_ID);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_bytes_are_exact_and_escaped() {
        assert_eq!(
            &body("not found")[..],
            br#"{"status":"error","message":"not found"}"#
        );
        assert_eq!(
            &body("a \"q\" \\ b")[..],
            br#"{"status":"error","message":"a \"q\" \\ b"}"#
        );
    }

    #[test]
    fn recognises_envelopes_strictly() {
        assert!(is_envelope(br#"{"status":"error","message":"x"}"#));
        assert!(is_envelope(
            b" {\"message\":\"x\" , \"status\":\"error\"}\n"
        ));
        assert!(!is_envelope(br#"{"status":"error","message":""}"#));
        assert!(!is_envelope(br#"{"status":"success","message":"x"}"#));
        assert!(!is_envelope(
            br#"{"status":"error","message":"x","data":{}}"#
        ));
        assert!(!is_envelope(br#"{"status":"error","message":5}"#));
        assert!(!is_envelope(b"<html>"));
    }

    #[test]
    fn four_xx_keeps_a_safe_message_five_xx_never() {
        assert_eq!(
            &normalise(422, br#"{"error":"email is invalid"}"#)[..],
            br#"{"status":"error","message":"email is invalid"}"#
        );
        assert_eq!(
            &normalise(400, br#"{"detail":"bad","title":"t"}"#)[..],
            br#"{"status":"error","message":"bad"}"#
        );
        assert_eq!(
            &normalise(500, br#"{"message":"pq: relation users does not exist"}"#)[..],
            br#"{"status":"error","message":"internal server error"}"#
        );
        // Multi-line or overlong messages fall back to the default.
        assert_eq!(
            &normalise(404, b"{\"message\":\"a\\nb\"}")[..],
            br#"{"status":"error","message":"not found"}"#
        );
        let long = format!("{{\"message\":\"{}\"}}", "x".repeat(201));
        assert_eq!(
            &normalise(409, long.as_bytes())[..],
            br#"{"status":"error","message":"conflict"}"#
        );
        // Non-string fields are skipped.
        assert_eq!(
            &normalise(403, br#"{"error":{"code":1},"title":"nope"}"#)[..],
            br#"{"status":"error","message":"nope"}"#
        );
    }

    #[test]
    fn envelopes_pass_unchanged() {
        let e = br#"{"status":"error","message":"database on fire"}"#;
        assert_eq!(&normalise(500, e)[..], e);
    }

    #[test]
    fn every_code_has_a_message() {
        for code in 400..600 {
            assert!(!default_message(code).is_empty());
        }
    }
}
