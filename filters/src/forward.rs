//! Which requester headers are copied to upstreams, the hub headers stamped on every copy, and
//! the upstream request head on the wire format, built once per request.

use http::Method;
use multihub_protocol::hashing::{binding_bytes, repr_bytes};
use multihub_protocol::headers::{self as h, is_hop_by_hop, HUB_PREFIX};
use multihub_protocol::http1::{push_decimal, tokens};

use crate::headers::Headers;
use crate::plan::Plan;
use crate::table::{HubSettings, Route, RoutingTable, Upstream};

/// Names listed in a message's `Connection` fields (also hop-by-hop), as sent.
pub fn connection_tokens<H: Headers + ?Sized>(headers: &H) -> Vec<&[u8]> {
    let mut out = Vec::new();
    for v in headers.values_of("connection") {
        out.extend(tokens(v).filter(|t| !t.is_empty()));
    }
    out
}

/// True when a field named `name` (any case) belongs to one connection only: hop-by-hop, or
/// named in that message's `Connection` (`connection`, from [`connection_tokens`]). Such
/// fields are never passed on, in either direction.
pub fn hop_by_hop(name: &[u8], connection: &[&[u8]]) -> bool {
    is_hop_by_hop(name) || connection.iter().any(|t| name.eq_ignore_ascii_case(t))
}

/// True when a requester header named `name` (any case) is copied to upstreams: not
/// [hop-by-hop](hop_by_hop), not hub-internal (those are re-stamped), and not `Host`,
/// `Content-Length` or `x-request-id` (set per copy).
pub fn is_forwarded(name: &[u8], connection: &[&[u8]]) -> bool {
    let is = |h: &str| name.eq_ignore_ascii_case(h.as_bytes());
    let hub = name
        .get(..HUB_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(HUB_PREFIX.as_bytes()));
    !(hub
        || hop_by_hop(name, connection)
        || is("host")
        || is("content-length")
        || is(h::REQUEST_ID))
}

/// The request head every upstream of one request gets, on the wire format: the requester's
/// forwarded fields, the hub fields of DESIGN §3 and `content-length`, built once per request.
/// Each upstream's head is its own request line (its base path before the request target) and
/// `Host`, then these fields ([`Outbound::head`]).
#[derive(Debug, Clone)]
pub struct Outbound {
    pub method: Method,
    /// The request target (path and query) as received. Copied, not shared with the received
    /// head: background deliveries outlive the request, and a shared view would pin the
    /// connection's read buffer so that the next request needed a fresh one.
    target: String,
    /// Every field after `Host`, each ending in CRLF, then the blank line.
    fields: Vec<u8>,
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The hub fields that are the same on every copy a route sends (`x-hub-id`, `x-hub-route`,
/// `x-hub-route-version`, `x-hub-outcome-url`), on the wire format: built once per table
/// version into [`Route::hub_fields`].
pub fn route_fields(hub: &HubSettings, version: &[u8], route: &Route) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    for (name, value) in [
        (h::HUB_ID, hub.id_header.as_bytes()),
        (h::HUB_ROUTE, route.id_header.as_bytes()),
        (h::HUB_ROUTE_VERSION, version),
        (h::HUB_OUTCOME_URL, hub.outcome_url_header.as_bytes()),
    ] {
        field(&mut out, name.as_bytes(), value);
    }
    out
}

impl Outbound {
    /// `target`: path and query of the request; `headers`: the requester's fields; `body`:
    /// the whole body (hashed into `x-hub-request-repr` and `x-hub-binding`).
    pub fn new<H: Headers + ?Sized>(
        method: &Method,
        target: &str,
        headers: &H,
        table: &RoutingTable,
        plan: &Plan,
        body: &[u8],
    ) -> Outbound {
        let conn = connection_tokens(headers);
        let mut fields = Vec::with_capacity(768);
        for (name, value) in headers.fields() {
            if is_forwarded(name, &conn) {
                field(&mut fields, name, value);
            }
        }
        let repr = repr_bytes(body);
        let binding = binding_bytes(&repr, plan.inbound.context.as_bytes());
        fields.extend_from_slice(&table.routes[plan.route].hub_fields);
        for (name, value) in [
            (h::REQUEST_ID, plan.inbound.request_id.as_bytes()),
            (h::HUB_REQUEST_REPR, &repr[..]),
            (h::HUB_CONTEXT, plan.inbound.context.as_bytes()),
            (h::HUB_BINDING, &binding[..]),
            (h::HUB_PATH, plan.relay.path_out.as_bytes()),
        ] {
            field(&mut fields, name.as_bytes(), value);
        }
        fields.extend_from_slice(h::HUB_HOPS.as_bytes());
        fields.extend_from_slice(b": ");
        push_decimal(&mut fields, u64::from(plan.relay.hops_out));
        fields.extend_from_slice(b"\r\ncontent-length: ");
        push_decimal(&mut fields, body.len() as u64);
        fields.extend_from_slice(b"\r\n\r\n");
        Outbound {
            method: method.clone(),
            target: target.to_owned(),
            fields,
        }
    }

    /// The complete head for `up`: request line (the upstream's base path, then the target),
    /// `Host`, then the shared fields.
    pub fn head(&self, up: &Upstream) -> Vec<u8> {
        let (method, base) = (self.method.as_str(), up.url.base_path.as_str());
        let host = up.host_header.as_bytes();
        let mut out = Vec::with_capacity(
            method.len() + base.len() + self.target.len() + host.len() + self.fields.len() + 24,
        );
        request_line(&mut out, method, [base, &self.target], host);
        out.extend_from_slice(&self.fields);
        out
    }
}

/// `METHOD <path parts> HTTP/1.1`, then `host`.
fn request_line(out: &mut Vec<u8>, method: &str, path: [&str; 2], host: &[u8]) {
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    for p in path {
        out.extend_from_slice(p.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    field(out, b"host", host);
}

/// A complete request head on the wire format: request line, `Host`, then `fields` (and
/// `content-length` when given).
pub fn wire_head(
    method: &str,
    path: &str,
    host: &[u8],
    fields: &[(&str, &[u8])],
    content_length: Option<usize>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    request_line(&mut out, method, [path, ""], host);
    for (name, value) in fields {
        field(&mut out, name.as_bytes(), value);
    }
    if let Some(n) = content_length {
        out.extend_from_slice(b"content-length: ");
        push_decimal(&mut out, n as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan, RequestView};
    use crate::table::{load_bytes, tests::sample};
    use bytes::Bytes;
    use multihub_protocol::hashing::{binding_hex, repr_of};
    use multihub_protocol::http1::Request;

    #[test]
    fn hop_by_hop_hub_and_connection_listed_are_dropped() {
        let conn: Vec<&[u8]> = vec![b"keep-alive", b"X-Secret"];
        for dropped in [
            "connection",
            "Proxy-Authorization",
            "Keep-Alive",
            "te",
            "upgrade",
            "expect",
            "Transfer-Encoding",
            "x-hub-id",
            "X-Hub-Route-Version",
            "x-secret",
            "Host",
            "content-length",
            "x-request-id",
        ] {
            assert!(
                !is_forwarded(dropped.as_bytes(), &conn),
                "{dropped} forwarded"
            );
        }
        for kept in [
            "content-type",
            "Authorization",
            "x-verification-context",
            "idempotency-key",
            "x-hu",
        ] {
            assert!(is_forwarded(kept.as_bytes(), &conn), "{kept} dropped");
        }
    }

    fn parse(head: &[u8]) -> Vec<(String, String)> {
        let mut hdrs = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut hdrs);
        assert!(matches!(
            req.parse(head),
            Ok(httparse::Status::Complete(n)) if n == head.len()
        ));
        let mut out = vec![(
            req.method.unwrap_or("").to_string(),
            req.path.unwrap_or("").to_string(),
        )];
        for h in req.headers.iter() {
            out.push((
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            ));
        }
        out
    }

    #[test]
    fn every_upstream_gets_its_line_and_host_then_the_same_fields() {
        let t = load_bytes(sample().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let raw = Request::parse(Bytes::from_static(
            b"POST /v1/payments/9?x=1 HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n\
              Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\nX-Hub-Id: forged\r\n\
              x-request-id: req-1\r\nContent-Length: 2\r\nx-verification-context: ctx\r\n\r\n",
        ))
        .unwrap_or_else(|r| panic!("{r:?}"));
        let view = RequestView {
            method: &Method::POST,
            path: "/v1/payments/9",
            host: Some("hub"),
            headers: &raw,
        };
        let p = plan(&t, &view, |_| true).unwrap_or_else(|r| panic!("{r:?}"));
        let out = Outbound::new(&Method::POST, raw.target(), &raw, &t, &p, b"{}");
        let up = t
            .upstream(p.targets[0])
            .unwrap_or_else(|| panic!("no target"));
        let fields = parse(&out.head(up));
        let get = |n: &str| {
            fields
                .iter()
                .filter(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            fields[0],
            (
                "POST".to_string(),
                format!("{}/v1/payments/9?x=1", up.url.base_path)
            )
        );
        assert_eq!(get("host"), vec![up.host_header.to_str().unwrap_or("")]);
        assert_eq!(get("content-type"), vec!["application/json"]);
        assert_eq!(get("content-length"), vec!["2"]);
        assert_eq!(get("x-request-id"), vec!["req-1"]);
        assert_eq!(get("x-hub-id"), vec!["hub-a"], "forged hub header replaced");
        assert_eq!(get("x-hub-context"), vec!["ctx"]);
        let repr = repr_of(b"{}");
        assert_eq!(get("x-hub-request-repr"), vec![repr.as_str()]);
        assert_eq!(
            get("x-hub-binding"),
            vec![binding_hex(repr.as_str(), b"ctx").as_str()]
        );
        assert_eq!(get("x-hub-path"), vec!["hub-a"]);
        assert!(get("connection").is_empty() && get("x-drop").is_empty());
        for name in [
            "x-hub-route",
            "x-hub-route-version",
            "x-hub-hops",
            "x-hub-outcome-url",
        ] {
            assert_eq!(get(name).len(), 1, "{name}");
        }
    }

    #[test]
    fn wire_heads_end_with_the_blank_line() {
        let head = wire_head("POST", "/o", b"sink:1", &[("x-a", b"1")], Some(12));
        assert_eq!(
            head,
            b"POST /o HTTP/1.1\r\nhost: sink:1\r\nx-a: 1\r\ncontent-length: 12\r\n\r\n"
        );
    }

    mod forged {
        use super::*;
        use multihub_protocol::headers::HOP_BY_HOP;
        use proptest::prelude::*;

        /// Names a requester might send, hub-internal and hop-by-hop ones among them, in any case.
        const NAMES: &[&str] = &[
            "x-hub-id",
            "X-Hub-Route",
            "x-hub-route-version",
            "x-hub-request-repr",
            "X-HUB-CONTEXT",
            "x-hub-binding",
            "x-hub-outcome-url",
            "x-hub-path",
            "x-hub-hops",
            "x-hub-other",
            "connection",
            "Keep-Alive",
            "te",
            "upgrade",
            "Transfer-Encoding",
            "proxy-authorization",
            "content-length",
            "x-request-id",
            "x-verification-context",
            "content-type",
            "x-custom",
            "authorization",
            "x-drop-me",
        ];

        fn headers() -> impl Strategy<Value = Vec<(&'static str, String)>> {
            let value = prop_oneof![
                "[!-~]([ -~]{0,14}[!-~])?",
                prop::sample::select(vec![
                    "x-custom".to_string(),
                    "keep-alive, x-drop-me".to_string(),
                    "hub-z".to_string(),
                    "hub-z, hub-y".to_string(),
                    "3".to_string(),
                    "0".to_string(),
                    "req-1".to_string(),
                ]),
            ];
            prop::collection::vec((prop::sample::select(NAMES), value), 0..12)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            /// Whatever a requester sends, every upstream gets one `Host`, one
            /// `Content-Length`, the hub's own DESIGN §3 fields exactly once (forged ones never
            /// pass), no hop-by-hop field, and every other field as sent.
            #[test]
            fn requesters_cannot_forge_hub_fields(
                sent in headers(),
                body in prop::collection::vec(any::<u8>(), 0..64),
            ) {
                let t = load_bytes(sample().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
                let mut head = b"POST /v1/payments/9 HTTP/1.1\r\nHost: hub\r\n".to_vec();
                for (k, v) in &sent {
                    head.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
                }
                head.extend_from_slice(b"\r\n");
                let Ok(raw) = Request::parse(Bytes::from(head)) else { return Ok(()) };
                let view = RequestView {
                    method: &Method::POST,
                    path: "/v1/payments/9",
                    host: Some("hub"),
                    headers: &raw,
                };
                // Refusals (a bad id, path or hop count, a repeated field) are another test's.
                let Ok(p) = plan(&t, &view, |_| true) else { return Ok(()) };
                let out = Outbound::new(&Method::POST, raw.target(), &raw, &t, &p, &body);
                let conn: Vec<String> = sent
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
                    .flat_map(|(_, v)| v.split(',').map(|t| t.trim().to_ascii_lowercase()).collect::<Vec<_>>())
                    .collect();
                let context = sent
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("x-verification-context"))
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                let repr = repr_of(&body);
                for &i in p.targets.iter().chain(p.relay.relays.iter()) {
                    let up = t.upstream(i).unwrap_or_else(|| panic!("no upstream {i}"));
                    let fields = parse(&out.head(up));
                    let get = |n: &str| {
                        fields[1..].iter().filter(|(k, _)| k == n).map(|(_, v)| v.clone()).collect::<Vec<_>>()
                    };
                    prop_assert_eq!(get("host"), vec![up.host_header.to_str().unwrap_or("").to_string()]);
                    prop_assert_eq!(get("content-length"), vec![body.len().to_string()]);
                    prop_assert_eq!(get("x-hub-id"), vec!["hub-a".to_string()]);
                    prop_assert_eq!(get("x-hub-route"), vec!["payments".to_string()]);
                    prop_assert_eq!(get("x-hub-route-version"), vec!["v1".to_string()]);
                    prop_assert_eq!(get("x-hub-outcome-url"), vec!["http://127.0.0.1:8080/_hub/outcomes".to_string()]);
                    prop_assert_eq!(get("x-hub-request-repr"), vec![repr.as_str().to_string()]);
                    prop_assert_eq!(get("x-hub-context"), vec![context.clone()]);
                    prop_assert_eq!(get("x-hub-binding"), vec![binding_hex(repr.as_str(), context.as_bytes())]);
                    let sent_one = |n: &str| {
                        sent.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.trim().to_string())
                    };
                    // The inbound ids (empty elements dropped), then this hub.
                    let mut want: Vec<String> = sent_one("x-hub-path")
                        .map(|p| p.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
                        .unwrap_or_default();
                    want.push("hub-a".to_string());
                    let want_path = want.join(",");
                    let path = get("x-hub-path");
                    prop_assert!(path.len() == 1 && path[0].replace(' ', "") == want_path.replace(' ', ""),
                        "{:?} want {}", path, want_path);
                    let hops_in = sent_one("x-hub-hops").and_then(|h| h.parse::<u32>().ok()).unwrap_or(8);
                    prop_assert_eq!(get("x-hub-hops"), vec![(hops_in.min(8).saturating_sub(1)).to_string()]);
                    prop_assert_eq!(get("x-request-id").len(), 1);
                    prop_assert!(get("x-hub-other").is_empty());
                    // Fields the hub stamps itself are there even when `Connection` names them.
                    let stamped = |k: &str| k.starts_with("x-hub-") || ["host", "content-length", "x-request-id"].contains(&k);
                    for (k, _) in &fields[1..] {
                        prop_assert!(!HOP_BY_HOP.contains(&k.as_str()), "hop-by-hop {} passed", k);
                        prop_assert!(stamped(k) || !conn.contains(k), "{} named in Connection passed", k);
                    }
                    // Every other field arrives as sent: the rule written out, not `is_forwarded`.
                    for (k, v) in &sent {
                        let name = k.to_ascii_lowercase();
                        let hop = HOP_BY_HOP.contains(&name.as_str()) || name == "proxy-authorization";
                        if !stamped(&name) && !hop && !conn.contains(&name) {
                            let n = sent.iter().filter(|(k2, v2)| k2.eq_ignore_ascii_case(k) && v2 == v).count();
                            let got = get(&name).iter().filter(|g| *g == v).count();
                            prop_assert_eq!(got, n, "{} as sent", name);
                        }
                    }
                }
            }
        }
    }
}
