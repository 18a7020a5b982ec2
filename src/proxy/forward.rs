//! What crosses the gateway: the request head as the upstream gets it and the answer head as
//! the client gets it, each rebuilt once.
//!
//! Upstream frameworks believe some request headers without asking who set them: the identity
//! headers, `X-Forwarded-Host` (password-reset links), `X-Real-IP` and friends (real-IP
//! middlewares), `X-Original-URL` (routing, in IIS and Symfony) and the method-override
//! headers (Express, Rails, Laravel). And CGI/WSGI-style servers read `X_Tenant_Id` as
//! `X-Tenant-Id`, because both become `HTTP_X_TENANT_ID`. So the gateway drops
//! ([`crate::scrub::Scrub`]):
//!
//! - always: the identity headers, `X-Original-URL`, `X-Rewrite-URL` and the method overrides;
//! - from a peer that is not a trusted proxy: `Forwarded`, `X-Forwarded-Host`,
//!   `X-Forwarded-Port`, `X-Forwarded-Prefix` and the real-IP family (`X-Real-IP`,
//!   `True-Client-IP`, `X-Client-IP`, `CF-Connecting-IP`, `Fastly-Client-IP`,
//!   `X-Cluster-Client-IP`);
//! - always: any header with an `_` that reads as one of those, or as a header the gateway
//!   sets itself (`X-Request-Id`, `X-Forwarded-For`, `X-Forwarded-Proto`), once `_` is `-`.
//!
//! Then it sets `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Real-IP` (the client it
//! determined) and, unless a trusted proxy sent one, `X-Forwarded-Host` (the request's host).

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora::Result;

use super::answer::edge_headers;
use super::{peer_ip, Ctx};
use crate::client_ip::{self, Client};
use crate::envelope;
use crate::rewrite;
use crate::scrub::{X_FORWARDED_HOST, X_REAL_IP};

/// Response headers that belong to the edge's CORS answer, removed from upstream answers.
pub(super) const CORS_RESPONSE_HEADERS: [HeaderName; 4] = [
    header::ACCESS_CONTROL_ALLOW_ORIGIN,
    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
    header::ACCESS_CONTROL_EXPOSE_HEADERS,
    header::ACCESS_CONTROL_ALLOW_METHODS,
];

/// Headers the gateway adds upstream at most: request id, `X-Forwarded-For`, `-Proto`, `-Host`,
/// `X-Real-IP` and four identity headers.
const GATEWAY_HEADERS: usize = 9;

/// Headers the edge adds to an answer at most: request id, nosniff, `Vary`, three CORS headers,
/// HSTS and an envelope's two body headers (rate-limit headers are counted apart).
const EDGE_RESPONSE_HEADERS: usize = 9;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The request as the upstream gets it: client headers it must not believe dropped (see the
/// module docs), the request id, forwarding and identity headers set by the gateway.
pub(super) fn upstream_request(
    session: &Session,
    upstream_request: &mut RequestHeader,
    ctx: &Ctx,
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
    // From a peer that is not a trusted proxy the chain is the client's address alone, which
    // is also X-Real-IP's value: written once.
    let mut real_ip = None;
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
            if !trusted && ctx.client.ip() == Some(peer) {
                real_ip = Some(chain.clone());
            }
            headers.insert(X_FORWARDED_FOR, chain);
        }
    }
    if let Client::Ip(ip) = ctx.client {
        let value = real_ip.or_else(|| {
            let mut text = Vec::with_capacity(16);
            client_ip::write_ip(&mut text, ip);
            HeaderValue::from_maybe_shared(Bytes::from(text)).ok()
        });
        if let Some(value) = value {
            headers.insert(X_REAL_IP, value);
        }
    }
    // From an untrusted peer it was dropped above: no lookup needed.
    if !trusted || !headers.contains_key(X_FORWARDED_HOST) {
        let host = headers.get(header::HOST).cloned().or_else(|| {
            let authority = upstream_request.uri.authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        if let Some(host) = host {
            headers.insert(X_FORWARDED_HOST, host);
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

/// The upstream's answer as the client gets it: its status, reason and headers, less the ones
/// the edge owns, plus the request id, rate-limit and edge headers; a rewritten error's body
/// headers are the envelope's.
pub(super) fn client_response(upstream_response: &mut ResponseHeader, ctx: &Ctx) -> Result<()> {
    // Rebuilt once without the upstream's internal headers (and its CORS ones: CORS is the
    // edge's alone), as the upstream request is: Pingora's inserts and removals each cost
    // two map operations, a name parse and allocations. Header names reach the client in
    // canonical case; the status and reason phrase are the upstream's.
    let security = &ctx.state.security.remove_response_headers;
    let cors = ctx.state.cors.is_some();
    let rewrite = ctx.rewrite.as_ref();
    let extra = EDGE_RESPONSE_HEADERS + ctx.rate_headers.len();
    let mut parts = response_parts(upstream_response, extra, |n| {
        security.contains(n)
            || (cors && CORS_RESPONSE_HEADERS.contains(n))
            || (rewrite.is_some() && rewrite::is_body_header(n))
    });
    let headers = &mut parts.headers;
    if let Some(rw) = rewrite {
        for (name, value) in rw.body_headers() {
            headers.insert(name, value);
        }
    }
    headers.insert(envelope::REQUEST_ID_HEADER, ctx.request_id.clone());
    for (name, value) in &ctx.rate_headers {
        headers.append(name.clone(), value.clone());
    }
    for (name, value) in edge_headers(ctx) {
        headers.append(name, value);
    }
    if rewrite.is_some() && ctx.state.security.nosniff {
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
    }
    let mut rebuilt = ResponseHeader::from(parts);
    rebuilt.set_reason_phrase(upstream_response.get_reason_phrase())?;
    *upstream_response = rebuilt;
    Ok(())
}

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

/// `uri` with its path replaced by `path` (query, scheme and authority kept).
pub(super) fn with_path(uri: &http::Uri, path: &str) -> Option<http::Uri> {
    let path_and_query = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    http::Uri::from_parts(parts).ok()
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
