//! The access log: one JSON line per request (request id, route, version, status, deliveries,
//! duration), buffered and flushed at least once a second and at shutdown.

use serde::Serialize;
use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// One access-log line.
#[derive(Serialize)]
pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub route: &'a str,
    pub version: &'a str,
    pub status: u16,
    pub delivered: u16,
    pub failed: u16,
    pub duration_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

#[derive(Serialize)]
struct Line<'a> {
    ts_ms: u64,
    #[serde(flatten)]
    rec: &'a AccessRecord<'a>,
}

/// A buffered line sink shared by every request.
pub struct AccessLog {
    out: Mutex<BufWriter<Box<dyn Write + Send>>>,
}

impl AccessLog {
    /// `stdout`, or a file path (appended to).
    pub fn open(target: &str) -> std::io::Result<AccessLog> {
        let w: Box<dyn Write + Send> = if target == "stdout" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(Path::new(target))?,
            )
        };
        Ok(AccessLog {
            out: Mutex::new(BufWriter::with_capacity(64 * 1024, w)),
        })
    }

    pub fn write(&self, rec: &AccessRecord<'_>) {
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if serde_json::to_writer(&mut *out, &Line { ts_ms, rec }).is_ok() {
            let _ = out.write_all(b"\n");
        }
    }

    pub fn flush(&self) {
        let _ = self.out.lock().unwrap_or_else(|e| e.into_inner()).flush();
    }
}
