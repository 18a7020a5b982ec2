//! The admin listener: `/metrics` (Prometheus text format), `/healthz`, `/readyz`.
//! It sits on its own port so none of it is reachable through the public listener.

use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::envelope;
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::store::shared::StoreHealth;

/// The admin HTTP app.
pub struct Admin {
    metrics: Arc<Metrics>,
    store: Arc<StoreHealth>,
    reloader: Arc<Reloader>,
}

impl Admin {
    /// An admin app exporting `metrics`, reporting `store` health on `/readyz` and reloading
    /// the configuration on `POST /-/reload`.
    pub fn new(metrics: Arc<Metrics>, store: Arc<StoreHealth>, reloader: Arc<Reloader>) -> Self {
        Admin {
            metrics,
            store,
            reloader,
        }
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
            // Degraded still serves: the in-process store stands in for Redis, so taking the
            // replica out of rotation would only make things worse.
            (true, "/readyz") if self.store.degraded() => reply(
                StatusCode::OK,
                envelope::CONTENT_TYPE,
                br#"{"status":"success","data":{"status":"degraded","store":"in-process fallback"}}"#
                    .to_vec(),
            ),
            (true, "/readyz") => reply(
                StatusCode::OK,
                envelope::CONTENT_TYPE,
                br#"{"status":"success","data":{"status":"ready"}}"#.to_vec(),
            ),
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
