//! A real `redis-server` on a free loopback port, started and stopped by the test.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// A running redis-server, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    args: Vec<String>,
    /// Password clients must give, if any.
    pub password: Option<String>,
}

impl RedisServer {
    /// A plain server.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[], None)
    }

    /// A server with extra command-line settings, and the password clients use.
    pub fn start_with(args: &[&str], password: Option<&str>) -> RedisServer {
        let port = free_port();
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if !args.iter().any(|a| a == "--port") {
            args.extend(["--port".to_string(), port.to_string()]);
        }
        let mut r = RedisServer {
            child: None,
            port,
            args,
            password: password.map(str::to_owned),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/setup.sh installs it)");
        self.child = Some(child);
        // A TLS-only server listens on its --tls-port.
        let port = self
            .args
            .iter()
            .position(|a| a == "--tls-port")
            .and_then(|i| self.args.get(i + 1))
            .and_then(|p| p.parse().ok())
            .unwrap_or(self.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not listen on {port}");
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The URL a gateway uses.
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Runs one command over plain RESP and returns the raw reply lines.
    pub fn command(&self, args: &[&str]) -> Vec<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let mut send = |args: &[&str]| {
            let mut req = format!("*{}\r\n", args.len());
            for a in args {
                req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
            }
            out.extend_from_slice(req.as_bytes());
        };
        if let Some(p) = &self.password {
            send(&["AUTH", p]);
        }
        send(args);
        s.write_all(&out).unwrap();
        let mut r = BufReader::new(s);
        let mut lines = Vec::new();
        if self.password.is_some() {
            let mut ok = String::new();
            r.read_line(&mut ok).unwrap();
        }
        let mut first = String::new();
        r.read_line(&mut first).unwrap();
        let first = first.trim_end().to_string();
        if let Some(n) = first.strip_prefix('*') {
            for _ in 0..n.parse::<i64>().unwrap_or(0).max(0) {
                let mut len = String::new();
                r.read_line(&mut len).unwrap();
                let mut item = String::new();
                r.read_line(&mut item).unwrap();
                lines.push(item.trim_end().to_string());
            }
        } else {
            lines.push(first);
        }
        lines
    }

    /// How many scripts the server ran (EVAL and EVALSHA), from `INFO commandstats`.
    pub fn scripts_run(&self) -> u64 {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = String::new();
        if let Some(p) = &self.password {
            req.push_str(&format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{p}\r\n", p.len()));
        }
        req.push_str("*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        if self.password.is_some() {
            r.read_line(&mut line).unwrap(); // +OK
            line.clear();
        }
        r.read_line(&mut line).unwrap(); // $<length> of the bulk string
        let len: usize = line.trim_end().trim_start_matches('$').parse().unwrap();
        let mut body = vec![0u8; len];
        std::io::Read::read_exact(&mut r, &mut body).unwrap();
        String::from_utf8_lossy(&body)
            .lines()
            .filter_map(|l| {
                let rest = l
                    .strip_prefix("cmdstat_evalsha:calls=")
                    .or_else(|| l.strip_prefix("cmdstat_eval:calls="))?;
                rest.split(',').next()?.parse::<u64>().ok()
            })
            .sum()
    }

    /// Keys matching `pattern`.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.command(&["KEYS", pattern])
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where a gateway under test keeps its counters.
pub enum Backend {
    /// In-process.
    Memory,
    /// A Redis of the test's own.
    Redis(RedisServer),
}

impl Backend {
    /// The `[store]` section for this backend.
    pub fn toml(&self) -> String {
        match self {
            Backend::Memory => "[store]\nkind = \"memory\"\n".into(),
            Backend::Redis(r) => format!(
                "[store]\nkind = \"redis\"\nredis_url = \"{}\"\ntimeout_ms = 200\n",
                r.url()
            ),
        }
    }
}

/// Runs one test body against the memory store and against Redis.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn memory() {
                    super::$name(&$crate::common::redis::Backend::Memory)
                }
                #[test]
                fn redis() {
                    let backend = $crate::common::redis::Backend::Redis(
                        $crate::common::redis::RedisServer::start(),
                    );
                    super::$name(&backend);
                    if let $crate::common::redis::Backend::Redis(server) = &backend {
                        assert!(server.scripts_run() > 0, "the Redis store was never used");
                    }
                }
            }
        )*
    };
}
