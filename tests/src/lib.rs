//! Test harness: real `multihub-*` processes and in-process recording upstreams, all on
//! 127.0.0.1 with ephemeral ports; readiness is polled with a deadline, never slept for.

pub mod association;
pub mod http;
pub mod procs;
pub mod provider;
pub mod recorder;
pub mod topology;

pub use http::{Conn, Response};
pub use procs::{bin_path, free_port, run_bin, workspace_root, HubProc, TempDir, DOWN_URL};
pub use recorder::{Behaviour, Recorded, Recorder};

use std::time::{Duration, Instant};

/// [`eventually`] with an async check.
pub async fn eventually_async<T, F>(what: &str, deadline: Duration, mut f: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `f` until it returns `Some` or `deadline` passes.
pub async fn eventually<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Hex sha256 of bytes.
pub fn sha256_hex(b: &[u8]) -> String {
    multihub_protocol::hashing::sha256_hex(b)
}
