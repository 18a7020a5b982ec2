//! Where log lines go: stderr, through the redactor, written by a thread of its own, so a
//! request never waits on the terminal or a slow log collector.
//!
//! Lines are redacted ([`crate::redact`]; an access line in the fields a client sent) and
//! appended to one shared buffer (a short, uncontended lock and a copy); the writer thread takes
//! the whole buffer every [`FLUSH_EVERY`] (sooner past [`HIGH_WATER`]) and writes it with one
//! `write(2)`. Measured with `strace -c` under load on the
//! JWT path, a channel to a writer that wakes per line (tracing-appender's non-blocking writer)
//! cost per request one `write(2)`, ~0.8 `futex` and ~2.6 `sched_yield`; this costs none. The
//! buffer is bounded ([`QUEUE_BYTES`]): when it is full, lines are dropped and counted
//! (`gateway_log_lines_dropped_total`) rather than the proxy slowed.
//!
//! Access lines skip the general formatter: measured with callgrind, the JSON formatter of
//! `tracing-subscriber` spent about 37 000 instructions on one access line (some 150 small
//! writes, each validated as UTF-8), a third of the cost of the request itself. An
//! [`AccessLine`] is written in one pass into a buffer the thread reuses.

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use std::net::{IpAddr, SocketAddr};

use crate::client_ip::Client;

/// Most bytes of lines waiting for the writer before lines are dropped.
pub const QUEUE_BYTES: usize = 16 << 20;

/// How long a line may wait for the writer: the writer's period.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);

/// Waiting bytes that wake the writer before its period is up.
pub const HIGH_WATER: usize = 256 << 10;

/// Lines waiting for the writer thread.
struct Queue {
    lines: Mutex<Vec<u8>>,
    /// Set when the process ends: the writer writes out what is left and stops.
    stopping: Mutex<bool>,
    wake: Condvar,
    dropped: AtomicU64,
}

static QUEUE: OnceLock<Arc<Queue>> = OnceLock::new();

/// Whether lines are JSON (else text), as `[log] format` says.
static JSON: OnceLock<bool> = OnceLock::new();

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

/// Queues whole lines, already redacted, for the writer, or counts them dropped when the
/// queue is full.
fn push(lines: &[u8]) {
    let Some(queue) = QUEUE.get() else {
        // No writer thread (a library user): straight to stderr.
        let _ = std::io::stderr().write_all(lines);
        return;
    };
    let Ok(mut queued) = queue.lines.lock() else {
        return;
    };
    if queued.len() + lines.len() > QUEUE_BYTES {
        drop(queued);
        let count = lines.iter().filter(|b| **b == b'\n').count().max(1);
        queue.dropped.fetch_add(count as u64, Ordering::Relaxed);
        return;
    }
    let was = queued.len();
    queued.extend_from_slice(lines);
    let crossed = was < HIGH_WATER && queued.len() >= HIGH_WATER;
    drop(queued);
    if crossed {
        queue.wake.notify_one();
    }
}

/// The writer thread's loop: every period (or when woken), take what is queued and write it in
/// one go; at the end, write out the rest.
fn write_out(queue: &Queue, mut out: impl Write) {
    let mut taken = Vec::with_capacity(64 << 10);
    loop {
        let stopping = match queue.stopping.lock() {
            Ok(flag) if *flag => true,
            Ok(flag) => match queue.wake.wait_timeout(flag, FLUSH_EVERY) {
                Ok((flag, _)) => *flag,
                Err(_) => true,
            },
            Err(_) => true,
        };
        if let Ok(mut queued) = queue.lines.lock() {
            std::mem::swap(&mut *queued, &mut taken);
        }
        if !taken.is_empty() {
            let _ = out.write_all(&taken);
            let _ = out.flush();
            taken.clear();
            // A burst may have grown it; keep an ordinary period's worth.
            taken.shrink_to(1 << 20);
        }
        if stopping {
            return;
        }
    }
}

/// The writer thread; dropping this writes out the lines still queued and ends it (keep it
/// until the process ends).
pub struct Guard {
    thread: Option<JoinHandle<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(queue) = QUEUE.get() {
            if let Ok(mut stopping) = queue.stopping.lock() {
                *stopping = true;
            }
            queue.wake.notify_one();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The log subscriber's writer: each event's bytes, collected and queued as one whole line.
#[derive(Debug, Clone, Copy)]
pub struct Lines;

/// One event's bytes on their way to the queue (queued when dropped).
pub struct EventLine(Vec<u8>);

impl Write for EventLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventLine {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            // Any line may quote a credential (Pingora prints whole request heads at debug).
            push(&crate::redact::redact(&self.0));
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = EventLine;

    fn make_writer(&'a self) -> EventLine {
        EventLine(Vec::with_capacity(256))
    }
}

/// Starts the writer thread (once per process) and returns the subscriber's writer and the
/// guard that writes out what is queued when dropped.
pub fn stderr(json: bool) -> (Lines, Guard) {
    let _ = JSON.set(json);
    let queue = Arc::new(Queue {
        lines: Mutex::new(Vec::with_capacity(64 << 10)),
        stopping: Mutex::new(false),
        wake: Condvar::new(),
        dropped: AtomicU64::new(0),
    });
    if QUEUE.set(queue.clone()).is_err() {
        return (Lines, Guard { thread: None });
    }
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        // Not `stderr().lock()` for the thread's life: `eprintln!` elsewhere would wait forever.
        .spawn(move || write_out(&queue, std::io::stderr()))
        .ok();
    (Lines, Guard { thread })
}

/// One request's access line (all of it known when the request ends).
pub struct AccessLine<'a> {
    /// The request id.
    pub request_id: &'a str,
    /// The trace id, or empty without tracing.
    pub trace_id: &'a str,
    /// The route's name (`unmatched`, ...).
    pub route: &'a str,
    /// The method.
    pub method: &'a str,
    /// The path, never the query.
    pub path: &'a str,
    /// The status answered (0: none).
    pub status: u16,
    /// The upstream's name, or empty.
    pub upstream: &'a str,
    /// The upstream server's address, or none.
    pub server: Option<SocketAddr>,
    /// From the request's start to the end.
    pub duration_ms: f64,
    /// From the head sent upstream to its answer head.
    pub ttfb_ms: Option<f64>,
    /// Tries beyond the first.
    pub retries: usize,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes: usize,
    /// The user agent, bounded.
    pub user_agent: &'a str,
    /// The client.
    pub client_ip: &'a Client,
    /// How authentication went.
    pub auth: &'a str,
}

/// What `server` shows in a text line.
struct Server(Option<SocketAddr>);

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => Ok(()),
        }
    }
}

/// Writes `line` (target `access`, level INFO) when the log filter lets such lines through.
pub fn access(line: &AccessLine<'_>) {
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    if QUEUE.get().is_none() {
        // No writer thread (a library user): the general path.
        let mut text = Vec::new();
        if format_access(&mut text, line, false).is_ok() {
            tracing::info!(target: "access", "{}", String::from_utf8_lossy(&text).trim_end());
        }
        return;
    }
    let json = JSON.get().copied().unwrap_or(true);
    LINE.with(|buf| {
        let Ok(mut buf) = buf.try_borrow_mut() else {
            return;
        };
        buf.clear();
        if format_access(&mut buf, line, json).is_err() {
            return;
        }
        // Only what a client sent can hold a credential: scan those fields, not the line.
        let client_sent = [line.request_id, line.method, line.path, line.user_agent];
        if client_sent
            .iter()
            .any(|f| crate::redact::suspicious(f.as_bytes()))
        {
            push(&crate::redact::redact(&buf));
        } else {
            push(&buf);
        }
    });
}

/// `line` as one JSON object (the fields `tracing-subscriber` writes for an event, flattened,
/// then the access fields) or as `key=value` text, newline-terminated.
///
/// JSON is written field by field with literal keys: measured with callgrind, serde's derive
/// spent about 7 700 instructions on a line (every key escaped, addresses through `Display`'s
/// padding machinery); strings are escaped only when they hold a byte that must be.
fn format_access(buf: &mut Vec<u8>, line: &AccessLine<'_>, json: bool) -> std::io::Result<()> {
    let now = time::OffsetDateTime::now_utc();
    if !json {
        now.format_into(buf, &time::format_description::well_known::Rfc3339)
            .map_err(std::io::Error::other)?;
        write!(
            buf,
            "  INFO access: request_id={} trace_id={} route={} method={} path={:?} status={} \
             upstream={} server={} duration_ms={:.3} ttfb_ms={} retries={} bytes_in={} bytes={} \
             user_agent={:?} client_ip={} auth={}",
            line.request_id,
            line.trace_id,
            line.route,
            line.method,
            line.path,
            line.status,
            line.upstream,
            Server(line.server),
            line.duration_ms,
            line.ttfb_ms.map_or(String::new(), |t| format!("{t:.3}")),
            line.retries,
            line.bytes_in,
            line.bytes,
            line.user_agent,
            line.client_ip,
            line.auth,
        )?;
        buf.push(b'\n');
        return Ok(());
    }
    let mut numbers = itoa::Buffer::new();
    buf.extend_from_slice(b"{\"timestamp\":\"");
    write_timestamp(buf, now)?;
    buf.extend_from_slice(b"\",\"level\":\"INFO\",\"target\":\"access\",\"request_id\":");
    json_str(buf, line.request_id)?;
    buf.extend_from_slice(b",\"trace_id\":");
    json_str(buf, line.trace_id)?;
    buf.extend_from_slice(b",\"route\":");
    json_str(buf, line.route)?;
    buf.extend_from_slice(b",\"method\":");
    json_str(buf, line.method)?;
    buf.extend_from_slice(b",\"path\":");
    json_str(buf, line.path)?;
    buf.extend_from_slice(b",\"status\":");
    buf.extend_from_slice(numbers.format(line.status).as_bytes());
    buf.extend_from_slice(b",\"upstream\":");
    json_str(buf, line.upstream)?;
    buf.extend_from_slice(b",\"server\":\"");
    if let Some(addr) = line.server {
        write_socket_addr(buf, addr)?;
    }
    buf.extend_from_slice(b"\",\"duration_ms\":");
    write_ms(buf, line.duration_ms);
    buf.extend_from_slice(b",\"ttfb_ms\":");
    match line.ttfb_ms {
        Some(t) => write_ms(buf, t),
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"retries\":");
    buf.extend_from_slice(numbers.format(line.retries).as_bytes());
    buf.extend_from_slice(b",\"bytes_in\":");
    buf.extend_from_slice(numbers.format(line.bytes_in).as_bytes());
    buf.extend_from_slice(b",\"bytes\":");
    buf.extend_from_slice(numbers.format(line.bytes).as_bytes());
    buf.extend_from_slice(b",\"user_agent\":");
    json_str(buf, line.user_agent)?;
    buf.extend_from_slice(b",\"client_ip\":");
    match line.client_ip {
        Client::Ip(ip) => {
            buf.push(b'"');
            crate::client_ip::write_ip(buf, *ip);
            buf.push(b'"');
        }
        Client::Unknown(_) => json_str(buf, &line.client_ip.to_string())?,
    }
    buf.extend_from_slice(b",\"auth\":");
    json_str(buf, line.auth)?;
    buf.extend_from_slice(b"}\n");
    Ok(())
}

thread_local! {
    /// The second last formatted on this thread and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: std::cell::Cell<(i64, [u8; 19])> = const { std::cell::Cell::new((i64::MIN, [0; 19])) };
}

/// `now` in RFC 3339 (UTC, microseconds, as the general lines have it); the date and time of
/// day are formatted once per second per thread.
fn write_timestamp(buf: &mut Vec<u8>, now: time::OffsetDateTime) -> std::io::Result<()> {
    let second = now.unix_timestamp();
    let (cached, mut text) = SECOND.get();
    if cached != second {
        let mut full = Vec::with_capacity(32);
        now.format_into(&mut full, &time::format_description::well_known::Rfc3339)
            .map_err(std::io::Error::other)?;
        let prefix = full
            .get(..19)
            .ok_or_else(|| std::io::Error::other("short time"))?;
        text.copy_from_slice(prefix);
        SECOND.set((second, text));
    }
    buf.extend_from_slice(&text);
    buf.push(b'.');
    let micros = now.microsecond();
    for place in [100_000, 10_000, 1_000, 100, 10, 1] {
        buf.push(b'0' + (micros / place % 10) as u8);
    }
    buf.push(b'Z');
    Ok(())
}

/// `s` as a JSON string; escaped by serde_json only when it holds a byte that must be.
fn json_str(buf: &mut Vec<u8>, s: &str) -> std::io::Result<()> {
    // No early exit, so the check runs over whole vectors of bytes at a time.
    let needs_escape = s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !needs_escape {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(&mut *buf, s).map_err(std::io::Error::other)
    }
}

/// Milliseconds with microsecond precision (`12.345`), from integers: `ryu` spent about 400
/// instructions on each float. Anything not a finite, non-negative number is written as 0.
fn write_ms(buf: &mut Vec<u8>, ms: f64) {
    let micros = if ms.is_finite() && ms > 0.0 {
        (ms * 1000.0).round() as u64
    } else {
        0
    };
    buf.extend_from_slice(itoa::Buffer::new().format(micros / 1000).as_bytes());
    let frac = micros % 1000;
    buf.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

fn write_socket_addr(buf: &mut Vec<u8>, addr: SocketAddr) -> std::io::Result<()> {
    match addr {
        SocketAddr::V4(v4) => {
            crate::client_ip::write_ip(buf, IpAddr::V4(*v4.ip()));
            buf.push(b':');
            buf.extend_from_slice(itoa::Buffer::new().format(v4.port()).as_bytes());
            Ok(())
        }
        SocketAddr::V6(v6) => write!(buf, "{v6}"),
    }
}

/// Lines dropped so far because the queue was full.
pub fn dropped() -> u64 {
    QUEUE.get().map_or(0, |q| q.dropped.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_writes_everything_queued_and_stops() {
        let queue = Arc::new(Queue {
            lines: Mutex::new(Vec::new()),
            stopping: Mutex::new(false),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
        });
        let out = Arc::new(Mutex::new(Vec::new()));
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let writer = {
            let (queue, out) = (queue.clone(), out.clone());
            std::thread::spawn(move || write_out(&queue, Shared(out)))
        };
        queue.lines.lock().unwrap().extend_from_slice(b"one\n");
        std::thread::sleep(FLUSH_EVERY * 3);
        assert_eq!(
            out.lock().unwrap().as_slice(),
            b"one\n",
            "written within a period"
        );
        queue
            .lines
            .lock()
            .unwrap()
            .extend_from_slice(b"GET /?token=abc.def.ghi\ntwo\n");
        *queue.stopping.lock().unwrap() = true;
        queue.wake.notify_one();
        writer.join().unwrap();
        let written = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(
            written, "one\nGET /?token=abc.def.ghi\ntwo\n",
            "redacted before"
        );
    }

    const CLIENT: Client = Client::Ip(IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 9)));

    fn line<'a>(path: &'a str, agent: &'a str) -> AccessLine<'a> {
        AccessLine {
            request_id: "r-1",
            trace_id: "",
            route: "api",
            method: "GET",
            path,
            status: 200,
            upstream: "control",
            server: "127.0.0.1:8081".parse().ok(),
            duration_ms: 1.25,
            ttfb_ms: None,
            retries: 0,
            bytes_in: 0,
            bytes: 39,
            user_agent: agent,
            client_ip: &CLIENT,
            auth: "ok",
        }
    }

    #[test]
    fn an_access_line_is_one_json_object_whatever_the_client_sent() {
        let mut buf = Vec::new();
        let odd = line("/a\"b\\c\u{1}d", "curl/8 \"quoted\"\n{x}");
        format_access(&mut buf, &odd, true).unwrap();
        assert_eq!(buf.iter().filter(|b| **b == b'\n').count(), 1);
        assert!(buf.ends_with(b"\n"));
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["target"], "access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["path"], "/a\"b\\c\u{1}d");
        assert_eq!(v["user_agent"], "curl/8 \"quoted\"\n{x}");
        assert_eq!(v["status"], 200);
        assert!(v["ttfb_ms"].is_null());
        let stamp = v["timestamp"].as_str().unwrap();
        assert_eq!(stamp.len(), 27, "{stamp}");
        assert!(
            time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
                .is_ok_and(|t| (time::OffsetDateTime::now_utc() - t).whole_seconds().abs() < 5)
        );
        assert_eq!(v["server"], "127.0.0.1:8081");
        assert_eq!(v["client_ip"], "203.0.113.9");
        assert_eq!(v["duration_ms"], 1.25);
        // Every kind of address and client, and a time to first byte.
        let v6 = Client::Ip("2001:db8::7".parse().unwrap());
        let hop = Client::Unknown("_node\"1".into());
        for (client, want) in [(&v6, "2001:db8::7"), (&hop, "unknown:_node\"1")] {
            let mut l = line("/p", "ua");
            l.client_ip = client;
            l.server = "[2001:db8::1]:8443".parse().ok();
            l.ttfb_ms = Some(0.5);
            let mut buf = Vec::new();
            format_access(&mut buf, &l, true).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            assert_eq!(v["client_ip"], want);
            assert_eq!(v["server"], "[2001:db8::1]:8443");
            assert_eq!(v["ttfb_ms"], 0.5);
        }
        // Text: one line too.
        let mut text = Vec::new();
        format_access(&mut text, &odd, false).unwrap();
        assert_eq!(text.iter().filter(|b| **b == b'\n').count(), 1);
    }
}
