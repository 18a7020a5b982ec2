//! Upstream health: HTTP health checks take a server that answers its check badly out of the
//! rotation and bring it back when it recovers; TCP checks stay available.

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

/// A server that names itself in every answer; its `/readyz` answers 503 while `ready` is
/// false. Counts the health checks it got.
struct Server {
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    checks: Arc<AtomicUsize>,
}

impl Server {
    fn start(name: &'static str, ready: bool) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Arc::new(AtomicBool::new(ready));
        let checks = Arc::new(AtomicUsize::new(0));
        let (r, c) = (ready.clone(), checks.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (r, c) = (r.clone(), c.clone());
                thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut w = conn;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split(' ').nth(1).unwrap_or("").to_string();
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                                break;
                            }
                        }
                        let status = if path == "/readyz" {
                            c.fetch_add(1, Ordering::SeqCst);
                            if r.load(Ordering::SeqCst) {
                                "200 OK"
                            } else {
                                "503 Service Unavailable"
                            }
                        } else {
                            "200 OK"
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
        }
    }
}

fn gateway(servers: &[&Server], check: &str) -> Gateway {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    Gateway::start(&format!(
        r#"
[[upstreams]]
name = "app"
servers = [{servers}]
{check}

[[routes]]
name = "app"
path_prefix = "/"
upstream = "app"
auth = "public"
"#,
        servers = servers.join(", ")
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
