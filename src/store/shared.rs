//! Redis with a safety net: every operation goes to Redis with a short timeout; when Redis is
//! unreachable or slow the in-process store answers instead, so no request fails because Redis
//! did. A probe brings Redis back into use as soon as it answers again.
//!
//! The in-process store also keeps this replica's copy of every lockout key it touched, as
//! Redis last reported it: a lock seen is honoured until it ends even if Redis loses it (a
//! failover, a restart), and while Redis is away the replica counts on from the failures it
//! last saw; those counted meanwhile are added to Redis when it answers again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::lease::Leases;
use super::memory::MemoryStore;
use super::redis::{Endpoint, RedisStore, Seen};
use super::{Lock, RateCheck, RateDecision, Reservation, Settlement, Store, Ticket};
use crate::metrics::Metrics;

/// How often the probe asks a missing Redis whether it is back.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Whether the shared store is in use; read by `/readyz`.
#[derive(Debug, Default)]
pub struct StoreHealth {
    degraded: AtomicBool,
    /// What the last successful probe saw, and the store's kind.
    seen: RwLock<(Seen, &'static str)>,
}

impl StoreHealth {
    /// True while the in-process fallback answers instead of Redis.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// The deployment as the last probe saw it, and the store's kind (`None`: memory).
    pub fn seen(&self) -> Option<(Seen, &'static str)> {
        let seen = self.seen.read().ok()?;
        (!seen.1.is_empty()).then(|| seen.clone())
    }
}

/// Redis first, memory when Redis fails.
pub struct SharedStore {
    redis: RedisStore,
    memory: Arc<MemoryStore>,
    health: Arc<StoreHealth>,
    metrics: Arc<Metrics>,
    /// Deadline of a rate check.
    timeout: Duration,
    /// Deadline of a lockout operation: a login waits longer rather than be counted by one
    /// replica alone.
    lockout_timeout: Duration,
    /// The `[store] kind`, for `/readyz`.
    kind: &'static str,
    /// Rate-limit units taken from Redis ahead of need.
    leases: Leases,
}

impl SharedStore {
    /// Wraps `redis` (reached as `endpoint` says) with `memory` as the fallback.
    pub fn new(
        redis: RedisStore,
        memory: Arc<MemoryStore>,
        health: Arc<StoreHealth>,
        metrics: Arc<Metrics>,
        endpoint: &Endpoint,
    ) -> SharedStore {
        SharedStore {
            redis,
            memory,
            health,
            metrics,
            timeout: endpoint.timeout,
            lockout_timeout: endpoint.lockout_timeout,
            kind: endpoint.topology.kind(),
            leases: Leases::new(endpoint.lease),
        }
    }

    /// Gives the units of ended leases back to Redis (run every lease period). While Redis is
    /// away they are not given back; the buckets refill by themselves.
    pub async fn end_leases(&self) {
        let unspent = self.leases.ended(Instant::now());
        if unspent.is_empty() || self.health.degraded() {
            return;
        }
        for (name, key, interval, units) in unspent {
            let back = self.redis.give_back(&name, &key, interval, units);
            if tokio::time::timeout(self.timeout, back).await.is_err() {
                return;
            }
            self.metrics
                .store_leases
                .with_label_values(&["given_back"])
                .inc_by(u64::from(units));
        }
    }

    /// Runs `op` on Redis unless it is known to be down; `None` means: use the fallback.
    async fn try_redis<T>(
        &self,
        name: &'static str,
        op: impl std::future::Future<Output = redis::RedisResult<T>>,
        timeout: Duration,
    ) -> Option<T> {
        if !self.health.degraded() {
            return self.ask_redis(name, op, timeout).await;
        }
        self.metrics.store_fallbacks.inc();
        None
    }

    /// Runs `op` (`name` in metrics) on Redis even while it is thought down (a lockout
    /// operation: one replica's count alone would let more guesses through); `None` means:
    /// use the fallback.
    async fn ask_redis<T>(
        &self,
        name: &'static str,
        op: impl std::future::Future<Output = redis::RedisResult<T>>,
        timeout: Duration,
    ) -> Option<T> {
        match self.timed(name, timeout, op).await {
            Ok(Ok(v)) => {
                self.mark_up();
                return Some(v);
            }
            Ok(Err(e)) => self.mark_down(&e.to_string()),
            Err(_) => self.mark_down("timed out"),
        }
        self.metrics.store_fallbacks.inc();
        None
    }

    /// `op` with a deadline, its time counted in `gateway_store_duration_seconds{op=name}`.
    async fn timed<T>(
        &self,
        name: &'static str,
        timeout: Duration,
        op: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<redis::RedisResult<T>, tokio::time::error::Elapsed> {
        let started = Instant::now();
        let answer = tokio::time::timeout(timeout, op).await;
        self.metrics
            .store_duration
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        answer
    }

    fn mark_down(&self, why: &str) {
        // Logged once per change of state, not per request.
        if !self.health.degraded.swap(true, Ordering::Relaxed) {
            self.metrics.store_degraded.set(1);
            tracing::warn!(
                error = why,
                "redis store unavailable, using the in-process store"
            );
        }
    }

    fn mark_up(&self) {
        if self.health.degraded.swap(false, Ordering::Relaxed) {
            self.metrics.store_degraded.set(0);
            tracing::info!("redis store answers again, using it");
        }
    }

    /// True while the in-process store answers instead of Redis.
    pub fn degraded(&self) -> bool {
        self.health.degraded()
    }

    /// One probe (a keyed script, as a request would run): brings Redis back into use when
    /// it answers, takes it out when it does not, and records what the deployment looks like.
    pub async fn probe(&self) {
        let answer = self
            .timed(
                "probe",
                self.timeout.max(Duration::from_millis(200)),
                self.redis.probe(),
            )
            .await;
        match answer {
            Ok(Ok(None)) => self.mark_up(),
            Ok(Ok(Some(seen))) => {
                let nodes = &self.metrics.store_nodes;
                nodes
                    .with_label_values(&["master"])
                    .set(i64::try_from(seen.masters).unwrap_or(i64::MAX));
                nodes
                    .with_label_values(&["replica"])
                    .set(i64::try_from(seen.replicas).unwrap_or(i64::MAX));
                if let Ok(mut s) = self.health.seen.write() {
                    *s = (seen, self.kind);
                }
                self.mark_up();
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis probe failed");
                self.mark_down(&e.to_string())
            }
            Err(_) => self.mark_down("probe timed out"),
        }
    }
}

#[async_trait]
impl Store for SharedStore {
    async fn rate_check(&self, checks: &[RateCheck<'_>]) -> Vec<RateDecision> {
        let now = Instant::now();
        let mut decisions = Vec::with_capacity(checks.len());
        // Leases first, in order, up to the first check that must ask Redis; that one and the
        // rest go in one round trip (the order of counting stays the one-by-one order).
        let mut first_ask = checks.len();
        let mut want = Vec::new();
        for (i, check) in checks.iter().enumerate() {
            match self.leases.spend(check, now) {
                Ok(d) if !d.allowed => {
                    decisions.push(d);
                    return decisions;
                }
                Ok(d) => decisions.push(d),
                Err(units) => {
                    first_ask = i;
                    want.push(units);
                    break;
                }
            }
        }
        if first_ask == checks.len() {
            self.metrics
                .store_leases
                .with_label_values(&["spent"])
                .inc_by(checks.len() as u64);
            return decisions;
        }
        let asked = &checks[first_ask..];
        want.extend(asked[1..].iter().map(|c| self.leases.want(c, now)));
        match self
            .try_redis("rate", self.redis.rate_check(asked, &want), self.timeout)
            .await
        {
            Some(answers) => {
                for (check, (taken, decision)) in asked.iter().zip(answers) {
                    if taken == 0 {
                        self.leases.refused(check, &decision, now);
                    }
                    if taken > 1 {
                        self.leases.granted(check, taken, &decision, now);
                        self.metrics
                            .store_leases
                            .with_label_values(&["taken"])
                            .inc_by(u64::from(taken - 1));
                    }
                    decisions.push(decision);
                }
            }
            None => decisions.extend(self.memory.rate_check_all(asked)),
        }
        decisions
    }

    async fn reserve(&self, locks: &[Lock<'_>]) -> Reservation {
        // A lock this replica saw holds even where Redis forgot it.
        if let Some(left) = self.memory.known_lock(locks) {
            return Reservation::Locked(left);
        }
        // Random tickets: several replicas reserve in the same sorted sets.
        let ticket = uuid::Uuid::new_v4().as_u64_pair().0;
        let owed = self.memory.owed(locks);
        match self
            .ask_redis(
                "reserve",
                self.redis.reserve(locks, &owed, ticket),
                self.lockout_timeout,
            )
            .await
        {
            Some((reservation, states)) => {
                self.memory.mirror(locks, &owed, &states);
                reservation
            }
            None => self.memory.reserve_all(locks),
        }
    }

    async fn settle(&self, locks: &[(Lock<'_>, Settlement)], ticket: Ticket) -> bool {
        match self
            .ask_redis(
                "settle",
                self.redis.settle(locks, ticket),
                self.lockout_timeout,
            )
            .await
        {
            Some((locked, states)) => {
                let keys: Vec<Lock<'_>> = locks.iter().map(|(l, _)| *l).collect();
                self.memory.mirror(&keys, &[], &states);
                locked
            }
            None => self.memory.settle_offline(locks, ticket),
        }
    }
}
