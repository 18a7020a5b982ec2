//! A small stand-in of the Get2Dial control plane for the demo: it answers the way the real API
//! and its Go router do, including the ways that break the error contract, so the gateway in
//! front of it has something to fix.

use std::time::Duration;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::admin::reply;

/// Demo login that succeeds.
pub const DEMO_EMAIL: &str = "demo@get2dial.com";
/// Its password.
pub const DEMO_PASSWORD: &str = "demo-password";

/// The stand-in app. It signs login tokens with the gateway's first JWT secret, so the tokens it
/// hands out pass the gateway's checks.
pub struct StandIn {
    secret: Vec<u8>,
    issuer: String,
    audience: String,
}

impl StandIn {
    /// A stand-in signing tokens with `settings`' first secret.
    pub fn new(settings: &crate::auth::jwt::Profile) -> StandIn {
        StandIn {
            secret: settings.secrets.first().cloned().unwrap_or_default(),
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
        }
    }

    fn token(&self) -> Option<String> {
        let exp = jsonwebtoken::get_current_timestamp() + 12 * 3600;
        let claims = serde_json::json!({
            "tid": "tenant-demo", "sub": "user-demo", "email": DEMO_EMAIL, "role": "admin",
            "iss": self.issuer, "aud": self.audience, "exp": exp,
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&self.secret),
        )
        .ok()
    }
}

const JSON: &str = "application/json";

#[async_trait]
impl ServeHttp for StandIn {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        let body = read_body(session).await;
        match (method.as_str(), path.as_str()) {
            ("POST", "/api/v1/auth/login") => self.login(&body),
            ("GET", "/api/v1/auth/me") => {
                // The gateway verified the token and says who called.
                let h = &session.req_header().headers;
                let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default();
                let me = serde_json::json!({
                    "id": get("x-user-id"), "tenant_id": get("x-tenant-id"),
                    "role": get("x-user-role"), "email": get("x-user-email"),
                });
                reply(StatusCode::OK, JSON, success(&me))
            }
            ("GET", "/api/v1/calls") => reply(
                StatusCode::OK,
                JSON,
                br#"{"status":"success","data":[{"id":"c-1"},{"id":"c-2"}],"total":2,"limit":50,"offset":0}"#.to_vec(),
            ),
            ("GET", "/api/v1/demo/html-500") => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/html",
                b"<html><body><h1>500</h1><pre>panic: runtime error: index out of range\ngoroutine 1 [running]:\nmain.handler(0xc000010000)\n\t/srv/control/internal/api/calls.go:42</pre></body></html>".to_vec(),
            ),
            ("GET", "/api/v1/demo/sql-error") => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "application/json",
                br#"{"error":"pq: relation \"calls\" does not exist","host":"db-primary.internal:5432"}"#.to_vec(),
            ),
            ("GET", "/api/v1/demo/foreign-json") => reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                JSON,
                br#"{"error":"phone number must be E.164","code":"invalid_phone"}"#.to_vec(),
            ),
            ("GET", "/api/v1/demo/empty-409") => reply(StatusCode::CONFLICT, JSON, Vec::new()),
            ("GET", "/api/v1/demo/slow") => {
                tokio::time::sleep(Duration::from_secs(10)).await;
                reply(StatusCode::OK, JSON, br#"{"status":"success"}"#.to_vec())
            }
            // The Go standard library mux answers unknown paths in plain text.
            _ => reply(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", b"404 page not found\n".to_vec()),
        }
    }
}

impl StandIn {
    fn login(&self, body: &[u8]) -> Response<Vec<u8>> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Login {
            email: String,
            password: String,
            #[allow(dead_code)]
            tenant_domain: Option<String>,
        }
        match serde_json::from_slice::<Login>(body) {
            Err(_) => envelope_reply(StatusCode::BAD_REQUEST, "invalid request body"),
            Ok(l)
                if l.email.trim().eq_ignore_ascii_case(DEMO_EMAIL)
                    && l.password == DEMO_PASSWORD =>
            {
                let Some(token) = self.token() else {
                    return envelope_reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal server error",
                    );
                };
                let data = serde_json::json!({
                    "token": token, "expires_at": "in 12 hours",
                    "user": {"id": "user-demo", "email": DEMO_EMAIL, "role": "admin"},
                });
                reply(StatusCode::OK, JSON, success(&data))
            }
            Ok(_) => envelope_reply(StatusCode::UNAUTHORIZED, "invalid credentials"),
        }
    }
}

/// `{"status":"success","data":...}` with `status` first, as the API writes it.
fn success(data: &serde_json::Value) -> Vec<u8> {
    format!(r#"{{"status":"success","data":{data}}}"#).into_bytes()
}

fn envelope_reply(status: StatusCode, message: &str) -> Response<Vec<u8>> {
    reply(status, JSON, crate::envelope::body(message).to_vec())
}

/// Reads the request body, up to 1 MiB.
async fn read_body(session: &mut ServerSession) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = session.read_request_body().await {
        if body.len() + chunk.len() > 1 << 20 {
            break;
        }
        body.extend_from_slice(&chunk);
    }
    body
}
