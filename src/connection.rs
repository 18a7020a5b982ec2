//! Client connections that cost little while idle.
//!
//! Pingora serves a keep-alive HTTP/1 connection from one task whose state is sized for the
//! largest step of a request (TLS handshake, proxying), and allocates the next request's
//! session and head buffer before the client sends a byte: about 40 KiB per idle connection.
//! [`Connections`] runs each HTTP/1 connection in its own small task instead, which waits for
//! the first bytes of the next request with no session and no buffer (the read goes to the
//! stack), then hands those bytes to Pingora as the start of the request. HTTP/2 connections
//! are left to Pingora as they are (their streams are separate tasks already).

use std::future::{poll_fn, Future};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{futures::Notified, Notify};
use tokio::time::{sleep, Instant, Sleep};

/// How much of a new request one read takes; Pingora's own first head read is as large.
const FIRST_READ: usize = 4096;

/// A [`ServerApp`] that serves HTTP/1 connections of `app` with a small idle footprint.
pub struct Connections<A> {
    app: Arc<A>,
    keepalive: Duration,
    /// Set when the server shuts down (see `cleanup`): connections between requests close.
    closing: AtomicBool,
    /// Wakes the connections waiting for a request when `closing` is set.
    closed: Notify,
}

impl<A> Connections<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// Serves `app`, closing a connection idle for `keepalive` between requests.
    pub fn new(app: A, keepalive: Duration) -> Self {
        Connections {
            app: Arc::new(app),
            keepalive,
            closing: AtomicBool::new(false),
            closed: Notify::new(),
        }
    }

    /// One HTTP/1 connection: wait for a request's first bytes, let Pingora serve it, repeat.
    async fn serve_h1(self: Arc<Self>, mut stream: Stream, shutdown: ShutdownWatch) {
        let mut settings: Option<HttpPersistentSettings> = None;
        // One timer for the connection, not one per request: it is armed once for the idle
        // deadline and, when it fires after the connection was busy meanwhile, moved to the
        // current deadline. A wait between requests then only checks it.
        let timer = sleep(self.keepalive);
        tokio::pin!(timer);
        // Likewise one shutdown registration for the connection's life (a `watch` wait per
        // request registers and unregisters a waiter every time). Registered before the flag
        // is read, so a shutdown after that read still wakes it.
        let closed = self.closed.notified();
        tokio::pin!(closed);
        closed.as_mut().enable();
        // Shutdown closes connections between requests, not new ones: a client that just
        // connected is about to send its request, and would see it fail (it is served, with
        // keep-alive off; a silent one is left to the keep-alive timeout and the grace period).
        let mut served = false;
        loop {
            if served && self.closing.load(Ordering::Acquire) {
                return;
            }
            let wait = Wait {
                deadline: Instant::now() + self.keepalive,
                timer: timer.as_mut(),
                closed: closed.as_mut(),
                close_on_shutdown: served,
            };
            let Some(first) = next_request(&mut stream, wait).await else {
                return; // closed, idle too long, or shutting down: dropping the stream closes it
            };
            let serving = self.serve_one(stream, settings.take(), first, &shutdown);
            let Some(reused) = serving.await else {
                return;
            };
            (stream, settings) = reused.consume();
            served = true;
        }
    }

    /// Starts Pingora on one request whose first bytes are `first`. Not `async`: the session
    /// is built on this call's stack and moved into Pingora's boxed future, so the
    /// connection's own task never has room for one.
    fn serve_one<'a>(
        &'a self,
        stream: Stream,
        settings: Option<HttpPersistentSettings>,
        first: BytesMut,
        shutdown: &'a ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'a>> {
        let mut session = ServerSession::new_http1(stream);
        match settings {
            Some(previous) => previous.apply_to_session(&mut session),
            None => {
                session.set_keepalive(Some(self.keepalive.as_secs().max(1)));
                session.set_keepalive_reuses_remaining(
                    self.app
                        .server_options()
                        .and_then(|o| o.keepalive_request_limit),
                );
            }
        }
        session.set_pipelined_prefix(first);
        self.app.process_new_http(session, shutdown)
    }
}

/// The first bytes of the next request; `None` when the client closed, stayed idle past the
/// keep-alive timeout, or the server is shutting down (idle connections go first).
async fn next_request(stream: &mut Stream, mut wait: Wait<'_, '_>) -> Option<BytesMut> {
    loop {
        tokio::select! {
            biased;
            read = first_bytes(stream) => return read.ok().filter(|b| !b.is_empty()),
            _ = wait.closed.as_mut(), if wait.close_on_shutdown => return None,
            _ = wait.timer.as_mut() => {
                if Instant::now() >= wait.deadline {
                    return None;
                }
                wait.timer.as_mut().reset(wait.deadline);
            }
        }
    }
}

/// What ends a wait for the next request: the idle deadline (its timer may be set earlier)
/// and the server shutting down.
struct Wait<'t, 'n> {
    deadline: Instant,
    timer: Pin<&'t mut Sleep>,
    closed: Pin<&'t mut Notified<'n>>,
    /// Whether shutdown ends this wait (not before the connection's first request).
    close_on_shutdown: bool,
}

/// Reads whatever the client sent next. The buffer lives on the stack of each poll, so a
/// connection waiting here holds no buffer at all; it is left uninitialised because every
/// poll that finds nothing to read would otherwise zero 4 KiB for nothing.
async fn first_bytes(stream: &mut Stream) -> std::io::Result<BytesMut> {
    poll_fn(|cx| {
        let mut buf = [MaybeUninit::<u8>::uninit(); FIRST_READ];
        let mut read = ReadBuf::uninit(&mut buf);
        Pin::new(&mut *stream)
            .poll_read(cx, &mut read)
            .map_ok(|()| {
                // Room for the rest of a head that did not fit, as Pingora's own buffer would have.
                let mut bytes = BytesMut::with_capacity(FIRST_READ);
                bytes.extend_from_slice(read.filled());
                bytes
            })
    })
    .await
}

#[async_trait]
impl<A> ServerApp for Connections<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        match stream.selected_alpn_proto() {
            None | Some(ALPN::H1) => {
                // A task of its own, so the accepting task (sized for a TLS handshake) ends now.
                tokio::spawn(self.clone().serve_h1(stream, shutdown.clone()));
                None
            }
            _ => self.app.process_new(stream, shutdown).await,
        }
    }

    async fn cleanup(&self) {
        // Called once the listeners stopped: connections between requests close now, busy ones
        // after their answer and new ones after their first (Pingora turns keep-alive off when
        // shutting down).
        self.closing.store(true, Ordering::Release);
        self.closed.notify_waiters();
        self.app.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;

    #[async_trait]
    impl HttpServerApp for Nothing {
        async fn process_new_http(
            self: &Arc<Self>,
            _: ServerSession,
            _: &ShutdownWatch,
        ) -> Option<ReusedHttpStream> {
            None
        }
    }

    /// The idle footprint is the connection task itself: keep it small.
    #[test]
    fn connection_task_is_small() {
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let (stream, _client) = tokio::io::duplex(64);
        let stream: Stream = Box::new(stream);
        let app = Arc::new(Connections::new(Nothing, Duration::from_secs(1)));
        let task = app.serve_h1(stream, rx);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "connection task state is {size} bytes");
    }
}
