//! The file format: `config/gateway.toml` as serde reads it, with every default. Unknown keys
//! are errors. Nothing here is checked beyond its type: [`super::validate`] does that.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::auth::{Mode, Role};
use crate::limits::ratelimit::KeyKind;

/// The whole file as written.
#[derive(Debug, Deserialize, Serialize)]
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
    /// `[dns]`: how upstream server names are resolved.
    #[serde(default)]
    pub dns: FileDns,
    /// `[tracing]`: OpenTelemetry spans over OTLP; absent: off.
    #[serde(default)]
    pub tracing: Option<FileTracing>,
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
#[derive(Debug, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PlainMode {
    /// Serve requests as usual.
    #[default]
    Serve,
    /// Answer 308 with the https URL.
    Redirect,
}

/// One `[[tls.certificates]]` entry.
#[derive(Debug, Deserialize, Serialize)]
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
#[derive(Debug, Deserialize, Serialize)]
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
#[derive(Debug, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines.
    #[default]
    Json,
    /// Human-readable, for a terminal.
    Text,
}

/// `[log]` as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// In this process.
    #[default]
    Memory,
    /// In one Redis server, shared by every replica.
    Redis,
    /// In a Redis Cluster (`redis_urls` are seed nodes).
    RedisCluster,
    /// In the master that Redis Sentinels name (`redis_urls` are the Sentinels).
    RedisSentinel,
}

/// `[store]` as written.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileStore {
    /// `memory`, `redis`, `redis-cluster` or `redis-sentinel`.
    #[serde(default)]
    pub kind: StoreKind,
    /// `redis://host:port/db`, `rediss://...`; with credentials only as `env:NAME` / `file:PATH`.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Cluster seed nodes or Sentinels, each written like `redis_url`.
    #[serde(default)]
    pub redis_urls: Vec<String>,
    /// The master's name in the Sentinels' configuration.
    #[serde(default)]
    pub master_name: Option<String>,
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
    /// Longest wait for one lockout operation (a login guess) before the in-process store
    /// answers: longer, because a login's bound matters more than its latency.
    #[serde(default = "default_lockout_timeout")]
    pub lockout_timeout_ms: u64,
    /// Connect timeout.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Most rate-limit units a replica takes from Redis at once (0 or 1: none ahead).
    #[serde(default = "default_lease_units")]
    pub lease_units: u32,
    /// Most of a policy's burst one lease takes.
    #[serde(default = "default_lease_share")]
    pub lease_share: f64,
    /// How long a lease lasts before its unspent units go back.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
}

fn default_lease_units() -> u32 {
    64
}
fn default_lease_share() -> f64 {
    0.05
}
fn default_lease_ms() -> u64 {
    250
}

impl Default for FileStore {
    fn default() -> Self {
        FileStore {
            kind: StoreKind::Memory,
            redis_url: None,
            redis_urls: Vec::new(),
            master_name: None,
            ca_file: None,
            key_prefix: default_key_prefix(),
            pool_size: default_pool_size(),
            timeout_ms: default_store_timeout(),
            lockout_timeout_ms: default_lockout_timeout(),
            connect_timeout_ms: default_connect_timeout(),
            lease_units: default_lease_units(),
            lease_share: default_lease_share(),
            lease_ms: default_lease_ms(),
        }
    }
}

fn default_key_prefix() -> String {
    "g2d".into()
}
fn default_pool_size() -> usize {
    2
}
fn default_lockout_timeout() -> u64 {
    1000
}
fn default_store_timeout() -> u64 {
    50
}

/// `[lockout]` as written.
#[derive(Debug, Deserialize, Serialize)]
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
#[derive(Debug, Deserialize, Serialize)]
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
#[derive(Debug, Deserialize, Serialize)]
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
#[derive(Debug, Deserialize, Serialize)]
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
#[derive(Debug, Deserialize, Serialize)]
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
#[derive(Debug, Deserialize, Serialize)]
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

/// `health_check = { ... }` of an upstream as written.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealthCheck {
    /// `http` (a GET of `path`) or `tcp` (a connect).
    #[serde(default = "default_check_kind")]
    pub kind: String,
    /// Path of the HTTP check.
    #[serde(default = "default_check_path")]
    pub path: String,
    /// Statuses that mean healthy.
    #[serde(default = "default_expect_status")]
    pub expect_status: Vec<u16>,
    /// `Host` of the HTTP check (default: the upstream's `sni`, else its name).
    #[serde(default)]
    pub host: Option<String>,
    /// How often each server is checked.
    #[serde(default = "default_check_interval")]
    pub interval_ms: u64,
    /// Longest wait for a check's connect and answer.
    #[serde(default = "default_check_timeout")]
    pub timeout_ms: u64,
    /// Consecutive passed checks that make an unhealthy server healthy.
    #[serde(default = "default_one")]
    pub healthy_after: usize,
    /// Consecutive failed checks that make a healthy server unhealthy.
    #[serde(default = "default_one")]
    pub unhealthy_after: usize,
}

fn default_check_kind() -> String {
    "http".into()
}
fn default_check_path() -> String {
    "/readyz".into()
}
fn default_expect_status() -> Vec<u16> {
    vec![200]
}
fn default_check_interval() -> u64 {
    5_000
}
fn default_check_timeout() -> u64 {
    1_000
}
fn default_one() -> usize {
    1
}

/// One `[[upstreams]]` entry as written.
#[derive(Debug, Deserialize, Serialize)]
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
    /// An HTTP (or TCP) health check with thresholds; instead of `health_check_interval_ms`.
    #[serde(default)]
    pub health_check: Option<FileHealthCheck>,
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
    /// Passive outlier ejection; absent: off.
    #[serde(default)]
    pub outlier_detection: Option<FileOutlier>,
    /// How many retries the upstream may take on top of its requests.
    #[serde(default)]
    pub retry_budget: FileRetryBudget,
}

/// `outlier_detection = { ... }` as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileOutlier {
    /// Failures in a row (connect failure, reset, timeout, 5xx) that eject a server.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// How long a first ejection lasts; each repeat doubles it.
    #[serde(default = "default_ejection_ms")]
    pub ejection_ms: u64,
    /// Longest ejection.
    #[serde(default = "default_max_ejection_ms")]
    pub max_ejection_ms: u64,
    /// Most of the pool ejected at once, in percent.
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u32,
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_ejection_ms() -> u64 {
    5_000
}
fn default_max_ejection_ms() -> u64 {
    60_000
}
fn default_max_ejected_percent() -> u32 {
    50
}

/// `retry_budget = { ... }` as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileRetryBudget {
    /// Retries allowed as a share of requests, in percent.
    #[serde(default = "default_retry_percent")]
    pub percent: u32,
    /// Retries always allowed per second, whatever the traffic.
    #[serde(default = "default_retry_min")]
    pub min_per_second: u32,
}

impl Default for FileRetryBudget {
    fn default() -> Self {
        FileRetryBudget {
            percent: default_retry_percent(),
            min_per_second: default_retry_min(),
        }
    }
}

fn default_retry_percent() -> u32 {
    20
}
fn default_retry_min() -> u32 {
    10
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
#[derive(Debug, Deserialize, Serialize)]
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

/// The Get2Dial API caps request bodies at 1 MB.
fn default_max_body() -> u64 {
    crate::routes::DEFAULT_MAX_BODY_BYTES
}

/// `[dns]` as written.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileDns {
    /// Name servers (`ip` or `ip:port`); empty: the system's.
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// Shortest time between two resolutions of a name.
    #[serde(default = "default_min_ttl")]
    pub min_ttl_ms: u64,
    /// Longest time an answer is used.
    #[serde(default = "default_max_ttl")]
    pub max_ttl_ms: u64,
    /// Longest wait for one answer.
    #[serde(default = "default_dns_timeout")]
    pub timeout_ms: u64,
}

impl Default for FileDns {
    fn default() -> Self {
        FileDns {
            nameservers: Vec::new(),
            min_ttl_ms: default_min_ttl(),
            max_ttl_ms: default_max_ttl(),
            timeout_ms: default_dns_timeout(),
        }
    }
}

fn default_min_ttl() -> u64 {
    1000
}
fn default_max_ttl() -> u64 {
    60_000
}
fn default_dns_timeout() -> u64 {
    2000
}

/// `[tracing]` as written.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileTracing {
    /// OTLP/HTTP traces endpoint (`http://collector:4318/v1/traces`).
    pub otlp_endpoint: String,
    /// Share of the traces the gateway starts that are recorded.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// `service.name` of the spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Spans waiting for export at most.
    #[serde(default = "default_span_queue")]
    pub queue_size: usize,
    /// Longest wait for one export.
    #[serde(default = "default_export_timeout")]
    pub timeout_ms: u64,
}

fn default_sample_ratio() -> f64 {
    0.05
}
fn default_service_name() -> String {
    "get2dial-gateway".into()
}
fn default_span_queue() -> usize {
    4096
}
fn default_export_timeout() -> u64 {
    5000
}
