//! HS256 bearer tokens: the algorithm is pinned, several secrets may be active (rotation).
//! Verified tokens are remembered (bounded, until their `exp`), so a client that sends the same
//! token on every request pays for the signature and the claims once.

use std::sync::Arc;

use http::HeaderValue;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{Identity, Rejection, Role};

/// Longest `tid` / `sub` accepted, in bytes.
const MAX_ID_BYTES: usize = 256;

/// The token profile the verifier holds tokens to: secrets, issuer, audience, leeway, size, cache.
#[derive(Clone)]
pub struct Profile {
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
    /// Verified tokens remembered; 0 verifies every request in full.
    pub cache_entries: usize,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field(
                "secrets",
                &format_args!("[{} redacted]", self.secrets.len()),
            )
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_seconds", &self.leeway_seconds)
            .field("max_token_bytes", &self.max_token_bytes)
            .field("cache_entries", &self.cache_entries)
            .finish()
    }
}

/// Verifies user tokens.
pub struct Verifier {
    keys: Vec<DecodingKey>,
    validation: Validation,
    max_token_bytes: usize,
    /// Verified tokens and until when (unix seconds) they stay valid. A reload builds a new
    /// verifier, so a removed secret also drops what it verified.
    cache: Option<quick_cache::sync::Cache<Box<str>, Verified>>,
}

/// A verified token's caller and the last second it is still accepted (`exp` plus leeway).
#[derive(Clone)]
struct Verified {
    identity: Arc<Identity>,
    valid_until: u64,
}

#[derive(Deserialize)]
struct Claims {
    tid: String,
    sub: String,
    role: Role,
    #[serde(default)]
    email: Option<String>,
    /// Already checked by jsonwebtoken (required, numeric, not past); kept for the cache.
    exp: f64,
}

impl Verifier {
    /// A verifier for `settings`.
    pub fn new(settings: &Profile) -> Verifier {
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
            cache: (settings.cache_entries > 0)
                .then(|| quick_cache::sync::Cache::new(settings.cache_entries)),
        }
    }

    /// Verifies `token` and returns who it speaks for.
    pub fn verify(&self, token: &str) -> Result<Arc<Identity>, Rejection> {
        if token.len() > self.max_token_bytes {
            return Err(Rejection::TooLong);
        }
        let Some(cache) = &self.cache else {
            return self.verify_fully(token).map(|v| v.identity);
        };
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(hit) = cache.get(token) {
            if now <= hit.valid_until {
                return Ok(hit.identity);
            }
            // Expired since: the full check below names the rejection.
            cache.remove(token);
        }
        let verified = self.verify_fully(token)?;
        // Only accepted tokens are remembered: garbage cannot push them out faster than
        // it costs to verify.
        cache.insert(token.into(), verified.clone());
        Ok(verified.identity)
    }

    fn verify_fully(&self, token: &str) -> Result<Verified, Rejection> {
        let mut last = Rejection::BadSignature;
        for key in &self.keys {
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
                Ok(data) => {
                    let valid_until =
                        (data.claims.exp.max(0.0) as u64).saturating_add(self.validation.leeway);
                    return Ok(Verified {
                        identity: Arc::new(identity(data.claims)?),
                        valid_until,
                    });
                }
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

    fn settings() -> Profile {
        Profile {
            secrets: vec![SECRET.to_vec()],
            issuer: "get2dial".into(),
            audience: "get2dial-control".into(),
            leeway_seconds: 5,
            max_token_bytes: 4096,
            cache_entries: 100,
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
        assert_eq!(id.email.as_ref().unwrap(), "a@b.com");
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
    fn a_remembered_token_still_expires() {
        let v = Verifier::new(&settings());
        let mut c = good();
        // Accepted now (within the 5 s leeway), rejected once exp + leeway has passed.
        c["exp"] = json!(now() - 4);
        let token = mint(c, SECRET);
        assert!(v.verify(&token).is_ok());
        assert!(v.verify(&token).is_ok(), "second time from the cache");
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_eq!(v.verify(&token).unwrap_err(), Rejection::Expired);
    }

    #[test]
    fn the_cache_is_bounded_and_keeps_answers_exact() {
        let v = Verifier::new(&settings());
        let tokens: Vec<String> = (0..300)
            .map(|i| {
                let mut c = good();
                c["sub"] = json!(format!("u-{i}"));
                mint(c, SECRET)
            })
            .collect();
        for _ in 0..2 {
            for (i, t) in tokens.iter().enumerate() {
                assert_eq!(v.verify(t).unwrap().user, format!("u-{i}").as_str());
            }
        }
        let cache = v.cache.as_ref().unwrap();
        assert!(cache.len() <= 100, "{} entries", cache.len());
        // A forged signature is never answered from the cache, even for a cached payload.
        let forged = format!("{}x", &tokens[0][..tokens[0].len() - 1]);
        assert!(v.verify(&forged).is_err());
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
