//! The in-process store: governor's keyed GCRA limiters and a bounded lockout table.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use super::lock_table::LockTable;
use super::{
    Limit, Lock, LockPolicy, RateCheck, RateDecision, Reservation, Settlement, Store, Ticket,
};

thread_local! {
    /// The key of the rate check in progress on this thread.
    static KEY: RefCell<String> = const { RefCell::new(String::new()) };
}

type Keyed =
    RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// Counters kept in this process.
pub struct MemoryStore {
    /// One keyed limiter per policy, indexed by [`Limit::id`]. Append-only, so ids handed out
    /// stay valid for requests still running under an older configuration.
    limiters: ArcSwap<Vec<Arc<Keyed>>>,
    /// The parameters each id was created with.
    registered: Mutex<Vec<(String, Duration, u32)>>,
    locks: LockTable,
    tickets: AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store; policies get their limiters from [`MemoryStore::register`].
    pub fn new() -> MemoryStore {
        MemoryStore {
            limiters: ArcSwap::from_pointee(Vec::new()),
            registered: Mutex::new(Vec::new()),
            locks: LockTable::default(),
            tickets: AtomicU64::new(1),
        }
    }

    /// Gives each limit its limiter and sets its `id`. A limit with the same name, interval and
    /// burst as one registered before (an unchanged policy across a reload) keeps its limiter
    /// and so its counts; changed or new policies start afresh.
    pub fn register(&self, limits: &mut [&mut Limit]) {
        let Ok(mut registered) = self.registered.lock() else {
            return;
        };
        let mut limiters: Vec<Arc<Keyed>> = self.limiters.load().as_ref().clone();
        for l in limits.iter_mut() {
            let params = (l.name.clone(), l.interval, l.burst);
            l.id = match registered.iter().position(|p| *p == params) {
                Some(id) => id,
                None => {
                    registered.push(params);
                    limiters.push(Arc::new(
                        RateLimiter::keyed(quota(l))
                            .with_middleware::<StateInformationMiddleware>(),
                    ));
                    limiters.len() - 1
                }
            };
        }
        self.limiters.store(Arc::new(limiters));
    }

    /// Drops idle rate-limit keys and expired lockout entries. Run periodically.
    pub fn sweep(&self) {
        for l in self.limiters.load().iter() {
            l.retain_recent();
            l.shrink_to_fit();
        }
        self.locks.sweep();
    }

    /// Keys currently held by the rate limiters and the lockout table.
    pub fn key_counts(&self) -> (usize, usize) {
        let rate = self.limiters.load().iter().map(|l| l.len()).sum();
        (rate, self.locks.len())
    }
}

fn quota(l: &Limit) -> Quota {
    let burst = std::num::NonZeroU32::new(l.burst.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    Quota::with_period(l.interval)
        .unwrap_or_else(|| Quota::per_second(burst))
        .allow_burst(burst)
}

/// Time until a bucket with `remaining` free units is full again.
fn refill_time(limit: &Limit, remaining: u32) -> Duration {
    limit.interval * limit.burst.saturating_sub(remaining)
}

#[async_trait]
impl Store for MemoryStore {
    async fn rate_check(&self, checks: &[RateCheck<'_>]) -> Vec<RateDecision> {
        self.rate_check_all(checks)
    }

    async fn reserve(&self, locks: &[Lock<'_>]) -> Reservation {
        self.reserve_all(locks)
    }

    async fn settle(&self, locks: &[(Lock<'_>, Settlement)], ticket: Ticket) -> bool {
        self.settle_all(locks, ticket)
    }
}

impl MemoryStore {
    /// [`Store::rate_check`] without the future.
    pub fn rate_check_all(&self, checks: &[RateCheck<'_>]) -> Vec<RateDecision> {
        let mut decisions = Vec::with_capacity(checks.len());
        for check in checks {
            let d = self.rate_check_now(check.limit, check.key);
            decisions.push(d);
            if !d.allowed {
                break;
            }
        }
        decisions
    }

    /// One check, without the future: nothing here waits.
    pub fn rate_check_now(&self, limit: &Limit, key: &str) -> RateDecision {
        let limiters = self.limiters.load();
        let Some(limiter) = limiters.get(limit.id) else {
            // A policy the store was not built with: fail open rather than refuse everyone.
            tracing::error!(policy = %limit.name, "rate limit policy unknown to the memory store");
            return RateDecision {
                allowed: true,
                remaining: limit.burst,
                retry_after: Duration::ZERO,
                reset: Duration::ZERO,
            };
        };
        // governor takes the key as `&String`: reuse one buffer per thread rather than
        // allocate a String per request (the map clones it only for a new key).
        let checked = KEY.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            buf.push_str(key);
            limiter.check_key(&buf)
        });
        match checked {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                RateDecision {
                    allowed: true,
                    remaining,
                    retry_after: Duration::ZERO,
                    reset: refill_time(limit, remaining),
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(limiter.clock().now());
                RateDecision {
                    allowed: false,
                    remaining: 0,
                    retry_after: wait,
                    reset: refill_time(limit, 0),
                }
            }
        }
    }

    /// [`Store::reserve`] without the future.
    pub fn reserve_all(&self, locks: &[Lock<'_>]) -> Reservation {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        self.locks.reserve(locks, ticket)
    }

    /// [`Store::settle`] without the future.
    pub fn settle_all(&self, locks: &[(Lock<'_>, Settlement)], ticket: Ticket) -> bool {
        self.locks.settle(locks, ticket, false)
    }

    /// [`Store::settle`] while standing in for the shared store: failures are also owed to
    /// it ([`MemoryStore::owed`]).
    pub fn settle_offline(&self, locks: &[(Lock<'_>, Settlement)], ticket: Ticket) -> bool {
        self.locks.settle(locks, ticket, true)
    }

    /// The longest lock this replica knows of on any of `locks` (seen in the shared store or
    /// made here): kept through a shared-store outage, so one never unlocks an account.
    pub fn known_lock(&self, locks: &[Lock<'_>]) -> Option<Duration> {
        self.locks.known_lock(locks)
    }

    /// Failures counted here while the shared store was away, per key of `locks`.
    pub fn owed(&self, locks: &[Lock<'_>]) -> Vec<u32> {
        self.locks.owed(locks)
    }

    /// Takes the shared store's word on `locks` (failures, lock time left) after it was paid
    /// `paid` owed failures: this replica's copy, for when the shared store is away.
    pub fn mirror(&self, locks: &[Lock<'_>], paid: &[u32], states: &[(u32, Duration)]) {
        self.locks.mirror(locks, paid, states)
    }

    /// One key's reservation, for tests and benches.
    pub fn reserve_now(&self, key: &str, policy: &LockPolicy) -> Reservation {
        self.reserve_all(&[Lock {
            key,
            policy,
            tag: key,
        }])
    }

    /// One key's settlement, for tests and benches.
    pub fn settle_now(
        &self,
        key: &str,
        ticket: Ticket,
        outcome: Settlement,
        policy: &LockPolicy,
    ) -> bool {
        let lock = Lock {
            key,
            policy,
            tag: key,
        };
        self.settle_all(&[(lock, outcome)], ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> LockPolicy {
        LockPolicy {
            max_failures: 3,
            lock: Duration::from_millis(300),
            reservation_ttl: Duration::from_secs(10),
            max_entries: 4,
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn policies_are_checked_in_order_and_the_first_refusal_ends_the_run() {
        let mut a = Limit {
            id: 0,
            name: "a".into(),
            interval: Duration::from_secs(60),
            burst: 2,
        };
        let mut b = Limit {
            id: 0,
            name: "b".into(),
            interval: Duration::from_secs(60),
            burst: 1,
        };
        let s = MemoryStore::new();
        s.register(&mut [&mut a, &mut b]);
        let checks = [
            RateCheck {
                limit: &b,
                key: "k",
            },
            RateCheck {
                limit: &a,
                key: "k",
            },
        ];
        let first = s.rate_check_all(&checks);
        assert!(first.len() == 2 && first.iter().all(|d| d.allowed));
        // `b` refuses: `a` is not checked, so not counted.
        let second = s.rate_check_all(&checks);
        assert_eq!(second.len(), 1);
        assert!(!second[0].allowed);
        assert!(
            s.rate_check_now(&a, "k").allowed,
            "a still has its second unit"
        );
    }

    #[test]
    fn a_mirrored_lock_holds_and_offline_failures_are_owed() {
        let s = MemoryStore::new();
        let p = LockPolicy {
            max_failures: 10,
            lock: Duration::from_secs(60),
            reservation_ttl: Duration::from_secs(10),
            max_entries: 100,
        };
        let lock = Lock {
            key: "acct",
            policy: &p,
            tag: "acct",
        };
        // The shared store said: 7 failures, no lock.
        s.mirror(&[lock], &[], &[(7, Duration::ZERO)]);
        assert_eq!(s.known_lock(&[lock]), None);
        // Away: this replica counts on from 7 and owes what it counted.
        for _ in 0..2 {
            let Reservation::Granted(t) = s.reserve_all(&[lock]) else {
                panic!("refused below the bound");
            };
            s.settle_offline(&[(lock, Settlement::Failure)], t);
        }
        assert_eq!(s.owed(&[lock]), vec![2]);
        // Back: the shared store took the 2 (now 9 there) and says so.
        s.mirror(&[lock], &[2], &[(9, Duration::ZERO)]);
        assert_eq!(s.owed(&[lock]), vec![0]);
        let Reservation::Granted(t) = s.reserve_all(&[lock]) else {
            panic!("the tenth guess is allowed");
        };
        assert!(s.settle_offline(&[(lock, Settlement::Failure)], t));
        // A lock seen in the shared store outlives the shared store forgetting it.
        let other = Lock {
            key: "other",
            policy: &p,
            tag: "other",
        };
        s.mirror(&[other], &[], &[(10, Duration::from_secs(60))]);
        s.mirror(&[other], &[], &[(0, Duration::ZERO)]);
        assert!(s
            .known_lock(&[other])
            .is_some_and(|d| d > Duration::from_secs(50)));
    }

    #[test]
    fn gcra_burst_then_refuse() {
        let mut limit = Limit {
            id: 0,
            name: "p".into(),
            interval: Duration::from_secs(60),
            burst: 5,
        };
        let s = MemoryStore::new();
        s.register(&mut [&mut limit]);
        block_on(async {
            for i in 0..5 {
                let d = s.rate_check_now(&limit, "k");
                assert!(d.allowed, "request {}", i + 1);
                assert_eq!(d.remaining, 4 - i);
            }
            let d = s.rate_check_now(&limit, "k");
            assert!(!d.allowed);
            assert!(
                d.retry_after > Duration::from_secs(55),
                "{:?}",
                d.retry_after
            );
            assert!(s.rate_check_now(&limit, "other").allowed);
        });
    }

    #[test]
    fn unchanged_policies_keep_their_limiter_across_registrations() {
        let make = |name: &str, burst| Limit {
            id: 99,
            name: name.into(),
            interval: Duration::from_secs(60),
            burst,
        };
        let (mut a, mut b) = (make("a", 1), make("b", 1));
        let s = MemoryStore::new();
        s.register(&mut [&mut a, &mut b]);
        assert_eq!((a.id, b.id), (0, 1));
        assert!(s.rate_check_now(&a, "k").allowed);
        assert!(!s.rate_check_now(&a, "k").allowed);
        // A reload: `a` unchanged keeps its count, `b` changed gets a new limiter.
        let (mut a2, mut b2) = (make("a", 1), make("b", 2));
        s.register(&mut [&mut b2, &mut a2]);
        assert_eq!((a2.id, b2.id), (0, 2));
        assert!(!s.rate_check_now(&a2, "k").allowed);
        assert!(s.rate_check_now(&b, "k").allowed, "old ids stay valid");
    }

    #[test]
    fn a_guess_is_reserved_under_every_key_or_none() {
        let s = MemoryStore::new();
        let (one, three) = (
            LockPolicy {
                max_failures: 1,
                ..policy()
            },
            policy(),
        );
        let lock = |key, policy| Lock {
            key,
            policy,
            tag: "t",
        };
        let Reservation::Granted(t) = s.reserve_all(&[lock("acct", &one), lock("email", &three)])
        else {
            panic!()
        };
        // The account's one slot is in flight: no slot is taken on the email either.
        let again = s.reserve_all(&[lock("acct", &one), lock("email", &three)]);
        assert!(matches!(again, Reservation::Locked(_)));
        assert_eq!(s.locks.get("email").unwrap().pending.len(), 1);
        // One settlement, each key by its own outcome.
        let settled = [
            (lock("acct", &one), Settlement::Failure),
            (lock("email", &three), Settlement::Refund),
        ];
        assert!(s.settle_all(&settled, t));
        assert_eq!(s.locks.get("acct").unwrap().failures, 1);
        assert!(s.locks.get("email").is_none());
    }

    #[test]
    fn lockout_reserve_settle_cycle() {
        let s = MemoryStore::new();
        let p = policy();
        block_on(async {
            // Three slots, all taken: the fourth waits.
            let t: Vec<_> = (0..3).map(|_| ()).collect();
            let mut tickets = Vec::new();
            for _ in &t {
                match s.reserve_now("a", &p) {
                    Reservation::Granted(t) => tickets.push(t),
                    other => panic!("{other:?}"),
                }
            }
            assert!(matches!(s.reserve_now("a", &p), Reservation::Locked(_)));
            // A refund frees a slot; failures lock on the third.
            s.settle_now("a", tickets[0], Settlement::Refund, &p);
            assert!(!s.settle_now("a", tickets[1], Settlement::Failure, &p));
            assert!(!s.settle_now("a", tickets[2], Settlement::Failure, &p));
            let Reservation::Granted(t) = s.reserve_now("a", &p) else {
                panic!()
            };
            assert!(
                s.settle_now("a", t, Settlement::Failure, &p),
                "third failure locks"
            );
            assert!(matches!(s.reserve_now("a", &p), Reservation::Locked(d) if d <= p.lock));
            tokio::time::sleep(p.lock + Duration::from_millis(20)).await;
            // The lock ran out and the count starts afresh.
            let Reservation::Granted(t) = s.reserve_now("a", &p) else {
                panic!()
            };
            s.settle_now("a", t, Settlement::Success, &p);
            assert_eq!(s.key_counts().1, 0, "idle entries are dropped");
        });
    }

    #[test]
    fn success_resets_failures() {
        let s = MemoryStore::new();
        let p = policy();
        block_on(async {
            for _ in 0..2 {
                let Reservation::Granted(t) = s.reserve_now("a", &p) else {
                    panic!()
                };
                s.settle_now("a", t, Settlement::Failure, &p);
            }
            let Reservation::Granted(t) = s.reserve_now("a", &p) else {
                panic!()
            };
            s.settle_now("a", t, Settlement::Success, &p);
            for _ in 0..2 {
                let Reservation::Granted(t) = s.reserve_now("a", &p) else {
                    panic!()
                };
                assert!(!s.settle_now("a", t, Settlement::Failure, &p));
            }
        });
    }

    #[test]
    fn table_is_bounded_and_keeps_attacked_keys() {
        let s = MemoryStore::new();
        let p = policy();
        block_on(async {
            // "victim" is locked; three more keys with one failure each fill the table.
            for _ in 0..3 {
                let Reservation::Granted(t) = s.reserve_now("victim", &p) else {
                    panic!()
                };
                s.settle_now("victim", t, Settlement::Failure, &p);
            }
            for k in ["x1", "x2", "x3"] {
                let Reservation::Granted(t) = s.reserve_now(k, &p) else {
                    panic!()
                };
                s.settle_now(k, t, Settlement::Failure, &p);
            }
            assert_eq!(s.key_counts().1, 4);
            for i in 0..50 {
                let k = format!("flood{i}");
                if let Reservation::Granted(t) = s.reserve_now(&k, &p) {
                    s.settle_now(&k, t, Settlement::Failure, &p);
                }
            }
            assert!(s.key_counts().1 <= 4);
            assert!(matches!(
                s.reserve_now("victim", &p),
                Reservation::Locked(_)
            ));
        });
    }
}
