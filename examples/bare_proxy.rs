//! The framework's ceiling for the load benchmark: a bare Pingora pass-through proxy (one
//! `upstream_peer`, nothing else), built with the same Pingora version and profile as the gateway.
//!
//! `BARE_PROXY_LISTEN=127.0.0.1:7000 BARE_PROXY_UPSTREAM=127.0.0.1:7001 BARE_PROXY_THREADS=1 <bin>`
//! (`BARE_PROXY_WORK_STEALING=false` for Pingora's no-steal runtime, as the gateway can run);
//! without `BARE_PROXY_LISTEN` it exits at once.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Bare(std::net::SocketAddr);

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.0, false, String::new())))
    }
}

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let Ok(listen) = std::env::var("BARE_PROXY_LISTEN") else {
        println!("bare_proxy: set BARE_PROXY_LISTEN and BARE_PROXY_UPSTREAM to run it (scripts/bench.sh does)");
        return;
    };
    let upstream = std::env::var("BARE_PROXY_UPSTREAM")
        .ok()
        .and_then(|u| u.parse().ok())
        .expect("BARE_PROXY_UPSTREAM=ip:port");
    let threads = std::env::var("BARE_PROXY_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let work_stealing = std::env::var("BARE_PROXY_WORK_STEALING").map_or(true, |v| v != "false");
    let conf = ServerConf {
        threads,
        work_stealing,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Bare(upstream));
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
