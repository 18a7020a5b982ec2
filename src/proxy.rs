//! The request's way through the gateway, phase by phase, as Pingora calls them.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};

use crate::auth::{self, node_key, Identity, Mode, Rejection, Role};
use crate::client_ip::{self, Client};
use crate::config::{Cors, LOGIN_BODY_CAP};
use crate::envelope;
use crate::forward;
use crate::limits::lockout::{self, Guess, Refusal};
use crate::limits::ratelimit::{self, KeyKind};
use crate::metrics::{self, Metrics};
use crate::path;
use crate::request_id;
use crate::rewrite::{self, Plan, Rewrite};
use crate::routes::{Match, Route};
use crate::state::State;
use crate::store::Store;

/// Label used for requests that matched no route.
const UNMATCHED: &str = "unmatched";

/// The gateway: the current configuration snapshot, the counter store and the metrics.
pub struct Gateway {
    state: Arc<ArcSwap<State>>,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
}

impl Gateway {
    /// Serves requests with whatever `state` holds when each request starts.
    pub fn new(state: Arc<ArcSwap<State>>, metrics: Arc<Metrics>, store: Arc<dyn Store>) -> Self {
        Gateway {
            state,
            metrics,
            store,
        }
    }
}

/// Judges HTTP/1 heads for [`crate::connection::Connections`] by the configuration in force,
/// and counts the refused ones like every other answer.
pub struct HeadJudge {
    state: Arc<ArcSwap<State>>,
    metrics: Arc<Metrics>,
}

impl HeadJudge {
    /// A judge reading `state` and counting into `metrics`.
    pub fn new(state: Arc<ArcSwap<State>>, metrics: Arc<Metrics>) -> Self {
        HeadJudge { state, metrics }
    }
}

impl crate::connection::Heads for HeadJudge {
    fn rules(&self, peer: Option<std::net::IpAddr>) -> crate::connection::HeadRules {
        let state = self.state.load();
        let (max_pending, per_client) = state.max_pending_heads;
        // Behind a load balancer every connection has its address: bound it in all only.
        let trusted = peer.is_some_and(|ip| state.trusted_proxies.trusts(ip));
        crate::connection::HeadRules {
            limits: crate::head::Limits {
                max_bytes: state.max_header_bytes,
                max_headers: state.max_headers,
            },
            timeout: state.client_header_timeout,
            max_pending,
            max_pending_per_client: if trusted { usize::MAX } else { per_client },
        }
    }

    fn refused(&self, refusal: crate::head::Refusal, line: Option<(&str, &str)>) {
        let state = self.state.load();
        let method = line
            .and_then(|(m, _)| http::Method::from_bytes(m.as_bytes()).ok())
            .unwrap_or(http::Method::GET);
        // Counted under the route the path matches, as every other answer is.
        let path = line.and_then(|(_, target)| {
            let path = target.split('?').next().unwrap_or_default();
            path::normalise(path).ok().map(Cow::into_owned)
        });
        let route = path
            .as_deref()
            .and_then(|p| match state.routes.find(&method, p) {
                Match::Found(r) | Match::MethodNotAllowed(r, _) => Some(r.clone()),
                Match::NotFound => None,
            });
        let label = route.as_ref().map_or(UNMATCHED, |r| r.name.as_str());
        self.metrics.answered(
            route.as_ref().map(|r| &r.metrics),
            label,
            &method,
            refusal.status(),
            Some(0.0),
        );
        self.metrics
            .heads_refused
            .with_label_values(&[refusal.label()])
            .inc();
        tracing::debug!(
            reason = refusal.label(),
            route = label,
            "request head refused"
        );
    }
}

/// What one request carries from phase to phase.
pub struct Ctx {
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

    /// No downstream modules: Pingora installs a disabled compression module by default, which
    /// still costs a context and four filter calls on every request; the gateway compresses
    /// nothing.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    /// What Pingora's own error lines say about a request: method and path only. Its default
    /// prints the whole target, and a query may carry a token (`?token=` on WebSocket routes).
    fn request_summary(&self, session: &Session, _ctx: &Ctx) -> String {
        let req = session.req_header();
        format!("{} {}", req.method, req.uri.path())
    }

    fn new_ctx(&self) -> Ctx {
        Ctx {
            state: self.state.load_full(),
            start: Instant::now(),
            request_id: HeaderValue::from_static(""),
            route: None,
            rewrite: None,
            empty_error: None,
            tries: 0,
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

    /// Request id, route, size cap, network gate, authentication, authorization, rate limits,
    /// and on login routes the body check and the lockout reservation.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let state = ctx.state.clone();

        // 1. Request id: keep a sane one, otherwise make one. And who is asking, for the log,
        //    the network gate and the rate limits.
        ctx.request_id = request_id::take_or_make(session.req_header());
        if let Some(peer) = peer_ip(session) {
            ctx.from_trusted_proxy = state.trusted_proxies.trusts(peer);
            ctx.client = state
                .trusted_proxies
                .client(peer, &session.req_header().headers);
        }

        // 2. The edge: TLS or not, the CORS origin, preflights, plain-to-https redirects.
        ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        if let Some(cors) = &state.cors {
            let req = session.req_header();
            if let Some(origin) = req.headers.get(header::ORIGIN) {
                if cors
                    .origins
                    .iter()
                    .any(|o| o.as_bytes() == origin.as_bytes())
                {
                    ctx.cors_origin = Some(origin.clone());
                }
                if req.method == http::Method::OPTIONS
                    && req
                        .headers
                        .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
                {
                    ctx.label = "cors_preflight";
                    return self.preflight(session, ctx, cors).await;
                }
            }
        }
        if let (false, Some(port)) = (ctx.tls, state.redirect_to_tls_port) {
            ctx.label = "redirect_to_https";
            return self.redirect_to_tls(session, ctx, port).await;
        }

        // 3. Route, on the path as the upstream will route on it; that path is also what
        //    goes upstream.
        let req = session.req_header();
        let path = match path::normalise(req.uri.path()) {
            Ok(path) => path,
            Err(path::Invalid) => {
                return self
                    .reject(session, ctx, 400, Some("invalid request path"), &[])
                    .await
            }
        };
        let found = state.routes.find(&req.method, &path);
        if let Match::Found(route) | Match::MethodNotAllowed(route, _) = &found {
            // Every answer from here on is counted under the route the path matched.
            ctx.route = Some(Arc::clone(route));
        }

        // 4. Head size, before anything reads it further (HTTP/1 heads were checked whole
        //    on arrival; this is HTTP/2's check, and the one a reload changes at once).
        let head_bytes = req.uri.path_and_query().map_or(0, |p| p.as_str().len())
            + req
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>();
        if head_bytes > state.max_header_bytes || req.headers.len() > state.max_headers {
            session.set_keepalive(None);
            return self.reject(session, ctx, 431, None, &[]).await;
        }

        if let Cow::Owned(normalised) = &path {
            let uri = with_path(&req.uri, normalised);
            match uri {
                Some(uri) => session.req_header_mut().set_uri(uri),
                None => {
                    return self
                        .reject(session, ctx, 400, Some("invalid request path"), &[])
                        .await
                }
            }
        }
        let route = match found {
            Match::Found(route) => route.clone(),
            Match::NotFound => return self.reject(session, ctx, 404, None, &[]).await,
            Match::MethodNotAllowed(_, allow) => {
                let allow = HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static(""));
                return self
                    .reject(session, ctx, 405, None, &[(header::ALLOW, allow)])
                    .await;
            }
        };
        ctx.route = Some(route.clone());
        // A tunnel carries what no check here saw: only where the route says so.
        if session.is_upgrade_req() && !route.websocket {
            return self
                .reject(session, ctx, 400, Some("upgrade not allowed"), &[])
                .await;
        }

        // 5. Size: refuse an announced oversized body before reading any of it.
        let announced = session
            .req_header()
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if announced.is_some_and(|n| n > route.max_body_bytes) {
            // The unread body must not be drained into the next request: close after answering.
            session.set_keepalive(None);
            if route.login.is_some() {
                self.count_login("invalid_body");
            }
            return self.reject(session, ctx, 413, None, &[]).await;
        }
        // 6. Network gate.

        if let Some(gate) = &route.gate {
            if !ctx.client.ip().is_some_and(|ip| gate.allows(ip)) {
                return self.refuse(session, ctx, Rejection::Network).await;
            }
        }

        // 7. Authenticate.
        match authenticate(&state, session, &route) {
            Ok(identity) => {
                if route.auth != Mode::Public {
                    ctx.auth = "ok";
                }
                ctx.identity = identity;
            }
            Err(rejection) => return self.refuse(session, ctx, rejection).await,
        }

        // 8. Authorize.
        if let Some(identity) = &ctx.identity {
            if route.min_role.is_some_and(|min| identity.role < min) {
                return self.refuse(session, ctx, Rejection::InsufficientRole).await;
            }
            if identity.role != Role::PlatformAdmin
                && auth::asks_other_tenant(session.req_header().uri.query())
            {
                return self.refuse(session, ctx, Rejection::TenantOverride).await;
            }
        }

        // 9. Rate limits.
        for policy in &route.rate_limits {
            let mut buf = Vec::new();
            let key = match (policy.key, &ctx.identity) {
                (KeyKind::Ip, _) => {
                    ctx.client.write_rate_key(&mut buf, state.ip_prefixes);
                    String::from_utf8_lossy(&buf)
                }
                // A user is a subject within a tenant: `sub` alone would make one tenant's
                // user 42 throttle another's. Length-prefixed, so no two pairs share a key.
                (KeyKind::User, Some(id)) => {
                    let (tid, sub) = (id.tenant.as_bytes(), id.user.as_bytes());
                    buf.extend_from_slice(tid.len().to_string().as_bytes());
                    buf.push(b':');
                    buf.extend_from_slice(tid);
                    buf.push(b':');
                    buf.extend_from_slice(sub);
                    String::from_utf8_lossy(&buf)
                }
                (KeyKind::Tenant, Some(id)) => String::from_utf8_lossy(id.tenant.as_bytes()),
                // Config validation keeps user/tenant keys to token routes.
                (_, None) => continue,
            };
            let decision = self.store.rate_check(&policy.limit, &key).await;
            // Built only when they go out: a refusal, or success with the headers switched on.
            let headers = || {
                [
                    (RATELIMIT_POLICY, ratelimit::policy_header(&policy.limit)),
                    (RATELIMIT, ratelimit::state_header(&policy.limit, &decision)),
                ]
            };
            if !decision.allowed {
                self.metrics
                    .rate_limited
                    .with_label_values(&[route.name.as_str(), policy.limit.name.as_str()])
                    .inc();
                if route.login.is_some() {
                    self.count_login("throttled");
                }
                let secs = ratelimit::retry_after_secs(decision.retry_after);
                let [policy_h, state_h] = headers();
                let extra = [
                    (header::RETRY_AFTER, HeaderValue::from(secs)),
                    policy_h,
                    state_h,
                ];
                return self.reject(session, ctx, 429, None, &extra).await;
            }
            if state.rate_headers_on_success {
                ctx.rate_headers.extend(headers());
            }
        }

        session.set_read_timeout(Some(state.client_body_timeout));

        // 10. Login guard: a strict body, then a reserved guess or the lock. The route allows
        //     POST only (config validation).
        if let Some(guard) = &route.login {
            {
                let cap = route.max_body_bytes.min(LOGIN_BODY_CAP);
                let body = match read_body(session, cap, state.client_body_timeout).await {
                    Ok(body) => body,
                    Err(status) => {
                        self.count_login("invalid_body");
                        if status == 413 {
                            session.set_keepalive(None);
                        }
                        return self.reject(session, ctx, status, None, &[]).await;
                    }
                };
                let Some(account) = lockout::account(&body) else {
                    self.count_login("invalid_body");
                    return self.reject(session, ctx, 400, None, &[]).await;
                };
                match guard.reserve(self.store.as_ref(), &account).await {
                    Ok(guess) => ctx.login = Some(guess),
                    Err(Refusal::Locked(left)) => {
                        self.count_login("locked");
                        let secs = ratelimit::retry_after_secs(left);
                        let extra = [(header::RETRY_AFTER, HeaderValue::from(secs))];
                        let message = Some("account temporarily locked");
                        return self.reject(session, ctx, 403, message, &extra).await;
                    }
                    Err(Refusal::Full) => {
                        self.count_login("throttled");
                        let extra = [(header::RETRY_AFTER, HeaderValue::from(1u64))];
                        return self.reject(session, ctx, 429, None, &extra).await;
                    }
                }
            }
        }
        Ok(false)
    }

    /// Counts body bytes of requests that did not announce their length.
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

    /// The next healthy server of the route's upstream.
    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.tries += 1;
        let Some(route) = ctx.route.as_ref() else {
            return Error::e_explain(ErrorType::InternalError, "no route for upstream_peer");
        };
        let Some(pool) = ctx.state.pool(route) else {
            return Error::e_explain(ErrorType::InternalError, "route names a missing upstream");
        };
        match pool.select() {
            Some(peer) => Ok(peer),
            None => {
                self.count_upstream_failure(ctx, "no_healthy_server");
                Error::e_explain(ErrorType::HTTPStatus(503), "no healthy upstream server")
            }
        }
    }

    /// A refused or timed-out connect moves on to the next server, once per server.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let servers = ctx
            .route
            .as_ref()
            .and_then(|r| ctx.state.pool(r))
            .map_or(1, |p| p.server_count());
        if ctx.tries < servers {
            if let Some(kind) = upstream_failure_kind(&e) {
                self.count_upstream_failure(ctx, kind);
            }
            e.set_retry(true);
        }
        e
    }

    /// The request as the upstream gets it: client headers it must not believe dropped (see
    /// [`forward`]), the request id, forwarding and identity headers set by the gateway.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // The request goes upstream rebuilt once as plain `http` parts with room for the
        // gateway's headers. Pingora's own inserts parse the name again, keep a second
        // (case-preserving) map and grow both maps insert by insert: about 1.5k instructions
        // per header, most of this filter's cost. Header names therefore go upstream in
        // canonical case (as Envoy sends them), the request target as it came (normalised
        // in `request_filter`). Identity headers come from the gateway only: whatever the
        // client sent is left out of the copy, on every route, and the verified values are
        // set below.
        let names = &ctx.state.identity_headers;
        let trusted = ctx.from_trusted_proxy;
        let scrub = &ctx.state.scrub;
        let mut parts = request_parts(upstream_request, GATEWAY_HEADERS, |n| {
            scrub.drops(n, trusted)
        });
        let headers = &mut parts.headers;
        headers.insert(envelope::REQUEST_ID_HEADER, ctx.request_id.clone());
        if let Some(peer) = peer_ip(session) {
            // Behind a trusted proxy the chain (every line of it: several lines are one list)
            // grows by that proxy; otherwise a client-sent X-Forwarded-For is replaced by the
            // peer.
            let mut chain = Vec::with_capacity(64);
            if trusted {
                for line in headers.get_all(X_FORWARDED_FOR) {
                    chain.extend_from_slice(line.as_bytes());
                    chain.extend_from_slice(b", ");
                }
            }
            client_ip::write_ip(&mut chain, peer);
            // Valid values joined by commas, then an address: always a valid value.
            if let Ok(chain) = HeaderValue::from_maybe_shared(Bytes::from(chain)) {
                headers.insert(X_FORWARDED_FOR, chain);
            }
        }
        if let Client::Ip(ip) = ctx.client {
            let mut text = Vec::with_capacity(16);
            client_ip::write_ip(&mut text, ip);
            if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(text)) {
                headers.insert(forward::X_REAL_IP, value);
            }
        }
        if !headers.contains_key(forward::X_FORWARDED_HOST) {
            let host = headers.get(header::HOST).cloned().or_else(|| {
                let authority = upstream_request.uri.authority()?;
                HeaderValue::from_str(authority.as_str()).ok()
            });
            if let Some(host) = host {
                headers.insert(forward::X_FORWARDED_HOST, host);
            }
        }
        if let Some(id) = &ctx.identity {
            headers.insert(names.tenant.clone(), id.tenant.clone());
            headers.insert(names.user.clone(), id.user.clone());
            headers.insert(
                names.role.clone(),
                HeaderValue::from_static(id.role.as_str()),
            );
            if let Some(email) = &id.email {
                headers.insert(names.email.clone(), email.clone());
            }
        }
        let proto = if ctx.tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        let mut rebuilt = RequestHeader::from(parts);
        // Parts keep only an origin-form target; an absolute-form one goes on as it came.
        if rebuilt.raw_path() != upstream_request.raw_path() {
            rebuilt.set_raw_path(upstream_request.raw_path())?;
        }
        *upstream_request = rebuilt;
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

    /// Every proxied answer echoes the request id.
    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Rebuilt once without the upstream's internal headers (and its CORS ones: CORS is the
        // edge's alone), as the upstream request is: Pingora's inserts and removals each cost
        // two map operations, a name parse and allocations. Header names reach the client in
        // canonical case; the status and reason phrase are the upstream's.
        let security = &ctx.state.security.remove_response_headers;
        let cors = ctx.state.cors.is_some();
        let extra = EDGE_RESPONSE_HEADERS + ctx.rate_headers.len();
        let mut parts = response_parts(upstream_response, extra, |n| {
            security.contains(n) || (cors && CORS_RESPONSE_HEADERS.contains(n))
        });
        let headers = &mut parts.headers;
        headers.insert(envelope::REQUEST_ID_HEADER, ctx.request_id.clone());
        for (name, value) in &ctx.rate_headers {
            headers.append(name.clone(), value.clone());
        }
        for (name, value) in edge_headers(ctx) {
            headers.append(name, value);
        }
        if ctx.rewrite.is_some() && ctx.state.security.nosniff {
            headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
        }
        let mut rebuilt = ResponseHeader::from(parts);
        rebuilt.set_reason_phrase(upstream_response.get_reason_phrase())?;
        *upstream_response = rebuilt;
        ctx.answered_at = Some(Instant::now());
        Ok(())
    }

    /// Swallows the body of a rewritten error and emits its envelope instead.
    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if let Some(rw) = ctx.rewrite.as_mut() {
            rw.on_body(body, end_of_stream);
        }
        Ok(None)
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
            if let Err(write_err) =
                envelope::respond(session, code, message, &ctx.request_id, &headers).await
            {
                tracing::debug!(error = %write_err, "client gone before the error answer");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// The one place that counts: by exact status, duration, contract violations.
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
        // A guess whose upstream never answered (timeout, reset, client gone) is given back.
        if let Some(guess) = ctx.login.take() {
            self.settle_login(guess, ctx).await;
        }
        let rewritten = ctx.empty_error.is_some()
            || ctx.rewrite.as_ref().is_some_and(Rewrite::violated_contract);
        if rewritten {
            self.metrics
                .errors_rewritten
                .with_label_values(&[route, &metrics::status_label(status)])
                .inc();
        }
        if ctx.state.access_log {
            let upstream = ctx
                .route
                .as_ref()
                .filter(|_| ctx.tries > 0)
                .and_then(|r| ctx.state.pool(r))
                .map_or("", |p| p.name.as_str());
            // The path only: a query may carry a token (`?token=` on WebSocket routes).
            tracing::info!(
                target: "access",
                request_id = request_id::as_str(&ctx.request_id),
                route,
                method = %session.req_header().method,
                path = session.req_header().uri.path(),
                status,
                upstream,
                duration_ms = ctx.start.elapsed().as_secs_f64() * 1000.0,
                bytes = session.body_bytes_sent(),
                client_ip = %ClientText(&ctx.client),
                auth = ctx.auth,
            );
        }
    }
}

impl Gateway {
    /// Answers with an envelope from `request_filter` and ends the request there.
    async fn reject(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        status: u16,
        message: Option<&str>,
        extra: &[(header::HeaderName, HeaderValue)],
    ) -> Result<bool> {
        let message = message.unwrap_or_else(|| envelope::default_message(status));
        let headers = envelope_headers(ctx, extra);
        envelope::respond(session, status, message, &ctx.request_id, &headers).await?;
        Ok(true)
    }

    /// Answers a CORS preflight at the edge, before routing and authentication: 204 with the
    /// allowed methods and headers for an allowed origin, 403 without CORS headers otherwise.
    async fn preflight(&self, session: &mut Session, ctx: &Ctx, cors: &Cors) -> Result<bool> {
        let Some(origin) = ctx.cors_origin.clone() else {
            return self.reject(session, ctx, 403, None, &[]).await;
        };
        let mut resp = ResponseHeader::build(204, Some(9))?;
        resp.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)?;
        resp.insert_header(header::ACCESS_CONTROL_ALLOW_METHODS, cors.methods.clone())?;
        resp.insert_header(header::ACCESS_CONTROL_ALLOW_HEADERS, cors.headers.clone())?;
        resp.insert_header(header::ACCESS_CONTROL_MAX_AGE, cors.max_age.clone())?;
        if cors.credentials {
            resp.insert_header(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")?;
        }
        resp.insert_header(header::VARY, "Origin")?;
        resp.insert_header(header::CONTENT_LENGTH, "0")?;
        resp.insert_header(envelope::REQUEST_ID, ctx.request_id.clone())?;
        session.write_response_header(Box::new(resp), true).await?;
        Ok(true)
    }

    /// Plain HTTP when the listener only redirects: 308 to the same URL over https.
    async fn redirect_to_tls(&self, session: &mut Session, ctx: &Ctx, port: u16) -> Result<bool> {
        let req = session.req_header();
        let host = req
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(host_without_port)
            .filter(|h| !h.is_empty() && !h.contains(['/', '\\', '@']));
        let Some(host) = host else {
            return self
                .reject(session, ctx, 400, Some("missing host"), &[])
                .await;
        };
        let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let location = if port == 443 {
            format!("https://{host}{target}")
        } else {
            format!("https://{host}:{port}{target}")
        };
        let mut resp = ResponseHeader::build(308, Some(3))?;
        resp.insert_header(header::LOCATION, location)?;
        resp.insert_header(header::CONTENT_LENGTH, "0")?;
        resp.insert_header(envelope::REQUEST_ID, ctx.request_id.clone())?;
        session.write_response_header(Box::new(resp), true).await?;
        Ok(true)
    }

    /// Answers a refused caller: 401 with `WWW-Authenticate: Bearer`, or 403. The reason goes
    /// to the metrics and the debug log only.
    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        rejection: Rejection,
    ) -> Result<bool> {
        ctx.auth = rejection.label();
        let route = ctx.route.as_ref().map_or(UNMATCHED, |r| r.name.as_str());
        self.metrics
            .auth_rejections
            .with_label_values(&[route, rejection.label()])
            .inc();
        tracing::debug!(
            route,
            reason = rejection.label(),
            request_id = request_id::as_str(&ctx.request_id),
            "refused"
        );
        let status = rejection.status();
        if status == 401 {
            let challenge = [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))];
            self.reject(session, ctx, status, None, &challenge).await
        } else {
            self.reject(session, ctx, status, None, &[]).await
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

/// Who is calling, as the route's auth mode asks.
fn authenticate(
    state: &State,
    session: &Session,
    route: &Route,
) -> std::result::Result<Option<Arc<Identity>>, Rejection> {
    let req = session.req_header();
    match route.auth {
        Mode::Public => Ok(None),
        Mode::Jwt | Mode::JwtQuery => {
            // Every token the upstream could read is the one verified here: a `?token=`
            // beside the bearer header must be the same token, and on header-only routes a
            // `?token=` alone is refused.
            let header = auth::bearer(&req.headers)?;
            let query = auth::query_token(req.uri.query())?;
            let token = match (header, query.as_deref()) {
                (Some(h), Some(q)) if h != q => return Err(Rejection::Malformed),
                (Some(h), _) => h,
                (None, Some(q)) if route.auth == Mode::JwtQuery => q,
                (None, _) => return Err(Rejection::Missing),
            };
            verify(state, token).map(Some)
        }
        Mode::NodeKey => {
            let key = auth::bearer(&req.headers)?.ok_or(Rejection::Missing)?;
            match &route.node_keys {
                Some(keys) => keys.check(key)?,
                // Without a digest file the upstream verifies the key; the edge only insists
                // on its shape.
                None => node_key::well_formed(key)?,
            }
            Ok(None)
        }
    }
}

/// The client as the access log writes it: the address, or the unknown hop's text.
struct ClientText<'a>(&'a Client);

impl std::fmt::Display for ClientText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Client::Ip(ip) => ip.fmt(f),
            Client::Unknown(hop) => write!(f, "unknown:{hop}"),
        }
    }
}

/// `uri` with its path replaced by `path` (query, scheme and authority kept).
fn with_path(uri: &http::Uri, path: &str) -> Option<http::Uri> {
    let path_and_query = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

fn verify(state: &State, token: &str) -> std::result::Result<Arc<Identity>, Rejection> {
    match &state.jwt {
        Some(v) => v.verify(token),
        None => {
            // Config validation requires [jwt] for token routes; refuse rather than pass.
            tracing::error!("token route without a [jwt] verifier");
            Err(Rejection::BadSignature)
        }
    }
}

/// Reads a whole request body of at most `cap` bytes, kept in Pingora's retry buffer so it is
/// still sent upstream. Errors are the status to answer: 413, 408 or 400.
async fn read_body(
    session: &mut Session,
    cap: u64,
    timeout: Duration,
) -> std::result::Result<Bytes, u16> {
    session.enable_retry_buffering();
    let mut body = Vec::new();
    loop {
        match tokio::time::timeout(timeout, session.read_request_body()).await {
            Err(_) => return Err(408),
            Ok(Err(e)) if matches!(e.etype(), ErrorType::ReadTimedout) => return Err(408),
            Ok(Err(_)) => return Err(400),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => {
                if body.len() as u64 + chunk.len() as u64 > cap {
                    return Err(413);
                }
                body.extend_from_slice(&chunk);
            }
        }
    }
    if session.as_ref().retry_buffer_truncated() {
        return Err(413);
    }
    Ok(Bytes::from(body))
}

/// Response headers that belong to the edge's CORS answer, removed from upstream answers.
const CORS_RESPONSE_HEADERS: [HeaderName; 4] = [
    header::ACCESS_CONTROL_ALLOW_ORIGIN,
    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
    header::ACCESS_CONTROL_EXPOSE_HEADERS,
    header::ACCESS_CONTROL_ALLOW_METHODS,
];

/// Headers every answer gets at the edge: CORS for an allowed origin (and `Vary: Origin`
/// whenever CORS is on), HSTS over TLS.
fn edge_headers(ctx: &Ctx) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    if let Some(cors) = &ctx.state.cors {
        out.push((header::VARY, HeaderValue::from_static("Origin")));
        if let Some(origin) = &ctx.cors_origin {
            out.push((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone()));
            out.push((header::ACCESS_CONTROL_EXPOSE_HEADERS, cors.expose.clone()));
            if cors.credentials {
                out.push((
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                ));
            }
        }
    }
    if let (true, Some(hsts)) = (ctx.tls, &ctx.state.security.hsts) {
        out.push((header::STRICT_TRANSPORT_SECURITY, hsts.clone()));
    }
    out
}

/// The headers of a gateway-made envelope: `extra`, the edge headers and nosniff.
fn envelope_headers(
    ctx: &Ctx,
    extra: &[(HeaderName, HeaderValue)],
) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = extra.to_vec();
    headers.extend(edge_headers(ctx));
    if ctx.state.security.nosniff {
        headers.push((
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ));
    }
    headers
}

/// `example.com` from `example.com:8080`, `[::1]` from `[::1]:8080`.
fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.split(':').next().unwrap_or(host)
}

/// Headers the gateway adds upstream at most: request id, `X-Forwarded-For`, `-Proto`, `-Host`,
/// `X-Real-IP` and four identity headers.
const GATEWAY_HEADERS: usize = 9;

/// Headers the edge adds to an answer at most: request id, nosniff, `Vary`, three CORS headers
/// and HSTS (rate-limit headers are counted apart).
const EDGE_RESPONSE_HEADERS: usize = 7;

/// `src` without the headers `drop` says yes to, in a map with room for `extra` more. Copied
/// header by header into a map of the right size: cloning the map, growing it and removing
/// from it would rehash it and search it again.
fn copy_headers(
    src: &http::HeaderMap,
    extra: usize,
    drop: impl Fn(&HeaderName) -> bool,
) -> http::HeaderMap {
    let mut out = http::HeaderMap::with_capacity(src.len() + extra);
    for (name, value) in src {
        if !drop(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// `req` as plain `http` parts, its headers copied by [`copy_headers`].
fn request_parts(
    req: &RequestHeader,
    extra: usize,
    drop: impl Fn(&HeaderName) -> bool,
) -> http::request::Parts {
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = req.method.clone();
    parts.uri = req.uri.clone();
    parts.version = req.version;
    parts.extensions = req.extensions.clone();
    parts.headers = copy_headers(&req.headers, extra, drop);
    parts
}

/// `resp` as plain `http` parts, its headers copied by [`copy_headers`].
fn response_parts(
    resp: &ResponseHeader,
    extra: usize,
    drop: impl Fn(&HeaderName) -> bool,
) -> http::response::Parts {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = resp.status;
    parts.version = resp.version;
    parts.extensions = resp.extensions.clone();
    parts.headers = copy_headers(&resp.headers, extra, drop);
    parts
}

/// The socket peer's address.
fn peer_ip(session: &Session) -> Option<std::net::IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The status a failed request is answered with; 0 when the client is gone.
fn status_for(e: &Error) -> u16 {
    use ErrorType::*;
    let upstream = matches!(e.esource(), ErrorSource::Upstream);
    let downstream = matches!(e.esource(), ErrorSource::Downstream);
    match e.etype() {
        HTTPStatus(code) => *code,
        ConnectTimedout => 504,
        ReadTimedout | WriteTimedout if upstream => 504,
        ReadTimedout if downstream => 408,
        ConnectRefused | ConnectNoRoute | ConnectError | SocketError | BindError
        | ConnectProxyFailure | TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert
        | HandshakeError | TLSWantX509Lookup => 502,
        InvalidHTTPHeader | H1Error | H2Error | InvalidH2 | H2Downgrade if downstream => 400,
        // A request body that breaks its own chunked framing (Pingora's body reader).
        Custom("InvalidChunk" | "InvalidTrailerEnd") if !upstream => 400,
        _ if upstream => 502,
        ReadError | WriteError | ConnectionClosed | WriteTimedout if downstream => 0,
        _ => 500,
    }
}

/// The `kind` label for an upstream failure, `None` when the upstream is not at fault.
fn upstream_failure_kind(e: &Error) -> Option<&'static str> {
    use ErrorType::*;
    let kind = match e.etype() {
        // Our own answers (413, 503, bodyless upstream errors) are counted where they are made.
        HTTPStatus(_) => return None,
        ConnectTimedout => "connect_timeout",
        ConnectRefused => "connect_refused",
        ConnectNoRoute => "unreachable",
        ConnectError | SocketError | BindError | ConnectProxyFailure => "connect_error",
        TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert | HandshakeError
        | TLSWantX509Lookup => "tls",
        _ if !matches!(e.esource(), ErrorSource::Upstream) => return None,
        ReadTimedout => "read_timeout",
        WriteTimedout => "write_timeout",
        InvalidHTTPHeader | H1Error | H2Error | InvalidH2 | H2Downgrade => "protocol",
        ReadError | WriteError | ConnectionClosed => "reset",
        _ => "other",
    };
    Some(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_keep_the_request_drop_the_named_headers_and_make_room() {
        let mut req = RequestHeader::build("POST", b"/a/b?c=d", None).unwrap();
        req.append_header("X-One", "1").unwrap();
        req.append_header("X-Tenant-Id", "spoofed").unwrap();
        req.append_header("X-One", "2").unwrap();
        let drop = [HeaderName::from_static("x-tenant-id"), header::SERVER];
        let parts = request_parts(&req, GATEWAY_HEADERS, |n| drop.contains(n));
        assert_eq!(parts.method, http::Method::POST);
        assert_eq!(parts.uri, "/a/b?c=d");
        assert_eq!(parts.version, req.version);
        let ones: Vec<_> = parts.headers.get_all("x-one").iter().collect();
        assert_eq!(ones, ["1", "2"]);
        assert!(!parts.headers.contains_key("x-tenant-id"));
        assert_eq!(parts.headers.len(), 2);
        assert!(parts.headers.capacity() >= 2 + GATEWAY_HEADERS);
    }

    #[test]
    fn response_parts_keep_status_and_headers_but_the_named_ones() {
        let mut resp = ResponseHeader::build(599, None).unwrap();
        resp.set_reason_phrase(Some("Network Read Timeout"))
            .unwrap();
        resp.append_header("Server", "Apache/2.4 (internal)")
            .unwrap();
        resp.append_header("Set-Cookie", "a=1").unwrap();
        resp.append_header("Set-Cookie", "b=2").unwrap();
        let parts = response_parts(&resp, 2, |n| n == header::SERVER);
        assert_eq!(parts.status.as_u16(), 599);
        assert!(!parts.headers.contains_key(header::SERVER));
        let cookies: Vec<_> = parts.headers.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        let mut rebuilt = ResponseHeader::from(parts);
        rebuilt.set_reason_phrase(resp.get_reason_phrase()).unwrap();
        assert_eq!(rebuilt.get_reason_phrase(), Some("Network Read Timeout"));
    }
}
