//! The request's checks, in order, each a function that lets the request on or says how to
//! answer it: route, head size, body size, network gate, authentication, authorisation, rate
//! limits, login guard.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora::proxy::Session;
use pingora::ErrorType;
use smallvec::SmallVec;

use super::answer::Answer;
use super::forward::with_path;
use super::{Ctx, Gateway};
use crate::auth::{self, node_key, Identity, Mode, Rejection, Role};
use crate::config::LOGIN_BODY_CAP;
use crate::limits::lockout::{self, Guard, Refusal};
use crate::limits::ratelimit::{self, KeyKind, Policy};
use crate::path;
use crate::routes::{Match, Route};
use crate::state::State;
use crate::store::RateCheck;

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

impl Gateway {
    /// Every check a request must pass before it goes upstream, in order.
    pub(super) async fn admit(&self, session: &mut Session, ctx: &mut Ctx) -> Result<(), Answer> {
        let state = ctx.state.clone();
        let route = route(&state, session, ctx)?;
        body_size(session, &route)?;
        network_gate(&route, ctx)?;
        ctx.identity = authenticate(&state, session, &route).map_err(Answer::Refused)?;
        if route.auth != Mode::Public {
            ctx.auth = "ok";
        }
        authorize(session, &route, ctx.identity.as_deref()).map_err(Answer::Refused)?;
        self.rate_limits(&state, &route, ctx).await?;
        session.set_read_timeout(Some(state.client_body_timeout));
        if let Some(guard) = &route.login {
            self.login_guard(session, &state, &route, guard, ctx)
                .await?;
        }
        Ok(())
    }

    /// Every rate-limit policy of the route must allow the request; all of them are checked
    /// in one store operation (one Redis round trip), in order.
    async fn rate_limits(&self, state: &State, route: &Route, ctx: &mut Ctx) -> Result<(), Answer> {
        if route.rate_limits.is_empty() {
            return Ok(());
        }
        // On the stack for the usual few policies; one allocation per key, sized for it.
        let keyed: SmallVec<[(&Policy, String); 4]> = route
            .rate_limits
            .iter()
            .filter_map(|policy| Some((policy, rate_key(policy, ctx, state)?)))
            .collect();
        let checks: SmallVec<[RateCheck<'_>; 4]> = keyed
            .iter()
            .map(|(policy, key)| RateCheck {
                limit: &policy.limit,
                key,
            })
            .collect();
        let decisions = self.store.rate_check(&checks).await;
        for ((policy, _), decision) in keyed.iter().zip(&decisions) {
            // Built only when they go out: a refusal, or success with the headers switched on.
            let headers = || {
                [
                    (RATELIMIT_POLICY, ratelimit::policy_header(&policy.limit)),
                    (RATELIMIT, ratelimit::state_header(&policy.limit, decision)),
                ]
            };
            if !decision.allowed {
                self.metrics
                    .rate_limited
                    .with_label_values(&[route.name.as_str(), policy.limit.name.as_str()])
                    .inc();
                let secs = ratelimit::retry_after_secs(decision.retry_after);
                return Err(Answer::RateLimited(secs, Box::new(headers())));
            }
            if state.rate_headers_on_success {
                ctx.rate_headers.extend(headers());
            }
        }
        Ok(())
    }

    /// A strict login body, then a reserved guess or the lock (the route allows POST only).
    async fn login_guard(
        &self,
        session: &mut Session,
        state: &State,
        route: &Route,
        guard: &Guard,
        ctx: &mut Ctx,
    ) -> Result<(), Answer> {
        let cap = route.max_body_bytes.min(LOGIN_BODY_CAP);
        let body = read_body(session, cap, state.client_body_timeout).await?;
        let account = lockout::account(&body).ok_or(Answer::InvalidBody)?;
        match guard.reserve(self.store.as_ref(), &account).await {
            Ok(guess) => {
                ctx.login = Some(guess);
                Ok(())
            }
            Err(Refusal::Locked(left)) => Err(Answer::Locked(ratelimit::retry_after_secs(left))),
            Err(Refusal::Full) => Err(Answer::LockoutFull),
        }
    }
}

/// The route that owns the request's path, normalised as the upstream will route on it (that
/// path is also what goes upstream); and the head within its limits.
fn route(state: &State, session: &mut Session, ctx: &mut Ctx) -> Result<Arc<Route>, Answer> {
    let req = session.req_header();
    let path = path::normalise(req.uri.path()).map_err(|path::Invalid| Answer::BadPath)?;
    let found = state.routes.find(&req.method, &path);
    if let Match::Found(route) | Match::MethodNotAllowed(route, _) = &found {
        // Every answer from here on is counted under the route the path matched.
        ctx.route = Some(Arc::clone(route));
    }
    // HTTP/1 heads were judged whole on arrival; this is HTTP/2's check, and the one a reload
    // changes at once.
    let head_bytes = req.uri.path_and_query().map_or(0, |p| p.as_str().len())
        + req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head_bytes > state.max_header_bytes || req.headers.len() > state.max_headers {
        return Err(Answer::HeadTooLarge);
    }
    let route = match found {
        Match::Found(route) => route.clone(),
        Match::NotFound => return Err(Answer::NotFound),
        Match::MethodNotAllowed(_, allow) => {
            let allow = HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static(""));
            return Err(Answer::MethodNotAllowed(allow));
        }
    };
    if let Cow::Owned(normalised) = &path {
        let uri = with_path(&req.uri, normalised).ok_or(Answer::BadPath)?;
        session.req_header_mut().set_uri(uri);
    }
    // A tunnel carries what no check here saw: only where the route says so.
    if session.is_upgrade_req() && !route.websocket {
        return Err(Answer::UpgradeNotAllowed);
    }
    Ok(route)
}

/// An announced body over the cap is refused before any of it is read.
fn body_size(session: &Session, route: &Route) -> Result<(), Answer> {
    let announced = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match announced {
        Some(n) if n > route.max_body_bytes => Err(Answer::BodyTooLarge),
        _ => Ok(()),
    }
}

/// The route's source networks, when it has them.
fn network_gate(route: &Route, ctx: &Ctx) -> Result<(), Answer> {
    match &route.gate {
        Some(gate) if !ctx.client.ip().is_some_and(|ip| gate.allows(ip)) => {
            Err(Answer::Refused(Rejection::Network))
        }
        _ => Ok(()),
    }
}

/// Who is calling, as the route's auth mode asks.
fn authenticate(
    state: &State,
    session: &Session,
    route: &Route,
) -> Result<Option<Arc<Identity>>, Rejection> {
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

/// The verified caller's role and tenant reach: `min_role`, and `?tenant_id=` (in any
/// spelling) for platform admins only.
fn authorize(
    session: &Session,
    route: &Route,
    identity: Option<&Identity>,
) -> Result<(), Rejection> {
    let Some(identity) = identity else {
        return Ok(());
    };
    if route.min_role.is_some_and(|min| identity.role < min) {
        return Err(Rejection::InsufficientRole);
    }
    if identity.role != Role::PlatformAdmin
        && auth::asks_other_tenant(session.req_header().uri.query())
    {
        return Err(Rejection::TenantOverride);
    }
    Ok(())
}

/// Room for the usual key (an IPv6 prefix, a tenant and user pair) without growing.
const RATE_KEY_CAPACITY: usize = 48;

/// The key `policy` counts this request by; `None` for a user or tenant key without a verified
/// caller (config validation keeps those to token routes).
fn rate_key(policy: &Policy, ctx: &Ctx, state: &State) -> Option<String> {
    let mut buf = Vec::with_capacity(RATE_KEY_CAPACITY);
    match (policy.key, &ctx.identity) {
        (KeyKind::Ip, _) => ctx.client.write_rate_key(&mut buf, state.ip_prefixes),
        // A user is a subject within a tenant: `sub` alone would make one tenant's user 42
        // throttle another's. Length-prefixed, so no two pairs share a key.
        (KeyKind::User, Some(id)) => {
            let (tid, sub) = (id.tenant.as_bytes(), id.user.as_bytes());
            buf.extend_from_slice(itoa::Buffer::new().format(tid.len()).as_bytes());
            buf.push(b':');
            buf.extend_from_slice(tid);
            buf.push(b':');
            buf.extend_from_slice(sub);
        }
        (KeyKind::Tenant, Some(id)) => buf.extend_from_slice(id.tenant.as_bytes()),
        (_, None) => return None,
    }
    // UTF-8 already (an address, or claims that came as JSON strings): taken without a copy.
    Some(
        String::from_utf8(buf)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

fn verify(state: &State, token: &str) -> Result<Arc<Identity>, Rejection> {
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
/// still sent upstream.
async fn read_body(session: &mut Session, cap: u64, timeout: Duration) -> Result<Bytes, Answer> {
    session.enable_retry_buffering();
    // HTTP/1 reads time out in Pingora (`set_read_timeout`, set before the guard); its HTTP/2
    // streams have no read timeout, so theirs is a timer here.
    let h2 = session.is_http2();
    let mut body = Vec::new();
    loop {
        let read = session.read_request_body();
        let read = if h2 {
            match tokio::time::timeout(timeout, read).await {
                Ok(read) => read,
                Err(_) => return Err(Answer::BodyTimeout),
            }
        } else {
            read.await
        };
        match read {
            Err(e) if matches!(e.etype(), ErrorType::ReadTimedout) => {
                return Err(Answer::BodyTimeout)
            }
            Err(_) => return Err(Answer::InvalidBody),
            Ok(None) => break,
            Ok(Some(chunk)) => {
                if body.len() as u64 + chunk.len() as u64 > cap {
                    return Err(Answer::BodyTooLarge);
                }
                body.extend_from_slice(&chunk);
            }
        }
    }
    if session.as_ref().retry_buffer_truncated() {
        return Err(Answer::BodyTooLarge);
    }
    Ok(Bytes::from(body))
}
