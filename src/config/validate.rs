//! From the file format to the validated model: every key checked, every error naming the
//! file and the key.

mod routes;
mod transport;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;

use super::file::{
    FileConfig, FileIdentityHeaders, FileJwt, FileLimits, FileLockout, FileLog, FileServer,
    StoreKind,
};
use super::{Config, ConfigError, IdentityHeaders, Limits, Lockout, Route, Secret, Server};
use crate::auth::jwt;
use crate::auth::Mode;

/// What a secret reads as when secrets are not read: long enough for every check.
const PLACEHOLDER_SECRET: &[u8] = b"placeholder-secret-for-linting-only";

/// Checks one file, naming it in every error.
pub(super) struct Validator<'a> {
    pub(super) path: &'a Path,
    /// False when secrets are only checked for their form (`check-config --no-secrets`).
    pub(super) read_secrets: bool,
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

    /// The whole file, one section at a time.
    pub(super) fn validate(&self, file: FileConfig) -> Result<Config, ConfigError> {
        let server = self.server(&file.server)?;
        let upstreams = self.upstreams(&file.upstreams)?;
        let lockout = self.lockout(&file.lockout)?;
        let context = routes::RouteContext {
            upstreams: &upstreams,
            lockout: &lockout,
            body_timeout: server.client_body_timeout,
        };
        let routes = self.routes(&file.routes, &context)?;
        let jwt = self.jwt_section(file.jwt.as_ref(), &routes)?;
        let identity_headers = self.identity_headers(&file.identity_headers)?;
        let limits = self.limits(&file.limits)?;
        self.log(&file.log)?;
        let tls = match &file.tls {
            None => None,
            Some(t) => Some(self.tls(t, server.listen, server.admin_listen)?),
        };
        let cors = file.cors.as_ref().map(|c| self.cors(c)).transpose()?;
        let security = self.security(&file.security)?;
        let redis = match file.store.kind {
            StoreKind::Memory => None,
            StoreKind::Redis | StoreKind::RedisCluster | StoreKind::RedisSentinel => {
                Some(self.redis(&file.store)?)
            }
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
            dns: self.dns(&file.dns)?,
            tracing: file.tracing.as_ref().map(|t| self.tracing(t)).transpose()?,
            log: file.log.clone(),
            tls,
            cors,
            security,
            effective: Default::default(),
        })
    }

    /// `[server]`.
    fn server(&self, s: &FileServer) -> Result<Server, ConfigError> {
        let server = Server {
            listen: self.addr("server.listen", &s.listen)?,
            admin_listen: self.addr("server.admin_listen", &s.admin_listen)?,
            threads: self.within("server.threads", s.threads, 1, 256)?,
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
            // A head is held in memory while it is judged: at most about 1 MB.
            max_header_bytes: self.within(
                "server.max_header_bytes",
                s.max_header_bytes,
                1024,
                1_000_000,
            )?,
            // Pingora parses at most 256 header fields.
            max_headers: self.within("server.max_headers", s.max_headers, 8, 250)?,
            keepalive_timeout: Duration::from_secs(self.within(
                "server.keepalive_timeout_seconds",
                s.keepalive_timeout_seconds,
                1,
                3600,
            )?),
            work_stealing: s.work_stealing,
            client_header_timeout: self.millis(
                "server.client_header_timeout_ms",
                s.client_header_timeout_ms,
            )?,
            max_pending_heads: self.within(
                "server.max_pending_heads",
                s.max_pending_heads,
                1,
                1_000_000,
            )?,
            max_pending_heads_per_client: self.within(
                "server.max_pending_heads_per_client",
                s.max_pending_heads_per_client,
                1,
                1_000_000,
            )?,
            admin_token: match &s.admin_token {
                None => None,
                Some(source) => Some(Secret(self.secret_of_16("server.admin_token", source)?)),
            },
        };
        if server.listen == server.admin_listen {
            return Err(self.err(
                "server.admin_listen",
                "must differ from server.listen: the admin port is not public",
            ));
        }
        Ok(server)
    }

    /// `value` when it lies in `low..=high`.
    fn within<T>(&self, key: &str, value: T, low: T, high: T) -> Result<T, ConfigError>
    where
        T: PartialOrd + std::fmt::Display,
    {
        if value < low || value > high {
            return Err(self.err(key, format!("must be between {low} and {high}")));
        }
        Ok(value)
    }

    /// A secret of at least 16 bytes (the API's floor for its own secrets).
    fn secret_of_16(&self, key: &str, source: &str) -> Result<Vec<u8>, ConfigError> {
        let secret = self.secret(key, source)?;
        if secret.len() < 16 {
            return Err(self.err(
                key,
                format!(
                    "the secret is {} bytes; at least 16 are required",
                    secret.len()
                ),
            ));
        }
        Ok(secret)
    }

    /// `[jwt]`, required when a route takes tokens.
    fn jwt_section(
        &self,
        file: Option<&FileJwt>,
        routes: &[Route],
    ) -> Result<Option<jwt::Profile>, ConfigError> {
        let needs_jwt = routes
            .iter()
            .position(|r| matches!(r.auth, Mode::Jwt | Mode::JwtQuery));
        let jwt = match (file, needs_jwt) {
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

        Ok(jwt)
    }

    /// `[identity_headers]`.
    fn identity_headers(&self, h: &FileIdentityHeaders) -> Result<IdentityHeaders, ConfigError> {
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

        Ok(identity_headers)
    }

    /// `[lockout]`.
    fn lockout(&self, l: &FileLockout) -> Result<Lockout, ConfigError> {
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
        Ok(lockout)
    }

    /// `[limits]`.
    fn limits(&self, fl: &FileLimits) -> Result<Limits, ConfigError> {
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

        Ok(limits)
    }

    /// `[log]`.
    fn log(&self, log: &FileLog) -> Result<(), ConfigError> {
        if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
            return Err(self.err(
                "log.level",
                format!("`{}` is not a level or tracing filter", log.level),
            ));
        }
        Ok(())
    }

    /// A secret from `env:NAME` or `file:PATH` (a trailing newline is not part of it).
    fn secret(&self, key: &str, source: &str) -> Result<Vec<u8>, ConfigError> {
        if !self.read_secrets {
            let named = ["env:", "file:"]
                .iter()
                .any(|p| source.strip_prefix(p).is_some_and(|rest| !rest.is_empty()));
            if !named {
                return Err(self.err(
                    key,
                    "must be `env:NAME` or `file:PATH`; secrets never go in this file",
                ));
            }
            return Ok(PLACEHOLDER_SECRET.to_vec());
        }
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

    fn jwt(&self, j: &FileJwt) -> Result<jwt::Profile, ConfigError> {
        if j.secrets.is_empty() {
            return Err(self.err("jwt.secrets", "at least one secret source is required"));
        }
        let mut secrets = Vec::with_capacity(j.secrets.len());
        for (i, source) in j.secrets.iter().enumerate() {
            let key = format!("jwt.secrets[{i}]");
            secrets.push(self.secret_of_16(&key, source)?);
        }
        if j.leeway_seconds > 300 {
            return Err(self.err("jwt.leeway_seconds", "must be at most 300"));
        }
        if !(256..=65_536).contains(&j.max_token_bytes) {
            return Err(self.err("jwt.max_token_bytes", "must be between 256 and 65536"));
        }
        Ok(jwt::Profile {
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
