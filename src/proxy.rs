//! The request's way through the gateway, phase by phase, as Pingora calls them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};

use crate::auth::jwt::Verifier;
use crate::auth::{self, node_key, Identity, Mode, Rejection, Role};
use crate::config::{Config, IdentityHeaders};
use crate::envelope;
use crate::metrics::{self, Metrics};
use crate::request_id;
use crate::rewrite::{self, Plan, Rewrite};
use crate::routes::{Match, Route, RouteTable};
use crate::upstreams::Pool;

/// Label used for requests that matched no route.
const UNMATCHED: &str = "unmatched";

/// The gateway: routes, upstream pools, token checks and metrics, shared by every request.
pub struct Gateway {
    routes: RouteTable,
    pools: Vec<Arc<Pool>>,
    metrics: Arc<Metrics>,
    client_body_timeout: Duration,
    jwt: Option<Verifier>,
    identity_headers: IdentityHeaders,
}

impl Gateway {
    /// Assembles the gateway for `config` around its upstream pools.
    pub fn new(config: &Config, pools: Vec<Arc<Pool>>, metrics: Arc<Metrics>) -> Self {
        Gateway {
            routes: RouteTable::new(&config.routes),
            pools,
            metrics,
            client_body_timeout: config.server.client_body_timeout,
            jwt: config.jwt.as_ref().map(Verifier::new),
            identity_headers: config.identity_headers.clone(),
        }
    }

    fn pool(&self, route: &Route) -> Option<&Arc<Pool>> {
        self.pools.get(route.upstream)
    }
}

/// What one request carries from phase to phase.
pub struct Ctx {
    start: Instant,
    request_id: String,
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
    /// The verified caller, on token routes.
    identity: Option<Identity>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            request_id: String::new(),
            route: None,
            rewrite: None,
            empty_error: None,
            tries: 0,
            body_bytes: 0,
            identity: None,
        }
    }

    /// Request id, route, size cap, network gate, authentication, authorization: everything
    /// decided from the request head alone.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // 1. Request id: keep a sane one, otherwise make one.
        ctx.request_id = request_id::take_or_make(session.req_header());

        // 2. Route.
        let req = session.req_header();
        let route = match self.routes.find(&req.method, req.uri.path()) {
            Match::Found(route) => route.clone(),
            Match::NotFound => return self.reject(session, ctx, 404, None, &[]).await,
            Match::BadPath => {
                return self
                    .reject(session, ctx, 400, Some("invalid request path"), &[])
                    .await
            }
            Match::MethodNotAllowed(route, allow) => {
                // Labelled with the route whose path matched; no upstream is involved.
                ctx.route = Some(route.clone());
                let allow = HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static(""));
                return self
                    .reject(session, ctx, 405, None, &[(header::ALLOW, allow)])
                    .await;
            }
        };
        ctx.route = Some(route.clone());

        // 3. Size: refuse an announced oversized body before reading any of it.
        let announced = session
            .req_header()
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if announced.is_some_and(|n| n > route.max_body_bytes) {
            // The unread body must not be drained into the next request: close after answering.
            session.set_keepalive(None);
            return self.reject(session, ctx, 413, None, &[]).await;
        }
        // 4. Network gate.
        if let Some(gate) = &route.gate {
            if !client_ip(session).is_some_and(|ip| gate.allows(ip)) {
                return self.refuse(session, ctx, Rejection::Network).await;
            }
        }

        // 5. Authenticate.
        match self.authenticate(session, &route) {
            Ok(identity) => ctx.identity = identity,
            Err(rejection) => return self.refuse(session, ctx, rejection).await,
        }

        // 6. Authorize.
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

        session.set_read_timeout(Some(self.client_body_timeout));
        Ok(false)
    }

    /// Counts body bytes of requests that did not announce their length.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
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
        let Some(pool) = self.pool(route) else {
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
            .and_then(|r| self.pool(r))
            .map_or(1, |p| p.server_count);
        if ctx.tries < servers {
            if let Some(kind) = upstream_failure_kind(&e) {
                self.count_upstream_failure(ctx, kind);
            }
            e.set_retry(true);
        }
        e
    }

    /// Identity and tracing headers for the upstream.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        upstream_request.insert_header(envelope::REQUEST_ID, &ctx.request_id)?;
        if let Some(ip) = client_ip(session) {
            upstream_request.insert_header("x-forwarded-for", ip.to_string())?;
        }
        // Identity headers come from the gateway only: whatever the client sent goes, on every
        // route, before the verified values are set.
        let names = &self.identity_headers;
        for name in names.all() {
            upstream_request.remove_header(name);
        }
        if let Some(id) = &ctx.identity {
            upstream_request.insert_header(names.tenant.clone(), id.tenant.clone())?;
            upstream_request.insert_header(names.user.clone(), id.user.clone())?;
            upstream_request.insert_header(names.role.clone(), id.role.as_str())?;
            if let Some(email) = &id.email {
                upstream_request.insert_header(names.email.clone(), email.clone())?;
            }
        }
        upstream_request.insert_header("x-forwarded-proto", "http")?;
        Ok(())
    }

    /// Status >= 400 from the upstream: decide the rewrite while the framing can still change.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
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
        upstream_response.insert_header(envelope::REQUEST_ID, &ctx.request_id)?;
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
            let message = envelope::default_message(code);
            let extra = ctx.empty_error.as_deref().unwrap_or_default();
            if let Err(write_err) =
                envelope::respond(session, code, message, &ctx.request_id, extra).await
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
        let route = ctx.route.as_ref().map_or(UNMATCHED, |r| r.name.as_str());
        let method = metrics::method_label(&session.req_header().method);
        let status_label = metrics::status_label(status);
        self.metrics
            .requests
            .with_label_values(&[route, method, &status_label])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[route])
            .observe(ctx.start.elapsed().as_secs_f64());
        let rewritten = ctx.empty_error.is_some()
            || ctx.rewrite.as_ref().is_some_and(Rewrite::violated_contract);
        if rewritten {
            self.metrics
                .errors_rewritten
                .with_label_values(&[route, &status_label])
                .inc();
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
        envelope::respond(session, status, message, &ctx.request_id, extra).await?;
        Ok(true)
    }

    /// Who is calling, as the route's auth mode asks.
    fn authenticate(
        &self,
        session: &Session,
        route: &Route,
    ) -> Result<Option<Identity>, Rejection> {
        let req = session.req_header();
        match route.auth {
            Mode::Public => Ok(None),
            Mode::Jwt => {
                let token = auth::bearer(&req.headers)?.ok_or(Rejection::Missing)?;
                self.verify(token).map(Some)
            }
            Mode::JwtQuery => match auth::bearer(&req.headers)? {
                Some(token) => self.verify(token).map(Some),
                None => {
                    let token = auth::query_token(req.uri.query())?.ok_or(Rejection::Missing)?;
                    self.verify(&token).map(Some)
                }
            },
            Mode::NodeKey => {
                let key = auth::bearer(&req.headers)?.ok_or(Rejection::Missing)?;
                match &route.node_keys {
                    Some(keys) => keys.check(key)?,
                    // Without a digest file the upstream verifies the key; the edge only
                    // insists on its shape.
                    None => node_key::well_formed(key)?,
                }
                Ok(None)
            }
        }
    }

    fn verify(&self, token: &str) -> Result<Identity, Rejection> {
        match &self.jwt {
            Some(v) => v.verify(token),
            None => {
                // Config validation requires [jwt] for token routes; refuse rather than pass.
                tracing::error!("token route without a [jwt] verifier");
                Err(Rejection::BadSignature)
            }
        }
    }

    /// Answers a refused caller: 401 with `WWW-Authenticate: Bearer`, or 403. The reason goes
    /// to the metrics and the debug log only.
    async fn refuse(&self, session: &mut Session, ctx: &Ctx, rejection: Rejection) -> Result<bool> {
        let route = ctx.route.as_ref().map_or(UNMATCHED, |r| r.name.as_str());
        self.metrics
            .auth_rejections
            .with_label_values(&[route, rejection.label()])
            .inc();
        tracing::debug!(route, reason = rejection.label(), request_id = %ctx.request_id, "refused");
        let status = rejection.status();
        if status == 401 {
            let challenge = [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))];
            self.reject(session, ctx, status, None, &challenge).await
        } else {
            self.reject(session, ctx, status, None, &[]).await
        }
    }

    fn count_upstream_failure(&self, ctx: &Ctx, kind: &str) {
        let Some(route) = ctx.route.as_ref() else {
            return;
        };
        let upstream = self.pool(route).map_or("", |p| p.name.as_str());
        self.metrics
            .upstream_failures
            .with_label_values(&[route.name.as_str(), upstream, kind])
            .inc();
    }
}

/// The socket peer's address.
fn client_ip(session: &Session) -> Option<std::net::IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

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
