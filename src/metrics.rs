//! Metric families exported on the admin port. Labels are route names, methods and codes only,
//! never raw paths, users or addresses, so the series count stays bounded.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the gateway exports, registered in its own registry.
pub struct Metrics {
    registry: Registry,
    /// `gateway_http_requests_total{route,method,status}`: answers by exact status code.
    pub requests: IntCounterVec,
    /// `gateway_http_request_duration_seconds{route}`: time from request head to last byte.
    pub duration: HistogramVec,
    /// `gateway_upstream_failures_total{route,upstream,kind}`: upstream exchanges that failed.
    pub upstream_failures: IntCounterVec,
    /// `gateway_errors_rewritten_total{route,status}`: upstream errors that broke the contract.
    pub errors_rewritten: IntCounterVec,
    /// `gateway_auth_rejections_total{route,reason}`: callers turned away, by reason.
    pub auth_rejections: IntCounterVec,
    /// `gateway_rate_limited_total{route,policy}`: requests refused by a rate limit.
    pub rate_limited: IntCounterVec,
    /// `gateway_login_attempts_total{outcome}`: login attempts by how they ended.
    pub login_attempts: IntCounterVec,
    /// `gateway_lockouts_total`: accounts locked.
    pub lockouts: IntCounter,
    /// `gateway_store_fallbacks_total`: store operations answered in-process because Redis failed.
    pub store_fallbacks: IntCounter,
    /// `gateway_store_degraded`: 1 while the in-process fallback stands in for Redis.
    pub store_degraded: prometheus::IntGauge,
    /// `gateway_store_duration_seconds{op}`: Redis round trips (rate, reserve, settle, probe).
    pub store_duration: HistogramVec,
    /// `gateway_tls_certificate_expiry_timestamp_seconds{certificate}`: each served
    /// certificate's notAfter.
    pub certificate_expiry: IntGaugeVec,
    /// `gateway_http_body_bytes_total{route,direction}`: body bytes from clients (`in`) and to
    /// them (`out`).
    pub body_bytes: IntCounterVec,
    /// `gateway_http_requests_in_flight`: requests begun and not yet ended.
    pub in_flight: prometheus::IntGauge,
    /// `gateway_client_connections_open{protocol,tls}`: client connections open now.
    pub connections_open: prometheus::IntGaugeVec,
    /// `gateway_log_lines_dropped_total`: log lines dropped because the writer's queue was full.
    pub log_lines_dropped: IntCounter,
    /// `gateway_dns_resolutions_total{upstream,result}`: resolutions of upstream names.
    pub dns_resolutions: IntCounterVec,
    /// `gateway_upstream_ejections_total{upstream}`: servers ejected for failing in a row.
    pub ejections: IntCounterVec,
    /// `gateway_upstream_retries_total{upstream,reason}`: requests tried again on another
    /// server (`reason`: connect, reused_connection, refused_by_budget).
    pub retries: IntCounterVec,
    /// `gateway_upstream_ttfb_seconds{upstream}`: request sent to first response byte.
    pub ttfb: HistogramVec,
    /// `gateway_store_lease_units_total{event}`: rate-limit units leased from Redis.
    pub store_leases: IntCounterVec,
    /// `gateway_store_nodes{role}`: Redis masters and replicas answering, per the last probe.
    pub store_nodes: IntGaugeVec,
    /// `gateway_config_reloads_total{result}`: reloads by result (success, failure).
    pub config_reloads: IntCounterVec,
    /// Request heads refused before routing, by reason.
    pub heads_refused: IntCounterVec,
    /// `gateway_config_last_reload_successful`: 1 unless the last reload was refused.
    pub last_reload_ok: prometheus::IntGauge,
    /// `gateway_upstream_healthy_servers{upstream}`: servers in the rotation.
    pub healthy_servers: IntGaugeVec,
    /// Upgraded connections (WebSocket) by route, counted when they end.
    pub upgraded: IntCounterVec,
    /// How long upgraded connections lasted, by route.
    pub upgraded_duration: HistogramVec,
}

impl Metrics {
    /// Creates and registers all families.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "gateway_http_requests_total",
                "Responses sent to clients, by route, method and exact status code.",
            ),
            &["route", "method", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "gateway_http_request_duration_seconds",
                "Time from the end of the request (its head, or its body's last byte) to the \
                 answer's head: what the gateway and the upstream took, not the client's \
                 upload or download; upgraded connections are not in it. By route.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["route"],
        )?;
        let upstream_failures = IntCounterVec::new(
            Opts::new(
                "gateway_upstream_failures_total",
                "Upstream exchanges that failed, by route, upstream and kind of failure.",
            ),
            &["route", "upstream", "kind"],
        )?;
        let errors_rewritten = IntCounterVec::new(
            Opts::new(
                "gateway_errors_rewritten_total",
                "Upstream error answers that were not an envelope and were rewritten into one \
                 (contract violations), by route and status.",
            ),
            &["route", "status"],
        )?;
        let auth_rejections = IntCounterVec::new(
            Opts::new(
                "gateway_auth_rejections_total",
                "Requests refused by the token, node-key, network or role checks, by route and reason.",
            ),
            &["route", "reason"],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "gateway_rate_limited_total",
                "Requests refused with 429 by a rate-limit policy, by route and policy.",
            ),
            &["route", "policy"],
        )?;
        let login_attempts = IntCounterVec::new(
            Opts::new(
                "gateway_login_attempts_total",
                "Login attempts by outcome: success, failure, locked, invalid_body, throttled, error.",
            ),
            &["outcome"],
        )?;
        let lockouts = IntCounter::new(
            "gateway_lockouts_total",
            "Accounts locked after too many failed logins.",
        )?;
        let store_fallbacks = IntCounter::new(
            "gateway_store_fallbacks_total",
            "Store operations answered by the in-process store because Redis failed or was down.",
        )?;
        let store_degraded = prometheus::IntGauge::new(
            "gateway_store_degraded",
            "1 while the in-process store stands in for an unavailable Redis, else 0.",
        )?;
        let store_duration = HistogramVec::new(
            HistogramOpts::new(
                "gateway_store_duration_seconds",
                "Redis store round trips by operation: rate (every policy of a request), \
                 reserve and settle (a login guess), probe; timeouts count at their deadline.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0,
            ]),
            &["op"],
        )?;
        for op in ["rate", "reserve", "settle", "probe"] {
            store_duration.with_label_values(&[op]);
        }
        let certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "gateway_tls_certificate_expiry_timestamp_seconds",
                "notAfter of each certificate the TLS listener serves (Unix seconds), by file; \
                 alert on it minus time().",
            ),
            &["certificate"],
        )?;
        let body_bytes = IntCounterVec::new(
            Opts::new(
                "gateway_http_body_bytes_total",
                "Body bytes received from clients (direction=in) and sent to them (out), by route.",
            ),
            &["route", "direction"],
        )?;
        let in_flight = prometheus::IntGauge::new(
            "gateway_http_requests_in_flight",
            "Requests begun and not yet ended (upgraded connections included while open).",
        )?;
        let connections_open = prometheus::IntGaugeVec::new(
            Opts::new(
                "gateway_client_connections_open",
                "Client connections open now, by protocol (http1, h2) and tls (true, false).",
            ),
            &["protocol", "tls"],
        )?;
        for (protocol, tls) in [("http1", "false"), ("http1", "true"), ("h2", "true")] {
            connections_open.with_label_values(&[protocol, tls]).set(0);
        }
        let log_lines_dropped = IntCounter::new(
            "gateway_log_lines_dropped_total",
            "Log lines (access lines included) dropped because the log writer's queue was full: \
             the proxy never waits for the log.",
        )?;
        let dns_resolutions = IntCounterVec::new(
            Opts::new(
                "gateway_dns_resolutions_total",
                "Resolutions of upstream server names by result (ok, failed: the last good \
                 addresses stay in use).",
            ),
            &["upstream", "result"],
        )?;
        let ejections = IntCounterVec::new(
            Opts::new(
                "gateway_upstream_ejections_total",
                "Upstream servers taken out of the rotation for failing in a row.",
            ),
            &["upstream"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "gateway_upstream_retries_total",
                "Requests tried again on another server, by reason (connect, \
                 reused_connection), and retries the budget refused (refused_by_budget).",
            ),
            &["upstream", "reason"],
        )?;
        let ttfb = HistogramVec::new(
            HistogramOpts::new(
                "gateway_upstream_ttfb_seconds",
                "Time from the request head sent upstream to the response head received.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["upstream"],
        )?;
        let store_leases = IntCounterVec::new(
            Opts::new(
                "gateway_store_lease_units_total",
                "Rate-limit units leased from Redis: taken ahead of need, spent without a round \
                 trip, given back unspent.",
            ),
            &["event"],
        )?;
        for event in ["taken", "spent", "given_back"] {
            store_leases.with_label_values(&[event]);
        }
        let store_nodes = IntGaugeVec::new(
            Opts::new(
                "gateway_store_nodes",
                "Redis nodes answering by role (master, replica), as the last probe saw them.",
            ),
            &["role"],
        )?;
        for role in ["master", "replica"] {
            store_nodes.with_label_values(&[role]);
        }
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "gateway_config_reloads_total",
                "Configuration reloads by result: success, or failure (the running one stays).",
            ),
            &["result"],
        )?;
        let heads_refused = IntCounterVec::new(
            Opts::new(
                "gateway_request_heads_refused_total",
                "HTTP/1 request heads refused before routing: too_large, too_many_headers, \
                 malformed, connect, timeout, busy_client, busy.",
            ),
            &["reason"],
        )?;
        let upgraded = IntCounterVec::new(
            Opts::new(
                "gateway_upgraded_connections_total",
                "Upgraded (WebSocket) connections by route, counted when they end.",
            ),
            &["route"],
        )?;
        let upgraded_duration = HistogramVec::new(
            HistogramOpts::new(
                "gateway_upgraded_duration_seconds",
                "How long upgraded (WebSocket) connections lasted, by route; kept apart from \
                 the request latency histogram.",
            )
            .buckets(vec![
                1.0,
                10.0,
                60.0,
                300.0,
                900.0,
                3600.0,
                4.0 * 3600.0,
                12.0 * 3600.0,
            ]),
            &["route"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "gateway_build_info",
                "Build information; the value is always 1.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(upstream_failures.clone()))?;
        registry.register(Box::new(errors_rewritten.clone()))?;
        registry.register(Box::new(auth_rejections.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(login_attempts.clone()))?;
        registry.register(Box::new(lockouts.clone()))?;
        registry.register(Box::new(store_fallbacks.clone()))?;
        registry.register(Box::new(store_degraded.clone()))?;
        registry.register(Box::new(store_duration.clone()))?;
        registry.register(Box::new(store_nodes.clone()))?;
        registry.register(Box::new(store_leases.clone()))?;
        registry.register(Box::new(dns_resolutions.clone()))?;
        registry.register(Box::new(log_lines_dropped.clone()))?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(body_bytes.clone()))?;
        registry.register(Box::new(ejections.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(ttfb.clone()))?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(heads_refused.clone()))?;
        let last_reload_ok = prometheus::IntGauge::new(
            "gateway_config_last_reload_successful",
            "1 when the last configuration reload succeeded (or none was tried), 0 when it was refused.",
        )?;
        last_reload_ok.set(1);
        registry.register(Box::new(last_reload_ok.clone()))?;
        let healthy_servers = IntGaugeVec::new(
            Opts::new(
                "gateway_upstream_healthy_servers",
                "Servers of each upstream in the rotation (passing their health check; all of \
                 them without one).",
            ),
            &["upstream"],
        )?;
        registry.register(Box::new(healthy_servers.clone()))?;
        // CPU, resident memory, open descriptors and start time of this process.
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        // Every labelled series an alert or a panel reads exists at 0 from the start, so that
        // `increase()` sees its first event.
        for result in ["success", "failure"] {
            config_reloads.with_label_values(&[result]);
        }
        for outcome in [
            "success",
            "failure",
            "locked",
            "invalid_body",
            "throttled",
            "error",
        ] {
            login_attempts.with_label_values(&[outcome]);
        }
        for reason in [
            "too_large",
            "too_many_headers",
            "malformed",
            "connect",
            "timeout",
            "busy_client",
            "busy",
        ] {
            heads_refused.with_label_values(&[reason]);
        }
        registry.register(Box::new(upgraded.clone()))?;
        registry.register(Box::new(upgraded_duration.clone()))?;
        registry.register(Box::new(build_info))?;
        Ok(Metrics {
            registry,
            requests,
            duration,
            upstream_failures,
            errors_rewritten,
            auth_rejections,
            rate_limited,
            login_attempts,
            lockouts,
            store_fallbacks,
            store_degraded,
            store_duration,
            store_nodes,
            store_leases,
            dns_resolutions,
            log_lines_dropped,
            certificate_expiry,
            in_flight,
            connections_open,
            body_bytes,
            ejections,
            retries,
            ttfb,
            config_reloads,
            heads_refused,
            last_reload_ok,
            healthy_servers,
            upgraded,
            upgraded_duration,
        })
    }

    /// The registry in Prometheus text exposition format.
    pub fn render(&self) -> Vec<u8> {
        // The log writer counts its own drops; the counter catches up at each scrape.
        let dropped = crate::log_sink::dropped();
        let seen = self.log_lines_dropped.get();
        if dropped > seen {
            self.log_lines_dropped.inc_by(dropped - seen);
        }
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec only fails on a malformed family, which registration rules out.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// Methods with a label of their own; everything else is `OTHER`, so odd methods cannot grow
/// the series count.
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER",
];

/// Status codes whose label is a constant and whose counter a route resolves once.
const COMMON: [(u16, &str); 24] = [
    (200, "200"),
    (201, "201"),
    (204, "204"),
    (301, "301"),
    (302, "302"),
    (304, "304"),
    (400, "400"),
    (401, "401"),
    (403, "403"),
    (404, "404"),
    (405, "405"),
    (408, "408"),
    (409, "409"),
    (413, "413"),
    (422, "422"),
    (429, "429"),
    (431, "431"),
    (500, "500"),
    (501, "501"),
    (502, "502"),
    (503, "503"),
    (504, "504"),
    (101, "101"),
    (0, "0"),
];

fn method_slot(method: &http::Method) -> usize {
    use http::Method as M;
    [
        M::GET,
        M::HEAD,
        M::POST,
        M::PUT,
        M::PATCH,
        M::DELETE,
        M::OPTIONS,
    ]
    .iter()
    .position(|m| m == method)
    .unwrap_or(METHODS.len() - 1)
}

fn status_slot(status: u16) -> Option<usize> {
    COMMON.iter().position(|(c, _)| *c == status)
}

/// A status label without allocating for the common codes.
pub fn status_label(status: u16) -> std::borrow::Cow<'static, str> {
    match status_slot(status) {
        Some(slot) => std::borrow::Cow::Borrowed(COMMON[slot].1),
        None => std::borrow::Cow::Owned(status.to_string()),
    }
}

/// One route's request counters and duration histogram, each resolved on first use and then
/// kept: a labelled lookup hashes every label and takes a lock, on every request.
pub struct Handles {
    duration: OnceLock<Histogram>,
    requests: [[OnceLock<IntCounter>; COMMON.len()]; METHODS.len()],
    /// Body bytes received from clients and sent to them.
    bytes: [OnceLock<IntCounter>; 2],
}

/// A copy resolves its own handles: a route copied into a new configuration snapshot starts
/// with none.
impl Clone for Handles {
    fn clone(&self) -> Self {
        Handles::default()
    }
}

impl Default for Handles {
    fn default() -> Self {
        Handles {
            duration: OnceLock::new(),
            requests: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            bytes: [OnceLock::new(), OnceLock::new()],
        }
    }
}

impl std::fmt::Debug for Handles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handles")
    }
}

impl Metrics {
    /// Counts a request's body bytes received (`inbound`) and its answer's body bytes sent
    /// (`outbound`) under `route`.
    pub fn body_bytes(&self, handles: Option<&Handles>, route: &str, inbound: u64, outbound: u64) {
        for (i, (direction, n)) in [("in", inbound), ("out", outbound)].into_iter().enumerate() {
            if n == 0 {
                continue;
            }
            match handles {
                Some(h) => h.bytes[i]
                    .get_or_init(|| self.body_bytes.with_label_values(&[route, direction]))
                    .inc_by(n),
                None => self
                    .body_bytes
                    .with_label_values(&[route, direction])
                    .inc_by(n),
            }
        }
    }

    /// Counts an upgraded connection that ended after `seconds`.
    pub fn upgraded(&self, route: &str, seconds: f64) {
        self.upgraded.with_label_values(&[route]).inc();
        self.upgraded_duration
            .with_label_values(&[route])
            .observe(seconds);
    }

    /// Counts one answer (by exact status) and its duration under `route`, through the
    /// route's `handles` when it has them (requests answered before routing have none).
    /// `seconds` is `None` for answers that have no latency to record (an upgrade).
    pub fn answered(
        &self,
        handles: Option<&Handles>,
        route: &str,
        method: &http::Method,
        status: u16,
        seconds: Option<f64>,
    ) {
        let m = method_slot(method);
        match (handles, status_slot(status)) {
            (Some(h), Some(s)) => h.requests[m][s]
                .get_or_init(|| {
                    self.requests
                        .with_label_values(&[route, METHODS[m], COMMON[s].1])
                })
                .inc(),
            _ => self
                .requests
                .with_label_values(&[route, METHODS[m], &status_label(status)])
                .inc(),
        }
        let Some(seconds) = seconds else {
            return;
        };
        match handles {
            Some(h) => h
                .duration
                .get_or_init(|| self.duration.with_label_values(&[route]))
                .observe(seconds),
            None => self.duration.with_label_values(&[route]).observe(seconds),
        }
    }
}

/// One unit on a gauge for as long as it lives: every way its owner ends (answered, failed,
/// dropped mid-way) counts it out.
pub struct GaugeGuard(prometheus::IntGauge);

impl GaugeGuard {
    /// Adds one to `gauge` until the guard is dropped.
    pub fn new(gauge: &prometheus::IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Handles and the labelled fallback count into the same series.
    #[test]
    fn answers_are_counted_by_route_method_and_exact_status() {
        let m = Metrics::new().unwrap();
        let h = Handles::default();
        m.answered(Some(&h), "api", &http::Method::GET, 200, Some(0.002));
        m.answered(Some(&h), "api", &http::Method::GET, 200, Some(0.002));
        m.answered(None, "api", &http::Method::GET, 200, Some(0.002));
        m.answered(
            Some(&h),
            "api",
            &http::Method::from_bytes(b"PURGE").unwrap(),
            418,
            Some(0.3),
        );
        m.answered(None, "unmatched", &http::Method::POST, 404, Some(0.001));
        let text = String::from_utf8(m.render()).unwrap();
        for line in [
            r#"gateway_http_requests_total{method="GET",route="api",status="200"} 3"#,
            r#"gateway_http_requests_total{method="OTHER",route="api",status="418"} 1"#,
            r#"gateway_http_requests_total{method="POST",route="unmatched",status="404"} 1"#,
            r#"gateway_http_request_duration_seconds_count{route="api"} 4"#,
            r#"gateway_http_request_duration_seconds_bucket{route="api",le="0.0025"} 3"#,
            r#"gateway_http_request_duration_seconds_count{route="unmatched"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }
}
