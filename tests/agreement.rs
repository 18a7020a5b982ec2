//! One request, one meaning: what the gateway checks is what the upstream serves.
//!
//! The upstream here is the control plane's router as it really is, Go's `net/http` ServeMux,
//! which routes on the percent-decoded path (`tests/upstream_go`). Every test runs over
//! HTTP/1.1 (raw bytes) and HTTP/2 (TLS, ALPN h2), and the lockout ones on the memory store
//! and on Redis.

mod common;

use std::collections::HashMap;

use common::go::{GoUpstream, Seen};
use common::redis::Backend;
use common::tls::{client, Pki};
use common::{free_port, mint_token, parse_metrics, Gateway};

const SECRET: &str = "agreement-secret-0123456789abcdef";
const NODE_KEY: &str = "edge-node-key-0123456789";

/// HTTP/1.1 or HTTP/2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

const PROTOS: [Proto; 2] = [Proto::H1, Proto::H2];

/// An answer, whichever protocol carried it.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// What the Go handler saw, when the request reached one.
    fn seen(&self) -> Option<Seen> {
        (self.status == 200)
            .then(|| serde_json::from_slice(&self.body).ok())
            .flatten()
    }

    #[track_caller]
    fn assert_envelope(&self, status: u16, message: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(
            self.text(),
            format!("{{\"status\":\"error\",\"message\":\"{message}\"}}")
        );
    }
}

/// The gateway in front of the Go upstream, with a TLS listener for HTTP/2.
struct Edge {
    gw: Gateway,
    go: GoUpstream,
    tls_port: u16,
    h2: reqwest::blocking::Client,
}

/// The control plane's routes, laid out as its Go patterns are: exact paths where the mux has
/// an exact pattern, prefixes where it has a subtree (trailing `/`). `extra` goes before the
/// routes (`[server]` keys are not allowed there: use `server`).
fn edge(server: &str, extra: &str, store: &Backend) -> Edge {
    let go = GoUpstream::start();
    let pki = Pki::new();
    let (cert, key, _) = pki.issue(&["api.test"]);
    let tls_port = free_port();
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(NODE_KEY.as_bytes()))
    };
    let store = store.toml();
    let gw = Gateway::start_full(
        server,
        &format!(
            r#"
[jwt]
secrets = ["env:G2D_AGREE_SECRET"]

[tls]
listen = "127.0.0.1:{tls_port}"
http2 = true
certificates = [{{ cert_file = "api.pem", key_file = "api.key" }}]

{store}
{extra}

[[upstreams]]
name = "control"
servers = ["{go}"]

[[routes]]
name = "login"
path = "/api/v1/auth/login"
methods = ["POST"]
upstream = "control"
auth = "public"
max_body_bytes = 4096
login_guard = true

[[routes]]
name = "node-register"
path = "/api/v1/nodes/register"
methods = ["POST"]
upstream = "control"
auth = "public"
allow_networks = ["192.0.2.0/24"]

[[routes]]
name = "nodes"
path_prefix = "/api/v1/nodes/"
upstream = "control"
auth = "node_key"
node_key_digests_file = "node-keys.sha256"

[[routes]]
name = "desired-state"
path = "/api/v1/edge/desired-state"
methods = ["GET"]
upstream = "control"
auth = "node_key"
node_key_digests_file = "node-keys.sha256"

[[routes]]
name = "api"
path_prefix = "/api/v1/"
upstream = "control"
auth = "jwt"

[[routes]]
name = "ws"
path_prefix = "/ws/"
methods = ["GET"]
upstream = "control"
auth = "jwt_query"

[[routes]]
name = "public"
path_prefix = "/public/"
upstream = "control"
auth = "public"
"#,
            go = go.addr
        ),
        &[("G2D_AGREE_SECRET", SECRET)],
        &[
            ("api.pem", &cert),
            ("api.key", &key),
            ("node-keys.sha256", &format!("{digest}\n")),
        ],
    );
    let h2 = client(&pki, tls_port, true);
    Edge {
        gw,
        go,
        tls_port,
        h2,
    }
}

impl Edge {
    /// Sends one request over `proto`; `headers` are `(name, value)` pairs sent as given.
    fn send(
        &self,
        proto: Proto,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        match proto {
            Proto::H1 => {
                let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: api.test\r\n");
                for (k, v) in headers {
                    raw.push_str(&format!("{k}: {v}\r\n"));
                }
                raw.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
                let r = self.gw.send(raw.as_bytes());
                Answer {
                    status: r.status,
                    headers: r.headers.clone(),
                    body: r.body,
                }
            }
            Proto::H2 => {
                let url = format!("https://api.test:{}{target}", self.tls_port);
                let mut req = self
                    .h2
                    .request(method.parse().expect("a method"), &url)
                    .body(body.to_string());
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                let r = req.send().expect("an HTTP/2 answer");
                assert_eq!(r.version(), reqwest::Version::HTTP_2);
                let status = r.status().as_u16();
                let headers = r
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect();
                Answer {
                    status,
                    headers,
                    body: r.bytes().expect("a body").to_vec(),
                }
            }
        }
    }
}

/// A request: method, target and headers.
type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>);

fn token(tenant: &str, user: &str, role: &str) -> String {
    mint_token(SECRET, tenant, user, role)
}

/// Spellings of `path` that a decoding server reads as `path`: single letters escaped in
/// lower- and upper-case hex, every letter and digit escaped in alternating case, a letter of
/// the first segment escaped.
fn spellings(path: &str) -> Vec<String> {
    let last = path.rfind('/').map_or(0, |i| i + 1);
    let escape = |at: usize, upper: bool| {
        let c = path.as_bytes()[at];
        let e = if upper {
            format!("%{c:02X}")
        } else {
            format!("%{c:02x}")
        };
        format!("{}{e}{}", &path[..at], &path[at + 1..])
    };
    let mut every = String::new();
    for (i, c) in path.bytes().enumerate() {
        if c.is_ascii_alphanumeric() {
            if i % 2 == 0 {
                every.push_str(&format!("%{c:02X}"));
            } else {
                every.push_str(&format!("%{c:02x}"));
            }
        } else {
            every.push(c as char);
        }
    }
    vec![
        escape(last, false),
        escape(last, true),
        escape(1, false),
        every,
    ]
}

#[test]
fn every_spelling_of_a_path_is_checked_as_the_route_the_upstream_serves() {
    let e = edge("", "", &Backend::Memory);
    let jwt = format!("Bearer {}", token("t-1", "u-1", "agent"));
    let node = format!("Bearer {NODE_KEY}");
    let ws = format!("?token={}", token("t-1", "u-1", "agent"));
    // (method, canonical target, headers): one request per route kind, with the credential
    // that route takes; and the same requests with credentials of a broader route, which a
    // misrouted request would have passed with.
    let junk_key = "Bearer some-junk-key-that-is-well-formed";
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/api/v1/nodes/register".into(),
            vec![("Authorization", junk_key)],
        ),
        (
            "POST",
            "/api/v1/nodes/register".into(),
            vec![("Authorization", jwt.as_str())],
        ),
        (
            "GET",
            "/api/v1/nodes/jobs".into(),
            vec![("Authorization", node.as_str())],
        ),
        (
            "GET",
            "/api/v1/nodes/jobs".into(),
            vec![("Authorization", junk_key)],
        ),
        (
            "GET",
            "/api/v1/edge/desired-state".into(),
            vec![("Authorization", node.as_str())],
        ),
        (
            "GET",
            "/api/v1/edge/desired-state".into(),
            vec![("Authorization", jwt.as_str())],
        ),
        (
            "GET",
            "/api/v1/calls".into(),
            vec![("Authorization", jwt.as_str())],
        ),
        ("GET", "/api/v1/calls".into(), vec![]),
        ("GET", format!("/ws/agent{ws}"), vec![]),
        ("GET", "/ws/agent".into(), vec![]),
        ("GET", "/public/x".into(), vec![]),
    ];
    for proto in PROTOS {
        for (method, target, headers) in &cases {
            let (path, query) = target.split_at(target.find('?').unwrap_or(target.len()));
            let canonical = e.send(proto, method, target, headers, "");
            for spelling in spellings(path) {
                let t = format!("{spelling}{query}");
                let r = e.send(proto, method, &t, headers, "");
                assert_eq!(
                    r.status,
                    canonical.status,
                    "{proto:?} {method} {t}: {}",
                    r.text()
                );
                match (r.seen(), canonical.seen()) {
                    (Some(got), Some(want)) => {
                        assert_eq!(got.handler, want.handler, "{proto:?} {t}");
                        // The upstream got the normalised target, not the spelling.
                        assert_eq!(got.target, want.target, "{proto:?} {t}");
                        assert_eq!(got.path, path, "{proto:?} {t}");
                    }
                    (None, None) => assert_eq!(r.body, canonical.body, "{proto:?} {t}"),
                    other => panic!("{proto:?} {t}: {other:?}"),
                }
            }
        }
    }
    // Nothing reached the gated register handler, nor a handler with a junk credential.
    let counts = e.go.counts();
    assert_eq!(counts.get("handler:node-register"), None, "{counts:?}");
    // Escapes of other characters stay as they came, and the upstream decodes them itself.
    let r = e.send(Proto::H1, "GET", "/public/a%20b%3Ac", &[], "");
    let seen = r.seen().expect("the public handler");
    assert_eq!(
        (seen.path.as_str(), seen.target.as_str()),
        ("/public/a b:c", "/public/a%20b%3Ac")
    );
    // Escaped dots, slashes and backslashes are refused, in either case. (The HTTP/2 client
    // resolves `%2e` segments itself, as URL parsers do, so those go over HTTP/1.1 only.)
    for bad in [
        "/public/%2e%2e/api/v1/x",
        "/public/%2E/x",
        "/public/a%2Eb",
        "/api/v1%2fnodes/register",
        "/api/v1%2Fnodes/register",
        "/public/%5cx",
        "/public/%5C/x",
        "/public/%00",
    ] {
        for proto in PROTOS {
            if proto == Proto::H2 && bad.to_ascii_lowercase().contains("%2e") {
                continue;
            }
            e.send(proto, "GET", bad, &[], "")
                .assert_envelope(400, "invalid request path");
        }
    }
}

#[test]
fn the_route_that_owns_a_path_answers_other_methods_with_405() {
    let e = edge("", "", &Backend::Memory);
    let jwt = format!("Bearer {}", token("t-1", "u-1", "admin"));
    for proto in PROTOS {
        for (method, target, auth, allow) in [
            (
                "PUT",
                "/api/v1/nodes/register",
                "Bearer junk-key-well-formed",
                "POST",
            ),
            ("GET", "/api/v1/nodes/register", jwt.as_str(), "POST"),
            ("GET", "/api/v1/auth/login", jwt.as_str(), "POST"),
            ("PUT", "/api/v1/auth/%6cogin", jwt.as_str(), "POST"),
            (
                "DELETE",
                "/api/v1/edge/desired-state",
                jwt.as_str(),
                "GET, HEAD",
            ),
            ("POST", "/ws/agent", jwt.as_str(), "GET, HEAD"),
        ] {
            let r = e.send(proto, method, target, &[("Authorization", auth)], "");
            r.assert_envelope(405, "method not allowed");
            assert_eq!(
                r.header("allow"),
                Some(allow),
                "{proto:?} {method} {target}"
            );
        }
    }
    let counts = e.go.counts();
    assert!(
        counts.keys().all(|k| !k.starts_with("handler:")),
        "{counts:?}"
    );
}

fn login_body(email: &str, domain: Option<&str>, password: &str) -> String {
    match domain {
        Some(d) => {
            format!(r#"{{"email":"{email}","password":"{password}","tenant_domain":"{d}"}}"#)
        }
        None => format!(r#"{{"email":"{email}","password":"{password}"}}"#),
    }
}

both_stores!(
    login_guesses_count_against_the_account_under_any_path_spelling,
    one_tenants_success_never_clears_another_tenants_failures,
    one_email_has_a_bound_across_every_domain,
);

fn login_guesses_count_against_the_account_under_any_path_spelling(store: &Backend) {
    {
        let e = edge("", "", store);
        for proto in PROTOS {
            let email = format!("victim-{proto:?}@acme.example").to_lowercase();
            let paths = spellings("/api/v1/auth/login");
            // Ten wrong guesses, each through another spelling of the login path (and a
            // bearer token, which made the API route take them before).
            let jwt = format!("Bearer {}", token("t-1", "u-1", "agent"));
            for i in 0..10 {
                let target = &paths[i % paths.len()];
                let r = e.send(
                    proto,
                    "POST",
                    target,
                    &[
                        ("Authorization", &jwt),
                        ("Content-Type", "application/json"),
                    ],
                    &login_body(&email, Some("acme"), "wrong"),
                );
                assert_eq!(
                    r.status,
                    401,
                    "{proto:?} guess {i} via {target}: {}",
                    r.text()
                );
            }
            for target in paths
                .iter()
                .chain(["/api/v1/auth/login".to_string()].iter())
            {
                let r = e.send(
                    proto,
                    "POST",
                    target,
                    &[("Content-Type", "application/json")],
                    &login_body(&email, Some("acme"), "right"),
                );
                r.assert_envelope(403, "account temporarily locked");
            }
            assert_eq!(e.go.count(&format!("guess:acme/{email}")), 10, "{proto:?}");
        }
    }
}

/// Also: every spelling of a domain is one account.
fn one_tenants_success_never_clears_another_tenants_failures(store: &Backend) {
    {
        let e = edge("", "", store);
        for proto in PROTOS {
            let victim = format!("victim-{proto:?}@corp.example").to_lowercase();
            let guess = |domain: &str, password: &str| {
                e.send(
                    proto,
                    "POST",
                    "/api/v1/auth/login",
                    &[],
                    &login_body(&victim, Some(domain), password),
                )
            };
            // The attacker interleaves wrong guesses at the victim's tenant with successes at
            // their own tenant (same email there), and spells the victim's domain every way.
            let spellings = [
                "victim.example",
                "VICTIM.example",
                " victim.example ",
                "victim.example.",
                "ｖｉｃｔｉｍ.example",
            ];
            for i in 0..9 {
                assert_eq!(guess(spellings[i % spellings.len()], "wrong").status, 401);
                if i % 3 == 2 {
                    assert_eq!(guess("attacker.example", "right").status, 200);
                }
            }
            assert_eq!(guess("victim.example.", "wrong").status, 401);
            guess("victim.example", "right").assert_envelope(403, "account temporarily locked");
            // The attacker's own account is not locked.
            assert_eq!(guess("attacker.example", "right").status, 200);
            // The upstream keys some spellings apart ("victim.example." is another string to
            // it): summed over them, ten guesses reached it for the victim's tenant.
            let counts = e.go.counts();
            let reached: u64 = counts
                .iter()
                .filter(|(k, _)| {
                    k.starts_with("guess:")
                        && k.ends_with(&format!("/{victim}"))
                        && !k.starts_with("guess:*/")
                        && !k.starts_with("guess:attacker.example/")
                })
                .map(|(_, v)| v)
                .sum();
            assert_eq!(reached, 10, "{proto:?} {counts:?}");
        }
    }
}

fn one_email_has_a_bound_across_every_domain(store: &Backend) {
    {
        let e = edge("", "[lockout]\nmax_failures_per_email = 12", store);
        for proto in PROTOS {
            let email = format!("spread-{proto:?}@x.example").to_lowercase();
            let mut statuses = HashMap::new();
            for domain in ["a.example", "b.example", "c.example", "d.example"] {
                for _ in 0..4 {
                    let r = e.send(
                        proto,
                        "POST",
                        "/api/v1/auth/login",
                        &[],
                        &login_body(&email, Some(domain), "wrong"),
                    );
                    *statuses.entry(r.status).or_insert(0) += 1;
                }
            }
            assert_eq!(statuses.get(&401), Some(&12), "{proto:?} {statuses:?}");
            assert_eq!(statuses.get(&403), Some(&4), "{proto:?} {statuses:?}");
            assert_eq!(e.go.count(&format!("guess:*/{email}")), 12, "{proto:?}");
        }
    }
}

#[test]
fn failure_statuses_are_configurable() {
    // This control plane answers 401 for a wrong password; one that says 403 would never
    // lock anyone under the default. Configured to count only 403, the 401s are given back.
    let e = edge("", "[lockout]\nfailure_statuses = [403]", &Backend::Memory);
    for _ in 0..12 {
        let r = e.send(
            Proto::H1,
            "POST",
            "/api/v1/auth/login",
            &[],
            &login_body("someone@x.example", None, "wrong"),
        );
        assert_eq!(r.status, 401);
    }
    let m = parse_metrics(&e.gw.metrics());
    assert_eq!(
        m.get(r#"gateway_login_attempts_total{outcome="error"}"#),
        Some(&12.0)
    );
}

#[test]
fn login_bodies_that_are_not_one_object_never_reach_the_upstream() {
    let e = edge("", "", &Backend::Memory);
    for proto in PROTOS {
        for body in [
            r#"["a@b.example","x"]"#,
            r#"["a@b.example","x","acme"]"#,
            r#"[{"email":"a@b.example","password":"x"}]"#,
            r#""a@b.example""#,
            "null",
        ] {
            let r = e.send(proto, "POST", "/api/v1/auth/login", &[], body);
            r.assert_envelope(400, "invalid request body");
        }
    }
    assert_eq!(e.go.count("handler:login"), 0);
}

#[test]
fn clients_cannot_set_what_the_gateway_vouches_for() {
    let e = edge("", "", &Backend::Memory);
    let jwt = format!("Bearer {}", token("t-1", "u-1", "agent"));
    let forged: Vec<(&str, &str)> = vec![
        ("Authorization", &jwt),
        ("X-Tenant-Id", "evil"),
        ("X_Tenant_Id", "evil"),
        ("x_user_id", "evil"),
        ("X_User_Role", "platform_admin"),
        ("X-User_Email", "evil@evil.example"),
        ("X-Forwarded-Host", "evil.example"),
        ("X_Forwarded_Host", "evil.example"),
        ("Forwarded", "for=6.6.6.6;host=evil.example;proto=https"),
        ("X-Real-IP", "6.6.6.6"),
        ("X_Real_IP", "6.6.6.6"),
        ("True-Client-IP", "6.6.6.6"),
        ("X-Client-IP", "6.6.6.6"),
        ("CF-Connecting-IP", "6.6.6.6"),
        ("X-Forwarded-Port", "1"),
        ("X-Original-URL", "/api/v1/admin"),
        ("X-Rewrite-URL", "/api/v1/admin"),
        ("X-HTTP-Method-Override", "DELETE"),
        ("X-Method-Override", "DELETE"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("X_Forwarded_Proto", "https"),
        ("X_Request_Id", "forged"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Custom_Thing", "kept"),
    ];
    for proto in PROTOS {
        for target in ["/api/v1/calls", "/public/x"] {
            let r = e.send(proto, "GET", target, &forged, "");
            let seen = r
                .seen()
                .unwrap_or_else(|| panic!("{proto:?} {target}: {}", r.text()));
            let only = |name: &str| -> Vec<String> {
                let found = seen.cgi_header(name);
                assert!(found.len() <= 1, "{proto:?} {target} {name}: {found:?}");
                found.into_iter().flat_map(|(_, v)| v).collect()
            };
            let token_route = target.starts_with("/api");
            let identity = |v: &str| {
                if token_route {
                    vec![v.to_string()]
                } else {
                    vec![]
                }
            };
            assert_eq!(only("x-tenant-id"), identity("t-1"), "{proto:?} {target}");
            assert_eq!(only("x-user-id"), identity("u-1"), "{proto:?} {target}");
            assert_eq!(only("x-user-role"), identity("agent"), "{proto:?} {target}");
            assert_eq!(only("x-user-email"), Vec::<String>::new());
            assert_eq!(
                only("x-forwarded-host"),
                std::slice::from_ref(&seen.host),
                "{proto:?}"
            );
            assert_eq!(only("x-real-ip"), ["127.0.0.1"]);
            assert_eq!(only("x-forwarded-for"), ["127.0.0.1"]);
            let proto_seen = if proto == Proto::H2 { "https" } else { "http" };
            assert_eq!(only("x-forwarded-proto"), [proto_seen]);
            assert_eq!(only("x-request-id").len(), 1);
            assert_ne!(only("x-request-id"), ["forged"]);
            for gone in [
                "forwarded",
                "true-client-ip",
                "x-client-ip",
                "cf-connecting-ip",
                "x-forwarded-port",
                "x-original-url",
                "x-rewrite-url",
                "x-http-method-override",
                "x-method-override",
            ] {
                assert_eq!(
                    only(gone),
                    Vec::<String>::new(),
                    "{proto:?} {target} {gone}"
                );
            }
            assert_eq!(only("x-custom-thing"), ["kept"]);
        }
    }
}

#[test]
fn forwarding_headers_from_a_trusted_proxy() {
    // Loopback is the trusted load balancer here; the register route admits 192.0.2.0/24.
    let e = edge("trusted_proxies = [\"127.0.0.1/32\"]", "", &Backend::Memory);
    let register = |xff: &[&str]| {
        let headers: Vec<(&str, &str)> = xff.iter().map(|v| ("X-Forwarded-For", *v)).collect();
        e.send(Proto::H1, "POST", "/api/v1/nodes/register", &headers, "")
    };
    // Hops with ports are addresses (some load balancers write them).
    for hop in ["192.0.2.7:4444", "\"192.0.2.7\"", "192.0.2.7"] {
        let seen = register(&[hop]).seen().unwrap_or_else(|| panic!("{hop}"));
        assert_eq!(
            seen.headers.get("X-Real-Ip"),
            Some(&vec!["192.0.2.7".to_string()]),
            "{hop}"
        );
    }
    // A hop that is no address is an unknown client: never the proxy, never through a gate.
    for lines in [
        &["unknown"][..],
        &["[2001:db8::1]:x"],
        &["192.0.2.7", "unknown"],
        &["_hidden"],
    ] {
        register(lines).assert_envelope(403, "forbidden");
    }
    // Every line is one list: the right-most line's hop decides, and all of them go on.
    let seen = register(&["198.51.100.1", "192.0.2.9"])
        .seen()
        .expect("through the gate");
    assert_eq!(
        seen.headers.get("X-Forwarded-For"),
        Some(&vec!["198.51.100.1, 192.0.2.9, 127.0.0.1".to_string()])
    );
    // A trusted proxy's X-Forwarded-Host and Forwarded are its own to send.
    let seen = e
        .send(
            Proto::H1,
            "GET",
            "/public/x",
            &[
                ("X-Forwarded-Host", "api.get2dial.example"),
                ("Forwarded", "for=192.0.2.1"),
            ],
            "",
        )
        .seen()
        .expect("public");
    assert_eq!(
        seen.headers.get("X-Forwarded-Host"),
        Some(&vec!["api.get2dial.example".to_string()])
    );
    assert_eq!(
        seen.headers.get("Forwarded"),
        Some(&vec!["for=192.0.2.1".to_string()])
    );
}

#[test]
fn rate_keys_never_merge_clients_nor_split_one() {
    let go = GoUpstream::start();
    let gw = Gateway::start_full(
        "trusted_proxies = [\"127.0.0.1/32\"]",
        &format!(
            r#"
[jwt]
secrets = ["env:G2D_AGREE_SECRET"]

[[upstreams]]
name = "control"
servers = ["{go}"]

[[routes]]
name = "public"
path_prefix = "/public/"
upstream = "control"
auth = "public"
rate_limit = {{ name = "per-ip", key = "ip", per_hour = 1, burst = 1 }}

[[routes]]
name = "api"
path_prefix = "/api/v1/"
upstream = "control"
auth = "jwt"
rate_limit = {{ name = "per-user", key = "user", per_hour = 1, burst = 1 }}

[[routes]]
name = "ws"
path_prefix = "/ws/"
upstream = "control"
auth = "jwt"
rate_limit = {{ name = "per-user", key = "user", per_hour = 1, burst = 1 }}
"#,
            go = go.addr
        ),
        &[("G2D_AGREE_SECRET", SECRET)],
        &[],
    );
    let public = |xff: Option<&str>| {
        let raw = match xff {
            Some(v) => format!("GET /public/x HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: {v}\r\n\r\n"),
            None => "GET /public/x HTTP/1.1\r\nHost: t\r\n\r\n".to_string(),
        };
        gw.send(raw.as_bytes()).status
    };
    // One /64 is one subscriber; the next /64 is another.
    assert_eq!(public(Some("2001:db8:1:2::1")), 200);
    assert_eq!(public(Some("2001:db8:1:2:ffff:ffff:ffff:ffff")), 429);
    assert_eq!(public(Some("2001:db8:1:3::1")), 200);
    // An unknown hop has buckets of its own: not the proxy's, not a real client's.
    assert_eq!(public(Some("unknown")), 200);
    assert_eq!(public(Some("unknown")), 429);
    assert_eq!(public(None), 200);
    assert_eq!(public(Some("198.51.100.4")), 200);
    // A user is a subject within a tenant.
    let api = |tenant: &str, target: &str| {
        let t = token(tenant, "42", "agent");
        gw.send(
            format!("GET {target} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {t}\r\n\r\n")
                .as_bytes(),
        )
        .status
    };
    assert_eq!(api("tenant-a", "/api/v1/x"), 200);
    assert_eq!(api("tenant-b", "/api/v1/x"), 200);
    assert_eq!(api("tenant-a", "/api/v1/x"), 429);
    // One policy name is one bucket on every route that names it.
    assert_eq!(api("tenant-b", "/ws/x"), 429);
    assert_eq!(api("tenant-c", "/ws/x"), 200);
}

#[test]
fn every_token_the_upstream_can_read_is_verified_at_the_edge() {
    let e = edge("", "", &Backend::Memory);
    let good = token("t-1", "u-1", "agent");
    let other = token("t-2", "u-2", "agent");
    let bearer = format!("Bearer {good}");
    for proto in PROTOS {
        // jwt_query: a query token beside a bearer header must be the same token.
        for (target, auth, status) in [
            (
                format!("/ws/agent?token={good}"),
                Some(bearer.as_str()),
                200,
            ),
            (format!("/ws/agent?token={good}"), None, 200),
            (
                "/ws/agent?token=junk".to_string(),
                Some(bearer.as_str()),
                401,
            ),
            (
                format!("/ws/agent?token={other}"),
                Some(bearer.as_str()),
                401,
            ),
            (format!("/ws/agent?token={good}&token={good}"), None, 401),
            (format!("/ws/agent?%74oken=junk&token={good}"), None, 401),
            // jwt: only the header counts, and a query token beside it is checked too.
            (format!("/api/v1/calls?token={good}"), None, 401),
            (
                "/api/v1/calls?token=junk".to_string(),
                Some(bearer.as_str()),
                401,
            ),
            (
                format!("/api/v1/calls?token={good}"),
                Some(bearer.as_str()),
                200,
            ),
        ] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("Authorization", a)).into_iter().collect();
            let r = e.send(proto, "GET", &target, &headers, "");
            assert_eq!(
                r.status,
                status,
                "{proto:?} {target} {auth:?}: {}",
                r.text()
            );
        }
    }
}

#[test]
fn tenant_overrides_in_any_spelling_are_for_platform_admins_only() {
    let e = edge("", "", &Backend::Memory);
    let agent = format!("Bearer {}", token("t-1", "u-1", "admin"));
    let platform = format!("Bearer {}", token("t-1", "u-1", "platform_admin"));
    for proto in PROTOS {
        for query in [
            "tenant_id=t-2",
            "Tenant_Id=t-2",
            "TENANT_ID=t-2",
            "tenant_id[]=t-2",
            "tenant_id%5B%5D=t-2",
            "tenantId=t-2",
            "tenant-id=t-2",
            "tenant.id=t-2",
            "tenant%5fid=t-2",
            "a=1;tenant_id=t-2",
        ] {
            let target = format!("/api/v1/calls?{query}");
            let r = e.send(proto, "GET", &target, &[("Authorization", &agent)], "");
            r.assert_envelope(403, "forbidden");
            let r = e.send(proto, "GET", &target, &[("Authorization", &platform)], "");
            assert_eq!(r.status, 200, "{proto:?} {query}");
        }
    }
}

#[test]
fn no_token_reaches_a_log_line() {
    // Upstream failures make Pingora log the request at ERROR; debug logs everything else.
    let go = GoUpstream::start();
    let dead = common::closed_port();
    let gw = Gateway::start_with(
        &format!(
            r#"
[jwt]
secrets = ["env:G2D_AGREE_SECRET"]

[[upstreams]]
name = "control"
servers = ["{go}"]

[[upstreams]]
name = "dead"
servers = ["127.0.0.1:{dead}"]
connect_timeout_ms = 200

[[routes]]
name = "ws"
path_prefix = "/ws/"
upstream = "control"
auth = "jwt_query"

[[routes]]
name = "ws-dead"
path_prefix = "/dead-ws/"
upstream = "dead"
auth = "jwt_query"
"#,
            go = go.addr
        ),
        &[("G2D_AGREE_SECRET", SECRET), ("RUST_LOG", "debug")],
        &[],
    );
    let good = token("t-1", "u-1", "agent");
    let signature = good.rsplit('.').next().unwrap().to_string();
    for target in [
        format!("/dead-ws/agent?token={good}"),
        format!("/ws/agent?token={good}"),
        format!("/ws/agent?token={good}x"),
        format!("/dead-ws/agent?token={good}&token={good}"),
    ] {
        let _ = gw.get(&target);
    }
    let r = gw.send(
        format!("GET /dead-ws/x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {good}\r\n\r\n")
            .as_bytes(),
    );
    r.assert_envelope(502, "upstream unavailable");
    let _ = gw.metrics();
    let log = gw.log_when(|l| l.contains("retry: false, GET /dead-ws/agent"));
    assert!(
        log.contains("ERROR") || log.contains("error"),
        "no upstream failure was logged: {log}"
    );
    // Pingora's own failure line names the request by method and path only.
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("retry: false, GET /dead-ws/agent\"")),
        "{log}"
    );
    for (i, line) in log.lines().enumerate() {
        assert!(!line.contains(&signature), "line {i} holds a token: {line}");
        for (at, _) in line.match_indices("token=") {
            assert!(
                line[at + 6..].starts_with("[redacted]"),
                "line {i} holds a query token: {line}"
            );
        }
    }
}
