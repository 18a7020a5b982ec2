//! get2dial-gateway: an edge gateway on Pingora that answers every error with the Get2Dial
//! envelope `{"status":"error","message":"..."}`.
//!
//! [`build_server`] turns a validated [`config::Config`] into a Pingora server with the public
//! proxy service ([`proxy::Gateway`]), the admin listener ([`admin::Admin`]) and one health-check
//! task per upstream that asks for it.

pub mod admin;
pub mod auth;
pub mod client_ip;
pub mod config;
pub mod demo;
pub mod envelope;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod request_id;
pub mod rewrite;
pub mod routes;
pub mod store;
pub mod upstreams;

use std::sync::Arc;

use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::config::Config;

/// Why the server could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The metric registry refused a family.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The Redis client could not be set up.
    #[error("{0}")]
    Redis(String),
    /// An upstream could not be set up.
    #[error("{file}: upstreams[{index}]: {source}")]
    Upstream {
        /// Config file.
        file: String,
        /// Index of the upstream in the file.
        index: usize,
        /// Cause.
        source: std::io::Error,
    },
}

/// Builds the server for `config`. `extra` may add services (the demo's stand-in upstream).
pub fn build_server(
    config: &Config,
    extra: impl FnOnce(&mut Server),
) -> Result<Server, BuildError> {
    // One TLS crypto provider for the whole process (rediss:// connections), chosen explicitly
    // rather than by whichever crate features happen to be enabled.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let grace = config.server.shutdown_grace.as_secs();
    let conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(grace),
        graceful_shutdown_timeout_seconds: Some(grace + 5),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let metrics = Arc::new(metrics::Metrics::new()?);

    let mut pools = Vec::with_capacity(config.upstreams.len());
    for (index, u) in config.upstreams.iter().enumerate() {
        let balancer = upstreams::Pool::balancer(u).map_err(|source| BuildError::Upstream {
            file: config.path.display().to_string(),
            index,
            source,
        })?;
        let balancer = if u.health_check_interval.is_some() {
            let service = background_service(&format!("health check {}", u.name), balancer);
            let task = service.task();
            server.add_service(service);
            task
        } else {
            Arc::new(balancer)
        };
        pools.push(Arc::new(upstreams::Pool::new(u, balancer)));
    }

    let limits: Vec<store::Limit> = config
        .routes
        .iter()
        .flat_map(|r| r.rate_limits.iter().map(|p| p.limit.clone()))
        .collect();
    let memory = Arc::new(store::memory::MemoryStore::new(&limits));
    server.add_service(background_service(
        "limit sweeper",
        store::memory::Sweeper::new(memory.clone(), config.limits.sweep_interval),
    ));
    let health = Arc::new(store::shared::StoreHealth::default());
    let store: Arc<dyn store::Store> = match &config.redis {
        None => memory,
        Some(settings) => {
            let redis = store::redis::RedisStore::new(settings.clone()).map_err(|e| {
                BuildError::Redis(format!("{}: store.redis_url: {e}", config.path.display()))
            })?;
            let shared = Arc::new(store::shared::SharedStore::new(
                redis,
                memory,
                health.clone(),
                metrics.clone(),
                settings.timeout,
            ));
            server.add_service(background_service(
                "redis probe",
                store::shared::Prober::new(shared.clone()),
            ));
            shared
        }
    };
    let gateway = proxy::Gateway::new(config, pools, metrics.clone(), store);

    let node_keys: Vec<_> = config
        .routes
        .iter()
        .filter_map(|r| r.node_keys.clone())
        .collect();
    if !node_keys.is_empty() {
        let watcher = auth::node_key::Watcher::new(node_keys, config.server.watch_interval);
        server.add_service(background_service("node key watcher", watcher));
    }
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        gateway,
        "get2dial-gateway",
    );
    proxy.add_tcp(&config.server.listen.to_string());
    server.add_service(proxy);

    let mut admin = Service::new("admin".to_string(), admin::Admin::new(metrics, health));
    admin.add_tcp(&config.server.admin_listen.to_string());
    server.add_service(admin);

    extra(&mut server);
    Ok(server)
}
