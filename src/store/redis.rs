//! The shared store: rate limits and lockouts in Redis (one server, a Cluster, or the master
//! Sentinel names), each operation one atomic Lua script ([`super::scripts`], one round trip),
//! with keys that expire by themselves.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ErrorKind, FromRedisValue, IntoConnectionInfo, RedisError,
    Script, ScriptInvocation, ServerErrorKind,
};
use tokio::sync::OnceCell;

use super::scripts::{GCRA, GIVE_BACK, LOCK_STATE, PROBE, RESERVE, SETTLE};
use super::{Lock, RateCheck, RateDecision, Reservation, Settlement, Ticket};

/// Which Redis deployment holds the counters.
#[derive(Clone, PartialEq, Eq)]
pub enum Topology {
    /// One server (or a proxy that looks like one).
    Single(String),
    /// A Redis Cluster, discovered from these seed nodes; the client follows slot moves and
    /// failovers by itself.
    Cluster(Vec<String>),
    /// The master these Sentinels name `master`, asked again whenever the link to it breaks.
    Sentinel {
        /// The Sentinels' URLs.
        sentinels: Vec<String>,
        /// The monitored master's name.
        master: String,
    },
}

impl Topology {
    /// The `[store] kind` this is.
    pub fn kind(&self) -> &'static str {
        match self {
            Topology::Single(_) => "redis",
            Topology::Cluster(_) => "redis-cluster",
            Topology::Sentinel { .. } => "redis-sentinel",
        }
    }
}

/// How to reach Redis, and how long to wait for it.
#[derive(Clone)]
pub struct Endpoint {
    /// Where the servers are (URLs: `redis://`, `rediss://`, with user and password when
    /// needed).
    pub topology: Topology,
    /// PEM CA bundle for `rediss://` servers with a private CA.
    pub ca_pem: Option<Vec<u8>>,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Multiplexed connections to a single server, used round-robin.
    pub pool_size: usize,
    /// TCP (and TLS) connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for one rate check's answer.
    pub timeout: Duration,
    /// Longest wait for one lockout operation's answer.
    pub lockout_timeout: Duration,
    /// Rate-limit units a replica takes ahead of need.
    pub lease: super::lease::LeasePolicy,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URLs may carry a password.
        f.debug_struct("Endpoint")
            .field("kind", &self.topology.kind())
            .field("key_prefix", &self.key_prefix)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// What a lockout script reports about one key, for the replica's own copy.
pub type KeyState = (u32, Duration);

/// What a topology probe found: servers answering, and the master in use (Sentinel).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// Masters that answer (a single server counts as one).
    pub masters: usize,
    /// Replicas that answer, where the topology tells.
    pub replicas: usize,
    /// The master's address, where one is chosen for us (Sentinel).
    pub master: Option<String>,
}

/// The open link to the deployment.
enum Link {
    Single(Vec<ConnectionManager>),
    Cluster(ClusterConnection),
    Sentinel(Box<SentinelLink>),
}

/// The Sentinel's current master and the way to ask for it again.
struct SentinelLink {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    master: std::sync::RwLock<Option<(MultiplexedConnection, String)>>,
    config: AsyncConnectionConfig,
}

impl SentinelLink {
    /// The connection to the master, asking the Sentinels for it when there is none.
    async fn master(&self) -> redis::RedisResult<MultiplexedConnection> {
        if let Some((c, _)) = self.current() {
            return Ok(c);
        }
        let mut sentinel = self.sentinel.lock().await;
        // Another request may have asked meanwhile.
        if let Some((c, _)) = self.current() {
            return Ok(c);
        }
        let client = sentinel.async_get_client().await?;
        let addr = client.get_connection_info().addr().to_string();
        let c = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        tracing::info!(master = %addr, "redis sentinel: using master");
        if let Ok(mut m) = self.master.write() {
            *m = Some((c.clone(), addr));
        }
        Ok(c)
    }

    fn current(&self) -> Option<(MultiplexedConnection, String)> {
        self.master.read().ok().and_then(|m| m.clone())
    }

    /// Drops the master after an error that says it may no longer be one (connection lost,
    /// timeout, `READONLY` after a failover); the next operation asks the Sentinels.
    fn check(&self, e: &RedisError) {
        let moved = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
            || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"));
        if moved {
            if let Ok(mut m) = self.master.write() {
                *m = None;
            }
        }
    }
}

/// Rate limits and lockouts in Redis.
pub struct RedisStore {
    config: Endpoint,
    /// What the link is made from (validated at start).
    client: Maker,
    link: OnceCell<Link>,
    next: AtomicUsize,
    gcra: Script,
    give_back: Script,
    reserve: Script,
    settle: Script,
    probe: Script,
    /// Key of this replica's probe.
    probe_key: String,
}

/// The client a link is made from.
enum Maker {
    Single(Client),
    Cluster(ClusterClient),
    Sentinel(std::sync::Mutex<Option<SentinelClient>>),
}

impl RedisStore {
    /// A store for `settings`; connections are made on first use.
    pub fn new(settings: Endpoint) -> redis::RedisResult<RedisStore> {
        let certs = || {
            settings.ca_pem.as_ref().map(|pem| redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            })
        };
        let client = match &settings.topology {
            Topology::Single(url) => Maker::Single(match certs() {
                Some(c) => Client::build_with_tls(url.as_str(), c)?,
                None => Client::open(url.as_str())?,
            }),
            Topology::Cluster(urls) => {
                let mut b = ClusterClient::builder(urls.iter().map(String::as_str))
                    .connection_timeout(settings.connect_timeout)
                    .response_timeout(settings.timeout.max(settings.lockout_timeout))
                    // Each operation has its own deadline (`SharedStore`); retries follow slot
                    // moves and failovers within it.
                    .retries(3)
                    .min_retry_wait(10)
                    .max_retry_wait(200);
                if let Some(c) = certs() {
                    b = b.certs(c);
                }
                Maker::Cluster(b.build()?)
            }
            Topology::Sentinel { sentinels, master } => {
                let first = sentinels.first().ok_or_else(|| {
                    RedisError::from((ErrorKind::InvalidClientConfig, "no sentinel"))
                })?;
                // The master is reached with the first Sentinel URL's credentials, database
                // and TLS mode.
                let info = first.as_str().into_connection_info()?;
                let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
                let mut node = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(info.redis_settings().clone());
                if tls {
                    node = node.set_tls_mode(redis::TlsMode::Secure);
                }
                let client = SentinelClient::build(
                    sentinels.iter().map(String::as_str).collect(),
                    master.as_str(),
                    Some(node),
                    SentinelServerType::Master,
                )?;
                Maker::Sentinel(std::sync::Mutex::new(Some(client)))
            }
        };
        let probe_key = format!(
            "{}:probe:{{{}}}",
            settings.key_prefix,
            uuid::Uuid::new_v4().simple()
        );
        Ok(RedisStore {
            config: settings,
            client,
            link: OnceCell::new(),
            next: AtomicUsize::new(0),
            gcra: Script::new(GCRA),
            give_back: Script::new(GIVE_BACK),
            reserve: Script::new(&format!("{LOCK_STATE}{RESERVE}")),
            settle: Script::new(&format!("{LOCK_STATE}{SETTLE}")),
            probe: Script::new(PROBE),
            probe_key,
        })
    }

    /// The link, made on first use (and tried again on the next use when that failed).
    async fn link(&self) -> redis::RedisResult<&Link> {
        self.link
            .get_or_try_init(|| async {
                let timeout = self.config.timeout.max(self.config.lockout_timeout);
                match &self.client {
                    Maker::Single(client) => {
                        let config = ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(self.config.connect_timeout))
                            .set_response_timeout(Some(timeout))
                            .set_number_of_retries(1)
                            .set_max_delay(Duration::from_millis(500));
                        (0..self.config.pool_size.max(1))
                            .map(|_| {
                                ConnectionManager::new_lazy_with_config(
                                    client.clone(),
                                    config.clone(),
                                )
                            })
                            .collect::<redis::RedisResult<Vec<_>>>()
                            .map(Link::Single)
                    }
                    Maker::Cluster(client) => {
                        Ok(Link::Cluster(client.get_async_connection().await?))
                    }
                    Maker::Sentinel(client) => {
                        let sentinel =
                            client
                                .lock()
                                .ok()
                                .and_then(|mut c| c.take())
                                .ok_or_else(|| {
                                    RedisError::from((
                                        ErrorKind::Client,
                                        "sentinel link made twice",
                                    ))
                                })?;
                        Ok(Link::Sentinel(Box::new(SentinelLink {
                            sentinel: tokio::sync::Mutex::new(sentinel),
                            master: std::sync::RwLock::new(None),
                            config: AsyncConnectionConfig::new()
                                .set_connection_timeout(Some(self.config.connect_timeout))
                                .set_response_timeout(Some(timeout)),
                        })))
                    }
                }
            })
            .await
    }

    /// Runs one script invocation on the node that owns its keys.
    async fn run<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> redis::RedisResult<T> {
        match self.link().await? {
            Link::Single(pool) => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % pool.len().max(1);
                let mut c = pool[i].clone();
                invocation.invoke_async(&mut c).await
            }
            Link::Cluster(c) => invocation.invoke_async(&mut c.clone()).await,
            Link::Sentinel(s) => {
                let mut c = s.master().await?;
                let r = invocation.invoke_async(&mut c).await;
                if let Err(e) = &r {
                    s.check(e);
                }
                r
            }
        }
    }

    /// The health probe: a keyed script on the node that owns this replica's probe key, and
    /// what the deployment looks like from here.
    /// `None` for the topology when only it could not be read.
    pub async fn probe(&self) -> redis::RedisResult<Option<Seen>> {
        let mut invocation = self.probe.prepare_invoke();
        invocation.key(&self.probe_key).arg(1);
        let _: i64 = self.run(&invocation).await?;
        Ok(Some(match self.link().await? {
            Link::Single(_) => Seen {
                masters: 1,
                ..Seen::default()
            },
            Link::Cluster(c) => {
                // Asked of a master the slot map knows (a random node may be the dead one);
                // the probe's verdict is the script above, this is only what ops see.
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
                match c
                    .clone()
                    .route_command(redis::cmd("CLUSTER").arg("NODES").clone(), routing)
                    .await
                    .and_then(|v| Ok(String::from_redis_value(v)?))
                {
                    Ok(nodes) => cluster_nodes(&nodes),
                    Err(e) => {
                        tracing::debug!(error = %e, "redis cluster: CLUSTER NODES failed");
                        return Ok(None);
                    }
                }
            }
            Link::Sentinel(s) => Seen {
                masters: 1,
                replicas: 0,
                master: s.current().map(|(_, addr)| addr),
            },
        }))
    }

    /// The bucket of `policy`'s `key`, under the key (its subject) as hash tag; and the tag.
    fn bucket(&self, policy: &str, key: &str) -> (String, String) {
        let tag = super::tag_safe(key).into_owned();
        let bucket = format!("{}:rl:{{{tag}}}:{policy}", self.config.key_prefix);
        (bucket, tag)
    }

    /// [`super::Store::rate_check`] against Redis, each check taking up to `want[i]` units
    /// (at least the one its request needs): one script for every check on a single server or
    /// Sentinel's master; on a Cluster one per run of checks that share a subject (a slot), in
    /// order, stopping at the first refusal as one by one would. Returns the units each check
    /// took (0: refused) with its decision.
    pub async fn rate_check(
        &self,
        checks: &[RateCheck<'_>],
        want: &[u32],
    ) -> redis::RedisResult<Vec<(u32, RateDecision)>> {
        let buckets: Vec<(String, String)> = checks
            .iter()
            .map(|c| self.bucket(&c.limit.name, c.key))
            .collect();
        let cluster = matches!(self.config.topology, Topology::Cluster(_));
        let mut decisions = Vec::with_capacity(checks.len());
        let mut start = 0;
        while start < buckets.len() {
            let mut end = start + 1;
            while end < buckets.len() && (!cluster || buckets[end].1 == buckets[start].1) {
                end += 1;
            }
            let mut invocation = self.gcra.prepare_invoke();
            for (i, (key, _)) in buckets.iter().enumerate().take(end).skip(start) {
                let limit = checks[i].limit;
                let t = micros(limit.interval).max(1);
                invocation
                    .key(key)
                    .arg(t)
                    .arg(t * u64::from(limit.burst.saturating_sub(1)))
                    .arg(want.get(i).copied().unwrap_or(1).max(1));
            }
            let flat: Vec<i64> = self.run(&invocation).await?;
            for (check, answer) in checks[start..end].iter().zip(flat.chunks_exact(3)) {
                let (taken, remaining, wait) = (answer[0], answer[1], answer[2]);
                let taken = u32::try_from(taken.max(0)).unwrap_or(u32::MAX);
                let remaining = u32::try_from(remaining.max(0)).unwrap_or(u32::MAX);
                decisions.push((
                    taken,
                    RateDecision {
                        allowed: taken > 0,
                        remaining,
                        retry_after: Duration::from_micros(wait.max(0) as u64),
                        reset: check.limit.interval * check.limit.burst.saturating_sub(remaining),
                    },
                ));
                if taken == 0 {
                    return Ok(decisions);
                }
            }
            start = end;
        }
        Ok(decisions)
    }

    /// Gives `units` a lease did not spend back to the bucket of `policy`'s `key`.
    pub async fn give_back(
        &self,
        policy: &str,
        key: &str,
        interval: Duration,
        units: u32,
    ) -> redis::RedisResult<()> {
        let (bucket, _) = self.bucket(policy, key);
        let mut invocation = self.give_back.prepare_invoke();
        invocation
            .key(bucket)
            .arg(micros(interval).max(1))
            .arg(units);
        let _: i64 = self.run(&invocation).await?;
        Ok(())
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

    /// [`super::Store::reserve`] against Redis; `owed` are failures counted in-process while
    /// Redis was away, added first. Also returns each key's state after the operation.
    pub async fn reserve(
        &self,
        locks: &[Lock<'_>],
        owed: &[u32],
        ticket: Ticket,
    ) -> redis::RedisResult<(Reservation, Vec<KeyState>)> {
        let mut invocation = self.reserve.prepare_invoke();
        invocation.arg(ticket);
        for (i, lock) in locks.iter().enumerate() {
            let (state, pending) = self.lock_keys(lock);
            invocation
                .key(state)
                .key(pending)
                .arg(lock.policy.max_failures)
                .arg(millis(lock.policy.reservation_ttl))
                .arg(millis(lock.policy.lock))
                .arg(owed.get(i).copied().unwrap_or(0));
        }
        let flat: Vec<i64> = self.run(&invocation).await?;
        let (granted, wait) = (
            flat.first().copied().unwrap_or(0),
            flat.get(1).copied().unwrap_or(0),
        );
        let reservation = if granted == 1 {
            Reservation::Granted(ticket)
        } else {
            Reservation::Locked(Duration::from_millis(wait.max(0) as u64))
        };
        Ok((reservation, key_states(flat.get(2..).unwrap_or_default())))
    }

    /// [`super::Store::settle`] against Redis. Also returns each key's state after it.
    pub async fn settle(
        &self,
        locks: &[(Lock<'_>, Settlement)],
        ticket: Ticket,
    ) -> redis::RedisResult<(bool, Vec<KeyState>)> {
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
        let flat: Vec<i64> = self.run(&invocation).await?;
        let locked = flat.first().copied().unwrap_or(0) == 1;
        Ok((locked, key_states(flat.get(1..).unwrap_or_default())))
    }
}

/// Pairs of (failures, lock ms left) as the scripts report them.
fn key_states(flat: &[i64]) -> Vec<KeyState> {
    flat.chunks_exact(2)
        .map(|p| {
            (
                u32::try_from(p[0].max(0)).unwrap_or(u32::MAX),
                Duration::from_millis(p[1].max(0) as u64),
            )
        })
        .collect()
}

/// Masters and replicas that answer, from `CLUSTER NODES` (flags are the third field).
fn cluster_nodes(text: &str) -> Seen {
    let mut seen = Seen::default();
    for line in text.lines() {
        let Some(flags) = line.split(' ').nth(2) else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if flags
            .iter()
            .any(|f| f.starts_with("fail") || *f == "noaddr")
        {
            continue;
        }
        if flags.contains(&"master") {
            seen.masters += 1;
        } else if flags.contains(&"slave") || flags.contains(&"replica") {
            seen.replicas += 1;
        }
    }
    seen
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_counts_what_answers() {
        let text = "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                    b 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922\n\
                    c 127.0.0.1:7002@17002 master,fail - 0 0 3 connected\n\
                    d 127.0.0.1:7003@17003 slave a 0 0 1 connected\n\
                    e 127.0.0.1:7004@17004 slave,fail? b 0 0 2 connected\n";
        let seen = cluster_nodes(text);
        assert_eq!((seen.masters, seen.replicas), (2, 1));
    }
}
