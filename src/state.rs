//! Everything a request needs that a configuration reload may replace, as one snapshot.
//!
//! The gateway holds the current [`State`] behind an `ArcSwap`; each request takes the snapshot
//! that is current when it starts and keeps it to the end, so a reload never changes the rules
//! under a request in flight.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::jwt::Verifier;
use crate::client_ip::TrustedProxies;
use crate::config::{Config, Cors, IdentityHeaders, PlainMode, Security};
use crate::metrics::Metrics;
use crate::routes::{Route, RouteTable};
use crate::scrub::Scrub;
use crate::store::memory::MemoryStore;
use crate::store::Limit;
use crate::upstreams::Pool;

/// One configuration, ready for requests.
pub struct State {
    /// Routes, most specific first.
    pub routes: RouteTable,
    /// Upstream pools, indexed by [`Route::upstream`].
    pub pools: Vec<Arc<Pool>>,
    /// Longest pause between two reads of a request body.
    pub client_body_timeout: Duration,
    /// User token verification, when any route needs it.
    pub jwt: Option<Verifier>,
    /// Header names for the verified identity.
    pub identity_headers: IdentityHeaders,
    /// Proxies whose X-Forwarded-For is believed.
    pub trusted_proxies: TrustedProxies,
    /// Client headers that never reach the upstream.
    pub scrub: Scrub,
    /// Prefix lengths (IPv4, IPv6) of the networks that share an `ip` rate bucket.
    pub ip_prefixes: (u8, u8),
    /// Send rate-limit headers on allowed answers.
    pub rate_headers_on_success: bool,
    /// Write one access-log line per request.
    pub access_log: bool,
    /// Largest request head answered normally (431 above).
    pub max_header_bytes: usize,
    /// Most request headers answered normally (431 above).
    pub max_headers: usize,
    /// Longest time a request head may take to arrive.
    pub client_header_timeout: Duration,
    /// Most connections still sending their head, in all and per client.
    pub max_pending_heads: (usize, usize),
    /// Cross-origin settings.
    pub cors: Option<Cors>,
    /// Edge security headers.
    pub security: Security,
    /// With TLS and `plain = "redirect"`: the TLS port plain requests are sent to.
    pub redirect_to_tls_port: Option<u16>,
    /// The file this came from and its redacted effective settings (`GET /-/config`).
    pub source: (std::path::PathBuf, Arc<serde_json::Value>),
}

impl State {
    /// Builds the snapshot for `config`, its rate-limit policies registered with `memory`
    /// (which gives each its limiter slot: a policy must be registered to be counted), its
    /// upstream names resolved by a DNS client of its own.
    pub fn new(
        config: &Config,
        memory: &MemoryStore,
        metrics: &Arc<Metrics>,
    ) -> std::io::Result<State> {
        let mut routes = config.routes.clone();
        let mut limits: Vec<&mut Limit> = routes
            .iter_mut()
            .flat_map(|r| r.rate_limits.iter_mut().map(|p| &mut p.limit))
            .collect();
        memory.register(&mut limits);
        let routes = RouteTable::new(routes);
        let dns = Arc::new(crate::discovery::Dns::new(&config.dns));
        let pools = config
            .upstreams
            .iter()
            .map(|u| Ok(Arc::new(Pool::new(u, &dns, metrics)?)))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(State {
            routes,
            pools,
            client_body_timeout: config.server.client_body_timeout,
            jwt: config.jwt.as_ref().map(Verifier::new),
            identity_headers: config.identity_headers.clone(),
            trusted_proxies: TrustedProxies::new(config.server.trusted_proxies.clone()),
            scrub: Scrub::new(config.identity_headers.all()),
            ip_prefixes: config.limits.ip_prefixes,
            rate_headers_on_success: config.limits.headers_on_success,
            access_log: config.log.access_log,
            max_header_bytes: config.server.max_header_bytes,
            max_headers: config.server.max_headers,
            client_header_timeout: config.server.client_header_timeout,
            max_pending_heads: (
                config.server.max_pending_heads,
                config.server.max_pending_heads_per_client,
            ),
            cors: config.cors.clone(),
            security: config.security.clone(),
            source: (config.path.clone(), config.effective.clone()),
            redirect_to_tls_port: config
                .tls
                .as_ref()
                .filter(|t| t.plain == PlainMode::Redirect)
                .map(|t| t.listen.port()),
        })
    }

    /// The upstream pool of `route`.
    pub fn pool(&self, route: &Route) -> Option<&Arc<Pool>> {
        self.pools.get(route.upstream)
    }
}
