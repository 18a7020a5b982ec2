//! The in-process lockout table: per key, the failed guesses, the lock and the guesses in flight.
//!
//! Bounded by `max_entries` with an eviction order that costs O(1) per insert (quick_cache's
//! CLOCK-Pro: a key seen once goes first, keys guessed at again and again stay), so a flood of
//! fresh emails never pauses the table to rank it. Locked keys and keys with a guess in flight
//! are pinned: eviction never forgets a lock or a slot. When pinned keys alone fill the table,
//! a new key is refused ([`Reservation::Full`]) rather than let in unbounded.

use std::collections::hash_map::RandomState;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use quick_cache::sync::{Cache, EntryAction, EntryResult, PlaceholderGuard};
use quick_cache::{Lifecycle, OptionsBuilder, UnitWeighter};

use super::{Lock, LockPolicy, Reservation, Settlement, Ticket};

/// The lockout state of one key.
#[derive(Debug, Default, Clone)]
pub(crate) struct Entry {
    /// Failed guesses since the count last started.
    pub(crate) failures: u32,
    /// When the failures are forgotten (sliding: `lock` after the last failure).
    forget_at: Option<Instant>,
    /// Until when the key is locked.
    locked_until: Option<Instant>,
    /// Guesses in flight and when each slot expires by itself.
    pub(crate) pending: Vec<(Ticket, Instant)>,
    /// Failures counted here while the shared store was away, not yet added to it.
    unsynced: u32,
}

impl Entry {
    /// Drops whatever expired by `now`.
    fn expire(&mut self, now: Instant) {
        if self.locked_until.is_some_and(|t| t <= now) {
            // The lock ran out: the next period starts from zero.
            self.locked_until = None;
            self.failures = 0;
            self.forget_at = None;
            self.unsynced = 0;
        }
        if self.forget_at.is_some_and(|t| t <= now) {
            self.failures = 0;
            self.forget_at = None;
            self.unsynced = 0;
        }
        self.pending.retain(|(_, until)| *until > now);
    }

    fn is_idle(&self) -> bool {
        self.failures == 0 && self.locked_until.is_none() && self.pending.is_empty()
    }

    /// Whether [`Entry::expire`] at `now` would leave nothing worth keeping.
    fn idle_at(&self, now: Instant) -> bool {
        let counting = self.failures > 0 && self.forget_at.is_some_and(|t| t > now);
        let locked = self.locked_until.is_some_and(|t| t > now);
        let in_flight = self.pending.iter().any(|(_, until)| *until > now);
        !(counting || locked || in_flight)
    }
}

/// Never evicts a lock or a key with a guess in flight (an expired one is swept instead).
#[derive(Debug, Clone, Copy, Default)]
struct Pins;

impl Lifecycle<String, Entry> for Pins {
    type RequestState = ();

    fn is_pinned(&self, _key: &String, entry: &Entry) -> bool {
        entry.locked_until.is_some() || !entry.pending.is_empty()
    }
}

/// SipHash with a random key: the keys are emails a client chose.
type Table = Cache<String, Entry, UnitWeighter, RandomState, Pins>;
type Guard<'a> = PlaceholderGuard<'a, String, Entry, UnitWeighter, RandomState, Pins>;

/// The table, built at its first use with the policies' `max_entries`.
#[derive(Default)]
pub(crate) struct LockTable {
    table: OnceLock<Table>,
    /// The `max_entries` the table was last sized for (a reload may change it).
    sized_for: AtomicUsize,
}

impl LockTable {
    /// The table, sized for the smallest of the policies' `max_entries`.
    fn sized(&self, max_entries: impl Iterator<Item = usize>) -> &Table {
        let max_entries = max_entries.min().unwrap_or(1).max(1);
        let table = self.table.get_or_init(|| {
            let options = OptionsBuilder::new()
                .estimated_items_capacity(max_entries)
                .weight_capacity(max_entries as u64)
                .build();
            self.sized_for.store(max_entries, Ordering::Relaxed);
            match options {
                Ok(o) => Cache::with_options(o, UnitWeighter, RandomState::new(), Pins),
                // Only a zero capacity is refused, and max_entries is at least 1.
                Err(_) => Cache::with(
                    max_entries,
                    max_entries as u64,
                    UnitWeighter,
                    RandomState::new(),
                    Pins,
                ),
            }
        });
        // A read on every operation; a write only when a reload changed the bound.
        if self.sized_for.load(Ordering::Relaxed) != max_entries {
            self.sized_for.store(max_entries, Ordering::Relaxed);
            table.set_capacity(max_entries as u64);
        }
        table
    }

    /// Stores `entry` in the place a vacant lookup of `key` kept for it; false when only
    /// pinned keys were left to evict for it (then nothing of it stays).
    fn fill(table: &Table, key: &str, guard: Guard<'_>, entry: Entry, ticket: Ticket) -> bool {
        if guard.insert(entry).is_err() {
            return false;
        }
        if table.weight() > table.capacity() {
            // Nothing evictable made room: the table is full of locks and guesses in flight.
            Self::give_back(table, key, ticket, Instant::now());
            return false;
        }
        true
    }

    /// Takes one slot for `ticket` under every key of `locks`, or none. Keys are taken one by
    /// one, each atomically, and given back when a later one refuses: a guess racing another
    /// for the last slot may be refused where strict order would have let one of them in,
    /// never let in over the limit.
    pub(crate) fn reserve(&self, locks: &[Lock<'_>], ticket: Ticket) -> Reservation {
        let now = Instant::now();
        let table = self.sized(locks.iter().map(|l| l.policy.max_entries));
        for (i, lock) in locks.iter().enumerate() {
            let verdict = Self::take(table, lock, ticket, now);
            if verdict != Reservation::Granted(ticket) {
                for taken in &locks[..i] {
                    Self::give_back(table, taken.key, ticket, now);
                }
                return verdict;
            }
        }
        Reservation::Granted(ticket)
    }

    fn take(table: &Table, lock: &Lock<'_>, ticket: Ticket, now: Instant) -> Reservation {
        let slot = (ticket, now + lock.policy.reservation_ttl);
        let found = table.entry(lock.key, None, |_, e| {
            e.expire(now);
            if let Some(until) = e.locked_until {
                return EntryAction::Retain(Reservation::Locked(until - now));
            }
            if e.failures + e.pending.len() as u32 >= lock.policy.max_failures {
                // Every remaining guess is in flight; a slot frees up when one settles.
                return EntryAction::Retain(Reservation::Locked(Duration::from_secs(1)));
            }
            e.pending.push(slot);
            EntryAction::Retain(Reservation::Granted(ticket))
        });
        match found {
            EntryResult::Retained(verdict) => verdict,
            EntryResult::Vacant(guard) => {
                let entry = Entry {
                    pending: vec![slot],
                    ..Entry::default()
                };
                if Self::fill(table, lock.key, guard, entry, ticket) {
                    Reservation::Granted(ticket)
                } else {
                    Reservation::Full
                }
            }
            EntryResult::Removed(..) | EntryResult::Replaced(..) | EntryResult::Timeout => {
                Reservation::Full
            }
        }
    }

    fn give_back(table: &Table, key: &str, ticket: Ticket, now: Instant) {
        let _ = table.entry(key, None, |_, e| {
            e.expire(now);
            e.pending.retain(|(t, _)| *t != ticket);
            if e.is_idle() {
                EntryAction::Remove
            } else {
                EntryAction::Retain(())
            }
        });
    }

    /// Settles `ticket` on every key by its own outcome (`offline`: also owed to the shared
    /// store); true when this locked one of them.
    pub(crate) fn settle(
        &self,
        locks: &[(Lock<'_>, Settlement)],
        ticket: Ticket,
        offline: bool,
    ) -> bool {
        let now = Instant::now();
        let table = self.sized(locks.iter().map(|(l, _)| l.policy.max_entries));
        let mut locked = false;
        for (lock, outcome) in locks {
            locked |= Self::settle_one(table, lock, ticket, *outcome, now, offline);
        }
        locked
    }

    fn settle_one(
        table: &Table,
        lock: &Lock<'_>,
        ticket: Ticket,
        outcome: Settlement,
        now: Instant,
        offline: bool,
    ) -> bool {
        let result = table.entry(lock.key, None, |_, e| {
            e.expire(now);
            e.pending.retain(|(t, _)| *t != ticket);
            let locked = match outcome {
                Settlement::Failure => fail(e, now, lock.policy, offline),
                Settlement::Success => {
                    e.failures = 0;
                    e.forget_at = None;
                    e.unsynced = 0;
                    false
                }
                Settlement::Refund => false,
            };
            if e.is_idle() {
                EntryAction::Remove
            } else {
                EntryAction::Retain(locked)
            }
        });
        match result {
            EntryResult::Retained(locked) => locked,
            // Swept meanwhile (its slot expired): a late failure still counts, even over the
            // bound (late settlements are as few as the guesses that were in flight).
            EntryResult::Vacant(guard) if outcome == Settlement::Failure => {
                let mut entry = Entry::default();
                let locked = fail(&mut entry, now, lock.policy, offline);
                guard.insert(entry).is_ok() && locked
            }
            _ => false,
        }
    }

    /// The longest lock this table holds on any of `locks`.
    pub(crate) fn known_lock(&self, locks: &[Lock<'_>]) -> Option<Duration> {
        let table = self.table.get()?;
        let now = Instant::now();
        locks
            .iter()
            .filter_map(|l| table.peek(l.key)?.locked_until)
            .filter(|until| *until > now)
            .max()
            .map(|until| until - now)
    }

    /// Failures counted while the shared store was away, per key of `locks`.
    pub(crate) fn owed(&self, locks: &[Lock<'_>]) -> Vec<u32> {
        let Some(table) = self.table.get() else {
            return vec![0; locks.len()];
        };
        locks
            .iter()
            .map(|l| table.peek(l.key).map_or(0, |e| e.unsynced))
            .collect()
    }

    /// Takes the shared store's word on `locks` (failures, lock time left) after it was paid
    /// `paid` owed failures.
    pub(crate) fn mirror(&self, locks: &[Lock<'_>], paid: &[u32], states: &[(u32, Duration)]) {
        let now = Instant::now();
        let table = self.sized(locks.iter().map(|l| l.policy.max_entries));
        for (i, (lock, (failures, lock_left))) in locks.iter().zip(states).enumerate() {
            let paid = paid.get(i).copied().unwrap_or(0);
            let take_word = |e: &mut Entry| {
                e.unsynced = e.unsynced.saturating_sub(paid);
                e.failures = failures.saturating_add(e.unsynced);
                e.forget_at = (e.failures > 0).then(|| now + lock.policy.lock);
                if !lock_left.is_zero() {
                    let until = now + *lock_left;
                    e.locked_until = Some(e.locked_until.map_or(until, |t| t.max(until)));
                }
            };
            let found = table.entry(lock.key, None, |_, e| {
                e.expire(now);
                take_word(e);
                if e.is_idle() {
                    EntryAction::Remove
                } else {
                    EntryAction::Retain(())
                }
            });
            if let EntryResult::Vacant(guard) = found {
                if *failures == 0 && lock_left.is_zero() {
                    // Nothing to remember: the table keeps to keys that matter.
                    continue;
                }
                let mut entry = Entry::default();
                take_word(&mut entry);
                if guard.insert(entry).is_ok() && table.weight() > table.capacity() {
                    // Full of pinned keys: the shared store stays the only copy.
                    table.remove(lock.key);
                }
            }
        }
    }

    /// Drops expired entries. Run periodically.
    pub(crate) fn sweep(&self) {
        if let Some(table) = self.table.get() {
            let now = Instant::now();
            table.retain(|_, e| !e.idle_at(now));
        }
    }

    /// Keys held.
    pub(crate) fn len(&self) -> usize {
        self.table.get().map_or(0, |t| t.len())
    }

    /// A copy of one key's entry, for tests.
    #[cfg(test)]
    pub(crate) fn get(&self, key: &str) -> Option<Entry> {
        self.table.get()?.peek(key)
    }
}

fn fail(entry: &mut Entry, now: Instant, policy: &LockPolicy, offline: bool) -> bool {
    if entry.locked_until.is_some() {
        return false;
    }
    entry.failures += 1;
    if offline {
        entry.unsynced += 1;
    }
    entry.forget_at = Some(now + policy.lock);
    if entry.failures >= policy.max_failures {
        entry.locked_until = Some(now + policy.lock);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_entries: usize) -> LockPolicy {
        LockPolicy {
            max_failures: 3,
            lock: Duration::from_secs(60),
            reservation_ttl: Duration::from_secs(10),
            max_entries,
        }
    }

    fn guess(t: &LockTable, key: &str, ticket: Ticket, p: &LockPolicy, outcome: Settlement) {
        let lock = Lock {
            key,
            policy: p,
            tag: key,
        };
        if t.reserve(&[lock], ticket) == Reservation::Granted(ticket) {
            t.settle(&[(lock, outcome)], ticket, false);
        }
    }

    #[test]
    fn a_flood_of_fresh_keys_stays_bounded_and_keeps_locks_slots_and_attacked_keys() {
        let t = LockTable::default();
        let p = policy(1000);
        let attacked = LockPolicy {
            max_failures: 1000,
            ..policy(1000)
        };
        let mut ticket = 0;
        let mut next = || {
            ticket += 1;
            ticket
        };
        for _ in 0..3 {
            guess(&t, "locked", next(), &p, Settlement::Failure);
        }
        let busy = next();
        let lock = Lock {
            key: "busy",
            policy: &p,
            tag: "busy",
        };
        assert_eq!(t.reserve(&[lock], busy), Reservation::Granted(busy));
        guess(&t, "seen", next(), &p, Settlement::Failure);
        // 50 tables' worth of one-time guesses on fresh keys, while an attacker also guesses at
        // one account every 500 of them (half a table).
        for i in 0..50_000 {
            if i % 500 == 0 {
                guess(&t, "victim", next(), &attacked, Settlement::Failure);
            }
            if i == 300 {
                let seen = t.get("seen").map(|e| e.failures);
                assert_eq!(seen, Some(1), "kept through {i} fresh keys");
            }
            guess(&t, &format!("fresh{i}"), next(), &p, Settlement::Failure);
            assert!(
                t.len() <= 1000,
                "bounded at every insert, {} after {i}",
                t.len()
            );
        }
        assert!(t.get("locked").is_some_and(|e| e.locked_until.is_some()));
        assert_eq!(t.get("busy").map(|e| e.pending.len()), Some(1));
        assert_eq!(
            t.get("victim").map(|e| e.failures),
            Some(100),
            "no guess forgotten"
        );
        // The lock still refuses, and the slot in flight still counts.
        let lock = Lock {
            key: "locked",
            policy: &p,
            tag: "locked",
        };
        assert!(matches!(t.reserve(&[lock], next()), Reservation::Locked(_)));
    }

    #[test]
    fn a_table_full_of_pinned_keys_refuses_new_ones_and_forgets_nothing() {
        let t = LockTable::default();
        let p = policy(40);
        for i in 0..40u64 {
            let key = format!("k{i}");
            let lock = Lock {
                key: &key,
                policy: &p,
                tag: &key,
            };
            assert_eq!(t.reserve(&[lock], i), Reservation::Granted(i));
        }
        let lock = Lock {
            key: "new",
            policy: &p,
            tag: "new",
        };
        assert_eq!(t.reserve(&[lock], 99), Reservation::Full);
        assert!(t.get("new").is_none());
        assert!((0..40).all(|i| t
            .get(&format!("k{i}"))
            .is_some_and(|e| e.pending.len() == 1)));
        // A settled guess unpins its key and makes room.
        let lock = Lock {
            key: "k0",
            policy: &p,
            tag: "k0",
        };
        t.settle(&[(lock, Settlement::Refund)], 0, false);
        let lock = Lock {
            key: "new",
            policy: &p,
            tag: "new",
        };
        assert_eq!(t.reserve(&[lock], 100), Reservation::Granted(100));
    }

    #[test]
    fn sweep_drops_expired_locks_and_slots() {
        let t = LockTable::default();
        let p = LockPolicy {
            lock: Duration::from_millis(30),
            reservation_ttl: Duration::from_millis(30),
            ..policy(100)
        };
        for ticket in 0..3 {
            guess(&t, "a", ticket, &p, Settlement::Failure);
        }
        let lock = Lock {
            key: "b",
            policy: &p,
            tag: "b",
        };
        t.reserve(&[lock], 9);
        assert_eq!(t.len(), 2);
        std::thread::sleep(Duration::from_millis(50));
        t.sweep();
        assert_eq!(t.len(), 0);
    }
}
