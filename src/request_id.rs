//! Request ids: a client's `X-Request-Id` is kept when it is sane, otherwise one is made.

use pingora::http::RequestHeader;

use crate::envelope::REQUEST_ID;

/// Longest client-supplied id that is kept.
const MAX_LEN: usize = 128;

/// The request's id: the client's if it is 1..=128 characters of `[A-Za-z0-9._:-]`,
/// otherwise a new UUIDv4 (simple form).
pub fn take_or_make(req: &RequestHeader) -> String {
    match req.headers.get(REQUEST_ID).map(|v| v.as_bytes()) {
        Some(v) if is_sane(v) => String::from_utf8_lossy(v).into_owned(),
        _ => uuid::Uuid::new_v4().simple().to_string(),
    }
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
        }
        assert_eq!(take_or_make(&req(None)).len(), 32);
    }
}
