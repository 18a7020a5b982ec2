//! End-to-end rate limits: GCRA per IP, user or tenant, 429 with Retry-After and the IETF
//! RateLimit headers, X-Forwarded-For believed only from trusted proxies.

mod common;

use std::time::Duration;

use common::redis::Backend;
use common::upstream::Upstream;
use common::{parse_metrics, Gateway, Response};

const SECRET: &str = "ratelimit-test-secret-0123456789";

fn token(tenant: &str, user: &str) -> String {
    common::mint_token(SECRET, tenant, user, "agent")
}

fn gateway(b: &Backend, up: &Upstream, extra: &str) -> Gateway {
    Gateway::start_with(
        &format!(
            r#"
{extra}
{store}

[jwt]
secrets = ["env:G2D_RL_SECRET"]

[[upstreams]]
name = "app"
servers = ["{up}"]

[[routes]]
name = "public"
path_prefix = "/api/v1/public/"
upstream = "app"
auth = "public"
rate_limit = {{ name = "five-per-minute", key = "ip", per_minute = 1, burst = 5 }}

[[routes]]
name = "refill"
path_prefix = "/api/v1/refill/"
upstream = "app"
auth = "public"
rate_limit = {{ key = "ip", per_second = 4, burst = 1 }}

[[routes]]
name = "api"
path_prefix = "/api/v1/"
upstream = "app"
auth = "jwt"
rate_limits = [
  {{ name = "per-user", key = "user", per_minute = 1, burst = 3 }},
  {{ name = "per-tenant", key = "tenant", per_minute = 1, burst = 5 }},
]
"#,
            up = up.addr,
            store = b.toml(),
        ),
        &[("G2D_RL_SECRET", SECRET)],
        &[],
    )
}

fn get(gw: &Gateway, path: &str, headers: &[String]) -> Response {
    let mut raw = format!("GET {path} HTTP/1.1\r\nHost: t\r\n");
    for h in headers {
        raw.push_str(h);
        raw.push_str("\r\n");
    }
    raw.push_str("\r\n");
    gw.send(raw.as_bytes())
}

fn as_user(gw: &Gateway, tenant: &str, user: &str) -> Response {
    get(
        gw,
        "/api/v1/calls",
        &[format!("Authorization: Bearer {}", token(tenant, user))],
    )
}

fn burst_then_429_with_headers(b: &Backend) {
    let up = Upstream::start();
    let gw = gateway(b, &up, "");
    for i in 0..5 {
        assert_eq!(
            get(&gw, "/api/v1/public/x", &[]).status,
            200,
            "request {}",
            i + 1
        );
    }
    let r = get(&gw, "/api/v1/public/x", &[]);
    r.assert_envelope(429, "rate limit exceeded");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"five-per-minute\";q=5;w=300")
    );
    assert_eq!(
        r.header("ratelimit"),
        Some(format!("\"five-per-minute\";r=0;t={retry}").as_str())
    );
    // Deterministic: it stays refused.
    assert_eq!(get(&gw, "/api/v1/public/x", &[]).status, 429);
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), 5);
    let m = parse_metrics(&gw.metrics());
    assert_eq!(
        m.get(r#"gateway_rate_limited_total{policy="five-per-minute",route="public"}"#),
        Some(&2.0)
    );
}

fn users_and_tenants_have_their_own_quotas(b: &Backend) {
    let up = Upstream::start();
    let gw = gateway(b, &up, "");
    // Per user: three each.
    for _ in 0..3 {
        assert_eq!(as_user(&gw, "t1", "alice").status, 200);
    }
    let r = as_user(&gw, "t1", "alice");
    r.assert_envelope(429, "rate limit exceeded");
    assert!(r
        .header("ratelimit")
        .unwrap()
        .starts_with("\"per-user\";r=0;"));
    // Bob shares alice's tenant: the tenant's quota of five has two left.
    assert_eq!(as_user(&gw, "t1", "bob").status, 200);
    assert_eq!(as_user(&gw, "t1", "bob").status, 200);
    let r = as_user(&gw, "t1", "bob");
    r.assert_envelope(429, "rate limit exceeded");
    assert!(r
        .header("ratelimit")
        .unwrap()
        .starts_with("\"per-tenant\";r=0;"));
    // Another tenant is unaffected.
    assert_eq!(as_user(&gw, "t2", "carol").status, 200);
}

fn gateway_with_server(b: &Backend, up: &Upstream, server: &str, extra: &str) -> Gateway {
    Gateway::start_full(
        server,
        &format!(
            r#"
{extra}
{store}

[[upstreams]]
name = "app"
servers = ["{up}"]

[[routes]]
name = "public"
path_prefix = "/api/v1/public/"
upstream = "app"
auth = "public"
rate_limit = {{ name = "by-ip", key = "ip", per_minute = 1, burst = 2 }}
"#,
            up = up.addr,
            store = b.toml(),
        ),
        &[],
        &[],
    )
}

fn forwarded_for_is_ignored_from_untrusted_peers(b: &Backend) {
    let up = Upstream::start();
    let gw = gateway_with_server(b, &up, "", "");
    // A client cannot pick a fresh key by sending headers.
    for i in 0..2 {
        let xff = format!("X-Forwarded-For: 203.0.113.{i}");
        let r = get(&gw, "/api/v1/public/x", &[xff]);
        assert_eq!(r.status, 200);
        // And the upstream is told the real peer, not the forged chain.
        assert!(
            r.text()
                .to_ascii_lowercase()
                .contains("x-forwarded-for: 127.0.0.1\r\n"),
            "{}",
            r.text()
        );
    }
    let r = get(
        &gw,
        "/api/v1/public/x",
        &["X-Forwarded-For: 198.51.100.7".into()],
    );
    assert_eq!(r.status, 429);
}

fn forwarded_for_is_honoured_from_trusted_proxies(b: &Backend) {
    let up = Upstream::start();
    // The test talks from 127.0.0.1, which is trusted here: it plays the load balancer.
    let gw = gateway_with_server(b, &up, "trusted_proxies = [\"127.0.0.1\"]", "");
    let from = |chain: &str| {
        get(
            &gw,
            "/api/v1/public/x",
            &[format!("X-Forwarded-For: {chain}")],
        )
    };
    assert_eq!(from("203.0.113.1").status, 200);
    let r = from("203.0.113.1");
    assert_eq!(r.status, 200);
    let seen = r.text().to_ascii_lowercase();
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.1, 127.0.0.1\r\n"),
        "{seen}"
    );
    assert_eq!(from("203.0.113.1").status, 429, "same client, quota spent");
    // A client-forged left part does not change the key: the right-most untrusted hop counts.
    assert_eq!(from("6.6.6.6, 203.0.113.1").status, 429);
    assert_eq!(
        from("203.0.113.2").status,
        200,
        "another client has its own quota"
    );
    // Without the header the proxy itself is the client.
    assert_eq!(get(&gw, "/api/v1/public/x", &[]).status, 200);
}

fn the_limit_refills_after_its_period(b: &Backend) {
    let up = Upstream::start();
    let gw = gateway(b, &up, "");
    assert_eq!(get(&gw, "/api/v1/refill/x", &[]).status, 200);
    let r = get(&gw, "/api/v1/refill/x", &[]);
    r.assert_envelope(429, "rate limit exceeded");
    assert_eq!(
        r.header("retry-after"),
        Some("1"),
        "250 ms rounds up to one second"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(&gw, "/api/v1/refill/x", &[]).status, 200);
}

fn allowed_answers_carry_ratelimit_headers_when_configured(b: &Backend) {
    let up = Upstream::start();
    let gw = gateway_with_server(b, &up, "", "[limits]\nheaders_on_success = true");
    let r = get(&gw, "/api/v1/public/x", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ratelimit-policy"), Some("\"by-ip\";q=2;w=120"));
    assert_eq!(r.header("ratelimit"), Some("\"by-ip\";r=1;t=60"));
    // Off by default.
    let gw = gateway_with_server(b, &up, "", "");
    assert_eq!(get(&gw, "/api/v1/public/x", &[]).header("ratelimit"), None);
}

every_store!(
    burst_then_429_with_headers,
    users_and_tenants_have_their_own_quotas,
    forwarded_for_is_ignored_from_untrusted_peers,
    forwarded_for_is_honoured_from_trusted_proxies,
    the_limit_refills_after_its_period,
    allowed_answers_carry_ratelimit_headers_when_configured,
);
