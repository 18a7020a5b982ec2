//! End-to-end token checks: the real binary, tokens minted by PyJWT (checked-in fixtures, see
//! tests/data/make_tokens.py) and by the `jsonwebtoken` crate, a real upstream on 127.0.0.1.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use common::upstream::Upstream;
use common::{parse_metrics, Conn, Gateway};
use serde_json::Value;
use sha2::{Digest, Sha256};

const UNAUTHORIZED: &str = "missing or invalid authorization header";

fn fixtures() -> Value {
    serde_json::from_str(include_str!("data/tokens.json")).unwrap()
}

fn token(name: &str) -> String {
    fixtures()["tokens"][name].as_str().unwrap().to_string()
}

fn digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn gateway(up: &Upstream) -> Gateway {
    let f = fixtures();
    let secret = f["secret"].as_str().unwrap();
    let previous = f["previous_secret"].as_str().unwrap();
    Gateway::start_with(
        &format!(
            r#"
[jwt]
secrets = ["env:G2D_TEST_JWT_SECRET", "file:previous.secret"]
leeway_seconds = 5

[[upstreams]]
name = "app"
servers = ["{up}"]

[[routes]]
name = "login"
path_prefix = "/api/v1/auth/login"
upstream = "app"
auth = "public"

[[routes]]
name = "me"
path_prefix = "/api/v1/auth/me"
upstream = "app"
auth = "jwt"

[[routes]]
name = "admin"
path_prefix = "/api/v1/admin/"
upstream = "app"
auth = "jwt"
min_role = "admin"

[[routes]]
name = "register"
path_prefix = "/api/v1/nodes/register"
upstream = "app"
auth = "public"
allow_networks = ["127.0.0.1/32"]

[[routes]]
name = "heartbeat"
path_prefix = "/api/v1/nodes/heartbeat"
upstream = "app"
auth = "public"
allow_networks = ["10.0.0.0/8", "::1"]

[[routes]]
name = "nodes"
path_prefix = "/api/v1/nodes/"
upstream = "app"
auth = "node_key"
node_key_digests_file = "node-keys.sha256"

[[routes]]
name = "desired"
path_prefix = "/api/v1/edge/desired-state"
upstream = "app"
auth = "node_key"

[[routes]]
name = "api"
path_prefix = "/api/v1/"
upstream = "app"
auth = "jwt"

[[routes]]
name = "ws"
path_prefix = "/ws/"
upstream = "app"
auth = "jwt_query"
min_role = "agent"
"#,
            up = up.addr
        ),
        &[("G2D_TEST_JWT_SECRET", secret)],
        &[
            ("previous.secret", &format!("{previous}\n")),
            (
                "node-keys.sha256",
                &format!("# edge nodes\n{}  # node 1\n", digest("node-key-1")),
            ),
        ],
    )
}

fn get_with(gw: &Gateway, path: &str, headers: &[&str]) -> common::Response {
    let mut raw = format!("GET {path} HTTP/1.1\r\nHost: t\r\n");
    for h in headers {
        raw.push_str(h);
        raw.push_str("\r\n");
    }
    raw.push_str("\r\n");
    gw.send(raw.as_bytes())
}

fn bearer(t: &str) -> String {
    format!("Authorization: Bearer {t}")
}

#[test]
fn every_bad_credential_gets_the_same_401() {
    let up = Upstream::start();
    let gw = gateway(&up);
    let cases: &[(&str, &str)] = &[
        ("expired", "expired"),
        ("not_yet_valid", "not_yet_valid"),
        ("wrong_secret", "bad_signature"),
        ("wrong_iss", "wrong_issuer"),
        ("wrong_aud", "wrong_audience"),
        ("missing_tid", "bad_claims"),
        ("missing_sub", "bad_claims"),
        ("missing_exp", "bad_claims"),
        ("unknown_role", "bad_claims"),
        ("alg_none", "bad_algorithm"),
        ("alg_rs256_header", "bad_algorithm"),
        ("alg_hs512", "bad_algorithm"),
        ("truncated", "malformed"),
        ("garbage", "malformed"),
        ("long_16k", "too_long"),
    ];
    for (name, _) in cases {
        let r = get_with(&gw, "/api/v1/auth/me", &[&bearer(&token(name))]);
        r.assert_envelope(401, UNAUTHORIZED);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{name}");
    }
    let header_cases: &[&[&str]] = &[
        &[],
        &["Authorization: Basic dXNlcjpwYXNz"],
        &["Authorization: Bearer"],
        &["Authorization: Bearer "],
        &["Authorization: Token abc"],
        &[
            &bearer(&token("valid_agent")),
            &bearer(&token("valid_agent")),
        ],
    ];
    for headers in header_cases {
        get_with(&gw, "/api/v1/auth/me", headers).assert_envelope(401, UNAUTHORIZED);
    }
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        0,
        "no refused request reached the upstream"
    );

    let m = parse_metrics(&gw.metrics());
    let reason = |r: &str| {
        m.get(&format!(
            r#"gateway_auth_rejections_total{{reason="{r}",route="me"}}"#
        ))
        .copied()
        .unwrap_or(0.0)
    };
    let mut expected = std::collections::HashMap::new();
    for (_, r) in cases {
        *expected.entry(*r).or_insert(0.0) += 1.0;
    }
    *expected.entry("missing").or_insert(0.0) += 1.0;
    *expected.entry("malformed").or_insert(0.0) += 5.0; // the header cases after `missing`
    for (r, n) in expected {
        assert_eq!(reason(r), n, "reason {r}");
    }
}

#[test]
fn valid_tokens_pass_with_verified_identity_and_spoofs_stripped() {
    let up = Upstream::start();
    let gw = gateway(&up);
    for (name, role, user) in [
        ("valid_agent", "agent", "user-1"),
        ("valid_supervisor", "supervisor", "super-1"),
        ("valid_admin", "admin", "admin-1"),
        ("valid_platform_admin", "platform_admin", "root-1"),
        ("previous_secret_admin", "admin", "admin-2"),
    ] {
        let r = get_with(
            &gw,
            "/api/v1/auth/me",
            &[
                &bearer(&token(name)),
                "X-Tenant-Id: evil-tenant",
                "X-User-Role: platform_admin",
                "x-user-id: someone-else",
            ],
        );
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let seen = r.text().to_ascii_lowercase();
        assert!(
            seen.contains(&format!("x-user-role: {role}\r\n")),
            "{name}: {seen}"
        );
        assert!(
            seen.contains(&format!("x-user-id: {user}\r\n")),
            "{name}: {seen}"
        );
        assert!(!seen.contains("evil-tenant"), "{name}: {seen}");
        assert!(!seen.contains("someone-else"), "{name}: {seen}");
        assert_eq!(seen.matches("x-user-role:").count(), 1, "{name}");
    }
    let r = get_with(&gw, "/api/v1/calls", &[&bearer(&token("valid_agent"))]);
    let seen = r.text().to_ascii_lowercase();
    assert!(seen.contains("x-tenant-id: tenant-1\r\n"), "{seen}");
    assert!(
        seen.contains("x-user-email: agent@example.com\r\n"),
        "{seen}"
    );

    // No email claim, no email header; the scheme is case-insensitive.
    let r = get_with(
        &gw,
        "/api/v1/calls",
        &[&format!(
            "authorization: bEaReR {}",
            token("valid_no_email")
        )],
    );
    assert_eq!(r.status, 200);
    assert!(!r.text().to_ascii_lowercase().contains("x-user-email"));

    // Public routes never pass client-made identity either.
    let login = "POST /api/v1/nodes/register HTTP/1.1\r\nHost: t\r\nX-User-Role: platform_admin\r\nX-Tenant-Id: t-9\r\nX-User-Email: x@y\r\nX-User-Id: u\r\nContent-Length: 2\r\n\r\n{}";
    let r = gw.send(login.as_bytes());
    assert_eq!(r.status, 200);
    let seen = r.text().to_ascii_lowercase();
    for h in ["x-user-role", "x-tenant-id", "x-user-email", "x-user-id"] {
        assert!(!seen.contains(h), "{h} passed on a public route: {seen}");
    }
}

#[test]
fn tokens_minted_by_the_jsonwebtoken_crate() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let up = Upstream::start();
    let gw = gateway(&up);
    let secret = fixtures()["secret"].as_str().unwrap().to_string();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mint = |exp: u64, aud: &str, nbf: Option<u64>| {
        let mut c = serde_json::json!({"tid":"t-7","sub":"u-7","role":"supervisor",
            "iss":"get2dial","aud":aud,"exp":exp});
        if let Some(nbf) = nbf {
            c["nbf"] = nbf.into();
        }
        encode(
            &Header::new(Algorithm::HS256),
            &c,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let ok = get_with(
        &gw,
        "/api/v1/x",
        &[&bearer(&mint(now + 60, "get2dial-control", None))],
    );
    assert_eq!(ok.status, 200);
    assert!(ok
        .text()
        .to_ascii_lowercase()
        .contains("x-tenant-id: t-7\r\n"));
    // Within the 5 s leeway: accepted. Beyond it: refused.
    assert_eq!(
        get_with(
            &gw,
            "/api/v1/x",
            &[&bearer(&mint(now - 2, "get2dial-control", None))]
        )
        .status,
        200
    );
    for t in [
        mint(now - 60, "get2dial-control", None),
        mint(now + 60, "wrong", None),
        mint(now + 600, "get2dial-control", Some(now + 300)),
    ] {
        get_with(&gw, "/api/v1/x", &[&bearer(&t)]).assert_envelope(401, UNAUTHORIZED);
    }
}

#[test]
fn roles_and_other_tenants() {
    let up = Upstream::start();
    let gw = gateway(&up);
    for (name, status) in [
        ("valid_agent", 403),
        ("valid_supervisor", 403),
        ("valid_admin", 200),
        ("valid_platform_admin", 200),
    ] {
        let r = get_with(&gw, "/api/v1/admin/users", &[&bearer(&token(name))]);
        if status == 403 {
            r.assert_envelope(403, "forbidden");
        } else {
            assert_eq!(r.status, 200, "{name}");
        }
    }
    for (name, query, status) in [
        ("valid_admin", "?tenant_id=tenant-2", 403),
        ("valid_agent", "?limit=5&tenant_id=tenant-2", 403),
        ("valid_admin", "?tenant%5Fid=tenant-2", 403),
        ("valid_platform_admin", "?tenant_id=tenant-2", 200),
        ("valid_admin", "?tenant=tenant-2", 200),
    ] {
        let r = get_with(
            &gw,
            &format!("/api/v1/calls{query}"),
            &[&bearer(&token(name))],
        );
        if status == 403 {
            r.assert_envelope(403, "forbidden");
        } else {
            assert_eq!(r.status, 200, "{name} {query}");
        }
    }
    let m = parse_metrics(&gw.metrics());
    assert_eq!(
        m.get(r#"gateway_auth_rejections_total{reason="insufficient_role",route="admin"}"#),
        Some(&2.0)
    );
    assert_eq!(
        m.get(r#"gateway_auth_rejections_total{reason="tenant_override",route="api"}"#),
        Some(&3.0)
    );
}

fn upgrade(gw: &Gateway, target: &str, extra: &str) -> (Conn, common::Response) {
    let mut c = Conn::open(gw.addr);
    let r = c.send(
        format!(
            "GET {target} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
        .as_bytes(),
    );
    (c, r)
}

#[test]
fn websocket_token_in_the_query() {
    let up = Upstream::start();
    let gw = gateway(&up);
    let (mut c, r) = upgrade(
        &gw,
        &format!("/ws/agent?token={}", token("valid_agent")),
        "",
    );
    assert_eq!(r.status, 101);
    c.stream().write_all(b"hello over ws").unwrap();
    let mut buf = [0u8; 13];
    c.stream().read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello over ws");

    // The bearer header works too, for clients that can set it.
    let (_, r) = upgrade(
        &gw,
        "/ws/supervisor",
        &format!("{}\r\n", bearer(&token("valid_supervisor"))),
    );
    assert_eq!(r.status, 101);

    for target in [
        "/ws/agent".to_string(),
        "/ws/agent?token=".to_string(),
        format!("/ws/agent?token={}", token("expired")),
        format!(
            "/ws/agent?token={}&token={}",
            token("valid_agent"),
            token("valid_admin")
        ),
        format!("/ws/agent?token={}", token("alg_none")),
    ] {
        let (_, r) = upgrade(&gw, &target, "");
        r.assert_envelope(401, UNAUTHORIZED);
    }
}

#[test]
fn node_keys_and_network_gates() {
    let up = Upstream::start();
    let gw = gateway(&up);
    let post = |path: &str, extra: &str| {
        gw.send(
            format!("POST {path} HTTP/1.1\r\nHost: t\r\n{extra}Content-Length: 2\r\n\r\n{{}}")
                .as_bytes(),
        )
    };
    assert_eq!(
        post(
            "/api/v1/nodes/recordings/c-1",
            "Authorization: Bearer node-key-1\r\n"
        )
        .status,
        200
    );
    for extra in [
        "",
        "Authorization: Bearer node-key-2\r\n",
        "Authorization: Bearer \r\n",
        "Authorization: Basic node-key-1\r\n",
    ] {
        let r = post("/api/v1/nodes/recordings/c-1", extra);
        r.assert_envelope(401, UNAUTHORIZED);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    // Without a digest file, a well-formed key passes and the upstream decides.
    assert_eq!(
        get_with(
            &gw,
            "/api/v1/edge/desired-state?node=1",
            &["Authorization: Bearer any-key"]
        )
        .status,
        200
    );
    get_with(&gw, "/api/v1/edge/desired-state", &[]).assert_envelope(401, UNAUTHORIZED);

    // Network gates: register allows 127.0.0.1, heartbeat does not.
    assert_eq!(post("/api/v1/nodes/register", "").status, 200);
    post("/api/v1/nodes/heartbeat", "").assert_envelope(403, "forbidden");

    // The digest file is re-read when it changes.
    let path = gw.dir().join("node-keys.sha256");
    std::fs::write(&path, format!("{}\n", digest("node-key-2"))).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(SystemTime::now() + Duration::from_secs(10))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while post("/api/v1/nodes/x", "Authorization: Bearer node-key-2\r\n").status != 200 {
        assert!(Instant::now() < deadline, "new node key never accepted");
        std::thread::sleep(Duration::from_millis(50));
    }
    post("/api/v1/nodes/x", "Authorization: Bearer node-key-1\r\n")
        .assert_envelope(401, UNAUTHORIZED);

    let m = parse_metrics(&gw.metrics());
    assert_eq!(
        m.get(r#"gateway_auth_rejections_total{reason="network",route="heartbeat"}"#),
        Some(&1.0)
    );
}

#[test]
fn short_or_missing_secrets_refuse_to_start() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        format!(
            "[jwt]\nsecrets = [\"env:G2D_SHORT\"]\n[[upstreams]]\nname = \"a\"\nservers = [\"{}\"]\n\
             [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"a\"\nauth = \"jwt\"\n",
            up.addr
        ),
    )
    .unwrap();
    let run = |secret: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_get2dial-gateway"));
        cmd.args(["run", "--config"])
            .arg(&path)
            .env_remove("G2D_SHORT");
        if let Some(s) = secret {
            cmd.env("G2D_SHORT", s);
        }
        cmd.output().unwrap()
    };
    for secret in [Some("fifteen-bytes!!"), None] {
        let out = run(secret);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("jwt.secrets[0]"), "{err}");
        assert!(
            !err.contains("fifteen-bytes"),
            "the secret must not be printed: {err}"
        );
    }
}
