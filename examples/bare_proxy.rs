//! The framework's ceiling for the load benchmark: a bare Pingora pass-through proxy (one
//! `upstream_peer`, nothing else), built with the same Pingora version and profile as the gateway.
//!
//! `BARE_PROXY_LISTEN=127.0.0.1:7000 BARE_PROXY_UPSTREAM=127.0.0.1:7001 BARE_PROXY_THREADS=1 <bin>`
//! (`BARE_PROXY_WORK_STEALING=false` for Pingora's no-steal runtime, as the gateway can run;
//! `BARE_PROXY_TLS_LISTEN`, `BARE_PROXY_CERT`, `BARE_PROXY_KEY` add a TLS listener offering
//! HTTP/2 and HTTP/1.1 by ALPN, with the same rustls settings as the gateway's);
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
    // The same crypto provider as the gateway (`aws-lc` feature or ring).
    #[cfg(feature = "aws-lc")]
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    #[cfg(not(feature = "aws-lc"))]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Bare(upstream));
    proxy.add_tcp(&listen);
    if let Ok(tls_listen) = std::env::var("BARE_PROXY_TLS_LISTEN") {
        let (cert, key) = (
            std::env::var("BARE_PROXY_CERT").expect("BARE_PROXY_CERT=path"),
            std::env::var("BARE_PROXY_KEY").expect("BARE_PROXY_KEY=path"),
        );
        let mut tls = pingora::listeners::tls::TlsSettings::intermediate(&cert, &key)
            .expect("BARE_PROXY_CERT and BARE_PROXY_KEY: a PEM certificate and key");
        tls.enable_h2();
        proxy.add_tls_with_settings(&tls_listen, None, tls);
    }
    server.add_service(proxy);
    server.run_forever();
}
