//! An upstream error answer of any status, headers and body, split into any chunks: the client
//! always ends up with exactly one well-formed envelope (or, for HEAD, none), and the framing
//! header agrees with what was emitted.
#![no_main]

use bytes::Bytes;
use get2dial_gateway::envelope;
use get2dial_gateway::rewrite::{self, plan, Plan, Rewrite};
use libfuzzer_sys::fuzz_target;
use pingora::http::ResponseHeader;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let status = 400 + u16::from(data[0]) % 200;
    let flags = data[1];
    let split = usize::from(data[2]).max(1);
    let body = &data[3..];
    let Ok(mut resp) = ResponseHeader::build(status, None) else { return };
    let ct = ["application/json", "text/html", "application/problem+json", "text/plain"];
    if flags & 1 != 0 {
        let _ = resp.insert_header("content-type", ct[usize::from(flags >> 4) % ct.len()]);
    }
    if flags & 2 != 0 {
        let _ = resp.insert_header("content-encoding", if flags & 4 != 0 { "gzip" } else { "deflate" });
    }
    if flags & 8 != 0 {
        let _ = resp.insert_header("content-length", body.len().to_string());
    }
    let head = flags & 64 != 0;

    // The normaliser alone.
    let out = envelope::normalise(status, body);
    assert!(envelope::is_envelope(&out), "normalise produced a non-envelope");

    // The whole rewrite, chunk by chunk.
    match plan(head, &resp) {
        Plan::Pass => unreachable!("status >= 400 is never passed"),
        Plan::Empty => {}
        Plan::Rewrite(mut rw) => {
            let mut emitted = Vec::new();
            let chunks: Vec<&[u8]> = body.chunks(split).collect();
            let n = chunks.len();
            for (i, c) in chunks.into_iter().enumerate() {
                let mut b = Some(Bytes::copy_from_slice(c));
                rw.on_body(&mut b, i + 1 == n);
                if let Some(b) = b {
                    emitted.extend_from_slice(&b);
                }
            }
            if n == 0 {
                let mut b = None;
                rw.on_body(&mut b, true);
                if let Some(b) = b {
                    emitted.extend_from_slice(&b);
                }
            }
            let length = rw
                .body_headers()
                .into_iter()
                .find(|(name, _)| name == "content-length")
                .map(|(_, v)| v.to_str().unwrap().to_owned());
            if let Rewrite::Head(announced) = rw {
                assert!(emitted.is_empty());
                assert_eq!(length, Some(announced.to_string()));
            } else {
                assert!(envelope::is_envelope(&emitted), "emitted {:?}", String::from_utf8_lossy(&emitted));
                if let Some(len) = length {
                    assert_eq!(len, emitted.len().to_string());
                }
            }
            assert!(rewrite::is_body_header(&http::header::CONTENT_ENCODING));
        }
    }
});
