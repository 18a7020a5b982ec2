//! Graceful shutdown and zero-downtime upgrade of the real binary.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::upstream::Upstream;
use common::{get, try_request, Gateway};

fn gateway(up: &Upstream, grace: u64) -> Gateway {
    Gateway::start_full(
        &format!("shutdown_grace_seconds = {grace}"),
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
    let mut gw = gateway(&up, 2);
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
    let mut old = gateway(&up, 1);
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
