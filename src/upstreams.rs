//! Upstream pools: round-robin over each upstream's servers, with optional health checks (TCP
//! connects, or HTTP requests judged by their status, over TLS when the upstream uses it).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use pingora::lb::health_check::{HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::RoundRobin;
use pingora::lb::LoadBalancer;
use pingora::protocols::tls::CaType;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{parse_x509, WrappedX509};

use crate::config::{self, CheckKind};

/// One upstream as the runtime uses it.
pub struct Pool {
    /// Name used in metrics and logs.
    pub name: String,
    /// Round-robin selection over the healthy servers.
    pub balancer: LoadBalancer<RoundRobin>,
    settings: config::Upstream,
    /// When the health check is due next (`None`: now).
    next_check: Mutex<Option<Instant>>,
    /// One ready peer per server, in the order of `servers`: cloned per request instead of
    /// built, and for a lone unchecked server chosen without asking the balancer.
    peers: Vec<HttpPeer>,
}

impl Pool {
    /// The pool for `u`. Its health check, if configured, runs when [`Pool::check_if_due`] is called.
    pub fn new(u: &config::Upstream) -> std::io::Result<Pool> {
        let mut balancer = LoadBalancer::<RoundRobin>::try_from_iter(u.servers.iter().copied())?;
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
        let peers = u.servers.iter().map(|&addr| peer(u, addr, &ca)).collect();
        Ok(Pool {
            name: u.name.clone(),
            balancer,
            settings: u.clone(),
            next_check: Mutex::new(None),
            peers,
        })
    }

    /// Number of servers, the bound on connect retries.
    pub fn server_count(&self) -> usize {
        self.peers.len()
    }

    /// A peer for the next healthy server, or `None` when every server is down.
    pub fn select(&self) -> Option<Box<HttpPeer>> {
        let peer = match self.peers.as_slice() {
            // Nothing to balance and no health to consult.
            [only] if self.settings.health_check.is_none() => only,
            peers => {
                let backend = self.balancer.select(b"", self.server_count().max(1))?;
                let addr = backend.addr.as_inet()?;
                peers.iter().find(|p| p._address.as_inet() == Some(addr))?
            }
        };
        Some(Box::new(peer.clone()))
    }

    /// How many of the servers are in the rotation now (all of them without a health check).
    pub fn healthy_servers(&self) -> usize {
        let backends = self.balancer.backends();
        backends
            .get_backend()
            .iter()
            .filter(|b| backends.ready(b))
            .count()
    }

    /// Runs the health check when it is due.
    pub async fn check_if_due(&self, now: Instant) {
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
