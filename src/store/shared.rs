//! Redis with a safety net: every operation goes to Redis with a short timeout; when Redis is
//! unreachable or slow the in-process store answers instead, so no request fails because Redis
//! did. A probe brings Redis back into use as soon as it answers again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::memory::MemoryStore;
use super::redis::RedisStore;
use super::{Limit, Lock, RateDecision, Reservation, Settlement, Store, Ticket};
use crate::metrics::Metrics;

/// How often the probe asks a missing Redis whether it is back.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Whether the shared store is in use; read by `/readyz`.
#[derive(Debug, Default)]
pub struct StoreHealth {
    degraded: AtomicBool,
}

impl StoreHealth {
    /// True while the in-process fallback answers instead of Redis.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
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
}

impl SharedStore {
    /// Wraps `redis` with `memory` as the fallback; operations wait `timeouts` (rate checks,
    /// lockout operations) for Redis.
    pub fn new(
        redis: RedisStore,
        memory: Arc<MemoryStore>,
        health: Arc<StoreHealth>,
        metrics: Arc<Metrics>,
        timeouts: (Duration, Duration),
    ) -> SharedStore {
        SharedStore {
            redis,
            memory,
            health,
            metrics,
            timeout: timeouts.0,
            lockout_timeout: timeouts.1,
        }
    }

    /// Runs `op` on Redis unless it is known to be down; `None` means: use the fallback.
    async fn try_redis<T>(
        &self,
        op: impl std::future::Future<Output = redis::RedisResult<T>>,
        timeout: Duration,
    ) -> Option<T> {
        if !self.health.degraded() {
            return self.ask_redis(op, timeout).await;
        }
        self.metrics.store_fallbacks.inc();
        None
    }

    /// Runs `op` on Redis even while it is thought down (a lockout operation: one replica's
    /// count alone would let more guesses through); `None` means: use the fallback.
    async fn ask_redis<T>(
        &self,
        op: impl std::future::Future<Output = redis::RedisResult<T>>,
        timeout: Duration,
    ) -> Option<T> {
        match tokio::time::timeout(timeout, op).await {
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

    /// One probe: brings Redis back into use when it answers.
    pub async fn probe(&self) {
        match tokio::time::timeout(
            self.timeout.max(Duration::from_millis(200)),
            self.redis.ping(),
        )
        .await
        {
            Ok(Ok(())) => self.mark_up(),
            Ok(Err(e)) => self.mark_down(&e.to_string()),
            Err(_) => self.mark_down("ping timed out"),
        }
    }
}

#[async_trait]
impl Store for SharedStore {
    async fn rate_check(&self, limit: &Limit, key: &str) -> RateDecision {
        match self
            .try_redis(self.redis.rate_check(limit, key), self.timeout)
            .await
        {
            Some(d) => d,
            None => self.memory.rate_check_now(limit, key),
        }
    }

    async fn reserve(&self, locks: &[Lock<'_>]) -> Reservation {
        // Random tickets: several replicas reserve in the same sorted sets.
        let ticket = uuid::Uuid::new_v4().as_u64_pair().0;
        match self
            .ask_redis(self.redis.reserve(locks, ticket), self.lockout_timeout)
            .await
        {
            Some(r) => r,
            None => self.memory.reserve_all(locks),
        }
    }

    async fn settle(&self, locks: &[(Lock<'_>, Settlement)], ticket: Ticket) -> bool {
        match self
            .ask_redis(self.redis.settle(locks, ticket), self.lockout_timeout)
            .await
        {
            Some(locked) => locked,
            None => self.memory.settle_all(locks, ticket),
        }
    }
}
