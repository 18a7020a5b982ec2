//! Redis deployments that move under a running gateway: a Redis Cluster master killed and a
//! Sentinel master failed over in the middle of a run of login guesses and API requests. No
//! request fails, the 10-guess bound holds, and the gateway follows the new topology by itself.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::redis::{Backend, RedisCluster, RedisSentinel};
use common::upstream::{Upstream, RIGHT_PASSWORD};
use common::{get, login, Gateway};

const VICTIM: &str = "victim@example.com";

/// A gateway with the login guard (upstream `logins`) and a per-IP limited API route (upstream
/// `api`), its store in `backend`.
fn gateway(backend: &Backend, logins: &Upstream, api: &Upstream) -> Gateway {
    Gateway::start(&format!(
        r#"
{store}
lockout_timeout_ms = 1000

[[upstreams]]
name = "control"
servers = ["{logins}"]

[[upstreams]]
name = "api"
servers = ["{api}"]

{login}

[[routes]]
name = "limited"
path_prefix = "/api/v1/limited/"
upstream = "api"
auth = "public"
rate_limits = [
  {{ name = "burst", key = "ip", per_second = 1000, burst = 1000 }},
  {{ name = "sustained", key = "ip", per_minute = 6000, burst = 1000 }},
]
"#,
        store = backend.toml(),
        logins = logins.addr,
        api = api.addr,
        login = common::login_route("control", ""),
    ))
}

fn ready(gw: &Gateway) -> serde_json::Value {
    let r = common::request(gw.admin, &get("/readyz"));
    serde_json::from_str(&r.text()).unwrap_or_default()
}

/// Sends 30 wrong guesses for the victim, each followed by an API request, and calls `fault`
/// after the fourth; every answer must be correct (401 or the lock; 200 for the API).
fn run_through(gw: &Gateway, logins: &Upstream, mut fault: impl FnMut()) {
    for i in 0..30 {
        if i == 4 {
            fault();
        }
        let r = login(gw, VICTIM, &format!("wrong-{i}"));
        if r.status != 401 {
            r.assert_envelope(403, "account temporarily locked");
        }
        let a = gw.get(&format!("/api/v1/limited/{i}"));
        assert_eq!(a.status, 200, "API request {i}: {}", a.text());
    }
    let reached = logins.hits.load(Ordering::SeqCst);
    assert!(reached <= 10, "{reached} guesses reached the upstream");
    assert_eq!(reached, 10, "the lock came early: {reached} guesses");
}

/// Waits until `/readyz` says the gateway uses Redis again and `check` holds for what it saw.
fn wait_ready(gw: &Gateway, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = ready(gw);
        if r["data"]["status"] == "ready" && check(&r["data"]["store"]) {
            return;
        }
        assert!(Instant::now() < deadline, "never back on Redis: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_cluster_master_dies_mid_run() {
    let mut backend = Backend::Cluster(RedisCluster::start(3, 1));
    let (logins, api) = (Upstream::start(), Upstream::start());
    let gw = gateway(&backend, &logins, &api);
    let Backend::Cluster(cluster) = &mut backend else {
        unreachable!()
    };
    wait_ready(&gw, |s| s["kind"] == "redis-cluster" && s["masters"] == 3);
    // The master that holds the victim's lockout keys (their hash tag is the email).
    let owner = cluster.master_of(&format!("{{{VICTIM}}}"));
    let port = cluster.nodes[owner].port;
    run_through(&gw, &logins, || cluster.nodes[owner].kill());
    cluster.wait_failed_over(port);
    // The promoted replica now holds the slot; the gateway finds it and its lock.
    wait_ready(&gw, |s| s["masters"] == 3 && s["replicas"] == 2);
    login(&gw, VICTIM, RIGHT_PASSWORD).assert_envelope(403, "account temporarily locked");
    let new_owner = cluster.master_of(&format!("{{{VICTIM}}}"));
    assert_ne!(cluster.nodes[new_owner].port, port);
    assert!(
        !cluster.nodes[new_owner]
            .keys(&format!("g2d:lo:{{{VICTIM}}}:*"))
            .is_empty(),
        "the lock is in the promoted master"
    );
}

#[test]
fn a_sentinel_failover_mid_run() {
    let mut backend = Backend::Sentinel(RedisSentinel::start());
    let (logins, api) = (Upstream::start(), Upstream::start());
    let gw = gateway(&backend, &logins, &api);
    let Backend::Sentinel(sentinel) = &mut backend else {
        unreachable!()
    };
    let (old, new) = (sentinel.master.port, sentinel.replica.port);
    wait_ready(&gw, |s| {
        s["kind"] == "redis-sentinel" && s["master"] == format!("127.0.0.1:{old}")
    });
    run_through(&gw, &logins, || sentinel.master.kill());
    sentinel.kill_master_and_wait();
    wait_ready(&gw, |s| s["master"] == format!("127.0.0.1:{new}"));
    login(&gw, VICTIM, RIGHT_PASSWORD).assert_envelope(403, "account temporarily locked");
    assert!(
        !sentinel
            .replica
            .keys(&format!("g2d:lo:{{{VICTIM}}}:*"))
            .is_empty(),
        "the lock is in the promoted master"
    );
}
