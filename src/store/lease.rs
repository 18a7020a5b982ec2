//! Rate-limit units a replica takes from Redis ahead of need and spends without asking again.
//!
//! A round trip per request cannot run at the memory store's speed, so a key this replica
//! checked within the last lease period takes a slice of its bucket at once (at most
//! `units`, and at most `share` of the burst); the next requests on the same key spend it
//! here. What a lease did not spend when it ends goes back to the bucket.
//!
//! Why this never lets more through than the limit: every unit spent was taken from the
//! shared bucket first, which was allowed to hand it out at that moment. The price is the
//! other way: units one replica holds are missing from the others' view, so a client whose
//! requests are spread over N replicas may be refused up to (N − 1) × (slice − 1) units early,
//! for at most one lease period. A slice is 1 (no lease) for bursts under 1 / `share`, so
//! small limits stay exact.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{RateCheck, RateDecision};

const SHARDS: usize = 16;

/// How big a slice is and how long it lasts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeasePolicy {
    /// Most units one lease takes (0 or 1: every check asks Redis).
    pub units: u32,
    /// Most of a burst one lease takes.
    pub share: f64,
    /// How long a lease lasts; also how recently a key must have been seen to get one.
    pub period: Duration,
    /// Most keys tracked (seen or leased) at once.
    pub max_entries: usize,
}

/// One key's lease (or, with nothing `left`, the mark that it was seen lately).
#[derive(Debug)]
struct Lease {
    left: u32,
    until: Instant,
    /// Redis refused this key: refuse here without asking until the first instant, telling
    /// clients to come back at the second (Redis's own answer).
    refused_until: Option<(Instant, Instant)>,
    /// What Redis said was left in the bucket when it granted the lease.
    remaining: u32,
    interval: Duration,
}

/// Units a lease did not spend, to give back: the policy name, the key, its interval.
pub type Unspent = (String, String, Duration, u32);

/// The leases of one replica, sharded by key.
pub struct Leases {
    policy: LeasePolicy,
    shards: Vec<Mutex<HashMap<String, Lease>>>,
    hasher: RandomState,
}

impl Leases {
    /// No leases yet.
    pub fn new(policy: LeasePolicy) -> Leases {
        Leases {
            policy,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn slot(name: &str, key: &str) -> String {
        // The NUL keeps ("a", "b:c") and ("a:b", "c") apart.
        let mut s = String::with_capacity(name.len() + key.len() + 1);
        s.push_str(name);
        s.push('\0');
        s.push_str(key);
        s
    }

    fn shard(&self, slot: &str) -> &Mutex<HashMap<String, Lease>> {
        let i = self.hasher.hash_one(slot) as usize % SHARDS;
        &self.shards[i]
    }

    /// The slice a lease of `check` takes.
    fn slice(&self, check: &RateCheck<'_>) -> u32 {
        let by_share = (f64::from(check.limit.burst) * self.policy.share).floor() as u32;
        self.policy.units.min(by_share).max(1)
    }

    /// Spends one unit of a live lease of `check` (`Ok`: the decision), or says how many
    /// units to ask Redis for (`Err`): a slice when the key was seen lately, else one. Marks
    /// the key as seen.
    pub fn spend(&self, check: &RateCheck<'_>, now: Instant) -> Result<RateDecision, u32> {
        self.spend_or_mark(check, now, true)
    }

    fn spend_or_mark(
        &self,
        check: &RateCheck<'_>,
        now: Instant,
        spend: bool,
    ) -> Result<RateDecision, u32> {
        let slot = Self::slot(&check.limit.name, check.key);
        let Ok(mut shard) = self.shard(&slot).lock() else {
            return Err(1);
        };
        if let Some((until, retry_at)) = shard.get(&slot).and_then(|l| l.refused_until) {
            if until > now && spend {
                return Ok(RateDecision {
                    allowed: false,
                    remaining: 0,
                    retry_after: retry_at.saturating_duration_since(now),
                    reset: check.limit.interval * check.limit.burst,
                });
            }
        }
        if self.slice(check) <= 1 {
            return Err(1);
        }
        match shard.get_mut(&slot) {
            Some(lease) if lease.until > now => {
                if lease.left == 0 {
                    return Err(self.slice(check));
                }
                if !spend {
                    return Err(1);
                }
                lease.left -= 1;
                let remaining = lease.remaining.saturating_add(lease.left);
                Ok(RateDecision {
                    allowed: true,
                    remaining,
                    retry_after: Duration::ZERO,
                    reset: check.limit.interval * check.limit.burst.saturating_sub(remaining),
                })
            }
            // Expired with units left: the sweeper gives them back; this request asks anew.
            Some(_) => Err(1),
            None => {
                if shard.len() < self.policy.max_entries / SHARDS {
                    shard.insert(
                        slot,
                        Lease {
                            left: 0,
                            until: now + self.policy.period,
                            refused_until: None,
                            remaining: 0,
                            interval: check.limit.interval,
                        },
                    );
                }
                Err(1)
            }
        }
    }

    /// How many units to ask Redis for on a check that goes there anyway (behind another
    /// policy's round trip): a slice when the key has an empty lease, else one.
    pub fn want(&self, check: &RateCheck<'_>, now: Instant) -> u32 {
        match self.spend_or_mark(check, now, false) {
            Ok(_) => 1,
            Err(n) => n,
        }
    }

    /// Remembers that Redis refused `check` for `decision.retry_after` (at most a lease
    /// period): until then the key is refused here. Nothing frees a unit sooner but an
    /// unspent lease given back, so a cached refusal errs by at most one lease period.
    pub fn refused(&self, check: &RateCheck<'_>, decision: &RateDecision, now: Instant) {
        let slot = Self::slot(&check.limit.name, check.key);
        let Ok(mut shard) = self.shard(&slot).lock() else {
            return;
        };
        let retry_at = now + decision.retry_after;
        let until = now + decision.retry_after.min(self.policy.period);
        let room = shard.len() < self.policy.max_entries / SHARDS;
        match shard.get_mut(&slot) {
            Some(lease) => {
                lease.refused_until = Some((until, retry_at));
                lease.until = lease.until.max(until);
            }
            None if room => {
                shard.insert(
                    slot,
                    Lease {
                        left: 0,
                        until,
                        refused_until: Some((until, retry_at)),
                        remaining: 0,
                        interval: check.limit.interval,
                    },
                );
            }
            None => {}
        }
    }

    /// Keeps what Redis granted beyond the one unit the request spent.
    pub fn granted(
        &self,
        check: &RateCheck<'_>,
        taken: u32,
        decision: &RateDecision,
        now: Instant,
    ) {
        if taken <= 1 {
            return;
        }
        let slot = Self::slot(&check.limit.name, check.key);
        let Ok(mut shard) = self.shard(&slot).lock() else {
            return;
        };
        // Inserted if the mark went meanwhile: units taken from the bucket are never dropped.
        let lease = shard.entry(slot).or_insert(Lease {
            left: 0,
            until: now,
            refused_until: None,
            remaining: 0,
            interval: check.limit.interval,
        });
        lease.left += taken - 1;
        lease.until = now + self.policy.period;
        lease.remaining = decision.remaining;
        lease.refused_until = None;
    }

    /// Removes every ended lease and mark; the units leases did not spend, to give back.
    pub fn ended(&self, now: Instant) -> Vec<Unspent> {
        let mut unspent = Vec::new();
        for shard in &self.shards {
            let Ok(mut shard) = shard.lock() else {
                continue;
            };
            shard.retain(|slot, lease| {
                if lease.until > now {
                    return true;
                }
                if lease.left > 0 {
                    let (name, key) = slot.split_once('\0').unwrap_or((slot.as_str(), ""));
                    unspent.push((name.to_owned(), key.to_owned(), lease.interval, lease.left));
                }
                false
            });
        }
        unspent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Limit;

    fn leases(units: u32) -> Leases {
        Leases::new(LeasePolicy {
            units,
            share: 0.1,
            period: Duration::from_millis(200),
            max_entries: 1600,
        })
    }

    fn limit(burst: u32) -> Limit {
        Limit {
            id: 0,
            name: "p".into(),
            interval: Duration::from_millis(10),
            burst,
        }
    }

    #[test]
    fn a_key_seen_lately_gets_a_slice_and_spends_it_here() {
        let l = leases(8);
        let lim = limit(1000);
        let c = RateCheck {
            limit: &lim,
            key: "k",
        };
        let now = Instant::now();
        // First sight: one unit; the next check asks for a slice.
        assert_eq!(l.spend(&c, now), Err(1));
        assert_eq!(l.spend(&c, now), Err(8));
        let d = RateDecision {
            allowed: true,
            remaining: 900,
            retry_after: Duration::ZERO,
            reset: Duration::ZERO,
        };
        l.granted(&c, 8, &d, now);
        for i in 0..7 {
            let got = l.spend(&c, now).expect("spent here");
            assert_eq!(got.remaining, 900 + 6 - i);
        }
        assert_eq!(l.spend(&c, now), Err(8), "used up: ask again");
        // Ended with nothing left: nothing to give back.
        assert!(l.ended(now + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn a_refusal_is_remembered_for_its_wait_or_a_period() {
        let l = leases(8);
        let lim = limit(5);
        let c = RateCheck {
            limit: &lim,
            key: "k",
        };
        let now = Instant::now();
        let no = RateDecision {
            allowed: false,
            remaining: 0,
            retry_after: Duration::from_millis(50),
            reset: Duration::ZERO,
        };
        l.refused(&c, &no, now);
        let d = l
            .spend(&c, now + Duration::from_millis(10))
            .expect("refused here");
        assert!(!d.allowed && d.retry_after == Duration::from_millis(40));
        assert_eq!(l.spend(&c, now + Duration::from_millis(50)), Err(1));
        // A long wait is remembered for one period only.
        let long = RateDecision {
            retry_after: Duration::from_secs(60),
            ..no
        };
        l.refused(&c, &long, now);
        let d = l
            .spend(&c, now + Duration::from_millis(199))
            .expect("refused here");
        assert_eq!(
            d.retry_after,
            Duration::from_millis(59_801),
            "Redis's wait, not the cache's"
        );
        assert_eq!(l.spend(&c, now + Duration::from_millis(200)), Err(1));
    }

    #[test]
    fn unspent_units_are_given_back_and_small_bursts_never_lease() {
        let l = leases(8);
        let lim = limit(1000);
        let c = RateCheck {
            limit: &lim,
            key: "k",
        };
        let now = Instant::now();
        let d = RateDecision {
            allowed: true,
            remaining: 0,
            retry_after: Duration::ZERO,
            reset: Duration::ZERO,
        };
        let _ = l.spend(&c, now);
        l.granted(&c, 8, &d, now);
        let _ = l.spend(&c, now);
        let back = l.ended(now + Duration::from_secs(1));
        assert_eq!(back, vec![("p".into(), "k".into(), lim.interval, 6)]);
        // Burst 9 with share 0.1: a slice of 0, so one unit at a time, always from Redis.
        let small = limit(9);
        let c = RateCheck {
            limit: &small,
            key: "k",
        };
        for _ in 0..3 {
            assert_eq!(l.spend(&c, now), Err(1));
        }
    }
}
