//! Configuration reload without dropping traffic: SIGHUP (or `POST /-/reload` on the admin
//! port) re-reads the file and the secrets it names, builds a new [`State`] and swaps it in.
//! Requests in flight finish under the state they started with. A file that does not validate
//! is refused with one log line and the running configuration stays.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::State;
use crate::store::memory::MemoryStore;

/// Re-reads the configuration on demand.
pub struct Reloader {
    path: PathBuf,
    state: Arc<ArcSwap<State>>,
    /// The configuration in force, to tell which changes need a restart.
    current: Mutex<Config>,
    memory: Arc<MemoryStore>,
    metrics: Arc<Metrics>,
}

impl Reloader {
    /// A reloader for the running `config`, swapping into `state`.
    pub fn new(
        config: Config,
        state: Arc<ArcSwap<State>>,
        memory: Arc<MemoryStore>,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        Reloader {
            path: config.path.clone(),
            state,
            current: Mutex::new(config),
            memory,
            metrics,
        }
    }

    /// Reloads now; the error says why the new file was refused.
    pub fn reload(&self) -> Result<(), String> {
        let result = self.try_reload();
        let label = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        self.metrics.last_reload_ok.set(i64::from(result.is_ok()));
        match &result {
            Ok(()) => tracing::info!(file = %self.path.display(), "configuration reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "configuration reload refused, keeping the running one")
            }
        }
        result
    }

    fn try_reload(&self) -> Result<(), String> {
        let mut config = Config::load(&self.path).map_err(|e| e.to_string())?;
        let mut current = self
            .current
            .lock()
            .map_err(|_| "reload lock poisoned".to_string())?;
        for what in restart_only_changes(&current, &config) {
            tracing::warn!(
                setting = what,
                "changed in the file but needs a restart; keeping the running value"
            );
        }
        let state = State::new(&config, &self.memory, &self.metrics)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        // Everything validated: from here on nothing fails. The TLS acceptor keeps its
        // certificate resolver, which takes over the new certificates.
        if let (Some(running), Some(new)) = (&current.tls, &mut config.tls) {
            running.certificates.adopt(&new.certificates);
            new.certificates = running.certificates.clone();
        }
        self.state.store(Arc::new(state));
        *current = config;
        Ok(())
    }
}

/// Settings that only a restart applies: the listeners, the worker threads and the store.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.server.listen != new.server.listen {
        changed.push("server.listen");
    }
    if old.server.admin_listen != new.server.admin_listen {
        changed.push("server.admin_listen");
    }
    if old.server.threads != new.server.threads {
        changed.push("server.threads");
    }
    if old.server.shutdown_grace != new.server.shutdown_grace {
        changed.push("server.shutdown_grace_seconds");
    }
    if old.server.keepalive_timeout != new.server.keepalive_timeout {
        changed.push("server.keepalive_timeout_seconds");
    }
    if old.server.work_stealing != new.server.work_stealing {
        changed.push("server.work_stealing");
    }
    let token = |c: &Config| c.server.admin_token.as_ref().map(|t| t.0.clone());
    if token(old) != token(new) {
        changed.push("server.admin_token");
    }
    let store = |c: &Config| {
        c.redis
            .as_ref()
            .map(|r| (r.topology.clone(), r.key_prefix.clone()))
    };
    if store(old) != store(new) {
        changed.push("store");
    }
    if old.tracing != new.tracing {
        changed.push("tracing");
    }
    changed
}

/// Background task that reloads on SIGHUP.
pub struct OnSignal {
    reloader: Arc<Reloader>,
}

impl OnSignal {
    /// Reloads through `reloader`.
    pub fn new(reloader: Arc<Reloader>) -> OnSignal {
        OnSignal { reloader }
    }
}

#[async_trait]
impl BackgroundService for OnSignal {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload via the admin port only");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    let r = self.reloader.clone();
                    // Reading files and secrets blocks; keep it off the async workers.
                    let _ = tokio::task::spawn_blocking(move || r.reload()).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
