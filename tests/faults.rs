//! Hard to break: a matrix of upstream faults × route kinds (plain, token, login guard), client
//! abuse, and what Pingora itself answers before any of our code runs. Every answer is the right
//! envelope, or — where a success header already went out — a cleanly closed connection that
//! never looks complete; the process survives and does not leak descriptors or memory.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::upstream::{pattern, Upstream, HUGE};
use common::{closed_port, parse_metrics, Conn, Gateway, Response};

const SECRET: &str = "faults-test-secret-0123456789abcd";

fn token() -> String {
    common::mint_token(SECRET, "t", "u", "admin")
}

fn gateway(up: &Upstream) -> Gateway {
    let dead = closed_port();
    let mut routes = String::new();
    for (kind, prefix, auth, extra) in [
        ("plain", "/u/", "public", ""),
        ("token", "/a/", "jwt", ""),
        (
            "login",
            "/l/",
            "public",
            "methods = [\"POST\"]\nlogin_guard = true\nmax_body_bytes = 4096\n",
        ),
    ] {
        for (upstream, suffix, p) in [
            ("app", "", prefix.to_string()),
            ("dead", "-dead", format!("/dead{prefix}")),
        ] {
            routes.push_str(&format!(
                "[[routes]]\nname = \"{kind}{suffix}\"\npath_prefix = \"{p}\"\nupstream = \"{upstream}\"\nauth = \"{auth}\"\n{extra}\n"
            ));
        }
    }
    Gateway::start_with(
        &format!(
            r#"
[jwt]
secrets = ["env:G2D_FAULT_SECRET"]

[[upstreams]]
name = "app"
servers = ["{up}"]
connect_timeout_ms = 500
read_timeout_ms = 700

[[upstreams]]
name = "dead"
servers = ["127.0.0.1:{dead}"]

{routes}
"#,
            up = up.addr
        ),
        &[("G2D_FAULT_SECRET", SECRET)],
        &[],
    )
}

/// What a fault must produce.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// This envelope, complete.
    Envelope(u16, &'static str),
    /// A success header, then a connection closed before the body completed.
    Truncated,
    /// This success, complete.
    Complete(u16),
    /// A success, except on non-idempotent requests (the login POST), which are not retried on a
    /// reused upstream connection that turned out dead: there the 502 envelope.
    CompleteUnlessPost(u16),
}

const FAULTS: &[(&str, Expect)] = &[
    (
        "reset-before-headers",
        Expect::Envelope(502, "upstream unavailable"),
    ),
    (
        "close-before-headers",
        Expect::Envelope(502, "upstream unavailable"),
    ),
    ("garbage", Expect::Envelope(502, "upstream unavailable")),
    (
        "invalid-headers",
        Expect::Envelope(502, "upstream unavailable"),
    ),
    (
        "oversized-headers",
        Expect::Envelope(502, "upstream unavailable"),
    ),
    ("slow-headers", Expect::Envelope(504, "upstream timeout")),
    ("html-500", Expect::Envelope(500, "internal server error")),
    ("huge-500", Expect::Envelope(500, "internal server error")),
    ("huge-404-json", Expect::Envelope(404, "not found")),
    (
        "slow-body-500",
        Expect::Envelope(500, "internal server error"),
    ),
    ("empty-503", Expect::Envelope(503, "service unavailable")),
    ("big", Expect::Complete(200)),
    ("reset-mid-body", Expect::Truncated),
    ("slow-body", Expect::Truncated),
    ("premature-eof", Expect::Truncated),
    ("keepalive-then-close", Expect::CompleteUnlessPost(200)),
    ("keepalive-then-close", Expect::CompleteUnlessPost(200)),
];

/// One request of route kind `kind` for `path`, on a new connection; returns the answer and
/// whether the connection ended cleanly after it.
fn request(gw: &Gateway, kind: &str, path: &str) -> (Response, bool) {
    let raw = match kind {
        "plain" => format!("GET /u/{path} HTTP/1.1\r\nHost: t\r\n\r\n"),
        "token" => format!(
            "GET /a/{path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\r\n",
            token()
        ),
        _ => {
            let body = r#"{"email":"fault@example.com","password":"p"}"#;
            format!(
                "POST /l/{path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        }
    };
    let mut c = Conn::open(gw.addr);
    let r = c.send(raw.as_bytes());
    let closed = !r.complete && c.closed();
    (r, closed)
}

fn check(gw: &Gateway, kind: &str, path: &str, expect: Expect) {
    let (r, closed) = request(gw, kind, path);
    match expect {
        Expect::Envelope(status, message) => r.assert_envelope(status, message),
        Expect::Complete(status) => {
            assert_eq!(r.status, status, "{kind} {path}");
            assert!(r.complete, "{kind} {path}");
            if path == "big" {
                assert!(r.body == pattern(HUGE), "{kind} big: body differs");
            }
        }
        Expect::CompleteUnlessPost(status) => {
            if kind == "login" && r.status == 502 {
                r.assert_envelope(502, "upstream unavailable");
            } else {
                assert_eq!((r.status, r.complete), (status, true), "{kind} {path}");
            }
        }
        Expect::Truncated => {
            assert_eq!(r.status, 200, "{kind} {path}");
            assert!(
                !r.complete,
                "{kind} {path}: a truncated body must not look complete"
            );
            assert!(closed, "{kind} {path}: the connection must be closed");
        }
    }
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn upstream_fault_matrix_on_every_route_kind() {
    let up = Upstream::start();
    let mut gw = gateway(&up);
    let kinds = ["plain", "token", "login"];
    let mut sent = 0;
    let mut after_round = Vec::new();
    for round in 0..3 {
        for kind in kinds {
            for (path, expect) in FAULTS {
                check(&gw, kind, path, *expect);
                sent += 1;
            }
            // Refused: the same kind of route in front of a closed port.
            let prefix = match kind {
                "plain" => "/dead/u/x",
                "token" => "/dead/a/x",
                _ => "/dead/l/x",
            };
            let path = prefix.trim_start_matches('/').to_string();
            let raw = match kind {
                "token" => format!(
                    "GET /{path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\r\n",
                    token()
                ),
                "login" => {
                    let body = r#"{"email":"fault@example.com","password":"p"}"#;
                    format!(
                        "POST /{path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                }
                _ => format!("GET /{path} HTTP/1.1\r\nHost: t\r\n\r\n"),
            };
            gw.send(raw.as_bytes())
                .assert_envelope(502, "upstream unavailable");
            sent += 1;
        }
        assert!(gw.alive(), "the gateway died in round {round}");
        std::thread::sleep(Duration::from_millis(300));
        after_round.push((fds(gw.pid()), rss_kib(gw.pid())));
    }
    // No guess was used up by a fault: the login key is not locked.
    let body = r#"{"email":"fault@example.com","password":"right-password"}"#;
    let login = format!(
        "POST /l/ok HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(gw.send(login.as_bytes()).status, 200);

    let (fd1, rss1) = after_round[0];
    let (fd3, rss3) = after_round[2];
    eprintln!(
        "fault matrix: {} faults x {} route kinds x 3 rounds, {sent} requests; fds {:?}, RSS KiB {:?}",
        FAULTS.len() + 1,
        kinds.len(),
        after_round.iter().map(|a| a.0).collect::<Vec<_>>(),
        after_round.iter().map(|a| a.1).collect::<Vec<_>>()
    );
    assert!(fd3 <= fd1 + 8, "file descriptors grew from {fd1} to {fd3}");
    assert!(
        rss3 <= rss1 + 16 * 1024,
        "RSS grew from {rss1} KiB to {rss3} KiB"
    );
    let m = parse_metrics(&gw.metrics());
    let total: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("gateway_http_requests_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total as usize, sent + 1, "every request was counted once");
}

#[test]
fn client_abuse_gets_envelopes_and_bounded_resources() {
    let up = Upstream::start();
    let mut gw = gateway(&up);

    // Oversized heads: 431 from the gateway, well below Pingora's own 1 MiB limit.
    let big = format!(
        "GET /u/ok HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    gw.send(big.as_bytes())
        .assert_envelope(431, "request header fields too large");
    let mut many = String::from("GET /u/ok HTTP/1.1\r\nHost: t\r\n");
    for i in 0..120 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    gw.send(many.as_bytes())
        .assert_envelope(431, "request header fields too large");

    // Oversized and slow bodies.
    gw.send(b"POST /u/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999\r\n\r\n")
        .assert_envelope(413, "request body too large");
    let mut c = Conn::open(gw.addr);
    c.write(b"POST /u/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc");
    c.read(false)
        .unwrap()
        .assert_envelope(408, "request timeout");

    // Path tricks never reach a route by another name.
    for path in [
        "/u/../dead/u/x",
        "/u/%2e%2e/dead",
        "/u/%2E%2e/x",
        "/u//x",
        "/u/./x",
        "/u/%2f",
        "/u/%5c",
        "/u/%",
        "/u/%g0",
        "/u/%00",
    ] {
        gw.get(path).assert_envelope(400, "invalid request path");
    }

    // Many idle connections: each costs a little memory and the gateway keeps serving.
    let before = rss_kib(gw.pid());
    let idle: Vec<TcpStream> = (0..1000)
        .filter_map(|_| TcpStream::connect(gw.addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gw.get("/u/ok").status, 200);
    let with_idle = rss_kib(gw.pid());
    eprintln!(
        "1000 idle connections: RSS {before} KiB -> {with_idle} KiB ({} connected)",
        idle.len()
    );
    assert!(
        with_idle < before + 64 * 1024,
        "1000 idle connections cost more than 64 MiB"
    );
    drop(idle);
    assert!(gw.alive());
}

#[test]
fn pingora_never_answers_in_our_place() {
    let up = Upstream::start();
    let gw = gateway(&up);
    let raw = |bytes: &[u8]| {
        let mut s = TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    // Heads Pingora would refuse with its own bare answer (and `Server: Pingora`) are judged
    // on arrival: the envelope, and the connection closed (tests/exceptions.rs has them all).
    for (bad, status, message) in [
        (&b"GARBAGE\r\n\r\n"[..], 400, "invalid request"),
        (
            b"GET /u/ok HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n",
            400,
            "invalid request",
        ),
        (b"GET /u/ok HTTP/9.9\r\n\r\n", 400, "invalid request"),
        (
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            501,
            "method not implemented",
        ),
    ] {
        let answer = raw(bad);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer:?}"
        );
        assert!(
            !answer.to_ascii_lowercase().contains("server:"),
            "{answer:?}"
        );
        assert!(
            answer.ends_with(&format!(r#"{{"status":"error","message":"{message}"}}"#)),
            "{answer:?}"
        );
    }
    let answer = raw(b"GET /nowhere HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    assert!(
        answer.ends_with(r#"{"status":"error","message":"not found"}"#),
        "{answer:?}"
    );
}
