//! Shared counters behind one trait: GCRA rate limits and the login lockout.
//!
//! [`memory::MemoryStore`] keeps them in this process; [`shared::SharedStore`] keeps them in Redis
//! (with the memory store as its fallback) with the same semantics, so every replica sees one
//! truth.

pub mod lease;
mod lock_table;
pub mod memory;
pub mod redis;
mod scripts;
pub mod shared;

use std::borrow::Cow;
use std::time::Duration;

use async_trait::async_trait;

/// One rate-limit policy's parameters (GCRA).
#[derive(Debug, Clone)]
pub struct Limit {
    /// The memory store's limiter slot, set by [`memory::MemoryStore::register`].
    pub id: usize,
    /// Policy name, for keys, metrics and headers.
    pub name: String,
    /// Time for one unit to replenish.
    pub interval: Duration,
    /// Most requests allowed at once.
    pub burst: u32,
}

impl Limit {
    /// Time for an empty bucket to refill completely (the `w` of `RateLimit-Policy`).
    pub fn window(&self) -> Duration {
        self.interval * self.burst
    }
}

/// One rate-limit check of a request: a policy and the key it counts.
#[derive(Debug, Clone, Copy)]
pub struct RateCheck<'a> {
    /// The policy.
    pub limit: &'a Limit,
    /// What it counts (a client address, a user, a tenant).
    pub key: &'a str,
}

/// The outcome of one rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the request may pass.
    pub allowed: bool,
    /// Requests still allowed right now after this one.
    pub remaining: u32,
    /// When refused: how long until one request would be allowed.
    pub retry_after: Duration,
    /// How long until the bucket is full again.
    pub reset: Duration,
}

/// The rules one lockout key is held to (the login guard holds an account and its email to
/// different ones: [`crate::limits::lockout::Guard`]).
#[derive(Debug, Clone)]
pub struct LockPolicy {
    /// Failed guesses that lock the key.
    pub max_failures: u32,
    /// How long a lock lasts, and how long failures are remembered after the last one.
    pub lock: Duration,
    /// How long a reserved slot is held before it is given back on its own (a request that
    /// never settled, e.g. a replica that died).
    pub reservation_ttl: Duration,
    /// Most keys kept in memory.
    pub max_entries: usize,
}

/// One key of a lockout operation: the key, the policy it is held to, and the hash tag that
/// keeps every key of one operation in one Redis Cluster slot (it must hold no `{` or `}`).
#[derive(Debug, Clone, Copy)]
pub struct Lock<'a> {
    /// The key.
    pub key: &'a str,
    /// Its policy.
    pub policy: &'a LockPolicy,
    /// Shared by every key of the operation.
    pub tag: &'a str,
}

/// Proof of a reserved guess, to settle it later.
pub type Ticket = u64;

/// The answer to a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// The guess may go to the upstream.
    Granted(Ticket),
    /// Locked, or every slot is taken by guesses in flight: refuse for this long.
    Locked(Duration),
    /// The store is full and nothing can be evicted: refuse without revealing anything.
    Full,
}

/// How a reserved guess ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// The upstream said 401: the guess is used up.
    Failure,
    /// The upstream said 2xx: the key starts afresh.
    Success,
    /// Anything else (5xx, timeout, client gone): the slot is given back.
    Refund,
}

/// Counters shared by everything that must agree on them.
#[async_trait]
pub trait Store: Send + Sync {
    /// Checks `checks` in order, counting each allowed one, and stops at the first refusal
    /// (as checking them one by one would): one decision per check made, the refusal last.
    async fn rate_check(&self, checks: &[RateCheck<'_>]) -> Vec<RateDecision>;

    /// Reserves one guess under every one of `locks`: granted on all of them, or on none (then
    /// the first refusal says why). Never over a key's limit; two guesses racing for the last
    /// slots may both be refused where a strict order would have let one in.
    async fn reserve(&self, locks: &[Lock<'_>]) -> Reservation;

    /// Settles a guess reserved under `locks`, each by its own outcome, atomically; true when
    /// this locked any of them.
    async fn settle(&self, locks: &[(Lock<'_>, Settlement)], ticket: Ticket) -> bool;
}

/// `s` with `{`, `}` and `%` escaped, so that a Redis Cluster hash tag around it stays whole
/// whatever a client put in it (an email, a subject).
pub fn tag_safe(s: &str) -> Cow<'_, str> {
    if memchr::memchr3(b'{', b'}', b'%', s.as_bytes()).is_none() {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.replace('%', "%25")
            .replace('{', "%7B")
            .replace('}', "%7D"),
    )
}
