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

/// The stand-in app.
pub struct StandIn;

const JSON: &str = "application/json";

#[async_trait]
impl ServeHttp for StandIn {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        let body = read_body(session).await;
        match (method.as_str(), path.as_str()) {
            ("POST", "/api/v1/auth/login") => login(&body),
            ("GET", "/api/v1/auth/me") => {
                if session.req_header().headers.contains_key(http::header::AUTHORIZATION) {
                    reply(StatusCode::OK, JSON, br#"{"status":"success","data":{"id":"u-1","email":"demo@get2dial.com","role":"admin"}}"#.to_vec())
                } else {
                    envelope_reply(StatusCode::UNAUTHORIZED, "missing or invalid authorization header")
                }
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

fn login(body: &[u8]) -> Response<Vec<u8>> {
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
        Ok(l) if l.email.trim().eq_ignore_ascii_case(DEMO_EMAIL) && l.password == DEMO_PASSWORD => reply(
            StatusCode::OK,
            JSON,
            br#"{"status":"success","data":{"token":"demo-token","expires_at":"2030-01-01T00:00:00Z","user":{"id":"u-1","email":"demo@get2dial.com","role":"admin"}}}"#.to_vec(),
        ),
        Ok(_) => envelope_reply(StatusCode::UNAUTHORIZED, "invalid credentials"),
    }
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
