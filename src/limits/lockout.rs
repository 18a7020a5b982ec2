//! The login guard: a strict login body and the key its lockout counts by.

use serde::Deserialize;

/// Longest email accepted (RFC 5321 path limit).
const MAX_EMAIL_BYTES: usize = 320;

/// Exactly the login body the API documents; anything else is `invalid request body`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    email: String,
    #[allow(dead_code)]
    password: String,
    #[serde(default, deserialize_with = "present_string")]
    #[allow(dead_code)]
    tenant_domain: Option<String>,
}

/// An optional field that, when present, must be a string (`null` is not a string).
fn present_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

/// The lockout key of a login body: the trimmed, lowercased email, whether or not such an
/// account exists. `None` when the body is not exactly `{email, password[, tenant_domain]}`
/// with string values (duplicate fields included), or the email is empty or overlong.
pub fn login_key(body: &[u8]) -> Option<String> {
    let parsed: LoginBody = serde_json::from_slice(body).ok()?;
    let email = parsed.email.trim();
    if email.is_empty() || email.len() > MAX_EMAIL_BYTES {
        return None;
    }
    Some(email.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_bodies() {
        let ok = |b: &str| login_key(b.as_bytes());
        assert_eq!(
            ok(r#"{"email":" Ann@Example.COM ","password":"x"}"#).as_deref(),
            Some("ann@example.com")
        );
        assert!(ok(r#"{"email":"a@b.c","password":"x","tenant_domain":"acme"}"#).is_some());
        for bad in [
            "",
            "not json",
            r#"{"email":"a@b.c"}"#,
            r#"{"password":"x"}"#,
            r#"{"email":"a@b.c","password":"x","tenant":"oops"}"#,
            r#"{"email":"a@b.c","password":5}"#,
            r#"{"email":["a"],"password":"x"}"#,
            r#"{"email":"a@b.c","password":"x","tenant_domain":null}"#,
            r#"{"email":"a@b.c","password":"x","email":"b@b.c"}"#,
            r#"{"email":"   ","password":"x"}"#,
            r#"[{"email":"a@b.c","password":"x"}]"#,
            r#"{"email":"a@b.c","password":"x"} trailing"#,
        ] {
            assert_eq!(ok(bad), None, "{bad}");
        }
        let long = format!(r#"{{"email":"{}@x.io","password":"x"}}"#, "a".repeat(330));
        assert_eq!(ok(&long), None);
    }
}
