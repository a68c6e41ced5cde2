//! The multihub hub: thin glue around `multihub-filters` on a Pingora server.
//!
//! - [`cli`]: the command line of `multihub-hub`.
//! - [`hub`]: the listener, a Pingora `ServerApp` speaking HTTP/1.1 through
//!   `multihub_protocol::http1` (one request: route, read, deliver, answer, log).
//! - [`deliver`]: pooled upstream deliveries (plain Tokio TCP connections,
//!   `multihub_protocol::http1::client` exchanges).
//! - [`pipeline`]: opt-in HTTP/1.1 pipelining of deliveries to an upstream.
//! - [`state`]: the swapped table slot and the delivery engine.
//! - [`server`]: building and running the Pingora server.

pub mod access;
pub mod admin;
pub mod cli;
pub mod deliver;
pub mod error;
pub mod fanout;
pub mod hub;
pub mod lifecycle;
pub mod metrics;
pub mod modes;
pub mod outcomes;
pub mod pipeline;
pub mod reload;
pub mod server;
pub mod state;

pub use error::HubError;
