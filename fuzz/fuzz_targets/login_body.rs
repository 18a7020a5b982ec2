//! Any bytes as a login body: an account (email trimmed, lowercased, non-empty) only for a
//! JSON object, or None; never a panic, and the store keys never break a Redis hash tag.
#![no_main]

use get2dial_gateway::limits::lockout::account;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(a) = account(data) {
        assert_eq!(data.trim_ascii_start().first(), Some(&b'{'), "only an object passes");
        assert!(serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(data).is_ok());
        assert!(!a.email.is_empty());
        assert_eq!(a.email, a.email.trim());
        assert_eq!(a.email, a.email.to_lowercase());
        for key in [a.key(), a.email_key()] {
            assert!(!key.contains(['{', '}']), "{key}");
        }
    }
});
