//! The route table: which configured route answers a method and a path.

use std::sync::Arc;

use http::Method;

use crate::auth::network::Gate;
use crate::auth::node_key::NodeKeys;
use crate::auth::{Mode, Role};
use crate::config;
use crate::limits::ratelimit::Policy;
use crate::metrics;
use crate::store::LockoutPolicy;

/// A route as the runtime uses it.
#[derive(Debug)]
pub struct Route {
    /// Name used in metrics and logs.
    pub name: String,
    /// Path prefix, matched on whole segments.
    pub path_prefix: String,
    /// Allowed methods; empty allows all.
    pub methods: Vec<Method>,
    /// Index of the upstream pool.
    pub upstream: usize,
    /// Largest request body accepted.
    pub max_body_bytes: u64,
    /// How callers authenticate.
    pub auth: Mode,
    /// Lowest role allowed, for token routes.
    pub min_role: Option<Role>,
    /// Source networks allowed, when the route is network-gated.
    pub gate: Option<Gate>,
    /// Known node keys, when the route checks them itself.
    pub node_keys: Option<Arc<NodeKeys>>,
    /// Rate-limit policies, all of which must allow a request.
    pub rate_limits: Vec<Policy>,
    /// The lockout, on login routes.
    pub login: Option<LockoutPolicy>,
    /// This route's metric handles, resolved on first use.
    pub metrics: metrics::Handles,
}

impl Route {
    fn matches_path(&self, path: &str) -> bool {
        let p = &self.path_prefix;
        match path.strip_prefix(p.as_str()) {
            Some(rest) => rest.is_empty() || p.ends_with('/') || rest.starts_with('/'),
            None => false,
        }
    }

    fn allows(&self, method: &Method) -> bool {
        self.methods.is_empty() || self.methods.contains(method)
    }
}

/// What matching a request found.
#[derive(Debug)]
pub enum Match<'a> {
    /// The most specific route that takes this method on this path.
    Found(&'a Arc<Route>),
    /// Routes exist for the path, none for the method: the most specific of them (for labels)
    /// and the `Allow` header value.
    MethodNotAllowed(&'a Arc<Route>, String),
    /// No route serves the path.
    NotFound,
    /// The path is not one a route may be matched against (see [`is_unsafe_path`]).
    BadPath,
}

/// All routes, most specific (longest prefix) first.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Builds the table from validated config routes; `login` is the lockout of login routes.
    pub fn new(routes: &[config::Route], login: impl Fn(&config::Route) -> LockoutPolicy) -> Self {
        let mut routes: Vec<Arc<Route>> = routes
            .iter()
            .map(|r| {
                Arc::new(Route {
                    name: r.name.clone(),
                    path_prefix: r.path_prefix.clone(),
                    methods: r.methods.clone(),
                    upstream: r.upstream,
                    max_body_bytes: r.max_body_bytes,
                    auth: r.auth,
                    min_role: r.min_role,
                    gate: (!r.allow_networks.is_empty())
                        .then(|| Gate::new(r.allow_networks.clone())),
                    node_keys: r.node_keys.clone(),
                    rate_limits: r.rate_limits.clone(),
                    login: r.login_guard.then(|| login(r)),
                    metrics: metrics::Handles::default(),
                })
            })
            .collect();
        // Stable sort: equal prefixes keep file order.
        routes.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
        RouteTable { routes }
    }

    /// The routes, most specific first.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// Finds the route for `method` and `path` (the path without its query).
    ///
    /// The longest matching prefix that allows the method wins; when the path matches only
    /// routes that refuse the method, the answer is 405 with the union of their methods.
    pub fn find(&self, method: &Method, path: &str) -> Match<'_> {
        if is_unsafe_path(path) {
            return Match::BadPath;
        }
        let mut most_specific = None;
        for route in &self.routes {
            if route.matches_path(path) {
                if route.allows(method) {
                    return Match::Found(route);
                }
                most_specific = most_specific.or(Some(route));
            }
        }
        let Some(most_specific) = most_specific else {
            return Match::NotFound;
        };
        let mut allowed: Vec<&str> = Vec::new();
        for route in self.routes.iter().filter(|r| r.matches_path(path)) {
            for m in &route.methods {
                if !allowed.contains(&m.as_str()) {
                    allowed.push(m.as_str());
                }
            }
        }
        Match::MethodNotAllowed(most_specific, allowed.join(", "))
    }
}

/// True for paths that could make the gateway and the upstream disagree about which resource is
/// meant: not starting with `/`, empty segments (`//`), `.` or `..` segments, backslashes,
/// control characters, and percent-encoded dots, slashes, backslashes or control bytes.
pub fn is_unsafe_path(path: &str) -> bool {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return true;
    }
    // One pass over the bytes: this runs on every request.
    let dot_segment = |seg: &[u8]| seg == b"." || seg == b"..";
    let mut segment_start = 1;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        match b {
            b'/' => {
                let segment = &bytes[segment_start..i];
                if segment.is_empty() || dot_segment(segment) {
                    return true;
                }
                segment_start = i + 1;
            }
            b'\\' | b' ' => return true,
            b if b.is_ascii_control() => return true,
            b'%' => match (
                bytes.get(i + 1).and_then(hex),
                bytes.get(i + 2).and_then(hex),
            ) {
                (Some(hi), Some(lo)) => {
                    let decoded = hi << 4 | lo;
                    if matches!(decoded, b'.' | b'/' | b'\\') || decoded.is_ascii_control() {
                        return true;
                    }
                }
                _ => return true, // malformed percent-encoding
            },
            _ => {}
        }
    }
    dot_segment(&bytes[segment_start..])
}

/// The value of one hex digit.
fn hex(b: &u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, prefix: &str, methods: &[Method]) -> config::Route {
        config::Route::public(name, prefix, methods)
    }

    fn table() -> RouteTable {
        RouteTable::new_without_login(&[
            route("api", "/api/v1/", &[]),
            route("login", "/api/v1/auth/login", &[Method::POST]),
            route("health", "/healthz", &[Method::GET, Method::HEAD]),
        ])
    }

    impl RouteTable {
        fn new_without_login(routes: &[config::Route]) -> Self {
            RouteTable::new(routes, |_| unreachable!("no login routes here"))
        }
    }

    fn name(m: Match<'_>) -> String {
        match m {
            Match::Found(r) => r.name.clone(),
            Match::MethodNotAllowed(r, a) => format!("405 {} {a}", r.name),
            Match::NotFound => "404".into(),
            Match::BadPath => "bad".into(),
        }
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let t = table();
        assert_eq!(name(t.find(&Method::POST, "/api/v1/auth/login")), "login");
        assert_eq!(name(t.find(&Method::POST, "/api/v1/auth/login/x")), "login");
        // Not a segment boundary: falls back to the broader route.
        assert_eq!(name(t.find(&Method::POST, "/api/v1/auth/loginx")), "api");
        assert_eq!(name(t.find(&Method::GET, "/api/v1/auth/login")), "api");
        assert_eq!(name(t.find(&Method::GET, "/healthz")), "health");
        assert_eq!(name(t.find(&Method::GET, "/healthzz")), "404");
        assert_eq!(name(t.find(&Method::GET, "/api/v1")), "404");
    }

    #[test]
    fn wrong_method_lists_allowed() {
        assert_eq!(
            name(table().find(&Method::POST, "/healthz")),
            "405 health GET, HEAD"
        );
    }

    #[test]
    fn path_tricks_are_refused() {
        for p in [
            "/api/v1/../admin",
            "/api/v1/./x",
            "//api/v1/x",
            "/api/v1//x",
            "/api/v1/%2e%2e/x",
            "/api/v1/%2E/x",
            "/api/v1%2fx",
            "/api/v1/%5cx",
            "/api/v1/%zz",
            "/api/v1/%0a",
            "/api\\v1",
            "api/v1",
            "",
            "/api/..",
            "/.",
            "/a/.",
            "/a/%2",
            "/a/%",
            "/a%00",
            "/a b",
            "/a\tb",
        ] {
            assert!(is_unsafe_path(p), "{p}");
        }
        for p in [
            "/",
            "/api/v1/",
            "/api/v1/x%20y",
            "/a/b.c/..d",
            "/api/v1/users/1",
            "/a/.../b",
            "/a/.b/",
            "/%41%62",
        ] {
            assert!(!is_unsafe_path(p), "{p}");
        }
    }
}
