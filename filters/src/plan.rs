//! The per-request decision, computed before the body is read: which route, which request id,
//! which targets and relays, and the outbound path and hops. Owned, so the proxy can hold it
//! across the body read.

use http::Method;

use crate::headers::Headers;

use crate::inbound::{inbound, Inbound};
use crate::matching::match_route;
use crate::reject::Reject;
use crate::relay::{plan_relays, RelayPlan};
use crate::select::select_targets;
use crate::table::RoutingTable;

/// A borrowed view of the request head: all the filters see.
pub struct RequestView<'a, H: ?Sized> {
    pub method: &'a Method,
    /// Path without the query.
    pub path: &'a str,
    /// `Host` header (or the URI authority).
    pub host: Option<&'a str>,
    pub headers: &'a H,
}

/// What the hub does with a request (upstream indices refer to the table it was planned on).
#[derive(Debug, Clone)]
pub struct Plan {
    /// Index into `RoutingTable::routes`.
    pub route: usize,
    pub inbound: Inbound,
    /// Selected provider targets.
    pub targets: Vec<usize>,
    pub relay: RelayPlan,
}

/// Plans a request, or refuses it (404 no route / reserved, 400 bad headers, 508 loop).
pub fn plan<H: Headers + ?Sized>(
    table: &RoutingTable,
    req: &RequestView<'_, H>,
    healthy: impl Fn(usize) -> bool,
) -> Result<Plan, Reject> {
    let route = match_route(table, req)?;
    let inbound = inbound(req.headers)?;
    let r = &table.routes[route];
    let relay = plan_relays(table, r, &inbound)?;
    let mut targets = Vec::with_capacity(r.targets.len());
    select_targets(r, req.headers, healthy, &mut targets);
    Ok(Plan {
        route,
        inbound,
        targets,
        relay,
    })
}
