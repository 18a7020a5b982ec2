//! The HTTP/1 request head, judged before Pingora reads it.
//!
//! Pingora answers heads it refuses with a bare `400` (or `405` for `CONNECT`) and
//! `Server: Pingora`, before any gateway code runs: no envelope, no metric. So the connection
//! task ([`crate::connection`]) collects each head itself and asks [`check`] about it; Pingora
//! only ever sees heads it will accept. The checks are Pingora's own (httparse, then its
//! framing and authority rules) plus the gateway's size limits, so that the cheaper of the two
//! refusals is always ours.

use std::mem::MaybeUninit;

/// Most header fields a head may have before parsing stops (Pingora's own ceiling).
const PARSE_HEADERS: usize = 256;

/// The limits a head is held to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest head (request line and header fields).
    pub max_bytes: usize,
    /// Most header fields.
    pub max_headers: usize,
}

/// What [`check`] found in the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// The head goes on: read more.
    Incomplete,
    /// A head Pingora will accept, this many bytes long (a body may follow).
    Complete(usize),
    /// Refuse it.
    Refused(Refusal),
}

/// Why a head is refused. Like [`crate::auth::Rejection`], the label goes to metrics only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Longer than `max_header_bytes`.
    TooLarge,
    /// More than `max_headers` header fields.
    TooManyHeaders,
    /// Not a request head HTTP/1.1 allows, or framing Pingora would refuse: conflicting
    /// `Content-Length`, `Transfer-Encoding` on HTTP/1.0 or not ending in `chunked`, two `Host`
    /// fields, userinfo, an absolute-form target whose authority is not the `Host`.
    Malformed,
    /// `CONNECT`: the gateway opens no tunnels.
    Connect,
    /// The head did not arrive within `client_header_timeout_ms`.
    Timeout,
    /// Too many connections from this address are still sending their head.
    BusyClient,
    /// Too many connections in all are still sending their head.
    Busy,
}

impl Refusal {
    /// Metric and log label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::TooLarge => "too_large",
            Refusal::TooManyHeaders => "too_many_headers",
            Refusal::Malformed => "malformed",
            Refusal::Connect => "connect",
            Refusal::Timeout => "timeout",
            Refusal::BusyClient => "busy_client",
            Refusal::Busy => "busy",
        }
    }

    /// The status the client gets.
    pub fn status(self) -> u16 {
        match self {
            Refusal::TooLarge | Refusal::TooManyHeaders => 431,
            Refusal::Malformed => 400,
            Refusal::Connect => 501,
            Refusal::Timeout => 408,
            Refusal::BusyClient => 429,
            Refusal::Busy => 503,
        }
    }

    /// The envelope's message.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Malformed => "invalid request",
            Refusal::Connect => "method not implemented",
            other => crate::envelope::default_message(other.status()),
        }
    }
}

/// Judges the head at the start of `buf`. Cheap until the head is complete: only the size and
/// the line count are looked at, so a head that trickles in is not parsed again per read.
pub fn check(buf: &[u8], limits: Limits) -> Head {
    let Some(end) = head_end(buf) else {
        if buf.len() > limits.max_bytes {
            return Head::Refused(Refusal::TooLarge);
        }
        // Request line plus fields: more lines than that is too many fields already.
        if memchr::memchr_iter(b'\n', buf).count() > limits.max_headers + 1 {
            return Head::Refused(Refusal::TooManyHeaders);
        }
        return Head::Incomplete;
    };
    if end > limits.max_bytes {
        return Head::Refused(Refusal::TooLarge);
    }
    // Left uninitialised: zeroing 8 KiB of header slots on every request would cost more than
    // the parse.
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; PARSE_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(&buf[..end], &mut fields) {
        Ok(httparse::Status::Complete(n)) => {
            if req.headers.len() > limits.max_headers {
                return Head::Refused(Refusal::TooManyHeaders);
            }
            match framing(&req) {
                Ok(()) => Head::Complete(n),
                Err(refusal) => Head::Refused(refusal),
            }
        }
        Ok(httparse::Status::Partial) => Head::Refused(Refusal::Malformed),
        Err(httparse::Error::TooManyHeaders) => Head::Refused(Refusal::TooManyHeaders),
        Err(_) => Head::Refused(Refusal::Malformed),
    }
}

/// Where the head ends: after the first empty line (CRLF CRLF, or bare LFs as httparse
/// allows). One pass over the line ends (a head has a few): two substring searches would each
/// build a searcher and scan the body behind the head too.
fn head_end(buf: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', buf)
        .find(|&i| (i >= 1 && buf[i - 1] == b'\n') || (i >= 3 && buf[i - 3..i] == *b"\r\n\r"))
        .map(|i| i + 1)
}

/// The framing and authority rules Pingora applies after parsing (see [`Refusal::Malformed`]).
fn framing(req: &httparse::Request<'_, '_>) -> Result<(), Refusal> {
    let method = req.method.unwrap_or_default();
    if method.eq_ignore_ascii_case("CONNECT") {
        return Err(Refusal::Connect);
    }
    let mut host: Option<&[u8]> = None;
    let mut length: Option<&[u8]> = None;
    let mut length_conflict = false;
    let mut transfer_encoding: Option<&[u8]> = None;
    for field in req.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() || field.value.contains(&b'@') {
                return Err(Refusal::Malformed);
            }
            host = Some(field.value);
        } else if name.eq_ignore_ascii_case("content-length") {
            for value in field.value.split(|&b| b == b',') {
                let value = value.trim_ascii();
                if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                    length_conflict = true;
                }
                match length {
                    Some(seen) if seen != value => length_conflict = true,
                    _ => length = Some(value),
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding of the last field is the one that frames the body.
            transfer_encoding = Some(field.value);
        }
    }
    if let Some(te) = transfer_encoding {
        // Transfer-Encoding overrides Content-Length (Pingora drops it), but must be valid.
        let last = te
            .rsplit(|&b| b == b',')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if req.version != Some(1) || !last.eq_ignore_ascii_case(b"chunked") {
            return Err(Refusal::Malformed);
        }
    } else if length_conflict {
        return Err(Refusal::Malformed);
    }
    let target = req.path.unwrap_or_default();
    if !target.starts_with('/') {
        absolute_form(target, host)?;
    }
    Ok(())
}

/// An absolute-form (or asterisk-form) target: a URI whose authority carries no userinfo and
/// equals the `Host` field.
fn absolute_form(target: &str, host: Option<&[u8]>) -> Result<(), Refusal> {
    if target == "*" {
        return Ok(());
    }
    let uri: http::Uri = target.parse().map_err(|_| Refusal::Malformed)?;
    let (Some(_), Some(authority)) = (uri.scheme(), uri.authority()) else {
        return Err(Refusal::Malformed);
    };
    if authority.as_str().contains('@') || host.is_some_and(|h| h != authority.as_str().as_bytes())
    {
        return Err(Refusal::Malformed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bytes: 1024,
        max_headers: 8,
    };

    fn verdict(head: &str) -> Head {
        check(head.as_bytes(), LIMITS)
    }

    #[test]
    fn heads_pingora_accepts_pass_whole() {
        for head in [
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a?b=c HTTP/1.0\r\n\r\n",
            "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
            "POST /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3, 3\r\n\r\n",
            "POST /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\n\n",
        ] {
            let end = head
                .find("\r\n\r\n")
                .map(|i| i + 4)
                .or(head.find("\n\n").map(|i| i + 2));
            assert_eq!(verdict(head), Head::Complete(end.unwrap()), "{head:?}");
        }
    }

    #[test]
    fn partial_heads_wait_unless_already_too_big() {
        assert_eq!(verdict("GET / HTTP/1.1\r\nHost: a\r\n"), Head::Incomplete);
        assert_eq!(verdict("GE"), Head::Incomplete);
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(2000));
        assert_eq!(verdict(&long), Head::Refused(Refusal::TooLarge));
        let many = format!("GET / HTTP/1.1\r\n{}", "A: b\r\n".repeat(10));
        assert_eq!(verdict(&many), Head::Refused(Refusal::TooManyHeaders));
    }

    #[test]
    fn every_refusal_has_its_status() {
        let complete_many = format!("GET / HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(9));
        let complete_large = format!("GET / HTTP/1.1\r\nA: {}\r\n\r\n", "b".repeat(1100));
        for (head, refusal) in [
            (complete_many.as_str(), Refusal::TooManyHeaders),
            (complete_large.as_str(), Refusal::TooLarge),
            ("GET / HTTP/2.0\r\n\r\n", Refusal::Malformed),
            ("GET / HTTP/1.1 extra\r\n\r\n", Refusal::Malformed),
            ("G(T / HTTP/1.1\r\n\r\n", Refusal::Malformed),
            ("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", Refusal::Malformed),
            ("GET / HTTP/1.1\r\nA: b\x01c\r\n\r\n", Refusal::Malformed),
            ("\r\n\r\n", Refusal::Malformed),
            (
                "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
                Refusal::Connect,
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                Refusal::Malformed,
            ),
            ("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", Refusal::Malformed),
            (
                "GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
                Refusal::Malformed,
            ),
            (
                "GET http://a/ HTTP/1.1\r\nHost: b\r\n\r\n",
                Refusal::Malformed,
            ),
            ("GET nonsense HTTP/1.1\r\n\r\n", Refusal::Malformed),
            (
                "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                Refusal::Malformed,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n",
                Refusal::Malformed,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                Refusal::Malformed,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
                Refusal::Malformed,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                Refusal::Malformed,
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                Refusal::Malformed,
            ),
        ] {
            assert_eq!(verdict(head), Head::Refused(refusal), "{head:?}");
        }
        for r in [
            Refusal::TooLarge,
            Refusal::TooManyHeaders,
            Refusal::Malformed,
            Refusal::Connect,
            Refusal::Timeout,
            Refusal::BusyClient,
            Refusal::Busy,
        ] {
            assert!((400..600).contains(&r.status()));
            assert!(!r.message().is_empty() && !r.label().is_empty());
        }
    }

    /// The end is the first CRLF CRLF or LF LF, whichever ends first: every string of
    /// `\r`, `\n` and `a` up to 8 bytes, against the two searches it replaced.
    #[test]
    fn head_end_is_the_first_empty_line() {
        fn two_searches(buf: &[u8]) -> Option<usize> {
            let find = |pat: &[u8]| buf.windows(pat.len()).position(|w| w == pat);
            let crlf = find(b"\r\n\r\n").map(|i| i + 4);
            let lf = find(b"\n\n").map(|i| i + 2);
            match (crlf, lf) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        let alphabet = [b'\r', b'\n', b'a'];
        for len in 0..=8u32 {
            for n in 0..3usize.pow(len) {
                let buf: Vec<u8> = (0..len).map(|i| alphabet[n / 3usize.pow(i) % 3]).collect();
                assert_eq!(head_end(&buf), two_searches(&buf), "{buf:?}");
            }
        }
    }
}
