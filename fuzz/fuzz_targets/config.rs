//! Any text as a configuration file: a validated Config or an error naming the file, never a
//! panic.
#![no_main]

use std::path::Path;

use get2dial_gateway::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(c) => assert!(!c.routes.is_empty() && !c.upstreams.is_empty()),
        Err(e) => assert!(e.to_string().starts_with("fuzz.toml: ")),
    }
});
