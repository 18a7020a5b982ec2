//! Rewriting an upstream's error answer (status >= 400) into the envelope, keeping its status.
//!
//! The decision is taken from the response header alone, because the framing sent downstream
//! must be fixed before any body byte arrives. [`plan`] only reads the header; the head the
//! client gets drops the upstream's body headers ([`is_body_header`]) and carries the
//! envelope's ([`Rewrite::body_headers`]), written once when the answer head is rebuilt:
//! - 1xx/2xx/3xx pass untouched and streamed ([`Plan::Pass`]).
//! - A bodyless error (`Content-Length: 0`) never reaches Pingora's body filters, so the caller
//!   turns it into an error and `fail_to_proxy` writes the envelope ([`Plan::Empty`]).
//! - When the envelope is known from the header alone (HEAD, 5xx or 4xx whose body is not JSON,
//!   a body too large or in an encoding we cannot read) it is sent with its exact
//!   `Content-Length` and the upstream body is drained and dropped ([`Rewrite::Fixed`]).
//! - Otherwise the body is buffered up to [`MAX_BUFFERED`] bytes and judged at its end; the
//!   answer goes out chunked ([`Rewrite::Inspect`]).

use std::io::Read;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora::http::ResponseHeader;

use crate::envelope;

/// Most bytes of an upstream error body that are buffered (compressed and decompressed alike).
pub const MAX_BUFFERED: usize = 64 * 1024;

/// Headers that describe the upstream's body and would be stale on the envelope.
const BODY_HEADERS: [header::HeaderName; 10] = [
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::CONTENT_TYPE,
    header::TRANSFER_ENCODING,
    header::CONTENT_RANGE,
    header::CONTENT_LANGUAGE,
    header::CONTENT_LOCATION,
    header::CONTENT_DISPOSITION,
    header::ETAG,
    header::LAST_MODIFIED,
];

/// What to do with an upstream response, decided from its header.
#[derive(Debug)]
pub enum Plan {
    /// Not an error: pass it through untouched.
    Pass,
    /// An error without a body: answer it with the default envelope through `fail_to_proxy`.
    Empty,
    /// An error with a body: give the client [`Rewrite::body_headers`] and feed the body to the
    /// [`Rewrite`].
    Rewrite(Rewrite),
}

/// The body side of a rewrite in progress.
#[derive(Debug)]
pub enum Rewrite {
    /// The answer to a HEAD request: headers only, announcing the envelope's length.
    Head(usize),
    /// The envelope is known; it is sent on the first body event, and nothing after it.
    Fixed {
        /// The envelope.
        body: Bytes,
        /// It has been sent.
        sent: bool,
    },
    /// The body decides; buffered until its end or until it outgrows [`MAX_BUFFERED`].
    Inspect {
        /// Upstream status.
        status: u16,
        /// How the buffered bytes are encoded.
        encoding: Encoding,
        /// Bytes so far.
        buf: Vec<u8>,
        /// The envelope has been sent; drop everything else.
        sent: bool,
        /// Whether the upstream body turned out to be a valid envelope (known once sent).
        passed_envelope: bool,
    },
}

/// Content encodings the rewrite can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// No encoding.
    Identity,
    /// `gzip` / `x-gzip`.
    Gzip,
    /// `deflate` (zlib, or raw deflate from servers that get it wrong).
    Deflate,
}

/// Decides from its header what happens to an upstream response (the header is not changed).
pub fn plan(is_head: bool, resp: &ResponseHeader) -> Plan {
    let status = resp.status.as_u16();
    if status < 400 {
        return Plan::Pass;
    }
    if is_head {
        return Plan::Rewrite(Rewrite::Head(envelope::default_body(status).len()));
    }
    let content_length = resp
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    // A chunked body takes precedence over Content-Length (RFC 9112 6.3).
    let chunked = resp.headers.contains_key(header::TRANSFER_ENCODING);
    if content_length == Some(0) && !chunked {
        return Plan::Empty;
    }
    let encoding = match resp.headers.get(header::CONTENT_ENCODING) {
        None => Some(Encoding::Identity),
        Some(v) => match v.to_str().map(|s| s.trim().to_ascii_lowercase()) {
            Ok(s) if s.is_empty() || s == "identity" => Some(Encoding::Identity),
            Ok(s) if s == "gzip" || s == "x-gzip" => Some(Encoding::Gzip),
            Ok(s) if s == "deflate" => Some(Encoding::Deflate),
            _ => None,
        },
    };
    let too_large = !chunked && content_length.is_some_and(|n| n > MAX_BUFFERED as u64);
    let may_be_json = resp
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| is_json_type(v.as_bytes()))
        .unwrap_or(true);
    match encoding {
        Some(encoding) if may_be_json && !too_large => Plan::Rewrite(Rewrite::Inspect {
            status,
            encoding,
            buf: Vec::new(),
            sent: false,
            passed_envelope: false,
        }),
        _ => Plan::Rewrite(Rewrite::Fixed {
            body: envelope::default_body(status),
            sent: false,
        }),
    }
}

/// Upstream headers worth keeping when a bodyless error is answered anew: they tell the client
/// when to retry, how to authenticate, or which methods exist.
pub fn kept_headers(resp: &ResponseHeader) -> Vec<(header::HeaderName, header::HeaderValue)> {
    [header::RETRY_AFTER, header::WWW_AUTHENTICATE, header::ALLOW]
        .into_iter()
        .filter_map(|name| {
            let value = resp.headers.get(&name)?.clone();
            Some((name, value))
        })
        .collect()
}

/// `application/json`, `text/json` or any `+json` type, parameters ignored.
fn is_json_type(value: &[u8]) -> bool {
    let essence = value.split(|b| *b == b';').next().unwrap_or_default();
    let essence = String::from_utf8_lossy(essence).trim().to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

/// True for an upstream header that describes its body: stale on the envelope, so a rewritten
/// answer goes out without it.
pub fn is_body_header(name: &HeaderName) -> bool {
    BODY_HEADERS.contains(name)
}

impl Rewrite {
    /// The envelope's length is not known from the head: it goes out chunked, in one chunk
    /// (the whole envelope at once).
    pub fn chunked(&self) -> bool {
        matches!(self, Rewrite::Inspect { .. })
    }

    /// The envelope's body headers: JSON, and either its exact length or chunked framing.
    pub fn body_headers(&self) -> [(HeaderName, HeaderValue); 2] {
        let framing = match self {
            Rewrite::Head(length) => (header::CONTENT_LENGTH, HeaderValue::from(*length)),
            Rewrite::Fixed { body, .. } => (header::CONTENT_LENGTH, HeaderValue::from(body.len())),
            Rewrite::Inspect { .. } => (
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            ),
        };
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(envelope::CONTENT_TYPE),
            ),
            framing,
        ]
    }

    /// Replaces one upstream body event with what the client gets instead.
    pub fn on_body(&mut self, body: &mut Option<Bytes>, end: bool) {
        match self {
            Rewrite::Head(_) => *body = None,
            Rewrite::Fixed {
                body: envelope,
                sent,
            } => {
                *body = (!*sent).then(|| envelope.clone());
                *sent = true;
            }
            Rewrite::Inspect {
                status,
                encoding,
                buf,
                sent,
                passed_envelope,
            } => {
                if *sent {
                    *body = None;
                    return;
                }
                if let Some(chunk) = body.take() {
                    if buf.len() + chunk.len() > MAX_BUFFERED {
                        // Past the bound the body cannot be judged: default message, drop the rest.
                        *buf = Vec::new();
                        *sent = true;
                        *body = Some(envelope::default_body(*status));
                        return;
                    }
                    buf.extend_from_slice(&chunk);
                }
                if end {
                    let envelope = match decode(*encoding, std::mem::take(buf)) {
                        Some(plain) if envelope::is_envelope(&plain) => {
                            *passed_envelope = true;
                            Bytes::from(plain)
                        }
                        Some(plain) => envelope::replacement(*status, &plain),
                        None => envelope::default_body(*status),
                    };
                    *sent = true;
                    *body = Some(envelope);
                }
            }
        }
    }

    /// True when the client got something other than the upstream's own bytes (a contract
    /// violation to count); only meaningful once the body has ended.
    pub fn violated_contract(&self) -> bool {
        !matches!(
            self,
            Rewrite::Inspect {
                passed_envelope: true,
                ..
            }
        )
    }
}

/// Decodes `buf` (kept as it is when not encoded), refusing output over [`MAX_BUFFERED`] (a
/// decompression bomb gets `None`).
fn decode(encoding: Encoding, buf: Vec<u8>) -> Option<Vec<u8>> {
    fn bounded(mut r: impl Read) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        r.by_ref()
            .take(MAX_BUFFERED as u64 + 1)
            .read_to_end(&mut out)
            .ok()?;
        (out.len() <= MAX_BUFFERED).then_some(out)
    }
    match encoding {
        Encoding::Identity => Some(buf),
        Encoding::Gzip => bounded(flate2::read::MultiGzDecoder::new(&buf[..])),
        Encoding::Deflate => bounded(flate2::read::ZlibDecoder::new(&buf[..]))
            .or_else(|| bounded(flate2::read::DeflateDecoder::new(&buf[..]))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn resp(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (k, v) in headers {
            r.insert_header(k.to_string(), *v).unwrap();
        }
        r
    }

    /// The envelope's body header `name`, as the client gets it.
    fn framing(rw: &Rewrite, name: header::HeaderName) -> Option<String> {
        rw.body_headers()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_str().unwrap().to_owned())
    }

    fn run(rw: &mut Rewrite, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let mut b = Some(Bytes::copy_from_slice(c));
            rw.on_body(&mut b, i + 1 == chunks.len());
            if let Some(b) = b {
                out.extend_from_slice(&b);
            }
        }
        out
    }

    #[test]
    fn success_passes() {
        assert!(matches!(plan(false, &resp(200, &[])), Plan::Pass));
        assert!(matches!(plan(false, &resp(304, &[])), Plan::Pass));
    }

    #[test]
    fn html_500_is_fixed_with_exact_length() {
        let r = resp(
            500,
            &[
                ("content-type", "text/html"),
                ("content-length", "900"),
                ("etag", "x"),
            ],
        );
        let Plan::Rewrite(mut rw) = plan(false, &r) else {
            panic!()
        };
        assert_eq!(framing(&rw, header::CONTENT_LENGTH).unwrap(), "52");
        assert_eq!(
            framing(&rw, header::CONTENT_TYPE).unwrap(),
            "application/json"
        );
        for name in ["content-type", "content-length", "etag"] {
            assert!(is_body_header(&header::HeaderName::from_static(name)));
        }
        assert!(!is_body_header(&header::RETRY_AFTER));
        assert_eq!(
            run(&mut rw, &[b"<html>", b"trace"]),
            br#"{"status":"error","message":"internal server error"}"#
        );
        assert!(rw.violated_contract());
    }

    #[test]
    fn empty_error_goes_through_fail_to_proxy() {
        assert!(matches!(
            plan(false, &resp(404, &[("content-length", "0")])),
            Plan::Empty
        ));
    }

    #[test]
    fn json_body_is_judged_at_the_end() {
        let r = resp(
            422,
            &[
                ("content-type", "application/problem+json"),
                ("content-length", "30"),
            ],
        );
        let Plan::Rewrite(mut rw) = plan(false, &r) else {
            panic!()
        };
        assert!(framing(&rw, header::CONTENT_LENGTH).is_none());
        assert_eq!(framing(&rw, header::TRANSFER_ENCODING).unwrap(), "chunked");
        assert_eq!(
            run(&mut rw, &[b"{\"title\":", b"\"bad email\"}"]),
            br#"{"status":"error","message":"bad email"}"#
        );
    }

    #[test]
    fn envelope_passes_and_is_not_a_violation() {
        let r = resp(500, &[("content-type", "application/json")]);
        let Plan::Rewrite(mut rw) = plan(false, &r) else {
            panic!()
        };
        let e = br#"{"status":"error","message":"db down"}"#;
        assert_eq!(run(&mut rw, &[e]), e);
        assert!(!rw.violated_contract());
    }

    #[test]
    fn gzip_is_decoded() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(br#"{"message":"no such user"}"#).unwrap();
        let data = gz.finish().unwrap();
        let r = resp(
            404,
            &[
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
        );
        let Plan::Rewrite(mut rw) = plan(false, &r) else {
            panic!()
        };
        assert!(is_body_header(&header::CONTENT_ENCODING));
        assert_eq!(
            run(&mut rw, &[&data]),
            br#"{"status":"error","message":"no such user"}"#
        );
    }

    #[test]
    fn gzip_bomb_gets_default() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![b' '; 10 * MAX_BUFFERED]).unwrap();
        let data = gz.finish().unwrap();
        let r = resp(400, &[("content-encoding", "gzip")]);
        let Plan::Rewrite(mut rw) = plan(false, &r) else {
            panic!()
        };
        assert_eq!(
            run(&mut rw, &[&data]),
            br#"{"status":"error","message":"invalid request body"}"#
        );
    }

    #[test]
    fn overflow_sends_default_early_and_drops_rest() {
        let r = resp(404, &[("content-type", "application/json")]);
        let Plan::Rewrite(mut rw) = plan(false, &r) else {
            panic!()
        };
        let big = vec![b'x'; MAX_BUFFERED];
        let mut b = Some(Bytes::from(big.clone()));
        rw.on_body(&mut b, false);
        assert!(b.is_none());
        let mut b = Some(Bytes::from_static(b"y"));
        rw.on_body(&mut b, false);
        assert_eq!(b.unwrap(), envelope::default_body(404));
        let mut b = Some(Bytes::from(big));
        rw.on_body(&mut b, true);
        assert!(b.is_none());
    }

    #[test]
    fn unknown_encoding_and_head_get_fixed_answers() {
        let r = resp(
            401,
            &[
                ("content-encoding", "br"),
                ("content-type", "application/json"),
            ],
        );
        assert!(matches!(
            plan(false, &r),
            Plan::Rewrite(Rewrite::Fixed { .. })
        ));
        let r = resp(404, &[("content-length", "0")]);
        let Plan::Rewrite(rw) = plan(true, &r) else {
            panic!()
        };
        assert!(matches!(rw, Rewrite::Head(_)));
        assert_eq!(framing(&rw, header::CONTENT_LENGTH).unwrap(), "40");
    }
}
