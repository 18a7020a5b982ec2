//! The admin listener: `/metrics` (Prometheus text format), `/healthz`, `/readyz`, and
//! `POST /-/reload` for callers that present `[server] admin_token` as a bearer token (off
//! without one). It sits on its own port so none of it is reachable through the public
//! listener; reads are open to whoever reaches the port, changes need the credential.

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

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let get = matches!(
            session.req_header().method,
            http::Method::GET | http::Method::HEAD
        );
        let post = session.req_header().method == http::Method::POST;
        if post && session.req_header().uri.path() == "/-/reload" {
            if self.token.is_none() {
                // Off: SIGHUP still reloads.
                return reply(
                    StatusCode::FORBIDDEN,
                    envelope::CONTENT_TYPE,
                    envelope::body("reload over http is off: set server.admin_token").to_vec(),
                );
            }
            if !self.authorised(session) {
                let mut resp = reply(
                    StatusCode::UNAUTHORIZED,
                    envelope::CONTENT_TYPE,
                    envelope::default_body(401).to_vec(),
                );
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                return resp;
            }
            let reloader = self.reloader.clone();
            // Reading files and secrets blocks; keep it off the async workers.
            return match tokio::task::spawn_blocking(move || reloader.reload()).await {
                Ok(Ok(())) => reply(
                    StatusCode::OK,
                    envelope::CONTENT_TYPE,
                    br#"{"status":"success","data":{"reloaded":true}}"#.to_vec(),
                ),
                Ok(Err(e)) => reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    envelope::CONTENT_TYPE,
                    envelope::body(&e).to_vec(),
                ),
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    envelope::CONTENT_TYPE,
                    envelope::default_body(500).to_vec(),
                ),
            };
        }
        match (get, session.req_header().uri.path()) {
            (true, "/metrics") => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(),
            ),
            (true, "/healthz") => reply(
                StatusCode::OK,
                envelope::CONTENT_TYPE,
                br#"{"status":"success","data":{"status":"ok"}}"#.to_vec(),
            ),
            (true, "/readyz") => {
                let (status, body) = self.readiness();
                reply(status, envelope::CONTENT_TYPE, body)
            }
            (false, "/metrics" | "/healthz" | "/readyz") => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                envelope::CONTENT_TYPE,
                envelope::default_body(405).to_vec(),
            ),
            _ => reply(
                StatusCode::NOT_FOUND,
                envelope::CONTENT_TYPE,
                envelope::default_body(404).to_vec(),
            ),
        }
    }
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
