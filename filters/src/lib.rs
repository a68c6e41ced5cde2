//! The hub's request logic as plain functions over borrowed views: no Pingora, no I/O on the
//! request path. `proxy/` calls these for every request and acts on the returned decision.
//!
//! - [`table`]: the routing-table runtime model, lowered and validated from the file model.
//! - [`source`]: reading a table from a single file or a `routes/` directory with an `active` pointer.
//! - [`headers`]: read access to a request's fields (the parsed head itself, or a `HeaderMap`).
//! - [`plan`]: the per-request decision: route, request id, targets, relays, outbound path and hops.
//! - [`forward`]: which fields are forwarded, and the upstream request head on the wire format.
//! - [`reject`]: every refusal as a status code and a JSON body.

pub mod forward;
pub mod headers;
pub mod inbound;
pub mod matching;
pub mod outcome;
pub mod plan;
pub mod reject;
pub mod relay;
pub mod select;
pub mod source;
pub mod table;
pub mod url;

pub use headers::Headers;
pub use plan::{plan, Plan, RequestView};
pub use reject::Reject;
pub use table::{
    compile, ConfigError, Problem, Route, RoutingTable, Upstream, UpstreamKind, MAX_SLOTS,
};
