//! Upstream pools: round-robin over each upstream's servers, with optional TCP health checks.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use pingora::lb::health_check::TcpHealthCheck;
use pingora::lb::selection::RoundRobin;
use pingora::lb::LoadBalancer;
use pingora::protocols::tls::CaType;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{parse_x509, WrappedX509};

use crate::config;

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
        if u.health_check_interval.is_some() {
            let mut check = TcpHealthCheck::new();
            check.peer_template.options.connection_timeout = Some(u.connect_timeout);
            balancer.set_health_check(check);
        }
        // DER that load_ca_bundle has already parsed, so the wrapper's parse cannot fail.
        let ca = u.tls.as_ref().and_then(|t| t.ca.as_ref()).map(|certs| {
            let wrapped: Vec<WrappedX509> = certs
                .iter()
                .map(|der| WrappedX509::new(der.clone(), parse_x509))
                .collect();
            Arc::<CaType>::from(wrapped.into_boxed_slice())
        });
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
            [only] if self.settings.health_check_interval.is_none() => only,
            peers => {
                let backend = self.balancer.select(b"", self.server_count().max(1))?;
                let addr = backend.addr.as_inet()?;
                peers.iter().find(|p| p._address.as_inet() == Some(addr))?
            }
        };
        Some(Box::new(peer.clone()))
    }

    /// Runs the health check when it is due.
    pub async fn check_if_due(&self, now: Instant) {
        let Some(interval) = self.settings.health_check_interval else {
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
