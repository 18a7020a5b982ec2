//! The request's OpenTelemetry span as the proxy carries it: its context handed upstream, and
//! what became of the request recorded when it ends (started in `request_filter`).

use std::time::SystemTime;

use http::header::HeaderName;
use opentelemetry::KeyValue;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::Result;

use super::{Ctx, Gateway};
use crate::request_id;
use crate::trace::Span;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Makes the gateway's span the upstream's parent: the client's own context goes no further.
pub(super) fn propagate(span: &Span, upstream_request: &mut RequestHeader) -> Result<()> {
    upstream_request.insert_header(TRACEPARENT, span.traceparent())?;
    match span.tracestate() {
        Some(state) => upstream_request.insert_header(TRACESTATE, state)?,
        None => {
            upstream_request.remove_header(&TRACESTATE);
        }
    }
    Ok(())
}

impl Gateway {
    /// Ends the request's span with what became of it (OpenTelemetry HTTP semantic
    /// conventions, and the gateway's own decisions under `gateway.*`).
    pub(super) fn end_span(
        &self,
        span: Span,
        session: &Session,
        ctx: &Ctx,
        route: &str,
        status: u16,
        rewritten: bool,
    ) {
        if !span.recording() {
            span.end(Vec::new(), None, SystemTime::now());
            return;
        }
        let req = session.req_header();
        let upstream = self.pool(ctx).map(|p| p.name.clone()).unwrap_or_default();
        let rate_limit = match ctx.route.as_ref() {
            Some(r) if !r.rate_limits.is_empty() => {
                if status == 429 {
                    "refused"
                } else {
                    "allowed"
                }
            }
            _ => "none",
        };
        let mut attributes = vec![
            KeyValue::new("http.request.method", req.method.to_string()),
            KeyValue::new("http.route", route.to_string()),
            KeyValue::new("url.path", req.uri.path().to_string()),
            KeyValue::new("http.response.status_code", i64::from(status)),
            KeyValue::new("client.address", ctx.client.to_string()),
            KeyValue::new(
                "gateway.request_id",
                request_id::as_str(&ctx.request_id).to_string(),
            ),
            KeyValue::new("gateway.auth", ctx.auth),
            KeyValue::new("gateway.rate_limit", rate_limit),
            KeyValue::new("gateway.rewritten", rewritten),
            KeyValue::new("gateway.retries", ctx.tries.saturating_sub(1) as i64),
        ];
        if !upstream.is_empty() {
            attributes.push(KeyValue::new("gateway.upstream", upstream));
        }
        if let Some(server) = ctx.server {
            attributes.push(KeyValue::new("server.address", server.ip().to_string()));
            attributes.push(KeyValue::new("server.port", i64::from(server.port())));
        }
        if let Some(upstream_status) = ctx.upstream_status {
            attributes.push(KeyValue::new(
                "gateway.upstream_status_code",
                i64::from(upstream_status),
            ));
        }
        let failed = (status >= 500 || status == 0).then(|| format!("answered {status}"));
        span.end(attributes, failed, SystemTime::now());
    }
}
