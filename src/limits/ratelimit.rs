//! Rate-limit policies of a route and the headers that describe them (IETF
//! `RateLimit-Policy` / `RateLimit`, draft-ietf-httpapi-ratelimit-headers).

use std::time::Duration;

use http::HeaderValue;
use serde::Deserialize;

use crate::store::{Limit, RateDecision};

/// What a policy counts requests by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// The client address (after trusted proxies).
    Ip,
    /// The verified user (`sub`).
    User,
    /// The verified tenant (`tid`).
    Tenant,
}

impl KeyKind {
    /// The name used in the config file and in store keys.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Ip => "ip",
            KeyKind::User => "user",
            KeyKind::Tenant => "tenant",
        }
    }
}

/// One policy of a route.
#[derive(Debug, Clone)]
pub struct Policy {
    /// What it counts by.
    pub key: KeyKind,
    /// The GCRA parameters (and the policy's name).
    pub limit: Limit,
}

/// Whole seconds, rounded up, at least 1: what `Retry-After` says.
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `RateLimit-Policy: "name";q=<burst>;w=<seconds to refill>`.
pub fn policy_header(limit: &Limit) -> HeaderValue {
    let v = format!(
        "\"{}\";q={};w={}",
        limit.name,
        limit.burst,
        ceil_secs(limit.window()).max(1)
    );
    HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static(""))
}

/// `RateLimit: "name";r=<remaining>;t=<seconds until full>`.
pub fn state_header(limit: &Limit, d: &RateDecision) -> HeaderValue {
    let t = if d.allowed {
        ceil_secs(d.reset)
    } else {
        retry_after_secs(d.retry_after)
    };
    let v = format!("\"{}\";r={};t={}", limit.name, d.remaining, t);
    HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(59)), 59);
    }

    #[test]
    fn header_syntax() {
        let l = Limit {
            id: 0,
            name: "per-user".into(),
            interval: Duration::from_millis(20),
            burst: 100,
        };
        assert_eq!(policy_header(&l), "\"per-user\";q=100;w=2");
        let d = RateDecision {
            allowed: false,
            remaining: 0,
            retry_after: Duration::from_millis(15),
            reset: Duration::from_secs(2),
        };
        assert_eq!(state_header(&l, &d), "\"per-user\";r=0;t=1");
    }
}
