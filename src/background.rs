//! Work the gateway does on a timer beside the requests: sweeping idle limiter keys, health
//! checks, watching node-key and certificate files, probing a missing Redis. One loop for all
//! of them: a tick right away, then one per interval, until the server shuts down.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

/// A background task that runs `tick` at start and then every `interval`.
pub struct Every<F> {
    interval: Duration,
    tick: F,
}

/// Runs `tick` at start and then every `interval`, until shutdown.
pub fn every<F, Fut>(interval: Duration, tick: F) -> Every<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    Every { interval, tick }
}

#[async_trait]
impl<F, Fut> BackgroundService for Every<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            (self.tick)().await;
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
