//! The multihub hub: thin Pingora glue around `multihub-filters`.
//!
//! - [`cli`]: the command line of `multihub-hub`.
//! - [`hub`]: the `ProxyHttp` implementation (request phases).
//! - [`deliver`]: pooled upstream deliveries.
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
pub mod reload;
pub mod server;
pub mod state;

pub use error::HubError;
