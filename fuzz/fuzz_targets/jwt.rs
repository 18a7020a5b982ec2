//! Any bytes as a bearer token: the verifier answers Ok or a Rejection, never panics.
#![no_main]

use std::sync::OnceLock;

use get2dial_gateway::auth::jwt::{Settings, Verifier};
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        Verifier::new(&Settings {
            secrets: vec![b"fuzz-secret-0123456789abcdef".to_vec(), b"fuzz-previous-0123456789".to_vec()],
            issuer: "get2dial".into(),
            audience: "get2dial-control".into(),
            leeway_seconds: 30,
            max_token_bytes: 4096,
            cache_entries: 64,
        })
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = verifier().verify(token);
    }
});
