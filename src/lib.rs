//! get2dial-gateway: an edge gateway on Pingora that answers every error with the Get2Dial
//! envelope `{"status":"error","message":"..."}`.
//!
//! [`build_server`] turns a validated [`config::Config`] into a Pingora server with the public
//! proxy service ([`proxy::Gateway`]), the admin listener ([`admin::Admin`]) and one health-check
//! task per upstream that asks for it.

// The crate's surface: what the binary, the benches, the fuzz targets and the tests use.
pub mod auth;
pub mod config;
pub mod demo;
pub mod envelope;
pub mod head;
pub mod limits;
pub mod log_level;
pub mod log_sink;
pub mod path;
pub mod redact;
pub mod rewrite;
pub mod routes;
pub mod store;
pub mod trace;

// The server's own parts.
mod admin;
mod background;
mod client_ip;
mod connection;
pub mod discovery;
mod metrics;
mod proxy;
mod reload;
mod request_id;
mod scrub;
mod state;
mod tls;
mod upstreams;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
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
    /// The span exporter could not be set up.
    #[error("{0}")]
    Tracing(String),
    /// The TLS listener could not be set up.
    #[error("tls: {0}")]
    Tls(String),
    /// A listening address is taken (Pingora would carry on without that listener).
    #[error("{0}")]
    Listen(String),
    /// An upstream could not be set up.
    #[error("{file}: upstreams: {source}")]
    Upstream {
        /// Config file.
        file: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// Builds the server for `config`; `upgrade` takes over the sockets of a running gateway.
/// `extra` may add services (the demo's stand-in upstream).
pub fn build_server(
    config: Config,
    upgrade: bool,
    extra: impl FnOnce(&mut Server),
) -> Result<Server, BuildError> {
    // One TLS crypto provider for the whole process (the listener, rediss://, upstreams).
    tls::provider();
    if !upgrade {
        // An upgrade takes over the old process's sockets; a fresh start must own its
        // addresses, or it would run, healthy on the admin port, without a public listener.
        let tls = config.tls.as_ref().map(|t| ("tls.listen", t.listen));
        for (key, addr) in [
            ("server.listen", config.server.listen),
            ("server.admin_listen", config.server.admin_listen),
        ]
        .into_iter()
        .chain(tls)
        {
            std::net::TcpListener::bind(addr).map_err(|e| {
                BuildError::Listen(format!("{}: {key}: {addr}: {e}", config.path.display()))
            })?;
        }
    }
    let mut server = pingora_server(&config, upgrade);
    let metrics = Arc::new(metrics::Metrics::new()?);
    let memory = Arc::new(store::memory::MemoryStore::new());
    let state =
        state::State::new(&config, &memory, &metrics).map_err(|e| BuildError::Upstream {
            file: config.path.display().to_string(),
            source: e,
        })?;
    let state = Arc::new(ArcSwap::from_pointee(state));
    background_tasks(&mut server, &config, &state, &memory, &metrics);
    let health = Arc::new(store::shared::StoreHealth::default());
    let store = shared_store(&mut server, &config, &memory, &health, &metrics)?;
    for u in &config.upstreams {
        if u.tls.as_ref().is_some_and(|t| !t.verify) {
            tracing::warn!(upstream = %u.name, "TLS certificate verification is OFF for this upstream");
        }
    }
    let tracing = match &config.tracing {
        Some(settings) => {
            Some(Arc::new(trace::Tracing::new(settings).map_err(|e| {
                BuildError::Tracing(format!("{}: {e}", config.path.display()))
            })?))
        }
        None => None,
    };
    let gateway = proxy::Gateway::new(state.clone(), metrics.clone(), store, tracing);
    let heads = Arc::new(proxy::HeadJudge::new(state.clone(), metrics.clone()));
    let proxy = public_service(&mut server, &config, gateway, heads, &metrics)?;
    server.add_service(proxy);

    let admin_listen = config.server.admin_listen.to_string();
    let admin_token = config.server.admin_token.clone();
    let reloader = Arc::new(reload::Reloader::new(
        config,
        state.clone(),
        memory,
        metrics.clone(),
    ));
    server.add_service(background_service(
        "reload on SIGHUP",
        reload::OnSignal::new(reloader.clone()),
    ));
    let admin_app = admin::Admin::new(metrics, health, state.clone(), reloader, admin_token);
    let mut admin = Service::new("admin".to_string(), admin_app);
    admin.add_tcp(&admin_listen);
    server.add_service(admin);

    extra(&mut server);
    Ok(server)
}

/// The Pingora server with the process settings of `config`, bootstrapped (with `upgrade`,
/// it takes the listening sockets from the running process that got SIGQUIT).
fn pingora_server(config: &Config, upgrade: bool) -> Server {
    let grace = config.server.shutdown_grace.as_secs();
    let conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(grace),
        graceful_shutdown_timeout_seconds: Some(grace + 5),
        upgrade_sock: config.server.upgrade_sock.display().to_string(),
        work_stealing: config.server.work_stealing,
        // Pingora's own timeouts (upstream reads, pooled connections) on tokio's timer wheel:
        // cheaper per request than its shared fast-timer map (measured in README, Performance).
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();
    server
}

/// The sweeper of idle limiter keys, the upstream health checks and the node-key watcher.
/// The last two read whatever configuration is current, so a reload's pools and files are
/// covered.
fn background_tasks(
    server: &mut Server,
    config: &Config,
    state: &Arc<ArcSwap<state::State>>,
    memory: &Arc<store::memory::MemoryStore>,
    metrics: &Arc<metrics::Metrics>,
) {
    let swept = memory.clone();
    server.add_service(background_service(
        "limit sweeper",
        background::every(config.limits.sweep_interval, move || {
            swept.sweep();
            std::future::ready(())
        }),
    ));
    let (checked, counted) = (state.clone(), metrics.clone());
    server.add_service(background_service(
        "upstream health checks",
        background::every(Duration::from_millis(50), move || {
            let pools = checked.load().pools.clone();
            let metrics = counted.clone();
            async move {
                let now = std::time::Instant::now();
                // Side by side: one upstream's slow DNS answer or check never delays another's.
                let mut checks = tokio::task::JoinSet::new();
                for pool in pools {
                    checks.spawn(async move {
                        pool.check_if_due(now).await;
                        pool
                    });
                }
                while let Some(Ok(pool)) = checks.join_next().await {
                    let healthy = i64::try_from(pool.healthy_servers()).unwrap_or(i64::MAX);
                    metrics
                        .healthy_servers
                        .with_label_values(&[pool.name.as_str()])
                        .set(healthy);
                }
            }
        }),
    ));
    let watched = state.clone();
    server.add_service(background_service(
        "node key watcher",
        background::every(config.server.watch_interval, move || {
            for route in watched.load().routes.routes() {
                if let Some(keys) = &route.node_keys {
                    keys.reload_if_changed();
                }
            }
            std::future::ready(())
        }),
    ));
}

/// The counter store: `memory`, or Redis with `memory` as its fallback and a probe that
/// keeps checking it (a keyed script every 500 ms).
fn shared_store(
    server: &mut Server,
    config: &Config,
    memory: &Arc<store::memory::MemoryStore>,
    health: &Arc<store::shared::StoreHealth>,
    metrics: &Arc<metrics::Metrics>,
) -> Result<Arc<dyn store::Store>, BuildError> {
    let Some(endpoint) = &config.redis else {
        return Ok(memory.clone());
    };
    let redis = store::redis::RedisStore::new(endpoint.clone())
        .map_err(|e| BuildError::Redis(format!("{}: [store]: {e}", config.path.display())))?;
    let shared = Arc::new(store::shared::SharedStore::new(
        redis,
        memory.clone(),
        health.clone(),
        metrics.clone(),
        endpoint,
    ));
    // Always on: it brings Redis back after an outage, takes it out of use when it stops
    // answering between requests, and keeps the topology on /readyz and in metrics current.
    let probed = shared.clone();
    server.add_service(background_service(
        "redis probe",
        background::every(store::shared::PROBE_INTERVAL, move || {
            let store = probed.clone();
            async move { store.probe().await }
        }),
    ));
    let leased = shared.clone();
    server.add_service(background_service(
        "rate-limit leases",
        background::every(endpoint.lease.period, move || {
            let store = leased.clone();
            async move { store.end_leases().await }
        }),
    ));
    Ok(shared)
}

/// The public service: plain HTTP/1 through the small connection task, and TLS (HTTP/1 and
/// HTTP/2 by ALPN) with its certificate watcher.
fn public_service(
    server: &mut Server,
    config: &Config,
    gateway: proxy::Gateway,
    heads: Arc<proxy::HeadJudge>,
    metrics: &Arc<metrics::Metrics>,
) -> Result<Service<connection::Connections<pingora::proxy::HttpProxy<proxy::Gateway>>>, BuildError>
{
    let keepalive = config.server.keepalive_timeout;
    let mut http = pingora::proxy::http_proxy(&server.configuration, gateway);
    // HTTP/2 connections idle as long as HTTP/1 ones (no streams open for that long).
    let mut options = pingora::apps::HttpServerOptions::default();
    options.h2_idle_timeout = Some(keepalive);
    http.server_options = Some(options);
    let open =
        |protocol: &str, tls: &str| metrics.connections_open.with_label_values(&[protocol, tls]);
    let gauges = connection::OpenGauges {
        http1: open("http1", "false"),
        http1_tls: open("http1", "true"),
        h2_tls: open("h2", "true"),
    };
    let app = connection::Connections::new(http, heads, keepalive, gauges);
    let mut proxy = Service::new("get2dial-gateway".to_string(), app);
    // Plain HTTP/1 reads go straight into Pingora's own request buffers; an L4 read buffer
    // (64 KiB by default) would only add a copy and most of an idle connection's memory.
    let listen = config.server.listen.to_string();
    proxy.add_listener(ListenerConfig::tcp(listen).l4_buffer(L4BufferSettings::default().read(0)));
    if let Some(tls) = &config.tls {
        let mut settings =
            TlsSettings::intermediate("", "").map_err(|e| BuildError::Tls(e.to_string()))?;
        settings.set_cert_resolver(tls.certificates.clone());
        if tls.http2 {
            settings.enable_h2();
        }
        // Over TLS the L4 read buffer saves syscalls (records are read in small pieces): kept.
        proxy.add_listener(ListenerConfig::tcp(tls.listen.to_string()).tls(settings));
        let certificates = tls.certificates.clone();
        let metrics = metrics.clone();
        server.add_service(background_service(
            "certificate watcher",
            background::every(config.server.watch_interval, move || {
                certificates.reload_if_changed();
                // Certificates a reload dropped leave the metric with it.
                let expiry = &metrics.certificate_expiry;
                expiry.reset();
                for (file, not_after) in certificates.expiry() {
                    expiry.with_label_values(&[file.as_str()]).set(not_after);
                }
                std::future::ready(())
            }),
        ));
    }
    Ok(proxy)
}
