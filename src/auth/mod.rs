//! Token checks at the edge: who is calling (JWT, WebSocket `?token=`, edge-node keys), from
//! where (network gates), and whether their role allows the route.
//!
//! Every failure has a [`Rejection`] whose label goes to metrics and logs only; the client always
//! gets the same generic answer.

pub mod jwt;
pub mod network;
pub mod node_key;

use std::borrow::Cow;

use http::header::{self, HeaderValue};
use http::HeaderMap;
use serde::Deserialize;

/// How a route authenticates its callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Anyone.
    Public,
    /// `Authorization: Bearer <jwt>`.
    Jwt,
    /// `?token=<jwt>` (WebSocket upgrades cannot set headers), or the bearer header.
    JwtQuery,
    /// `Authorization: Bearer <edge-node key>`.
    NodeKey,
}

impl Mode {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Public => "public",
            Mode::Jwt => "jwt",
            Mode::JwtQuery => "jwt_query",
            Mode::NodeKey => "node_key",
        }
    }
}

/// User roles, least to most privileged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Handles calls.
    Agent,
    /// Watches agents.
    Supervisor,
    /// Administers a tenant.
    Admin,
    /// Operates the platform; may act on other tenants.
    PlatformAdmin,
}

impl Role {
    /// The name used in tokens and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Supervisor => "supervisor",
            Role::Admin => "admin",
            Role::PlatformAdmin => "platform_admin",
        }
    }
}

/// A verified caller, ready to be told to the upstream.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Tenant id (`tid`).
    pub tenant: HeaderValue,
    /// User id (`sub`).
    pub user: HeaderValue,
    /// Role.
    pub role: Role,
    /// Email, when the token carries one that fits in a header.
    pub email: Option<HeaderValue>,
}

/// Why a caller was turned away. The label is for metrics and logs, never for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No credentials at all.
    Missing,
    /// Credentials present but not `Bearer <token>`, or sent twice.
    Malformed,
    /// Longer than the configured cap.
    TooLong,
    /// Header names an algorithm other than HS256 (including `none`).
    BadAlgorithm,
    /// Signature does not verify with any active secret.
    BadSignature,
    /// `exp` passed (beyond the leeway).
    Expired,
    /// `nbf` not reached yet (beyond the leeway).
    NotYetValid,
    /// `iss` is not the configured issuer.
    WrongIssuer,
    /// `aud` is not the configured audience.
    WrongAudience,
    /// A required claim is missing or unusable (`exp`, `tid`, `sub`, `role`).
    BadClaims,
    /// The node key is not among the known digests.
    UnknownKey,
    /// The source address is outside the route's networks (403).
    Network,
    /// The role is below the route's minimum (403).
    InsufficientRole,
    /// `?tenant_id=` from someone who is not a platform admin (403).
    TenantOverride,
}

impl Rejection {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Missing => "missing",
            Rejection::Malformed => "malformed",
            Rejection::TooLong => "too_long",
            Rejection::BadAlgorithm => "bad_algorithm",
            Rejection::BadSignature => "bad_signature",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::WrongIssuer => "wrong_issuer",
            Rejection::WrongAudience => "wrong_audience",
            Rejection::BadClaims => "bad_claims",
            Rejection::UnknownKey => "unknown_key",
            Rejection::Network => "network",
            Rejection::InsufficientRole => "insufficient_role",
            Rejection::TenantOverride => "tenant_override",
        }
    }

    /// The status the client gets: 401 for credentials, 403 for permissions.
    pub fn status(self) -> u16 {
        match self {
            Rejection::Network | Rejection::InsufficientRole | Rejection::TenantOverride => 403,
            _ => 401,
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
/// `Ok(None)` when there is no Authorization header.
pub fn bearer(headers: &HeaderMap) -> Result<Option<&str>, Rejection> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Rejection::Malformed);
    }
    // Bytes first, text last: this runs on every token request, and `to_str` plus a
    // char-set `contains` cost ~15 instructions per byte of a 200-byte token.
    let value = value.as_bytes();
    let space = memchr::memchr(b' ', value).ok_or(Rejection::Malformed)?;
    if !value[..space].eq_ignore_ascii_case(b"bearer") {
        return Err(Rejection::Malformed);
    }
    let token = value[space + 1..].trim_ascii_start();
    let token = match memchr::memchr2(b' ', b'\t', token) {
        // Only trailing blanks may follow the token.
        Some(end) if token[end..].iter().all(|&b| b == b' ' || b == b'\t') => &token[..end],
        Some(_) => return Err(Rejection::Malformed),
        None => token,
    };
    // Visible ASCII only, as `HeaderValue::to_str` would insist (a fold, not `all`, so that
    // it is vectorised).
    if token.is_empty() || !token.iter().fold(true, |ok, &b| ok & b.is_ascii_graphic()) {
        return Err(Rejection::Malformed);
    }
    std::str::from_utf8(token)
        .map(Some)
        .map_err(|_| Rejection::Malformed)
}

/// The `token` query parameter, percent-decoded. `Ok(None)` when absent; a repeated parameter
/// is malformed (the gateway and the upstream might pick different ones).
pub fn query_token(query: Option<&str>) -> Result<Option<Cow<'_, str>>, Rejection> {
    let mut found = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if k == "token" {
            if found.is_some() {
                return Err(Rejection::Malformed);
            }
            found = Some(v);
        }
    }
    match found {
        Some(t) if t.is_empty() => Err(Rejection::Malformed),
        other => Ok(other),
    }
}

/// True when the query asks to act on another tenant: a parameter that some common framework
/// reads as `tenant_id`. Parameters are split on `&` and `;` (older parsers split on both),
/// names percent-decoded (`+` as space), compared without case (ASP.NET, Spring's relaxed
/// binding), with anything from a `[` on dropped (`tenant_id[]`, PHP and Rails arrays) and
/// `_`, `-`, `.` and spaces ignored (PHP turns `.` and spaces into `_`; camelCase binders
/// read `tenantId`).
pub fn asks_other_tenant(query: Option<&str>) -> bool {
    query.is_some_and(|q| q.split(['&', ';']).any(names_tenant_id))
}

/// True when one `name=value` pair's name reads as `tenant_id` (see [`asks_other_tenant`]).
fn names_tenant_id(pair: &str) -> bool {
    let name = pair.split('=').next().unwrap_or_default();
    let decoded: Cow<'_, [u8]> = if name.contains(['%', '+']) {
        let decoded = form_urlencoded::parse(name.as_bytes()).next();
        Cow::Owned(
            decoded
                .map(|(k, _)| k.into_owned().into_bytes())
                .unwrap_or_default(),
        )
    } else {
        Cow::Borrowed(name.as_bytes())
    };
    let base = decoded.split(|&b| b == b'[').next().unwrap_or_default();
    let mut letters = base
        .iter()
        .filter(|b| !matches!(b, b'_' | b'-' | b'.' | b' '))
        .map(|b| b.to_ascii_lowercase());
    b"tenantid".iter().all(|&want| letters.next() == Some(want)) && letters.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(&headers(&[])), Ok(None));
        assert_eq!(bearer(&headers(&["Bearer abc"])), Ok(Some("abc")));
        assert_eq!(bearer(&headers(&["bEaReR   abc  "])), Ok(Some("abc")));
        assert_eq!(bearer(&headers(&["Basic abc"])), Err(Rejection::Malformed));
        assert_eq!(bearer(&headers(&["Bearer"])), Err(Rejection::Malformed));
        assert_eq!(bearer(&headers(&["Bearer "])), Err(Rejection::Malformed));
        assert_eq!(bearer(&headers(&["Bearer a b"])), Err(Rejection::Malformed));
        assert_eq!(bearer(&headers(&["Bearer \tabc\t "])), Ok(Some("abc")));
        assert_eq!(
            bearer(&headers(&["Bearer\tabc"])),
            Err(Rejection::Malformed)
        );
        assert_eq!(
            bearer(&headers(&["Bearer a\tb"])),
            Err(Rejection::Malformed)
        );
        assert_eq!(bearer(&headers(&["Bearer   "])), Err(Rejection::Malformed));
        let obs_text = HeaderValue::from_bytes(b"Bearer caf\xc3\xa9").unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, obs_text);
        assert_eq!(bearer(&h), Err(Rejection::Malformed));
        assert_eq!(
            bearer(&headers(&["Bearer a", "Bearer b"])),
            Err(Rejection::Malformed)
        );
    }

    #[test]
    fn query_parsing() {
        assert_eq!(query_token(None), Ok(None));
        assert_eq!(query_token(Some("a=1")), Ok(None));
        assert_eq!(
            query_token(Some("a=1&token=x.y.z")).unwrap().unwrap(),
            "x.y.z"
        );
        assert_eq!(query_token(Some("token=x%2Ey")).unwrap().unwrap(), "x.y");
        assert_eq!(query_token(Some("token=")), Err(Rejection::Malformed));
        assert_eq!(
            query_token(Some("token=a&token=b")),
            Err(Rejection::Malformed)
        );
        for q in [
            "x=1&tenant_id=abc",
            "tenant%5Fid=abc",
            "tenant%5fid=abc",
            "Tenant_Id=abc",
            "TENANT_ID=abc",
            "tenant_id[]=abc",
            "tenant_id[0]=abc",
            "tenant_id%5B%5D=abc",
            "tenantId=abc",
            "TenantID=abc",
            "tenant-id=abc",
            "tenant.id=abc",
            "tenant+id=abc",
            "tenant%20id=abc",
            "x=1;tenant_id=abc",
            "tenant_id",
            "%74enant_id=abc",
        ] {
            assert!(asks_other_tenant(Some(q)), "{q}");
        }
        for q in [
            "tenant=abc",
            "tenant_ids_count=1",
            "x=tenant_id",
            "id=1",
            "",
            "t=1",
        ] {
            assert!(!asks_other_tenant(Some(q)), "{q}");
        }
        assert!(!asks_other_tenant(None));
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Agent < Role::Supervisor);
        assert!(Role::Supervisor < Role::Admin);
        assert!(Role::Admin < Role::PlatformAdmin);
    }
}
