//! Ready for operations: reload under load, the access log, Prometheus rules and metrics checked
//! with promtool, the Grafana dashboard against a real scrape, and the deploy files.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::upstream::Upstream;
use common::{get, parse_metrics, Conn, Gateway};
use serde::Deserialize;

fn routes(up: &Upstream, extra: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "app"
servers = ["{up}"]
read_timeout_ms = 3000

[[routes]]
name = "app"
path_prefix = "/u/"
upstream = "app"
auth = "public"
{extra}
"#,
        up = up.addr
    )
}

/// The `[server]` key that turns admin actions on, and the token it reads.
const ADMIN_TOKEN_KEY: &str = "admin_token = \"env:G2D_ADMIN_TOKEN\"";
const ADMIN_TOKEN: &str = "ops-admin-token-0123456789abcdef";

/// `POST /-/reload` with the admin token.
fn reload_request() -> Vec<u8> {
    format!(
        "POST /-/reload HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

#[test]
fn series_that_alerts_read_exist_at_zero_from_the_start() {
    let up = Upstream::start();
    let gw = Gateway::start(&routes(&up, ""));
    let m = parse_metrics(&gw.metrics());
    for series in [
        r#"gateway_config_reloads_total{result="failure"}"#,
        r#"gateway_config_reloads_total{result="success"}"#,
        r#"gateway_login_attempts_total{outcome="locked"}"#,
        r#"gateway_request_heads_refused_total{reason="timeout"}"#,
    ] {
        assert_eq!(m.get(series), Some(&0.0), "{series}");
    }
    assert_eq!(m.get("gateway_config_last_reload_successful"), Some(&1.0));
    assert!(m
        .get("process_resident_memory_bytes")
        .is_some_and(|v| *v > 1e6));
    // A refused reload turns the gauge to 0 and counts from 0 to 1.
    gw.rewrite_config("[[routes]]\nname = \"broken\"\n");
    gw.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = parse_metrics(&gw.metrics());
        if m.get(r#"gateway_config_reloads_total{result="failure"}"#) == Some(&1.0) {
            assert_eq!(m.get("gateway_config_last_reload_successful"), Some(&0.0));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the refused reload was not counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn admin_actions_are_off_without_a_token() {
    let up = Upstream::start();
    let gw = Gateway::start(&routes(&up, ""));
    let r = common::request(gw.admin, &reload_request());
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("admin_token"), "{}", r.text());
    // Reads stay open on the admin listener.
    assert_eq!(common::request(gw.admin, &get("/metrics")).status, 200);
}

/// The admin listener's error: `status` and exactly the envelope with `message`.
fn admin_error(r: &common::Response, status: u16, message: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(
        r.text(),
        format!(r#"{{"status":"error","message":"{message}"}}"#)
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
}

/// An admin request with the token (`token: false`: without), `body` sent as JSON.
fn admin_request(method: &str, path: &str, token: bool, body: &str) -> Vec<u8> {
    let auth = if token {
        format!("Authorization: Bearer {ADMIN_TOKEN}\r\n")
    } else {
        String::new()
    };
    format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn admin_shows_config_upstreams_and_changes_the_log_level_with_the_token() {
    let up = Upstream::start();
    // A Redis URL with a password (nothing listens there: the store runs degraded).
    let redis_url = format!("redis://:s3cret-pw@127.0.0.1:{}/0", common::closed_port());
    let store = "[store]\nkind = \"redis\"\nredis_url = \"env:G2D_REDIS_URL\"\n";
    let gw = Gateway::start_full(
        ADMIN_TOKEN_KEY,
        &format!("{}\n{store}", routes(&up, "")),
        &[
            ("G2D_ADMIN_TOKEN", ADMIN_TOKEN),
            ("G2D_REDIS_URL", &redis_url),
        ],
        &[],
    );
    let admin = |method: &str, path: &str, token: bool, body: &str| {
        common::request(gw.admin, &admin_request(method, path, token, body))
    };

    // The config in force: every default filled in, the URL's password redacted; token only.
    let r = admin("GET", "/-/config", false, "");
    admin_error(&r, 401, "missing or invalid authorization header");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = admin("GET", "/-/config", true, "");
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let config = &v["data"]["config"];
    assert_eq!(v["status"], "success");
    assert!(v["data"]["file"]
        .as_str()
        .unwrap()
        .ends_with("gateway.toml"));
    assert_eq!(config["routes"][0]["name"], "app");
    assert_eq!(
        config["lockout"]["max_entries"], 100000,
        "defaults are shown"
    );
    assert_eq!(config["server"]["admin_token"], "env:G2D_ADMIN_TOKEN");
    assert_eq!(config["store"]["redis_url"], "env:G2D_REDIS_URL");
    assert!(!r.text().contains("s3cret") && !r.text().contains(ADMIN_TOKEN));

    // Each server as the balancer sees it.
    let r = admin("GET", "/-/upstreams", false, "");
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let server = &v["data"]["upstreams"][0]["servers"][0];
    assert_eq!(v["data"]["upstreams"][0]["name"], "app");
    assert_eq!(server["address"], up.addr.to_string());
    assert_eq!(server["in_rotation"], true);
    assert_eq!(server["ejected_for_seconds"], serde_json::Value::Null);

    // The log level: read openly, changed with the token, bad input refused with a reason.
    let r = admin("GET", "/-/log-level", false, "");
    assert!(r.text().contains(r#""level":"error""#), "{}", r.text());
    let bad_chunk =
        b"POST /u/ok HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n";
    assert_eq!(common::request(gw.addr, bad_chunk).status, 400);
    admin_error(
        &admin("PUT", "/-/log-level", false, r#"{"level":"debug"}"#),
        401,
        "missing or invalid authorization header",
    );
    for (body, why) in [
        (r#"{"level":"[[["}"#, "level: "),
        (r#"{"nope":"debug"}"#, "body must be"),
        ("debug", "body must be"),
    ] {
        let r = admin("PUT", "/-/log-level", true, body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(r.text().contains(why), "{body}: {}", r.text());
    }
    let r = admin(
        "PUT",
        "/-/log-level",
        true,
        &format!(r#"{{"level":"{}"}}"#, "x".repeat(5000)),
    );
    admin_error(&r, 413, "body larger than 4096 bytes");
    let r = admin("PUT", "/-/log-level", true, r#"{"level":"debug"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains(r#""level":"debug,redis=error""#),
        "{}",
        r.text()
    );
    let before = gw.log();
    assert!(!before.contains("request ended by the client"), "{before}");
    assert_eq!(common::request(gw.addr, bad_chunk).status, 400);
    let log = gw.log_when(|l| l.contains("request ended by the client"));
    assert!(
        log.contains("log level changed over the admin port"),
        "{log}"
    );
    assert!(
        log.contains("DEBUG"),
        "Pingora's own debug lines follow too: {log}"
    );

    // Known paths name their methods; the rest is 404, all as envelopes.
    let r = admin("DELETE", "/-/config", true, "");
    admin_error(&r, 405, "method not allowed");
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    admin_error(&admin("GET", "/-/nothing", true, ""), 404, "not found");
}

fn metric(gw: &Gateway, series: &str) -> f64 {
    parse_metrics(&gw.metrics())
        .get(series)
        .copied()
        .unwrap_or(0.0)
}

#[test]
fn reload_under_load_drops_nothing_and_refuses_bad_files() {
    let up = Upstream::start();
    let gw = Arc::new(Gateway::start_full(
        ADMIN_TOKEN_KEY,
        &routes(&up, ""),
        &[("G2D_ADMIN_TOKEN", ADMIN_TOKEN)],
        &[],
    ));

    // Steady load on keep-alive and fresh connections while the configuration changes.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (gw, stop, sent, failed) = (gw.clone(), stop.clone(), sent.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut conn = Conn::open(gw.addr);
                while !stop.load(Ordering::SeqCst) {
                    let r = if w % 2 == 0 {
                        conn.try_send(&get("/u/ok"))
                    } else {
                        common::try_request(gw.addr, &get("/u/ok"))
                    };
                    sent.fetch_add(1, Ordering::SeqCst);
                    if !r.is_ok_and(|r| r.status == 200) {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    // A slow request in flight across the reloads finishes under the rules it started with.
    let slow = {
        let gw = gw.clone();
        std::thread::spawn(move || gw.get("/u/slow-headers").status)
    };

    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(gw.get("/v/ok").status, 404);
    // 1. A new route, by SIGHUP.
    gw.rewrite_config(&routes(
        &up,
        "[[routes]]\nname = \"v\"\npath_prefix = \"/v/\"\nupstream = \"app\"\nauth = \"public\"\n",
    ));
    gw.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.get("/v/ok").status != 404
        || metric(&gw, r#"gateway_config_reloads_total{result="success"}"#) < 1.0
    {
        assert!(Instant::now() < deadline, "SIGHUP reload never took effect");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        common::try_request(gw.addr, &get("/v/ok")).unwrap().status,
        404,
        "the upstream has no /v/ok: it answers, not the gateway"
    );

    // 2. A broken file is refused and the running configuration stays.
    gw.rewrite_config("[[routes]]\nname = \"broken\"\n");
    gw.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&gw, r#"gateway_config_reloads_total{result="failure"}"#) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the refused reload was not counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(gw.get("/u/ok").status, 200);
    let log = gw.log_when(|l| l.contains("configuration reload refused"));
    assert!(log.contains("configuration reload refused"), "{log}");

    // 3. The admin endpoint reloads too, for the admin token only, and reports why a file is
    //    refused.
    for auth in [
        "",
        "Authorization: Bearer wrong-token-0123456789\r\n",
        "Authorization: Basic x\r\n",
    ] {
        let r = common::request(
            gw.admin,
            format!("POST /-/reload HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: 0\r\n\r\n")
                .as_bytes(),
        );
        assert_eq!(r.status, 401, "{auth}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    let post = |gw: &Gateway| common::request(gw.admin, &reload_request());
    let r = post(&gw);
    assert_eq!(r.status, 422);
    assert!(
        r.text().contains("gateway.toml") && r.text().contains("upstream"),
        "{}",
        r.text()
    );
    gw.rewrite_config(&routes(
        &up,
        "rate_limit = { key = \"ip\", per_minute = 1, burst = 1000 }",
    ));
    let r = post(&gw);
    assert_eq!(r.status, 200, "{}", r.text());

    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(slow.join().unwrap(), 200, "the in-flight request finished");
    let (sent, failed) = (sent.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert!(sent > 100, "only {sent} requests sent");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed across three reloads"
    );
    assert_eq!(
        metric(&gw, r#"gateway_config_reloads_total{result="success"}"#),
        2.0
    );
    assert_eq!(
        metric(&gw, r#"gateway_config_reloads_total{result="failure"}"#),
        2.0
    );
    eprintln!("reload under load: {sent} requests, {failed} failed");
}

#[test]
fn access_log_is_one_json_line_per_request_without_secrets() {
    let up = Upstream::start();
    let secret = "ops-test-secret-0123456789abcdef";
    let gw = Gateway::start_with(
        &format!(
            "[log]\nformat = \"json\"\n\n[jwt]\nsecrets = [\"env:G2D_OPS_SECRET\"]\n{}\n\
             [[routes]]\nname = \"ws\"\npath_prefix = \"/ws/\"\nupstream = \"app\"\nauth = \"jwt_query\"\n",
            routes(&up, "")
        ),
        &[("G2D_OPS_SECRET", secret), ("RUST_LOG", "error,access=info")],
        &[],
    );
    let long_agent = "a".repeat(1000);
    let r = gw.send(
        format!(
            "GET /u/ok?x=1 HTTP/1.1\r\nHost: t\r\nX-Request-Id: log-test-1\r\nUser-Agent: {long_agent}\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200);
    gw.get("/ws/agent?token=secret-token-value");
    gw.get("/nowhere");
    // Credentials where a client may put them in what is logged: the path, the user agent.
    let jwt_path = "/nowhere/eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2VjcmV0LXBhdGgtc2ln";
    let r = gw.send(
        format!("GET {jwt_path} HTTP/1.1\r\nHost: t\r\nUser-Agent: probe Bearer ua-secret-credential\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(r.status, 404);
    // A client's fault: a body that is not chunked as it says (400).
    let bad = gw.send(
        b"POST /u/ok HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    );
    assert_eq!(bad.status, 400);
    // Lines are written by the log thread: wait for all five.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (log, lines) = loop {
        let log = gw.log();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &serde_json::Value| v["target"] == "access")
            .collect();
        if lines.len() >= 5 || std::time::Instant::now() > deadline {
            break (log, lines);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(lines.len(), 5, "{log}");
    // Client faults are not errors of the gateway: no ERROR line for them.
    assert!(!log.contains("\"level\":\"ERROR\""), "{log}");
    // Lines are written after each answer went out, so their order may differ from the requests'.
    let by_path = |p: &str| {
        lines
            .iter()
            .find(|l| l["path"] == p)
            .unwrap_or_else(|| panic!("no line for {p}: {log}"))
    };
    let first = by_path("/u/ok");
    for field in [
        "timestamp",
        "request_id",
        "route",
        "method",
        "path",
        "status",
        "upstream",
        "duration_ms",
        "bytes",
        "client_ip",
        "auth",
        "server",
        "ttfb_ms",
        "retries",
        "bytes_in",
        "user_agent",
    ] {
        assert!(!first[field].is_null(), "missing {field}: {first}");
    }
    assert_eq!(first["server"], up.addr.to_string());
    assert_eq!(first["retries"], 0);
    assert_eq!(first["user_agent"].as_str().map(str::len), Some(256));
    assert_eq!(first["request_id"], "log-test-1");
    assert_eq!(first["path"], "/u/ok");
    assert_eq!(first["status"], 200);
    assert_eq!(first["upstream"], "app");
    assert_eq!(first["client_ip"], "127.0.0.1");
    assert_eq!(by_path("/ws/agent")["status"], 401);
    assert_eq!(by_path("/ws/agent")["auth"], "malformed");
    assert_eq!(by_path("/nowhere")["route"], "unmatched");
    assert!(
        !log.contains("secret-token-value"),
        "a token reached the log"
    );
    assert!(
        !log.contains("c2VjcmV0LXBhdGgtc2ln") && !log.contains("ua-secret-credential"),
        "{log}"
    );
    let redacted = by_path("/nowhere/[redacted]");
    assert_eq!(redacted["user_agent"], "probe Bearer [redacted]");
    assert!(!log.contains(secret));
}

/// `promtool`, which CI installs (scripts/setup.sh); elsewhere the checks are skipped with a note.
fn promtool() -> Option<&'static str> {
    if Command::new("promtool").arg("--version").output().is_ok() {
        return Some("promtool");
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must have promtool (scripts/setup.sh)"
    );
    eprintln!("promtool not installed: skipping the promtool checks");
    None
}

#[test]
fn every_alert_has_a_usual_severity_and_a_runbook_section() {
    #[derive(Deserialize)]
    struct Rules {
        groups: Vec<Group>,
    }
    #[derive(Deserialize)]
    struct Group {
        rules: Vec<serde_yaml::Value>,
    }
    let rules: Rules =
        serde_yaml::from_str(&std::fs::read_to_string("deploy/prometheus/rules.yml").unwrap())
            .unwrap();
    let runbook = std::fs::read_to_string("deploy/prometheus/RUNBOOK.md").unwrap();
    let sections: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    let mut alerts = 0;
    for rule in rules.groups.iter().flat_map(|g| &g.rules) {
        let Some(name) = rule["alert"].as_str() else {
            continue;
        };
        alerts += 1;
        let severity = rule["labels"]["severity"].as_str().unwrap_or("");
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        let url = rule["annotations"]["runbook_url"].as_str().unwrap_or("");
        let anchor = url
            .strip_prefix(
                "https://github.com/get2dial/get2dial-gateway/blob/main/deploy/prometheus/RUNBOOK.md#",
            )
            .unwrap_or_else(|| panic!("{name}: runbook_url {url:?}"));
        assert_eq!(anchor, name.to_lowercase());
        assert!(
            sections.contains(anchor),
            "{name}: no section in RUNBOOK.md"
        );
        assert!(rule["annotations"]["summary"].as_str().is_some(), "{name}");
    }
    assert!(alerts >= 13, "{alerts} alerts");
}

#[test]
fn prometheus_rules_pass_promtool() {
    let Some(promtool) = promtool() else { return };
    for args in [
        &["check", "rules", "deploy/prometheus/rules.yml"][..],
        &["test", "rules", "deploy/prometheus/rules_test.yml"][..],
        &["check", "config", "deploy/prometheus/prometheus.yml"][..],
    ] {
        let out = Command::new(promtool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A scrape after traffic that touches every metric family the gateway exports.
fn full_scrape() -> String {
    let up = Upstream::start();
    let dead = common::closed_port();
    // A TLS listener too, so the certificate metrics are in the scrape.
    let (cert, key, _) = common::tls::Pki::new().issue(&["ops.test"]);
    let tls_port = common::free_port();
    let gw = Gateway::start_full(
        ADMIN_TOKEN_KEY,
        &format!(
            r#"
[jwt]
secrets = ["env:G2D_OPS_SECRET"]

[tls]
listen = "127.0.0.1:{tls_port}"
certificates = [{{ cert_file = "ops.pem", key_file = "ops.key", server_names = ["ops.test"] }}]

[[upstreams]]
name = "app"
servers = ["{up}"]

[[upstreams]]
name = "dead"
servers = ["127.0.0.1:{dead}"]

[[routes]]
name = "login"
path_prefix = "/api/v1/auth/login"
methods = ["POST"]
upstream = "app"
auth = "public"
login_guard = true
max_body_bytes = 4096
rate_limit = {{ key = "ip", per_minute = 1, burst = 1 }}

[[routes]]
name = "api"
path_prefix = "/api/v1/"
upstream = "app"
auth = "jwt"

[[routes]]
name = "app"
path_prefix = "/u/"
upstream = "app"
auth = "public"

[[routes]]
name = "dead"
path_prefix = "/dead"
upstream = "dead"
auth = "public"
"#,
            up = up.addr
        ),
        &[
            ("G2D_OPS_SECRET", "ops-test-secret-0123456789abcdef"),
            ("G2D_ADMIN_TOKEN", ADMIN_TOKEN),
        ],
        &[("ops.pem", &cert), ("ops.key", &key)],
    );
    gw.get("/u/ok");
    gw.get("/u/html-500");
    gw.get("/dead");
    gw.get("/api/v1/calls");
    let body = r#"{"email":"a@b.c","password":"x"}"#;
    let login = format!(
        "POST /api/v1/auth/login HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    gw.send(login.as_bytes());
    gw.send(login.as_bytes()); // throttled
    common::request(gw.admin, &reload_request());
    gw.metrics()
}

fn family_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn promtool_accepts_a_real_scrape_and_the_dashboard_uses_only_real_metrics() {
    let scrape = full_scrape();
    let families = family_names(&scrape);
    for expected in [
        "gateway_http_requests_total",
        "gateway_http_request_duration_seconds",
        "gateway_upstream_failures_total",
        "gateway_errors_rewritten_total",
        "gateway_auth_rejections_total",
        "gateway_rate_limited_total",
        "gateway_login_attempts_total",
        "gateway_lockouts_total",
        "gateway_store_fallbacks_total",
        "gateway_store_degraded",
        "gateway_config_reloads_total",
        "gateway_config_last_reload_successful",
        "gateway_request_heads_refused_total",
        "gateway_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(
            families.contains(expected),
            "{expected} missing from the scrape"
        );
    }

    // Every metric a dashboard query or a rule names is one the gateway exports (histograms
    // through their _bucket/_sum/_count series).
    let exported = |name: &str| {
        families.contains(name)
            || ["_bucket", "_sum", "_count"].iter().any(|s| {
                name.strip_suffix(s)
                    .is_some_and(|base| families.contains(base))
            })
    };
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("deploy/grafana/get2dial-gateway.json").unwrap(),
    )
    .expect("the dashboard is well-formed JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 9);
    let mut queries = 0;
    for panel in panels {
        assert!(panel["title"].is_string());
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            queries += 1;
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            assert!(
                expr.contains(r#"instance=~"$instance""#),
                "not scoped to the instance variable: {expr}"
            );
            for n in names {
                assert!(
                    exported(&n),
                    "dashboard query names {n}, which the gateway does not export"
                );
            }
        }
    }
    assert!(queries >= 12);
    let rules = std::fs::read_to_string("deploy/prometheus/rules.yml").unwrap();
    for n in metric_names(&rules) {
        assert!(
            exported(&n),
            "a rule names {n}, which the gateway does not export"
        );
    }

    let Some(promtool) = promtool() else { return };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), scrape.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `gateway_*` identifiers in a PromQL text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["gateway_", "process_"] {
        let mut i = 0;
        while let Some(pos) = text[i..].find(prefix) {
            let start = i + pos;
            let boundary = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric()
                    || bytes[start - 1] == b'_'
                    || bytes[start - 1] == b':');
            let end = text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |e| start + e);
            if boundary {
                names.insert(text[start..end].to_string());
            }
            i = end;
        }
    }
    names
}

#[test]
fn deploy_files_are_well_formed_and_consistent() {
    fn yaml_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                yaml_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "yml" || x == "yaml") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    yaml_files(Path::new("deploy"), &mut files);
    assert!(files.len() >= 9, "{files:?}");
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc);
            assert!(v.is_ok(), "{}: {:?}", f.display(), v.err());
        }
    }

    // Kubernetes: probes on the admin port, a Secret reference, the kinds ops expect.
    let deployment: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string("deploy/kubernetes/deployment.yaml").unwrap(),
    )
    .unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "admin");
    assert!(serde_yaml::to_string(&container["env"])
        .unwrap()
        .contains("secretKeyRef"));
    let kinds: BTreeSet<String> = files
        .iter()
        .filter(|f| f.starts_with("deploy/kubernetes"))
        .filter_map(|f| {
            let v: serde_yaml::Value =
                serde_yaml::from_str(&std::fs::read_to_string(f).unwrap()).ok()?;
            v["kind"].as_str().map(str::to_owned)
        })
        .collect();
    for k in [
        "Deployment",
        "Service",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
    ] {
        assert!(kinds.contains(k), "no {k} manifest");
    }
    let spread = &deployment["spec"]["template"]["spec"]["topologySpreadConstraints"];
    let keys: Vec<&str> = spread
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|c| c["topologyKey"].as_str())
        .collect();
    assert_eq!(
        keys,
        ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    );
    // The admin port is open to Prometheus only; the public port to anyone.
    let policy: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string("deploy/kubernetes/networkpolicy.yaml").unwrap(),
    )
    .unwrap();
    for rule in policy["spec"]["ingress"].as_sequence().unwrap() {
        let port = rule["ports"][0]["port"].as_str().unwrap();
        match port {
            "http" => assert!(rule["from"].is_null(), "public port limited"),
            "admin" => assert!(rule["from"].as_sequence().is_some_and(|f| !f.is_empty())),
            other => panic!("unexpected port {other}"),
        }
    }

    // The ConfigMap is generated from exactly the container configuration, which validates;
    // kustomize names it by a hash of its content, so a changed file rolls the pods.
    let generated = std::fs::read_to_string("deploy/kubernetes/gateway.toml").unwrap();
    let container_toml = std::fs::read_to_string("deploy/gateway.container.toml").unwrap();
    assert_eq!(generated.trim(), container_toml.trim());
    if let Ok(out) = Command::new("kubectl")
        .args(["kustomize", "deploy/kubernetes"])
        .output()
    {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect();
        let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
        let name = cm["metadata"]["name"].as_str().unwrap();
        assert!(
            name.starts_with("get2dial-gateway-") && name.len() > 20,
            "{name}"
        );
        let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
        let volumes = &dep["spec"]["template"]["spec"]["volumes"];
        assert!(serde_yaml::to_string(volumes).unwrap().contains(name));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_get2dial-gateway"))
        .args(["check-config", "deploy/gateway.container.toml"])
        .env("GATEWAY_JWT_SECRET", "0123456789abcdef0123")
        .env("GATEWAY_REDIS_URL", "redis://:pw@redis:6379/0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The compose file runs two replicas sharing Redis; the Dockerfile runs as non-root.
    let compose: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string("deploy/compose/docker-compose.yml").unwrap(),
    )
    .unwrap();
    for s in ["redis", "control", "gateway-a", "gateway-b", "lb"] {
        assert!(!compose["services"][s].is_null(), "compose has no {s}");
    }
    // Only the load balancer is published; it balances over both replicas, which send to the
    // stand-in (`stand-in`, tested in tests/cli.rs) under the control plane's name.
    let published: Vec<&str> = compose["services"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter(|(_, s)| !s["ports"].is_null())
        .filter_map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(published, ["lb"]);
    assert_eq!(compose["services"]["control"]["command"][0], "stand-in");
    assert!(container_toml.contains(r#"servers = ["control:8080"]"#));
    let lb = std::fs::read_to_string("deploy/compose/nginx.conf").unwrap();
    assert!(lb.contains("server gateway-a:8080") && lb.contains("server gateway-b:8080"));
    if Command::new("nginx").arg("-v").output().is_ok() {
        // Syntax, with the replicas' names (resolved only inside compose) as loopback ports.
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("nginx.conf");
        let local = lb
            .replace("gateway-a:8080", "127.0.0.1:1")
            .replace("gateway-b:8080", "127.0.0.1:2")
            .replace(
                "/var/run/nginx.pid",
                &dir.path().join("pid").display().to_string(),
            );
        std::fs::write(&conf, local).unwrap();
        let out = Command::new("nginx")
            .arg("-t")
            .arg("-c")
            .arg(&conf)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("syntax is ok"), "{err}");
    }
    let dockerfile = std::fs::read_to_string("deploy/Dockerfile").unwrap();
    assert!(dockerfile.matches("FROM ").count() >= 2, "multi-stage");
    assert!(dockerfile.contains("USER 10001"), "non-root");

    // systemd: verified by systemd-analyze where the machine has it.
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no", "deploy/get2dial-gateway.service"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("Unknown key") && !err.contains("Invalid"),
            "{err}"
        );
    } else {
        eprintln!(
            "systemd-analyze not installed: the unit file was only parsed by the YAML-free checks"
        );
    }
    let unit = std::fs::read_to_string("deploy/get2dial-gateway.service").unwrap();
    for hardening in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DynamicUser=yes",
        "ExecReload=",
    ] {
        assert!(unit.contains(hardening), "unit lacks {hardening}");
    }
}

#[test]
fn cli_explains_itself() {
    let bin = env!("CARGO_BIN_EXE_get2dial-gateway");
    let out = Command::new(bin).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("get2dial-gateway {}", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(bin).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "run",
        "check-config",
        "demo",
        "SIGHUP",
        "SIGTERM",
        "SIGQUIT",
    ] {
        assert!(
            help.contains(word),
            "--help does not mention {word}: {help}"
        );
    }
    let out = Command::new(bin).args(["run", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("--upgrade"));
}

#[test]
fn requests_in_flight_are_counted_until_they_end() {
    let up = Upstream::start();
    let gw = Arc::new(Gateway::start(&routes(&up, "")));
    let in_flight = |gw: &Gateway| metric(gw, "gateway_http_requests_in_flight");
    assert_eq!(in_flight(&gw), 0.0);
    let slow = {
        let gw = gw.clone();
        std::thread::spawn(move || gw.get("/u/slow-headers").status)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while in_flight(&gw) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the slow request was never counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(slow.join().unwrap(), 200);
    // A client that gives up is counted out too.
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    std::io::Write::write_all(&mut s, b"GET /u/slow-headers HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(5);
    while in_flight(&gw) != 0.0 {
        assert!(Instant::now() < deadline, "a request stayed in flight");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn body_bytes_are_counted_by_route_and_direction() {
    let up = Upstream::start();
    let gw = Gateway::start(&format!(
        "{}\n{}",
        routes(&up, ""),
        common::login_route("app", "")
    ));
    let r = gw.send(b"POST /u/ok HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world");
    assert_eq!(r.status, 200);
    let body = r#"{"email":"a@example.com","password":"wrong"}"#;
    let login = common::login_raw(&gw, body);
    assert_eq!(login.status, 401);
    let m = parse_metrics(&gw.metrics());
    let series = |route: &str, direction: &str| {
        m.get(&format!(
            r#"gateway_http_body_bytes_total{{direction="{direction}",route="{route}"}}"#
        ))
        .copied()
        .unwrap_or(0.0)
    };
    assert_eq!(series("app", "in"), 11.0);
    assert_eq!(series("app", "out"), r.body.len() as f64);
    assert_eq!(series("login", "in"), body.len() as f64);
    assert_eq!(series("login", "out"), login.body.len() as f64);
}
