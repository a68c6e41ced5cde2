//! The multihub reference provider (DESIGN §5–6): gateway → idempotency → policy → boundary →
//! scoring → atomic commit → signed receipt → hash-chained audit → at-least-once emission.
//!
//! - [`config`]: file model and validated runtime model.
//! - [`intent`]: the typed, integers-only intent and its canonical form.
//! - [`policy`]: versioned policies, delegation registry, the deterministic decision.
//! - [`store`]: the store trait, SQLite, and the group-committing writer thread.
//! - [`service`]: the pipeline over (headers, body), without Pingora.
//! - [`server`]: Pingora listeners (ingest, admin) and start-up.
//! - [`outbox`], [`client`]: at-least-once delivery of signals and outcomes.
//! - [`verify`]: chain / signature / re-run verification and `replay`.
//! - [`keys`]: the key file.

pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod intent;
pub mod keys;
pub mod metrics;
pub mod outbox;
pub mod policy;
pub mod server;
pub mod service;
pub mod store;
pub mod verify;

pub use error::ProviderError;
