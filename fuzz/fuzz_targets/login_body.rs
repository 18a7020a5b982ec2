//! Any bytes as a login body: a key (trimmed, lowercased, non-empty) or None, never a panic.
#![no_main]

use get2dial_gateway::limits::lockout::login_key;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(key) = login_key(data) {
        assert!(!key.is_empty());
        assert_eq!(key, key.trim());
        assert_eq!(key, key.to_lowercase());
    }
});
