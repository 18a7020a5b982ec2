//! Micro-benches of the per-request work: route matching and upstream error normalisation.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use get2dial_gateway::envelope;
use get2dial_gateway::routes::{Route, RouteTable};
use http::Method;

fn route(name: &str, prefix: &str, methods: &[Method]) -> Route {
    Route::public(name, prefix, methods)
}

/// A route table shaped like the Get2Dial API's.
fn table() -> RouteTable {
    RouteTable::new(vec![
        route("login", "/api/v1/auth/login", &[Method::POST]),
        route("me", "/api/v1/auth/me", &[Method::GET]),
        route("node-register", "/api/v1/nodes/register", &[Method::POST]),
        route("node-heartbeat", "/api/v1/nodes/heartbeat", &[Method::POST]),
        route("nodes", "/api/v1/nodes/", &[]),
        route("edge-health", "/api/v1/edge/health", &[Method::GET]),
        route(
            "desired-state",
            "/api/v1/edge/desired-state",
            &[Method::GET],
        ),
        route("recordings", "/api/v1/recordings/", &[Method::GET]),
        route("api", "/api/v1/", &[]),
        route("ws-supervisor", "/ws/supervisor", &[Method::GET]),
        route("ws-agent", "/ws/agent", &[Method::GET]),
        route("healthz", "/healthz", &[Method::GET]),
        route("readyz", "/readyz", &[Method::GET]),
    ])
}

fn routes(c: &mut Criterion) {
    let t = table();
    let mut g = c.benchmark_group("route_match");
    g.bench_function("api_call", |b| {
        b.iter(|| {
            t.find(
                black_box(&Method::GET),
                black_box("/api/v1/calls/8f3a/events"),
            )
        })
    });
    g.bench_function("login", |b| {
        b.iter(|| t.find(black_box(&Method::POST), black_box("/api/v1/auth/login")))
    });
    g.bench_function("not_found", |b| {
        b.iter(|| t.find(black_box(&Method::GET), black_box("/wp-admin/setup.php")))
    });
    g.finish();
}

fn normalise(c: &mut Criterion) {
    let html = b"<html><body><h1>500</h1><pre>panic: runtime error</pre></body></html>".to_vec();
    let json = br#"{"error":"email is invalid","code":"E_EMAIL"}"#.to_vec();
    let big = {
        let mut v = b"{\"message\":\"".to_vec();
        v.extend(std::iter::repeat_n(b'x', 64 * 1024 - 16));
        v.extend_from_slice(b"\"}");
        v
    };
    let mut g = c.benchmark_group("normalise");
    g.bench_function("small_html_500", |b| {
        b.iter(|| envelope::normalise(500, black_box(&html)))
    });
    g.bench_function("small_json_422", |b| {
        b.iter(|| envelope::normalise(422, black_box(&json)))
    });
    g.bench_function("json_64k_404", |b| {
        b.iter(|| envelope::normalise(404, black_box(&big)))
    });
    g.finish();
}

fn jwt(c: &mut Criterion) {
    use get2dial_gateway::auth::jwt::{Profile, Verifier};
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let secret = b"bench-secret-0123456789abcdef".to_vec();
    let settings = Profile {
        secrets: vec![secret.clone()],
        issuer: "get2dial".into(),
        audience: "get2dial-control".into(),
        leeway_seconds: 30,
        max_token_bytes: 4096,
        cache_entries: 0,
    };
    let claims = serde_json::json!({"tid":"5b0c3e1e-6a7f-4c1d-9a0e-3f1b2c4d5e6f",
        "sub":"9d8c7b6a-5f4e-3d2c-1b0a-998877665544","email":"agent@example.com","role":"agent",
        "iss":"get2dial","aud":"get2dial-control","exp": 4102444800u64});
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&secret),
    )
    .unwrap();
    let one = Verifier::new(&settings);
    let mut rotated = settings.clone();
    rotated
        .secrets
        .insert(0, b"newer-secret-0123456789abcdef".to_vec());
    let two = Verifier::new(&rotated);
    let cached = Verifier::new(&Profile {
        cache_entries: 10_000,
        ..settings.clone()
    });
    let mut g = c.benchmark_group("jwt_verify");
    g.bench_function("hs256_valid_cached", |b| {
        b.iter(|| cached.verify(black_box(&token)))
    });
    g.bench_function("hs256_valid", |b| b.iter(|| one.verify(black_box(&token))));
    g.bench_function("hs256_valid_second_of_two_secrets", |b| {
        b.iter(|| two.verify(black_box(&token)))
    });
    g.bench_function("garbage", |b| b.iter(|| one.verify(black_box("not.a.jwt"))));
    g.finish();
}

fn limits(c: &mut Criterion) {
    use get2dial_gateway::store::memory::MemoryStore;
    use get2dial_gateway::store::{Limit, LockPolicy, Reservation, Settlement};
    use std::time::Duration;
    let mut limit = Limit {
        id: 0,
        name: "per-user".into(),
        interval: Duration::from_millis(20),
        burst: 100,
    };
    let store = MemoryStore::new();
    store.register(&mut [&mut limit]);
    let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i:05}")).collect();
    let mut g = c.benchmark_group("limits");
    let mut i = 0usize;
    g.bench_function("rate_check_10k_keys", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            store.rate_check_now(&limit, black_box(&keys[i]))
        })
    });
    let policy = LockPolicy {
        max_failures: 10,
        lock: Duration::from_secs(900),
        reservation_ttl: Duration::from_secs(60),
        max_entries: 100_000,
    };
    g.bench_function("lockout_reserve_and_settle", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            if let Reservation::Granted(t) = store.reserve_now(black_box(&keys[i]), &policy) {
                store.settle_now(&keys[i], t, Settlement::Success, &policy);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, routes, normalise, jwt, limits);
criterion_main!(benches);
