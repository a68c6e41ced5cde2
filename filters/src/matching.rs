//! Route matching: longest `path_prefix` (on a segment boundary), then methods, host, headers.

use multihub_protocol::headers::RESERVED_PATH_PREFIX;

use crate::headers::Headers;
use crate::plan::RequestView;
use crate::reject::Reject;
use crate::table::{Route, RoutingTable};

/// True when `path` is `prefix` or lies below it: `/v1/pay` matches `/v1/pay` and `/v1/pay/1`,
/// not `/v1/payments`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

fn host_matches(want: &str, got: Option<&str>) -> bool {
    let Some(got) = got else { return false };
    // Strip a port; IPv6 literals keep their brackets.
    let host = match got.rfind(':') {
        Some(i) if !got[i..].contains(']') => &got[..i],
        _ => got,
    };
    host.eq_ignore_ascii_case(want)
}

fn headers_match<H: Headers + ?Sized>(route: &Route, headers: &H) -> bool {
    route
        .headers
        .iter()
        .all(|(name, value)| headers.first(name.as_str()) == Some(value.as_bytes()))
}

/// Index of the route that serves the request, or a 404 refusal.
pub fn match_route<H: Headers + ?Sized>(
    table: &RoutingTable,
    req: &RequestView<'_, H>,
) -> Result<usize, Reject> {
    if req.path.starts_with(RESERVED_PATH_PREFIX) || req.path == "/_hub" {
        return Err(Reject::new(
            404,
            "reserved_path",
            "paths under /_hub/ are reserved for the hub and never routed",
        ));
    }
    for (i, r) in table.routes.iter().enumerate() {
        if !prefix_matches(&r.path_prefix, req.path) {
            continue;
        }
        if !r.methods.is_empty() && !r.methods.contains(req.method) {
            continue;
        }
        if let Some(h) = &r.host {
            if !host_matches(h, req.host) {
                continue;
            }
        }
        if !headers_match(r, req.headers) {
            continue;
        }
        return Ok(i);
    }
    Err(Reject::new(
        404,
        "no_route",
        format!(
            "no route of table {} matches {} {}",
            table.version, req.method, req.path
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{load_bytes, tests::sample};
    use http::{HeaderMap, Method};

    #[test]
    fn prefix_is_segment_aware() {
        assert!(prefix_matches("/v1/pay", "/v1/pay"));
        assert!(prefix_matches("/v1/pay", "/v1/pay/1"));
        assert!(!prefix_matches("/v1/pay", "/v1/payments"));
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/v1/", "/v1/x"));
    }

    #[test]
    fn longest_prefix_then_method() {
        let t = load_bytes(sample().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let h = HeaderMap::new();
        let view = |m: &'static Method, p: &'static str| RequestView {
            method: m,
            path: p,
            host: None,
            headers: &h,
        };
        let post = &Method::POST;
        let get = &Method::GET;
        assert_eq!(
            t.routes[match_route(&t, &view(post, "/v1/payments/9")).unwrap_or(99)].id,
            "payments"
        );
        // GET is not allowed on payments: falls through to the shorter /v1 route.
        assert_eq!(
            t.routes[match_route(&t, &view(get, "/v1/payments")).unwrap_or(99)].id,
            "v1"
        );
        let e = match_route(&t, &view(get, "/v2"))
            .err()
            .unwrap_or_else(|| Reject::new(0, "", ""));
        assert_eq!((e.status, e.kind), (404, "no_route"));
        let e = match_route(&t, &view(post, "/_hub/outcomes"))
            .err()
            .unwrap_or_else(|| Reject::new(0, "", ""));
        assert_eq!(e.kind, "reserved_path");
    }

    #[test]
    fn host_and_header_equality() {
        let doc = sample().replace(
            r#""match": { "path_prefix": "/v1" }"#,
            r#""match": { "path_prefix": "/v1", "host": "API.example", "header": {"x-tenant": "t1"} }"#,
        );
        let t = load_bytes(doc.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let mut h = HeaderMap::new();
        let get = &Method::GET;
        let v = |h: &HeaderMap, host| {
            match_route(
                &t,
                &RequestView {
                    method: get,
                    path: "/v1/x",
                    host,
                    headers: h,
                },
            )
            .is_ok()
        };
        assert!(!v(&h, Some("api.example:8080")), "header missing");
        h.insert("x-tenant", http::HeaderValue::from_static("t1"));
        assert!(v(&h, Some("api.example:8080")));
        assert!(!v(&h, Some("other.example")));
        assert!(!v(&h, None));
        h.insert("x-tenant", http::HeaderValue::from_static("t2"));
        assert!(!v(&h, Some("api.example")));
    }
}
