//! A real HTTP/1.1 upstream on 127.0.0.1 that misbehaves on purpose, one behaviour per path.
//! It writes raw bytes so that framing, resets and garbage are exactly what the test wants.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use flate2::write::GzEncoder;

/// Size of the "huge" bodies: several megabytes.
pub const HUGE: usize = 5 * 1024 * 1024;

/// A deterministic body of `n` bytes.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| b"0123456789abcdef"[i % 16]).collect()
}

/// The upstream server; stops accepting when dropped.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests received so far.
    pub hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

impl Upstream {
    /// Starts the upstream on a free loopback port.
    pub fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicUsize::new(0));
        let (s, h) = (stop.clone(), hits.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let h = h.clone();
                thread::spawn(move || serve(conn, h));
            }
        });
        Upstream { addr, hits, stop }
    }
}

struct Req {
    method: String,
    path: String,
    head: String,
    body: Vec<u8>,
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Req> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut first = head.lines().next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let mut body = Vec::new();
    let lower = head.to_ascii_lowercase();
    if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        body.resize(len, 0);
        r.read_exact(&mut body).ok()?;
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut line = String::new();
            r.read_line(&mut line).ok()?;
            let n = usize::from_str_radix(line.trim(), 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Some(Req {
        method,
        path,
        head,
        body,
    })
}

fn serve(conn: TcpStream, hits: Arc<AtomicUsize>) {
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut w = write_half;
    let mut r = BufReader::new(conn);
    while let Some(req) = read_request(&mut r) {
        hits.fetch_add(1, Ordering::SeqCst);
        if !respond(&req, &mut w) {
            return;
        }
    }
}

fn simple(w: &mut TcpStream, status: &str, headers: &[(&str, &str)], body: &[u8]) -> bool {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    w.write_all(&bytes).is_ok()
}

fn chunked(w: &mut TcpStream, status: &str, headers: &[(&str, &str)], chunks: &[&[u8]]) -> bool {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("Transfer-Encoding: chunked\r\n\r\n");
    if w.write_all(out.as_bytes()).is_err() {
        return false;
    }
    for c in chunks {
        let mut piece = format!("{:x}\r\n", c.len()).into_bytes();
        piece.extend_from_slice(c);
        piece.extend_from_slice(b"\r\n");
        if w.write_all(&piece).is_err() {
            return false;
        }
        let _ = w.flush();
    }
    w.write_all(b"0\r\n\r\n").is_ok()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Sets SO_LINGER 0 so that closing sends a TCP reset.
fn reset(w: TcpStream) {
    let s = socket2::Socket::from(w);
    let _ = s.set_linger(Some(Duration::ZERO));
    drop(s);
}

const HTML_500: &[u8] = b"<html><body><h1>Internal Server Error</h1><pre>Traceback (most recent call last):\n  File \"/srv/app/views.py\", line 42\npsycopg2.errors.UndefinedTable: relation \"calls\" does not exist\nhost db-primary.internal:5432</pre></body></html>";

/// The password every test account has.
pub const RIGHT_PASSWORD: &str = "right-password";

/// A login endpoint like the API's: 200 for the right password, 401 `invalid credentials`
/// otherwise, 500 for emails starting with `boom`. It answers after 50 ms, so that parallel
/// attempts are in flight together.
fn login(req: &Req, w: &mut TcpStream) -> bool {
    thread::sleep(Duration::from_millis(50));
    let json = [("Content-Type", "application/json")];
    let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
    let email = body["email"].as_str().unwrap_or_default();
    if email.trim().to_lowercase().starts_with("boom") {
        return simple(
            w,
            "500 Internal Server Error",
            &[("Content-Type", "text/html")],
            b"<h1>db down</h1>",
        );
    }
    if body["password"] == RIGHT_PASSWORD {
        simple(
            w,
            "200 OK",
            &json,
            br#"{"status":"success","data":{"token":"t"}}"#,
        )
    } else {
        simple(
            w,
            "401 Unauthorized",
            &json,
            br#"{"status":"error","message":"invalid credentials"}"#,
        )
    }
}

/// Writes the answer for `req`; false closes the connection.
fn respond(req: &Req, w: &mut TcpStream) -> bool {
    let json = [("Content-Type", "application/json")];
    let path = req.path.split('?').next().unwrap_or("");
    // An absolute-form target routes by its path, as a server must accept it (RFC 9112 3.2.2).
    let path = path
        .strip_prefix("http://")
        .and_then(|rest| rest.find('/').map(|slash| &rest[slash..]))
        .unwrap_or(path);
    // Routes under test are mounted at /u/ (plain), /a/ (token) and /l/ (login guard).
    let path = ["/u", "/a", "/l"]
        .iter()
        .find_map(|p| path.strip_prefix(p).filter(|rest| rest.starts_with('/')))
        .unwrap_or(path);
    match path {
        "/ok" | "/api/ok" => simple(w, "200 OK", &json, br#"{"status":"success","data":{"id":1}}"#),
        "/ok-with-cors" => simple(
            w,
            "200 OK",
            &[("Content-Type", "application/json"), ("Access-Control-Allow-Origin", "*"), ("Server", "gunicorn")],
            br#"{"status":"success"}"#,
        ),
        "/created" => simple(w, "201 Created", &json, br#"{"status":"success","data":{"id":2}}"#),
        "/no-content" => w.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").is_ok(),
        "/ok-chunked" => chunked(w, "200 OK", &json, &[b"{\"status\":", b"\"success\",", b"\"data\":[1,2,3]}"]),
        "/big" => simple(w, "200 OK", &[("Content-Type", "application/octet-stream")], &pattern(HUGE)),
        "/big-chunked" => {
            let body = pattern(HUGE);
            let chunks: Vec<&[u8]> = body.chunks(100_000).collect();
            chunked(w, "200 OK", &[("Content-Type", "application/octet-stream")], &chunks)
        }
        "/redirect" => simple(w, "302 Found", &[("Location", "/ok")], b""),
        "/not-modified" => w
            .write_all(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n")
            .is_ok(),
        "/api/v1/auth/login" => login(req, w),
        // Any status with a plain-text body: `/status/418`.
        p if p.starts_with("/status/") => {
            let code = p.trim_start_matches("/status/");
            simple(w, &format!("{code} Whatever"), &[("Content-Type", "text/plain")], b"upstream says no\n")
        }
        p if p == "/echo" || p.starts_with("/api/") => {
            let mut body = req.head.clone().into_bytes();
            body.extend_from_slice(&req.body);
            simple(w, "200 OK", &[("Content-Type", "text/plain")], &body)
        }
        "/html-500" => simple(
            w,
            "500 Internal Server Error",
            &[
                ("Content-Type", "text/html; charset=utf-8"),
                ("ETag", "\"abc\""),
                ("X-Upstream", "kept"),
                ("Server", "Apache/2.4.41 (internal-host-7)"),
                ("X-Powered-By", "PHP/7.2"),
            ],
            HTML_500,
        ),
        "/text-404" => simple(w, "404 Not Found", &[("Content-Type", "text/plain; charset=utf-8"), ("X-Content-Type-Options", "nosniff")], b"404 page not found\n"),
        "/text-405" => simple(w, "405 Method Not Allowed", &[("Content-Type", "text/plain; charset=utf-8"), ("Allow", "GET")], b"Method Not Allowed\n"),
        "/json-422" => simple(w, "422 Unprocessable Entity", &json, br#"{"error":"email is invalid","code":"E_EMAIL"}"#),
        "/problem-400" => simple(
            w,
            "400 Bad Request",
            &[("Content-Type", "application/problem+json")],
            br#"{"type":"about:blank","title":"Bad Request","detail":"name is required"}"#,
        ),
        "/json-500-sql" => simple(w, "500 Internal Server Error", &json, br#"{"message":"pq: duplicate key value violates unique constraint \"users_email_key\""}"#),
        "/json-403-nested" => simple(w, "403 Forbidden", &json, br#"{"error":{"code":403,"reason":"nope"}}"#),
        "/json-404-multiline" => simple(w, "404 Not Found", &json, b"{\"message\":\"line one\\nline two\"}"),
        "/envelope-409" => simple(w, "409 Conflict", &json, br#"{"status":"error","message":"version mismatch"}"#),
        "/envelope-500" => simple(w, "500 Internal Server Error", &json, br#"{"status":"error","message":"recording store unavailable"}"#),
        "/empty-404" => simple(w, "404 Not Found", &[], b""),
        "/empty-503" => simple(w, "503 Service Unavailable", &[("Retry-After", "7")], b""),
        "/empty-401" => simple(w, "401 Unauthorized", &[("WWW-Authenticate", "Bearer")], b""),
        "/gzip-404" => simple(
            w,
            "404 Not Found",
            &[("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
            &gzip(br#"{"message":"no such call"}"#),
        ),
        "/gzip-500" => simple(
            w,
            "500 Internal Server Error",
            &[("Content-Type", "text/html"), ("Content-Encoding", "gzip")],
            &gzip(HTML_500),
        ),
        "/gzip-ok" => simple(
            w,
            "200 OK",
            &[("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
            &gzip(br#"{"status":"success"}"#),
        ),
        "/br-400" => simple(
            w,
            "400 Bad Request",
            &[("Content-Type", "application/json"), ("Content-Encoding", "br")],
            b"\x0b\x02\x80{}\x03",
        ),
        "/chunked-400" => chunked(w, "400 Bad Request", &json, &[b"{\"mess", b"age\":\"missing ", b"field: email\"}"]),
        "/chunked-502-empty" => chunked(w, "502 Bad Gateway", &json, &[]),
        "/huge-500" => {
            let mut body = b"<html>".to_vec();
            body.extend_from_slice(&pattern(HUGE));
            simple(w, "500 Internal Server Error", &[("Content-Type", "text/html")], &body)
        }
        "/huge-404-json" => {
            let mut body = b"{\"message\":\"".to_vec();
            body.extend_from_slice(&pattern(HUGE));
            body.extend_from_slice(b"\"}");
            let chunks: Vec<&[u8]> = body.chunks(64 * 1024).collect();
            chunked(w, "404 Not Found", &json, &chunks)
        }
        "/slow-headers" => {
            thread::sleep(Duration::from_millis(1500));
            simple(w, "200 OK", &json, br#"{"status":"success"}"#)
        }
        "/slow-body" => {
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n0123456789");
            let _ = w.flush();
            thread::sleep(Duration::from_millis(1500));
            false
        }
        // A JSON error whose body comes 200 ms after its head (the envelope cannot be known when
        // the head goes out).
        "/late-body-422" => {
            let body = br#"{"error":"late but valid"}"#;
            let head = format!(
                "HTTP/1.1 422 Unprocessable Entity\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = w.write_all(head.as_bytes());
            let _ = w.flush();
            thread::sleep(Duration::from_millis(200));
            w.write_all(body).is_ok()
        }
        "/slow-body-500" => {
            let _ = w.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/html\r\nContent-Length: 100\r\n\r\n<html>");
            let _ = w.flush();
            thread::sleep(Duration::from_millis(1500));
            false
        }
        "/reset-before-headers" => {
            if let Ok(s) = w.try_clone() {
                reset(s);
            }
            false
        }
        "/close-before-headers" => false,
        "/invalid-headers" => {
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nthis line is no header\r\nContent-Length: 2\r\n\r\nok");
            false
        }
        "/oversized-headers" => {
            let mut head = b"HTTP/1.1 200 OK\r\nX-Huge: ".to_vec();
            head.extend(std::iter::repeat_n(b'a', 2 * 1024 * 1024));
            head.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\nok");
            let _ = w.write_all(&head);
            false
        }
        "/premature-eof" => {
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n");
            let _ = w.write_all(&pattern(100));
            false
        }
        "/keepalive-then-close" => {
            // Answers as if the connection stayed open, then closes it: the gateway's pool
            // holds a dead connection for the next request.
            let ok = simple(w, "200 OK", &[("Content-Type", "application/json"), ("Connection", "keep-alive")], br#"{"status":"success"}"#);
            thread::sleep(Duration::from_millis(20));
            let _ = ok;
            false
        }
        "/garbage" => {
            let _ = w.write_all(b"SSH-2.0-OpenSSH_9.2\r\nthis is not http\r\n\r\n");
            false
        }
        "/reset-mid-body" => {
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n");
            let _ = w.write_all(&pattern(1000));
            let _ = w.flush();
            thread::sleep(Duration::from_millis(100));
            if let Ok(s) = w.try_clone() {
                reset(s);
            }
            false
        }
        p if p == "/ws" || p.starts_with("/ws/") => {
            let key_hdr = req
                .head
                .lines()
                .any(|l| l.to_ascii_lowercase().starts_with("upgrade: websocket"));
            if !key_hdr {
                return simple(w, "400 Bad Request", &json, br#"{"status":"error","message":"not an upgrade"}"#);
            }
            if w
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
                .is_err()
            {
                return false;
            }
            // Echo raw bytes until the peer closes.
            let Ok(mut r) = w.try_clone() else { return false };
            let mut buf = [0u8; 4096];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => {
                        if w.write_all(&buf[..n]).is_err() {
                            return false;
                        }
                    }
                }
            }
        }
        _ => simple(w, "404 Not Found", &[("Content-Type", "text/plain; charset=utf-8")], b"404 page not found\n"),
    }
}
