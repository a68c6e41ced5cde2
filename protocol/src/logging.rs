//! The `log` backend of every multihub binary (Pingora logs through `log`): one line per record
//! on stderr, level from `MULTIHUB_LOG` (`error`, `warn`, `info`, `debug`, `trace`; default `info`).

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

struct StderrLogger {
    level: LevelFilter,
}

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let lvl = match r.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        let mut e = std::io::stderr().lock();
        let _ = writeln!(
            e,
            "{}.{:03} {lvl} {}: {}",
            now.as_secs(),
            now.subsec_millis(),
            r.target(),
            r.args()
        );
    }

    fn flush(&self) {}
}

/// Installs the logger once; later calls are ignored.
pub fn init() {
    let level = std::env::var("MULTIHUB_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Info);
    if log::set_boxed_logger(Box::new(StderrLogger { level })).is_ok() {
        log::set_max_level(level);
    }
}
