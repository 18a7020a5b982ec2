//! What the Redis store adds per request: one rate-limit check and one lockout reservation plus
//! settlement, against the memory store and against a local redis-server (started here on a
//! free loopback port; the bench is skipped without `redis-server`).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use get2dial_gateway::store::lease::LeasePolicy;
use get2dial_gateway::store::memory::MemoryStore;
use get2dial_gateway::store::redis::{Endpoint, RedisStore, Topology};
use get2dial_gateway::store::{Limit, Lock, LockPolicy, RateCheck, Reservation, Settlement};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> Option<(Server, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--port",
        ])
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let server = Server(child);
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((server, port));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn stores(c: &mut Criterion) {
    let mut limit = Limit {
        id: 0,
        name: "per-user".into(),
        interval: Duration::from_millis(20),
        burst: 100,
    };
    let policy = LockPolicy {
        max_failures: 10,
        lock: Duration::from_secs(900),
        reservation_ttl: Duration::from_secs(60),
        max_entries: 100_000,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let memory = MemoryStore::new();
    memory.register(&mut [&mut limit]);
    let mut g = c.benchmark_group("store");
    g.bench_function("memory_rate_check", |b| {
        b.iter(|| memory.rate_check_now(&limit, "user-1"))
    });
    g.bench_function("memory_reserve_settle", |b| {
        b.iter(|| {
            if let Reservation::Granted(t) = memory.reserve_now("a@example.com", &policy) {
                memory.settle_now("a@example.com", t, Settlement::Refund, &policy);
            }
        })
    });

    let Some((_server, port)) = start_redis() else {
        eprintln!("redis-server not available: skipping the Redis benches");
        return;
    };
    let redis = RedisStore::new(Endpoint {
        topology: Topology::Single(format!("redis://127.0.0.1:{port}")),
        ca_pem: None,
        key_prefix: "bench".into(),
        pool_size: 1,
        connect_timeout: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        lockout_timeout: Duration::from_secs(1),
        lease: LeasePolicy {
            units: 0,
            share: 1.0,
            period: Duration::from_millis(250),
            max_entries: 1000,
        },
    })
    .expect("a redis client");
    runtime.block_on(redis.probe()).expect("redis answers");
    let one = [RateCheck {
        limit: &limit,
        key: "user-1",
    }];
    g.bench_function("redis_rate_check", |b| {
        b.to_async(&runtime)
            .iter(|| async { redis.rate_check(&one, &[1]).await.expect("redis") })
    });
    // Three policies of one request: still one script, one round trip.
    let three = [one[0], one[0], one[0]];
    g.bench_function("redis_rate_check_three_policies", |b| {
        b.to_async(&runtime)
            .iter(|| async { redis.rate_check(&three, &[1, 1, 1]).await.expect("redis") })
    });
    let mut ticket = 0u64;
    g.bench_function("redis_reserve_settle", |b| {
        b.to_async(&runtime).iter(|| {
            ticket += 1;
            let t = ticket;
            let (redis, policy) = (&redis, &policy);
            async move {
                let lock = Lock {
                    key: "a@example.com",
                    policy,
                    tag: "a@example.com",
                };
                let (reserved, _) = redis.reserve(&[lock], &[0], t).await.expect("redis");
                if let Reservation::Granted(t) = reserved {
                    redis
                        .settle(&[(lock, Settlement::Refund)], t)
                        .await
                        .expect("redis");
                }
            }
        })
    });
    g.finish();
}

criterion_group!(benches, stores);
criterion_main!(benches);
