//! Where log lines go: stderr, through the redactor, written by a thread of its own, so a
//! request never waits on the terminal or a slow log collector. The queue is bounded: when it
//! is full, lines are dropped and counted (`gateway_log_lines_dropped_total`) rather than the
//! proxy slowed.
//!
//! Access lines skip the general formatter: measured with callgrind, the JSON formatter of
//! `tracing-subscriber` spent about 37 000 instructions on one access line (some 150 small
//! writes, each validated as UTF-8), a third of the cost of the request itself. An
//! [`AccessLine`] is written in one pass into a buffer the thread reuses.

use std::cell::RefCell;
use std::io::Write;
use std::sync::OnceLock;

use serde::Serialize;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Lines the queue holds before it drops (about 16 MiB of access lines at most).
pub const QUEUE_LINES: usize = 65_536;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// The writer, for lines formatted here.
static WRITER: OnceLock<NonBlocking> = OnceLock::new();

/// Whether lines are JSON (else text), as `[log] format` says.
static JSON: OnceLock<bool> = OnceLock::new();

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

/// The writer for the log subscriber, and the guard that writes out what is queued when it
/// is dropped (keep it until the process ends).
pub fn stderr(json: bool) -> (NonBlocking, WorkerGuard) {
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUE_LINES)
        .lossy(true)
        .thread_name("log-writer")
        // Buffered: the writer thread flushes whenever its queue runs empty, so under load many
        // lines go out in one write(2) instead of one each; when idle, each line at once.
        .finish(crate::redact::Redacting(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        )));
    let _ = DROPPED.set(writer.error_counter());
    let _ = WRITER.set(writer.clone());
    let _ = JSON.set(json);
    (writer, guard)
}

/// One request's access line (all of it known when the request ends).
#[derive(Debug, Serialize)]
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
    /// The upstream server's address, or empty.
    pub server: &'a str,
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
    pub client_ip: &'a str,
    /// How authentication went.
    pub auth: &'a str,
}

/// Writes `line` (target `access`, level INFO) when the log filter lets such lines through.
pub fn access(line: &AccessLine<'_>) {
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    let Some(writer) = WRITER.get() else {
        // No log thread (a library user): the general path.
        tracing::info!(target: "access", line = ?line);
        return;
    };
    let json = JSON.get().copied().unwrap_or(true);
    LINE.with(|buf| {
        let Ok(mut buf) = buf.try_borrow_mut() else {
            return;
        };
        buf.clear();
        if format_access(&mut buf, line, json).is_ok() {
            let _ = writer.clone().write_all(&buf);
        }
    });
}

/// `line` as one JSON object (the fields `tracing-subscriber` writes for an event, flattened,
/// then the access fields) or as `key=value` text, newline-terminated.
fn format_access(buf: &mut Vec<u8>, line: &AccessLine<'_>, json: bool) -> std::io::Result<()> {
    let now = time::OffsetDateTime::now_utc();
    if json {
        buf.extend_from_slice(b"{\"timestamp\":\"");
        now.format_into(buf, &time::format_description::well_known::Rfc3339)
            .map_err(std::io::Error::other)?;
        buf.extend_from_slice(b"\",\"level\":\"INFO\",\"target\":\"access\",");
        // The struct's own object, opened brace dropped to join the head above.
        let start = buf.len();
        serde_json::to_writer(&mut *buf, line)?;
        buf.remove(start);
    } else {
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
            line.server,
            line.duration_ms,
            line.ttfb_ms.map_or(String::new(), |t| format!("{t:.3}")),
            line.retries,
            line.bytes_in,
            line.bytes,
            line.user_agent,
            line.client_ip,
            line.auth,
        )?;
    }
    buf.push(b'\n');
    Ok(())
}

/// Lines dropped so far because the queue was full.
pub fn dropped() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(path: &'a str, agent: &'a str) -> AccessLine<'a> {
        AccessLine {
            request_id: "r-1",
            trace_id: "",
            route: "api",
            method: "GET",
            path,
            status: 200,
            upstream: "control",
            server: "127.0.0.1:8081",
            duration_ms: 1.25,
            ttfb_ms: None,
            retries: 0,
            bytes_in: 0,
            bytes: 39,
            user_agent: agent,
            client_ip: "203.0.113.9",
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
        assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
        // Text: one line too.
        let mut text = Vec::new();
        format_access(&mut text, &odd, false).unwrap();
        assert_eq!(text.iter().filter(|b| **b == b'\n').count(), 1);
    }
}
