//! Any method and path against a realistic route table: a match, 405, 404 or a refused path;
//! never a panic, and no path with `..`, `.` or `//` segments is ever matched.
#![no_main]

use std::sync::OnceLock;

use get2dial_gateway::config::Route;
use get2dial_gateway::routes::{is_unsafe_path, Match, RouteTable};
use http::Method;
use libfuzzer_sys::fuzz_target;

fn table() -> &'static RouteTable {
    static T: OnceLock<RouteTable> = OnceLock::new();
    T.get_or_init(|| {
        let r = |name: &str, prefix: &str, methods: &[Method]| Route::public(name, prefix, methods);
        RouteTable::new(
            &[
                r("login", "/api/v1/auth/login", &[Method::POST]),
                r("register", "/api/v1/nodes/register", &[Method::POST]),
                r("nodes", "/api/v1/nodes/", &[]),
                r("api", "/api/v1/", &[]),
                r("ws", "/ws/", &[Method::GET]),
                r("health", "/healthz", &[Method::GET]),
            ],
            |_| unreachable!("no login guard"),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, path)) = data.split_first() else { return };
    let Ok(path) = std::str::from_utf8(path) else { return };
    let method = [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::HEAD][usize::from(m) % 5].clone();
    match table().find(&method, path) {
        Match::Found(route) => {
            assert!(!is_unsafe_path(path));
            assert!(!path.split('/').any(|s| s == ".." || s == "."));
            assert!(path.starts_with(route.path_prefix.trim_end_matches('/')));
        }
        Match::MethodNotAllowed(_, allow) => assert!(!allow.is_empty()),
        Match::NotFound | Match::BadPath => {}
    }
});
