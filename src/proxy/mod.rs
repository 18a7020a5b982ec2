//! The request's way through the gateway, phase by phase, as Pingora calls them. Each phase is
//! short: the checks are in [`admit`], the answers the gateway makes itself in [`answer`], the
//! heads that cross it in [`forward`], the request's trace span in [`span`].

mod admit;
mod answer;
mod forward;
mod framing;
mod heads;
mod span;

pub use heads::HeadJudge;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;

use crate::auth::Identity;
use crate::client_ip::Client;
use crate::envelope;
use crate::limits::lockout::{self, Guess};
use crate::metrics::{self, Metrics};
use crate::request_id;
use crate::rewrite::{self, Plan, Rewrite};
use crate::routes::Route;
use crate::state::State;
use crate::store::Store;
use crate::trace::{Span, Tracing};
use crate::upstreams::{Outcome, Pool};
use answer::{envelope_headers, respond, status_for, upstream_failure_kind};
use framing::Framing;

/// Label used for requests that matched no route.
const UNMATCHED: &str = "unmatched";

/// The gateway: the current configuration snapshot, the counter store and the metrics.
pub struct Gateway {
    state: Arc<ArcSwap<State>>,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    tracing: Option<Arc<Tracing>>,
}

impl Gateway {
    /// Serves requests with whatever `state` holds when each request starts; with `tracing`,
    /// each request is a span.
    pub fn new(
        state: Arc<ArcSwap<State>>,
        metrics: Arc<Metrics>,
        store: Arc<dyn Store>,
        tracing: Option<Arc<Tracing>>,
    ) -> Self {
        Gateway {
            state,
            metrics,
            store,
            tracing,
        }
    }
}

/// What one request carries from phase to phase.
pub struct Ctx {
    /// Counts the request in flight until the context is dropped (its very end).
    _in_flight: crate::metrics::GaugeGuard,
    /// The configuration this request runs under, from start to end.
    state: Arc<State>,
    start: Instant,
    request_id: HeaderValue,
    route: Option<Arc<Route>>,
    /// Upstream error rewrite in progress, if the upstream answered >= 400 with a body.
    rewrite: Option<Rewrite>,
    /// The upstream answered an error without a body; `fail_to_proxy` writes its envelope with
    /// these upstream headers kept (`Retry-After`, `WWW-Authenticate`, `Allow`).
    empty_error: Option<Vec<(HeaderName, HeaderValue)>>,
    /// Upstream selections so far (bounds connect retries).
    tries: usize,
    /// The server of the current try.
    server: Option<std::net::SocketAddr>,
    /// When the request head went to it.
    sent_at: Option<Instant>,
    /// From the head sent to the upstream's answer head.
    ttfb: Option<Duration>,
    /// The gateway's span, when tracing is on.
    span: Option<Span>,
    /// Its trace id, kept for the access line after the span ended.
    trace_id: Option<String>,
    /// Request body bytes seen so far.
    body_bytes: u64,
    /// When the request was whole (its body's last byte arrived), if it had a body.
    request_done: Option<Instant>,
    /// When the upstream's answer head went to the client.
    answered_at: Option<Instant>,
    /// The verified caller, on token routes.
    identity: Option<Arc<Identity>>,
    /// The client (the socket peer, or from a trusted proxy's X-Forwarded-For).
    client: Client,
    /// The socket peer is a trusted proxy.
    from_trusted_proxy: bool,
    /// Rate-limit headers for the answer, when configured on allowed responses.
    rate_headers: Vec<(HeaderName, HeaderValue)>,
    /// A reserved login guess, settled when the upstream answers or in `logging`.
    login: Option<Guess>,
    /// The upstream's status, once its header arrived.
    upstream_status: Option<u16>,
    /// How authentication went, for the access log: `none`, `ok` or the rejection reason.
    auth: &'static str,
    /// The request came over TLS.
    tls: bool,
    /// The request's `Origin`, when it is an allowed one.
    cors_origin: Option<HeaderValue>,
    /// Metric label for requests answered before routing.
    label: &'static str,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    /// One downstream module, [`Framing`]. Not Pingora's default one: a disabled compression
    /// module that still costs a context and four filter calls on every request (the gateway
    /// compresses nothing).
    fn init_downstream_modules(&self, modules: &mut HttpModules) {
        modules.add_module(Box::new(framing::FramingBuilder));
    }

    /// What Pingora's own error lines say about a request: method and path only. Its default
    /// prints the whole target, and a query may carry a token (`?token=` on WebSocket routes).
    fn request_summary(&self, session: &Session, _ctx: &Ctx) -> String {
        let req = session.req_header();
        format!("{} {}", req.method, req.uri.path())
    }

    fn new_ctx(&self) -> Ctx {
        Ctx {
            _in_flight: crate::metrics::GaugeGuard::new(&self.metrics.in_flight),
            state: self.state.load_full(),
            start: Instant::now(),
            request_id: HeaderValue::from_static(""),
            route: None,
            rewrite: None,
            empty_error: None,
            tries: 0,
            server: None,
            sent_at: None,
            ttfb: None,
            span: None,
            trace_id: None,
            body_bytes: 0,
            request_done: None,
            answered_at: None,
            identity: None,
            client: Client::Unknown(Box::default()),
            from_trusted_proxy: false,
            rate_headers: Vec::new(),
            login: None,
            upstream_status: None,
            auth: "none",
            tls: false,
            cors_origin: None,
            label: UNMATCHED,
        }
    }

    /// Who is asking and over what; the edge's own answers (CORS preflights, redirects to
    /// https); then every check of [`admit`](Gateway::admit), or the answer it ends with.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        self.identify(session, ctx);
        if let Some(tracing) = &self.tracing {
            let req = session.req_header();
            let started = SystemTime::now() - ctx.start.elapsed();
            ctx.span = Some(tracing.start(&req.headers, req.method.as_str(), started));
        }
        let state = ctx.state.clone();
        if let Some(cors) = &state.cors {
            if is_preflight(session) {
                ctx.label = "cors_preflight";
                return self.preflight(session, ctx, cors).await;
            }
        }
        if let (false, Some(port)) = (ctx.tls, state.redirect_to_tls_port) {
            ctx.label = "redirect_to_https";
            return self.redirect_to_tls(session, ctx, port).await;
        }
        match self.admit(session, ctx).await {
            Ok(()) => Ok(false),
            Err(answer) => self.answer(session, ctx, answer).await,
        }
    }

    /// Notes when the request is whole, and holds bodies that did not announce their length to
    /// the route's cap.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if end_of_stream && ctx.request_done.is_none() {
            ctx.request_done = Some(Instant::now());
        }
        if let (Some(chunk), Some(route)) = (body.as_ref(), ctx.route.as_ref()) {
            ctx.body_bytes += chunk.len() as u64;
            if ctx.body_bytes > route.max_body_bytes {
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body over the cap");
            }
        }
        Ok(())
    }

    /// The next healthy server of the route's upstream that is not ejected.
    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.tries += 1;
        let Some(pool) = self.pool(ctx) else {
            return Error::e_explain(ErrorType::InternalError, "no upstream for the route");
        };
        if ctx.tries == 1 {
            pool.earn_retry();
        }
        match pool.select() {
            Some(peer) => {
                ctx.server = peer._address.as_inet().copied();
                Ok(peer)
            }
            None => {
                self.count_upstream_failure(ctx, "no_healthy_server");
                Error::e_explain(ErrorType::HTTPStatus(503), "no healthy upstream server")
            }
        }
    }

    /// A refused or timed-out connect (nothing reached the server) moves on to the next
    /// server, once per server, while the upstream's retry budget allows.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let Some(pool) = self.pool(ctx) else {
            return e;
        };
        if let Some(server) = ctx.server {
            pool.record(server, Outcome::Failure);
        }
        if ctx.tries < pool.server_count() {
            if let Some(kind) = upstream_failure_kind(&e) {
                self.count_upstream_failure(ctx, kind);
            }
            e.set_retry(self.may_retry(&pool, "connect"));
        }
        e
    }

    /// A failure after the request went out: an idempotent request on a reused connection (the
    /// server may have closed it idle, having seen nothing) is tried again on the next server,
    /// while the budget allows; anything else, a POST above all, never is.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let pool = self.pool(ctx);
        if let (Some(pool), Some(server)) = (&pool, ctx.server) {
            pool.record(server, Outcome::Failure);
        }
        let safe = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated();
        if !safe {
            e.set_retry(false);
            return e;
        }
        e.retry.decide_reuse(client_reused);
        if e.retry() {
            let allowed = pool.is_some_and(|p| self.may_retry(&p, "reused_connection"));
            e.set_retry(allowed);
        }
        e
    }

    /// The request head as the upstream gets it (see [`forward`]).
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.sent_at = Some(Instant::now());
        forward::upstream_request(session, upstream_request, ctx)?;
        if let Some(span) = &ctx.span {
            span::propagate(span, upstream_request)?;
        }
        Ok(())
    }

    /// Status >= 400 from the upstream: decide the rewrite while the framing can still change.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.upstream_status = Some(upstream_response.status.as_u16());
        if let Some(pool) = self.pool(ctx) {
            if let Some(sent) = ctx.sent_at {
                let ttfb = sent.elapsed();
                ctx.ttfb = Some(ttfb);
                pool.ttfb.observe(ttfb.as_secs_f64());
            }
            if let Some(server) = ctx.server {
                let outcome = if upstream_response.status.is_server_error() {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                pool.record(server, outcome);
            }
        }
        // Settle the login guess now, before the client sees the answer: a client that retries
        // at once must find its failure already counted.
        if !upstream_response.status.is_informational() {
            if let Some(guess) = ctx.login.take() {
                self.settle_login(guess, ctx).await;
            }
        }
        let is_head = session.req_header().method == http::Method::HEAD;
        match rewrite::plan(is_head, upstream_response) {
            Plan::Pass => Ok(()),
            Plan::Rewrite(rw) => {
                ctx.rewrite = Some(rw);
                Ok(())
            }
            Plan::Empty => {
                // Bodyless answers never reach the body filters (pingora #852): fail_to_proxy
                // writes the envelope instead.
                ctx.empty_error = Some(rewrite::kept_headers(upstream_response));
                let status = upstream_response.status.as_u16();
                Error::e_explain(ErrorType::HTTPStatus(status), "bodyless upstream error")
            }
        }
    }

    /// The answer head as the client gets it (see [`forward`]).
    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        forward::client_response(upstream_response, ctx)?;
        ctx.answered_at = Some(Instant::now());
        Ok(())
    }

    /// Swallows the body of a rewritten error and emits its envelope instead.
    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if let Some(rw) = ctx.rewrite.as_mut() {
            rw.on_body(body, end_of_stream);
            // A chunked envelope is emitted whole: its length may still reach the head.
            if let (true, Some(envelope)) = (rw.chunked(), body.as_ref()) {
                Framing::known(session, envelope.len());
            }
        }
        Ok(None)
    }

    /// Pingora's own ERROR line for a failed request is kept for the gateway's and the
    /// upstream's faults; a client's (a bad request, a client gone) and the gateway's refusals
    /// (4xx it chose to answer) are debug lines, so they never flood the error log. A bodyless
    /// upstream error is not a failure at all: it was answered with its envelope.
    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, e: &Error) -> bool {
        let client_side = *e.esource() == pingora::ErrorSource::Downstream
            || matches!(e.etype(), ErrorType::HTTPStatus(code) if (400..500).contains(code))
            || ctx.empty_error.is_some();
        if client_side {
            tracing::debug!(error = %e, "request ended by the client or refused");
        }
        client_side
    }

    /// Every failure becomes an envelope with the right status, unless the answer already
    /// started (then only closing the connection is left).
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if let Some(kind) = upstream_failure_kind(e) {
            self.count_upstream_failure(ctx, kind);
        }
        if let Some(sent) = session.response_written() {
            if !sent.status.is_informational() {
                return FailToProxy {
                    error_code: sent.status.as_u16(),
                    can_reuse_downstream: false,
                };
            }
        }
        let code = status_for(e);
        if code > 0 {
            // Pingora does not reuse the client connection after a proxy failure: say so, so
            // keep-alive clients do not send their next request into a closing connection.
            session.set_keepalive(None);
            let message = envelope::default_message(code);
            let kept = ctx.empty_error.as_deref().unwrap_or_default();
            let headers = envelope_headers(ctx, kept);
            if let Err(write_err) = respond(session, code, message, &ctx.request_id, &headers).await
            {
                tracing::debug!(error = %write_err, "client gone before the error answer");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// After the answer: the request counted (exact status, latency or upgrade length, contract
    /// violations), a login guess the upstream never answered given back, the access line.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let route = ctx.route.as_ref().map_or(ctx.label, |r| r.name.as_str());
        let handles = ctx.route.as_ref().map(|r| &r.metrics);
        let method = &session.req_header().method;
        // Latency from the whole request to the answer's head (see the metric's help); an
        // upgraded connection's length is counted apart.
        let now = Instant::now();
        let latency = ctx
            .answered_at
            .unwrap_or(now)
            .saturating_duration_since(ctx.request_done.unwrap_or(ctx.start));
        if status == 101 {
            self.metrics
                .upgraded(route, ctx.start.elapsed().as_secs_f64());
            self.metrics.answered(handles, route, method, status, None);
        } else {
            self.metrics
                .answered(handles, route, method, status, Some(latency.as_secs_f64()));
        }
        self.metrics.body_bytes(
            handles,
            route,
            ctx.body_bytes,
            session.body_bytes_sent() as u64,
        );
        // A guess whose upstream never answered (timeout, reset, client gone) is given back.
        if let Some(guess) = ctx.login.take() {
            self.settle_login(guess, ctx).await;
        }
        let rewritten = ctx.rewritten();
        if rewritten {
            self.metrics
                .errors_rewritten
                .with_label_values(&[route, &metrics::status_label(status)])
                .inc();
        }
        if let Some(span) = ctx.span.take() {
            ctx.trace_id = Some(span.trace_id());
            self.end_span(span, session, ctx, route, status, rewritten);
        }
        if ctx.state.access_log {
            let upstream = ctx
                .route
                .as_ref()
                .filter(|_| ctx.tries > 0)
                .and_then(|r| ctx.state.pool(r))
                .map_or("", |p| p.name.as_str());
            // The path only: a query may carry a token (`?token=` on WebSocket routes).
            let req = session.req_header();
            let user_agent = req
                .headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map_or("", |ua| bounded(ua, MAX_LOGGED_USER_AGENT));
            crate::log_sink::access(&crate::log_sink::AccessLine {
                request_id: request_id::as_str(&ctx.request_id),
                trace_id: ctx.trace_id.as_deref().unwrap_or(""),
                route,
                method: req.method.as_str(),
                path: req.uri.path(),
                status,
                upstream,
                server: ctx.server,
                duration_ms: ctx.start.elapsed().as_secs_f64() * 1000.0,
                ttfb_ms: ctx.ttfb.map(|t| t.as_secs_f64() * 1000.0),
                retries: ctx.tries.saturating_sub(1),
                bytes_in: ctx.body_bytes,
                bytes: session.body_bytes_sent(),
                user_agent,
                client_ip: &ctx.client,
                auth: ctx.auth,
            });
        }
    }
}

impl Gateway {
    /// The request id (the client's if sane), the client (behind trusted proxies), TLS, and the
    /// CORS origin when it is an allowed one.
    fn identify(&self, session: &Session, ctx: &mut Ctx) {
        let state = &ctx.state;
        let req = session.req_header();
        ctx.request_id = request_id::take_or_make(req);
        if let Some(peer) = peer_ip(session) {
            ctx.from_trusted_proxy = state.trusted_proxies.trusts(peer);
            ctx.client = state.trusted_proxies.client(peer, &req.headers);
        }
        ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        if let (Some(cors), Some(origin)) = (&state.cors, req.headers.get(header::ORIGIN)) {
            if cors
                .origins
                .iter()
                .any(|o| o.as_bytes() == origin.as_bytes())
            {
                ctx.cors_origin = Some(origin.clone());
            }
        }
    }

    /// Settles a reserved login guess by what the upstream said (see [`lockout::Guard`]).
    async fn settle_login(&self, guess: Guess, ctx: &Ctx) {
        let Some(guard) = ctx.route.as_ref().and_then(|r| r.login.as_ref()) else {
            return;
        };
        let outcome = guard.settlement(ctx.upstream_status);
        self.count_login(lockout::outcome_label(outcome));
        if guard.settle(self.store.as_ref(), guess, outcome).await {
            self.metrics.lockouts.inc();
            tracing::info!(
                route = ctx.route.as_ref().map_or("", |r| r.name.as_str()),
                "account locked"
            );
        }
    }

    fn count_login(&self, outcome: &str) {
        self.metrics
            .login_attempts
            .with_label_values(&[outcome])
            .inc();
    }

    /// The route's upstream pool.
    fn pool(&self, ctx: &Ctx) -> Option<Arc<Pool>> {
        ctx.route.as_ref().and_then(|r| ctx.state.pool(r)).cloned()
    }

    /// Takes a retry from `pool`'s budget, counting it (or its refusal) under `reason`.
    fn may_retry(&self, pool: &Pool, reason: &str) -> bool {
        let allowed = pool.take_retry();
        let reason = if allowed { reason } else { "refused_by_budget" };
        self.metrics
            .retries
            .with_label_values(&[pool.name.as_str(), reason])
            .inc();
        allowed
    }

    fn count_upstream_failure(&self, ctx: &Ctx, kind: &str) {
        let Some(route) = ctx.route.as_ref() else {
            return;
        };
        let upstream = ctx.state.pool(route).map_or("", |p| p.name.as_str());
        self.metrics
            .upstream_failures
            .with_label_values(&[route.name.as_str(), upstream, kind])
            .inc();
    }
}

/// A CORS preflight: `OPTIONS` with an `Origin` and `Access-Control-Request-Method`.
fn is_preflight(session: &Session) -> bool {
    let req = session.req_header();
    req.method == http::Method::OPTIONS
        && req.headers.contains_key(header::ORIGIN)
        && req
            .headers
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

impl Ctx {
    /// Whether the answer is an upstream error the gateway rewrote (a contract violation).
    fn rewritten(&self) -> bool {
        self.empty_error.is_some()
            || self
                .rewrite
                .as_ref()
                .is_some_and(Rewrite::violated_contract)
    }
}

/// Longest user agent written to the access log (longer ones are cut at a character boundary).
const MAX_LOGGED_USER_AGENT: usize = 256;

/// `s` cut to at most `max` bytes, at a character boundary.
fn bounded(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The socket peer's address.
pub(crate) fn peer_ip(session: &Session) -> Option<std::net::IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}
