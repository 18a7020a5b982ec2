//! HS256 bearer tokens: the algorithm is pinned, several secrets may be active (rotation).

use http::HeaderValue;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{Identity, Rejection, Role};

/// Longest `tid` / `sub` accepted, in bytes.
const MAX_ID_BYTES: usize = 256;

/// What the verifier needs from the configuration.
#[derive(Clone)]
pub struct Settings {
    /// Active secrets, newest first; each at least 16 bytes.
    pub secrets: Vec<Vec<u8>>,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
    /// Clock leeway for `exp` and `nbf`, in seconds.
    pub leeway_seconds: u64,
    /// Longest token accepted, in bytes.
    pub max_token_bytes: usize,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field(
                "secrets",
                &format_args!("[{} redacted]", self.secrets.len()),
            )
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_seconds", &self.leeway_seconds)
            .field("max_token_bytes", &self.max_token_bytes)
            .finish()
    }
}

/// Verifies user tokens.
pub struct Verifier {
    keys: Vec<DecodingKey>,
    validation: Validation,
    max_token_bytes: usize,
}

#[derive(Deserialize)]
struct Claims {
    tid: String,
    sub: String,
    role: Role,
    #[serde(default)]
    email: Option<String>,
}

impl Verifier {
    /// A verifier for `settings`.
    pub fn new(settings: &Settings) -> Verifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_issuer(&[settings.issuer.as_str()]);
        validation.set_audience(&[settings.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = settings.leeway_seconds;
        Verifier {
            keys: settings
                .secrets
                .iter()
                .map(|s| DecodingKey::from_secret(s))
                .collect(),
            validation,
            max_token_bytes: settings.max_token_bytes,
        }
    }

    /// Verifies `token` and returns who it speaks for.
    pub fn verify(&self, token: &str) -> Result<Identity, Rejection> {
        if token.len() > self.max_token_bytes {
            return Err(Rejection::TooLong);
        }
        let mut last = Rejection::BadSignature;
        for key in &self.keys {
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
                Ok(data) => return identity(data.claims),
                // Signed with another secret: try the next active one.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                    last = Rejection::BadSignature;
                }
                Err(e) if matches!(e.kind(), ErrorKind::Json(_)) => {
                    // Failure path only: was it the header (an algorithm such as `none` that
                    // does not even parse) or the claims?
                    return Err(match jsonwebtoken::decode_header(token) {
                        Err(_) => Rejection::BadAlgorithm,
                        Ok(_) => Rejection::BadClaims,
                    });
                }
                Err(e) => return Err(rejection(e.kind())),
            }
        }
        Err(last)
    }
}

fn identity(c: Claims) -> Result<Identity, Rejection> {
    let id = |v: &str| {
        if v.is_empty() || v.len() > MAX_ID_BYTES {
            return Err(Rejection::BadClaims);
        }
        HeaderValue::from_str(v).map_err(|_| Rejection::BadClaims)
    };
    Ok(Identity {
        tenant: id(&c.tid)?,
        user: id(&c.sub)?,
        role: c.role,
        // An email that cannot travel in a header is left out rather than failing the caller.
        email: c.email.and_then(|e| HeaderValue::from_str(&e).ok()),
    })
}

fn rejection(kind: &ErrorKind) -> Rejection {
    match kind {
        ErrorKind::InvalidSignature => Rejection::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm => Rejection::BadAlgorithm,
        ErrorKind::ExpiredSignature => Rejection::Expired,
        ErrorKind::ImmatureSignature => Rejection::NotYetValid,
        ErrorKind::InvalidIssuer => Rejection::WrongIssuer,
        ErrorKind::InvalidAudience => Rejection::WrongAudience,
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
            Rejection::BadClaims
        }
        _ => Rejection::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"unit-test-secret-0123456789";

    fn settings() -> Settings {
        Settings {
            secrets: vec![SECRET.to_vec()],
            issuer: "get2dial".into(),
            audience: "get2dial-control".into(),
            leeway_seconds: 5,
            max_token_bytes: 4096,
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn mint(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn good() -> serde_json::Value {
        json!({"tid":"t-1","sub":"u-1","role":"admin","email":"a@b.com",
               "iss":"get2dial","aud":"get2dial-control","exp": now() + 600})
    }

    #[test]
    fn accepts_a_good_token() {
        let id = Verifier::new(&settings())
            .verify(&mint(good(), SECRET))
            .unwrap();
        assert_eq!(id.tenant, "t-1");
        assert_eq!(id.user, "u-1");
        assert_eq!(id.role, Role::Admin);
        assert_eq!(id.email.unwrap(), "a@b.com");
    }

    #[test]
    fn names_each_failure() {
        let v = Verifier::new(&settings());
        let with = |k: &str, val: serde_json::Value| {
            let mut c = good();
            c[k] = val;
            v.verify(&mint(c, SECRET)).unwrap_err()
        };
        let without = |k: &str| {
            let mut c = good();
            c.as_object_mut().unwrap().remove(k);
            v.verify(&mint(c, SECRET)).unwrap_err()
        };
        assert_eq!(with("exp", json!(now() - 60)), Rejection::Expired);
        assert_eq!(with("nbf", json!(now() + 60)), Rejection::NotYetValid);
        assert_eq!(with("iss", json!("other")), Rejection::WrongIssuer);
        assert_eq!(with("aud", json!("other")), Rejection::WrongAudience);
        assert_eq!(with("role", json!("root")), Rejection::BadClaims);
        assert_eq!(with("tid", json!("")), Rejection::BadClaims);
        assert_eq!(without("tid"), Rejection::BadClaims);
        assert_eq!(without("sub"), Rejection::BadClaims);
        assert_eq!(without("exp"), Rejection::BadClaims);
        assert_eq!(
            v.verify(&mint(good(), b"another-secret-0123456789"))
                .unwrap_err(),
            Rejection::BadSignature
        );
        assert_eq!(v.verify("garbage").unwrap_err(), Rejection::Malformed);
        assert_eq!(v.verify(&"a".repeat(5000)).unwrap_err(), Rejection::TooLong);
    }

    #[test]
    fn leeway_is_honoured() {
        let v = Verifier::new(&settings());
        let mut c = good();
        c["exp"] = json!(now() - 2);
        assert!(v.verify(&mint(c, SECRET)).is_ok());
    }

    #[test]
    fn rotation_accepts_every_active_secret() {
        let mut s = settings();
        s.secrets.push(b"previous-secret-0123456789".to_vec());
        let v = Verifier::new(&s);
        assert!(v.verify(&mint(good(), SECRET)).is_ok());
        assert!(v
            .verify(&mint(good(), b"previous-secret-0123456789"))
            .is_ok());
    }
}
