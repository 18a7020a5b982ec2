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

    /// `INFO <section>` as text (`cluster`: `CLUSTER INFO`, `nodes`: `CLUSTER NODES`).
    pub fn info(&self, section: &str) -> String {
        let args: &[&str] = match section {
            "cluster" => &["CLUSTER", "INFO"],
            "nodes" => &["CLUSTER", "NODES"],
            _ => &["INFO", section],
        };
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        if s.write_all(req.as_bytes()).is_err() {
            return String::new();
        }
        let mut r = BufReader::new(s);
        let mut line = String::new();
        if r.read_line(&mut line).is_err() {
            return String::new();
        }
        let Ok(len) = line.trim_end().trim_start_matches('$').parse::<usize>() else {
            return String::new();
        };
        let mut body = vec![0u8; len];
        if std::io::Read::read_exact(&mut r, &mut body).is_err() {
            return String::new();
        }
        String::from_utf8_lossy(&body).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `done` every 50 ms for up to `secs` seconds; panics with `what` if it never holds.
fn wait_for(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Redis Cluster of the test's own on loopback: masters, each with its replicas, formed by
/// `redis-cli --cluster create`, with a 1 s node timeout so a failover takes seconds.
pub struct RedisCluster {
    /// Every node, masters first as created.
    pub nodes: Vec<RedisServer>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// `masters` masters with `replicas` replicas each.
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|i| {
                let conf = dir.path().join(format!("nodes-{i}.conf"));
                let bus = super::free_port().to_string();
                RedisServer::start_with(
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        conf.to_str().unwrap(),
                        "--cluster-port",
                        &bus,
                        "--cluster-node-timeout",
                        "1000",
                        // Replicas sync at once (not after the 5 s diskless default), so a
                        // master killed early has a replica ready to take over.
                        "--repl-diskless-sync-delay",
                        "0",
                        "--dir",
                        dir.path().to_str().unwrap(),
                    ],
                    None,
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli (scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes, _dir: dir };
        wait_for(20, "the cluster never became ok", || {
            cluster.nodes.iter().all(|n| {
                n.info("cluster").contains("cluster_state:ok")
                    && (n.info("replication").contains("role:master")
                        || n.info("replication").contains("master_link_status:up"))
            })
        });
        cluster
    }

    /// Seed URLs for the gateway (every node).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The index of the node that is master for `key` now.
    pub fn master_of(&self, key: &str) -> usize {
        let slot: u64 = self
            .live()
            .command(&["CLUSTER", "KEYSLOT", key])
            .first()
            .and_then(|l| l.trim_start_matches(':').parse().ok())
            .unwrap();
        let nodes = self.live().info("nodes");
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if !fields.get(2).is_some_and(|f| f.contains("master")) || fields[2].contains("fail") {
                continue;
            }
            for range in &fields[8..] {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) else {
                    continue;
                };
                if (a..=b).contains(&slot) {
                    let port: u16 = fields[1]
                        .split('@')
                        .next()
                        .and_then(|a| a.rsplit(':').next())
                        .and_then(|p| p.parse().ok())
                        .unwrap();
                    return self.nodes.iter().position(|n| n.port == port).unwrap();
                }
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// A node still running.
    fn live(&self) -> &RedisServer {
        self.nodes.iter().find(|n| n.child.is_some()).unwrap()
    }

    /// Waits until the cluster saw the node at `port` fail and every slot has a master that
    /// answers again.
    pub fn wait_failed_over(&self, port: u16) {
        let dead = format!("127.0.0.1:{port}@");
        wait_for(30, "the cluster never failed over", || {
            self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                n.info("cluster").contains("cluster_state:ok")
                    && n.info("nodes")
                        .lines()
                        .any(|l| l.contains(&dead) && l.contains("fail"))
            })
        });
    }

    /// Keys matching `pattern` on every live node.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .flat_map(|n| n.keys(pattern))
            .collect()
    }

    /// Scripts run across every live node.
    pub fn scripts_run(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(RedisServer::scripts_run)
            .sum()
    }
}

/// One master, one replica and one Sentinel watching them under the name `g2d`, with a 1 s
/// down-after so a failover takes seconds.
pub struct RedisSentinel {
    /// The master as started.
    pub master: RedisServer,
    /// Its replica.
    pub replica: RedisServer,
    sentinel: Option<Child>,
    /// The Sentinel's port.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisSentinel {
    /// Starts the three and waits until the Sentinel knows the replica.
    pub fn start() -> RedisSentinel {
        let master = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"], None);
        let replica = RedisServer::start_with(
            &["--replicaof", "127.0.0.1", &master.port.to_string()],
            None,
        );
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor g2d 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds g2d 1000\n\
                 sentinel failover-timeout g2d 5000\n",
                dir.path().display(),
                master.port
            ),
        )
        .unwrap();
        let sentinel = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        let s = RedisSentinel {
            master,
            replica,
            sentinel: Some(sentinel),
            port,
            _dir: dir,
        };
        wait_for(20, "the replica never synced", || {
            s.master.info("replication").contains("connected_slaves:1")
                && s.replica
                    .info("replication")
                    .contains("master_link_status:up")
        });
        wait_for(20, "the Sentinel never saw the replica", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
                && s.sentinel_command(&["SENTINEL", "REPLICAS", "g2d"])
                    .iter()
                    .any(|l| l.trim() == format!("127.0.0.1:{}", s.replica.port))
        });
        s
    }

    /// The URL of the Sentinel.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs one command on the Sentinel (through `redis-cli`: its replies nest); the reply's
    /// lines.
    pub fn sentinel_command(&self, args: &[&str]) -> Vec<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The master's port as the Sentinel names it now.
    pub fn master_port(&self) -> u16 {
        let a = self.sentinel_command(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "g2d"]);
        a.get(1).and_then(|p| p.trim().parse().ok()).unwrap_or(0)
    }

    /// Kills the master and waits until the Sentinel promoted the replica.
    pub fn kill_master_and_wait(&mut self) {
        self.master.kill();
        let replica = self.replica.port;
        wait_for(30, "the Sentinel never failed over", || {
            self.master_port() == replica
                && self.replica.info("replication").contains("role:master")
        });
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        if let Some(mut c) = self.sentinel.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where a gateway under test keeps its counters.
pub enum Backend {
    /// In-process.
    Memory,
    /// A Redis of the test's own.
    Redis(RedisServer),
    /// A 3-master Redis Cluster of the test's own.
    Cluster(RedisCluster),
    /// A Sentinel-watched master and replica of the test's own.
    Sentinel(RedisSentinel),
}

impl Backend {
    /// The `[store]` section for this backend.
    pub fn toml(&self) -> String {
        let list = |urls: &[String]| {
            urls.iter()
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Backend::Memory => "[store]\nkind = \"memory\"\n".into(),
            Backend::Redis(r) => format!(
                "[store]\nkind = \"redis\"\nredis_url = \"{}\"\ntimeout_ms = 200\n",
                r.url()
            ),
            Backend::Cluster(c) => format!(
                "[store]\nkind = \"redis-cluster\"\nredis_urls = [{}]\ntimeout_ms = 200\n",
                list(&c.urls())
            ),
            Backend::Sentinel(s) => format!(
                "[store]\nkind = \"redis-sentinel\"\nredis_urls = [{}]\nmaster_name = \"g2d\"\n\
                 timeout_ms = 200\n",
                list(&[s.url()])
            ),
        }
    }

    /// Scripts the Redis deployment ran (0 for memory).
    pub fn scripts_run(&self) -> u64 {
        match self {
            Backend::Memory => 0,
            Backend::Redis(r) => r.scripts_run(),
            Backend::Cluster(c) => c.scripts_run(),
            Backend::Sentinel(s) => s.master.scripts_run(),
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
                    assert!(backend.scripts_run() > 0, "the Redis store was never used");
                }
            }
        )*
    };
}

/// Runs one test body against the memory store, one Redis, a Redis Cluster and a
/// Sentinel-watched Redis.
#[macro_export]
macro_rules! every_store {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use $crate::common::redis::{Backend, RedisCluster, RedisSentinel, RedisServer};

                fn shared(backend: Backend) {
                    super::$name(&backend);
                    assert!(backend.scripts_run() > 0, "the Redis store was never used");
                }
                #[test]
                fn memory() {
                    super::$name(&Backend::Memory)
                }
                #[test]
                fn redis() {
                    shared(Backend::Redis(RedisServer::start()));
                }
                #[test]
                fn cluster() {
                    shared(Backend::Cluster(RedisCluster::start(3, 0)));
                }
                #[test]
                fn sentinel() {
                    shared(Backend::Sentinel(RedisSentinel::start()));
                }
            }
        )*
    };
}
