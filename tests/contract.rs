//! End-to-end: the real gateway binary in front of a real, misbehaving upstream on 127.0.0.1.
//! Every error that leaves the gateway is the envelope with the right status; success is
//! byte-identical.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::upstream::{pattern, Upstream, HUGE};
use common::{closed_port, get, parse_metrics, Conn, Framing, Gateway};

/// A gateway in front of `up` with the routes every test here uses.
fn gateway(up: &Upstream) -> Gateway {
    Gateway::start(&format!(
        r#"
[[upstreams]]
name = "app"
servers = ["{up}"]
connect_timeout_ms = 500
read_timeout_ms = 700
write_timeout_ms = 1000

# The same server for tunnels, which stay quiet for longer than a request may.
[[upstreams]]
name = "tunnels"
servers = ["{up}"]
read_timeout_ms = 10000

[[upstreams]]
name = "dead"
servers = ["127.0.0.1:{dead}"]
connect_timeout_ms = 500

[[upstreams]]
name = "down"
servers = ["127.0.0.1:{down}"]
connect_timeout_ms = 200
health_check_interval_ms = 100

[[routes]]
name = "app"
path_prefix = "/u/"
upstream = "app"
auth = "public"
max_body_bytes = 1024

[[routes]]
name = "tunnel"
path = "/u/ws"
upstream = "tunnels"
auth = "public"
websocket = true

[[routes]]
name = "only-get"
path_prefix = "/only-get"
methods = ["GET"]
upstream = "app"
auth = "public"

[[routes]]
name = "dead"
path_prefix = "/dead"
upstream = "dead"
auth = "public"

[[routes]]
name = "down"
path_prefix = "/down"
upstream = "down"
auth = "public"
"#,
        up = up.addr,
        dead = closed_port(),
        down = closed_port(),
    ))
}

#[test]
fn success_passes_byte_identical() {
    let up = Upstream::start();
    let gw = gateway(&up);

    let r = gw.get("/u/ok");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, br#"{"status":"success","data":{"id":1}}"#);
    assert_eq!(r.framing, Framing::Length);
    assert_eq!(r.header("content-type"), Some("application/json"));

    let r = gw.get("/u/created");
    assert_eq!(r.status, 201);
    assert_eq!(r.body, br#"{"status":"success","data":{"id":2}}"#);

    let r = gw.get("/u/ok-chunked");
    assert_eq!((r.status, r.framing), (200, Framing::Chunked));
    assert_eq!(r.body, br#"{"status":"success","data":[1,2,3]}"#);

    for path in ["/u/big", "/u/big-chunked"] {
        let r = gw.get(path);
        assert_eq!(r.status, 200, "{path}");
        assert!(r.complete, "{path}");
        assert_eq!(r.body.len(), HUGE, "{path}");
        assert!(r.body == pattern(HUGE), "{path}: body differs");
    }

    let r = gw.get("/u/redirect");
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("/ok"));
    assert!(r.body.is_empty());

    let r = gw.get("/u/not-modified");
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), Some("\"v1\""));

    let r = gw.get("/u/no-content");
    assert_eq!(r.status, 204);

    // A compressed success stays compressed, byte for byte.
    let r = gw.get("/u/gzip-ok");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    let mut plain = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&r.body[..]), &mut plain)
        .unwrap();
    assert_eq!(plain, r#"{"status":"success"}"#);
}

#[test]
fn upstream_errors_become_envelopes() {
    let up = Upstream::start();
    let gw = gateway(&up);
    let cases: &[(&str, u16, &str)] = &[
        ("/u/html-500", 500, "internal server error"),
        ("/u/text-404", 404, "not found"),
        ("/u/text-405", 405, "method not allowed"),
        ("/u/json-422", 422, "email is invalid"),
        ("/u/problem-400", 400, "name is required"),
        ("/u/json-500-sql", 500, "internal server error"),
        ("/u/json-403-nested", 403, "forbidden"),
        ("/u/json-404-multiline", 404, "not found"),
        ("/u/empty-404", 404, "not found"),
        ("/u/empty-503", 503, "service unavailable"),
        (
            "/u/empty-401",
            401,
            "missing or invalid authorization header",
        ),
        ("/u/gzip-404", 404, "no such call"),
        ("/u/gzip-500", 500, "internal server error"),
        ("/u/br-400", 400, "invalid request body"),
        ("/u/chunked-400", 400, "missing field: email"),
        ("/u/chunked-502-empty", 502, "upstream unavailable"),
        ("/u/huge-500", 500, "internal server error"),
        ("/u/huge-404-json", 404, "not found"),
        ("/u/no-such-path", 404, "not found"),
    ];
    for (path, status, message) in cases {
        let r = gw.get(path);
        r.assert_envelope(*status, message);
        let text = r.text();
        for leak in ["db-primary", "Traceback", "pq:", "html", "psycopg"] {
            assert!(!text.contains(leak), "{path} leaked {leak}");
        }
    }

    // Headers that matter to the client survive the rewrite; body headers do not.
    let r = gw.get("/u/html-500");
    assert_eq!(r.framing, Framing::Length);
    assert_eq!(r.header("x-upstream"), Some("kept"));
    assert_eq!(r.header("etag"), None);
    let r = gw.get("/u/text-405");
    assert_eq!(r.header("allow"), Some("GET"));
    let r = gw.get("/u/empty-503");
    assert_eq!(r.header("retry-after"), Some("7"));
    let r = gw.get("/u/empty-401");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(r.header_count("content-length"), 1);

    // An envelope judged from the body still gets an exact length when the body came with the
    // head (one write upstream, as most servers answer): one write to the client, not a chunked
    // head, chunk and last chunk. A body that came later goes out chunked.
    for path in [
        "/u/json-422",
        "/u/problem-400",
        "/u/envelope-409",
        "/u/gzip-404",
    ] {
        let r = gw.get(path);
        assert_eq!(r.framing, Framing::Length, "{path}");
        assert_eq!(r.header("transfer-encoding"), None, "{path}");
        assert_eq!(r.header("content-length"), Some(&*r.body.len().to_string()));
    }
    let r = gw.get("/u/late-body-422");
    assert_eq!(r.framing, Framing::Chunked);
    r.assert_envelope(422, "late but valid");

    // Envelopes pass unchanged, whatever the status.
    let r = gw.get("/u/envelope-409");
    assert_eq!(r.status, 409);
    assert_eq!(
        r.text(),
        r#"{"status":"error","message":"version mismatch"}"#
    );
    let r = gw.get("/u/envelope-500");
    assert_eq!(r.status, 500);
    assert_eq!(
        r.text(),
        r#"{"status":"error","message":"recording store unavailable"}"#
    );
}

#[test]
fn head_requests_get_envelope_headers_without_body() {
    let up = Upstream::start();
    let gw = gateway(&up);
    let mut c = Conn::open(gw.addr);
    for (path, len) in [
        ("/u/html-500", "52"),
        ("/u/empty-404", "40"),
        ("/nowhere", "40"),
    ] {
        let r = c.send(format!("HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        assert!(r.status >= 400, "{path}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{path}");
        assert_eq!(r.header("content-length"), Some(len), "{path}");
        assert_eq!(r.header("content-encoding"), None);
    }
    // Nothing stray was written after the heads: the connection still frames correctly.
    let r = c.send(&get("/u/ok"));
    assert_eq!(r.body, br#"{"status":"success","data":{"id":1}}"#);
}

#[test]
fn keep_alive_connection_survives_every_kind_of_answer() {
    let up = Upstream::start();
    let gw = gateway(&up);
    let mut c = Conn::open(gw.addr);
    let seq: &[(&str, u16)] = &[
        ("/u/html-500", 500),
        ("/u/json-422", 422),
        ("/u/ok", 200),
        ("/u/envelope-409", 409),
        ("/u/text-404", 404),
        ("/nowhere", 404),
        ("/u/gzip-404", 404),
        ("/u/chunked-400", 400),
        ("/u/huge-500", 500),
        ("/u/ok-chunked", 200),
        ("/u/ok", 200),
    ];
    for (path, status) in seq {
        let r = c.send(&get(path));
        assert_eq!(r.status, *status, "{path}");
        assert!(r.complete, "{path}");
        if *status >= 400 {
            assert!(
                r.text().starts_with(r#"{"status":"error","message":""#),
                "{path}"
            );
        }
    }
    let r = c.send(b"POST /only-get HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    r.assert_envelope(405, "method not allowed");
    let r = c.send(&get("/u/ok"));
    assert_eq!(r.status, 200);
}

#[test]
fn gateway_made_errors() {
    let up = Upstream::start();
    let gw = gateway(&up);

    gw.get("/nowhere").assert_envelope(404, "not found");
    gw.get("/u").assert_envelope(404, "not found");

    let r = gw.send(b"DELETE /only-get/x HTTP/1.1\r\nHost: t\r\n\r\n");
    r.assert_envelope(405, "method not allowed");
    assert_eq!(r.header("allow"), Some("GET, HEAD"));

    // Announced body over the cap: refused before reading, connection closed after.
    let mut c = Conn::open(gw.addr);
    let r = c.send(b"POST /u/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n");
    r.assert_envelope(413, "request body too large");
    assert!(c.closed());

    // Chunked body that grows over the cap.
    let mut c = Conn::open(gw.addr);
    c.write(b"POST /u/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    let chunk = format!("400\r\n{}\r\n", "a".repeat(0x400));
    c.write(chunk.as_bytes());
    c.write(chunk.as_bytes());
    c.write(b"0\r\n\r\n");
    c.read(false)
        .unwrap()
        .assert_envelope(413, "request body too large");

    // A body under the cap goes through.
    let r = gw.send(b"POST /u/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(r.status, 200);
    assert!(r.text().ends_with("hello"));

    // Path tricks cannot reach a route by another name.
    for path in [
        "/u/../dead",
        "/u/%2e%2e/dead",
        "/u//ok",
        "/u/./ok",
        "/u/%2fok",
        "/u/%zz",
    ] {
        gw.get(path).assert_envelope(400, "invalid request path");
    }
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn upstream_failures_map_to_502_503_504() {
    let up = Upstream::start();
    let mut gw = gateway(&up);

    let r = gw.get("/dead");
    r.assert_envelope(502, "upstream unavailable");
    for path in [
        "/u/reset-before-headers",
        "/u/close-before-headers",
        "/u/garbage",
    ] {
        gw.get(path).assert_envelope(502, "upstream unavailable");
    }
    gw.get("/u/slow-headers")
        .assert_envelope(504, "upstream timeout");

    // The health check marks the only server of `down` unhealthy within a few intervals.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = gw.get("/down");
        if r.status == 503 || Instant::now() > deadline {
            r.assert_envelope(503, "service unavailable");
            break;
        }
        r.assert_envelope(502, "upstream unavailable");
        std::thread::sleep(Duration::from_millis(50));
    }

    // An error whose body stalls still gets its whole envelope: it is known from the header.
    gw.get("/u/slow-body-500")
        .assert_envelope(500, "internal server error");

    // Once a success header went out, a failing body can only end in a closed connection.
    for path in ["/u/slow-body", "/u/reset-mid-body"] {
        let mut c = Conn::open(gw.addr);
        let r = c.send(&get(path));
        assert_eq!(r.status, 200, "{path}");
        assert!(!r.complete, "{path}: truncated body must not look complete");
        assert!(c.closed(), "{path}");
    }

    assert!(gw.alive(), "the gateway survived every failure");
    gw.get("/u/ok");
}

#[test]
fn connect_timeout_is_504() {
    // A listener whose accept queue is full drops new SYNs, so connecting times out.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(s);
        }
    }
    let gw = Gateway::start(&format!(
        r#"
[[upstreams]]
name = "full"
servers = ["{addr}"]
connect_timeout_ms = 300

[[routes]]
name = "full"
path_prefix = "/"
upstream = "full"
auth = "public"
"#
    ));
    gw.get("/x").assert_envelope(504, "upstream timeout");
    let m = parse_metrics(&gw.metrics());
    assert_eq!(
        m.get(r#"gateway_upstream_failures_total{kind="connect_timeout",route="full",upstream="full"}"#),
        Some(&1.0)
    );
}

/// The upstream request is rebuilt with the gateway's headers (src/proxy.rs): the target it
/// carries must still be the client's, byte for byte, including targets a URI parser escapes.
#[test]
fn request_targets_reach_the_upstream_as_sent() {
    let up = Upstream::start();
    let gw = gateway(&up);
    for target in [
        "/u/echo",
        "/u/echo?a=1&a=2&empty=&%41=%7e",
        "/u/echo?q={a}|b^c",
        "/u/echo?q=a\\b",
        "/u/echo?e=%E2%82%AC&=",
        "http://t/u/echo?absolute=form",
    ] {
        let r = gw.send(format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let line = r.text().lines().next().unwrap_or_default().to_string();
        assert_eq!(line, format!("GET {target} HTTP/1.1"), "{target}");
    }
}

#[test]
fn request_ids_are_kept_made_and_forwarded() {
    let up = Upstream::start();
    let gw = gateway(&up);
    let with_id = |path: &str, id: &str| {
        gw.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\nX-Request-Id: {id}\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n").as_bytes())
    };
    for path in ["/u/ok", "/u/html-500", "/nowhere", "/u/empty-404", "/dead"] {
        let r = with_id(path, "trace-42.a:b_c");
        assert_eq!(r.header("x-request-id"), Some("trace-42.a:b_c"), "{path}");
        assert_eq!(r.header_count("x-request-id"), 1, "{path}");
    }
    let r = with_id("/u/echo", "trace-42");
    let seen = r.text().to_ascii_lowercase();
    assert!(seen.contains("x-request-id: trace-42\r\n"), "{seen}");
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\r\n"), "{seen}");
    assert!(
        !seen.contains("6.6.6.6"),
        "client-sent X-Forwarded-For must not pass: {seen}"
    );

    let r = with_id("/u/echo", "bad id with spaces");
    let made = r.header("x-request-id").unwrap().to_string();
    assert_eq!(made.len(), 32);
    assert!(made.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(r.text().contains(&made));

    let a = gw.get("/u/ok");
    let b = gw.get("/u/ok");
    assert_ne!(a.header("x-request-id"), b.header("x-request-id"));
}

#[test]
fn websocket_upgrade_passes_where_the_route_allows_it() {
    let up = Upstream::start();
    let gw = gateway(&up);
    // A public route that does not say `websocket = true` carries no tunnel.
    let hits = up.hits.load(std::sync::atomic::Ordering::SeqCst);
    let r = gw.send(
        b"GET /u/other HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    r.assert_envelope(400, "upgrade not allowed");
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), hits);
    let mut c = Conn::open(gw.addr);
    let r = c.send(
        b"GET /u/ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(r.status, 101);
    assert_eq!(r.header("upgrade"), Some("websocket"));
    c.stream().write_all(b"ping-frame-bytes").unwrap();
    let mut buf = [0u8; 16];
    std::io::Read::read_exact(c.stream(), &mut buf).unwrap();
    assert_eq!(&buf, b"ping-frame-bytes");
}

#[test]
fn metrics_count_every_answer_by_exact_status() {
    let up = Upstream::start();
    let gw = gateway(&up);
    let mix: &[(&str, usize)] = &[
        ("/u/ok", 3),
        ("/u/html-500", 2),
        ("/u/text-404", 4),
        ("/u/envelope-409", 1),
        ("/u/empty-503", 1),
        ("/nowhere", 2),
        ("/dead", 1),
    ];
    for (path, n) in mix {
        for _ in 0..*n {
            gw.get(path);
        }
    }
    gw.send(b"POST /only-get HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");

    let m = parse_metrics(&gw.metrics());
    let req = |route: &str, method: &str, status: u16| {
        m.get(&format!(
            r#"gateway_http_requests_total{{method="{method}",route="{route}",status="{status}"}}"#
        ))
        .copied()
    };
    assert_eq!(req("app", "GET", 200), Some(3.0));
    assert_eq!(req("app", "GET", 500), Some(2.0));
    assert_eq!(req("app", "GET", 404), Some(4.0));
    assert_eq!(req("app", "GET", 409), Some(1.0));
    assert_eq!(req("app", "GET", 503), Some(1.0));
    assert_eq!(req("unmatched", "GET", 404), Some(2.0));
    assert_eq!(req("dead", "GET", 502), Some(1.0));
    assert_eq!(req("only-get", "POST", 405), Some(1.0));

    let rewritten = |status: u16| {
        m.get(&format!(
            r#"gateway_errors_rewritten_total{{route="app",status="{status}"}}"#
        ))
        .copied()
    };
    assert_eq!(rewritten(500), Some(2.0));
    assert_eq!(rewritten(404), Some(4.0));
    assert_eq!(rewritten(503), Some(1.0));
    assert_eq!(
        rewritten(409),
        None,
        "a passed-through envelope is no violation"
    );

    assert_eq!(
        m.get(r#"gateway_upstream_failures_total{kind="connect_refused",route="dead",upstream="dead"}"#),
        Some(&1.0)
    );
    assert_eq!(
        m.get(r#"gateway_http_request_duration_seconds_count{route="app"}"#),
        Some(&11.0)
    );
    assert_eq!(m.get(r#"gateway_build_info{version="0.1.0"}"#), Some(&1.0));
}

#[test]
fn stalled_client_body_is_408() {
    let up = Upstream::start();
    let gw = gateway(&up);
    let mut c = Conn::open(gw.addr);
    c.write(b"POST /u/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc");
    // The harness sets client_body_timeout_ms = 400, below the upstream read timeout (700).
    c.read(false)
        .unwrap()
        .assert_envelope(408, "request timeout");
}
