//! Configuration: the validated model the runtime uses, loaded from the TOML file format.
//!
//! [`file`] mirrors `config/gateway.toml` and rejects unknown keys, so a typo is an error rather
//! than a silently ignored setting. [`Config::load`] has [`validate`] turn it into [`Config`],
//! where every address is parsed, every route points at a real upstream and every limit is in
//! range; the runtime never re-checks a raw string. (River splits its file format from its
//! internal model the same way.)

mod file;
#[cfg(test)]
mod tests;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;

pub use file::{FileLog, LogFormat, PlainMode};

use crate::auth::jwt;
use crate::auth::node_key::NodeKeys;
use crate::routes::Route;
/// Largest login body the guard reads: Pingora's retry buffer (64 KiB) replays it upstream.
pub const LOGIN_BODY_CAP: u64 = 65_536;

/// A configuration problem, naming the file and the key that is wrong.
#[derive(Debug)]
pub struct ConfigError {
    /// The file the problem was found in.
    pub file: PathBuf,
    /// Dotted path of the offending key (`routes[2].upstream`), empty when the whole file is at fault.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// The validated configuration the runtime uses.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// Listener and process settings.
    pub server: Server,
    /// Upstreams, in file order.
    pub upstreams: Vec<Upstream>,
    /// Routes, in file order; each `upstream` is an index into `upstreams`. Their policies
    /// get their store slots when a [`crate::state::State`] is built from them.
    pub routes: Vec<Route>,
    /// User token settings, when any route needs them.
    pub jwt: Option<jwt::Profile>,
    /// Header names for the verified identity.
    pub identity_headers: IdentityHeaders,
    /// Lockout parameters shared by every login route.
    pub lockout: Lockout,
    /// Settings shared by every rate limit.
    pub limits: Limits,
    /// Where shared counters live: `None` in memory, `Some` in Redis.
    pub redis: Option<crate::store::redis::Endpoint>,
    /// How upstream server names are resolved.
    pub dns: crate::discovery::DnsSettings,
    /// OpenTelemetry spans, when configured.
    pub tracing: Option<crate::trace::TraceSettings>,
    /// Log settings.
    pub log: FileLog,
    /// The TLS listener, if any.
    pub tls: Option<Tls>,
    /// Cross-origin settings, if any.
    pub cors: Option<Cors>,
    /// Edge security headers.
    pub security: Security,
    /// The file as the gateway read it, every default filled in and credentials in URLs
    /// redacted: what `GET /-/config` shows.
    pub effective: Arc<serde_json::Value>,
}

/// Validated `[tls]`.
#[derive(Debug, Clone)]
pub struct Tls {
    /// Listener address.
    pub listen: SocketAddr,
    /// The certificates (loaded; an SNI resolver).
    pub certificates: Arc<crate::tls::Certificates>,
    /// Offer HTTP/2.
    pub http2: bool,
    /// What the plain listener does.
    pub plain: PlainMode,
}

/// Validated `[cors]`.
#[derive(Debug, Clone)]
pub struct Cors {
    /// Allowed origins, exactly as browsers send them.
    pub origins: Vec<String>,
    /// `Access-Control-Allow-Methods`.
    pub methods: http::HeaderValue,
    /// `Access-Control-Allow-Headers`.
    pub headers: http::HeaderValue,
    /// `Access-Control-Expose-Headers`.
    pub expose: http::HeaderValue,
    /// `Access-Control-Max-Age`.
    pub max_age: http::HeaderValue,
    /// `Access-Control-Allow-Credentials: true`.
    pub credentials: bool,
}

/// Validated `[security]`.
#[derive(Debug, Clone)]
pub struct Security {
    /// HSTS value for TLS answers.
    pub hsts: Option<http::HeaderValue>,
    /// nosniff on envelopes.
    pub nosniff: bool,
    /// Upstream headers removed.
    pub remove_response_headers: Vec<HeaderName>,
}

/// Validated `[lockout]`.
#[derive(Debug, Clone)]
pub struct Lockout {
    /// Failed logins that lock an account.
    pub max_failures: u32,
    /// Lock period.
    pub lock: Duration,
    /// Most accounts tracked at once.
    pub max_entries: usize,
    /// Failed logins one email may have across every tenant domain.
    pub max_failures_per_email: u32,
    /// Upstream statuses that use a guess up.
    pub failure_statuses: Vec<u16>,
}

/// Validated `[limits]`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Send rate-limit headers on allowed responses too.
    pub headers_on_success: bool,
    /// Sweep interval for idle keys.
    pub sweep_interval: Duration,
    /// Prefix lengths (IPv4, IPv6) of the networks that share an `ip` bucket.
    pub ip_prefixes: (u8, u8),
}

/// Validated `[identity_headers]`.
#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    /// Carries `tid`.
    pub tenant: HeaderName,
    /// Carries `sub`.
    pub user: HeaderName,
    /// Carries `role`.
    pub role: HeaderName,
    /// Carries `email`.
    pub email: HeaderName,
}

impl IdentityHeaders {
    /// All four names.
    pub fn all(&self) -> [&HeaderName; 4] {
        [&self.tenant, &self.user, &self.role, &self.email]
    }
}

/// Validated `[server]`.
#[derive(Debug, Clone)]
pub struct Server {
    /// Public listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Worker threads.
    pub threads: usize,
    /// Graceful shutdown period.
    pub shutdown_grace: Duration,
    /// Longest pause between two reads of a client's request body.
    pub client_body_timeout: Duration,
    /// How often watched files are checked for changes.
    pub watch_interval: Duration,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Graceful-upgrade socket.
    pub upgrade_sock: PathBuf,
    /// Largest request head answered normally.
    pub max_header_bytes: usize,
    /// Most request headers answered normally.
    pub max_headers: usize,
    /// Longest idle time of a client connection between requests.
    pub keepalive_timeout: Duration,
    /// Whether worker threads steal tasks from each other.
    pub work_stealing: bool,
    /// Bearer secret for admin actions; `None` turns them off.
    pub admin_token: Option<Secret>,
    /// Longest time a request head may take to arrive.
    pub client_header_timeout: Duration,
    /// Most connections still sending their head, in all.
    pub max_pending_heads: usize,
    /// Most connections from one address still sending their head.
    pub max_pending_heads_per_client: usize,
}

/// A secret from the environment or a file; never printed.
#[derive(Clone)]
pub struct Secret(pub Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Validated `[[upstreams]]` entry.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Name from the file.
    pub name: String,
    /// Servers: addresses, host names with a port, SRV names.
    pub servers: Vec<crate::discovery::Server>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Read timeout.
    pub read_timeout: Duration,
    /// Write timeout.
    pub write_timeout: Duration,
    /// Idle keep-alive timeout.
    pub idle_timeout: Duration,
    /// Health check, if any.
    pub health_check: Option<HealthCheck>,
    /// TLS to the servers, when configured.
    pub tls: Option<UpstreamTls>,
    /// Passive outlier ejection, when configured.
    pub outlier: Option<crate::upstreams::OutlierPolicy>,
    /// Retries allowed on top of requests.
    pub retry_budget: crate::upstreams::RetryBudgetPolicy,
}

/// A validated health check of an upstream's servers.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// How each server is checked.
    pub kind: CheckKind,
    /// How often.
    pub interval: Duration,
    /// Longest wait for one check.
    pub timeout: Duration,
    /// Consecutive passes that make a server healthy again.
    pub healthy_after: usize,
    /// Consecutive failures that take a server out.
    pub unhealthy_after: usize,
}

/// What a health check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect (and TLS handshake, for a TLS upstream).
    Tcp,
    /// `GET path` with `Host: host`; healthy when the status is one of `expect_status`.
    Http {
        /// Request path.
        path: String,
        /// `Host` header.
        host: String,
        /// Statuses that mean healthy.
        expect_status: Vec<u16>,
    },
}

/// Validated upstream TLS.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// SNI and the name verified.
    pub sni: String,
    /// DER CA certificates; `None` uses the system roots.
    pub ca: Option<Vec<Vec<u8>>>,
    /// Verify certificate and host name.
    pub verify: bool,
}

impl std::fmt::Debug for NodeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NodeKeys({}, {} keys)",
            self.path().display(),
            self.len()
        )
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::read(path, true)
    }

    /// Like [`Config::load`], but secrets (`env:`/`file:` sources) are checked for their form
    /// only and stand in as placeholders: for linting a file where the secrets are not (CI).
    /// Such a configuration must not serve.
    pub fn load_without_secrets(path: &Path) -> Result<Config, ConfigError> {
        Config::read(path, false)
    }

    fn read(path: &Path, read_secrets: bool) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: String::new(),
            message: format!("cannot read the file: {e}"),
        })?;
        Config::validate(&text, path, read_secrets)
    }

    /// Parses and validates `text`, reporting errors against `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::validate(text, path, true)
    }

    fn validate(text: &str, path: &Path, read_secrets: bool) -> Result<Config, ConfigError> {
        let file: file::FileConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: String::new(),
            // toml's message names the key, the line and the column.
            message: e.to_string().trim_end().to_string(),
        })?;
        let effective = Arc::new(redacted(serde_json::to_value(&file).unwrap_or_default()));
        let mut config = validate::Validator { path, read_secrets }.validate(file)?;
        config.effective = effective;
        Ok(config)
    }
}

/// `value` with the user information of every URL in it (`redis://:password@host`) replaced.
/// Secrets themselves never appear: the file names them as `env:NAME` or `file:PATH`.
fn redacted(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => {
            let host_start = s.find("://").map(|i| i + 3);
            let userinfo_end = host_start.and_then(|start| {
                let rest = &s[start..];
                let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
                rest[..authority_end]
                    .rfind('@')
                    .map(|at| (start, start + at))
            });
            match userinfo_end {
                Some((start, at)) => {
                    Value::String(format!("{}[redacted]{}", &s[..start], &s[at..]))
                }
                None => Value::String(s),
            }
        }
        Value::Array(items) => Value::Array(items.into_iter().map(redacted).collect()),
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (k, redacted(v))).collect())
        }
        other => other,
    }
}
