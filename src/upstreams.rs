//! Upstream pools: round-robin over each upstream's servers, with optional TCP health checks.

use std::sync::Arc;

use pingora::lb::health_check::TcpHealthCheck;
use pingora::lb::selection::RoundRobin;
use pingora::lb::LoadBalancer;
use pingora::upstreams::peer::HttpPeer;

use crate::config;

/// One upstream as the runtime uses it.
pub struct Pool {
    /// Name used in metrics and logs.
    pub name: String,
    /// Round-robin selection over the healthy servers.
    pub balancer: Arc<LoadBalancer<RoundRobin>>,
    /// Number of servers, the bound on connect retries.
    pub server_count: usize,
    settings: config::Upstream,
}

impl Pool {
    /// The balancer for `u`, with its health check when one is configured; the caller runs it
    /// as a background service in that case so the check repeats.
    pub fn balancer(u: &config::Upstream) -> std::io::Result<LoadBalancer<RoundRobin>> {
        let mut balancer = LoadBalancer::<RoundRobin>::try_from_iter(u.servers.iter().copied())?;
        if let Some(interval) = u.health_check_interval {
            let mut check = TcpHealthCheck::new();
            check.peer_template.options.connection_timeout = Some(u.connect_timeout);
            balancer.set_health_check(check);
            balancer.health_check_frequency = Some(interval);
        }
        Ok(balancer)
    }

    /// The pool for `u` around its balancer.
    pub fn new(u: &config::Upstream, balancer: Arc<LoadBalancer<RoundRobin>>) -> Pool {
        Pool {
            name: u.name.clone(),
            balancer,
            server_count: u.servers.len(),
            settings: u.clone(),
        }
    }

    /// A peer for the next healthy server, or `None` when every server is down.
    pub fn select(&self) -> Option<Box<HttpPeer>> {
        let backend = self.balancer.select(b"", self.server_count.max(1))?;
        let addr = *backend.addr.as_inet()?;
        let mut peer = Box::new(HttpPeer::new(addr, false, String::new()));
        let o = &mut peer.options;
        o.connection_timeout = Some(self.settings.connect_timeout);
        o.read_timeout = Some(self.settings.read_timeout);
        o.write_timeout = Some(self.settings.write_timeout);
        o.idle_timeout = Some(self.settings.idle_timeout);
        Some(peer)
    }
}
