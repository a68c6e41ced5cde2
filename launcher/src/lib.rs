//! `multihub up` and `multihub demo`: run the topology of `conf/` on loopback and show what it does.
//!
//! - [`topology`]: what `conf/` describes (hubs, providers, association, outcome sink).
//! - [`up`]: key generation, derived association config, process supervision, readiness.
//! - [`sink`]: the outcome sink (records what the hubs relay back).
//! - [`demo`]: sends operations and reports verdicts, signals, linkage, confirmation, receipts.
//! - [`client`]: a minimal HTTP/1.1 client for readiness probes and the demo.

pub mod client;
pub mod demo;
pub mod sink;
pub mod topology;
pub mod up;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("{path}: {detail}")]
    Conf { path: String, detail: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
}
