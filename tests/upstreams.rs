//! Upstreams that move and fail: HTTP health checks take a server that answers its check badly
//! out of the rotation and bring it back when it recovers (TCP checks stay available); names
//! resolved by a real DNS server (dnsmasq, started by the test) whose answers change; servers
//! that answer 503 or stall are ejected and come back; connect failures and resets on reused
//! connections are retried where that is safe, within the retry budget.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{parse_metrics, Gateway};

fn healthy(gw: &Gateway) -> f64 {
    parse_metrics(&gw.metrics())
        .get(r#"gateway_upstream_healthy_servers{upstream="app"}"#)
        .copied()
        .unwrap_or(-1.0)
}

/// How a test server behaves.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Answers 200 with its name.
    Ok,
    /// Answers this status with its name.
    Status(u16),
    /// Reads the request and never answers.
    Stall,
    /// Answers the first request of each connection; reads the second and closes.
    CloseSecond,
}

/// A server that names itself in every answer; its `/readyz` answers 503 while `ready` is
/// false. Counts the health checks and the other requests it got.
struct Server {
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    checks: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl Server {
    fn start(name: &'static str, ready: bool) -> Server {
        Server::with_mode(name, ready, Mode::Ok)
    }

    fn with_mode(name: &'static str, ready: bool, mode: Mode) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Arc::new(AtomicBool::new(ready));
        let checks = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (r, c, n) = (ready.clone(), checks.clone(), requests.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (r, c, n) = (r.clone(), c.clone(), n.clone());
                thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut w = conn;
                    for nth in 0.. {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split(' ').nth(1).unwrap_or("").to_string();
                        let mut length = 0;
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                                break;
                            }
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                length = v.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0; length];
                        if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
                            return;
                        }
                        let status = if path == "/readyz" {
                            c.fetch_add(1, Ordering::SeqCst);
                            if r.load(Ordering::SeqCst) {
                                "200 OK".to_string()
                            } else {
                                "503 Service Unavailable".to_string()
                            }
                        } else {
                            n.fetch_add(1, Ordering::SeqCst);
                            match mode {
                                Mode::Ok => "200 OK".to_string(),
                                Mode::Status(code) => format!("{code} Failing"),
                                Mode::Stall => {
                                    thread::sleep(Duration::from_secs(30));
                                    return;
                                }
                                Mode::CloseSecond if nth > 0 => return,
                                Mode::CloseSecond => "200 OK".to_string(),
                            }
                        };
                        let answer = format!(
                            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{name}",
                            name.len()
                        );
                        if w.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Server {
            addr,
            ready,
            checks,
            requests,
        }
    }
}

fn gateway(servers: &[&Server], check: &str) -> Gateway {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    gateway_for(&servers.join(", "), check)
}

/// A gateway whose one upstream `app` has `servers` (as written in TOML) and `extra` keys.
fn gateway_for(servers: &str, extra: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
[[upstreams]]
name = "app"
servers = [{servers}]
{extra}

[[routes]]
name = "app"
path_prefix = "/"
upstream = "app"
auth = "public"
"#
    ))
}

/// Who answered `n` requests, as counts for "A" and "B".
fn spread(gw: &Gateway, n: usize) -> (usize, usize) {
    let mut a = 0;
    let mut b = 0;
    for _ in 0..n {
        match gw.get("/x").text().as_str() {
            "A" => a += 1,
            "B" => b += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    (a, b)
}

/// Waits until `cond` holds (up to 5 s).
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_http_health_check_takes_a_failing_server_out_and_brings_it_back() {
    let a = Server::start("A", true);
    let b = Server::start("B", false);
    let gw = gateway(
        &[&a, &b],
        r#"health_check = { path = "/readyz", expect_status = [200], interval_ms = 100, timeout_ms = 500, healthy_after = 2, unhealthy_after = 2 }"#,
    );
    // B accepts connections and serves requests, but its readiness check says 503: out.
    eventually("B is checked", || b.checks.load(Ordering::SeqCst) >= 2);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(spread(&gw, 20), (20, 0));
    eventually("one server counted healthy", || healthy(&gw) == 1.0);
    // B recovers: after two passed checks it takes its share again.
    b.ready.store(true, Ordering::SeqCst);
    eventually("B is back in the rotation", || spread(&gw, 4).1 > 0);
    let (from_a, from_b) = spread(&gw, 20);
    assert!(from_a >= 5 && from_b >= 5, "{from_a} / {from_b}");
    eventually("two servers counted healthy", || healthy(&gw) == 2.0);
    // A fails its check: every request goes to B, none fails.
    a.ready.store(false, Ordering::SeqCst);
    eventually("A is out", || spread(&gw, 6) == (0, 6));
    assert_eq!(spread(&gw, 20), (0, 20));
    drop(gw);
}

#[test]
fn every_server_failing_its_check_is_503_and_tcp_checks_remain() {
    let a = Server::start("A", false);
    let gw = gateway(
        &[&a],
        r#"health_check = { path = "/readyz", interval_ms = 100, timeout_ms = 500 }"#,
    );
    eventually("A is checked", || a.checks.load(Ordering::SeqCst) >= 1);
    eventually("A is out", || gw.get("/x").status == 503);
    gw.get("/x").assert_envelope(503, "service unavailable");
    eventually("no server counted healthy", || healthy(&gw) == 0.0);
    drop(gw);

    // A TCP check only asks for a connection: the same server counts as healthy.
    let gw = gateway(
        &[&a],
        r#"health_check = { kind = "tcp", interval_ms = 100, timeout_ms = 500 }"#,
    );
    thread::sleep(Duration::from_millis(300));
    assert_eq!(gw.get("/x").text(), "A");
    assert_eq!(a.checks.load(Ordering::SeqCst), {
        let before = a.checks.load(Ordering::SeqCst);
        thread::sleep(Duration::from_millis(300));
        before
    });
}

/// dnsmasq on a loopback port of its own: `control.test` is 127.0.0.1, and the SRV name
/// `_http._tcp.control.test` lists the given ports. Answers live one second.
struct Dns {
    child: Option<std::process::Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Dns {
    fn start(srv_ports: &[u16]) -> Dns {
        let dir = tempfile::tempdir().unwrap();
        // dnsmasq may read its files as another user.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(dir.path().join("hosts"), "127.0.0.1 control.test\n").unwrap();
        let mut dns = Dns {
            child: None,
            port: common::free_port(),
            dir,
        };
        dns.serve(srv_ports);
        dns
    }

    /// (Re)starts the server with these SRV answers.
    fn serve(&mut self, srv_ports: &[u16]) {
        self.stop();
        let mut cmd = std::process::Command::new("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            &format!("--port={}", self.port),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--local-ttl=1",
            &format!("--addn-hosts={}", self.dir.path().join("hosts").display()),
        ]);
        if nix_root() {
            cmd.arg("--user=root");
        }
        for port in srv_ports {
            cmd.arg(format!(
                "--srv-host=_http._tcp.control.test,control.test,{port}"
            ));
        }
        let path = format!(
            "/usr/sbin:/sbin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        self.child = Some(
            cmd.env("PATH", path)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("dnsmasq (scripts/setup.sh installs dnsmasq-base)"),
        );
        // Answers once it is up.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        // A query for control.test, type A.
        let query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07control\x04test\x00\x00\x01\x00\x01";
        eventually("dnsmasq answers", || {
            socket.send_to(query, ("127.0.0.1", self.port)).is_ok()
                && socket.recv(&mut [0u8; 512]).is_ok()
        });
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop();
    }
}

/// dnsmasq drops privileges to `nobody` unless told otherwise, which it may only be as root.
fn nix_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"))
}

fn ready(gw: &Gateway) -> serde_json::Value {
    let r = common::request(gw.admin, &common::get("/readyz"));
    serde_json::from_str(&r.text()).unwrap_or_default()
}

#[test]
fn names_are_followed_as_their_answers_change_and_a_dead_name_keeps_its_last_addresses() {
    let (a, b, c) = (
        Server::start("A", true),
        Server::start("B", true),
        Server::start("C", true),
    );
    let mut dns = Dns::start(&[a.addr.port(), b.addr.port()]);
    let gw = Gateway::start(&format!(
        r#"
[dns]
nameservers = ["127.0.0.1:{dns}"]
min_ttl_ms = 200
max_ttl_ms = 500
timeout_ms = 300

[[upstreams]]
name = "app"
servers = ["_http._tcp.control.test"]

[[upstreams]]
name = "byhost"
servers = ["control.test:{c}"]

[[routes]]
name = "byhost"
path_prefix = "/host/"
upstream = "byhost"
auth = "public"

[[routes]]
name = "app"
path_prefix = "/"
upstream = "app"
auth = "public"
"#,
        dns = dns.port,
        c = c.addr.port(),
    ));
    // A host name with a port: its address, that port.
    eventually("byhost resolved", || gw.get("/host/x").text() == "C");
    // An SRV name with two targets: both take their share.
    eventually("both SRV targets serve", || {
        let (x, y) = spread(&gw, 10);
        x > 0 && y > 0
    });
    let r = ready(&gw);
    assert_eq!(r["data"]["upstreams"][0]["dns"], "ok", "{r}");
    assert_eq!(r["data"]["upstreams"][0]["servers"], 2, "{r}");

    // The name moves to C alone: every request follows it, none fails on the way.
    dns.serve(&[c.addr.port()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = gw.get("/x");
        assert_eq!(r.status, 200, "{}", r.text());
        if r.text() == "C" && spread_c(&gw, 10) == 10 {
            break;
        }
        assert!(Instant::now() < deadline, "never moved to C");
    }

    // The name stops resolving: the last good address stays in use, and that is visible.
    dns.stop();
    eventually("the failure is seen", || {
        ready(&gw)["data"]["upstreams"][0]["dns"]
            .as_str()
            .is_some_and(|s| s.starts_with("failing"))
    });
    assert_eq!(spread_c(&gw, 10), 10);
    let m = parse_metrics(&gw.metrics());
    assert!(m[r#"gateway_dns_resolutions_total{result="failed",upstream="app"}"#] >= 1.0);
    assert!(m[r#"gateway_dns_resolutions_total{result="ok",upstream="app"}"#] >= 2.0);
}

/// How many of `n` requests C answered.
fn spread_c(gw: &Gateway, n: usize) -> usize {
    (0..n).filter(|_| gw.get("/x").text() == "C").count()
}

#[test]
fn servers_that_fail_in_a_row_are_ejected_and_come_back() {
    let a = Server::start("A", true);
    let failing = Server::with_mode("F", true, Mode::Status(503));
    let stalled = Server::with_mode("S", true, Mode::Stall);
    let gw = gateway_for(
        &format!("\"{}\", \"{}\", \"{}\"", a.addr, failing.addr, stalled.addr),
        "read_timeout_ms = 300\n\
         outlier_detection = { consecutive_failures = 2, ejection_ms = 1500, max_ejection_ms = 10000, max_ejected_percent = 67 }",
    );
    // Round robin: each bad server fails twice, then only A answers.
    let mut answers = Vec::new();
    for _ in 0..30 {
        let r = gw.get("/x");
        if r.status != 200 {
            assert!(matches!(r.status, 503 | 504), "{} {}", r.status, r.text());
            assert!(
                r.text().starts_with(r#"{"status":"error","#),
                "{}",
                r.text()
            );
        }
        answers.push(r.text());
    }
    let tail: Vec<&String> = answers[10..].iter().collect();
    assert!(
        tail.iter().all(|t| *t == "A"),
        "after ejection: {answers:?}"
    );
    assert_eq!(failing.requests.load(Ordering::SeqCst), 2);
    assert_eq!(stalled.requests.load(Ordering::SeqCst), 2);
    let m = parse_metrics(&gw.metrics());
    assert_eq!(
        m[r#"gateway_upstream_ejections_total{upstream="app"}"#],
        2.0
    );
    assert_eq!(healthy(&gw), 1.0);
    // After the ejection they get traffic again (and, failing still, go out again).
    thread::sleep(Duration::from_millis(1600));
    eventually("the 503 server is tried again", || {
        gw.get("/x");
        failing.requests.load(Ordering::SeqCst) > 2
    });
}

#[test]
fn connect_failures_retry_elsewhere_and_resets_only_for_idempotent_requests() {
    let a = Server::start("A", true);
    let refused = common::closed_port();
    let gw = gateway_for(&format!("\"127.0.0.1:{refused}\", \"{}\"", a.addr), "");
    // Nothing reached the refusing server: GET and POST alike go to A.
    for _ in 0..4 {
        assert_eq!(gw.get("/x").text(), "A");
        let post = gw.send(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi");
        assert_eq!(post.text(), "A");
    }
    let m = parse_metrics(&gw.metrics());
    assert!(m[r#"gateway_upstream_retries_total{reason="connect",upstream="app"}"#] >= 4.0);
    drop(gw);

    // A server that drops the second request of each connection, unanswered.
    let flaky = Server::with_mode("K", true, Mode::CloseSecond);
    let gw = gateway_for(&format!("\"{}\"", flaky.addr), "");
    // The pause lets the gateway put the upstream connection back in its pool, so that the
    // next request reuses it.
    let pause = || thread::sleep(Duration::from_millis(150));
    let reused_retries = |gw: &Gateway| parse_metrics(&gw.metrics())[r#"gateway_upstream_retries_total{reason="reused_connection",upstream="app"}"#];
    assert_eq!(gw.get("/one").text(), "K");
    // GET on the reused connection: dropped, tried again on a new one. Under load the pool may
    // take the connection back later than the pause, and the GET then goes out on a new one
    // (answered, nothing to retry): ask again until a GET met the reused connection.
    eventually("a GET on a reused connection is retried", || {
        pause();
        assert_eq!(gw.get("/two").text(), "K");
        reused_retries(&gw) >= 1.0
    });
    assert_eq!(
        reused_retries(&gw),
        1.0,
        "one retry for the one dropped GET"
    );
    // POST on a reused connection: the server may have acted on it, so it is never sent
    // twice; the client gets the 502 envelope.
    let mut dropped = 0;
    // Until one POST met a reused connection (as for the GET, the pool's timing varies).
    for _ in 0..20 {
        if dropped > 0 {
            break;
        }
        pause();
        let before = flaky.requests.load(Ordering::SeqCst);
        let post = gw.send(b"POST /pay HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi");
        assert_eq!(
            flaky.requests.load(Ordering::SeqCst) - before,
            1,
            "sent once"
        );
        if post.status == 502 {
            assert!(post.text().starts_with(r#"{"status":"error","#));
            dropped += 1;
        } else {
            assert_eq!(post.text(), "K");
        }
    }
    assert!(dropped >= 1, "no POST met a reused connection");
    let m = parse_metrics(&gw.metrics());
    assert_eq!(
        m[r#"gateway_upstream_retries_total{reason="reused_connection",upstream="app"}"#], 1.0,
        "a POST was retried"
    );
    drop(gw);

    // An empty budget: no retry, the refusal counted.
    let gw = gateway_for(
        &format!("\"127.0.0.1:{refused}\", \"{}\"", a.addr),
        "retry_budget = { percent = 0, min_per_second = 0 }",
    );
    let statuses: Vec<u16> = (0..4).map(|_| gw.get("/x").status).collect();
    assert!(statuses.contains(&502), "{statuses:?}");
    let m = parse_metrics(&gw.metrics());
    assert!(
        m[r#"gateway_upstream_retries_total{reason="refused_by_budget",upstream="app"}"#] >= 1.0
    );
}
