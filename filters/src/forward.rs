//! Which requester headers are copied to upstreams, and the hub headers stamped on every copy.

use http::{HeaderMap, HeaderName, HeaderValue};
use multihub_protocol::headers::{self as h, is_hop_by_hop, HUB_PREFIX};

use crate::plan::Plan;
use crate::table::RoutingTable;

/// Names listed in the requester's `Connection` header (also hop-by-hop), lower case.
pub fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    let mut out = Vec::new();
    for v in headers.get_all(http::header::CONNECTION) {
        if let Ok(s) = v.to_str() {
            out.extend(
                s.split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty()),
            );
        }
    }
    out
}

/// True when a requester header is copied to upstreams: not hop-by-hop, not named in
/// `Connection`, not hub-internal (`x-hub-*` is re-stamped by the hub), not `Host` or
/// `Content-Length` (set per copy), and not `x-request-id` (stamped after validation).
pub fn is_forwarded(name: &HeaderName, connection: &[String]) -> bool {
    let n = name.as_str();
    !(is_hop_by_hop(n)
        || n.starts_with(HUB_PREFIX)
        || n == "host"
        || n == "content-length"
        || n == h::REQUEST_ID
        || connection.iter().any(|t| t == n))
}

/// The hub headers of DESIGN §3 for one request, in a fixed order.
pub fn hub_headers(
    table: &RoutingTable,
    plan: &Plan,
    repr: HeaderValue,
    binding: HeaderValue,
) -> [(&'static str, HeaderValue); 10] {
    let route = &table.routes[plan.route];
    [
        (h::REQUEST_ID, plan.inbound.request_id.clone()),
        (h::HUB_ID, table.hub.id_header.clone()),
        (h::HUB_ROUTE, route.id_header.clone()),
        (h::HUB_ROUTE_VERSION, table.version_header.clone()),
        (h::HUB_REQUEST_REPR, repr),
        (h::HUB_CONTEXT, plan.inbound.context.clone()),
        (h::HUB_BINDING, binding),
        (h::HUB_PATH, plan.relay.path_out.clone()),
        (h::HUB_HOPS, HeaderValue::from(plan.relay.hops_out)),
        (h::HUB_OUTCOME_URL, table.hub.outcome_url_header.clone()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_hub_and_connection_listed_are_dropped() {
        let mut m = HeaderMap::new();
        m.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        let conn = connection_tokens(&m);
        for dropped in [
            "connection",
            "keep-alive",
            "te",
            "upgrade",
            "expect",
            "transfer-encoding",
            "x-hub-id",
            "x-hub-route-version",
            "x-secret",
            "host",
            "content-length",
            "x-request-id",
        ] {
            assert!(
                !is_forwarded(&HeaderName::from_static(dropped), &conn),
                "{dropped} forwarded"
            );
        }
        for kept in [
            "content-type",
            "authorization",
            "x-verification-context",
            "idempotency-key",
        ] {
            assert!(
                is_forwarded(&HeaderName::from_static(kept), &conn),
                "{kept} dropped"
            );
        }
    }
}
