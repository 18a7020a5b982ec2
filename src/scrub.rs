//! Which client headers never reach the upstream, because the gateway vouches for what they
//! say (see [`crate::proxy`]'s `forward` for the whole story of a forwarded head).

use http::header::{self, HeaderName};

/// Headers no client may send upstream (besides the configured identity headers).
static ALWAYS: [HeaderName; 5] = [
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Headers only a trusted proxy may send upstream.
static FROM_TRUSTED_ONLY: [HeaderName; 10] = [
    header::FORWARDED,
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("fastly-client-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
];

/// Headers the gateway sets on every forwarded request.
static SET_BY_GATEWAY: [HeaderName; 3] = [
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
];

/// `X-Forwarded-Host`, set from the request's host.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Real-IP`, set to the client the gateway determined.
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The drop rules of one configuration (see the module docs).
#[derive(Debug, Clone)]
pub struct Scrub {
    /// Dropped from every client: the identity headers and [`ALWAYS`].
    always: Vec<HeaderName>,
    /// Every name above plus [`FROM_TRUSTED_ONLY`] and [`SET_BY_GATEWAY`], in dash form: a
    /// client header with `_` that equals one of these once `_` is `-` is dropped.
    folded: Vec<HeaderName>,
}

impl Scrub {
    /// The rules for a gateway that sets `identity` headers.
    pub fn new<'a>(identity: impl IntoIterator<Item = &'a HeaderName>) -> Scrub {
        let mut always: Vec<HeaderName> = identity.into_iter().cloned().collect();
        always.extend(ALWAYS.iter().cloned());
        let mut folded = always.clone();
        folded.extend(FROM_TRUSTED_ONLY.iter().cloned());
        folded.extend(SET_BY_GATEWAY.iter().cloned());
        Scrub { always, folded }
    }

    /// True when the client's header `name` must not reach the upstream; `trusted` when the
    /// peer is a trusted proxy.
    pub fn drops(&self, name: &HeaderName, trusted: bool) -> bool {
        if self.always.contains(name) || (!trusted && FROM_TRUSTED_ONLY.contains(name)) {
            return true;
        }
        let bytes = name.as_str().as_bytes();
        if memchr::memchr(b'_', bytes).is_none() {
            return false;
        }
        // Rare: only names with `_` pay for the comparison.
        self.folded.iter().any(|f| {
            let f = f.as_str().as_bytes();
            f.len() == bytes.len()
                && f.iter()
                    .zip(bytes)
                    .all(|(&a, &b)| a == if b == b'_' { b'-' } else { b })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrub() -> Scrub {
        let identity = [
            HeaderName::from_static("x-tenant-id"),
            HeaderName::from_static("x-user-id"),
            HeaderName::from_static("x-user-role"),
            HeaderName::from_static("x-user-email"),
        ];
        Scrub::new(identity.iter())
    }

    fn name(s: &str) -> HeaderName {
        HeaderName::from_bytes(s.as_bytes()).unwrap()
    }

    #[test]
    fn identity_and_routing_headers_never_pass_in_any_spelling() {
        let s = scrub();
        for n in [
            "x-tenant-id",
            "X-Tenant-Id",
            "X_Tenant_Id",
            "x_tenant-id",
            "X-USER_ID",
            "x_user_role",
            "x_user_email",
            "x-original-url",
            "X_Original_URL",
            "x-http-method-override",
            "x_http_method",
            "x-method-override",
            "x_request_id",
            "x_forwarded_for",
            "X_Forwarded_Proto",
            "x_real_ip",
            "X_Forwarded_Host",
        ] {
            assert!(s.drops(&name(n), false), "{n} untrusted");
            assert!(s.drops(&name(n), true), "{n} trusted");
        }
    }

    #[test]
    fn forwarding_headers_pass_only_from_trusted_proxies() {
        let s = scrub();
        for n in [
            "forwarded",
            "x-forwarded-host",
            "x-forwarded-port",
            "x-real-ip",
            "true-client-ip",
            "x-client-ip",
            "cf-connecting-ip",
        ] {
            assert!(s.drops(&name(n), false), "{n}");
            assert!(!s.drops(&name(n), true), "{n}");
        }
    }

    #[test]
    fn ordinary_headers_pass() {
        let s = scrub();
        for n in [
            "accept",
            "authorization",
            "x-request-id",
            "x-forwarded-for",
            "x-tenant",
            "x_custom_thing",
            "x-user-idx",
        ] {
            assert!(!s.drops(&name(n), false), "{n}");
        }
    }
}
