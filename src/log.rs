//! The one logging facility: a global level, leveled macros, one line per event on stderr.
//!
//! Deliberately tiny: a relaxed atomic load decides whether a line is formatted at all, so
//! disabled levels cost one branch on the request path.

use std::fmt;
use std::io::Write;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    Error = 1,
    Warning = 2,
    Info = 3,
    Debug = 4,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warning => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "error" => Ok(Level::Error),
            "warning" | "warn" => Ok(Level::Warning),
            "info" => Ok(Level::Info),
            "debug" | "trace" => Ok(Level::Debug),
            other => Err(format!(
                "unknown log level `{other}` (expected debug, info, warning or error)"
            )),
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Warning as u8);

pub fn set_level(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

#[inline]
pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

/// Writes one line; called through the macros only after `enabled` said yes. Cold: the
/// formatting of a line the request path logs is then laid out away from its hot code.
#[cold]
#[inline(never)]
pub fn write(level: Level, target: &str, args: fmt::Arguments<'_>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let line = if JSON.load(Ordering::Relaxed) {
        let v = serde_json::json!({
            "ts": now.as_secs_f64(),
            "level": level.as_str(),
            "target": target,
            "msg": args.to_string(),
        });
        format!("{v}\n")
    } else {
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        format!(
            "{h:02}:{m:02}:{s:02}.{:06}Z {:<5} {target}: {args}\n",
            now.subsec_micros(),
            level.as_str()
        )
    };
    // One write per line so lines from different workers never interleave.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

#[macro_export]
macro_rules! log_at {
    ($lvl:expr, $($arg:tt)+) => {
        if $crate::log::enabled($lvl) {
            $crate::log::write($lvl, module_path!(), format_args!($($arg)+));
        }
    };
}
#[macro_export]
macro_rules! error { ($($arg:tt)+) => { $crate::log_at!($crate::log::Level::Error, $($arg)+) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)+) => { $crate::log_at!($crate::log::Level::Warning, $($arg)+) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)+) => { $crate::log_at!($crate::log::Level::Info, $($arg)+) }; }
#[macro_export]
macro_rules! debug { ($($arg:tt)+) => { $crate::log_at!($crate::log::Level::Debug, $($arg)+) }; }

/// Line format: human-readable text, or one JSON object per line for log shippers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            other => Err(format!(
                "unknown log format `{other}` (expected text or json)"
            )),
        }
    }
}

static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_format(f: Format) {
    JSON.store(f == Format::Json, Ordering::Relaxed);
}

/// The start-up line as printed on stdout: the message itself, or under the JSON format one
/// object shaped like every other log line.
pub fn startup_line(msg: &str) -> String {
    if !JSON.load(Ordering::Relaxed) {
        return msg.to_string();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    serde_json::json!({
        "ts": now.as_secs_f64(),
        "level": Level::Info.as_str(),
        "target": "xpyd",
        "msg": msg,
    })
    .to_string()
}
