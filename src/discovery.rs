//! Upstream servers by name: `host:port` resolved to every A/AAAA address, and
//! `_service._proto.name` SRV records (a Kubernetes headless service publishes both) resolved to
//! every target with its port. Names are resolved again when their answer's TTL runs out
//! (clamped between a floor and a ceiling) and sooner after a connect failure; a name that stops
//! resolving keeps its last good addresses, and says so in the log, a metric and `/readyz`.
//! Addresses that disappear leave the rotation; requests already on them finish.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::Backend;

use crate::metrics::Metrics;

/// One `servers` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Server {
    /// An address, used as it is.
    Addr(SocketAddr),
    /// A host name and the port its addresses serve on.
    Host(String, u16),
    /// An SRV name (`_http._tcp.control.default.svc.cluster.local`): targets and ports.
    Srv(String),
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Server::Addr(a) => write!(f, "{a}"),
            Server::Host(h, p) => write!(f, "{h}:{p}"),
            Server::Srv(name) => f.write_str(name),
        }
    }
}

/// `[dns]`: where names are asked and how long answers are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Name servers to ask; empty: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Shortest time between two resolutions of a name, whatever its TTL.
    pub min_ttl: Duration,
    /// Longest time an answer is used before asking again, whatever its TTL.
    pub max_ttl: Duration,
    /// Longest wait for one answer.
    pub timeout: Duration,
}

/// The last good addresses of every name this process resolved: a reload starts from them
/// instead of from nothing.
static KNOWN: LazyLock<Mutex<HashMap<Server, BTreeSet<SocketAddr>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The DNS client of one configuration, made on first use: building one needs the Tokio
/// runtime that will run its lookups (the background one), which the configuration's loader
/// is not in.
pub struct Dns {
    settings: DnsSettings,
    resolver: std::sync::OnceLock<Result<TokioResolver, String>>,
}

impl Dns {
    /// A client for `settings`, not made yet.
    pub fn new(settings: &DnsSettings) -> Dns {
        Dns {
            settings: settings.clone(),
            resolver: std::sync::OnceLock::new(),
        }
    }

    fn get(&self) -> Result<&TokioResolver, String> {
        self.resolver
            .get_or_init(|| resolver(&self.settings).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// A DNS client for `settings` (inside a Tokio runtime).
fn resolver(settings: &DnsSettings) -> std::io::Result<TokioResolver> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if settings.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(std::io::Error::other)?
    } else {
        let servers = settings
            .nameservers
            .iter()
            .map(|addr| {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut ns.connections {
                    c.port = addr.port();
                }
                ns
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), servers),
            provider,
        )
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.timeout = settings.timeout;
    opts.attempts = 2;
    // The gateway decides when to ask again (the TTL, clamped); the client's cache would only
    // hold an answer past the floor.
    opts.cache_size = 0;
    builder.build().map_err(std::io::Error::other)
}

/// The servers of one upstream, as the load balancer discovers them.
pub struct Names {
    upstream: String,
    servers: Vec<Server>,
    dns: Arc<Dns>,
    settings: DnsSettings,
    metrics: Arc<Metrics>,
    /// When to resolve again.
    next: Mutex<Instant>,
    /// Whether the last resolution of some name failed.
    failing: AtomicBool,
    /// The next discovery answers from [`KNOWN`] without asking (a reload's first one).
    seeded: AtomicBool,
}

impl Names {
    /// Discovery for `servers` of `upstream`.
    pub fn new(upstream: &str, servers: &[Server], dns: Arc<Dns>, metrics: Arc<Metrics>) -> Names {
        let settings = dns.settings.clone();
        let seeded = match KNOWN.lock() {
            Ok(known) => servers
                .iter()
                .all(|s| matches!(s, Server::Addr(_)) || known.contains_key(s)),
            Err(_) => false,
        };
        Names {
            upstream: upstream.to_owned(),
            servers: servers.to_vec(),
            dns,
            settings,
            metrics,
            next: Mutex::new(Instant::now()),
            failing: AtomicBool::new(false),
            seeded: AtomicBool::new(seeded),
        }
    }

    /// Whether the next discovery answers from the last good addresses without asking (every
    /// name was resolved before, by an earlier configuration): it then completes at once.
    pub fn seeded(&self) -> bool {
        self.seeded.load(Ordering::Relaxed)
    }

    /// Whether it is time to resolve again.
    pub fn due(&self, now: Instant) -> bool {
        self.next.lock().map_or(true, |n| *n <= now)
    }

    /// Asks again soon (after a connect failure), but not before the floor.
    pub fn soon(&self) {
        if let Ok(mut n) = self.next.lock() {
            let soonest = Instant::now() + self.settings.min_ttl;
            if *n > soonest {
                *n = soonest;
            }
        }
    }

    /// True when the last resolution of some name failed (its last good set is in use).
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Whether any name was ever resolved: false means the pool is empty for now.
    pub fn known(&self) -> bool {
        match KNOWN.lock() {
            Ok(known) => self
                .servers
                .iter()
                .any(|s| matches!(s, Server::Addr(_)) || known.contains_key(s)),
            Err(_) => false,
        }
    }

    /// Every address of `server` and how long the answer holds.
    async fn resolve(&self, server: &Server) -> Result<(BTreeSet<SocketAddr>, Instant), String> {
        match server {
            Server::Addr(a) => Ok((BTreeSet::from([*a]), Instant::now() + self.settings.max_ttl)),
            Server::Host(host, port) => {
                let answer = self
                    .dns
                    .get()?
                    .lookup_ip(host.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let addrs = answer.iter().map(|ip| SocketAddr::new(ip, *port)).collect();
                Ok((addrs, answer.valid_until()))
            }
            Server::Srv(name) => {
                let resolver = self.dns.get()?;
                let answer = resolver
                    .srv_lookup(name.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut valid_until = answer.valid_until();
                let mut addrs = BTreeSet::new();
                for record in answer.answers() {
                    let RData::SRV(srv) = &record.data else {
                        continue;
                    };
                    let target = srv.target.to_ascii();
                    let ips = resolver
                        .lookup_ip(target.as_str())
                        .await
                        .map_err(|e| format!("{target}: {e}"))?;
                    valid_until = valid_until.min(ips.valid_until());
                    addrs.extend(ips.iter().map(|ip| SocketAddr::new(ip, srv.port)));
                }
                Ok((addrs, valid_until))
            }
        }
    }

    fn count(&self, result: &str) {
        self.metrics
            .dns_resolutions
            .with_label_values(&[self.upstream.as_str(), result])
            .inc();
    }
}

#[async_trait]
impl ServiceDiscovery for Names {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let now = Instant::now();
        let seeded = self.seeded.swap(false, Ordering::Relaxed);
        let mut all = BTreeSet::new();
        let mut valid_until = now + self.settings.max_ttl;
        let mut failed = Vec::new();
        for server in &self.servers {
            let answer = if seeded {
                Err("seeded".to_string())
            } else {
                self.resolve(server).await
            };
            match answer {
                Ok((addrs, until)) if !addrs.is_empty() => {
                    valid_until = valid_until.min(until);
                    if let Ok(mut known) = KNOWN.lock() {
                        known.insert(server.clone(), addrs.clone());
                    }
                    all.extend(addrs);
                }
                other => {
                    if !seeded {
                        let why = other.err().unwrap_or_else(|| "no addresses".into());
                        failed.push(format!("{server}: {why}"));
                    }
                    // The last good set stays in use.
                    if let Ok(known) = KNOWN.lock() {
                        all.extend(known.get(server).into_iter().flatten().copied());
                    }
                }
            }
        }
        if !seeded {
            let wait = valid_until
                .saturating_duration_since(now)
                .clamp(self.settings.min_ttl, self.settings.max_ttl);
            let wait = if failed.is_empty() {
                wait
            } else {
                self.settings.min_ttl
            };
            if let Ok(mut next) = self.next.lock() {
                *next = now + wait;
            }
            let was_failing = self.failing.swap(!failed.is_empty(), Ordering::Relaxed);
            if failed.is_empty() {
                self.count("ok");
                if was_failing {
                    tracing::info!(upstream = %self.upstream, "upstream names resolve again");
                }
            } else {
                self.count("failed");
                if !was_failing {
                    tracing::warn!(
                        upstream = %self.upstream,
                        error = %failed.join("; "),
                        "upstream name does not resolve: keeping its last good addresses"
                    );
                }
            }
        }
        let backends = all
            .into_iter()
            .filter_map(|a| Backend::new(&a.to_string()).ok())
            .collect();
        Ok((backends, HashMap::new()))
    }
}
