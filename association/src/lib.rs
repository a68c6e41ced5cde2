//! multihub association (DESIGN §6–7): records boundary presence, verifies signatures, links and
//! confirms. It authorizes nothing.
//!
//! - [`config`]: file model and validated runtime model.
//! - [`policy`]: confirmation policies and linkage from digests.
//! - [`store`]: the [`store::SignalStore`] trait and its SQLite implementation (group commit).
//! - [`core`]: intake (parse, lookup, `verify_strict`), the writer thread, the read API documents.
//! - [`api`]: Pingora glue for the API and admin listeners.
//! - [`verify`]: the offline check.

pub mod api;
pub mod cli;
pub mod config;
pub mod core;
pub mod error;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod store;
pub mod verify;

pub use error::{ApiError, AssociationError};
