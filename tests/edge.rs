//! The public edge: TLS with SNI and certificate reload, HTTP/2, CORS, security headers, and a
//! real browser (headless Chromium) calling the gateway from another origin.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::tls::{client, Pki};
use common::upstream::Upstream;
use common::{free_port, get, parse_metrics, Conn, Gateway};
use rustls::pki_types::pem::PemObject;

const UNAUTHORIZED: &str =
    r#"{"status":"error","message":"missing or invalid authorization header"}"#;
const SECRET: &str = "edge-test-secret-0123456789abcdef";

fn token() -> String {
    common::mint_token(SECRET, "t-1", "u-1", "agent")
}

/// The `[jwt]` section, the test upstream and two routes on it: public `/u/`, token `/api/v1/`
/// (with `api_extra` lines).
fn app_and_api(up: &Upstream, api_extra: &str) -> String {
    format!(
        r#"
[jwt]
secrets = ["env:G2D_EDGE_SECRET"]

[[upstreams]]
name = "app"
servers = ["{up}"]

[[routes]]
name = "app"
path_prefix = "/u/"
upstream = "app"
auth = "public"

[[routes]]
name = "api"
path_prefix = "/api/v1/"
upstream = "app"
auth = "jwt"
{api_extra}
"#,
        up = up.addr
    )
}

struct Edge {
    gw: Gateway,
    tls_port: u16,
    pki: Pki,
    api_der: Vec<u8>,
}

fn edge(up: &Upstream, extra: &str) -> Edge {
    let pki = Pki::new();
    let (api_cert, api_key, api_der) = pki.issue(&["api.test"]);
    let (other_cert, other_key, _) = pki.issue(&["other.test", "www.other.test"]);
    let tls_port = free_port();
    let gw = Gateway::start_with(
        &format!(
            r#"
{extra}

[tls]
listen = "127.0.0.1:{tls_port}"
http2 = true
certificates = [
  {{ cert_file = "api.pem", key_file = "api.key", server_names = ["api.test"] }},
  {{ cert_file = "other.pem", key_file = "other.key", server_names = ["other.test", "*.other.test"] }},
]

{}"#,
            app_and_api(up, "")
        ),
        &[("G2D_EDGE_SECRET", SECRET)],
        &[
            ("api.pem", &api_cert),
            ("api.key", &api_key),
            ("other.pem", &other_cert),
            ("other.key", &other_key),
        ],
    );
    Edge {
        gw,
        tls_port,
        pki,
        api_der,
    }
}

/// The leaf certificate the server presents for `sni`, if the handshake verifies for that name.
fn presented_cert(pki: &Pki, port: u16, sni: &str) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(b"GET /u/ok HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let certs = tls.conn.peer_certificates().ok_or("no certificate")?;
    Ok(certs[0].as_ref().to_vec())
}

#[test]
fn https_h1_and_h2_keep_the_contract() {
    let up = Upstream::start();
    let e = edge(&up, "");
    let base = format!("https://api.test:{}", e.tls_port);
    for (label, c, version) in [
        (
            "h1",
            client(&e.pki, e.tls_port, false),
            reqwest::Version::HTTP_11,
        ),
        (
            "h2",
            client(&e.pki, e.tls_port, true),
            reqwest::Version::HTTP_2,
        ),
    ] {
        let r = c.get(format!("{base}/u/ok")).send().unwrap();
        assert_eq!(r.version(), version, "{label}");
        assert_eq!(r.status(), 200);
        assert!(r.headers()["strict-transport-security"]
            .to_str()
            .unwrap()
            .starts_with("max-age="));
        assert_eq!(r.text().unwrap(), r#"{"status":"success","data":{"id":1}}"#);

        for (path, status, body) in [
            (
                "/u/html-500",
                500,
                r#"{"status":"error","message":"internal server error"}"#,
            ),
            (
                "/u/json-422",
                422,
                r#"{"status":"error","message":"email is invalid"}"#,
            ),
            // Judged from a body that came 200 ms after the head, and an envelope passed as is.
            (
                "/u/late-body-422",
                422,
                r#"{"status":"error","message":"late but valid"}"#,
            ),
            (
                "/u/envelope-409",
                409,
                r#"{"status":"error","message":"version mismatch"}"#,
            ),
            (
                "/u/empty-404",
                404,
                r#"{"status":"error","message":"not found"}"#,
            ),
            (
                "/nowhere",
                404,
                r#"{"status":"error","message":"not found"}"#,
            ),
            ("/api/v1/calls", 401, UNAUTHORIZED),
        ] {
            let r = c.get(format!("{base}{path}")).send().unwrap();
            assert_eq!(r.status().as_u16(), status, "{label} {path}");
            let h = r.headers().clone();
            assert_eq!(h["content-type"], "application/json", "{label} {path}");
            assert_eq!(h["x-content-type-options"], "nosniff", "{label} {path}");
            assert!(
                h.get("server").is_none() && h.get("x-powered-by").is_none(),
                "{label} {path}: internals leaked"
            );
            assert!(h.get("transfer-encoding").is_none() || version == reqwest::Version::HTTP_11);
            if let Some(len) = h.get("content-length") {
                assert_eq!(
                    len.to_str().unwrap(),
                    body.len().to_string(),
                    "{label} {path}"
                );
            }
            assert_eq!(r.text().unwrap(), body, "{label} {path}");
        }
        let r = c
            .get(format!("{base}/api/v1/calls"))
            .header("Authorization", format!("Bearer {}", token()))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{label}");
        // The upstream echoes what it got: it is told the client came over TLS.
        let echoed = r.text().unwrap().to_ascii_lowercase();
        assert!(
            echoed.contains("x-forwarded-proto: https\r\n"),
            "{label}: {echoed}"
        );
    }
    let m = parse_metrics(&e.gw.metrics());
    assert_eq!(
        m.get(r#"gateway_http_requests_total{method="GET",route="app",status="500"}"#),
        Some(&2.0)
    );
    // Each served certificate's notAfter, in the future (rcgen's default validity).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for file in ["api.pem", "other.pem"] {
        let key = m
            .keys()
            .find(|k| {
                k.starts_with("gateway_tls_certificate_expiry_timestamp_seconds")
                    && k.contains(file)
            })
            .unwrap_or_else(|| panic!("no expiry for {file}"));
        assert!(m[key] > now, "{key} = {}", m[key]);
    }
    assert_eq!(m.get("gateway_http_requests_in_flight"), Some(&0.0));
    assert_eq!(
        m.get(r#"gateway_http_requests_total{method="GET",route="api",status="401"}"#),
        Some(&2.0)
    );
    // Open client connections by protocol: counted while open, counted out when they close.
    let open = |gw: &Gateway| {
        let m = parse_metrics(&gw.metrics());
        [
            "http1\",tls=\"false",
            "http1\",tls=\"true",
            "h2\",tls=\"true",
        ]
        .map(|l| {
            let series = format!("gateway_client_connections_open{{protocol=\"{l}\"}}");
            m.get(&series).copied().unwrap_or(-1.0)
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while open(&e.gw) != [0.0, 0.0, 0.0] {
        assert!(std::time::Instant::now() < deadline, "{:?}", open(&e.gw));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (h1, h2) = (
        client(&e.pki, e.tls_port, false),
        client(&e.pki, e.tls_port, true),
    );
    for c in [&h1, &h2] {
        assert_eq!(c.get(format!("{base}/u/ok")).send().unwrap().status(), 200);
    }
    let mut plain: Vec<Conn> = (0..3).map(|_| Conn::open(e.gw.addr)).collect();
    for c in &mut plain {
        assert_eq!(c.send(&get("/u/ok")).status, 200);
    }
    assert_eq!(open(&e.gw), [3.0, 1.0, 1.0]);
    drop((h1, h2, plain));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while open(&e.gw) != [0.0, 0.0, 0.0] {
        assert!(
            std::time::Instant::now() < deadline,
            "not counted out: {:?}",
            open(&e.gw)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Plain HTTP carries no HSTS, and the upstream hears it was plain.
    let r = e.gw.get("/u/ok");
    assert!(r.header("strict-transport-security").is_none());
    let r = e.gw.send(
        format!(
            "GET /api/v1/calls HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\r\n",
            token()
        )
        .as_bytes(),
    );
    assert!(r
        .text()
        .to_ascii_lowercase()
        .contains("x-forwarded-proto: http\r\n"));

    // curl, where the machine has it, over HTTP/2.
    if Command::new("curl").arg("--version").output().is_ok() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &e.pki.ca_pem).unwrap();
        let out = Command::new("curl")
            .args(["-sS", "--http2", "--cacert"])
            .arg(&ca)
            .args(["--resolve", &format!("api.test:{}:127.0.0.1", e.tls_port)])
            .args([
                "-w",
                "\n%{http_version} %{http_code}",
                &format!("{base}/u/html-500"),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text,
            "{\"status\":\"error\",\"message\":\"internal server error\"}\n2 500",
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn sni_picks_the_certificate_and_a_swapped_certificate_is_served_after_reload() {
    let up = Upstream::start();
    let e = edge(&up, "");
    assert_eq!(
        presented_cert(&e.pki, e.tls_port, "api.test").unwrap(),
        e.api_der
    );
    // Verification for other.test succeeds only if the other certificate was chosen.
    assert!(presented_cert(&e.pki, e.tls_port, "other.test").is_ok());
    assert!(presented_cert(&e.pki, e.tls_port, "www.other.test").is_ok());
    assert!(
        presented_cert(&e.pki, e.tls_port, "nope.test").is_err(),
        "unknown names get the default, which does not verify"
    );

    // An open keep-alive connection, made before the swap.
    let c = client(&e.pki, e.tls_port, false);
    let base = format!("https://api.test:{}", e.tls_port);
    assert_eq!(c.get(format!("{base}/u/ok")).send().unwrap().status(), 200);

    let (new_cert, new_key, new_der) = e.pki.issue(&["api.test"]);
    std::fs::write(e.gw.dir().join("api.key"), new_key).unwrap();
    std::fs::write(e.gw.dir().join("api.pem"), new_cert).unwrap();
    for f in ["api.key", "api.pem"] {
        std::fs::File::options()
            .write(true)
            .open(e.gw.dir().join(f))
            .unwrap()
            .set_modified(SystemTime::now() + Duration::from_secs(10))
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while presented_cert(&e.pki, e.tls_port, "api.test").unwrap() != new_der {
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The connection made before keeps working.
    assert_eq!(c.get(format!("{base}/u/ok")).send().unwrap().status(), 200);
    // And SIGHUP reloads certificates too.
    e.gw.signal("HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        presented_cert(&e.pki, e.tls_port, "api.test").unwrap(),
        new_der
    );
}

#[test]
fn plain_listener_can_redirect_to_https() {
    let up = Upstream::start();
    let pki = Pki::new();
    let (cert, key, _) = pki.issue(&["api.test"]);
    let tls_port = free_port();
    let gw = Gateway::start_with(
        &format!(
            "[tls]\nlisten = \"127.0.0.1:{tls_port}\"\nplain = \"redirect\"\n\
             certificates = [{{ cert_file = \"c.pem\", key_file = \"c.key\" }}]\n\
             [[upstreams]]\nname = \"app\"\nservers = [\"{}\"]\n\
             [[routes]]\nname = \"app\"\npath_prefix = \"/u/\"\nupstream = \"app\"\nauth = \"public\"\n",
            up.addr
        ),
        &[],
        &[("c.pem", &cert), ("c.key", &key)],
    );
    let r = gw.send(b"GET /u/ok?x=1 HTTP/1.1\r\nHost: api.test:8080\r\n\r\n");
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some(format!("https://api.test:{tls_port}/u/ok?x=1").as_str())
    );
    assert_eq!(r.header("content-length"), Some("0"));
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
}

fn cors_gateway(up: &Upstream, origin: &str) -> Gateway {
    Gateway::start_with(
        &format!(
            r#"
[cors]
allowed_origins = ["{origin}", "https://app.get2dial.com"]
max_age_seconds = 600

{}"#,
            app_and_api(
                up,
                r#"rate_limit = { key = "user", per_minute = 1, burst = 2 }"#
            )
        ),
        &[("G2D_EDGE_SECRET", SECRET)],
        &[],
    )
}

#[test]
fn cors_preflights_and_error_envelopes() {
    let up = Upstream::start();
    let gw = cors_gateway(&up, "https://app.get2dial.com");
    let app = "Origin: https://app.get2dial.com";
    let send = |lines: &[&str], method: &str, path: &str| {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: t\r\n");
        for l in lines {
            raw.push_str(l);
            raw.push_str("\r\n");
        }
        raw.push_str("\r\n");
        gw.send(raw.as_bytes())
    };
    // Preflight at the edge: never authenticated, never sent upstream.
    let r = send(
        &[
            app,
            "Access-Control-Request-Method: GET",
            "Access-Control-Request-Headers: authorization",
        ],
        "OPTIONS",
        "/api/v1/calls",
    );
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.get2dial.com")
    );
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("Authorization, Content-Type, X-Request-Id")
    );
    assert!(r
        .header("access-control-allow-methods")
        .unwrap()
        .contains("DELETE"));
    assert_eq!(r.header("access-control-max-age"), Some("600"));
    assert_eq!(r.header("vary"), Some("Origin"));
    let r = send(
        &[
            "Origin: https://evil.example",
            "Access-Control-Request-Method: GET",
        ],
        "OPTIONS",
        "/api/v1/calls",
    );
    r.assert_envelope(403, "forbidden");
    assert!(r.header("access-control-allow-origin").is_none());
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), 0);

    // Error envelopes carry CORS headers, so browser code can read the message.
    let auth = format!("Authorization: Bearer {}", token());
    for (lines, status) in [
        (vec![app], 401),
        (vec![app, auth.as_str()], 200),
        (vec![app, auth.as_str()], 200),
        (vec![app, auth.as_str()], 429),
    ] {
        let r = send(&lines, "GET", "/api/v1/calls");
        assert_eq!(r.status, status);
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("https://app.get2dial.com"),
            "{status}"
        );
        assert!(r
            .header("access-control-expose-headers")
            .unwrap()
            .contains("Retry-After"));
        assert_eq!(r.header("vary"), Some("Origin"));
    }
    for path in ["/u/html-500", "/nowhere"] {
        let r = send(&[app], "GET", path);
        assert!(r.status >= 400);
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("https://app.get2dial.com"),
            "{path}"
        );
    }
    // An upstream's own CORS header is replaced by the edge's; disallowed origins get none.
    let r = send(&[app], "GET", "/u/ok-with-cors");
    assert_eq!(r.header_count("access-control-allow-origin"), 1);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.get2dial.com")
    );
    assert!(r.header("server").is_none());
    let r = send(&["Origin: https://evil.example"], "GET", "/u/ok-with-cors");
    assert!(r.header("access-control-allow-origin").is_none());
    assert_eq!(r.header("vary"), Some("Origin"));
}

/// Serves one HTML page from `listener` until told to stop.
fn serve_page(listener: TcpListener, html: String) -> std::sync::mpsc::Sender<()> {
    listener.set_nonblocking(true).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || loop {
        if rx.try_recv().is_ok() {
            return;
        }
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).unwrap();
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{html}",
                    html.len()
                );
                let _ = s.write_all(resp.as_bytes());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    });
    tx
}

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// Loads `url` in headless Chromium and returns the DOM after the page's synchronous requests.
fn dump_dom(browser: &str, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_real_browser_reads_data_and_error_envelopes_across_origins() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have chromium (scripts/setup.sh)"
        );
        eprintln!("chromium not installed: skipping the browser test");
        return;
    };
    let up = Upstream::start();
    // The page's origin is known once its listener is bound; the gateway allows that origin.
    let page = TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = format!("http://127.0.0.1:{}", page.local_addr().unwrap().port());
    let gw = cors_gateway(&up, &origin);
    let api = format!("http://127.0.0.1:{}/api/v1/calls", gw.addr.port());
    let script = format!(
        r#"<!doctype html><html><body><pre id="out"></pre><script>
        function call(withToken) {{
          var x = new XMLHttpRequest();
          try {{
            x.open('GET', '{api}', false);
            if (withToken) x.setRequestHeader('Authorization', 'Bearer {token}');
            x.send();
            return x.status + ' ' + x.responseText + ' id=' + (x.getResponseHeader('X-Request-Id') ? 'yes' : 'no');
          }} catch (e) {{ return 'blocked ' + e.name; }}
        }}
        document.getElementById('out').textContent =
          'WITH:' + call(true) + '\n' + 'WITHOUT:' + call(false) + '\n';
        </script></body></html>"#,
        token = token()
    );
    let stop = serve_page(page, script.clone());
    let dom = dump_dom(browser, &format!("{origin}/"));
    let _ = stop.send(());
    // The upstream echoes the request it got: the token passed and the identity was added.
    assert!(
        dom.contains("WITH:200 GET /api/v1/calls"),
        "allowed origin with a token: {dom}"
    );
    assert!(
        dom.to_ascii_lowercase().contains("x-tenant-id: t-1"),
        "{dom}"
    );
    assert!(
        dom.contains(&format!("WITHOUT:401 {UNAUTHORIZED} id=yes")),
        "the 401 envelope is readable: {dom}"
    );

    // The same page from an origin the gateway does not allow: the browser blocks both calls.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();
    let stop = serve_page(other, script);
    let dom = dump_dom(browser, &format!("http://127.0.0.1:{other_port}/"));
    let _ = stop.send(());
    assert!(dom.contains("WITH:blocked"), "disallowed origin: {dom}");
    assert!(dom.contains("WITHOUT:blocked"), "disallowed origin: {dom}");
    let version = Command::new(browser).arg("--version").output().unwrap();
    eprintln!(
        "browser: {}",
        String::from_utf8_lossy(&version.stdout).trim()
    );
}

#[test]
fn https_upstreams_are_verified() {
    // The TLS upstream is a second gateway terminating TLS in front of the plain test upstream.
    let up = Upstream::start();
    let inner = edge(&up, "");
    let front = |extra: &str| {
        Gateway::start_with(
            &format!(
                "[[upstreams]]\nname = \"secure\"\nservers = [\"127.0.0.1:{}\"]\ntls = true\n{extra}\n\
                 [[routes]]\nname = \"s\"\npath_prefix = \"/u/\"\nupstream = \"secure\"\nauth = \"public\"\n",
                inner.tls_port
            ),
            &[("RUST_LOG", "warn")],
            &[("ca.pem", &inner.pki.ca_pem)],
        )
    };
    let gw = front("sni = \"api.test\"\nca_file = \"ca.pem\"");
    let r = gw.get("/u/ok");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), r#"{"status":"success","data":{"id":1}}"#);
    gw.get("/u/html-500")
        .assert_envelope(500, "internal server error");

    // A name the certificate does not carry, or the system roots that do not know the CA: 502.
    front("sni = \"wrong.test\"\nca_file = \"ca.pem\"")
        .get("/u/ok")
        .assert_envelope(502, "upstream unavailable");
    front("sni = \"api.test\"")
        .get("/u/ok")
        .assert_envelope(502, "upstream unavailable");

    // Verification can be turned off only explicitly, and the start says so.
    let gw = front("verify_certificate = false");
    assert_eq!(gw.get("/u/ok").status, 200);
    let log = gw.log_when(|l| l.contains("verification is OFF"));
    assert!(log.contains("verification is OFF"), "{log}");
}
