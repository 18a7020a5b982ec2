//! What the gateway connects to and listens with: `[[upstreams]]`, `[tls]`, `[cors]`,
//! `[security]` and `[store]`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderName, Method};

use super::Validator;
use crate::config::file::{FileCors, FileSecurity, FileStore, FileTls, FileUpstream, StoreKind};
use crate::config::{
    CheckKind, ConfigError, Cors, HealthCheck, Security, Tls, Upstream, UpstreamTls,
};

impl Validator<'_> {
    /// `[[upstreams]]`.
    pub(super) fn upstreams(&self, files: &[FileUpstream]) -> Result<Vec<Upstream>, ConfigError> {
        if files.is_empty() {
            return Err(self.err("upstreams", "at least one [[upstreams]] entry is required"));
        }
        let mut upstreams = Vec::with_capacity(files.len());
        let mut seen = HashSet::new();
        for (i, u) in files.iter().enumerate() {
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
                .map(|(j, s)| self.upstream_server(&format!("upstreams[{i}].servers[{j}]"), s))
                .collect::<Result<Vec<_>, _>>()?;
            upstreams.push(Upstream {
                name: u.name.clone(),
                servers,
                connect_timeout: self.millis(&key("connect_timeout_ms"), u.connect_timeout_ms)?,
                read_timeout: self.millis(&key("read_timeout_ms"), u.read_timeout_ms)?,
                write_timeout: self.millis(&key("write_timeout_ms"), u.write_timeout_ms)?,
                idle_timeout: self.millis(&key("idle_timeout_ms"), u.idle_timeout_ms)?,
                health_check: self.health_check(i, u)?,
                tls: self.upstream_tls(i, u)?,
                outlier: self.outlier(i, u)?,
                retry_budget: crate::upstreams::RetryBudgetPolicy {
                    percent: u.retry_budget.percent.min(100),
                    min_per_second: u.retry_budget.min_per_second,
                },
            });
        }

        Ok(upstreams)
    }

    /// An upstream's health check: `health_check = {...}`, or the TCP check of
    /// `health_check_interval_ms`, or none.
    fn health_check(&self, i: usize, u: &FileUpstream) -> Result<Option<HealthCheck>, ConfigError> {
        let key = |k: &str| format!("upstreams[{i}].{k}");
        let h = match (&u.health_check, u.health_check_interval_ms) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(self.err(
                    key("health_check_interval_ms"),
                    "give health_check or health_check_interval_ms, not both",
                ))
            }
            (None, Some(ms)) => {
                return Ok(Some(HealthCheck {
                    kind: CheckKind::Tcp,
                    interval: self.millis(&key("health_check_interval_ms"), ms)?,
                    timeout: self.millis(&key("connect_timeout_ms"), u.connect_timeout_ms)?,
                    healthy_after: 1,
                    unhealthy_after: 1,
                }))
            }
            (Some(h), None) => h,
        };
        let kind = match h.kind.as_str() {
            "tcp" => CheckKind::Tcp,
            "http" => {
                if !h.path.starts_with('/') || h.path.contains(char::is_whitespace) {
                    return Err(self.err(
                        key("health_check.path"),
                        format!("`{}` must be a path starting with `/`", h.path),
                    ));
                }
                if h.expect_status.is_empty()
                    || h.expect_status.iter().any(|s| !(100..=599).contains(s))
                {
                    return Err(self.err(
                        key("health_check.expect_status"),
                        "give one or more statuses between 100 and 599",
                    ));
                }
                let host = h
                    .host
                    .clone()
                    .or_else(|| u.sni.clone())
                    .unwrap_or_else(|| u.name.clone());
                if http::HeaderValue::from_str(&host).is_ok() && !host.is_empty() {
                    CheckKind::Http {
                        path: h.path.clone(),
                        host,
                        expect_status: h.expect_status.clone(),
                    }
                } else {
                    return Err(self.err(key("health_check.host"), "not a valid Host value"));
                }
            }
            other => {
                return Err(self.err(
                    key("health_check.kind"),
                    format!("`{other}` is not `http` or `tcp`"),
                ))
            }
        };
        Ok(Some(HealthCheck {
            kind,
            interval: self.millis(&key("health_check.interval_ms"), h.interval_ms)?,
            timeout: self.millis(&key("health_check.timeout_ms"), h.timeout_ms)?,
            healthy_after: self.within(
                &key("health_check.healthy_after"),
                h.healthy_after,
                1,
                100,
            )?,
            unhealthy_after: self.within(
                &key("health_check.unhealthy_after"),
                h.unhealthy_after,
                1,
                100,
            )?,
        }))
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

    pub(super) fn tls(
        &self,
        t: &FileTls,
        listen: SocketAddr,
        admin: SocketAddr,
    ) -> Result<Tls, ConfigError> {
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

    pub(super) fn cors(&self, c: &FileCors) -> Result<Cors, ConfigError> {
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

    pub(super) fn security(&self, s: &FileSecurity) -> Result<Security, ConfigError> {
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

    pub(super) fn redis(
        &self,
        st: &FileStore,
    ) -> Result<crate::store::redis::Endpoint, ConfigError> {
        use crate::store::redis::Topology;
        let many = |what: &str| -> Result<Vec<String>, ConfigError> {
            if st.redis_url.is_some() {
                return Err(self.err(
                    "store.redis_url",
                    format!("not used with this kind: list the {what} in store.redis_urls"),
                ));
            }
            if st.redis_urls.is_empty() {
                return Err(self.err(
                    "store.redis_urls",
                    format!("required for this kind: the {what}"),
                ));
            }
            st.redis_urls
                .iter()
                .enumerate()
                .map(|(i, u)| self.redis_url(&format!("store.redis_urls[{i}]"), u))
                .collect()
        };
        let topology = match st.kind {
            StoreKind::RedisCluster => Topology::Cluster(many("cluster's seed nodes")?),
            StoreKind::RedisSentinel => {
                let sentinels = many("Sentinels")?;
                let master = match &st.master_name {
                    Some(m) if !m.trim().is_empty() => m.trim().to_string(),
                    _ => {
                        return Err(self.err(
                            "store.master_name",
                            "required for kind = \"redis-sentinel\": the master's name",
                        ))
                    }
                };
                Topology::Sentinel { sentinels, master }
            }
            _ => {
                let Some(source) = &st.redis_url else {
                    return Err(self.err("store.redis_url", "required when kind = \"redis\""));
                };
                if !st.redis_urls.is_empty() {
                    return Err(self.err(
                        "store.redis_urls",
                        "for kind = \"redis-cluster\" or \"redis-sentinel\"; one server takes redis_url",
                    ));
                }
                Topology::Single(self.redis_url("store.redis_url", source)?)
            }
        };
        if st.master_name.is_some() && !matches!(topology, Topology::Sentinel { .. }) {
            return Err(self.err("store.master_name", "only for kind = \"redis-sentinel\""));
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
        if st.key_prefix.is_empty()
            || st.key_prefix.contains(char::is_whitespace)
            || st.key_prefix.contains(['{', '}'])
        {
            // Braces would make the prefix the Redis Cluster hash tag of every key.
            return Err(self.err(
                "store.key_prefix",
                "must be non-empty, without spaces, `{` or `}`",
            ));
        }
        if st.lease_units > 10_000 {
            return Err(self.err("store.lease_units", "must be at most 10000"));
        }
        if !(st.lease_share > 0.0 && st.lease_share <= 1.0) {
            return Err(self.err("store.lease_share", "must be above 0 and at most 1"));
        }
        if !(10..=10_000).contains(&st.lease_ms) {
            return Err(self.err("store.lease_ms", "must be between 10 and 10000"));
        }
        let lease = crate::store::lease::LeasePolicy {
            units: st.lease_units,
            share: st.lease_share,
            period: std::time::Duration::from_millis(st.lease_ms),
            max_entries: 100_000,
        };
        Ok(crate::store::redis::Endpoint {
            lease,
            topology,
            ca_pem,
            key_prefix: st.key_prefix.clone(),
            pool_size: st.pool_size,
            connect_timeout: self.millis("store.connect_timeout_ms", st.connect_timeout_ms)?,
            timeout: self.millis("store.timeout_ms", st.timeout_ms)?,
            lockout_timeout: self.millis("store.lockout_timeout_ms", st.lockout_timeout_ms)?,
        })
    }

    /// `outlier_detection` of upstream `i`.
    fn outlier(
        &self,
        i: usize,
        u: &FileUpstream,
    ) -> Result<Option<crate::upstreams::OutlierPolicy>, ConfigError> {
        let Some(o) = &u.outlier_detection else {
            return Ok(None);
        };
        let key = |k: &str| format!("upstreams[{i}].outlier_detection.{k}");
        if o.consecutive_failures == 0 {
            return Err(self.err(key("consecutive_failures"), "must be at least 1"));
        }
        if o.max_ejected_percent > 100 {
            return Err(self.err(key("max_ejected_percent"), "must be at most 100"));
        }
        let ejection = self.millis(&key("ejection_ms"), o.ejection_ms)?;
        let max_ejection = self.millis(&key("max_ejection_ms"), o.max_ejection_ms)?;
        if max_ejection < ejection {
            return Err(self.err(key("max_ejection_ms"), "must not be below ejection_ms"));
        }
        Ok(Some(crate::upstreams::OutlierPolicy {
            consecutive_failures: o.consecutive_failures,
            ejection,
            max_ejection,
            max_ejected_percent: o.max_ejected_percent,
        }))
    }

    /// One `servers` entry: `ip:port`, `host:port`, or an SRV name `_service._proto.domain`.
    fn upstream_server(
        &self,
        key: &str,
        value: &str,
    ) -> Result<crate::discovery::Server, ConfigError> {
        use crate::discovery::Server;
        if let Ok(addr) = value.parse() {
            return Ok(Server::Addr(addr));
        }
        let bad = || {
            self.err(
                key,
                format!(
                    "`{value}` is not `ip:port`, `host:port` or an SRV name \
                     (`_service._proto.domain`)"
                ),
            )
        };
        if value.starts_with('_') {
            if !is_dns_name(value) || value.split('.').count() < 3 {
                return Err(bad());
            }
            return Ok(Server::Srv(value.to_ascii_lowercase()));
        }
        let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 || !is_dns_name(host) || host.starts_with('_') {
            return Err(bad());
        }
        Ok(Server::Host(host.to_ascii_lowercase(), port))
    }

    /// `[tracing]`.
    pub(super) fn tracing(
        &self,
        t: &crate::config::file::FileTracing,
    ) -> Result<crate::trace::TraceSettings, ConfigError> {
        let endpoint = t.otlp_endpoint.trim();
        match http::Uri::try_from(endpoint) {
            Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => {}
            _ => {
                return Err(self.err(
                    "tracing.otlp_endpoint",
                    "must be an http:// URL of an OTLP/HTTP traces endpoint (a local collector \
                     or agent), e.g. http://127.0.0.1:4318/v1/traces",
                ))
            }
        }
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(self.err("tracing.sample_ratio", "must be between 0 and 1"));
        }
        if !(1..=1_000_000).contains(&t.queue_size) {
            return Err(self.err("tracing.queue_size", "must be between 1 and 1000000"));
        }
        if t.service_name.trim().is_empty() {
            return Err(self.err("tracing.service_name", "must not be empty"));
        }
        Ok(crate::trace::TraceSettings {
            endpoint: endpoint.to_string(),
            sample_ratio: t.sample_ratio,
            service_name: t.service_name.trim().to_string(),
            queue_size: t.queue_size,
            timeout: self.millis("tracing.timeout_ms", t.timeout_ms)?,
        })
    }

    /// `[dns]`.
    pub(super) fn dns(
        &self,
        d: &crate::config::file::FileDns,
    ) -> Result<crate::discovery::DnsSettings, ConfigError> {
        let nameservers = d
            .nameservers
            .iter()
            .enumerate()
            .map(|(i, n)| {
                n.parse::<SocketAddr>()
                    .or_else(|_| {
                        n.parse::<std::net::IpAddr>()
                            .map(|ip| SocketAddr::new(ip, 53))
                    })
                    .map_err(|_| {
                        self.err(
                            format!("dns.nameservers[{i}]"),
                            format!("`{n}` is not an IP address (with an optional port)"),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let min_ttl = self.millis("dns.min_ttl_ms", d.min_ttl_ms)?;
        let max_ttl = self.millis("dns.max_ttl_ms", d.max_ttl_ms)?;
        if max_ttl < min_ttl {
            return Err(self.err("dns.max_ttl_ms", "must not be below dns.min_ttl_ms"));
        }
        Ok(crate::discovery::DnsSettings {
            nameservers,
            min_ttl,
            max_ttl,
            timeout: self.millis("dns.timeout_ms", d.timeout_ms)?,
        })
    }

    /// One Redis URL under `key`: written out (without credentials) or read from
    /// `env:NAME` / `file:PATH`.
    fn redis_url(&self, key: &str, source: &str) -> Result<String, ConfigError> {
        let url = if source.starts_with("env:") || source.starts_with("file:") {
            if !self.read_secrets {
                // Checked for its form only; a URL that parses stands in.
                self.secret(key, source)?;
                "redis://placeholder:6379/0".to_string()
            } else {
                String::from_utf8(self.secret(key, source)?)
                    .map_err(|_| self.err(key, "the URL is not UTF-8"))?
                    .trim()
                    .to_string()
            }
        } else {
            let authority = source.split("://").nth(1).unwrap_or_default();
            if authority
                .split('/')
                .next()
                .unwrap_or_default()
                .contains('@')
            {
                return Err(self.err(
                    key,
                    "a URL with credentials is a secret: give it as `env:NAME` or `file:PATH`",
                ));
            }
            source.to_string()
        };
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(self.err(key, "must be a redis:// or rediss:// URL"));
        }
        if redis::Client::open(url.as_str()).is_err() {
            return Err(self.err(key, "is not a valid Redis URL"));
        }
        Ok(url)
    }
}

/// A DNS name: dot-separated labels of letters, digits, `-` and `_`, 1-63 bytes each, 253 in
/// all (a trailing dot allowed).
fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}
