//! What the hub takes from a requester's headers: a validated request id, the hub path and hops
//! it may only restrict, and the verification context bound into `x-hub-binding`.

use http::HeaderValue;
use multihub_protocol::headers::{HUB_HOPS, HUB_PATH, REQUEST_ID, VERIFICATION_CONTEXT};
use multihub_protocol::ids::{generate_request_id, validate_hub_id, validate_request_id};

use crate::headers::Headers;
use crate::reject::Reject;

/// The requester-controlled inputs, validated.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub request_id: HeaderValue,
    /// True when the hub generated the id.
    pub generated: bool,
    /// Inbound `x-hub-path`, validated (comma-separated ids), or empty.
    pub path_in: Option<HeaderValue>,
    /// Inbound `x-hub-hops`.
    pub hops_in: Option<u32>,
    /// The requester's `x-verification-context`, or empty.
    pub context: HeaderValue,
}

fn single<'a, H: Headers + ?Sized>(
    headers: &'a H,
    name: &'static str,
) -> Result<Option<&'a [u8]>, Reject> {
    let mut it = headers.values_of(name);
    let first = it.next();
    if it.next().is_some() {
        return Err(Reject::new(
            400,
            "duplicate_header",
            format!("{name} given more than once"),
        ));
    }
    Ok(first)
}

/// The ids in a hub path (`hub-a,hub-b`), each trimmed.
pub fn path_ids(path: &str) -> impl Iterator<Item = &str> {
    path.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Checks an `x-hub-path` value (ASCII, every element an id) and returns how many hubs it names.
pub fn validate_path(v: &[u8]) -> Result<usize, Reject> {
    let s = std::str::from_utf8(v)
        .ok()
        .filter(|s| s.is_ascii())
        .ok_or_else(|| Reject::new(400, "bad_hub_path", "x-hub-path is not ASCII"))?;
    let mut n = 0;
    for id in path_ids(s) {
        validate_hub_id(id).map_err(|e| {
            Reject::new(
                400,
                "bad_hub_path",
                format!("x-hub-path element {id:?} {e}"),
            )
        })?;
        n += 1;
    }
    Ok(n)
}

/// Validates the requester-controlled headers.
pub fn inbound<H: Headers + ?Sized>(headers: &H) -> Result<Inbound, Reject> {
    let (request_id, generated) = match single(headers, REQUEST_ID)? {
        Some(v) => {
            let bad = |e: &dyn std::fmt::Display| {
                Reject::new(
                    400,
                    "bad_request_id",
                    format!("x-request-id {e}; expected 1-128 of [A-Za-z0-9._:-]"),
                )
            };
            validate_request_id(v).map_err(|e| bad(&e))?;
            // Valid ids are plain ASCII, always a valid header value.
            let v = HeaderValue::from_bytes(v).map_err(|_| bad(&"is not a header value"))?;
            (v, false)
        }
        None => {
            let id = generate_request_id();
            // A generated id is hex, always a valid header value.
            (
                HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("0")),
                true,
            )
        }
    };
    let path_in = match single(headers, HUB_PATH)? {
        Some(v) => {
            let n = validate_path(v)?;
            if n > 64 {
                return Err(Reject::new(
                    400,
                    "bad_hub_path",
                    "x-hub-path has more than 64 hubs",
                ));
            }
            if n == 0 {
                None
            } else {
                let bad = || Reject::new(400, "bad_hub_path", "x-hub-path is not a header value");
                let commas = v.iter().filter(|b| **b == b',').count();
                if commas + 1 == n && !v.iter().any(u8::is_ascii_whitespace) {
                    // Validated as ASCII ids, one per element.
                    Some(HeaderValue::from_bytes(v).map_err(|_| bad())?)
                } else {
                    // Empty elements or spaces (`a,,b`, `a, b`, `a,`): forwarded as the ids
                    // alone, so the path this hub appends to names no empty hop.
                    let s = std::str::from_utf8(v).map_err(|_| bad())?;
                    let ids: Vec<&str> = path_ids(s).collect();
                    Some(HeaderValue::from_str(&ids.join(",")).map_err(|_| bad())?)
                }
            }
        }
        None => None,
    };
    let hops_in = match single(headers, HUB_HOPS)? {
        Some(v) => Some(
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .ok_or_else(|| {
                    Reject::new(
                        400,
                        "bad_hub_hops",
                        "x-hub-hops must be a non-negative integer",
                    )
                })?,
        ),
        None => None,
    };
    let context = match single(headers, VERIFICATION_CONTEXT)? {
        Some(v) => HeaderValue::from_bytes(v).map_err(|_| {
            Reject::new(
                400,
                "bad_request",
                "x-verification-context is not a valid header value",
            )
        })?,
        None => HeaderValue::from_static(""),
    };
    Ok(Inbound {
        request_id,
        generated,
        path_in,
        hops_in,
        context,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn request_id_is_kept_or_generated() {
        let i = inbound(&h(&[("x-request-id", "abc-1")])).unwrap_or_else(|r| panic!("{r:?}"));
        assert_eq!(
            (i.request_id.to_str().unwrap_or(""), i.generated),
            ("abc-1", false)
        );
        let i = inbound(&h(&[])).unwrap_or_else(|r| panic!("{r:?}"));
        assert!(i.generated);
        assert_eq!(i.request_id.len(), 32);
    }

    #[test]
    fn bad_inputs_are_400_with_a_kind() {
        for (hs, kind) in [
            (h(&[("x-request-id", "a b")]), "bad_request_id"),
            (
                h(&[("x-request-id", "a"), ("x-request-id", "b")]),
                "duplicate_header",
            ),
            (h(&[("x-hub-path", "hub-a,hub b")]), "bad_hub_path"),
            (h(&[("x-hub-hops", "-1")]), "bad_hub_hops"),
            (h(&[("x-hub-hops", "x")]), "bad_hub_hops"),
        ] {
            let r = inbound(&hs).err().unwrap_or_else(|| Reject::new(0, "", ""));
            assert_eq!((r.status, r.kind), (400, kind), "{hs:?}");
        }
    }

    #[test]
    fn path_hops_and_context() {
        let i = inbound(&h(&[
            ("x-hub-path", "hub-a, hub-b"),
            ("x-hub-hops", "3"),
            ("x-verification-context", "c1"),
        ]))
        .unwrap_or_else(|r| panic!("{r:?}"));
        assert_eq!(i.hops_in, Some(3));
        assert_eq!(
            i.path_in.as_ref().map(|v| v.as_bytes()),
            Some(&b"hub-a,hub-b"[..]),
            "the ids alone"
        );
        for (sent, kept) in [
            ("hub-a,,hub-b,", "hub-a,hub-b"),
            ("a,b", "a,b"),
            (" a ", "a"),
        ] {
            let i = inbound(&h(&[("x-hub-path", sent)])).unwrap_or_else(|r| panic!("{r:?}"));
            assert_eq!(
                i.path_in.as_ref().map(|v| v.as_bytes()),
                Some(kept.as_bytes()),
                "{sent:?}"
            );
        }
        assert_eq!(i.context, "c1");
        assert_eq!(
            path_ids("hub-a, hub-b").collect::<Vec<_>>(),
            vec!["hub-a", "hub-b"]
        );
    }
}
