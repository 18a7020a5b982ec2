//! The login guard: a strict login body, the account it names, and the guesses that account
//! and its email may still have.
//!
//! A guess is counted twice: under the account (tenant domain and email), which a success
//! clears, and under the email alone across every domain, which only time clears. The first
//! is the exact `max_failures` bound of one account; the second bounds what spelling a domain
//! differently could buy if the upstream folds spellings the gateway does not (the gateway
//! folds case, whitespace, a trailing dot, Unicode compatibility forms and punycode; an empty
//! `tenant_domain` is the default tenant, as is none), and keeps one tenant's success from
//! clearing another tenant's failures.

use std::borrow::Cow;

use serde::Deserialize;

use crate::store::{Lock, LockPolicy, Reservation, Settlement, Store, Ticket};

/// Longest email accepted (RFC 5321 path limit).
const MAX_EMAIL_BYTES: usize = 320;

/// Longest tenant domain accepted (a DNS name).
const MAX_DOMAIN_BYTES: usize = 253;

/// Exactly the login body the API documents; anything else is `invalid request body`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody<'a> {
    #[serde(borrow)]
    email: Cow<'a, str>,
    #[allow(dead_code)]
    #[serde(borrow)]
    password: Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "present_string")]
    tenant_domain: Option<Cow<'a, str>>,
}

/// An optional field that, when present, must be a string (`null` is not a string).
fn present_string<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Cow<'de, str>>, D::Error> {
    <Cow<'de, str>>::deserialize(d).map(Some)
}

/// The account a login body names, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The tenant domain (see [`normalise_domain`]); empty for the default tenant.
    pub domain: String,
    /// The email, trimmed and lowercased.
    pub email: String,
}

impl Account {
    /// The store key of the account: both parts, length-prefixed so that no two accounts
    /// share one, with `{`, `}` and `%` escaped so that a Redis Cluster hash tag around it
    /// stays whole.
    pub fn key(&self) -> String {
        let (domain, email) = (escape(&self.domain), escape(&self.email));
        let mut length = itoa::Buffer::new();
        let length = length.format(domain.len());
        let mut key = String::with_capacity(4 + length.len() + domain.len() + email.len());
        for part in ["a:", length, ":", &domain, ":", &email] {
            key.push_str(part);
        }
        key
    }

    /// The store key of the email across every domain (never equal to an account key).
    pub fn email_key(&self) -> String {
        let email = escape(&self.email);
        let mut key = String::with_capacity(2 + email.len());
        key.push_str("e:");
        key.push_str(&email);
        key
    }
}

use crate::store::tag_safe as escape;

/// The account of a login body. `None` when the body is not a JSON object of exactly
/// `{email, password[, tenant_domain]}` with string values (an array, duplicate or unknown
/// fields, `null` included), or the email is empty or overlong, or the domain overlong.
pub fn account(body: &[u8]) -> Option<Account> {
    // serde reads a JSON array into a struct's fields in order: only an object may pass.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let parsed: LoginBody<'_> = serde_json::from_slice(body).ok()?;
    let email = parsed.email.trim();
    if email.is_empty() || email.len() > MAX_EMAIL_BYTES {
        return None;
    }
    let domain = parsed.tenant_domain.as_deref().unwrap_or_default();
    if domain.len() > MAX_DOMAIN_BYTES {
        return None;
    }
    Some(Account {
        domain: normalise_domain(domain),
        email: email.to_lowercase(),
    })
}

/// One spelling per tenant domain: trimmed, trailing dots dropped, then UTS 46 (the mapping
/// browsers use: case, compatibility forms, punycode). A domain UTS 46 refuses is kept
/// lowercased: no tenant can have it, and the email's own bound still covers it.
pub fn normalise_domain(domain: &str) -> String {
    let domain = domain.trim().trim_end_matches('.');
    match idna::domain_to_ascii(domain) {
        Ok(ascii) => ascii.trim_end_matches('.').to_string(),
        Err(_) => domain.to_lowercase(),
    }
}

/// The lockout of one login route.
#[derive(Debug, Clone)]
pub struct Guard {
    /// Per account: `max_failures` guesses.
    pub account: LockPolicy,
    /// Per email across every domain.
    pub email: LockPolicy,
    /// Upstream statuses that use a guess up.
    pub failure_statuses: Vec<u16>,
}

/// A reserved guess, to be settled once the upstream answered (or did not).
#[derive(Debug)]
pub struct Guess {
    account_key: String,
    email_key: String,
    /// The hash tag both keys were reserved under.
    tag: String,
    ticket: Ticket,
}

/// Why a guess was not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The account or the email is locked, or every guess it has left is in flight: refuse
    /// for this long.
    Locked(std::time::Duration),
    /// The lockout table is full and nothing can be evicted.
    Full,
}

impl Refusal {
    fn from(r: Reservation) -> Refusal {
        match r {
            Reservation::Locked(left) => Refusal::Locked(left),
            // Granted cannot be a refusal; Full is the safe reading of anything else.
            Reservation::Granted(_) | Reservation::Full => Refusal::Full,
        }
    }
}

/// How a settled guess is counted in `gateway_login_attempts_total{outcome}`.
pub fn outcome_label(s: Settlement) -> &'static str {
    match s {
        Settlement::Failure => "failure",
        Settlement::Success => "success",
        Settlement::Refund => "error",
    }
}

impl Guard {
    /// Reserves a guess for `account` under both of its keys, in one atomic step (one round
    /// trip to Redis): both or neither.
    pub async fn reserve(&self, store: &dyn Store, account: &Account) -> Result<Guess, Refusal> {
        let (account_key, email_key) = (account.key(), account.email_key());
        let tag = escape(&account.email).into_owned();
        let locks = [
            Lock {
                key: &account_key,
                policy: &self.account,
                tag: &tag,
            },
            Lock {
                key: &email_key,
                policy: &self.email,
                tag: &tag,
            },
        ];
        match store.reserve(&locks).await {
            Reservation::Granted(ticket) => Ok(Guess {
                account_key,
                email_key,
                tag,
                ticket,
            }),
            refused => Err(Refusal::from(refused)),
        }
    }

    /// What the upstream's `status` (none: it never answered) makes of a guess: a
    /// configured failure status uses it up, 2xx clears the account, anything else gives it
    /// back.
    pub fn settlement(&self, status: Option<u16>) -> Settlement {
        match status {
            Some(s) if self.failure_statuses.contains(&s) => Settlement::Failure,
            Some(s) if (200..300).contains(&s) => Settlement::Success,
            _ => Settlement::Refund,
        }
    }

    /// Settles `guess`; true when it locked the account or the email. A success clears the
    /// account only: the email's bound counts every domain's failures, and one tenant's success
    /// must not clear another's.
    pub async fn settle(&self, store: &dyn Store, guess: Guess, outcome: Settlement) -> bool {
        let email_outcome = match outcome {
            Settlement::Success => Settlement::Refund,
            other => other,
        };
        let locks = [
            (
                Lock {
                    key: &guess.account_key,
                    policy: &self.account,
                    tag: &guess.tag,
                },
                outcome,
            ),
            (
                Lock {
                    key: &guess.email_key,
                    policy: &self.email,
                    tag: &guess.tag,
                },
                email_outcome,
            ),
        ];
        store.settle(&locks, guess.ticket).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acct(domain: &str, email: &str) -> Option<Account> {
        Some(Account {
            domain: domain.into(),
            email: email.into(),
        })
    }

    #[test]
    fn strict_bodies() {
        let ok = |b: &str| account(b.as_bytes());
        assert_eq!(
            ok(r#"{"email":" Ann@Example.COM ","password":"x"}"#),
            acct("", "ann@example.com")
        );
        assert_eq!(
            ok(r#"{"email":"a@b.c","password":"x","tenant_domain":"acme"}"#),
            acct("acme", "a@b.c")
        );
        assert_eq!(
            ok(r#" {"email":"a\u0040b.c","password":"x"}"#),
            acct("", "a@b.c")
        );
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
            r#"["a@b.c","x"]"#,
            r#"["a@b.c","x","acme"]"#,
            r#" ["a@b.c","x"]"#,
            r#""a@b.c""#,
            r#"{"email":"a@b.c","password":"x"} trailing"#,
        ] {
            assert_eq!(ok(bad), None, "{bad}");
        }
        let long = format!(r#"{{"email":"{}@x.io","password":"x"}}"#, "a".repeat(330));
        assert_eq!(ok(&long), None);
        let long = format!(
            r#"{{"email":"a@x.io","password":"x","tenant_domain":"{}"}}"#,
            "a".repeat(300)
        );
        assert_eq!(ok(&long), None);
    }

    #[test]
    fn one_spelling_per_domain() {
        for spelling in [
            "acme.example",
            "ACME.example",
            " acme.example ",
            "acme.example.",
            "Acme.Example..",
            "ａｃｍｅ.example",
        ] {
            assert_eq!(normalise_domain(spelling), "acme.example", "{spelling}");
        }
        assert_eq!(normalise_domain("bücher.example"), "xn--bcher-kva.example");
        assert_eq!(
            normalise_domain("XN--BCHER-KVA.example"),
            "xn--bcher-kva.example"
        );
        assert_eq!(normalise_domain(""), "");
        assert_eq!(normalise_domain("  "), "");
    }

    #[test]
    fn keys_are_distinct_and_keep_hash_tags_whole() {
        let a = |d: &str, e: &str| Account {
            domain: d.into(),
            email: e.into(),
        };
        // Length-prefixed: no domain/email split collides with another.
        assert_ne!(a("x:1", "b").key(), a("x", "1:b").key());
        assert_ne!(a("", "a@b").key(), a("a@b", "").key());
        assert_ne!(a("", "a@b").key(), a("", "a@b").email_key());
        for k in [a("{x}", "a}{b@c").key(), a("", "{}%7B").email_key()] {
            assert!(!k.contains(['{', '}']), "{k}");
        }
        assert_ne!(a("", "%7B").email_key(), a("", "{").email_key());
    }
}
