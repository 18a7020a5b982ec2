//! Where log lines go: stderr, through the redactor, written by a thread of its own, so a
//! request never waits on the terminal or a slow log collector. The queue is bounded: when it
//! is full, lines are dropped and counted (`gateway_log_lines_dropped_total`) rather than the
//! proxy slowed.

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Lines the queue holds before it drops (about 16 MiB of access lines at most).
pub const QUEUE_LINES: usize = 65_536;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// The writer for the log subscriber, and the guard that writes out what is queued when it
/// is dropped (keep it until the process ends).
pub fn stderr() -> (NonBlocking, WorkerGuard) {
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUE_LINES)
        .lossy(true)
        .thread_name("log-writer")
        .finish(crate::redact::stderr());
    let _ = DROPPED.set(writer.error_counter());
    (writer, guard)
}

/// Lines dropped so far because the queue was full.
pub fn dropped() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}
