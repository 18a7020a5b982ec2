//! The shared store: rate limits and lockouts in Redis, each operation one atomic Lua script
//! (one round trip), with keys that expire by themselves.
//!
//! The scripts implement exactly the memory store's semantics: governor's GCRA
//! (`t` = interval, `tau` = `t * (burst - 1)`, a key's value is its theoretical arrival time),
//! and the lockout's reserve / settle with a sorted set of in-flight tickets.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};
use tokio::sync::OnceCell;

use super::{Limit, Lock, RateDecision, Reservation, Settlement, Ticket};

/// GCRA. KEYS[1] = bucket; ARGV = interval µs, tau µs. Returns {allowed, remaining, wait µs}.
const GCRA: &str = r#"
local t = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
local earliest = tat - tau
if now < earliest then
  return {0, 0, earliest - now}
end
local nxt = math.max(tat, now) + t
-- The bucket is full again at `nxt`: from then on a missing key means the same.
redis.call('SET', KEYS[1], string.format('%.0f', nxt), 'PX', math.ceil((nxt - now) / 1000) + 1)
return {1, math.floor((now + tau + t - nxt) / t), 0}
"#;

/// Shared head of both lockout scripts: the time, and `load`, which reads one key's state
/// (KEYS pair: state hash {f = failures, forget = ms, locked = ms}, pending tickets) with its
/// expiries applied. A script handles every key of one operation, so all of them change in one
/// atomic step and one round trip.
const LOCK_STATE: &str = r#"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function load(s, p)
  local st = redis.call('HMGET', s, 'f', 'forget', 'locked')
  local f = tonumber(st[1]) or 0
  local forget = tonumber(st[2]) or 0
  local locked = tonumber(st[3]) or 0
  if locked > 0 and locked <= now then
    f = 0; forget = 0; locked = 0
    redis.call('DEL', s)
  end
  if forget > 0 and forget <= now then
    f = 0; forget = 0
    redis.call('HDEL', s, 'f', 'forget')
  end
  redis.call('ZREMRANGEBYSCORE', p, '-inf', now)
  return f, locked
end
"#;

/// KEYS = state, pending for each key; ARGV = ticket, then max failures and reservation ttl ms
/// for each key. All keys or none. Returns {granted, wait ms}.
const RESERVE: &str = r#"
local n = #KEYS / 2
for i = 1, n do
  local s, p = KEYS[2 * i - 1], KEYS[2 * i]
  local f, locked = load(s, p)
  if locked > now then
    return {0, locked - now}
  end
  if f + redis.call('ZCARD', p) >= tonumber(ARGV[2 * i]) then
    return {0, 1000}
  end
end
for i = 1, n do
  local p = KEYS[2 * i]
  local ttl = tonumber(ARGV[2 * i + 1])
  redis.call('ZADD', p, now + ttl, ARGV[1])
  redis.call('PEXPIRE', p, ttl)
end
return {1, 0}
"#;

/// KEYS = state, pending for each key; ARGV = ticket, then outcome (f, s, r), max failures and
/// lock ms for each key. Returns 1 when this locked any key.
const SETTLE: &str = r#"
local any = 0
for i = 1, #KEYS / 2 do
  local s, p = KEYS[2 * i - 1], KEYS[2 * i]
  local f, locked = load(s, p)
  local outcome = ARGV[3 * i - 1]
  local max = tonumber(ARGV[3 * i])
  local lock = tonumber(ARGV[3 * i + 1])
  redis.call('ZREM', p, ARGV[1])
  if outcome == 's' then
    if locked == 0 then
      redis.call('DEL', s)
    end
  elseif outcome == 'f' and locked <= now then
    f = f + 1
    if f >= max then
      redis.call('HSET', s, 'f', f, 'forget', now + lock, 'locked', now + lock)
      any = 1
    else
      redis.call('HSET', s, 'f', f, 'forget', now + lock)
    end
    redis.call('PEXPIREAT', s, now + lock)
  end
end
return any
"#;

/// How to reach Redis, and how long to wait for it.
#[derive(Clone)]
pub struct Endpoint {
    /// Connection URL (`redis://`, `rediss://`, with user and password when needed).
    pub url: String,
    /// PEM CA bundle for `rediss://` servers with a private CA.
    pub ca_pem: Option<Vec<u8>>,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Multiplexed connections, used round-robin.
    pub pool_size: usize,
    /// TCP (and TLS) connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for one rate check's answer.
    pub timeout: Duration,
    /// Longest wait for one lockout operation's answer.
    pub lockout_timeout: Duration,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("Endpoint")
            .field("url", &"[redacted]")
            .field("key_prefix", &self.key_prefix)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Rate limits and lockouts in Redis.
pub struct RedisStore {
    client: Client,
    config: Endpoint,
    connections: OnceCell<Vec<ConnectionManager>>,
    next: AtomicUsize,
    gcra: Script,
    reserve: Script,
    settle: Script,
}

impl RedisStore {
    /// A store for `settings`; connections are made on first use.
    pub fn new(settings: Endpoint) -> redis::RedisResult<RedisStore> {
        let client = match &settings.ca_pem {
            Some(pem) => Client::build_with_tls(
                settings.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            )?,
            None => Client::open(settings.url.as_str())?,
        };
        Ok(RedisStore {
            client,
            config: settings,
            connections: OnceCell::new(),
            next: AtomicUsize::new(0),
            gcra: Script::new(GCRA),
            reserve: Script::new(&format!("{LOCK_STATE}{RESERVE}")),
            settle: Script::new(&format!("{LOCK_STATE}{SETTLE}")),
        })
    }

    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        let pool = self
            .connections
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.config.connect_timeout))
                    // Each operation has its own deadline (see `SharedStore`); this is the
                    // longest of them.
                    .set_response_timeout(Some(
                        self.config.timeout.max(self.config.lockout_timeout),
                    ))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                (0..self.config.pool_size.max(1))
                    .map(|_| {
                        ConnectionManager::new_lazy_with_config(self.client.clone(), config.clone())
                    })
                    .collect::<redis::RedisResult<Vec<_>>>()
            })
            .await?;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % pool.len();
        Ok(pool[i].clone())
    }

    /// Round trip to the server, for the health probe.
    pub async fn ping(&self) -> redis::RedisResult<()> {
        let mut c = self.connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .map(|_| ())
    }

    /// [`super::Store::rate_check`] against Redis.
    pub async fn rate_check(&self, limit: &Limit, key: &str) -> redis::RedisResult<RateDecision> {
        let t = micros(limit.interval).max(1);
        let tau = t * u64::from(limit.burst.saturating_sub(1));
        let bucket = format!("{}:rl:{}:{}", self.config.key_prefix, limit.name, key);
        let mut c = self.connection().await?;
        let (allowed, remaining, wait): (i64, i64, i64) = self
            .gcra
            .key(bucket)
            .arg(t)
            .arg(tau)
            .invoke_async(&mut c)
            .await?;
        let remaining = u32::try_from(remaining.max(0)).unwrap_or(u32::MAX);
        Ok(RateDecision {
            allowed: allowed == 1,
            remaining,
            retry_after: Duration::from_micros(wait.max(0) as u64),
            reset: limit.interval * limit.burst.saturating_sub(remaining),
        })
    }

    /// The state and pending-ticket keys of `lock`, under its hash tag so that every key of
    /// one operation shares a cluster slot.
    fn lock_keys(&self, lock: &Lock<'_>) -> (String, String) {
        let base = format!(
            "{}:lo:{{{}}}:{}",
            self.config.key_prefix, lock.tag, lock.key
        );
        (format!("{base}:s"), format!("{base}:p"))
    }

    /// [`super::Store::reserve`] against Redis.
    pub async fn reserve(
        &self,
        locks: &[Lock<'_>],
        ticket: Ticket,
    ) -> redis::RedisResult<Reservation> {
        let mut invocation = self.reserve.prepare_invoke();
        invocation.arg(ticket);
        for lock in locks {
            let (state, pending) = self.lock_keys(lock);
            invocation
                .key(state)
                .key(pending)
                .arg(lock.policy.max_failures)
                .arg(millis(lock.policy.reservation_ttl));
        }
        let mut c = self.connection().await?;
        let (granted, wait): (i64, i64) = invocation.invoke_async(&mut c).await?;
        Ok(if granted == 1 {
            Reservation::Granted(ticket)
        } else {
            Reservation::Locked(Duration::from_millis(wait.max(0) as u64))
        })
    }

    /// [`super::Store::settle`] against Redis.
    pub async fn settle(
        &self,
        locks: &[(Lock<'_>, Settlement)],
        ticket: Ticket,
    ) -> redis::RedisResult<bool> {
        let mut invocation = self.settle.prepare_invoke();
        invocation.arg(ticket);
        for (lock, outcome) in locks {
            let (state, pending) = self.lock_keys(lock);
            let outcome = match outcome {
                Settlement::Failure => "f",
                Settlement::Success => "s",
                Settlement::Refund => "r",
            };
            invocation
                .key(state)
                .key(pending)
                .arg(outcome)
                .arg(lock.policy.max_failures)
                .arg(millis(lock.policy.lock));
        }
        let mut c = self.connection().await?;
        let locked: i64 = invocation.invoke_async(&mut c).await?;
        Ok(locked == 1)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
