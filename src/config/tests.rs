//! The validator against files that are right and files that are wrong.

use http::Method;

use super::*;

const MINIMAL: &str = r#"
    [[upstreams]]
    name = "control"
    servers = ["127.0.0.1:8081"]

    [[routes]]
    name = "api"
    path_prefix = "/api/v1/"
    upstream = "control"
    auth = "public"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("gw.toml"))
}

#[test]
fn minimal_file_gets_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.server.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(c.upstreams[0].connect_timeout, Duration::from_secs(1));
    assert_eq!(c.routes[0].max_body_bytes, 1_048_576);
    assert!(c.routes[0].methods.is_empty());
}

#[test]
fn unknown_key_is_named_with_file() {
    let e = parse(&format!("{MINIMAL}\n[server]\nlisten_addr = \"x\"\n")).unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("gw.toml: "), "{text}");
    assert!(text.contains("listen_addr"), "{text}");
}

#[test]
fn bad_upstream_reference_names_the_key() {
    let e = parse(&MINIMAL.replace("upstream = \"control\"", "upstream = \"nope\"")).unwrap_err();
    assert_eq!(e.key, "routes[0].upstream");
    assert!(e.message.contains("nope"));
}

#[test]
fn bad_server_address_names_the_key() {
    let e = parse(&MINIMAL.replace("127.0.0.1:8081", "localhost")).unwrap_err();
    assert_eq!(e.key, "upstreams[0].servers[0]");
}

#[test]
fn get_implies_head_and_methods_are_checked() {
    let c = parse(&MINIMAL.replace(
        "upstream = \"control\"",
        "upstream = \"control\"\nmethods = [\"get\"]",
    ))
    .unwrap();
    assert_eq!(c.routes[0].methods, vec![Method::GET, Method::HEAD]);
    let e = parse(&MINIMAL.replace(
        "upstream = \"control\"",
        "upstream = \"control\"\nmethods = [\"GE T\"]",
    ))
    .unwrap_err();
    assert_eq!(e.key, "routes[0].methods[0]");
}

#[test]
fn jwt_routes_need_a_jwt_section_with_real_secrets() {
    let jwt_route = MINIMAL.replace("auth = \"public\"", "auth = \"jwt\"");
    let e = parse(&jwt_route).unwrap_err();
    assert_eq!(e.key, "jwt");
    let e = parse(&format!(
        "{jwt_route}\n[jwt]\nsecrets = [\"hunter2hunter2hunter2\"]\n"
    ))
    .unwrap_err();
    assert_eq!(e.key, "jwt.secrets[0]");
    let e = parse(&format!(
        "{jwt_route}\n[jwt]\nsecrets = [\"env:G2D_TEST_UNSET_VAR\"]\n"
    ))
    .unwrap_err();
    assert!(e.message.contains("G2D_TEST_UNSET_VAR"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("short"), "too-short\n").unwrap();
    std::fs::write(dir.path().join("good"), "0123456789abcdef\n").unwrap();
    let cfg = |f: &str| format!("{jwt_route}\n[jwt]\nsecrets = [\"file:{f}\"]\n");
    let e = Config::parse(&cfg("short"), &dir.path().join("gw.toml")).unwrap_err();
    assert!(e.message.contains("9 bytes"), "{e}");
    let c = Config::parse(&cfg("good"), &dir.path().join("gw.toml")).unwrap();
    assert_eq!(c.jwt.unwrap().secrets, vec![b"0123456789abcdef".to_vec()]);
}

#[test]
fn auth_options_must_fit_the_mode() {
    let e = parse(&MINIMAL.replace(
        "auth = \"public\"",
        "auth = \"public\"\nmin_role = \"admin\"",
    ))
    .unwrap_err();
    assert_eq!(e.key, "routes[0].min_role");
    let e = parse(&MINIMAL.replace("auth = \"public\"", "auth = \"open\"")).unwrap_err();
    assert!(e.message.contains("open"), "{e}");
    let e = parse(&MINIMAL.replace(
        "auth = \"public\"",
        "auth = \"public\"\nallow_networks = [\"10.0.0.0/33\"]",
    ))
    .unwrap_err();
    assert_eq!(e.key, "routes[0].allow_networks[0]");
    let c = parse(&MINIMAL.replace(
        "auth = \"public\"",
        "auth = \"public\"\nallow_networks = [\"127.0.0.1\"]",
    ))
    .unwrap();
    assert_eq!(
        c.routes[0].gate.as_ref().unwrap().networks()[0].to_string(),
        "127.0.0.1/32"
    );
    let e = parse(&MINIMAL.replace("auth = \"public\"", "")).unwrap_err();
    assert!(e.message.contains("auth"), "{e}");
}

#[test]
fn rate_limits_are_checked() {
    let with = |extra: &str| {
        parse(&MINIMAL.replace("auth = \"public\"", &format!("auth = \"public\"\n{extra}")))
    };
    let c = with("rate_limit = { key = \"ip\", per_minute = 1, burst = 5 }").unwrap();
    let p = &c.routes[0].rate_limits[0];
    assert_eq!(
        (p.limit.name.as_str(), p.limit.burst, p.limit.interval),
        ("api-ip", 5, Duration::from_secs(60))
    );
    let e = with("rate_limit = { key = \"user\", per_second = 5 }").unwrap_err();
    assert_eq!(e.key, "routes[0].rate_limit.key");
    let e = with("rate_limits = [{ key = \"ip\", per_second = 5, per_minute = 5 }]").unwrap_err();
    assert_eq!(e.key, "routes[0].rate_limits[0]");
    let e =
        with("rate_limits = [{ key = \"ip\", per_second = 5 }, { key = \"ip\", per_minute = 5 }]")
            .unwrap_err();
    assert_eq!(e.key, "routes[0].rate_limits[1].name");
    let e = with("methods = [\"POST\"]\nlogin_guard = true\nmax_body_bytes = 100000").unwrap_err();
    assert_eq!(e.key, "routes[0].max_body_bytes");
}

#[test]
fn a_policy_name_is_one_policy_on_every_route() {
    let two = |a: &str, b: &str| {
        let route = |name: &str, prefix: &str, policy: &str| {
            format!(
                "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\n\
                 upstream = \"control\"\nauth = \"public\"\nrate_limit = {policy}\n"
            )
        };
        let text = MINIMAL.split("[[routes]]").next().unwrap().to_string()
            + &route("a", "/a", a)
            + &route("b", "/b", b);
        parse(&text)
    };
    let p = "{ name = \"shared\", key = \"ip\", per_second = 5 }";
    assert!(two(p, p).is_ok());
    for other in [
        "{ name = \"shared\", key = \"ip\", per_second = 6 }",
        "{ name = \"shared\", key = \"ip\", per_second = 5, burst = 9 }",
        "{ name = \"shared\", key = \"ip\", per_minute = 300 }",
    ] {
        let e = two(p, other).unwrap_err();
        assert_eq!(e.key, "routes[1].rate_limit.name", "{other}");
        assert!(e.message.contains("route `a`"), "{e}");
    }
}

#[test]
fn login_routes_allow_post_only() {
    let with = |extra: &str| {
        parse(&MINIMAL.replace("auth = \"public\"", &format!("auth = \"public\"\n{extra}")))
    };
    assert!(with("methods = [\"POST\"]\nlogin_guard = true\nmax_body_bytes = 1000").is_ok());
    for methods in ["", "methods = [\"POST\", \"PUT\"]", "methods = [\"GET\"]"] {
        let e = with(&format!("{methods}\nlogin_guard = true")).unwrap_err();
        assert_eq!(e.key, "routes[0].methods", "{methods}");
    }
}

#[test]
fn websocket_is_on_for_query_token_routes_only_by_default() {
    let c = parse(MINIMAL).unwrap();
    assert!(!c.routes[0].websocket);
    let c = parse(&MINIMAL.replace("auth = \"public\"", "auth = \"public\"\nwebsocket = true"))
        .unwrap();
    assert!(c.routes[0].websocket);
}

#[test]
fn lockout_and_ip_key_settings_are_checked() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.lockout.max_failures_per_email, 30);
    assert_eq!(c.lockout.failure_statuses, [401]);
    assert_eq!(c.limits.ip_prefixes, (32, 64));
    for (extra, key) in [
        (
            "[lockout]\nmax_failures_per_email = 5",
            "lockout.max_failures_per_email",
        ),
        (
            "[lockout]\nfailure_statuses = []",
            "lockout.failure_statuses",
        ),
        (
            "[lockout]\nfailure_statuses = [500]",
            "lockout.failure_statuses",
        ),
        (
            "[lockout]\nfailure_statuses = [429]",
            "lockout.failure_statuses",
        ),
        ("[limits]\nipv6_prefix = 0", "limits.ipv6_prefix"),
        ("[limits]\nipv4_prefix = 33", "limits.ipv4_prefix"),
    ] {
        let e = parse(&format!("{MINIMAL}\n{extra}")).unwrap_err();
        assert_eq!(e.key, key, "{extra}");
    }
    let c = parse(&format!(
        "{MINIMAL}\n[lockout]\nfailure_statuses = [400, 401, 403]\nmax_failures_per_email = 10"
    ))
    .unwrap();
    assert_eq!(c.lockout.failure_statuses, [400, 401, 403]);
    assert_eq!(c.lockout.max_failures_per_email, 10);
}

#[test]
fn unsafe_prefix_is_refused() {
    for bad in [
        "/api/../v1/",
        "/api/v1%2f",
        "/api/%61",
        "/api:v1/",
        "/api v1/",
        "/api//v1/",
    ] {
        let e = parse(&MINIMAL.replace("/api/v1/", bad)).unwrap_err();
        assert_eq!(e.key, "routes[0].path_prefix", "{bad}");
    }
}

#[test]
fn health_checks_are_checked() {
    let with = |check: &str| {
        parse(&MINIMAL.replace(
            "servers = [\"127.0.0.1:8081\"]",
            &format!("servers = [\"127.0.0.1:8081\"]\n{check}"),
        ))
    };
    let c = with("health_check = { path = \"/readyz\", healthy_after = 2 }").unwrap();
    let h = c.upstreams[0].health_check.as_ref().unwrap();
    assert_eq!(
        (h.healthy_after, h.unhealthy_after, h.interval),
        (2, 1, Duration::from_secs(5))
    );
    assert!(
        matches!(&h.kind, CheckKind::Http { path, host, expect_status }
        if path == "/readyz" && host == "control" && expect_status == &[200])
    );
    let c = with("health_check_interval_ms = 100").unwrap();
    assert_eq!(
        c.upstreams[0].health_check.as_ref().unwrap().kind,
        CheckKind::Tcp
    );
    for (check, key) in [
        (
            "health_check_interval_ms = 100\nhealth_check = { kind = \"tcp\" }",
            "upstreams[0].health_check_interval_ms",
        ),
        (
            "health_check = { kind = \"udp\" }",
            "upstreams[0].health_check.kind",
        ),
        (
            "health_check = { path = \"readyz\" }",
            "upstreams[0].health_check.path",
        ),
        (
            "health_check = { expect_status = [] }",
            "upstreams[0].health_check.expect_status",
        ),
        (
            "health_check = { expect_status = [99] }",
            "upstreams[0].health_check.expect_status",
        ),
        (
            "health_check = { interval_ms = 0 }",
            "upstreams[0].health_check.interval_ms",
        ),
        (
            "health_check = { unhealthy_after = 0 }",
            "upstreams[0].health_check.unhealthy_after",
        ),
    ] {
        assert_eq!(with(check).unwrap_err().key, key, "{check}");
    }
}

#[test]
fn redis_topologies_name_what_they_miss() {
    use crate::store::redis::Topology;
    let store = |body: &str| parse(&format!("{MINIMAL}\n[store]\n{body}\n"));
    let cluster = store(
        "kind = \"redis-cluster\"\nredis_urls = [\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]",
    )
    .unwrap();
    assert!(matches!(
        cluster.redis.map(|r| r.topology),
        Some(Topology::Cluster(urls)) if urls.len() == 2
    ));
    let sentinel = store(
        "kind = \"redis-sentinel\"\nredis_urls = [\"redis://127.0.0.1:26379\"]\nmaster_name = \"g2d\"",
    )
    .unwrap();
    assert!(matches!(
        sentinel.redis.map(|r| r.topology),
        Some(Topology::Sentinel { master, .. }) if master == "g2d"
    ));
    for (body, key) in [
        ("kind = \"redis-cluster\"", "store.redis_urls"),
        (
            "kind = \"redis-cluster\"\nredis_url = \"redis://127.0.0.1:7000\"",
            "store.redis_url",
        ),
        (
            "kind = \"redis-sentinel\"\nredis_urls = [\"redis://127.0.0.1:26379\"]",
            "store.master_name",
        ),
        (
            "kind = \"redis\"\nredis_url = \"redis://h:1\"\nmaster_name = \"g2d\"",
            "store.master_name",
        ),
        (
            "kind = \"redis-cluster\"\nredis_urls = [\"redis://h:1\", \"redis://:pw@h:2\"]",
            "store.redis_urls[1]",
        ),
        (
            "kind = \"redis-cluster\"\nredis_urls = [\"redis://h:1\"]\nkey_prefix = \"{g2d}\"",
            "store.key_prefix",
        ),
    ] {
        let e = store(body).unwrap_err().to_string();
        assert!(e.starts_with("gw.toml: ") && e.contains(key), "{body}: {e}");
    }
}

#[test]
fn servers_are_addresses_host_names_or_srv_names() {
    use crate::discovery::Server;
    let with = |servers: &str, extra: &str| {
        parse(&format!(
            "{extra}\n[[upstreams]]\nname = \"control\"\nservers = [{servers}]\n\
             [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"control\"\nauth = \"public\"\n"
        ))
    };
    let c = with(
        r#""127.0.0.1:8081", "Control.Default.svc.cluster.local:8080", "_http._tcp.control.default.svc.cluster.local""#,
        "",
    )
    .unwrap();
    assert_eq!(
        c.upstreams[0].servers,
        vec![
            Server::Addr("127.0.0.1:8081".parse().unwrap()),
            Server::Host("control.default.svc.cluster.local".into(), 8080),
            Server::Srv("_http._tcp.control.default.svc.cluster.local".into()),
        ]
    );
    for bad in [
        r#""control""#,
        r#""control:0""#,
        r#""control:http""#,
        r#""-bad-.example:80""#,
        r#""_http.control""#,
        r#""a b:80""#,
    ] {
        let e = with(bad, "").unwrap_err().to_string();
        assert!(e.contains("upstreams[0].servers[0]"), "{bad}: {e}");
    }
    let dns = with(
        r#""control:8080""#,
        "[dns]\nnameservers = [\"10.0.0.10\", \"127.0.0.1:5353\"]\nmin_ttl_ms = 500\nmax_ttl_ms = 5000",
    )
    .unwrap()
    .dns;
    assert_eq!(
        dns.nameservers,
        vec![
            "10.0.0.10:53".parse().unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        ]
    );
    for (extra, key) in [
        ("[dns]\nnameservers = [\"resolver\"]", "dns.nameservers[0]"),
        (
            "[dns]\nmin_ttl_ms = 5000\nmax_ttl_ms = 1000",
            "dns.max_ttl_ms",
        ),
    ] {
        let e = with(r#""control:8080""#, extra).unwrap_err().to_string();
        assert!(e.contains(key), "{extra}: {e}");
    }
}

#[test]
fn outlier_detection_is_checked() {
    let with = |o: &str| {
        parse(&format!(
            "[[upstreams]]\nname = \"control\"\nservers = [\"127.0.0.1:1\"]\noutlier_detection = {{ {o} }}\n\
             [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"control\"\nauth = \"public\"\n"
        ))
    };
    let c = with("").unwrap();
    let o = c.upstreams[0].outlier.clone().unwrap();
    assert_eq!((o.consecutive_failures, o.max_ejected_percent), (5, 50));
    for (o, key) in [
        ("consecutive_failures = 0", "consecutive_failures"),
        ("max_ejected_percent = 101", "max_ejected_percent"),
        (
            "ejection_ms = 5000, max_ejection_ms = 100",
            "max_ejection_ms",
        ),
    ] {
        let e = with(o).unwrap_err().to_string();
        assert!(e.contains(key), "{o}: {e}");
    }
}

#[test]
fn tracing_is_checked() {
    let with = |t: &str| parse(&format!("{MINIMAL}\n[tracing]\n{t}\n"));
    let t = with("otlp_endpoint = \"http://127.0.0.1:4318/v1/traces\"")
        .unwrap()
        .tracing
        .unwrap();
    assert_eq!((t.sample_ratio, t.queue_size), (0.05, 4096));
    assert!(parse(MINIMAL).unwrap().tracing.is_none());
    for (t, key) in [
        (
            "otlp_endpoint = \"collector:4318\"",
            "tracing.otlp_endpoint",
        ),
        (
            "otlp_endpoint = \"https://c/v1/traces\"",
            "tracing.otlp_endpoint",
        ),
        (
            "otlp_endpoint = \"http://c/v1/traces\"\nsample_ratio = 1.5",
            "tracing.sample_ratio",
        ),
        (
            "otlp_endpoint = \"http://c/v1/traces\"\nqueue_size = 0",
            "tracing.queue_size",
        ),
    ] {
        let e = with(t).unwrap_err().to_string();
        assert!(e.contains(key), "{t}: {e}");
    }
}

#[test]
fn the_effective_config_redacts_user_information_in_every_url() {
    let v = serde_json::json!({
        "a": "redis://:pw@host:6379/0",
        "b": ["http://user:pw@collector:4318/v1/traces", "http://collector/a@b"],
        "c": { "d": "env:NAME", "e": 3 },
    });
    let r = super::redacted(v);
    assert_eq!(r["a"], "redis://[redacted]@host:6379/0");
    assert_eq!(r["b"][0], "http://[redacted]@collector:4318/v1/traces");
    assert_eq!(
        r["b"][1], "http://collector/a@b",
        "an @ in the path is no user information"
    );
    assert_eq!(r["c"]["d"], "env:NAME");
    assert_eq!(r["c"]["e"], 3);
}
