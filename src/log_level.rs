//! The log filter in force, changeable at runtime (`PUT /-/log-level` on the admin port), so an
//! operator can turn on debug lines for a minute without a restart or a reload.

use std::sync::{Mutex, OnceLock};

/// Sets the filter from a directive; installed by whoever set up logging.
type Setter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

struct Control {
    set: Setter,
    current: Mutex<String>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// The directive the process starts with for `[log] level`: the Redis client's own lines stay
/// at errors unless the level names it (it warns on every reconnect attempt, while the gateway
/// reports each change of the store's state once).
pub fn directive(level: &str) -> String {
    if level.contains("redis") {
        level.to_string()
    } else {
        format!("{level},redis=error")
    }
}

/// Makes the filter changeable: `set` applies a directive, `initial` is the one in force.
/// Only the first call counts (there is one logging setup per process).
pub fn install(initial: &str, set: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static) {
    let _ = CONTROL.set(Control {
        set: Box::new(set),
        current: Mutex::new(initial.to_string()),
    });
}

/// The directive in force, when the filter is changeable.
pub fn current() -> Option<String> {
    let control = CONTROL.get()?;
    control.current.lock().ok().map(|c| c.clone())
}

/// Applies `level` (an `EnvFilter` directive such as `debug` or `info,pingora=debug`, made
/// with [`directive`]) and returns the directive now in force; an error names what is wrong.
pub fn set(level: &str) -> Result<String, String> {
    let control = CONTROL
        .get()
        .ok_or_else(|| "the log level cannot be changed in this process".to_string())?;
    let level = level.trim();
    if level.is_empty() || level.len() > 512 {
        return Err("level must be a filter directive of 1 to 512 bytes".into());
    }
    let wanted = directive(level);
    (control.set)(&wanted)?;
    if let Ok(mut current) = control.current.lock() {
        current.clone_from(&wanted);
    }
    Ok(wanted)
}
