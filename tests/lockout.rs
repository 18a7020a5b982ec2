//! End-to-end login protection: strict bodies and a lockout that cannot be raced, against a
//! real upstream that counts the login requests it receives.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::redis::Backend;
use common::upstream::{Upstream, RIGHT_PASSWORD};
use common::{login, login_raw, parse_metrics, Gateway, Response};

const LOCKED: &str = "account temporarily locked";

fn gateway(b: &Backend, up: &Upstream, lockout: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
{store}

[lockout]
{lockout}

[[upstreams]]
name = "control"
servers = ["{up}"]

{login}
"#,
        up = up.addr,
        store = b.toml(),
        login = common::login_route("control", ""),
    ))
}

fn attempts(gw: &Gateway) -> std::collections::HashMap<String, f64> {
    parse_metrics(&gw.metrics())
}

fn outcome(m: &std::collections::HashMap<String, f64>, o: &str) -> f64 {
    m.get(&format!(r#"gateway_login_attempts_total{{outcome="{o}"}}"#))
        .copied()
        .unwrap_or(0.0)
}

fn strict_bodies_never_reach_the_upstream(b: &Backend) {
    let up = Upstream::start();
    let gw = gateway(b, &up, "");
    let bad = [
        "",
        "{",
        "null",
        r#"{"email":"a@b.com"}"#,
        r#"{"password":"x"}"#,
        r#"{"email":"a@b.com","password":"x","tenant":"oops"}"#,
        r#"{"email":"a@b.com","password":"x","tenant_domain":7}"#,
        r#"{"email":"a@b.com","password":"x","tenant_domain":null}"#,
        r#"{"email":5,"password":"x"}"#,
        r#"{"email":"a@b.com","password":["x"]}"#,
        r#"{"email":"a@b.com","password":"x","email":"c@d.com"}"#,
        r#"{"email":"  ","password":"x"}"#,
        r#"[{"email":"a@b.com","password":"x"}]"#,
    ];
    for body in bad {
        login_raw(&gw, body).assert_envelope(400, "invalid request body");
    }
    // Over the route's 4096-byte cap, announced or chunked.
    let big = format!(r#"{{"email":"a@b.com","password":"{}"}}"#, "x".repeat(5000));
    login_raw(&gw, &big).assert_envelope(413, "request body too large");
    let mut c = common::Conn::open(gw.addr);
    c.write(b"POST /api/v1/auth/login HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    let chunk = format!("1000\r\n{}\r\n", "x".repeat(0x1000));
    c.write(chunk.as_bytes());
    c.write(chunk.as_bytes());
    c.write(b"0\r\n\r\n");
    c.read(false)
        .unwrap()
        .assert_envelope(413, "request body too large");
    assert_eq!(up.hits.load(Ordering::SeqCst), 0);

    // A valid body is forwarded unchanged, optional tenant_domain included.
    let body = r#"{"email":"Ann@Example.com","password":"right-password","tenant_domain":"acme"}"#;
    let r = login_raw(&gw, body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);

    let m = attempts(&gw);
    assert_eq!(outcome(&m, "invalid_body"), (bad.len() + 2) as f64);
    assert_eq!(outcome(&m, "success"), 1.0);
}

fn ten_failures_lock_for_everyone_and_every_password(b: &Backend) {
    let up = Upstream::start();
    let gw = gateway(b, &up, "");
    for i in 0..10 {
        let r = login(&gw, "victim@example.com", &format!("guess-{i}"));
        r.assert_envelope(401, "invalid credentials");
    }
    assert_eq!(up.hits.load(Ordering::SeqCst), 10);
    let r = login(&gw, "victim@example.com", "guess-10");
    r.assert_envelope(403, LOCKED);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((890..=900).contains(&retry), "Retry-After {retry}");
    // The right password, and case or whitespace variants of the email, hit the same lock.
    login(&gw, "victim@example.com", RIGHT_PASSWORD).assert_envelope(403, LOCKED);
    login(&gw, "  VICTIM@Example.COM ", RIGHT_PASSWORD).assert_envelope(403, LOCKED);
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        10,
        "a locked account never reaches the upstream"
    );
    // Another email is unaffected.
    login(&gw, "bystander@example.com", "nope").assert_envelope(401, "invalid credentials");
    assert_eq!(
        login(&gw, "bystander@example.com", RIGHT_PASSWORD).status,
        200
    );

    let m = attempts(&gw);
    assert_eq!(outcome(&m, "failure"), 11.0);
    assert_eq!(outcome(&m, "locked"), 3.0);
    assert_eq!(outcome(&m, "success"), 1.0);
    assert_eq!(m.get("gateway_lockouts_total"), Some(&1.0));
}

fn a_hundred_parallel_guesses_let_at_most_ten_through(b: &Backend) {
    let up = Upstream::start();
    let gw = Arc::new(gateway(b, &up, ""));
    let handles: Vec<_> = (0..100)
        .map(|i| {
            let gw = gw.clone();
            std::thread::spawn(move || login(&gw, "fresh@example.com", &format!("wrong-{i}")))
        })
        .collect();
    let answers: Vec<Response> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let reached = up.hits.load(Ordering::SeqCst);
    let failed = answers.iter().filter(|r| r.status == 401).count();
    let locked = answers.iter().filter(|r| r.status == 403).count();
    assert!(reached <= 10, "the upstream saw {reached} guesses");
    assert_eq!(
        failed, reached,
        "every guess that reached the upstream is a 401"
    );
    assert_eq!(failed + locked, 100, "every attempt got 401 or 403");
    for r in answers.iter().filter(|r| r.status == 403) {
        r.assert_envelope(403, LOCKED);
    }
    // Whatever was in flight settled: the account is locked now, with a full period.
    let r = login(&gw, "fresh@example.com", RIGHT_PASSWORD);
    r.assert_envelope(403, LOCKED);
    assert_eq!(up.hits.load(Ordering::SeqCst), reached);
    assert_eq!(
        reached, 10,
        "slots are given back only by settlement, so all ten were used"
    );
}

fn lock_expires_and_success_resets_the_count(b: &Backend) {
    let up = Upstream::start();
    let gw = gateway(b, &up, "max_failures = 3\nlock_seconds = 1");
    for _ in 0..3 {
        login(&gw, "a@example.com", "wrong").assert_envelope(401, "invalid credentials");
    }
    let r = login(&gw, "a@example.com", RIGHT_PASSWORD);
    r.assert_envelope(403, LOCKED);
    assert_eq!(r.header("retry-after"), Some("1"));
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        login(&gw, "a@example.com", RIGHT_PASSWORD).status,
        200,
        "the lock ran out"
    );

    // Two failures, a success, two more failures: never three in a row, never locked.
    for round in 0..2 {
        for _ in 0..2 {
            login(&gw, "b@example.com", "wrong").assert_envelope(401, "invalid credentials");
        }
        assert_eq!(
            login(&gw, "b@example.com", RIGHT_PASSWORD).status,
            200,
            "round {round}"
        );
    }
}

fn upstream_errors_give_the_slot_back(b: &Backend) {
    let up = Upstream::start();
    let gw = gateway(b, &up, "max_failures = 3");
    for _ in 0..8 {
        login(&gw, "boom@example.com", "x").assert_envelope(500, "internal server error");
    }
    assert_eq!(up.hits.load(Ordering::SeqCst), 8, "5xx answers never lock");
    let m = attempts(&gw);
    assert_eq!(outcome(&m, "error"), 8.0);
    assert_eq!(m.get("gateway_lockouts_total"), Some(&0.0));
}

fn per_ip_throttle_stands_beside_the_lockout(b: &Backend) {
    let up = Upstream::start();
    let gw = Gateway::start(&format!(
        r#"
{store}

[[upstreams]]
name = "control"
servers = ["{up}"]

[[routes]]
name = "login"
path_prefix = "/api/v1/auth/login"
methods = ["POST"]
upstream = "control"
auth = "public"
login_guard = true
max_body_bytes = 4096
rate_limit = {{ key = "ip", per_minute = 1, burst = 4 }}
"#,
        up = up.addr,
        store = b.toml(),
    ));
    // One address spraying many accounts: four attempts pass, the fifth is throttled.
    for i in 0..4 {
        login(&gw, &format!("user{i}@example.com"), "wrong")
            .assert_envelope(401, "invalid credentials");
    }
    let r = login(&gw, "user9@example.com", "wrong");
    r.assert_envelope(429, "rate limit exceeded");
    assert!(r.header("retry-after").is_some());
    assert_eq!(up.hits.load(Ordering::SeqCst), 4);
    let m = attempts(&gw);
    assert_eq!(outcome(&m, "throttled"), 1.0);
}

/// Emails with braces cannot split a login's keys over two Cluster slots (the store would fail
/// the script and fall back): every guess is counted by the shared store itself.
fn braces_in_an_email_keep_one_slot(b: &Backend) {
    let up = Upstream::start();
    let gw = gateway(b, &up, "");
    for email in ["a{b}c@example.com", "}{@example.com", "{x@example.com"] {
        for i in 0..10 {
            login(&gw, email, &format!("wrong-{i}")).assert_envelope(401, "invalid credentials");
        }
        login(&gw, email, RIGHT_PASSWORD).assert_envelope(403, LOCKED);
    }
    assert_eq!(up.hits.load(Ordering::SeqCst), 30);
    let m = attempts(&gw);
    assert_eq!(
        m.get("gateway_store_fallbacks_total")
            .copied()
            .unwrap_or(0.0),
        0.0
    );
}

every_store!(
    braces_in_an_email_keep_one_slot,
    strict_bodies_never_reach_the_upstream,
    ten_failures_lock_for_everyone_and_every_password,
    a_hundred_parallel_guesses_let_at_most_ten_through,
    lock_expires_and_success_resets_the_count,
    upstream_errors_give_the_slot_back,
    per_ip_throttle_stands_beside_the_lockout,
);
