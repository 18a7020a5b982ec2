//! Any method and path against a realistic route table: a refused path, 404, 405 or a match;
//! never a panic. A matched path is normalised (no `..`, `.` or `//` segments, no escaped
//! unreserved characters), and the route matched is the one a server that percent-decodes the
//! whole path (Go's `net/http`) would pick.
#![no_main]

use std::sync::OnceLock;

use get2dial_gateway::path;
use get2dial_gateway::routes::{Match, Route, RouteTable};
use http::Method;
use libfuzzer_sys::fuzz_target;

fn table() -> &'static RouteTable {
    static T: OnceLock<RouteTable> = OnceLock::new();
    T.get_or_init(|| {
        let r = |name: &str, prefix: &str, methods: &[Method]| Route::public(name, prefix, methods);
        let exact = |name: &str, p: &str, methods: &[Method]| Route { exact: true, ..r(name, p, methods) };
        RouteTable::new(vec![
                exact("login", "/api/v1/auth/login", &[Method::POST]),
                exact("register", "/api/v1/nodes/register", &[Method::POST]),
                r("nodes", "/api/v1/nodes/", &[]),
                r("api", "/api/v1/", &[]),
                r("ws", "/ws/", &[Method::GET]),
                r("health", "/healthz", &[Method::GET]),
        ])
    })
}

/// The whole path percent-decoded, as Go's `r.URL.Path`.
fn decode_all(p: &str) -> Vec<u8> {
    let b = p.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, raw)) = data.split_first() else { return };
    let Ok(raw) = std::str::from_utf8(raw) else { return };
    let method = [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::HEAD][usize::from(m) % 5].clone();
    let Ok(norm) = path::normalise(raw) else { return };
    assert!(!norm.split('/').any(|s| s == ".." || s == "."));
    assert!(!norm.contains("//"));
    assert_eq!(path::normalise(&norm).as_deref(), Ok(&*norm), "normalising is idempotent");
    let decoded = decode_all(raw);
    assert_eq!(decode_all(&norm), decoded, "normalising never changes what a decoder reads");
    let owner = |m: &Match<'_>| match m {
        Match::Found(r) | Match::MethodNotAllowed(r, _) => Some(r.name.clone()),
        Match::NotFound => None,
    };
    let ours = owner(&table().find(&method, &norm));
    if let Ok(decoded) = std::str::from_utf8(&decoded) {
        let theirs = owner(&table().find(&method, decoded));
        assert_eq!(ours, theirs, "{raw}");
    }
    if let Match::MethodNotAllowed(_, allow) = table().find(&method, &norm) {
        assert!(!allow.is_empty());
    }
});
