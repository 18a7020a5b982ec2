//! Graceful shutdown and zero-downtime upgrade of the real binary.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::upstream::Upstream;
use common::{get, try_request, Gateway};

/// The gateway with `server` keys and one public route (`/u/`) to the test upstream.
fn gateway(up: &Upstream, server: &str) -> Gateway {
    Gateway::start_full(
        server,
        &format!(
            r#"
[[upstreams]]
name = "app"
servers = ["{up}"]
read_timeout_ms = 5000

[[routes]]
name = "app"
path_prefix = "/u/"
upstream = "app"
auth = "public"
"#,
            up = up.addr
        ),
        &[],
        &[],
    )
}

#[test]
fn sigterm_finishes_in_flight_requests_and_stops_accepting() {
    let up = Upstream::start();
    let mut gw = gateway(&up, "shutdown_grace_seconds = 2");
    let addr = gw.addr;
    // A request the upstream answers after 1.5 s, in flight when SIGTERM arrives.
    let slow =
        std::thread::spawn(move || try_request(addr, &get("/u/slow-headers")).map(|r| r.status));
    std::thread::sleep(Duration::from_millis(300));
    gw.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        std::net::TcpStream::connect(addr).is_err() || try_request(addr, &get("/u/ok")).is_err(),
        "new connections are not served after SIGTERM"
    );
    assert_eq!(
        slow.join().unwrap().unwrap(),
        200,
        "the in-flight request finished"
    );
    let status = gw
        .wait_exit(Duration::from_secs(15))
        .expect("the process exits after the grace period");
    assert!(status.success(), "{status:?}");
}

#[test]
fn graceful_upgrade_drops_no_request() {
    let up = Upstream::start();
    let mut old = gateway(&up, "shutdown_grace_seconds = 1");
    let addr = old.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    // A new connection per request: every accept goes through the handover.
                    let ok = try_request(addr, &get("/u/ok")).is_ok_and(|r| r.status == 200);
                    sent.fetch_add(1, Ordering::SeqCst);
                    if !ok {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(300));
    let mut new = old.spawn_upgrade();
    std::thread::sleep(Duration::from_millis(500));
    let before = sent.load(Ordering::SeqCst);
    old.signal("QUIT");
    // The old process keeps serving while both accept, then drains and exits.
    let exited = old.wait_exit(Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.join().unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!(
        "graceful upgrade: {sent} requests ({} during the switch), {failed} failed",
        sent - before
    );
    assert!(exited.is_some(), "the old process did not exit");
    assert!(matches!(new.try_wait(), Ok(None)), "the new process runs");
    // The new process serves the same sockets, admin port included.
    assert_eq!(try_request(addr, &get("/u/ok")).unwrap().status, 200);
    assert_eq!(
        try_request(old.admin, &get("/healthz")).unwrap().status,
        200
    );
    let _ = new.kill();
    let _ = new.wait();
    assert!(sent - before > 100, "too little load during the switch");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed during the upgrade"
    );
}

#[test]
fn idle_connections_close_after_the_keepalive_timeout_and_busy_ones_stay() {
    let up = Upstream::start();
    let gw = gateway(&up, "keepalive_timeout_seconds = 1");
    let mut used = common::Conn::open(gw.addr);
    assert_eq!(used.send(&get("/u/ok")).status, 200);
    let mut silent = common::Conn::open(gw.addr);
    let mut busy = common::Conn::open(gw.addr);
    // Requests more often than the timeout keep a connection open.
    for _ in 0..6 {
        assert_eq!(busy.send(&get("/u/ok")).status, 200);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(used.closed(), "idle after a request: closed after 1 s");
    assert!(silent.closed(), "never sent a byte: closed after 1 s");
    assert_eq!(busy.send(&get("/u/ok")).status, 200);
    // The connection's one timer fired while it was busy and was moved on: idle from its last
    // request, it still serves half a timeout later and is closed once a whole one has passed.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(busy.send(&get("/u/ok")).status, 200);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(busy.closed(), "idle again: closed after 1 s");
}

#[test]
fn requests_arriving_in_pieces_are_served_whole() {
    let up = Upstream::start();
    let gw = gateway(&up, "");
    let mut c = common::Conn::open(gw.addr);
    // A head in three pieces, then its body in two.
    let body = "x".repeat(3000);
    let head = format!(
        "POST /u/echo HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    for piece in [
        &head[..5],
        &head[5..30],
        &head[30..],
        &body[..1000],
        &body[1000..],
    ] {
        c.write(piece.as_bytes());
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = c.read(false).expect("response");
    assert_eq!(r.status, 200);
    assert!(
        r.text().ends_with(&body),
        "the whole body reached the upstream"
    );
    // A head larger than one read (12 KiB of headers), on the same connection.
    let big = format!(
        "GET /u/echo HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\nX-After: yes\r\n\r\n",
        "b".repeat(12 * 1024)
    );
    let r = c.send(big.as_bytes());
    assert_eq!(r.status, 200);
    assert!(r.text().contains("x-after: yes") || r.text().contains("X-After: yes"));
    // A body sent together with its head, larger than the first read.
    let body = "y".repeat(20_000);
    let r = c.send(
        format!(
            "POST /u/echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert!(r.text().ends_with(&body));
}

#[test]
fn shutdown_closes_idle_connections_at_once() {
    let up = Upstream::start();
    let mut gw = gateway(&up, "shutdown_grace_seconds = 5");
    let mut idle = common::Conn::open(gw.addr);
    assert_eq!(idle.send(&get("/u/ok")).status, 200);
    // Connected, request not sent yet: about to send it, so shutdown must not close it.
    let mut fresh = common::Conn::open(gw.addr);
    std::thread::sleep(Duration::from_millis(100));
    let started = std::time::Instant::now();
    gw.signal("TERM");
    assert!(
        idle.closed(),
        "an idle keep-alive connection is closed on shutdown"
    );
    let r = fresh.send(&get("/u/ok"));
    assert_eq!(r.status, 200, "a connection's first request is served");
    assert_eq!(r.header("connection"), Some("close"));
    // Well before the 5 s grace period: idle connections do not hold the shutdown up.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    gw.wait_exit(Duration::from_secs(15));
}
