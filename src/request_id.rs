//! Request ids: a client's `X-Request-Id` is kept when it is sane, otherwise one is made.

use http::HeaderValue;
use pingora::http::RequestHeader;

use crate::envelope::REQUEST_ID_HEADER;

/// Longest client-supplied id that is kept.
const MAX_LEN: usize = 128;

/// The request's id: the client's if it is 1..=128 characters of `[A-Za-z0-9._:-]`,
/// otherwise a new UUIDv4 (simple form). A header value, so that echoing it to the upstream
/// and the client shares one buffer instead of copying a string twice per request.
pub fn take_or_make(req: &RequestHeader) -> HeaderValue {
    match req.headers.get(REQUEST_ID_HEADER) {
        Some(v) if is_sane(v.as_bytes()) => v.clone(),
        _ => {
            let mut buf = [0u8; uuid::fmt::Simple::LENGTH];
            let id = uuid::Uuid::new_v4().simple().encode_lower(&mut buf);
            // 32 lowercase hex digits are always a valid header value.
            HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("-"))
        }
    }
}

/// The id as text, for logs (a kept or made id is always ASCII).
pub fn as_str(id: &HeaderValue) -> &str {
    id.to_str().unwrap_or_default()
}

fn is_sane(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= MAX_LEN
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::REQUEST_ID;

    fn req(id: Option<&str>) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        if let Some(id) = id {
            r.insert_header(REQUEST_ID, id).unwrap();
        }
        r
    }

    #[test]
    fn keeps_sane_replaces_others() {
        assert_eq!(take_or_make(&req(Some("abc-123.x:y_z"))), "abc-123.x:y_z");
        for bad in ["", "a b", "<script>", &"x".repeat(129)] {
            let id = take_or_make(&req(Some(bad)));
            assert_eq!(id.len(), 32, "{bad}");
            assert!(as_str(&id).bytes().all(|b| b.is_ascii_hexdigit()), "{id:?}");
        }
        let made = take_or_make(&req(None));
        assert_eq!(made.len(), 32);
        assert_ne!(made, take_or_make(&req(None)));
    }
}
