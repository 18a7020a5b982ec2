//! Client connections that cost little while idle.
//!
//! Pingora serves a keep-alive HTTP/1 connection from one task whose state is sized for the
//! largest step of a request (TLS handshake, proxying), and allocates the next request's
//! session and head buffer before the client sends a byte: about 40 KiB per idle connection.
//! [`Connections`] runs each HTTP/1 connection in its own small task instead, which waits for
//! the first bytes of the next request with no session and no buffer (the read goes to the
//! stack), then hands those bytes to Pingora as the start of the request. HTTP/2 connections
//! are left to Pingora as they are (their streams are separate tasks already).
//!
//! The task also collects the whole head before Pingora sees it and has [`head::check`] judge
//! it, so a head Pingora would refuse with its own bare answer gets the envelope instead, and a
//! head that trickles in has one deadline for all of it (`client_header_timeout_ms`), not one
//! per read. Connections still sending their head are bounded per client address and in all.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::sync::{futures::Notified, Notify};
use tokio::time::{sleep, Instant, Sleep};

use crate::head::{self, Head, Refusal};
use crate::metrics::GaugeGuard;

/// How much of a new request one read takes; Pingora's own first head read is as large.
const FIRST_READ: usize = 4096;

/// How heads are judged, from the configuration in force.
#[derive(Debug, Clone, Copy)]
pub struct HeadRules {
    /// Size and field-count limits.
    pub limits: head::Limits,
    /// Longest time from a request's first byte (a connection's accept, for its first
    /// request) to the end of its head.
    pub timeout: Duration,
    /// Most connections still sending a head that did not come in one read, in all.
    pub max_pending: usize,
    /// The same, per client address (the socket peer).
    pub max_pending_per_client: usize,
}

/// What the connection task asks of the gateway about heads.
pub trait Heads: Send + Sync {
    /// The rules in force now for a connection from `peer` (a trusted proxy may be exempt
    /// from the per-client bound).
    fn rules(&self, peer: Option<IpAddr>) -> HeadRules;
    /// Counts a refused head; `line` is its method and target when they could be read.
    fn refused(&self, refusal: Refusal, line: Option<(&str, &str)>);
}

/// Gauges of open client connections: plain HTTP/1, HTTP/1 over TLS, HTTP/2 over TLS.
#[derive(Clone)]
pub struct OpenGauges {
    /// HTTP/1 without TLS.
    pub http1: prometheus::IntGauge,
    /// HTTP/1 over TLS.
    pub http1_tls: prometheus::IntGauge,
    /// HTTP/2 (over TLS: the gateway offers it by ALPN only).
    pub h2_tls: prometheus::IntGauge,
}

/// A [`ServerApp`] that serves HTTP/1 connections of `app` with a small idle footprint.
pub struct Connections<A> {
    app: Arc<A>,
    open: OpenGauges,
    heads: Arc<dyn Heads>,
    pending: Pending,
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
    /// Serves `app`, judging heads by `heads`, closing a connection idle for `keepalive`
    /// between requests, and counting open connections on `open`.
    pub fn new(app: A, heads: Arc<dyn Heads>, keepalive: Duration, open: OpenGauges) -> Self {
        Connections {
            app: Arc::new(app),
            open,
            heads,
            pending: Pending::default(),
            keepalive,
            closing: AtomicBool::new(false),
            closed: Notify::new(),
        }
    }

    /// One HTTP/1 connection: wait for a request's first bytes, let Pingora serve it, repeat.
    async fn serve_h1(
        self: Arc<Self>,
        mut stream: Stream,
        shutdown: ShutdownWatch,
        _open: GaugeGuard,
    ) {
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
        let peer = peer_ip(&stream);
        let accepted = Instant::now();
        loop {
            if served && self.closing.load(Ordering::Acquire) {
                return;
            }
            let rules = self.heads.rules(peer);
            // A new connection's first request must arrive whole within the head timeout;
            // later ones may wait the keep-alive timeout for their first byte.
            let deadline = if served {
                Instant::now() + self.keepalive
            } else {
                (accepted + rules.timeout).min(accepted + self.keepalive)
            };
            let wait = Wait {
                deadline,
                timer: timer.as_mut(),
                closed: closed.as_mut(),
                close_on_shutdown: served,
            };
            let Some(first) = next_request(&mut stream, wait).await else {
                return; // closed, idle too long, or shutting down: dropping the stream closes it
            };
            let head_deadline = if served {
                Instant::now() + rules.timeout
            } else {
                accepted + rules.timeout
            };
            let first = match head::check(&first, rules.limits) {
                Head::Complete(_) => first,
                // Rare: a head that did not come in one read, or one to refuse. Boxed, so that
                // the idle connection's task keeps no room for it.
                verdict => {
                    let collect = self.rest_of_head(&mut stream, first, verdict, peer, rules);
                    let collected = Box::pin(tokio::time::timeout_at(head_deadline, collect)).await;
                    match collected {
                        Ok(Ok(head)) => head,
                        Ok(Err(Collected::Refused(refusal, head))) => {
                            return self.refuse(stream, refusal, &head).await
                        }
                        Ok(Err(Collected::Gone)) => return,
                        Err(_) => return self.refuse(stream, Refusal::Timeout, &[]).await,
                    }
                }
            };
            let serving = self.serve_one(stream, settings.take(), first, &shutdown);
            let Some(reused) = serving.await else {
                return;
            };
            (stream, settings) = reused.consume();
            served = true;
        }
    }

    /// Reads the rest of a head whose first bytes `head` got `verdict`, under the bounds on
    /// connections still sending one.
    async fn rest_of_head(
        &self,
        stream: &mut Stream,
        mut head: BytesMut,
        mut verdict: Head,
        peer: Option<IpAddr>,
        rules: HeadRules,
    ) -> Result<BytesMut, Collected> {
        let mut _slot = None;
        loop {
            match verdict {
                Head::Complete(_) => return Ok(head),
                Head::Refused(refusal) => return Err(Collected::Refused(refusal, head)),
                Head::Incomplete => {}
            }
            if _slot.is_none() {
                match self.pending.enter(peer, &rules) {
                    Ok(slot) => _slot = Some(slot),
                    Err(refusal) => return Err(Collected::Refused(refusal, head)),
                }
            }
            head.reserve(FIRST_READ);
            let before = head.len();
            match stream.read_buf(&mut head).await {
                Ok(0) | Err(_) => return Err(Collected::Gone),
                Ok(_) => {}
            }
            // Judged again only when a line ended (or the size ran over): a head that
            // trickles in a byte at a time is not parsed once per byte.
            let line_ended = memchr::memchr(b'\n', &head[before..]).is_some();
            verdict = if line_ended || head.len() > rules.limits.max_bytes {
                head::check(&head, rules.limits)
            } else {
                Head::Incomplete
            };
        }
    }

    /// Answers a refused head with its envelope and closes the connection.
    async fn refuse(&self, mut stream: Stream, refusal: Refusal, head: &[u8]) {
        self.heads.refused(refusal, request_line(head));
        let answer = refusal_answer(refusal);
        // The client may be gone already; nothing else to do then.
        let _ = stream.write_all(&answer).await;
        let _ = stream.flush().await;
        let _ = stream.shutdown().await;
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

/// Why a head was not collected.
enum Collected {
    /// Refuse it; what arrived so far (for the request line).
    Refused(Refusal, BytesMut),
    /// The client closed or the connection broke: nothing to answer.
    Gone,
}

/// The socket peer's address.
fn peer_ip(stream: &Stream) -> Option<IpAddr> {
    let digest = stream.get_socket_digest()?;
    let addr = digest.peer_addr()?.as_inet()?;
    Some(crate::client_ip::canonical(addr.ip()))
}

/// The method and target of a head's request line, when it has a readable one.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    (token(method) && token(target)).then_some((method, target))
}

/// The whole HTTP/1.1 answer to a refused head: the envelope, a fresh request id, and
/// `Connection: close` (the rest of what the client sent is not read).
fn refusal_answer(refusal: Refusal) -> Vec<u8> {
    let status = refusal.status();
    let body = crate::envelope::body(refusal.message());
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut id = [0u8; uuid::fmt::Simple::LENGTH];
    let id = uuid::Uuid::new_v4().simple().encode_lower(&mut id);
    let retry = if matches!(refusal, Refusal::Busy | Refusal::BusyClient) {
        "Retry-After: 1\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         X-Request-Id: {id}\r\nX-Content-Type-Options: nosniff\r\n{retry}\
         Connection: close\r\n\r\n",
        crate::envelope::CONTENT_TYPE,
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Connections still sending a head that did not come in one read, in all and per client.
#[derive(Default)]
struct Pending {
    total: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place among the pending ones, given back on drop.
struct Slot<'a> {
    pending: &'a Pending,
    client: Option<IpAddr>,
}

impl Pending {
    fn enter(&self, client: Option<IpAddr>, rules: &HeadRules) -> Result<Slot<'_>, Refusal> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= rules.max_pending {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Busy);
        }
        // From here on the slot gives the total back on drop.
        let mut slot = Slot {
            pending: self,
            client: None,
        };
        if let (Some(ip), Ok(mut map)) = (client, self.per_client.lock()) {
            let count = map.entry(ip).or_insert(0);
            if *count >= rules.max_pending_per_client {
                return Err(Refusal::BusyClient);
            }
            *count += 1;
            slot.client = Some(ip);
        }
        Ok(slot)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.pending.total.fetch_sub(1, Ordering::AcqRel);
        if let (Some(ip), Ok(mut map)) = (self.client, self.pending.per_client.lock()) {
            if let Some(count) = map.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

/// The first bytes of the next request; `None` when the client closed, stayed idle past the
/// keep-alive timeout, or the server is shutting down (idle connections go first).
async fn next_request(stream: &mut Stream, mut wait: Wait<'_, '_>) -> Option<BytesMut> {
    // The timer runs for the keep-alive deadline; a new connection's head deadline is earlier.
    if wait.timer.deadline() > wait.deadline {
        wait.timer.as_mut().reset(wait.deadline);
    }
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
        let tls = stream.get_ssl_digest().is_some();
        match stream.selected_alpn_proto() {
            None | Some(ALPN::H1) => {
                let gauge = if tls {
                    &self.open.http1_tls
                } else {
                    &self.open.http1
                };
                let open = GaugeGuard::new(gauge);
                // A task of its own, so the accepting task (sized for a TLS handshake) ends now.
                tokio::spawn(self.clone().serve_h1(stream, shutdown.clone(), open));
                None
            }
            _ => {
                // Pingora serves the whole HTTP/2 connection within this call.
                let _open = GaugeGuard::new(&self.open.h2_tls);
                self.app.process_new(stream, shutdown).await
            }
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

    struct Rules;

    impl Heads for Rules {
        fn rules(&self, _: Option<IpAddr>) -> HeadRules {
            HeadRules {
                limits: head::Limits {
                    max_bytes: 1024,
                    max_headers: 8,
                },
                timeout: Duration::from_secs(1),
                max_pending: 2,
                max_pending_per_client: 1,
            }
        }
        fn refused(&self, _: Refusal, _: Option<(&str, &str)>) {}
    }

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
        let gauge = prometheus::IntGauge::new("open", "open").unwrap();
        let app = Arc::new(Connections::new(
            Nothing,
            Arc::new(Rules),
            Duration::from_secs(1),
            OpenGauges {
                http1: gauge.clone(),
                http1_tls: gauge.clone(),
                h2_tls: gauge.clone(),
            },
        ));
        let open = GaugeGuard::new(&gauge);
        let task = app.serve_h1(stream, rx, open);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "connection task state is {size} bytes");
    }

    #[test]
    fn pending_heads_are_bounded_per_client_and_in_all() {
        let pending = Pending::default();
        let rules = Rules.rules(None);
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            "192.0.2.3".parse().unwrap(),
        );
        let first = pending.enter(Some(a), &rules).unwrap();
        assert_eq!(
            pending.enter(Some(a), &rules).err(),
            Some(Refusal::BusyClient)
        );
        let second = pending.enter(Some(b), &rules).unwrap();
        assert_eq!(pending.enter(Some(c), &rules).err(), Some(Refusal::Busy));
        drop(first);
        let third = pending.enter(Some(a), &rules).unwrap();
        drop((second, third));
        assert_eq!(pending.total.load(Ordering::SeqCst), 0);
        assert!(pending.per_client.lock().unwrap().is_empty());
    }

    #[test]
    fn refused_heads_get_a_whole_envelope_answer() {
        let answer = String::from_utf8(refusal_answer(Refusal::TooManyHeaders)).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{answer}"
        );
        assert!(answer.contains("Connection: close\r\n"));
        assert!(!answer.to_ascii_lowercase().contains("server:"));
        let body = r#"{"status":"error","message":"request header fields too large"}"#;
        assert!(
            answer.ends_with(&format!("Content-Length: {}\r\n\r\n{body}", body.len()))
                || answer.contains(&format!("Content-Length: {}\r\n", body.len()))
        );
        assert!(answer.ends_with(body));
        assert_eq!(
            request_line(b"GET /a?b HTTP/1.1\r\n"),
            Some(("GET", "/a?b"))
        );
        assert_eq!(request_line(b"\x01 /a"), None);
    }
}
