//! Upstream pools: round-robin over each upstream's servers (fixed addresses, or names that
//! DNS resolves and resolves again: [`crate::discovery`]), with optional health checks (TCP
//! connects, or HTTP requests judged by their status, over TLS when the upstream uses it),
//! passive outlier ejection, and a retry budget.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::health_check::{HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::protocols::tls::CaType;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{parse_x509, WrappedX509};

use crate::config::{self, CheckKind};
use crate::discovery::{Names, Server};
use crate::metrics::Metrics;

/// When a server is taken out after failing in a row, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierPolicy {
    /// Failures in a row (connect failure, reset, timeout, 5xx) that eject a server.
    pub consecutive_failures: u32,
    /// How long a first ejection lasts; each repeat doubles it.
    pub ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Most of the pool ejected at once, in percent.
    pub max_ejected_percent: u32,
}

/// How many retries an upstream may take on top of its requests.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryBudgetPolicy {
    /// Retries as a share of requests, in percent.
    pub percent: u32,
    /// Retries always allowed per second.
    pub min_per_second: u32,
}

/// What one request's exchange with a server came to, for outlier ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer below 500.
    Success,
    /// A connect failure, a reset, a timeout, or a 5xx answer.
    Failure,
}

/// One server's record for outlier ejection.
#[derive(Debug, Default)]
struct Record {
    failures_in_a_row: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// One upstream as the runtime uses it.
pub struct Pool {
    /// Name used in metrics and logs.
    pub name: String,
    /// Round-robin selection over the healthy servers.
    pub balancer: LoadBalancer<RoundRobin>,
    settings: config::Upstream,
    /// When the health check is due next (`None`: now).
    next_check: Mutex<Option<Instant>>,
    /// One ready peer per server address: cloned per request instead of built.
    peers: ArcSwap<HashMap<SocketAddr, HttpPeer>>,
    /// A lone fixed server without health check: chosen without asking the balancer.
    only: Option<HttpPeer>,
    ca: Option<Arc<CaType>>,
    /// DNS discovery, when a server is given by name.
    names: Option<Arc<Names>>,
    /// Servers out of the rotation for failing in a row, and everyone's record.
    ejected: ArcSwap<HashSet<SocketAddr>>,
    records: Mutex<HashMap<SocketAddr, Record>>,
    /// `gateway_upstream_ttfb_seconds` of this upstream, looked up once.
    pub ttfb: prometheus::Histogram,
    /// Retry tokens, in thousandths.
    retry_tokens: AtomicU64,
    /// When the budget's per-second allowance was last added.
    retry_refill: Mutex<Instant>,
    metrics: Arc<Metrics>,
}

/// The pool's [`Names`] as Pingora's discovery.
struct Discover(Arc<Names>);

#[async_trait]
impl ServiceDiscovery for Discover {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        self.0.discover().await
    }
}

impl Pool {
    /// The pool for `u`; names are resolved with `dns`. Its health check, if configured,
    /// runs when [`Pool::check_if_due`] is called, and so does a due DNS resolution.
    pub fn new(
        u: &config::Upstream,
        dns: &Arc<crate::discovery::Dns>,
        metrics: &Arc<Metrics>,
    ) -> std::io::Result<Pool> {
        let fixed: Option<Vec<SocketAddr>> = u
            .servers
            .iter()
            .map(|s| match s {
                Server::Addr(a) => Some(*a),
                _ => None,
            })
            .collect();
        let (mut balancer, names) = match &fixed {
            Some(addrs) => (
                LoadBalancer::<RoundRobin>::try_from_iter(addrs.iter().copied())?,
                None,
            ),
            None => {
                let names = Arc::new(Names::new(
                    &u.name,
                    &u.servers,
                    dns.clone(),
                    metrics.clone(),
                ));
                let backends = Backends::new(Box::new(Discover(names.clone())));
                (
                    LoadBalancer::<RoundRobin>::from_backends(backends),
                    Some(names),
                )
            }
        };
        // DER that load_ca_bundle has already parsed, so the wrapper's parse cannot fail.
        let ca = u.tls.as_ref().and_then(|t| t.ca.as_ref()).map(|certs| {
            let wrapped: Vec<WrappedX509> = certs
                .iter()
                .map(|der| WrappedX509::new(der.clone(), parse_x509))
                .collect();
            Arc::<CaType>::from(wrapped.into_boxed_slice())
        });
        if let Some(check) = &u.health_check {
            set_health_check(&mut balancer, u, check, &ca);
        }
        let only = match fixed.as_deref() {
            Some([addr]) if u.health_check.is_none() => Some(peer(u, *addr, &ca)),
            _ => None,
        };
        // Every series a panel or an alert reads exists at 0 from the start.
        let name = u.name.as_str();
        for reason in ["connect", "reused_connection", "refused_by_budget"] {
            metrics.retries.with_label_values(&[name, reason]);
        }
        metrics.ejections.with_label_values(&[name]);
        let ttfb = metrics.ttfb.with_label_values(&[name]);
        for result in ["ok", "failed"] {
            metrics.dns_resolutions.with_label_values(&[name, result]);
        }
        let pool = Pool {
            name: u.name.clone(),
            balancer,
            settings: u.clone(),
            next_check: Mutex::new(None),
            peers: ArcSwap::from_pointee(HashMap::new()),
            only,
            ca,
            names,
            ejected: ArcSwap::from_pointee(HashSet::new()),
            records: Mutex::new(HashMap::new()),
            ttfb,
            retry_tokens: AtomicU64::new(u64::from(u.retry_budget.min_per_second) * 1000),
            retry_refill: Mutex::new(Instant::now()),
            metrics: metrics.clone(),
        };
        if pool.names.as_ref().is_some_and(|n| n.seeded()) {
            // A reload starts from the names' last good addresses: the first discovery answers
            // from them without waiting on the network, so it completes in one poll.
            let update = std::pin::pin!(pool.balancer.update());
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let _ = std::future::Future::poll(update, &mut cx);
        }
        pool.refresh_peers();
        Ok(pool)
    }

    /// Rebuilds the ready peers for the servers the balancer has now.
    fn refresh_peers(&self) {
        let peers = self
            .balancer
            .backends()
            .get_backend()
            .iter()
            .filter_map(|b| b.addr.as_inet().copied())
            .map(|addr| (addr, peer(&self.settings, addr, &self.ca)))
            .collect();
        self.peers.store(Arc::new(peers));
    }

    /// Number of servers now, the bound on connect retries (at least 1).
    pub fn server_count(&self) -> usize {
        self.server_count_now().max(1)
    }

    /// Number of servers now (0 before a name first resolved).
    pub fn server_count_now(&self) -> usize {
        self.peers.load().len()
    }

    /// A peer for the next healthy server that is not ejected, or `None` when there is none.
    pub fn select(&self) -> Option<Box<HttpPeer>> {
        if let Some(only) = &self.only {
            // Nothing to balance and no health to consult.
            return Some(Box::new(only.clone()));
        }
        let ejected = self.ejected.load();
        let backend = if ejected.is_empty() {
            self.balancer.select(b"", self.server_count())?
        } else {
            self.balancer
                .select_with(b"", self.server_count(), |b, healthy| {
                    healthy && b.addr.as_inet().is_none_or(|a| !ejected.contains(a))
                })?
        };
        let addr = *backend.addr.as_inet()?;
        let peers = self.peers.load();
        Some(Box::new(match peers.get(&addr) {
            Some(p) => p.clone(),
            None => peer(&self.settings, addr, &self.ca),
        }))
    }

    /// How many of the servers are in the rotation now: healthy (all of them without a health
    /// check) and not ejected.
    pub fn healthy_servers(&self) -> usize {
        let backends = self.balancer.backends();
        let ejected = self.ejected.load();
        backends
            .get_backend()
            .iter()
            .filter(|b| backends.ready(b))
            .filter(|b| b.addr.as_inet().is_none_or(|a| !ejected.contains(a)))
            .count()
    }

    /// Each server now: its address, whether its health check passes (always, without one),
    /// and how long its ejection still lasts.
    pub fn servers(&self) -> Vec<(SocketAddr, bool, Option<Duration>)> {
        let backends = self.balancer.backends();
        let now = Instant::now();
        let records = self.records.lock().ok();
        let mut out: Vec<_> = backends
            .get_backend()
            .iter()
            .filter_map(|b| {
                let addr = *b.addr.as_inet()?;
                let ejected = records
                    .as_ref()
                    .and_then(|r| r.get(&addr)?.ejected_until)
                    .filter(|until| *until > now)
                    .map(|until| until - now);
                Some((addr, backends.ready(b), ejected))
            })
            .collect();
        out.sort_by_key(|(addr, ..)| *addr);
        out
    }

    /// The names of this upstream, when it has any.
    pub fn names(&self) -> Option<&Names> {
        self.names.as_deref()
    }

    /// Runs the health check and the DNS resolution when they are due; returns ejected servers
    /// whose time is up to the rotation.
    pub async fn check_if_due(&self, now: Instant) {
        self.end_ejections(now);
        if let Some(names) = &self.names {
            if names.due(now) {
                if let Err(e) = self.balancer.update().await {
                    tracing::debug!(upstream = %self.name, error = %e, "discovery found nothing");
                }
                self.refresh_peers();
            }
        }
        let Some(interval) = self.settings.health_check.as_ref().map(|c| c.interval) else {
            return;
        };
        {
            let Ok(mut next) = self.next_check.lock() else {
                return;
            };
            if next.is_some_and(|t| t > now) {
                return;
            }
            *next = Some(now + interval);
        }
        self.balancer.backends().run_health_check(true).await;
    }

    /// Counts what an exchange with `server` came to; ejects it after too many failures in a
    /// row (never more than the policy's share of the pool).
    pub fn record(&self, server: SocketAddr, outcome: Outcome) {
        if outcome == Outcome::Failure {
            if let Some(names) = &self.names {
                // The address may be gone: ask DNS again soon.
                names.soon();
            }
        }
        let Some(policy) = &self.settings.outlier else {
            return;
        };
        let Ok(mut records) = self.records.lock() else {
            return;
        };
        let record = records.entry(server).or_default();
        if outcome == Outcome::Success {
            record.failures_in_a_row = 0;
            return;
        }
        record.failures_in_a_row += 1;
        if record.failures_in_a_row < policy.consecutive_failures || record.ejected_until.is_some()
        {
            return;
        }
        let ejected = self.ejected.load();
        let pool = self.peers.load().len();
        let cap = pool * policy.max_ejected_percent as usize / 100;
        if ejected.len() + 1 > cap {
            return;
        }
        let factor = 1u32 << record.ejections.min(16);
        let length = (policy.ejection * factor).min(policy.max_ejection);
        record.ejections += 1;
        record.failures_in_a_row = 0;
        record.ejected_until = Some(Instant::now() + length);
        let mut next = (**ejected).clone();
        next.insert(server);
        self.ejected.store(Arc::new(next));
        self.metrics
            .ejections
            .with_label_values(&[self.name.as_str()])
            .inc();
        tracing::warn!(upstream = %self.name, %server, seconds = length.as_secs_f64(),
            "upstream server ejected after failing in a row");
    }

    /// Puts servers whose ejection ended back in the rotation.
    fn end_ejections(&self, now: Instant) {
        if self.ejected.load().is_empty() {
            return;
        }
        let Ok(mut records) = self.records.lock() else {
            return;
        };
        let mut next = (**self.ejected.load()).clone();
        next.retain(|server| {
            let Some(record) = records.get_mut(server) else {
                return false;
            };
            if record.ejected_until.is_some_and(|t| t <= now) {
                record.ejected_until = None;
                tracing::info!(upstream = %self.name, %server, "upstream server back in the rotation");
                return false;
            }
            true
        });
        self.ejected.store(Arc::new(next));
    }

    /// A request to this upstream earns the retry budget its share.
    pub fn earn_retry(&self) {
        let percent = u64::from(self.settings.retry_budget.percent);
        let cap = self.retry_cap();
        let _ = self
            .retry_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t < cap).then(|| (t + percent * 10).min(cap))
            });
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn take_retry(&self) -> bool {
        let per_second = u64::from(self.settings.retry_budget.min_per_second);
        let cap = self.retry_cap();
        if let Ok(mut last) = self.retry_refill.lock() {
            let now = Instant::now();
            let earned = (now.duration_since(*last).as_millis() as u64).saturating_mul(per_second);
            if earned > 0 {
                *last = now;
                let _ = self
                    .retry_tokens
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                        Some((t + earned).min(cap))
                    });
            }
        }
        self.retry_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                t.checked_sub(1000)
            })
            .is_ok()
    }

    /// Most tokens saved: ten seconds of the per-second allowance, and at least 100 retries.
    fn retry_cap(&self) -> u64 {
        (u64::from(self.settings.retry_budget.min_per_second) * 10).max(100) * 1000
    }
}

/// Gives `balancer` the health check `check` of upstream `u`: a server leaves the rotation
/// after `unhealthy_after` failed checks in a row and returns after `healthy_after` passed ones.
fn set_health_check(
    balancer: &mut LoadBalancer<RoundRobin>,
    u: &config::Upstream,
    check: &config::HealthCheck,
    ca: &Option<Arc<CaType>>,
) {
    match &check.kind {
        CheckKind::Tcp => {
            let mut tcp = TcpHealthCheck::new();
            tcp.peer_template.options.connection_timeout = Some(check.timeout);
            tcp.consecutive_success = check.healthy_after;
            tcp.consecutive_failure = check.unhealthy_after;
            balancer.set_health_check(tcp);
        }
        CheckKind::Http {
            path,
            host,
            expect_status,
        } => {
            let mut http = HttpHealthCheck::new(host, u.tls.is_some());
            // Checked at load: a path and a host that form a request head.
            if let Ok(mut req) = pingora::http::RequestHeader::build("GET", path.as_bytes(), None) {
                let _ = req.append_header("Host", host.as_str());
                let _ = req.append_header("User-Agent", "get2dial-gateway-health-check");
                http.req = req;
            }
            // The same TLS as requests: name, verification, CA.
            http.peer_template = peer(u, std::net::SocketAddr::from(([0, 0, 0, 0], 1)), ca);
            http.peer_template.options.connection_timeout = Some(check.timeout);
            http.peer_template.options.read_timeout = Some(check.timeout);
            http.peer_template.options.write_timeout = Some(check.timeout);
            http.consecutive_success = check.healthy_after;
            http.consecutive_failure = check.unhealthy_after;
            let expected = expect_status.clone();
            http.validator = Some(Box::new(move |resp| {
                if expected.contains(&resp.status.as_u16()) {
                    Ok(())
                } else {
                    pingora::Error::e_explain(
                        pingora::ErrorType::HTTPStatus(resp.status.as_u16()),
                        "health check status not expected",
                    )
                }
            }));
            balancer.set_health_check(Box::new(http));
        }
    }
}

/// The peer for one server of `u`, with the upstream's timeouts and TLS settings.
fn peer(u: &config::Upstream, addr: std::net::SocketAddr, ca: &Option<Arc<CaType>>) -> HttpPeer {
    let tls = u.tls.as_ref();
    // Without a configured name (only allowed with verification off) the address stands in.
    let sni = match tls {
        Some(t) if !t.sni.is_empty() => t.sni.clone(),
        Some(_) => addr.ip().to_string(),
        None => String::new(),
    };
    let mut peer = HttpPeer::new(addr, tls.is_some(), sni);
    let o = &mut peer.options;
    if let Some(t) = tls {
        o.verify_cert = t.verify;
        o.verify_hostname = t.verify;
        o.ca = ca.clone();
    }
    o.connection_timeout = Some(u.connect_timeout);
    o.read_timeout = Some(u.read_timeout);
    o.write_timeout = Some(u.write_timeout);
    o.idle_timeout = Some(u.idle_timeout);
    peer
}
