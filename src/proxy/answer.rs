//! Every answer the gateway makes itself, decided in one place: [`Answer`] says its status,
//! message, headers, whether the connection stays open and how a login attempt is counted,
//! the way [`Rejection`] says a refused caller's label and status.

use http::header::{self, HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorSource, ErrorType, Result};

use super::{Ctx, Gateway, UNMATCHED};
use crate::auth::Rejection;
use crate::config::Cors;
use crate::envelope;
use crate::request_id;

/// An answer the gateway makes instead of the upstream.
#[derive(Debug)]
pub(super) enum Answer {
    /// The path cannot be routed safely (see [`crate::path`]).
    BadPath,
    /// No route serves the path.
    NotFound,
    /// The route that owns the path refuses the method: the `Allow` value.
    MethodNotAllowed(HeaderValue),
    /// The head is over `max_header_bytes` or `max_headers`.
    HeadTooLarge,
    /// A WebSocket upgrade on a route that carries no tunnel.
    UpgradeNotAllowed,
    /// The body, announced or read, is over the cap (the rest of it is not read).
    BodyTooLarge,
    /// The body stalled past `client_body_timeout_ms`.
    BodyTimeout,
    /// A login body that is not the one the API takes, or broken framing.
    InvalidBody,
    /// A caller refused by the token, key, network or role checks.
    Refused(Rejection),
    /// Over a rate limit: seconds to wait and the policy's `RateLimit-*` headers.
    RateLimited(u64, Box<[(HeaderName, HeaderValue); 2]>),
    /// The account or email is locked (or its guesses are all in flight): seconds to wait.
    Locked(u64),
    /// The lockout table is full and nothing can be evicted.
    LockoutFull,
    /// A plain request to redirect has no usable `Host`.
    MissingHost,
}

impl Answer {
    /// The status.
    pub(super) fn status(&self) -> u16 {
        match self {
            Answer::BadPath | Answer::UpgradeNotAllowed | Answer::InvalidBody => 400,
            Answer::MissingHost => 400,
            Answer::NotFound => 404,
            Answer::MethodNotAllowed(_) => 405,
            Answer::HeadTooLarge => 431,
            Answer::BodyTooLarge => 413,
            Answer::BodyTimeout => 408,
            Answer::Refused(rejection) => rejection.status(),
            Answer::RateLimited(..) | Answer::LockoutFull => 429,
            Answer::Locked(_) => 403,
        }
    }

    /// The envelope's message.
    pub(super) fn message(&self) -> &'static str {
        match self {
            Answer::BadPath => "invalid request path",
            Answer::UpgradeNotAllowed => "upgrade not allowed",
            Answer::MissingHost => "missing host",
            Answer::Locked(_) => "account temporarily locked",
            other => envelope::default_message(other.status()),
        }
    }

    /// Headers besides the envelope's own.
    pub(super) fn headers(self) -> Vec<(HeaderName, HeaderValue)> {
        match self {
            Answer::MethodNotAllowed(allow) => vec![(header::ALLOW, allow)],
            Answer::Refused(r) if r.status() == 401 => {
                vec![(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))]
            }
            Answer::RateLimited(secs, policy) => {
                let [policy, state] = *policy;
                vec![
                    (header::RETRY_AFTER, HeaderValue::from(secs)),
                    policy,
                    state,
                ]
            }
            Answer::Locked(secs) => vec![(header::RETRY_AFTER, HeaderValue::from(secs))],
            Answer::LockoutFull => vec![(header::RETRY_AFTER, HeaderValue::from(1u64))],
            _ => Vec::new(),
        }
    }

    /// Whether the connection may carry another request: not when part of this one (a body
    /// over the cap, a head over the limits) was left unread, nor after a refused upgrade (the
    /// client meant to leave HTTP on this connection).
    pub(super) fn keeps_alive(&self) -> bool {
        !matches!(
            self,
            Answer::BodyTooLarge | Answer::HeadTooLarge | Answer::UpgradeNotAllowed
        )
    }

    /// How this answer counts in `gateway_login_attempts_total` on a login route.
    pub(super) fn login_outcome(&self) -> Option<&'static str> {
        match self {
            Answer::BodyTooLarge | Answer::BodyTimeout | Answer::InvalidBody => {
                Some("invalid_body")
            }
            Answer::RateLimited(..) | Answer::LockoutFull => Some("throttled"),
            Answer::Locked(_) => Some("locked"),
            _ => None,
        }
    }
}

impl Gateway {
    /// Ends the request with `answer`: counted, logged where it says who was refused, written.
    pub(super) async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        answer: Answer,
    ) -> Result<bool> {
        let route = ctx.route.as_ref().map_or(UNMATCHED, |r| r.name.as_str());
        if let Answer::Refused(rejection) = &answer {
            ctx.auth = rejection.label();
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
        }
        if let (Some(outcome), true) = (
            answer.login_outcome(),
            ctx.route.as_ref().is_some_and(|r| r.login.is_some()),
        ) {
            self.count_login(outcome);
        }
        if !answer.keeps_alive() {
            session.set_keepalive(None);
        }
        let (status, message) = (answer.status(), answer.message());
        let headers = envelope_headers(ctx, &answer.headers());
        respond(session, status, message, &ctx.request_id, &headers).await?;
        Ok(true)
    }

    /// Answers a CORS preflight at the edge, before routing and authentication: 204 with the
    /// allowed methods and headers for an allowed origin, 403 without CORS headers otherwise.
    pub(super) async fn preflight(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        cors: &Cors,
    ) -> Result<bool> {
        let Some(origin) = ctx.cors_origin.clone() else {
            let headers = envelope_headers(ctx, &[]);
            respond(
                session,
                403,
                envelope::default_message(403),
                &ctx.request_id,
                &headers,
            )
            .await?;
            return Ok(true);
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
    pub(super) async fn redirect_to_tls(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        port: u16,
    ) -> Result<bool> {
        let req = session.req_header();
        let host = req
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(host_without_port)
            .filter(|h| !h.is_empty() && !h.contains(['/', '\\', '@']));
        let Some(host) = host else {
            return self.answer(session, ctx, Answer::MissingHost).await;
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
}

/// Writes a gateway-made error to the client: status, envelope body, `Content-Type`,
/// `Content-Length`, the request id and any `extra` headers (`Allow`, `Retry-After`, ...).
/// A HEAD request gets the same headers and no body.
pub(super) async fn respond(
    session: &mut Session,
    status: u16,
    message: &str,
    request_id: &HeaderValue,
    extra: &[(HeaderName, HeaderValue)],
) -> Result<()> {
    let body = envelope::body(message);
    let mut resp = ResponseHeader::build(status, Some(4 + extra.len()))?;
    resp.insert_header(header::CONTENT_TYPE, envelope::CONTENT_TYPE)?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    if !request_id.is_empty() {
        resp.insert_header(envelope::REQUEST_ID, request_id.clone())?;
    }
    for (name, value) in extra {
        resp.append_header(name.clone(), value.clone())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// Headers every answer gets at the edge: CORS for an allowed origin (and `Vary: Origin`
/// whenever CORS is on), HSTS over TLS.
pub(super) fn edge_headers(ctx: &Ctx) -> Vec<(HeaderName, HeaderValue)> {
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
pub(super) fn envelope_headers(
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

/// The status a failed request is answered with; 0 when the client is gone.
pub(super) fn status_for(e: &Error) -> u16 {
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
pub(super) fn upstream_failure_kind(e: &Error) -> Option<&'static str> {
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
