//! Configuration: the TOML file format (serde structs) and the validated model the runtime uses.
//!
//! The file structs mirror `config/gateway.toml` and reject unknown keys, so a typo is an error
//! rather than a silently ignored setting. [`Config::load`] turns them into [`Config`], where every
//! address is parsed, every route points at a real upstream and every limit is in range; the
//! runtime never re-checks a raw string.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use http::{HeaderName, Method};
use ipnet::IpNet;
use serde::Deserialize;

use crate::auth::jwt;
use crate::auth::node_key::NodeKeys;
use crate::auth::{Mode, Role};
use crate::limits::ratelimit::{KeyKind, Policy};
use crate::store::Limit;

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

// ---------------------------------------------------------------------------------------------
// File format
// ---------------------------------------------------------------------------------------------

/// The whole file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `[server]`: listeners and process settings.
    #[serde(default)]
    pub server: FileServer,
    /// `[[upstreams]]`: the services behind the gateway.
    #[serde(default)]
    pub upstreams: Vec<FileUpstream>,
    /// `[[routes]]`: which paths go where.
    #[serde(default)]
    pub routes: Vec<FileRoute>,
    /// `[jwt]`: user token settings; required when a route uses `jwt` or `jwt_query`.
    #[serde(default)]
    pub jwt: Option<FileJwt>,
    /// `[identity_headers]`: names of the headers that carry the verified identity upstream.
    #[serde(default)]
    pub identity_headers: FileIdentityHeaders,
    /// `[lockout]`: the login lockout.
    #[serde(default)]
    pub lockout: FileLockout,
    /// `[limits]`: settings shared by every rate limit.
    #[serde(default)]
    pub limits: FileLimits,
    /// `[store]`: where lockout and rate-limit state lives.
    #[serde(default)]
    pub store: FileStore,
    /// `[log]`: log level and format.
    #[serde(default)]
    pub log: FileLog,
    /// `[tls]`: a TLS listener.
    #[serde(default)]
    pub tls: Option<FileTls>,
    /// `[cors]`: cross-origin access for browsers.
    #[serde(default)]
    pub cors: Option<FileCors>,
    /// `[security]`: headers set or removed at the edge.
    #[serde(default)]
    pub security: FileSecurity,
}

/// `[tls]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// TLS listener address.
    pub listen: String,
    /// Certificates; the first is the default when SNI matches none.
    pub certificates: Vec<FileCert>,
    /// Offer HTTP/2 by ALPN (HTTP/1.1 always).
    #[serde(default = "default_true")]
    pub http2: bool,
    /// What the plain listener does: `serve`, or `redirect` (308 to https).
    #[serde(default)]
    pub plain: PlainMode,
}

/// What the plain-HTTP listener does when TLS is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PlainMode {
    /// Serve requests as usual.
    #[default]
    Serve,
    /// Answer 308 with the https URL.
    Redirect,
}

/// One `[[tls.certificates]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCert {
    /// PEM chain.
    pub cert_file: PathBuf,
    /// PEM key.
    pub key_file: PathBuf,
    /// Names chosen by SNI (`*.example.com` allowed).
    #[serde(default)]
    pub server_names: Vec<String>,
}

/// `[cors]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCors {
    /// Exact origins allowed (`https://app.get2dial.com`).
    pub allowed_origins: Vec<String>,
    /// Methods a browser may use.
    #[serde(default = "default_cors_methods")]
    pub allowed_methods: Vec<String>,
    /// Request headers a browser may send.
    #[serde(default = "default_cors_headers")]
    pub allowed_headers: Vec<String>,
    /// Response headers browser code may read.
    #[serde(default = "default_cors_expose")]
    pub expose_headers: Vec<String>,
    /// How long a preflight answer may be cached.
    #[serde(default = "default_cors_max_age")]
    pub max_age_seconds: u64,
    /// Allow cookies and credentials.
    #[serde(default)]
    pub allow_credentials: bool,
}

fn default_cors_methods() -> Vec<String> {
    ["GET", "POST", "PUT", "PATCH", "DELETE"]
        .map(String::from)
        .to_vec()
}
fn default_cors_headers() -> Vec<String> {
    ["Authorization", "Content-Type", "X-Request-Id"]
        .map(String::from)
        .to_vec()
}
fn default_cors_expose() -> Vec<String> {
    [
        "X-Request-Id",
        "Retry-After",
        "RateLimit",
        "RateLimit-Policy",
    ]
    .map(String::from)
    .to_vec()
}
fn default_cors_max_age() -> u64 {
    600
}

/// `[security]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSecurity {
    /// `Strict-Transport-Security` on answers over TLS; empty disables it.
    #[serde(default = "default_hsts")]
    pub hsts: String,
    /// `X-Content-Type-Options: nosniff` on every envelope.
    #[serde(default = "default_true")]
    pub nosniff: bool,
    /// Upstream response headers removed at the edge.
    #[serde(default = "default_removed_headers")]
    pub remove_response_headers: Vec<String>,
}

impl Default for FileSecurity {
    fn default() -> Self {
        FileSecurity {
            hsts: default_hsts(),
            nosniff: true,
            remove_response_headers: default_removed_headers(),
        }
    }
}

fn default_hsts() -> String {
    "max-age=31536000; includeSubDomains".into()
}
fn default_removed_headers() -> Vec<String> {
    ["Server", "X-Powered-By", "X-AspNet-Version", "X-Runtime"]
        .map(String::from)
        .to_vec()
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines.
    #[default]
    Json,
    /// Human-readable, for a terminal.
    Text,
}

/// `[log]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLog {
    /// Level filter (`error`, `warn`, `info`, `debug`, or a tracing filter); `RUST_LOG` overrides.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `json` or `text`.
    #[serde(default)]
    pub format: LogFormat,
    /// One line per request at info level, target `access`.
    #[serde(default = "default_true")]
    pub access_log: bool,
}

impl Default for FileLog {
    fn default() -> Self {
        FileLog {
            level: default_log_level(),
            format: LogFormat::Json,
            access_log: true,
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}
fn default_true() -> bool {
    true
}

/// Where shared counters live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// In this process.
    #[default]
    Memory,
    /// In Redis, shared by every replica.
    Redis,
}

/// `[store]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStore {
    /// `memory` or `redis`.
    #[serde(default)]
    pub kind: StoreKind,
    /// `redis://host:port/db`, `rediss://...`; with credentials only as `env:NAME` / `file:PATH`.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// PEM CA bundle for `rediss://` servers signed by a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Prefix of every Redis key.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Multiplexed connections to Redis.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Longest wait for one Redis operation before the in-process store answers.
    #[serde(default = "default_store_timeout")]
    pub timeout_ms: u64,
    /// Connect timeout.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
}

impl Default for FileStore {
    fn default() -> Self {
        FileStore {
            kind: StoreKind::Memory,
            redis_url: None,
            ca_file: None,
            key_prefix: default_key_prefix(),
            pool_size: default_pool_size(),
            timeout_ms: default_store_timeout(),
            connect_timeout_ms: default_connect_timeout(),
        }
    }
}

fn default_key_prefix() -> String {
    "g2d".into()
}
fn default_pool_size() -> usize {
    2
}
fn default_store_timeout() -> u64 {
    50
}

/// `[lockout]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLockout {
    /// Failed logins that lock an account.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// How long a lock lasts; failures are also forgotten this long after the last one.
    #[serde(default = "default_lock_seconds")]
    pub lock_seconds: u64,
    /// Most accounts tracked at once.
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
    /// Failed logins one email may have across every tenant domain; default 3 x max_failures.
    #[serde(default)]
    pub max_failures_per_email: Option<u32>,
    /// Upstream statuses that mean "wrong credentials" and use a guess up.
    #[serde(default = "default_failure_statuses")]
    pub failure_statuses: Vec<u16>,
}

impl Default for FileLockout {
    fn default() -> Self {
        FileLockout {
            max_failures: default_max_failures(),
            lock_seconds: default_lock_seconds(),
            max_entries: default_max_entries(),
            max_failures_per_email: None,
            failure_statuses: default_failure_statuses(),
        }
    }
}

fn default_failure_statuses() -> Vec<u16> {
    vec![401]
}

fn default_max_failures() -> u32 {
    10
}
fn default_lock_seconds() -> u64 {
    900
}
fn default_max_entries() -> usize {
    100_000
}

/// `[limits]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    /// Also send `RateLimit` / `RateLimit-Policy` on allowed responses.
    #[serde(default)]
    pub headers_on_success: bool,
    /// How often idle rate-limit keys and expired lockout entries are dropped.
    #[serde(default = "default_sweep")]
    pub sweep_interval_ms: u64,
    /// IPv4 clients share an `ip` bucket per network of this prefix length.
    #[serde(default = "default_ipv4_prefix")]
    pub ipv4_prefix: u8,
    /// IPv6 clients share an `ip` bucket per network of this prefix length (a /64 is one
    /// subscriber's LAN).
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
}

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits {
            headers_on_success: false,
            sweep_interval_ms: default_sweep(),
            ipv4_prefix: default_ipv4_prefix(),
            ipv6_prefix: default_ipv6_prefix(),
        }
    }
}

fn default_ipv4_prefix() -> u8 {
    32
}
fn default_ipv6_prefix() -> u8 {
    64
}

fn default_sweep() -> u64 {
    10_000
}

/// One rate-limit policy as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRateLimit {
    /// Name in metrics and headers; defaults to `<route>-<key>`.
    #[serde(default)]
    pub name: Option<String>,
    /// `ip`, `user` or `tenant`.
    pub key: KeyKind,
    /// Requests per second.
    #[serde(default)]
    pub per_second: Option<u32>,
    /// Requests per minute.
    #[serde(default)]
    pub per_minute: Option<u32>,
    /// Requests per hour.
    #[serde(default)]
    pub per_hour: Option<u32>,
    /// Most requests at once; defaults to the rate's count.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// `[jwt]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileJwt {
    /// Active secrets, newest first, each `env:NAME` or `file:PATH`.
    pub secrets: Vec<String>,
    /// Required `iss`.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// Required `aud`.
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Clock leeway for `exp` / `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    /// Longest token accepted.
    #[serde(default = "default_max_token")]
    pub max_token_bytes: usize,
    /// Verified tokens remembered until their `exp` (0: verify every request in full).
    #[serde(default = "default_token_cache")]
    pub cache_entries: usize,
}

fn default_issuer() -> String {
    "get2dial".into()
}
fn default_audience() -> String {
    "get2dial-control".into()
}
fn default_leeway() -> u64 {
    30
}
fn default_max_token() -> usize {
    4096
}
fn default_token_cache() -> usize {
    10_000
}

/// `[identity_headers]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIdentityHeaders {
    /// Carries `tid`.
    #[serde(default = "default_tenant_header")]
    pub tenant: String,
    /// Carries `sub`.
    #[serde(default = "default_user_header")]
    pub user: String,
    /// Carries `role`.
    #[serde(default = "default_role_header")]
    pub role: String,
    /// Carries `email`.
    #[serde(default = "default_email_header")]
    pub email: String,
}

impl Default for FileIdentityHeaders {
    fn default() -> Self {
        FileIdentityHeaders {
            tenant: default_tenant_header(),
            user: default_user_header(),
            role: default_role_header(),
            email: default_email_header(),
        }
    }
}

fn default_tenant_header() -> String {
    "X-Tenant-Id".into()
}
fn default_user_header() -> String {
    "X-User-Id".into()
}
fn default_role_header() -> String {
    "X-User-Role".into()
}
fn default_email_header() -> String {
    "X-User-Email".into()
}

/// `[server]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileServer {
    /// Public listener address.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Admin listener (metrics, health) address.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// Worker threads of the proxy service.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Seconds in-flight requests get to finish on graceful shutdown.
    #[serde(default = "default_grace")]
    pub shutdown_grace_seconds: u64,
    /// Longest pause, in milliseconds, between two reads of a client's request body.
    #[serde(default = "default_client_body_timeout")]
    pub client_body_timeout_ms: u64,
    /// How often watched files (node key digests) are checked for changes.
    #[serde(default = "default_watch_interval")]
    pub watch_interval_ms: u64,
    /// Proxies (CIDRs or addresses) whose `X-Forwarded-For` is believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Unix socket through which a new process takes over the listeners (graceful upgrade).
    #[serde(default = "default_upgrade_sock")]
    pub upgrade_sock: PathBuf,
    /// Largest request head (request line and headers) answered normally; larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Most request headers answered normally; more gets 431.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Seconds a client connection may stay idle between requests before it is closed.
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout_seconds: u64,
    /// Whether idle worker threads take tasks from busy ones (Pingora's `work_stealing`).
    #[serde(default = "default_work_stealing")]
    pub work_stealing: bool,
    /// Longest time, in milliseconds, a request head may take to arrive (then 408).
    #[serde(default = "default_client_header_timeout")]
    pub client_header_timeout_ms: u64,
    /// Most connections still sending their head, in all (then 503).
    #[serde(default = "default_max_pending_heads")]
    pub max_pending_heads: usize,
    /// Most connections from one address still sending their head (then 429); trusted
    /// proxies are exempt.
    #[serde(default = "default_max_pending_heads_per_client")]
    pub max_pending_heads_per_client: usize,
    /// Bearer secret (`env:NAME` / `file:PATH`) for admin actions (`POST /-/reload`); without
    /// it they are off on the admin listener.
    #[serde(default)]
    pub admin_token: Option<String>,
}

/// nginx's `client_header_timeout` is 60 s; an API's heads arrive in one packet.
fn default_client_header_timeout() -> u64 {
    10_000
}
fn default_max_pending_heads() -> usize {
    1000
}
fn default_max_pending_heads_per_client() -> usize {
    16
}

/// Pingora's own default.
fn default_keepalive_timeout() -> u64 {
    60
}
fn default_work_stealing() -> bool {
    true
}

/// Well below Pingora's own 1 MiB limit, whose answer is a bare 400.
fn default_max_header_bytes() -> usize {
    32 * 1024
}
/// Below Pingora's own limit of 256 headers.
fn default_max_headers() -> usize {
    100
}

fn default_upgrade_sock() -> PathBuf {
    "/tmp/get2dial-gateway-upgrade.sock".into()
}

impl Default for FileServer {
    fn default() -> Self {
        FileServer {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            threads: default_threads(),
            shutdown_grace_seconds: default_grace(),
            client_body_timeout_ms: default_client_body_timeout(),
            watch_interval_ms: default_watch_interval(),
            trusted_proxies: Vec::new(),
            upgrade_sock: default_upgrade_sock(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            keepalive_timeout_seconds: default_keepalive_timeout(),
            work_stealing: default_work_stealing(),
            admin_token: None,
            client_header_timeout_ms: default_client_header_timeout(),
            max_pending_heads: default_max_pending_heads(),
            max_pending_heads_per_client: default_max_pending_heads_per_client(),
        }
    }
}

fn default_listen() -> String {
    "0.0.0.0:8080".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9090".into()
}
fn default_threads() -> usize {
    2
}
fn default_grace() -> u64 {
    5
}
fn default_watch_interval() -> u64 {
    2_000
}

/// Below the upstreams' default read timeout, so a stalled client gets 408 rather than 504.
fn default_client_body_timeout() -> u64 {
    10_000
}

/// One `[[upstreams]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    /// Name routes refer to.
    pub name: String,
    /// `host:port` of each server, balanced round-robin.
    pub servers: Vec<String>,
    /// TCP connect timeout.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Longest wait for the next read from the upstream (headers or body).
    #[serde(default = "default_io_timeout")]
    pub read_timeout_ms: u64,
    /// Longest wait for a write to the upstream.
    #[serde(default = "default_io_timeout")]
    pub write_timeout_ms: u64,
    /// How long an idle keep-alive connection to the upstream is kept.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_ms: u64,
    /// Interval of the TCP health check; absent means every server counts as healthy.
    #[serde(default)]
    pub health_check_interval_ms: Option<u64>,
    /// Speak TLS to the servers.
    #[serde(default)]
    pub tls: bool,
    /// Name for SNI and certificate verification (default: none, so verification needs it).
    #[serde(default)]
    pub sni: Option<String>,
    /// PEM CA bundle to verify the servers with, instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Verify the servers' certificates; turning it off is logged as a warning at start.
    #[serde(default = "default_true")]
    pub verify_certificate: bool,
}

fn default_connect_timeout() -> u64 {
    1_000
}
fn default_io_timeout() -> u64 {
    30_000
}
fn default_idle_timeout() -> u64 {
    60_000
}

/// One `[[routes]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    /// Name used in metrics and logs.
    pub name: String,
    /// Path prefix, matched on whole segments (`/api/v1` matches `/api/v1/x`, not `/api/v1x`).
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Exact path (`/api/v1/auth/login` matches that path only), like a Go `net/http` pattern
    /// without a trailing slash. Give `path` or `path_prefix`.
    #[serde(default)]
    pub path: Option<String>,
    /// Allowed methods; empty or absent allows all.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Name of the upstream that serves it.
    pub upstream: String,
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// How callers authenticate: `public`, `jwt`, `jwt_query` or `node_key`. Required.
    pub auth: Mode,
    /// Lowest role allowed (`jwt` and `jwt_query` routes).
    #[serde(default)]
    pub min_role: Option<Role>,
    /// Source networks allowed (CIDRs or addresses); empty allows every source.
    #[serde(default)]
    pub allow_networks: Vec<String>,
    /// File of SHA-256 digests of valid node keys (`node_key` routes).
    #[serde(default)]
    pub node_key_digests_file: Option<PathBuf>,
    /// One rate-limit policy.
    #[serde(default)]
    pub rate_limit: Option<FileRateLimit>,
    /// Several rate-limit policies, all of which must allow a request.
    #[serde(default)]
    pub rate_limits: Vec<FileRateLimit>,
    /// Read and check the login body and enforce the lockout.
    #[serde(default)]
    pub login_guard: bool,
    /// Forward WebSocket (HTTP/1.1 `Upgrade`) requests; default: on `jwt_query` routes only.
    #[serde(default)]
    pub websocket: Option<bool>,
}

/// Largest login body the guard reads: Pingora's retry buffer (64 KiB) replays it upstream.
pub const LOGIN_BODY_CAP: u64 = 65_536;

/// The Get2Dial API caps request bodies at 1 MB.
fn default_max_body() -> u64 {
    1_048_576
}

// ---------------------------------------------------------------------------------------------
// Validated model
// ---------------------------------------------------------------------------------------------

/// The validated configuration the runtime uses.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// Listener and process settings.
    pub server: Server,
    /// Upstreams, in file order.
    pub upstreams: Vec<Upstream>,
    /// Routes, in file order; each `upstream` is an index into `upstreams`.
    pub routes: Vec<Route>,
    /// User token settings, when any route needs them.
    pub jwt: Option<jwt::Settings>,
    /// Header names for the verified identity.
    pub identity_headers: IdentityHeaders,
    /// Lockout parameters shared by every login route.
    pub lockout: Lockout,
    /// Settings shared by every rate limit.
    pub limits: Limits,
    /// Where shared counters live: `None` in memory, `Some` in Redis.
    pub redis: Option<crate::store::redis::Settings>,
    /// Log settings.
    pub log: FileLog,
    /// The TLS listener, if any.
    pub tls: Option<Tls>,
    /// Cross-origin settings, if any.
    pub cors: Option<Cors>,
    /// Edge security headers.
    pub security: Security,
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
    /// Server addresses.
    pub servers: Vec<SocketAddr>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Read timeout.
    pub read_timeout: Duration,
    /// Write timeout.
    pub write_timeout: Duration,
    /// Idle keep-alive timeout.
    pub idle_timeout: Duration,
    /// Health check interval, if any.
    pub health_check_interval: Option<Duration>,
    /// TLS to the servers, when configured.
    pub tls: Option<UpstreamTls>,
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

/// Validated `[[routes]]` entry.
#[derive(Debug, Clone)]
pub struct Route {
    /// Name from the file.
    pub name: String,
    /// Path prefix, or the exact path when `exact`.
    pub path_prefix: String,
    /// Matches `path_prefix` exactly, not as a prefix.
    pub exact: bool,
    /// Allowed methods; empty allows all. GET implies HEAD.
    pub methods: Vec<Method>,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    /// Largest request body accepted.
    pub max_body_bytes: u64,
    /// How callers authenticate.
    pub auth: Mode,
    /// Lowest role allowed.
    pub min_role: Option<Role>,
    /// Source networks allowed; empty allows all.
    pub allow_networks: Vec<IpNet>,
    /// Known node keys, for `node_key` routes that configure a digest file.
    pub node_keys: Option<Arc<NodeKeys>>,
    /// Rate-limit policies, all of which must allow a request.
    pub rate_limits: Vec<Policy>,
    /// Whether the login guard runs on this route.
    pub login_guard: bool,
    /// Whether WebSocket upgrades are forwarded.
    pub websocket: bool,
}

impl Route {
    /// A public route to the first upstream with the default body cap and no limits: what
    /// tests, benches and fuzz targets build route tables from.
    pub fn public(name: &str, path_prefix: &str, methods: &[Method]) -> Route {
        Route {
            name: name.into(),
            path_prefix: path_prefix.into(),
            exact: false,
            methods: methods.to_vec(),
            upstream: 0,
            max_body_bytes: default_max_body(),
            auth: Mode::Public,
            min_role: None,
            allow_networks: Vec::new(),
            node_keys: None,
            rate_limits: Vec::new(),
            login_guard: false,
            websocket: false,
        }
    }
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
    /// Every rate-limit policy of every route, for the store to give them ids.
    pub fn limits_mut(&mut self) -> Vec<&mut Limit> {
        self.routes
            .iter_mut()
            .flat_map(|r| r.rate_limits.iter_mut().map(|p| &mut p.limit))
            .collect()
    }

    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: String::new(),
            message: format!("cannot read the file: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`, reporting errors against `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: String::new(),
            // toml's message names the key, the line and the column.
            message: e.to_string().trim_end().to_string(),
        })?;
        Validator { path }.validate(file)
    }
}

struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.path.to_owned(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        value.parse().map_err(|_| {
            self.err(
                key,
                format!("`{value}` is not an IP address with a port (e.g. 127.0.0.1:8080)"),
            )
        })
    }

    fn millis(&self, key: &str, value: u64) -> Result<Duration, ConfigError> {
        if value == 0 {
            return Err(self.err(key, "must be greater than 0"));
        }
        Ok(Duration::from_millis(value))
    }

    fn name(&self, key: &str, value: &str) -> Result<(), ConfigError> {
        let ok = !value.is_empty()
            && value.len() <= 64
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(())
        } else {
            Err(self.err(
                key,
                format!("`{value}` must be 1 to 64 characters of letters, digits, `_` or `-`"),
            ))
        }
    }

    fn validate(&self, file: FileConfig) -> Result<Config, ConfigError> {
        let s = &file.server;
        let server = Server {
            listen: self.addr("server.listen", &s.listen)?,
            admin_listen: self.addr("server.admin_listen", &s.admin_listen)?,
            threads: match s.threads {
                1..=256 => s.threads,
                _ => return Err(self.err("server.threads", "must be between 1 and 256")),
            },
            shutdown_grace: Duration::from_secs(s.shutdown_grace_seconds),
            client_body_timeout: self
                .millis("server.client_body_timeout_ms", s.client_body_timeout_ms)?,
            watch_interval: self.millis("server.watch_interval_ms", s.watch_interval_ms)?,
            trusted_proxies: s
                .trusted_proxies
                .iter()
                .enumerate()
                .map(|(i, n)| self.network(&format!("server.trusted_proxies[{i}]"), n))
                .collect::<Result<Vec<_>, _>>()?,
            upgrade_sock: self.relative(&s.upgrade_sock),
            max_header_bytes: match s.max_header_bytes {
                1024..=1_000_000 => s.max_header_bytes,
                _ => {
                    return Err(self.err(
                        "server.max_header_bytes",
                        "must be between 1024 and 1000000 (Pingora refuses heads over 1 MiB with a bare 400)",
                    ))
                }
            },
            max_headers: match s.max_headers {
                8..=250 => s.max_headers,
                _ => {
                    return Err(self.err(
                        "server.max_headers",
                        "must be between 8 and 250 (Pingora refuses more than 256 with a bare 400)",
                    ))
                }
            },
            keepalive_timeout: match s.keepalive_timeout_seconds {
                1..=3600 => Duration::from_secs(s.keepalive_timeout_seconds),
                _ => {
                    return Err(self.err(
                        "server.keepalive_timeout_seconds",
                        "must be between 1 and 3600",
                    ))
                }
            },
            work_stealing: s.work_stealing,
            client_header_timeout: self
                .millis("server.client_header_timeout_ms", s.client_header_timeout_ms)?,
            max_pending_heads: match s.max_pending_heads {
                1..=1_000_000 => s.max_pending_heads,
                _ => {
                    return Err(
                        self.err("server.max_pending_heads", "must be between 1 and 1000000")
                    )
                }
            },
            max_pending_heads_per_client: match s.max_pending_heads_per_client {
                1..=1_000_000 => s.max_pending_heads_per_client,
                _ => {
                    return Err(self.err(
                        "server.max_pending_heads_per_client",
                        "must be between 1 and 1000000",
                    ))
                }
            },
            admin_token: match &s.admin_token {
                None => None,
                Some(source) => {
                    let secret = self.secret("server.admin_token", source)?;
                    if secret.len() < 16 {
                        return Err(self.err(
                            "server.admin_token",
                            format!("the secret is {} bytes; at least 16 are required", secret.len()),
                        ));
                    }
                    Some(Secret(secret))
                }
            },
        };
        if server.listen == server.admin_listen {
            return Err(self.err(
                "server.admin_listen",
                "must differ from server.listen: the admin port is not public",
            ));
        }

        if file.upstreams.is_empty() {
            return Err(self.err("upstreams", "at least one [[upstreams]] entry is required"));
        }
        let mut upstreams = Vec::with_capacity(file.upstreams.len());
        let mut seen = HashSet::new();
        for (i, u) in file.upstreams.iter().enumerate() {
            let key = |k: &str| format!("upstreams[{i}].{k}");
            self.name(&key("name"), &u.name)?;
            if !seen.insert(u.name.as_str()) {
                return Err(self.err(key("name"), format!("duplicate upstream `{}`", u.name)));
            }
            if u.servers.is_empty() {
                return Err(self.err(key("servers"), "at least one server is required"));
            }
            let servers = u
                .servers
                .iter()
                .enumerate()
                .map(|(j, s)| self.addr(&format!("upstreams[{i}].servers[{j}]"), s))
                .collect::<Result<Vec<_>, _>>()?;
            upstreams.push(Upstream {
                name: u.name.clone(),
                servers,
                connect_timeout: self.millis(&key("connect_timeout_ms"), u.connect_timeout_ms)?,
                read_timeout: self.millis(&key("read_timeout_ms"), u.read_timeout_ms)?,
                write_timeout: self.millis(&key("write_timeout_ms"), u.write_timeout_ms)?,
                idle_timeout: self.millis(&key("idle_timeout_ms"), u.idle_timeout_ms)?,
                health_check_interval: u
                    .health_check_interval_ms
                    .map(|ms| self.millis(&key("health_check_interval_ms"), ms))
                    .transpose()?,
                tls: self.upstream_tls(i, u)?,
            });
        }

        if file.routes.is_empty() {
            return Err(self.err("routes", "at least one [[routes]] entry is required"));
        }
        let mut routes = Vec::with_capacity(file.routes.len());
        let mut seen = HashSet::new();
        // A policy name is one bucket everywhere (memory and Redis alike): every route that
        // names it must mean the same policy.
        let mut policy_names: std::collections::HashMap<String, (String, Policy)> =
            std::collections::HashMap::new();
        for (i, r) in file.routes.iter().enumerate() {
            let key = |k: &str| format!("routes[{i}].{k}");
            self.name(&key("name"), &r.name)?;
            if !seen.insert(r.name.as_str()) {
                return Err(self.err(key("name"), format!("duplicate route `{}`", r.name)));
            }
            let (path_key, path_prefix, exact) = match (&r.path_prefix, &r.path) {
                (Some(p), None) => ("path_prefix", p, false),
                (None, Some(p)) => ("path", p, true),
                _ => return Err(self.err(key("path"), "give exactly one of path, path_prefix")),
            };
            if !crate::path::is_route_prefix(path_prefix) {
                return Err(self.err(
                    key(path_key),
                    format!(
                        "`{path_prefix}` must be `/` followed by letters, digits, `-`, `_`, \
                         `~`, `.` and `/`, with no empty or `.`/`..` segments (requests are \
                         matched after decoding escaped unreserved characters)"
                    ),
                ));
            }
            let mut methods = Vec::with_capacity(r.methods.len());
            for (j, m) in r.methods.iter().enumerate() {
                let upper = m.to_ascii_uppercase();
                let method = Method::from_bytes(upper.as_bytes())
                    .ok()
                    .filter(|m| m.as_str().bytes().all(|b| b.is_ascii_uppercase()))
                    .ok_or_else(|| {
                        self.err(
                            format!("routes[{i}].methods[{j}]"),
                            format!("`{m}` is not an HTTP method"),
                        )
                    })?;
                if !methods.contains(&method) {
                    methods.push(method);
                }
            }
            if methods.contains(&Method::GET) && !methods.contains(&Method::HEAD) {
                methods.push(Method::HEAD);
            }
            let upstream = upstreams
                .iter()
                .position(|u| u.name == r.upstream)
                .ok_or_else(|| {
                    self.err(
                        key("upstream"),
                        format!("no [[upstreams]] entry is named `{}`", r.upstream),
                    )
                })?;
            if r.min_role.is_some() && !matches!(r.auth, Mode::Jwt | Mode::JwtQuery) {
                return Err(self.err(
                    key("min_role"),
                    format!(
                        "needs auth = \"jwt\" or \"jwt_query\", not \"{}\"",
                        r.auth.as_str()
                    ),
                ));
            }
            let node_keys = match (&r.node_key_digests_file, r.auth) {
                (None, _) => None,
                (Some(file), Mode::NodeKey) => {
                    let keys = NodeKeys::load(&self.relative(file))
                        .map_err(|e| self.err(key("node_key_digests_file"), e))?;
                    Some(Arc::new(keys))
                }
                (Some(_), other) => {
                    return Err(self.err(
                        key("node_key_digests_file"),
                        format!("needs auth = \"node_key\", not \"{}\"", other.as_str()),
                    ))
                }
            };
            let allow_networks = r
                .allow_networks
                .iter()
                .enumerate()
                .map(|(j, n)| self.network(&format!("routes[{i}].allow_networks[{j}]"), n))
                .collect::<Result<Vec<_>, _>>()?;
            let mut rate_limits = Vec::new();
            let policies = r.rate_limit.iter().map(|p| (key("rate_limit"), p)).chain(
                r.rate_limits
                    .iter()
                    .enumerate()
                    .map(|(j, p)| (format!("routes[{i}].rate_limits[{j}]"), p)),
            );
            for (pkey, p) in policies {
                let policy = self.policy(&pkey, p, &r.name, r.auth)?;
                if rate_limits
                    .iter()
                    .any(|q: &Policy| q.limit.name == policy.limit.name)
                {
                    return Err(self.err(
                        format!("{pkey}.name"),
                        format!(
                            "duplicate policy name `{}` on this route",
                            policy.limit.name
                        ),
                    ));
                }
                if let Some((other, q)) = policy_names.get(&policy.limit.name) {
                    let same = q.key == policy.key
                        && q.limit.interval == policy.limit.interval
                        && q.limit.burst == policy.limit.burst;
                    if !same {
                        return Err(self.err(
                            format!("{pkey}.name"),
                            format!(
                                "policy `{}` is also on route `{other}` with another key, rate or \
                                 burst; routes that name one policy share its buckets, so give \
                                 this one its own name",
                                policy.limit.name
                            ),
                        ));
                    }
                } else {
                    policy_names
                        .insert(policy.limit.name.clone(), (r.name.clone(), policy.clone()));
                }
                rate_limits.push(policy);
            }
            if r.login_guard {
                // The guard reads POST bodies; any other method would reach the login
                // handler unguarded.
                if methods != [Method::POST] {
                    return Err(self.err(
                        key("methods"),
                        "a login_guard route must allow exactly [\"POST\"]",
                    ));
                }
                if r.websocket == Some(true) {
                    return Err(self.err(key("websocket"), "not on a login_guard route"));
                }
                if r.max_body_bytes > LOGIN_BODY_CAP {
                    return Err(self.err(
                        key("max_body_bytes"),
                        format!(
                            "login_guard reads the body at the edge: keep it at most {LOGIN_BODY_CAP}"
                        ),
                    ));
                }
            }
            routes.push(Route {
                name: r.name.clone(),
                path_prefix: path_prefix.clone(),
                exact,
                methods,
                upstream,
                max_body_bytes: r.max_body_bytes,
                auth: r.auth,
                min_role: r.min_role,
                allow_networks,
                node_keys,
                rate_limits,
                login_guard: r.login_guard,
                websocket: r.websocket.unwrap_or(r.auth == Mode::JwtQuery),
            });
        }

        let needs_jwt = routes
            .iter()
            .position(|r| matches!(r.auth, Mode::Jwt | Mode::JwtQuery));
        let jwt = match (&file.jwt, needs_jwt) {
            (Some(j), _) => Some(self.jwt(j)?),
            (None, Some(i)) => {
                return Err(self.err(
                    "jwt",
                    format!(
                        "routes[{i}] uses auth = \"{}\" but there is no [jwt] section",
                        routes[i].auth.as_str()
                    ),
                ))
            }
            (None, None) => None,
        };

        let h = &file.identity_headers;
        let identity_headers = IdentityHeaders {
            tenant: self.header_name("identity_headers.tenant", &h.tenant)?,
            user: self.header_name("identity_headers.user", &h.user)?,
            role: self.header_name("identity_headers.role", &h.role)?,
            email: self.header_name("identity_headers.email", &h.email)?,
        };
        let names = identity_headers.all();
        if (1..names.len()).any(|i| names[..i].contains(&names[i])) {
            return Err(self.err("identity_headers", "the four header names must differ"));
        }

        let l = &file.lockout;
        if l.max_failures == 0 || l.max_failures > 1000 {
            return Err(self.err("lockout.max_failures", "must be between 1 and 1000"));
        }
        if l.lock_seconds == 0 {
            return Err(self.err("lockout.lock_seconds", "must be greater than 0"));
        }
        if l.max_entries == 0 {
            return Err(self.err("lockout.max_entries", "must be greater than 0"));
        }
        let per_email = l
            .max_failures_per_email
            .unwrap_or(l.max_failures.saturating_mul(3));
        if per_email < l.max_failures || per_email > 10_000 {
            return Err(self.err(
                "lockout.max_failures_per_email",
                "must be between lockout.max_failures and 10000",
            ));
        }
        if l.failure_statuses.is_empty()
            || l.failure_statuses
                .iter()
                .any(|s| !(400..=499).contains(s) || *s == 429 || *s == 408)
        {
            return Err(self.err(
                "lockout.failure_statuses",
                "give one or more 4xx statuses (not 408 or 429, which say nothing about the password)",
            ));
        }
        let lockout = Lockout {
            max_failures: l.max_failures,
            lock: Duration::from_secs(l.lock_seconds),
            max_entries: l.max_entries,
            max_failures_per_email: per_email,
            failure_statuses: l.failure_statuses.clone(),
        };
        let fl = &file.limits;
        if !(1..=32).contains(&fl.ipv4_prefix) {
            return Err(self.err("limits.ipv4_prefix", "must be between 1 and 32"));
        }
        if !(1..=128).contains(&fl.ipv6_prefix) {
            return Err(self.err("limits.ipv6_prefix", "must be between 1 and 128"));
        }
        let limits = Limits {
            headers_on_success: fl.headers_on_success,
            sweep_interval: self.millis("limits.sweep_interval_ms", fl.sweep_interval_ms)?,
            ip_prefixes: (fl.ipv4_prefix, fl.ipv6_prefix),
        };

        if tracing_subscriber::EnvFilter::try_new(&file.log.level).is_err() {
            return Err(self.err(
                "log.level",
                format!("`{}` is not a level or tracing filter", file.log.level),
            ));
        }
        let tls = match &file.tls {
            None => None,
            Some(t) => Some(self.tls(t, server.listen, server.admin_listen)?),
        };
        let cors = file.cors.as_ref().map(|c| self.cors(c)).transpose()?;
        let security = self.security(&file.security)?;
        let redis = match file.store.kind {
            StoreKind::Memory => None,
            StoreKind::Redis => Some(self.redis(&file.store)?),
        };

        Ok(Config {
            path: self.path.to_owned(),
            server,
            upstreams,
            routes,
            jwt,
            identity_headers,
            lockout,
            limits,
            redis,
            log: file.log.clone(),
            tls,
            cors,
            security,
        })
    }

    fn upstream_tls(&self, i: usize, u: &FileUpstream) -> Result<Option<UpstreamTls>, ConfigError> {
        let key = |k: &str| format!("upstreams[{i}].{k}");
        if !u.tls {
            for (set, k) in [(u.sni.is_some(), "sni"), (u.ca_file.is_some(), "ca_file")] {
                if set {
                    return Err(self.err(key(k), "needs tls = true"));
                }
            }
            return Ok(None);
        }
        let sni = u.sni.clone().unwrap_or_default();
        if u.verify_certificate && sni.is_empty() {
            return Err(self.err(key("sni"), "required to verify the servers' certificates"));
        }
        let ca = match &u.ca_file {
            None => None,
            Some(f) => Some(
                crate::tls::load_ca_bundle(&self.relative(f))
                    .map_err(|e| self.err(key("ca_file"), e))?,
            ),
        };
        Ok(Some(UpstreamTls {
            sni,
            ca,
            verify: u.verify_certificate,
        }))
    }

    fn tls(&self, t: &FileTls, listen: SocketAddr, admin: SocketAddr) -> Result<Tls, ConfigError> {
        let addr = self.addr("tls.listen", &t.listen)?;
        if addr == listen || addr == admin {
            return Err(self.err(
                "tls.listen",
                "must differ from server.listen and server.admin_listen",
            ));
        }
        if t.certificates.is_empty() {
            return Err(self.err("tls.certificates", "at least one certificate is required"));
        }
        let sources: Vec<crate::tls::CertSource> = t
            .certificates
            .iter()
            .map(|c| crate::tls::CertSource {
                cert_file: self.relative(&c.cert_file),
                key_file: self.relative(&c.key_file),
                server_names: c.server_names.clone(),
            })
            .collect();
        let certificates =
            crate::tls::Certificates::load(sources).map_err(|e| self.err("tls.certificates", e))?;
        Ok(Tls {
            listen: addr,
            certificates: Arc::new(certificates),
            http2: t.http2,
            plain: t.plain,
        })
    }

    fn cors(&self, c: &FileCors) -> Result<Cors, ConfigError> {
        for (i, o) in c.allowed_origins.iter().enumerate() {
            let ok = (o.starts_with("https://") || o.starts_with("http://"))
                && !o.ends_with('/')
                && http::HeaderValue::from_str(o).is_ok()
                && o != "*";
            if !ok {
                return Err(self.err(
                    format!("cors.allowed_origins[{i}]"),
                    format!("`{o}` must be an origin such as https://app.get2dial.com (scheme, host, optional port; no path, no `*`)"),
                ));
            }
        }
        let list = |key: &str, items: &[String], check: fn(&str) -> bool| {
            for (i, m) in items.iter().enumerate() {
                if !check(m) {
                    return Err(self.err(
                        format!("cors.{key}[{i}]"),
                        format!("`{m}` is not valid here"),
                    ));
                }
            }
            http::HeaderValue::from_str(&items.join(", "))
                .map_err(|_| self.err(format!("cors.{key}"), "not a valid header value"))
        };
        let token = |s: &str| !s.is_empty() && HeaderName::from_bytes(s.as_bytes()).is_ok();
        Ok(Cors {
            origins: c.allowed_origins.clone(),
            methods: list("allowed_methods", &c.allowed_methods, |m| {
                Method::from_bytes(m.as_bytes()).is_ok() && !m.is_empty()
            })?,
            headers: list("allowed_headers", &c.allowed_headers, token)?,
            expose: list("expose_headers", &c.expose_headers, token)?,
            max_age: http::HeaderValue::from(c.max_age_seconds),
            credentials: c.allow_credentials,
        })
    }

    fn security(&self, s: &FileSecurity) -> Result<Security, ConfigError> {
        let hsts = if s.hsts.is_empty() {
            None
        } else {
            Some(
                http::HeaderValue::from_str(&s.hsts)
                    .map_err(|_| self.err("security.hsts", "not a valid header value"))?,
            )
        };
        let remove_response_headers = s
            .remove_response_headers
            .iter()
            .enumerate()
            .map(|(i, h)| self.header_name(&format!("security.remove_response_headers[{i}]"), h))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Security {
            hsts,
            nosniff: s.nosniff,
            remove_response_headers,
        })
    }

    fn redis(&self, st: &FileStore) -> Result<crate::store::redis::Settings, ConfigError> {
        let Some(source) = &st.redis_url else {
            return Err(self.err("store.redis_url", "required when kind = \"redis\""));
        };
        let url = if source.starts_with("env:") || source.starts_with("file:") {
            String::from_utf8(self.secret("store.redis_url", source)?)
                .map_err(|_| self.err("store.redis_url", "the URL is not UTF-8"))?
                .trim()
                .to_string()
        } else {
            let authority = source.split("://").nth(1).unwrap_or_default();
            if authority
                .split('/')
                .next()
                .unwrap_or_default()
                .contains('@')
            {
                return Err(self.err(
                    "store.redis_url",
                    "a URL with credentials is a secret: give it as `env:NAME` or `file:PATH`",
                ));
            }
            source.clone()
        };
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(self.err("store.redis_url", "must be a redis:// or rediss:// URL"));
        }
        if redis::Client::open(url.as_str()).is_err() {
            return Err(self.err("store.redis_url", "is not a valid Redis URL"));
        }
        let ca_pem = match &st.ca_file {
            None => None,
            Some(f) => {
                let path = self.relative(f);
                Some(std::fs::read(&path).map_err(|e| {
                    self.err(
                        "store.ca_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?)
            }
        };
        if !(1..=64).contains(&st.pool_size) {
            return Err(self.err("store.pool_size", "must be between 1 and 64"));
        }
        if st.key_prefix.is_empty() || st.key_prefix.contains(char::is_whitespace) {
            return Err(self.err("store.key_prefix", "must be non-empty, without spaces"));
        }
        Ok(crate::store::redis::Settings {
            url,
            ca_pem,
            key_prefix: st.key_prefix.clone(),
            pool_size: st.pool_size,
            connect_timeout: self.millis("store.connect_timeout_ms", st.connect_timeout_ms)?,
            timeout: self.millis("store.timeout_ms", st.timeout_ms)?,
        })
    }

    /// A secret from `env:NAME` or `file:PATH` (a trailing newline is not part of it).
    fn secret(&self, key: &str, source: &str) -> Result<Vec<u8>, ConfigError> {
        if let Some(name) = source.strip_prefix("env:") {
            return std::env::var(name)
                .map(String::into_bytes)
                .map_err(|_| self.err(key, format!("environment variable {name} is not set")));
        }
        if let Some(file) = source.strip_prefix("file:") {
            let path = self.relative(Path::new(file));
            let mut bytes = std::fs::read(&path)
                .map_err(|e| self.err(key, format!("cannot read {}: {e}", path.display())))?;
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            return Ok(bytes);
        }
        Err(self.err(
            key,
            "must be `env:NAME` or `file:PATH`; secrets never go in this file",
        ))
    }

    fn policy(
        &self,
        key: &str,
        p: &FileRateLimit,
        route: &str,
        auth: Mode,
    ) -> Result<Policy, ConfigError> {
        let rates = [
            (p.per_second, Duration::from_secs(1)),
            (p.per_minute, Duration::from_secs(60)),
            (p.per_hour, Duration::from_secs(3600)),
        ];
        let mut given = rates.iter().filter_map(|(n, d)| n.map(|n| (n, *d)));
        let (Some((count, period)), None) = (given.next(), given.next()) else {
            return Err(self.err(key, "give exactly one of per_second, per_minute, per_hour"));
        };
        if count == 0 {
            return Err(self.err(key, "the rate must be at least 1"));
        }
        let burst = p.burst.unwrap_or(count);
        if burst == 0 {
            return Err(self.err(format!("{key}.burst"), "must be at least 1"));
        }
        if matches!(p.key, KeyKind::User | KeyKind::Tenant)
            && !matches!(auth, Mode::Jwt | Mode::JwtQuery)
        {
            return Err(self.err(
                format!("{key}.key"),
                format!(
                    "`{}` needs a verified caller (auth = \"jwt\" or \"jwt_query\"); this route can only key by ip",
                    p.key.as_str()
                ),
            ));
        }
        let name = p
            .name
            .clone()
            .unwrap_or_else(|| format!("{route}-{}", p.key.as_str()));
        self.name(&format!("{key}.name"), &name)?;
        Ok(Policy {
            key: p.key,
            limit: Limit {
                // Set by the store when it registers the policy.
                id: 0,
                name,
                interval: period / count,
                burst,
            },
        })
    }

    /// A path from the file, relative to the file's own directory.
    fn relative(&self, p: &Path) -> PathBuf {
        match self.path.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_owned(),
        }
    }

    fn network(&self, key: &str, value: &str) -> Result<IpNet, ConfigError> {
        value
            .parse::<IpNet>()
            .or_else(|_| value.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| {
                self.err(
                    key,
                    format!("`{value}` is not a CIDR (10.0.0.0/8) or an IP address"),
                )
            })
    }

    fn header_name(&self, key: &str, value: &str) -> Result<HeaderName, ConfigError> {
        HeaderName::from_bytes(value.as_bytes())
            .map_err(|_| self.err(key, format!("`{value}` is not a valid header name")))
    }

    fn jwt(&self, j: &FileJwt) -> Result<jwt::Settings, ConfigError> {
        if j.secrets.is_empty() {
            return Err(self.err("jwt.secrets", "at least one secret source is required"));
        }
        let mut secrets = Vec::with_capacity(j.secrets.len());
        for (i, source) in j.secrets.iter().enumerate() {
            let key = format!("jwt.secrets[{i}]");
            let secret = self.secret(&key, source)?;
            if secret.len() < 16 {
                return Err(self.err(
                    &key,
                    format!(
                        "the secret is {} bytes; at least 16 are required",
                        secret.len()
                    ),
                ));
            }
            secrets.push(secret);
        }
        if j.leeway_seconds > 300 {
            return Err(self.err("jwt.leeway_seconds", "must be at most 300"));
        }
        if !(256..=65_536).contains(&j.max_token_bytes) {
            return Err(self.err("jwt.max_token_bytes", "must be between 256 and 65536"));
        }
        Ok(jwt::Settings {
            secrets,
            issuer: j.issuer.clone(),
            audience: j.audience.clone(),
            leeway_seconds: j.leeway_seconds,
            max_token_bytes: j.max_token_bytes,
            cache_entries: match j.cache_entries {
                0..=1_000_000 => j.cache_entries,
                _ => return Err(self.err("jwt.cache_entries", "must be at most 1000000")),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[upstreams]]
        name = "control"
        servers = ["127.0.0.1:8081"]

        [[routes]]
        name = "api"
        path_prefix = "/api/v1/"
        upstream = "control"
        auth = "public"
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("gw.toml"))
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.upstreams[0].connect_timeout, Duration::from_secs(1));
        assert_eq!(c.routes[0].max_body_bytes, 1_048_576);
        assert!(c.routes[0].methods.is_empty());
    }

    #[test]
    fn unknown_key_is_named_with_file() {
        let e = parse(&format!("{MINIMAL}\n[server]\nlisten_addr = \"x\"\n")).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("gw.toml: "), "{text}");
        assert!(text.contains("listen_addr"), "{text}");
    }

    #[test]
    fn bad_upstream_reference_names_the_key() {
        let e =
            parse(&MINIMAL.replace("upstream = \"control\"", "upstream = \"nope\"")).unwrap_err();
        assert_eq!(e.key, "routes[0].upstream");
        assert!(e.message.contains("nope"));
    }

    #[test]
    fn bad_server_address_names_the_key() {
        let e = parse(&MINIMAL.replace("127.0.0.1:8081", "localhost")).unwrap_err();
        assert_eq!(e.key, "upstreams[0].servers[0]");
    }

    #[test]
    fn get_implies_head_and_methods_are_checked() {
        let c = parse(&MINIMAL.replace(
            "upstream = \"control\"",
            "upstream = \"control\"\nmethods = [\"get\"]",
        ))
        .unwrap();
        assert_eq!(c.routes[0].methods, vec![Method::GET, Method::HEAD]);
        let e = parse(&MINIMAL.replace(
            "upstream = \"control\"",
            "upstream = \"control\"\nmethods = [\"GE T\"]",
        ))
        .unwrap_err();
        assert_eq!(e.key, "routes[0].methods[0]");
    }

    #[test]
    fn jwt_routes_need_a_jwt_section_with_real_secrets() {
        let jwt_route = MINIMAL.replace("auth = \"public\"", "auth = \"jwt\"");
        let e = parse(&jwt_route).unwrap_err();
        assert_eq!(e.key, "jwt");
        let e = parse(&format!(
            "{jwt_route}\n[jwt]\nsecrets = [\"hunter2hunter2hunter2\"]\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "jwt.secrets[0]");
        let e = parse(&format!(
            "{jwt_route}\n[jwt]\nsecrets = [\"env:G2D_TEST_UNSET_VAR\"]\n"
        ))
        .unwrap_err();
        assert!(e.message.contains("G2D_TEST_UNSET_VAR"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("short"), "too-short\n").unwrap();
        std::fs::write(dir.path().join("good"), "0123456789abcdef\n").unwrap();
        let cfg = |f: &str| format!("{jwt_route}\n[jwt]\nsecrets = [\"file:{f}\"]\n");
        let e = Config::parse(&cfg("short"), &dir.path().join("gw.toml")).unwrap_err();
        assert!(e.message.contains("9 bytes"), "{e}");
        let c = Config::parse(&cfg("good"), &dir.path().join("gw.toml")).unwrap();
        assert_eq!(c.jwt.unwrap().secrets, vec![b"0123456789abcdef".to_vec()]);
    }

    #[test]
    fn auth_options_must_fit_the_mode() {
        let e = parse(&MINIMAL.replace(
            "auth = \"public\"",
            "auth = \"public\"\nmin_role = \"admin\"",
        ))
        .unwrap_err();
        assert_eq!(e.key, "routes[0].min_role");
        let e = parse(&MINIMAL.replace("auth = \"public\"", "auth = \"open\"")).unwrap_err();
        assert!(e.message.contains("open"), "{e}");
        let e = parse(&MINIMAL.replace(
            "auth = \"public\"",
            "auth = \"public\"\nallow_networks = [\"10.0.0.0/33\"]",
        ))
        .unwrap_err();
        assert_eq!(e.key, "routes[0].allow_networks[0]");
        let c = parse(&MINIMAL.replace(
            "auth = \"public\"",
            "auth = \"public\"\nallow_networks = [\"127.0.0.1\"]",
        ))
        .unwrap();
        assert_eq!(c.routes[0].allow_networks[0].to_string(), "127.0.0.1/32");
        let e = parse(&MINIMAL.replace("auth = \"public\"", "")).unwrap_err();
        assert!(e.message.contains("auth"), "{e}");
    }

    #[test]
    fn rate_limits_are_checked() {
        let with = |extra: &str| {
            parse(&MINIMAL.replace("auth = \"public\"", &format!("auth = \"public\"\n{extra}")))
        };
        let c = with("rate_limit = { key = \"ip\", per_minute = 1, burst = 5 }").unwrap();
        let p = &c.routes[0].rate_limits[0];
        assert_eq!(
            (p.limit.name.as_str(), p.limit.burst, p.limit.interval),
            ("api-ip", 5, Duration::from_secs(60))
        );
        let e = with("rate_limit = { key = \"user\", per_second = 5 }").unwrap_err();
        assert_eq!(e.key, "routes[0].rate_limit.key");
        let e =
            with("rate_limits = [{ key = \"ip\", per_second = 5, per_minute = 5 }]").unwrap_err();
        assert_eq!(e.key, "routes[0].rate_limits[0]");
        let e = with(
            "rate_limits = [{ key = \"ip\", per_second = 5 }, { key = \"ip\", per_minute = 5 }]",
        )
        .unwrap_err();
        assert_eq!(e.key, "routes[0].rate_limits[1].name");
        let e =
            with("methods = [\"POST\"]\nlogin_guard = true\nmax_body_bytes = 100000").unwrap_err();
        assert_eq!(e.key, "routes[0].max_body_bytes");
    }

    #[test]
    fn a_policy_name_is_one_policy_on_every_route() {
        let two = |a: &str, b: &str| {
            let route = |name: &str, prefix: &str, policy: &str| {
                format!(
                    "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\n\
                     upstream = \"control\"\nauth = \"public\"\nrate_limit = {policy}\n"
                )
            };
            let text = MINIMAL.split("[[routes]]").next().unwrap().to_string()
                + &route("a", "/a", a)
                + &route("b", "/b", b);
            parse(&text)
        };
        let p = "{ name = \"shared\", key = \"ip\", per_second = 5 }";
        assert!(two(p, p).is_ok());
        for other in [
            "{ name = \"shared\", key = \"ip\", per_second = 6 }",
            "{ name = \"shared\", key = \"ip\", per_second = 5, burst = 9 }",
            "{ name = \"shared\", key = \"ip\", per_minute = 300 }",
        ] {
            let e = two(p, other).unwrap_err();
            assert_eq!(e.key, "routes[1].rate_limit.name", "{other}");
            assert!(e.message.contains("route `a`"), "{e}");
        }
    }

    #[test]
    fn login_routes_allow_post_only() {
        let with = |extra: &str| {
            parse(&MINIMAL.replace("auth = \"public\"", &format!("auth = \"public\"\n{extra}")))
        };
        assert!(with("methods = [\"POST\"]\nlogin_guard = true\nmax_body_bytes = 1000").is_ok());
        for methods in ["", "methods = [\"POST\", \"PUT\"]", "methods = [\"GET\"]"] {
            let e = with(&format!("{methods}\nlogin_guard = true")).unwrap_err();
            assert_eq!(e.key, "routes[0].methods", "{methods}");
        }
    }

    #[test]
    fn websocket_is_on_for_query_token_routes_only_by_default() {
        let c = parse(MINIMAL).unwrap();
        assert!(!c.routes[0].websocket);
        let c = parse(&MINIMAL.replace("auth = \"public\"", "auth = \"public\"\nwebsocket = true"))
            .unwrap();
        assert!(c.routes[0].websocket);
    }

    #[test]
    fn lockout_and_ip_key_settings_are_checked() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.lockout.max_failures_per_email, 30);
        assert_eq!(c.lockout.failure_statuses, [401]);
        assert_eq!(c.limits.ip_prefixes, (32, 64));
        for (extra, key) in [
            (
                "[lockout]\nmax_failures_per_email = 5",
                "lockout.max_failures_per_email",
            ),
            (
                "[lockout]\nfailure_statuses = []",
                "lockout.failure_statuses",
            ),
            (
                "[lockout]\nfailure_statuses = [500]",
                "lockout.failure_statuses",
            ),
            (
                "[lockout]\nfailure_statuses = [429]",
                "lockout.failure_statuses",
            ),
            ("[limits]\nipv6_prefix = 0", "limits.ipv6_prefix"),
            ("[limits]\nipv4_prefix = 33", "limits.ipv4_prefix"),
        ] {
            let e = parse(&format!("{MINIMAL}\n{extra}")).unwrap_err();
            assert_eq!(e.key, key, "{extra}");
        }
        let c = parse(&format!(
            "{MINIMAL}\n[lockout]\nfailure_statuses = [400, 401, 403]\nmax_failures_per_email = 10"
        ))
        .unwrap();
        assert_eq!(c.lockout.failure_statuses, [400, 401, 403]);
        assert_eq!(c.lockout.max_failures_per_email, 10);
    }

    #[test]
    fn unsafe_prefix_is_refused() {
        for bad in [
            "/api/../v1/",
            "/api/v1%2f",
            "/api/%61",
            "/api:v1/",
            "/api v1/",
            "/api//v1/",
        ] {
            let e = parse(&MINIMAL.replace("/api/v1/", bad)).unwrap_err();
            assert_eq!(e.key, "routes[0].path_prefix", "{bad}");
        }
    }
}
