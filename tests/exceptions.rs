//! No exceptions: every error an envelope, every connection bounded, on HTTP/1.1 and HTTP/2.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tls::{client, h2_connect, Pki};
use common::upstream::Upstream;
use common::{free_port, parse_metrics, Conn, Gateway};

/// The routes here: `/u/` (public), `/u/ws` (WebSocket) and the login route, over plain HTTP/1.1
/// and TLS with h2.
fn gateway(up: &Upstream, server: &str) -> (Gateway, u16, Pki) {
    let pki = Pki::new();
    let (cert, key, _) = pki.issue(&["api.test"]);
    let tls_port = free_port();
    let gw = Gateway::start_full(
        server,
        &format!(
            r#"
[tls]
listen = "127.0.0.1:{tls_port}"
http2 = true
certificates = [{{ cert_file = "api.pem", key_file = "api.key" }}]

[[upstreams]]
name = "app"
servers = ["{up}"]

[[routes]]
name = "tunnel"
path = "/u/ws"
upstream = "app"
auth = "public"
websocket = true

[[routes]]
name = "app"
path_prefix = "/u/"
upstream = "app"
auth = "public"

{login}
"#,
            up = up.addr,
            login = common::login_route("app", ""),
        ),
        &[],
        &[("api.pem", &cert), ("api.key", &key)],
    );
    (gw, tls_port, pki)
}

fn metric(text: &str, series: &str) -> f64 {
    parse_metrics(text).get(series).copied().unwrap_or(0.0)
}

#[test]
fn heads_pingora_would_refuse_get_the_envelope_and_are_counted() {
    let up = Upstream::start();
    let (gw, _, _) = gateway(&up, "max_headers = 100\nmax_header_bytes = 32768");
    let small = |n: usize| -> String { (0..n).map(|i| format!("X-H{i}: v\r\n")).collect() };
    let cases: Vec<(String, u16, &str)> = vec![
        // 300 small headers, 5 KB in all: Pingora's own limit is 256.
        (
            format!("GET /u/ok HTTP/1.1\r\nHost: t\r\n{}\r\n", small(300)),
            431,
            "request header fields too large",
        ),
        (
            format!("GET /u/ok HTTP/1.1\r\nHost: t\r\n{}\r\n", small(101)),
            431,
            "request header fields too large",
        ),
        (
            format!(
                "GET /u/ok HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
                "a".repeat(40_000)
            ),
            431,
            "request header fields too large",
        ),
        (
            format!(
                "GET /u/ok HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
                "a".repeat(2_000_000)
            ),
            431,
            "request header fields too large",
        ),
        (
            "GET /u/ok HTTP/2.0\r\nHost: t\r\n\r\n".into(),
            400,
            "invalid request",
        ),
        (
            "GET /u/ok HTTP/1.1 junk\r\nHost: t\r\n\r\n".into(),
            400,
            "invalid request",
        ),
        (
            "GET /u/ok HTTP/1.1\r\nBad Name: x\r\n\r\n".into(),
            400,
            "invalid request",
        ),
        (
            "GET /u/ok HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(),
            400,
            "invalid request",
        ),
        (
            "POST /u/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc"
                .into(),
            400,
            "invalid request",
        ),
        (
            "POST /u/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".into(),
            400,
            "invalid request",
        ),
        (
            "POST /u/echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
            400,
            "invalid request",
        ),
        (
            "GET http://evil/u/ok HTTP/1.1\r\nHost: t\r\n\r\n".into(),
            400,
            "invalid request",
        ),
        (
            "CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n".into(),
            501,
            "method not implemented",
        ),
        (
            "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03\r\n\r\n".into(),
            400,
            "invalid request",
        ),
        ("HELLO\r\n\r\n".into(), 400, "invalid request"),
    ];
    for (raw, status, message) in &cases {
        let mut c = Conn::open(gw.addr);
        c.write(raw.as_bytes());
        let r = c.read(false).expect("an answer");
        r.assert_envelope(*status, message);
        assert_eq!(r.header("server"), None, "{raw:.60?}");
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.closed(), "the connection closes after a refused head");
    }
    let m = gw.metrics();
    assert_eq!(
        metric(
            &m,
            r#"gateway_request_heads_refused_total{reason="too_many_headers"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            r#"gateway_request_heads_refused_total{reason="too_large"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            r#"gateway_request_heads_refused_total{reason="malformed"}"#
        ),
        10.0
    );
    assert_eq!(
        metric(
            &m,
            r#"gateway_request_heads_refused_total{reason="connect"}"#
        ),
        1.0
    );
    // Counted by exact status under the route the path matches.
    assert_eq!(
        metric(
            &m,
            r#"gateway_http_requests_total{method="GET",route="app",status="431"}"#
        ),
        4.0
    );
    assert_eq!(
        metric(
            &m,
            r#"gateway_http_requests_total{method="GET",route="app",status="400"}"#
        ),
        4.0
    );
    // The gateway still serves.
    assert_eq!(gw.get("/u/ok").status, 200);
}

#[test]
fn a_431_made_after_parsing_is_counted_under_its_route() {
    // Heads that pass the connection's check but not the route's: over HTTP/2.
    let up = Upstream::start();
    let (gw, tls_port, pki) = gateway(&up, "max_headers = 10");
    let h2 = client(&pki, tls_port, true);
    let mut req = h2.get(format!("https://api.test:{tls_port}/u/ok"));
    for i in 0..12 {
        req = req.header(format!("x-h{i}"), "v");
    }
    let r = req.send().unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(r.headers().get("server"), None);
    let m = gw.metrics();
    assert_eq!(
        metric(
            &m,
            r#"gateway_http_requests_total{method="GET",route="app",status="431"}"#
        ),
        1.0
    );
}

#[test]
fn malformed_chunked_bodies_are_the_clients_fault() {
    let up = Upstream::start();
    let (gw, tls_port, pki) = gateway(&up, "");
    for body in [
        "zz\r\nabc\r\n0\r\n\r\n",
        "3\r\nabcXX\r\n0\r\n\r\n",
        "-1\r\n\r\n",
    ] {
        let raw =
            format!("POST /u/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{body}");
        let r = gw.send(raw.as_bytes());
        r.assert_envelope(400, "invalid request body");
    }
    let m = gw.metrics();
    assert_eq!(
        metric(
            &m,
            r#"gateway_http_requests_total{method="POST",route="app",status="400"}"#
        ),
        3.0
    );
    assert!(
        !m.lines()
            .any(|l| l.starts_with("gateway_http_requests_total") && l.contains("status=\"5")),
        "{m}"
    );
    // HTTP/2 frames bodies itself; a good one still passes.
    let h2 = client(&pki, tls_port, true);
    let r = h2
        .post(format!("https://api.test:{tls_port}/u/echo"))
        .body("abc")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn a_stalled_login_body_is_408_on_http1_and_http2_and_never_goes_upstream() {
    let up = Upstream::start();
    let (gw, tls_port, pki) = gateway(&up, "");
    let body = br#"{"email":"slow@example.com","password":"wrong"}"#;
    let first = &body[..10];

    let mut c = Conn::open(gw.addr);
    c.write(
        format!(
            "POST /api/v1/auth/login HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    c.write(first);
    // The harness sets client_body_timeout_ms = 400.
    c.read(false)
        .unwrap()
        .assert_envelope(408, "request timeout");

    // HTTP/2: the first part in a DATA frame, then nothing. Waiting for the rest would never
    // answer; reading it all would have sent it upstream and answered 401.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, text) = rt.block_on(async {
        let mut h2 = h2_connect(&pki, tls_port).await;
        let req = http::Request::post(format!("https://api.test:{tls_port}/api/v1/auth/login"))
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(())
            .unwrap();
        let (answer, mut stream) = h2.send_request(req, false).unwrap();
        stream
            .send_data(bytes::Bytes::copy_from_slice(first), false)
            .unwrap();
        // A bound for a gateway that would wait for ever, not a measure of speed.
        let answer = tokio::time::timeout(Duration::from_secs(20), answer)
            .await
            .expect("no answer to a stalled HTTP/2 body")
            .unwrap();
        let status = answer.status();
        let mut body = answer.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = body.data().await {
            text.extend_from_slice(&chunk.unwrap());
        }
        (status, String::from_utf8(text).unwrap())
    });
    assert_eq!(status, 408);
    assert_eq!(text, r#"{"status":"error","message":"request timeout"}"#);

    let m = gw.metrics();
    assert_eq!(
        metric(
            &m,
            r#"gateway_http_requests_total{method="POST",route="login",status="408"}"#
        ),
        2.0,
        "{m}"
    );
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn every_error_status_gets_its_default_message() {
    let up = Upstream::start();
    let (gw, tls_port, pki) = gateway(&up, "");
    let contract = |code: u16| -> Option<&'static str> {
        Some(match code {
            400 => "invalid request body",
            401 => "missing or invalid authorization header",
            403 => "forbidden",
            404 => "not found",
            405 => "method not allowed",
            408 => "request timeout",
            409 => "conflict",
            413 => "request body too large",
            429 => "rate limit exceeded",
            431 => "request header fields too large",
            500 => "internal server error",
            502 => "upstream unavailable",
            503 => "service unavailable",
            504 => "upstream timeout",
            _ => return None,
        })
    };
    let h2 = client(&pki, tls_port, true);
    for code in 400u16..=599 {
        let expected =
            contract(code)
                .map(str::to_string)
                .unwrap_or_else(|| {
                    match http::StatusCode::from_u16(code)
                        .ok()
                        .and_then(|s| s.canonical_reason())
                    {
                        Some(reason) => reason.to_lowercase(),
                        None if code < 500 => "request failed".into(),
                        None => "internal server error".into(),
                    }
                });
        let r = gw.get(&format!("/u/status/{code}"));
        r.assert_envelope(code, &expected);
        if code % 10 == 2 {
            let r = h2
                .get(format!("https://api.test:{tls_port}/u/status/{code}"))
                .send()
                .unwrap();
            assert_eq!(r.status().as_u16(), code);
            let body = r.text().unwrap();
            assert_eq!(
                body,
                format!("{{\"status\":\"error\",\"message\":\"{expected}\"}}")
            );
        }
    }
    // The README's examples.
    assert_eq!(
        gw.get("/u/status/402").text(),
        r#"{"status":"error","message":"payment required"}"#
    );
    assert_eq!(
        gw.get("/u/status/510").text(),
        r#"{"status":"error","message":"not extended"}"#
    );
}

#[test]
fn a_head_has_one_deadline_for_all_of_it() {
    let up = Upstream::start();
    let (gw, _, _) = gateway(&up, "client_header_timeout_ms = 600");
    // One byte every 100 ms: each read is quick, the whole is not.
    let start = Instant::now();
    let mut c = Conn::open(gw.addr);
    c.write(b"GET /u/ok HTTP/1.1\r\n");
    let mut answer = None;
    for b in b"X-Slow: abcdefghijklmnopqrstuvwxyz\r\n".iter() {
        if c.try_send_byte(*b).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if start.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    if let Ok(r) = c.read(false) {
        answer = Some(r);
    }
    let r = answer.expect("a 408 before the head was done");
    r.assert_envelope(408, "request timeout");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(c.closed());
    // A connection that never sends a byte is closed (nothing to answer) by the same deadline.
    let mut silent = TcpStream::connect(gw.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 1];
    assert_eq!(silent.read(&mut buf).unwrap_or(0), 0);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let m = gw.metrics();
    assert_eq!(
        metric(
            &m,
            r#"gateway_request_heads_refused_total{reason="timeout"}"#
        ),
        1.0
    );
}

/// Opens `n` connections that each send the start of a head and stop.
fn partial_heads(gw: &Gateway, n: usize) -> Vec<Conn> {
    (0..n)
        .map(|_| {
            let mut c = Conn::open(gw.addr);
            c.write(b"GET /u/ok HTTP/1.1\r\nX-Slow: ");
            c
        })
        .collect()
}

#[test]
fn connections_still_sending_their_head_are_bounded_per_client_and_in_all() {
    let up = Upstream::start();
    let (gw, _, _) = gateway(
        &up,
        "max_pending_heads_per_client = 3\nmax_pending_heads = 5",
    );
    let mut held = partial_heads(&gw, 3);
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = partial_heads(&gw, 1);
    let r = extra[0].read(false).expect("an answer");
    r.assert_envelope(429, "rate limit exceeded");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Heads that arrive whole are never pending: the client is still served.
    assert_eq!(gw.get("/u/ok").status, 200);
    // A finished head frees its place.
    held[0].write(b"x\r\n\r\n");
    assert_eq!(held[0].read(false).unwrap().status, 200);
    let mut again = partial_heads(&gw, 1);
    std::thread::sleep(Duration::from_millis(200));
    again[0].write(b"x\r\n\r\n");
    assert_eq!(again[0].read(false).unwrap().status, 200);
    drop(held);

    // In all: loopback is a trusted proxy here, so only the total bound applies.
    let (gw, _, _) = gateway(
        &up,
        "max_pending_heads_per_client = 1\nmax_pending_heads = 4\ntrusted_proxies = [\"127.0.0.1/32\"]",
    );
    let _held = partial_heads(&gw, 4);
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = partial_heads(&gw, 1);
    extra[0]
        .read(false)
        .expect("an answer")
        .assert_envelope(503, "service unavailable");
    let m = gw.metrics();
    assert_eq!(
        metric(&m, r#"gateway_request_heads_refused_total{reason="busy"}"#),
        1.0
    );
}

/// A TLS connection that negotiated `alpn`, left idle: how long until the server closes it.
fn idle_tls_lifetime(pki: &Pki, port: u16, alpn: &[u8], hello: &[u8]) -> Duration {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = rustls::pki_types::ServerName::try_from("api.test").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(hello).unwrap();
    assert_eq!(tls.conn.alpn_protocol(), Some(alpn));
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => return start.elapsed(),
            Ok(_) => {}
        }
        if start.elapsed() > Duration::from_secs(10) {
            return start.elapsed();
        }
    }
}

#[test]
fn idle_connections_close_after_the_keepalive_timeout_on_http1_and_http2() {
    let up = Upstream::start();
    let (gw, tls_port, pki) = gateway(&up, "keepalive_timeout_seconds = 1");
    // HTTP/2: the client preface and an empty SETTINGS frame, then nothing.
    let h2_hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let lifetime = idle_tls_lifetime(&pki, tls_port, b"h2", h2_hello);
    assert!(
        lifetime < Duration::from_secs(4),
        "h2 idle for {lifetime:?}"
    );
    // HTTP/1.1 over TLS: one request, then idle.
    let h1 = b"GET /u/ok HTTP/1.1\r\nHost: api.test\r\n\r\n";
    let lifetime = idle_tls_lifetime(&pki, tls_port, b"http/1.1", h1);
    assert!(
        lifetime < Duration::from_secs(4),
        "h1 idle for {lifetime:?}"
    );
    drop(gw);
}

#[test]
fn upgraded_connections_are_counted_apart_from_request_latency() {
    let up = Upstream::start();
    let (gw, _, _) = gateway(&up, "");
    {
        let mut c = Conn::open(gw.addr);
        let r = c.send(
            b"GET /u/ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        );
        assert_eq!(r.status, 101);
        std::thread::sleep(Duration::from_millis(300));
        c.stream().write_all(b"bye").unwrap();
        let mut buf = [0u8; 3];
        c.stream().read_exact(&mut buf).unwrap();
    }
    assert_eq!(gw.get("/u/ok").status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    let m = loop {
        let m = gw.metrics();
        if metric(&m, r#"gateway_upgraded_connections_total{route="tunnel"}"#) >= 1.0
            || Instant::now() > deadline
        {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        metric(&m, r#"gateway_upgraded_connections_total{route="tunnel"}"#),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"gateway_upgraded_duration_seconds_count{route="tunnel"}"#
        ),
        1.0
    );
    assert!(
        metric(
            &m,
            r#"gateway_upgraded_duration_seconds_sum{route="tunnel"}"#
        ) >= 0.3
    );
    // The request latency histogram holds the ordinary request only.
    assert_eq!(
        metric(
            &m,
            r#"gateway_http_request_duration_seconds_count{route="tunnel"}"#
        ),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            r#"gateway_http_request_duration_seconds_count{route="app"}"#
        ),
        1.0
    );
    // Counted as an answer all the same.
    assert_eq!(
        metric(
            &m,
            r#"gateway_http_requests_total{method="GET",route="tunnel",status="101"}"#
        ),
        1.0
    );
}
