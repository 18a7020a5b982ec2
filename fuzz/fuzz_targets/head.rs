//! Any bytes as the start of an HTTP/1 request head: a verdict, never a panic; a complete head
//! ends inside the bytes and within the size limit, and the same bytes always get the same
//! verdict whatever was read before them (judging is a function of the bytes alone).
#![no_main]

use get2dial_gateway::head::{check, Head, Limits};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits { max_bytes: 4096, max_headers: 16 };

fuzz_target!(|data: &[u8]| {
    match check(data, LIMITS) {
        Head::Complete(n) => {
            assert!(n <= data.len() && n <= LIMITS.max_bytes);
            // A longer buffer (a body after the head) does not change the verdict.
            let mut more = data.to_vec();
            more.extend_from_slice(b"body bytes\r\n\r\n");
            assert_eq!(check(&more, LIMITS), Head::Complete(n));
        }
        Head::Incomplete => assert!(data.len() <= LIMITS.max_bytes),
        Head::Refused(r) => assert!((400..600).contains(&r.status())),
    }
});
