//! The command line: `check-config` and `demo`, run as the real binary.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, get, try_request};

const BIN: &str = env!("CARGO_BIN_EXE_get2dial-gateway");

#[test]
fn check_config_accepts_the_documented_example() {
    let out = Command::new(BIN)
        .args(["check-config", "config/gateway.toml"])
        .env("GATEWAY_JWT_SECRET", "cli-test-secret-0123456789")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("route login"), "{text}");
    assert!(text.contains("-> control"), "{text}");
}

#[test]
fn check_config_lints_without_the_secrets() {
    // The example and the container configuration name secrets the CI has not got.
    for file in ["config/gateway.toml", "deploy/gateway.container.toml"] {
        let run = |extra: &[&str]| {
            Command::new(BIN)
                .arg("check-config")
                .args(extra)
                .arg(file)
                .env_remove("GATEWAY_JWT_SECRET")
                .env_remove("GATEWAY_REDIS_URL")
                .output()
                .unwrap()
        };
        let strict = run(&[]);
        assert_eq!(strict.status.code(), Some(2), "{file}");
        assert!(String::from_utf8_lossy(&strict.stderr).contains("is not set"));
        let lint = run(&["--no-secrets"]);
        assert!(
            lint.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&lint.stderr)
        );
    }
    // A secret written into the file is still an error, named.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        "[jwt]\nsecrets = [\"plain-text-secret-0123456789\"]\n[[upstreams]]\nname = \"a\"\n\
         servers = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\n\
         upstream = \"a\"\nauth = \"jwt\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--no-secrets"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("jwt.secrets[0]"));
}

#[test]
fn check_config_names_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[[upstreams]]\nname = \"a\"\nservers = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"b\"\nauth = \"public\"\n",
            "routes[0].upstream",
        ),
        (
            "[server]\nlisten = \"nowhere\"\n",
            "server.listen",
        ),
        (
            "[[upstreams]]\nname = \"a\"\nservers = [\"127.0.0.1:1\"]\ntimeout = 5\n",
            "timeout",
        ),
        (
            "[[upstreams]]\nname = \"a\"\nservers = [\"127.0.0.1:1\"]\nconnect_timeout_ms = 0\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"a\"\nauth = \"public\"\n",
            "upstreams[0].connect_timeout_ms",
        ),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&*path.to_string_lossy()), "{err}");
        assert!(err.contains(key), "expected {key} in: {err}");
    }
    let out = Command::new(BIN)
        .args(["check-config", "/nonexistent/gw.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/gw.toml"));
}

/// The documented example in a temporary directory (`gateway.toml`), listening on free ports;
/// with the public port and the stand-in's.
fn example_on_free_ports() -> (tempfile::TempDir, u16, u16) {
    let (listen, admin, stand_in) = (free_port(), free_port(), free_port());
    let example = std::fs::read_to_string("config/gateway.toml").unwrap();
    let config = example
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{listen}"))
        .replace("127.0.0.1:9090", &format!("127.0.0.1:{admin}"))
        .replace("127.0.0.1:8081", &format!("127.0.0.1:{stand_in}"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.toml"), config).unwrap();
    (dir, listen, stand_in)
}

#[test]
fn demo_shows_the_contract_in_front_of_the_stand_in() {
    let (dir, listen, _) = example_on_free_ports();
    let path = dir.path().join("gateway.toml");
    let mut child = Command::new(BIN)
        .args(["demo", "--config"])
        .arg(&path)
        .env("RUST_LOG", "error")
        .env("GATEWAY_JWT_SECRET", "cli-test-secret-0123456789")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{listen}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let r = loop {
        match try_request(addr, &get("/api/v1/demo/html-500")) {
            Ok(r) => break r,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("demo did not answer: {e}"),
        }
    };
    r.assert_envelope(500, "internal server error");
    try_request(addr, &get("/api/v1/demo/foreign-json"))
        .unwrap()
        .assert_envelope(422, "phone number must be E.164");
    try_request(addr, &get("/api/v1/demo/nope"))
        .unwrap()
        .assert_envelope(404, "not found");
    let login = b"POST /api/v1/auth/login HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 56\r\n\r\n{\"email\":\"demo@get2dial.com\",\"password\":\"demo-password\"}";
    let r = try_request(addr, login).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with(r#"{"status":"success""#));
    // The stand-in's token passes the gateway's checks and the identity reaches the upstream.
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let token = body["data"]["token"].as_str().unwrap();
    let me =
        format!("GET /api/v1/auth/me HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n");
    let r = try_request(addr, me.as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains(r#""tenant_id":"tenant-demo""#),
        "{}",
        r.text()
    );
    try_request(addr, &get("/api/v1/auth/me"))
        .unwrap()
        .assert_envelope(401, "missing or invalid authorization header");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_taken_listen_address_stops_the_start_and_names_the_key() {
    // Pingora alone would run without that listener, healthy on its admin port.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{}\"\n\
             upgrade_sock = \"up.sock\"\n[[upstreams]]\nname = \"a\"\nservers = [\"127.0.0.1:1\"]\n\
             [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"a\"\nauth = \"public\"\n",
            free_port()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.listen") && err.contains(&port.to_string()),
        "{err}"
    );
    drop(taken);
}

#[test]
fn stand_in_runs_alone_for_a_gateway_in_another_process() {
    // The shape of deploy/compose: the stand-in in one process, the gateway in another.
    let (dir, listen, stand_in) = example_on_free_ports();
    let path = dir.path().join("gateway.toml");
    let spawn = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "error")
            .env("GATEWAY_JWT_SECRET", "cli-test-secret-0123456789")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let listen_arg = format!("127.0.0.1:{stand_in}");
    let mut children = [
        spawn(&["stand-in", "--listen", &listen_arg]),
        spawn(&["run"]),
    ];
    let addr = format!("127.0.0.1:{listen}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let login = b"POST /api/v1/auth/login HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 56\r\n\r\n{\"email\":\"demo@get2dial.com\",\"password\":\"demo-password\"}";
    let r = loop {
        match try_request(addr, login) {
            Ok(r) if r.status == 200 => break r,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => panic!(
                "no login through the gateway: {:?}",
                other.map(|r| r.text())
            ),
        }
    };
    assert!(r.text().contains(r#""token":"#), "{}", r.text());
    try_request(addr, &get("/api/v1/demo/html-500"))
        .unwrap()
        .assert_envelope(500, "internal server error");
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
}
