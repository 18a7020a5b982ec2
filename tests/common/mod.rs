//! Test harness: the real gateway binary, a misbehaving upstream on 127.0.0.1 and a raw HTTP/1.1
//! client that shows framing exactly as it arrives.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub mod go;
pub mod redis;
pub mod tls;
pub mod upstream;

/// A free port on 127.0.0.1 (bound then released; the gateway binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A running gateway process, killed on drop.
pub struct Gateway {
    child: Child,
    /// Public listener.
    pub addr: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// The `[server]` section it was started with, to write a new config for a reload.
    server_block: String,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts the gateway binary with `[server]` filled in and `rest` (upstreams, routes) appended.
    pub fn start(rest: &str) -> Gateway {
        Gateway::start_with(rest, &[], &[])
    }

    /// Like [`Gateway::start`], with environment variables and files written next to the config.
    pub fn start_with(rest: &str, env: &[(&str, &str)], files: &[(&str, &str)]) -> Gateway {
        Gateway::start_full("", rest, env, files)
    }

    /// Like [`Gateway::start_with`], with extra `[server]` keys.
    pub fn start_full(
        server: &str,
        rest: &str,
        env: &[(&str, &str)],
        files: &[(&str, &str)],
    ) -> Gateway {
        // A port handed out by `free_port` may be taken by another process before the gateway
        // binds it; the gateway then refuses to start, and it is started again on new ports.
        for _ in 0..3 {
            if let Some(gw) = Gateway::try_start(server, rest, env, files) {
                return gw;
            }
        }
        panic!("the gateway found its ports taken three times in a row");
    }

    /// One start; `None` when a listening address was taken.
    fn try_start(
        server: &str,
        rest: &str,
        env: &[(&str, &str)],
        files: &[(&str, &str)],
    ) -> Option<Gateway> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let server_block = format!(
            "[server]\nlisten = \"{addr}\"\nadmin_listen = \"{admin}\"\nthreads = 2\n\
             client_body_timeout_ms = 400\nwatch_interval_ms = 100\n\
             upgrade_sock = \"upgrade.sock\"\n{server}\n"
        );
        let text = format!("{server_block}\n{rest}");
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_get2dial-gateway"))
            .args(["run", "--config"])
            .arg(&path)
            .env(
                "RUST_LOG",
                std::env::var("G2D_TEST_GATEWAY_LOG").unwrap_or_else(|_| "error".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            // The gateway's log goes to gateway.log next to its config (`Gateway::log`);
            // G2D_TEST_GATEWAY_LOG=<level> shows it on the terminal instead.
            .stderr(if std::env::var_os("G2D_TEST_GATEWAY_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::from(log)
            })
            .spawn()
            .expect("start the gateway binary");
        let mut gw = Gateway {
            child,
            addr,
            admin,
            server_block,
            _dir: dir,
        };
        if gw.exited_on_taken_port() {
            return None;
        }
        gw.wait_ready();
        Some(gw)
    }

    /// Whether the process ended at start because one of its addresses was taken.
    fn exited_on_taken_port(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return self.log().contains("Address already in use");
            }
            if try_request(self.admin, &get("/healthz")).is_ok_and(|r| r.status == 200) {
                return false;
            }
            thread::sleep(Duration::from_millis(25));
        }
        false
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if TcpStream::connect(self.addr).is_ok() {
                if let Ok(r) = try_request(self.admin, &get("/healthz")) {
                    if r.status == 200 {
                        return;
                    }
                }
            }
            thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "gateway did not become ready on {} / {}",
            self.addr, self.admin
        );
    }

    /// Sends one raw request on a new connection.
    pub fn send(&self, raw: &[u8]) -> Response {
        request(self.addr, raw)
    }

    /// GET `path` on a new connection.
    pub fn get(&self, path: &str) -> Response {
        self.send(&get(path))
    }

    /// The admin `/metrics` text once it has settled: requests are counted in Pingora's
    /// logging phase, just after the answer went out, so a scrape right after the last answer
    /// may miss it. Two identical scrapes 50 ms apart count as settled.
    pub fn metrics(&self) -> String {
        let scrape = || {
            let r = request(self.admin, &get("/metrics"));
            assert_eq!(r.status, 200);
            String::from_utf8(r.body).unwrap()
        };
        let strip = |t: &str| -> String {
            // Histogram sums move with time spent; compare the counters only.
            t.lines()
                .filter(|l| !l.contains("_sum"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut last = scrape();
        for _ in 0..40 {
            thread::sleep(Duration::from_millis(50));
            let next = scrape();
            if strip(&next) == strip(&last) {
                return next;
            }
            last = next;
        }
        last
    }

    /// The config directory (files written next to the config live here).
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Replaces the config file with the same `[server]` section and `rest` (for a reload).
    pub fn rewrite_config(&self, rest: &str) {
        let text = format!("{}\n{rest}", self.server_block);
        std::fs::write(self.dir().join("gateway.toml"), text).unwrap();
    }

    /// Sends a signal (`HUP`, `TERM`, `QUIT`, ...) to the gateway process.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{name} failed");
    }

    /// The gateway's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("gateway.log")).unwrap_or_default()
    }

    /// The log once `ready` holds for it (lines are written by a thread of their own, a moment
    /// after the event), or as it is after 5 s.
    pub fn log_when(&self, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log();
            if ready(&log) || Instant::now() > deadline {
                return log;
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts a second process on the same configuration with `--upgrade`: it waits for this
    /// one's listening sockets, which this one hands over on SIGQUIT.
    pub fn spawn_upgrade(&self) -> Child {
        let log = std::fs::File::create(self.dir().join("upgrade.log")).unwrap();
        Command::new(env!("CARGO_BIN_EXE_get2dial-gateway"))
            .args(["run", "--upgrade", "--config"])
            .arg(self.dir().join("gateway.toml"))
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start the upgrade process")
    }

    /// Waits up to `limit` for the process to exit; its exit status if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET request head.
pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n").into_bytes()
}

/// How the response body was framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length`.
    Length,
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closed.
    Close,
    /// No body by definition (HEAD, 1xx, 204, 304).
    None,
}

/// A response as read off the wire.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub framing: Framing,
    /// False when the connection ended before the framing said the body was complete.
    pub complete: bool,
}

impl Response {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// How many times header `name` occurs.
    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .count()
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts this is exactly the envelope for `status` and `message`, with honest framing.
    #[track_caller]
    pub fn assert_envelope(&self, status: u16, message: &str) {
        let expected = format!("{{\"status\":\"error\",\"message\":\"{message}\"}}");
        assert_eq!(self.status, status, "status; body {:?}", self.text());
        assert_eq!(self.text(), expected);
        assert!(self.complete, "body incomplete");
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert_eq!(
            self.header("content-encoding"),
            None,
            "stale content-encoding"
        );
        assert!(self.header("x-request-id").is_some(), "no request id");
        match self.framing {
            Framing::Length => assert_eq!(
                self.header("content-length"),
                Some(expected.len().to_string().as_str())
            ),
            Framing::Chunked => assert_eq!(self.header("content-length"), None),
            other => panic!("envelope framed as {other:?}"),
        }
    }
}

/// A client connection that can carry several requests (keep-alive).
pub struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    /// Connects to `addr`.
    pub fn open(addr: SocketAddr) -> Conn {
        Conn::try_open(addr).expect("connect")
    }

    /// Connects to `addr`, reporting failure.
    pub fn try_open(addr: SocketAddr) -> std::io::Result<Conn> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        Ok(Conn {
            reader: BufReader::new(s),
        })
    }

    /// Writes raw bytes.
    pub fn write(&mut self, raw: &[u8]) {
        self.reader.get_mut().write_all(raw).expect("write");
    }

    /// Writes one byte, reporting failure (the server may have closed).
    pub fn try_send_byte(&mut self, b: u8) -> std::io::Result<()> {
        self.reader.get_mut().write_all(&[b])
    }

    /// Sends `raw` and reads one response.
    pub fn send(&mut self, raw: &[u8]) -> Response {
        self.write(raw);
        let head_only = raw.starts_with(b"HEAD ");
        self.read(head_only).expect("read response")
    }

    /// Sends `raw` and reads one response, reporting failures.
    pub fn try_send(&mut self, raw: &[u8]) -> std::io::Result<Response> {
        self.reader.get_mut().write_all(raw)?;
        self.read(raw.starts_with(b"HEAD "))
    }

    /// True when the server closed the connection (read returns EOF).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0) | Err(_))
    }

    /// Reads one response.
    pub fn read(&mut self, head_only: bool) -> std::io::Result<Response> {
        let mut head = Vec::new();
        loop {
            let n = self.reader.read_until(b'\n', &mut head)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("closed after {} head bytes", head.len()),
                ));
            }
            if head.ends_with(b"\r\n\r\n") {
                break;
            }
        }
        let mut hdrs = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut hdrs);
        parsed
            .parse(&head)
            .map_err(|e| std::io::Error::other(format!("bad response head: {e}")))?;
        let status = parsed.code.unwrap_or(0);
        let headers: Vec<(String, String)> = parsed
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let mut resp = Response {
            status,
            headers,
            body: Vec::new(),
            framing: Framing::None,
            complete: true,
        };
        if head_only || status < 200 || status == 204 || status == 304 {
            return Ok(resp);
        }
        if resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            resp.framing = Framing::Chunked;
            resp.complete = self.read_chunked(&mut resp.body);
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len.trim().parse().expect("numeric content-length");
            resp.framing = Framing::Length;
            let mut buf = vec![0u8; len];
            let mut got = 0;
            while got < len {
                match self.reader.read(&mut buf[got..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            buf.truncate(got);
            resp.complete = got == len;
            resp.body = buf;
        } else {
            resp.framing = Framing::Close;
            let _ = self.reader.read_to_end(&mut resp.body);
        }
        Ok(resp)
    }

    fn read_chunked(&mut self, body: &mut Vec<u8>) -> bool {
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
            let size = match usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            {
                Ok(s) => s,
                Err(_) => return false,
            };
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let mut t = String::new();
                    match self.reader.read_line(&mut t) {
                        Ok(0) | Err(_) => return false,
                        Ok(_) if t == "\r\n" => return true,
                        Ok(_) => {}
                    }
                }
            }
            let start = body.len();
            body.resize(start + size, 0);
            if self.reader.read_exact(&mut body[start..]).is_err() {
                body.truncate(start);
                return false;
            }
            let mut crlf = [0u8; 2];
            if self.reader.read_exact(&mut crlf).is_err() {
                return false;
            }
        }
    }

    /// The underlying stream.
    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }
}

/// One request on a new connection; panics if no response arrives.
pub fn request(addr: SocketAddr, raw: &[u8]) -> Response {
    try_request(addr, raw).expect("a response")
}

/// One request on a new connection.
pub fn try_request(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Response> {
    let mut c = Conn::try_open(addr)?;
    c.reader.get_mut().write_all(raw)?;
    c.read(raw.starts_with(b"HEAD "))
}

/// Parses `/metrics` text into `series{labels} -> value`, labels sorted as exported.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// A valid user token (HS256, far-future `exp`) for `tenant`, `user` and `role`, signed with
/// `secret` by the `jsonwebtoken` crate.
pub fn mint_token(secret: &str, tenant: &str, user: &str, role: &str) -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let claims = serde_json::json!({"tid": tenant, "sub": user, "role": role,
        "iss": "get2dial", "aud": "get2dial-control", "exp": 4102444800u64});
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("an HS256 token")
}

/// The `[[routes]]` entry of the API's login route on `upstream`: exact path, POST only, the
/// login guard on, and `extra` lines (a rate limit, say).
pub fn login_route(upstream: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"login\"\npath = \"/api/v1/auth/login\"\nmethods = [\"POST\"]\n\
         upstream = \"{upstream}\"\nauth = \"public\"\nlogin_guard = true\nmax_body_bytes = 4096\n\
         {extra}\n"
    )
}

/// `POST /api/v1/auth/login` with `body` as it is.
pub fn login_raw(gw: &Gateway, body: &str) -> Response {
    gw.send(
        format!(
            "POST /api/v1/auth/login HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

/// A login attempt for `email` with `password`.
pub fn login(gw: &Gateway, email: &str, password: &str) -> Response {
    login_raw(
        gw,
        &serde_json::json!({"email": email, "password": password}).to_string(),
    )
}

/// A TCP port with nothing listening behind it.
pub fn closed_port() -> u16 {
    free_port()
}

/// Stops a background thread loop when dropped.
pub struct StopFlag(pub Arc<AtomicBool>);

impl Drop for StopFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Shuts a stream down both ways, ignoring errors.
pub fn hang_up(s: &TcpStream) {
    let _ = s.shutdown(Shutdown::Both);
}
