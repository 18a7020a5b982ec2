//! Many replicas, one truth: two gateway processes sharing one Redis, Redis dying and coming back
//! under load, and the Redis deployments ops run (password, ACL user, TLS).

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::upstream::{Upstream, RIGHT_PASSWORD};
use common::{get, login, parse_metrics, Gateway, Response};

/// A gateway with a login route and a rate-limited route, its store in Redis at `url`.
fn replica(up: &Upstream, store: &str, env: &[(&str, &str)], files: &[(&str, &str)]) -> Gateway {
    Gateway::start_with(
        &format!(
            r#"
[store]
kind = "redis"
{store}

[[upstreams]]
name = "control"
servers = ["{up}"]

{login}

[[routes]]
name = "limited"
path_prefix = "/api/v1/limited/"
upstream = "control"
auth = "public"
rate_limit = {{ name = "shared", key = "ip", per_minute = 1, burst = 6 }}
"#,
            up = up.addr,
            login = common::login_route("control", ""),
        ),
        env,
        files,
    )
}

fn plain(up: &Upstream, redis: &RedisServer) -> Gateway {
    replica(
        up,
        &format!("redis_url = \"{}\"\ntimeout_ms = 50", redis.url()),
        &[],
        &[],
    )
}

fn metric(gw: &Gateway, series: &str) -> f64 {
    parse_metrics(&gw.metrics())
        .get(series)
        .copied()
        .unwrap_or(0.0)
}

#[test]
fn two_replicas_share_the_ten_guess_bound_and_the_quota() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let a = Arc::new(plain(&up, &redis));
    let b = Arc::new(plain(&up, &redis));

    // 100 parallel wrong guesses for one email, split between both replicas.
    let handles: Vec<_> = (0..100)
        .map(|i| {
            let gw = if i % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || login(&gw, "shared@example.com", &format!("wrong-{i}")))
        })
        .collect();
    let answers: Vec<Response> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let reached = up.hits.load(Ordering::SeqCst);
    assert!(
        reached <= 10,
        "the upstream saw {reached} guesses across two replicas"
    );
    assert_eq!(answers.iter().filter(|r| r.status == 401).count(), reached);
    assert_eq!(
        answers.iter().filter(|r| r.status == 403).count(),
        100 - reached
    );
    // Locked on both.
    for gw in [&a, &b] {
        login(gw, "shared@example.com", "right-password")
            .assert_envelope(403, "account temporarily locked");
    }

    // One quota per key: 6 requests in all pass, split 3 + 3, then both refuse.
    let before = up.hits.load(Ordering::SeqCst);
    for gw in [&a, &b, &a, &b, &a, &b] {
        assert_eq!(gw.get("/api/v1/limited/x").status, 200);
    }
    a.get("/api/v1/limited/x")
        .assert_envelope(429, "rate limit exceeded");
    b.get("/api/v1/limited/x")
        .assert_envelope(429, "rate limit exceeded");
    assert_eq!(up.hits.load(Ordering::SeqCst) - before, 6);
    assert_eq!(metric(&a, "gateway_store_fallbacks_total"), 0.0);
    assert_eq!(metric(&b, "gateway_store_fallbacks_total"), 0.0);
}

#[test]
fn redis_dying_never_fails_a_request_and_recovery_is_automatic() {
    let mut redis = RedisServer::start();
    let up = Upstream::start();
    let gw = plain(&up, &redis);
    let ready = |gw: &Gateway| common::request(gw.admin, &get("/readyz")).text();

    assert!(ready(&gw).contains("\"ready\""));
    let mut statuses = Vec::new();
    for i in 0..60 {
        if i == 20 {
            redis.kill();
        }
        // Every request gets a correct answer: the limited route allows 6 per minute per
        // client, the login route answers the upstream's 401 or the lock.
        let r = if i % 2 == 0 {
            gw.get("/api/v1/limited/x")
        } else {
            login(&gw, &format!("user{i}@example.com"), "wrong")
        };
        if r.status >= 400 {
            assert!(
                r.text().starts_with(r#"{"status":"error","#),
                "request {i}: {}",
                r.text()
            );
        }
        assert!(
            matches!(r.status, 200 | 401 | 429),
            "request {i} got {}: {}",
            r.status,
            r.text()
        );
        statuses.push(r.status);
    }
    assert!(metric(&gw, "gateway_store_fallbacks_total") > 0.0);
    assert_eq!(metric(&gw, "gateway_store_degraded"), 1.0);
    assert!(ready(&gw).contains("degraded"), "{}", ready(&gw));

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready(&gw).contains("\"ready\"") {
        assert!(
            Instant::now() < deadline,
            "the gateway never returned to Redis"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(metric(&gw, "gateway_store_degraded"), 0.0);
    let fallbacks = metric(&gw, "gateway_store_fallbacks_total");
    assert_eq!(gw.get("/api/v1/limited/y").status, 200);
    assert_eq!(metric(&gw, "gateway_store_fallbacks_total"), fallbacks);
    assert!(
        !redis.keys("g2d:rl:*").is_empty(),
        "the limiter writes to Redis again"
    );
}

#[test]
fn redis_down_at_start_serves_from_memory() {
    let redis = RedisServer::start();
    let port = redis.port;
    drop(redis);
    let up = Upstream::start();
    let gw = replica(
        &up,
        &format!("redis_url = \"redis://127.0.0.1:{port}\"\ntimeout_ms = 50"),
        &[],
        &[],
    );
    for _ in 0..6 {
        assert_eq!(gw.get("/api/v1/limited/x").status, 200);
    }
    gw.get("/api/v1/limited/x")
        .assert_envelope(429, "rate limit exceeded");
    assert!(metric(&gw, "gateway_store_fallbacks_total") >= 7.0);
}

#[test]
fn password_and_acl_users() {
    let up = Upstream::start();
    // requirepass: the URL comes from the environment, never from the config file.
    let redis = RedisServer::start_with(&["--requirepass", "s3cret-pass"], Some("s3cret-pass"));
    let gw = replica(
        &up,
        "redis_url = \"env:G2D_REDIS_URL\"\ntimeout_ms = 200",
        &[("G2D_REDIS_URL", &redis.url())],
        &[],
    );
    assert_eq!(gw.get("/api/v1/limited/x").status, 200);
    assert_eq!(metric(&gw, "gateway_store_fallbacks_total"), 0.0);
    assert!(redis.scripts_run() > 0);

    // An ACL user allowed only what the gateway needs, under its key prefix.
    let acl = RedisServer::start_with(
        &[
            "--user",
            "default",
            "off",
            "--user",
            "gateway",
            "on",
            ">gw-pass",
            "~g2d:*",
            "+evalsha",
            "+script|load",
            "+ping",
            "+time",
            "+get",
            "+set",
            "+del",
            "+hmget",
            "+hset",
            "+hdel",
            "+zadd",
            "+zcard",
            "+zrem",
            "+zremrangebyscore",
            "+pexpire",
            "+pexpireat",
        ],
        None,
    );
    let url = format!("redis://gateway:gw-pass@127.0.0.1:{}", acl.port);
    let gw = replica(
        &up,
        "redis_url = \"file:redis.url\"\ntimeout_ms = 200",
        &[],
        &[("redis.url", &format!("{url}\n"))],
    );
    assert_eq!(gw.get("/api/v1/limited/x").status, 200);
    assert_eq!(login(&gw, "acl@example.com", "wrong").status, 401);
    assert_eq!(metric(&gw, "gateway_store_fallbacks_total"), 0.0);
}

#[test]
fn credentials_in_the_config_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        "[store]\nkind = \"redis\"\nredis_url = \"redis://:hunter2@127.0.0.1:6379\"\n\
         [[upstreams]]\nname = \"a\"\nservers = [\"127.0.0.1:1\"]\n\
         [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"a\"\nauth = \"public\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_get2dial-gateway"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("store.redis_url"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn tls_with_a_private_ca() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = params.signed_by(&key, &ca).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let cert_file = file("server.crt", &cert.pem());
    let key_file = file("server.key", &key.serialize_pem());
    let ca_pem = ca.pem();
    let ca_file = file("ca.crt", &ca_pem);

    let tls_port = common::free_port();
    let tls_port_s = tls_port.to_string();
    let redis = RedisServer::start_with(
        &[
            "--port",
            "0",
            "--tls-port",
            &tls_port_s,
            "--tls-cert-file",
            &cert_file,
            "--tls-key-file",
            &key_file,
            "--tls-ca-cert-file",
            &ca_file,
            "--tls-auth-clients",
            "no",
        ],
        None,
    );
    let _keep = &redis;
    let up = Upstream::start();
    let gw = replica(
        &up,
        &format!(
            "redis_url = \"rediss://localhost:{tls_port}\"\nca_file = \"ca.crt\"\ntimeout_ms = 500"
        ),
        &[],
        &[("ca.crt", &ca_pem)],
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert_eq!(gw.get("/api/v1/limited/x").status, 200);
        if metric(&gw, "gateway_store_degraded") == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "TLS connection to Redis never came up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let fallbacks = metric(&gw, "gateway_store_fallbacks_total");
    assert_eq!(login(&gw, "tls@example.com", "wrong").status, 401);
    assert_eq!(
        metric(&gw, "gateway_store_fallbacks_total"),
        fallbacks,
        "served by Redis over TLS"
    );
}

#[test]
fn a_redis_outage_never_unlocks_and_counts_on_from_what_was_seen() {
    let mut redis = RedisServer::start();
    let up = Upstream::start();
    let (a, b) = (plain(&up, &redis), plain(&up, &redis));
    // Locked through Redis by guesses on `a`; `b` meets the lock once.
    for i in 0..10 {
        assert_eq!(
            login(&a, "locked@example.com", &format!("w{i}")).status,
            401
        );
    }
    login(&b, "locked@example.com", RIGHT_PASSWORD)
        .assert_envelope(403, "account temporarily locked");
    // Six failures on another account, through `a`.
    for i in 0..6 {
        assert_eq!(
            login(&a, "counted@example.com", &format!("w{i}")).status,
            401
        );
    }
    redis.kill();
    let before = up.hits.load(Ordering::SeqCst);
    // Neither replica forgets the lock it saw.
    for gw in [&a, &b] {
        login(gw, "locked@example.com", RIGHT_PASSWORD)
            .assert_envelope(403, "account temporarily locked");
    }
    // `a` counts on from the six it saw: four more guesses, then the lock.
    for i in 0..8 {
        let r = login(&a, "counted@example.com", &format!("x{i}"));
        if i < 4 {
            assert_eq!(r.status, 401, "guess {i}: {}", r.text());
        } else {
            r.assert_envelope(403, "account temporarily locked");
        }
    }
    assert_eq!(up.hits.load(Ordering::SeqCst) - before, 4);
    assert_eq!(metric(&a, "gateway_store_degraded"), 1.0);

    // Redis comes back empty (a restart without persistence): the locks still hold on `a`.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&a, "gateway_store_degraded") != 0.0 {
        assert!(Instant::now() < deadline, "never back on Redis");
        std::thread::sleep(Duration::from_millis(100));
    }
    for email in ["locked@example.com", "counted@example.com"] {
        login(&a, email, RIGHT_PASSWORD).assert_envelope(403, "account temporarily locked");
    }
    assert_eq!(up.hits.load(Ordering::SeqCst) - before, 4);
}

#[test]
fn leased_limits_never_overshoot_across_three_replicas() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    // 200 per hour: nothing refills while the test runs. Slices of 20 units (a tenth of the
    // burst), leases of 300 ms.
    let store = format!(
        "redis_url = \"{}\"\ntimeout_ms = 200\nlease_units = 20\nlease_share = 0.1\nlease_ms = 300",
        redis.url()
    );
    let config = |store: &str| {
        format!(
            r#"
[store]
kind = "redis"
{store}

[[upstreams]]
name = "control"
servers = ["{up}"]

[[routes]]
name = "leased"
path_prefix = "/api/v1/leased/"
upstream = "control"
auth = "public"
rate_limit = {{ name = "hourly", key = "ip", per_hour = 200, burst = 200 }}
"#,
            up = up.addr
        )
    };
    let replicas: Vec<Arc<Gateway>> = (0..3)
        .map(|_| Arc::new(Gateway::start(&config(&store))))
        .collect();
    let scripts_before = redis.scripts_run();
    // Three clients at once, one per replica, 150 requests each: 450 for 200 units.
    let handles: Vec<_> = replicas
        .iter()
        .map(|gw| {
            let gw = gw.clone();
            std::thread::spawn(move || {
                (0..150)
                    .map(|i| gw.get(&format!("/api/v1/leased/{i}")).status)
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let statuses: Vec<u16> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let allowed = statuses.iter().filter(|s| **s == 200).count();
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429));
    assert_eq!(up.hits.load(Ordering::SeqCst), allowed);
    // Never over the limit; at most (replicas - 1) x (slice - 1) = 38 under it.
    assert!(
        (162..=200).contains(&allowed),
        "{allowed} of 200 allowed across three replicas"
    );
    let spent: f64 = replicas
        .iter()
        .map(|gw| metric(gw, "gateway_store_lease_units_total{event=\"spent\"}"))
        .sum();
    assert!(
        spent > 100.0,
        "only {spent} checks were answered from a lease"
    );
    let round_trips = redis.scripts_run() - scripts_before;
    assert!(
        round_trips < 450 / 3,
        "{round_trips} Redis scripts for 450 checks"
    );

    // After a lease period the unspent units are back in Redis: the whole quota, exactly.
    std::thread::sleep(Duration::from_millis(1000));
    let mut more = 0;
    for i in 0..60 {
        if replicas[i % 3].get("/api/v1/leased/x").status == 200 {
            more += 1;
        }
    }
    assert_eq!(allowed + more, 200, "{allowed} + {more} allowed in all");
}
