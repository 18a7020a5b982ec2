//! The route table: which configured route answers a method and a path.

use std::sync::Arc;

use http::Method;

use crate::auth::network::Gate;
use crate::auth::node_key::NodeKeys;
use crate::auth::{Mode, Role};
use crate::limits::lockout::Guard;
use crate::limits::ratelimit::Policy;
use crate::metrics;

/// The Get2Dial API caps request bodies at 1 MB: every route's default.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1_048_576;

/// A route: the configuration validator builds it, the route table holds it.
#[derive(Debug, Clone)]
pub struct Route {
    /// Name used in metrics and logs.
    pub name: String,
    /// Path prefix, matched on whole segments, or the exact path when `exact`.
    pub path_prefix: String,
    /// Matches `path_prefix` exactly.
    pub exact: bool,
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
    pub login: Option<Guard>,
    /// Whether WebSocket upgrades are forwarded.
    pub websocket: bool,
    /// This route's metric handles, resolved on first use.
    pub metrics: metrics::Handles,
}

impl Route {
    /// A public route to the first upstream with the default body cap and no limits: what
    /// tests, benches and fuzz targets build route tables from.
    pub fn public(name: &str, path_prefix: &str, methods: &[Method]) -> Route {
        Route {
            name: name.into(),
            path_prefix: path_prefix.into(),
            exact: false,
            methods: methods.to_vec(),
            upstream: 0,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            auth: Mode::Public,
            min_role: None,
            gate: None,
            node_keys: None,
            rate_limits: Vec::new(),
            login: None,
            websocket: false,
            metrics: metrics::Handles::default(),
        }
    }

    fn matches_path(&self, path: &str) -> bool {
        let p = &self.path_prefix;
        if self.exact {
            return path == p;
        }
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
    /// The route that owns the path and takes the method.
    Found(&'a Arc<Route>),
    /// The routes that own the path refuse the method: the first of them (for labels) and the
    /// `Allow` header value.
    MethodNotAllowed(&'a Arc<Route>, String),
    /// No route serves the path.
    NotFound,
}

/// All routes, most specific (longest prefix) first.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Builds the table from `routes` (their rate-limit policies registered with the store).
    pub fn new(routes: Vec<Route>) -> Self {
        let mut routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
        // Longest first, an exact path before a prefix of the same text; stable, so equal
        // prefixes keep file order.
        routes.sort_by_key(|r| (std::cmp::Reverse(r.path_prefix.len()), !r.exact));
        RouteTable { routes }
    }

    /// The routes, most specific first.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// Finds the route for `method` and `path`, a path [`crate::path::normalise`] returned.
    ///
    /// The most specific route whose prefix matches the path owns it: when none of the routes
    /// with that prefix allows the method, the answer is 405 with their methods, never a
    /// broader route (which may check callers differently). Routes with the same prefix split
    /// it by method.
    pub fn find(&self, method: &Method, path: &str) -> Match<'_> {
        let mut routes = self.routes.iter().filter(|r| r.matches_path(path));
        let Some(owner) = routes.next() else {
            return Match::NotFound;
        };
        let same =
            std::iter::once(owner).chain(routes.take_while(|r| r.path_prefix == owner.path_prefix));
        let mut allowed: Vec<&str> = Vec::new();
        for route in same {
            if route.allows(method) {
                return Match::Found(route);
            }
            for m in &route.methods {
                if !allowed.contains(&m.as_str()) {
                    allowed.push(m.as_str());
                }
            }
        }
        Match::MethodNotAllowed(owner, allowed.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path;

    fn route(name: &str, prefix: &str, methods: &[Method]) -> Route {
        Route::public(name, prefix, methods)
    }

    fn table() -> RouteTable {
        RouteTable::new_without_login(&[
            route("api", "/api/v1/", &[]),
            route("login", "/api/v1/auth/login", &[Method::POST]),
            route("register", "/api/v1/nodes/register", &[Method::POST]),
            route("nodes", "/api/v1/nodes/", &[]),
            route("health", "/healthz", &[Method::GET, Method::HEAD]),
            route("items-read", "/items", &[Method::GET, Method::HEAD]),
            route("items-write", "/items", &[Method::POST]),
        ])
    }

    impl RouteTable {
        fn new_without_login(routes: &[Route]) -> Self {
            RouteTable::new(routes.to_vec())
        }
    }

    fn name(m: Match<'_>) -> String {
        match m {
            Match::Found(r) => r.name.clone(),
            Match::MethodNotAllowed(r, a) => format!("405 {} {a}", r.name),
            Match::NotFound => "404".into(),
        }
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let t = table();
        assert_eq!(name(t.find(&Method::POST, "/api/v1/auth/login")), "login");
        assert_eq!(name(t.find(&Method::POST, "/api/v1/auth/login/x")), "login");
        // Not a segment boundary: the broader route.
        assert_eq!(name(t.find(&Method::POST, "/api/v1/auth/loginx")), "api");
        assert_eq!(name(t.find(&Method::GET, "/healthz")), "health");
        assert_eq!(name(t.find(&Method::GET, "/healthzz")), "404");
        assert_eq!(name(t.find(&Method::GET, "/api/v1")), "404");
    }

    #[test]
    fn the_most_specific_route_owns_its_path_for_every_method() {
        let t = table();
        // Never a fall-through to the broader route with other checks.
        assert_eq!(
            name(t.find(&Method::GET, "/api/v1/auth/login")),
            "405 login POST"
        );
        assert_eq!(
            name(t.find(&Method::PUT, "/api/v1/nodes/register")),
            "405 register POST"
        );
        assert_eq!(
            name(t.find(&Method::POST, "/healthz")),
            "405 health GET, HEAD"
        );
        // Routes with the same prefix split it by method.
        assert_eq!(name(t.find(&Method::GET, "/items/1")), "items-read");
        assert_eq!(name(t.find(&Method::POST, "/items/1")), "items-write");
        assert_eq!(
            name(t.find(&Method::DELETE, "/items")),
            "405 items-read GET, HEAD, POST"
        );
    }

    #[test]
    fn exact_routes_own_their_path_only_and_beat_a_prefix_of_the_same_text() {
        let exact = |name: &str, path: &str, methods: &[Method]| Route {
            exact: true,
            ..route(name, path, methods)
        };
        let t = RouteTable::new_without_login(&[
            route("api", "/api/v1/", &[]),
            exact("login", "/api/v1/auth/login", &[Method::POST]),
            route("login-tree", "/api/v1/auth/login", &[Method::GET]),
        ]);
        assert_eq!(name(t.find(&Method::POST, "/api/v1/auth/login")), "login");
        // Same text: one group, split by method.
        assert_eq!(
            name(t.find(&Method::GET, "/api/v1/auth/login")),
            "login-tree"
        );
        assert_eq!(
            name(t.find(&Method::GET, "/api/v1/auth/login/x")),
            "login-tree"
        );
        let t = RouteTable::new_without_login(&[
            route("api", "/api/v1/", &[]),
            exact("login", "/api/v1/auth/login", &[Method::POST]),
        ]);
        // As Go's ServeMux: a pattern without a trailing slash is that path only.
        assert_eq!(name(t.find(&Method::POST, "/api/v1/auth/login/")), "api");
        assert_eq!(name(t.find(&Method::POST, "/api/v1/auth/login/x")), "api");
        assert_eq!(
            name(t.find(&Method::GET, "/api/v1/auth/login")),
            "405 login POST"
        );
    }

    /// Every byte a path may hold, escaped or not, in upper and lower case.
    fn spellings(c: u8) -> Vec<String> {
        let mut out = vec![format!("%{c:02X}"), format!("%{c:02x}")];
        if c.is_ascii_graphic() && !matches!(c, b'%' | b'?' | b'#') {
            out.push((c as char).to_string());
        }
        out
    }

    /// A Go `net/http` ServeMux in miniature: percent-decode the whole path, then the longest
    /// registered prefix on a segment boundary.
    fn decoded_owner(t: &RouteTable, raw: &str) -> String {
        let bytes = raw.as_bytes();
        let mut decoded = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let h = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                decoded.push(u8::from_str_radix(h, 16).unwrap());
                i += 3;
            } else {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
        let decoded = String::from_utf8_lossy(&decoded);
        t.routes()
            .iter()
            .find(|r| r.matches_path(&decoded))
            .map_or("404".into(), |r| r.path_prefix.clone())
    }

    #[test]
    fn the_gateway_owner_is_the_owner_after_full_decoding() {
        // Each path of the table with one character replaced by every spelling of every
        // byte: whatever the gateway does not refuse, it routes to the route a decoding
        // upstream routes to.
        let t = table();
        let mut checked = 0;
        for base in ["/api/v1/auth/login", "/api/v1/nodes/register", "/healthz"] {
            for at in 1..base.len() {
                for c in 0u8..=255 {
                    for s in spellings(c) {
                        let raw = format!("{}{}{}", &base[..at], s, &base[at + 1..]);
                        let Ok(norm) = path::normalise(&raw) else {
                            continue;
                        };
                        let ours = t
                            .routes()
                            .iter()
                            .find(|r| r.matches_path(&norm))
                            .map_or("404".into(), |r| r.path_prefix.clone());
                        assert_eq!(ours, decoded_owner(&t, &raw), "{raw}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 10_000, "{checked}");
    }
}
