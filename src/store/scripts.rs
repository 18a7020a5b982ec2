//! The Lua scripts of the Redis store, each one atomic step and one round trip.
//!
//! They implement exactly the memory store's semantics: governor's GCRA (`t` = interval,
//! `tau` = `t * (burst - 1)`, a key's value is its theoretical arrival time), and the lockout's
//! reserve / settle with a sorted set of in-flight tickets.

/// GCRA for every policy of one request, in order, as if checked one by one: each allowed
/// check is counted before the next is made, and the first refusal ends the run. A check may
/// take more than the one unit its request needs, up to what the bucket holds (a lease, spent
/// by the replica without asking again). KEYS = one bucket per check; ARGV = interval µs,
/// tau µs and units wanted for each. Returns {units taken, remaining, wait µs} for each check
/// made (0 units taken: refused).
pub(super) const GCRA: &str = r#"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local out = {}
for i = 1, #KEYS do
  local t = tonumber(ARGV[3 * i - 2])
  local tau = tonumber(ARGV[3 * i - 1])
  local want = tonumber(ARGV[3 * i])
  local tat = math.max(tonumber(redis.call('GET', KEYS[i])) or now, now)
  -- Units the bucket holds now (one request needs one).
  local free = math.floor((now + tau + t - tat) / t)
  if free < 1 then
    out[#out + 1] = 0; out[#out + 1] = 0; out[#out + 1] = tat - tau - now
    return out
  end
  local take = math.min(want, free)
  local nxt = tat + take * t
  -- The bucket is full again at `nxt`: from then on a missing key means the same.
  redis.call('SET', KEYS[i], string.format('%.0f', nxt), 'PX', math.ceil((nxt - now) / 1000) + 1)
  out[#out + 1] = take; out[#out + 1] = free - take; out[#out + 1] = 0
end
return out
"#;

/// Gives back units a lease did not spend. KEYS[1] = bucket; ARGV = interval µs, units.
pub(super) const GIVE_BACK: &str = r#"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then
  return 0
end
local back = tat - tonumber(ARGV[1]) * tonumber(ARGV[2])
if back <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', back), 'PX', math.ceil((back - now) / 1000) + 1)
end
return 1
"#;

/// Shared head of both lockout scripts: the time; `load`, which reads one key's state (KEYS
/// pair: state hash {f = failures, forget = ms, locked = ms}, pending tickets) with its
/// expiries applied; `fail`, which counts `n` failures; and `report`, what the caller mirrors
/// (failures, ms the lock has left). A script handles every key of one operation, so all of
/// them change in one atomic step and one round trip.
pub(super) const LOCK_STATE: &str = r#"
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
local function fail(s, f, n, max, lock)
  f = f + n
  if f >= max then
    redis.call('HSET', s, 'f', f, 'forget', now + lock, 'locked', now + lock)
    redis.call('PEXPIREAT', s, now + lock)
    return f, now + lock, 1
  end
  redis.call('HSET', s, 'f', f, 'forget', now + lock)
  redis.call('PEXPIREAT', s, now + lock)
  return f, 0, 0
end
local function report(out, f, locked)
  out[#out + 1] = f
  out[#out + 1] = math.max(locked - now, 0)
end
"#;

/// KEYS = state, pending for each key; ARGV = ticket, then max failures, reservation ttl ms,
/// lock ms and failures counted while Redis was away (added first) for each key. All keys or
/// none. Returns {granted, wait ms, then failures and lock ms left for each key}.
pub(super) const RESERVE: &str = r#"
local n = #KEYS / 2
local fs, lks = {}, {}
local granted, wait = 1, 0
for i = 1, n do
  local s, p = KEYS[2 * i - 1], KEYS[2 * i]
  local max, lock, owed = tonumber(ARGV[4 * i - 2]), tonumber(ARGV[4 * i]), tonumber(ARGV[4 * i + 1])
  local f, locked = load(s, p)
  if owed > 0 and locked <= now then
    f, locked = fail(s, f, owed, max, lock)
  end
  fs[i], lks[i] = f, locked
  if granted == 1 then
    if locked > now then
      granted, wait = 0, locked - now
    elseif f + redis.call('ZCARD', p) >= max then
      granted, wait = 0, 1000
    end
  end
end
if granted == 1 then
  for i = 1, n do
    local p = KEYS[2 * i]
    local ttl = tonumber(ARGV[4 * i - 1])
    redis.call('ZADD', p, now + ttl, ARGV[1])
    redis.call('PEXPIRE', p, ttl)
  end
end
local out = {granted, wait}
for i = 1, n do report(out, fs[i], lks[i]) end
return out
"#;

/// KEYS = state, pending for each key; ARGV = ticket, then outcome (f, s, r), max failures and
/// lock ms for each key. Returns {1 when this locked any key, then failures and lock ms left
/// for each key}.
pub(super) const SETTLE: &str = r#"
local any = 0
local out = {0}
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
      f = 0
    end
  elseif outcome == 'f' and locked <= now then
    local now_locked
    f, locked, now_locked = fail(s, f, 1, max, lock)
    any = math.max(any, now_locked)
  end
  report(out, f, locked)
end
out[1] = any
return out
"#;

/// The health probe: a keyed write and read on the node that owns `KEYS[1]`, so it proves
/// what a request needs (a master that takes scripts and writes), not just a reachable port.
pub(super) const PROBE: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'PX', 10000)
return redis.call('GET', KEYS[1])
"#;
