//! The wire contract of `DESIGN.md` shared by the hub, the providers and the association.
//!
//! This crate owns the names and formulas: header names (§3), the request-id grammar, the body
//! representation and binding hashes, and the routing-table file model (§2). Being the one
//! crate every binary depends on, it also holds their shared plumbing: logging, listener
//! probes (`net`) and the lean HTTP/1.1 layer (`http1`), the only modules that do I/O.

pub mod hashing;
pub mod headers;
/// Lean HTTP/1.1: the server connection of the hub's and the association's listeners, and the hub's
/// upstream exchanges.
pub mod http1;
pub mod ids;
/// Process plumbing every binary shares (kept here: this is the one crate they all depend on).
pub mod logging;
/// Process plumbing: where a process probes its own listener.
pub mod net;
pub mod receipt;
pub mod routes;
pub mod signal;

pub use hashing::{binding_hex, repr_of, Repr};
pub use ids::{generate_request_id, validate_hub_id, validate_request_id, IdError};
