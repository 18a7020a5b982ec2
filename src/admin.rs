//! The admin listener. Open to whoever reaches its port: `GET /metrics` (Prometheus text
//! format), `/healthz`, `/readyz`, `/-/upstreams` (each server's health and ejection) and
//! `/-/log-level`. For callers presenting `[server] admin_token` as a bearer token (all off
//! without one): `POST /-/reload`, `PUT /-/log-level` and `GET /-/config` (the settings in
//! force, redacted: it names internal addresses and limits an attacker would like to know). It
//! sits on its own port so none of it is reachable through the public listener.

use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::config::Secret;
use crate::envelope;
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::state::State;
use crate::store::shared::StoreHealth;
use arc_swap::ArcSwap;

/// The admin HTTP app.
pub struct Admin {
    metrics: Arc<Metrics>,
    store: Arc<StoreHealth>,
    state: Arc<ArcSwap<State>>,
    reloader: Arc<Reloader>,
    token: Option<Secret>,
}

impl Admin {
    /// An admin app exporting `metrics`, reporting `store` health on `/readyz` and reloading
    /// the configuration on `POST /-/reload` for callers that present `token`.
    pub fn new(
        metrics: Arc<Metrics>,
        store: Arc<StoreHealth>,
        state: Arc<ArcSwap<State>>,
        reloader: Arc<Reloader>,
        token: Option<Secret>,
    ) -> Self {
        Admin {
            metrics,
            store,
            state,
            reloader,
            token,
        }
    }

    /// Whether the request carries the admin token: `Authorization: Bearer <token>`,
    /// compared in constant time.
    fn authorised(&self, session: &ServerSession) -> bool {
        let Some(Secret(token)) = &self.token else {
            return false;
        };
        match crate::auth::bearer(&session.req_header().headers) {
            Ok(Some(given)) => {
                use subtle::ConstantTimeEq;
                bool::from(given.as_bytes().ct_eq(token))
            }
            _ => false,
        }
    }
}

impl Admin {
    /// `/readyz`: 200 while serving, 503 only until every upstream given by name has resolved
    /// once (before that the gateway has nowhere to send it). Degraded still serves: the
    /// in-process store stands in for Redis, so taking the replica out of rotation would only
    /// make things worse. With Redis, what the last probe saw of it; each upstream's servers.
    fn readiness(&self) -> (StatusCode, Vec<u8>) {
        let state = self.state.load();
        let mut unresolved = Vec::new();
        let upstreams: Vec<serde_json::Value> = state
            .pools
            .iter()
            .map(|pool| {
                let mut u = serde_json::json!({
                    "name": pool.name,
                    "servers": pool.server_count_now(),
                    "in_rotation": pool.healthy_servers(),
                });
                if let Some(names) = pool.names() {
                    if !names.known() {
                        unresolved.push(pool.name.clone());
                    }
                    u["dns"] = if names.failing() {
                        "failing: last good addresses in use"
                    } else {
                        "ok"
                    }
                    .into();
                }
                u
            })
            .collect();
        if !unresolved.is_empty() {
            let message = format!("upstream names not resolved yet: {}", unresolved.join(", "));
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                envelope::body(&message).to_vec(),
            );
        }
        let mut data = serde_json::json!({
            "status": if self.store.degraded() { "degraded" } else { "ready" },
            "upstreams": upstreams,
        });
        if let Some((seen, kind)) = self.store.seen() {
            data["store"] = serde_json::json!({
                "kind": kind,
                "in_use": if self.store.degraded() { "in-process fallback" } else { "redis" },
                "masters": seen.masters,
                "replicas": seen.replicas,
                "master": seen.master,
            });
        } else if self.store.degraded() {
            data["store"] = serde_json::json!({ "in_use": "in-process fallback" });
        }
        let body = serde_json::to_vec(&serde_json::json!({ "status": "success", "data": data }))
            .unwrap_or_default();
        (StatusCode::OK, body)
    }
}

impl Admin {
    /// `None` when the caller presents the admin token, else the refusal: 403 when there is
    /// no token to present (`what` is off), 401 when the one given is not it.
    fn refusal(&self, session: &ServerSession, what: &str) -> Option<Response<Vec<u8>>> {
        if self.token.is_none() {
            let message = format!("{what} is off: set server.admin_token");
            return Some(envelope_reply(StatusCode::FORBIDDEN, &message));
        }
        if self.authorised(session) {
            return None;
        }
        let mut resp = reply(
            StatusCode::UNAUTHORIZED,
            envelope::CONTENT_TYPE,
            envelope::default_body(401).to_vec(),
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        Some(resp)
    }

    async fn reload(&self) -> Response<Vec<u8>> {
        let reloader = self.reloader.clone();
        // Reading files and secrets blocks; keep it off the async workers.
        match tokio::task::spawn_blocking(move || reloader.reload()).await {
            Ok(Ok(())) => success(serde_json::json!({ "reloaded": true })),
            Ok(Err(e)) => envelope_reply(StatusCode::UNPROCESSABLE_ENTITY, &e),
            Err(_) => envelope_reply(StatusCode::INTERNAL_SERVER_ERROR, "reload failed"),
        }
    }

    /// `PUT /-/log-level` with `{"level": "<EnvFilter directive>"}`.
    async fn set_log_level(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let body = match read_body(session, 4096).await {
            Ok(body) => body,
            Err(refusal) => return refusal,
        };
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Wanted {
            level: String,
        }
        let wanted: Wanted = match serde_json::from_slice(&body) {
            Ok(w) => w,
            Err(e) => {
                let message = format!("body must be {{\"level\": \"<filter>\"}}: {e}");
                return envelope_reply(StatusCode::BAD_REQUEST, &message);
            }
        };
        match crate::log_level::set(&wanted.level) {
            Ok(level) => {
                tracing::warn!(%level, "log level changed over the admin port");
                success(serde_json::json!({ "level": level }))
            }
            Err(e) => envelope_reply(StatusCode::BAD_REQUEST, &format!("level: {e}")),
        }
    }

    /// `GET /-/upstreams`: every upstream's servers as the balancer sees them now.
    fn upstreams(&self) -> Response<Vec<u8>> {
        let state = self.state.load();
        let upstreams: Vec<serde_json::Value> = state
            .pools
            .iter()
            .map(|pool| {
                let servers: Vec<serde_json::Value> = pool
                    .servers()
                    .into_iter()
                    .map(|(addr, healthy, ejected)| {
                        serde_json::json!({
                            "address": addr.to_string(),
                            "healthy": healthy,
                            "ejected_for_seconds": ejected.map(|d| d.as_secs_f64()),
                            "in_rotation": healthy && ejected.is_none(),
                        })
                    })
                    .collect();
                serde_json::json!({ "name": pool.name, "servers": servers })
            })
            .collect();
        success(serde_json::json!({ "upstreams": upstreams }))
    }

    /// `GET /-/config`: the file in force and its settings with every default, redacted.
    fn config(&self) -> Response<Vec<u8>> {
        let state = self.state.load();
        let (path, effective) = &state.source;
        success(serde_json::json!({
            "file": path.display().to_string(),
            "config": effective.as_ref(),
        }))
    }
}

/// The admin paths and the methods each takes, for 405's `Allow`.
const PATHS: &[(&str, &str)] = &[
    ("/metrics", "GET, HEAD"),
    ("/healthz", "GET, HEAD"),
    ("/readyz", "GET, HEAD"),
    ("/-/upstreams", "GET, HEAD"),
    ("/-/config", "GET, HEAD"),
    ("/-/log-level", "GET, HEAD, PUT"),
    ("/-/reload", "POST"),
];

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        use http::Method;
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let read = method == Method::GET || method == Method::HEAD;
        match (read, method, path.as_str()) {
            (true, _, "/metrics") => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(),
            ),
            (true, _, "/healthz") => reply(
                StatusCode::OK,
                envelope::CONTENT_TYPE,
                br#"{"status":"success","data":{"status":"ok"}}"#.to_vec(),
            ),
            (true, _, "/readyz") => {
                let (status, body) = self.readiness();
                reply(status, envelope::CONTENT_TYPE, body)
            }
            (true, _, "/-/upstreams") => self.upstreams(),
            (true, _, "/-/log-level") => match crate::log_level::current() {
                Some(level) => success(serde_json::json!({ "level": level })),
                None => envelope_reply(StatusCode::NOT_FOUND, "no changeable log level here"),
            },
            (true, _, "/-/config") => match self.refusal(session, "the config dump") {
                Some(refusal) => refusal,
                None => self.config(),
            },
            (_, Method::POST, "/-/reload") => match self.refusal(session, "reload over http") {
                Some(refusal) => refusal,
                None => self.reload().await,
            },
            (_, Method::PUT, "/-/log-level") => {
                match self.refusal(session, "changing the log level") {
                    Some(refusal) => refusal,
                    None => self.set_log_level(session).await,
                }
            }
            _ => match PATHS.iter().find(|(p, _)| *p == path) {
                Some((_, allow)) => {
                    let mut resp = reply(
                        StatusCode::METHOD_NOT_ALLOWED,
                        envelope::CONTENT_TYPE,
                        envelope::default_body(405).to_vec(),
                    );
                    resp.headers_mut()
                        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
                    resp
                }
                None => reply(
                    StatusCode::NOT_FOUND,
                    envelope::CONTENT_TYPE,
                    envelope::default_body(404).to_vec(),
                ),
            },
        }
    }
}

/// The request body, at most `limit` bytes (else the 413 to send).
async fn read_body(
    session: &mut ServerSession,
    limit: usize,
) -> Result<Vec<u8>, Response<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    let message = format!("body larger than {limit} bytes");
                    return Err(envelope_reply(StatusCode::PAYLOAD_TOO_LARGE, &message));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(_) => {
                return Err(envelope_reply(
                    StatusCode::BAD_REQUEST,
                    "the request body could not be read",
                ))
            }
        }
    }
}

/// `{"status":"success","data":data}`.
fn success(data: serde_json::Value) -> Response<Vec<u8>> {
    let body = serde_json::to_vec(&serde_json::json!({ "status": "success", "data": data }))
        .unwrap_or_default();
    reply(StatusCode::OK, envelope::CONTENT_TYPE, body)
}

/// An error envelope with `message`.
fn envelope_reply(status: StatusCode, message: &str) -> Response<Vec<u8>> {
    reply(
        status,
        envelope::CONTENT_TYPE,
        envelope::body(message).to_vec(),
    )
}

/// A complete response with an exact Content-Length.
pub(crate) fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let len = resp.body().len();
    let h = resp.headers_mut();
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    resp
}
