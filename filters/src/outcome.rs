//! Outcome relay decisions (DESIGN §4): which headers a provider's outcome must carry, and
//! which hub comes before this one on the path. The body is never looked at.

use http::HeaderValue;
use multihub_protocol::headers::{HUB_PATH, PROVIDER_ID, REQUEST_ID};
use multihub_protocol::ids::{validate_hub_id, validate_request_id};

use crate::headers::Headers;
use crate::inbound::{path_ids, validate_path};
use crate::reject::Reject;

/// The validated headers of an outcome relay, forwarded unchanged.
#[derive(Debug, Clone)]
pub struct OutcomeHeaders {
    pub request_id: HeaderValue,
    pub provider_id: HeaderValue,
    pub path: HeaderValue,
}

fn required<'a, H: Headers + ?Sized>(
    headers: &'a H,
    name: &'static str,
) -> Result<&'a [u8], Reject> {
    headers.first(name).ok_or_else(|| {
        Reject::new(
            400,
            "missing_header",
            format!("{name} is required on /_hub/outcomes"),
        )
    })
}

/// Validates `x-request-id`, `x-provider-id` and `x-hub-path` of an outcome relay.
pub fn outcome_headers<H: Headers + ?Sized>(headers: &H) -> Result<OutcomeHeaders, Reject> {
    let request_id = required(headers, REQUEST_ID)?;
    validate_request_id(request_id)
        .map_err(|e| Reject::new(400, "bad_request_id", format!("x-request-id {e}")))?;
    let provider_id = required(headers, PROVIDER_ID)?;
    let pid = std::str::from_utf8(provider_id)
        .map_err(|_| Reject::new(400, "bad_provider_id", "x-provider-id is not ASCII"))?;
    validate_hub_id(pid)
        .map_err(|e| Reject::new(400, "bad_provider_id", format!("x-provider-id {e}")))?;
    let path = required(headers, HUB_PATH)?;
    if validate_path(path)? == 0 {
        return Err(Reject::new(400, "bad_hub_path", "x-hub-path is empty"));
    }
    // All three were validated as ASCII ids.
    let value = |v: &[u8], kind: &'static str| {
        HeaderValue::from_bytes(v).map_err(|_| Reject::new(400, kind, "not a header value"))
    };
    Ok(OutcomeHeaders {
        request_id: value(request_id, "bad_request_id")?,
        provider_id: value(provider_id, "bad_provider_id")?,
        path: value(path, "bad_hub_path")?,
    })
}

/// Where this hub stands on the path, and the hub before it.
#[derive(Debug, PartialEq, Eq)]
pub enum Predecessor<'a> {
    /// The hub just before this one.
    Hub(&'a str),
    /// This hub is first on the path: the outcome goes to its sinks only.
    First,
    /// This hub is not on the path at all (counted; sinks still get it).
    NotOnPath,
}

/// The hub before `hub_id` on `path` (its last occurrence).
pub fn predecessor<'a>(path: &'a str, hub_id: &str) -> Predecessor<'a> {
    let ids: Vec<&str> = path_ids(path).collect();
    match ids.iter().rposition(|id| *id == hub_id) {
        Some(0) => Predecessor::First,
        Some(i) => Predecessor::Hub(ids[i - 1]),
        None => Predecessor::NotOnPath,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn predecessor_along_the_path() {
        assert_eq!(
            predecessor("hub-a,hub-b", "hub-b"),
            Predecessor::Hub("hub-a")
        );
        assert_eq!(predecessor("hub-a,hub-b", "hub-a"), Predecessor::First);
        assert_eq!(
            predecessor("hub-a, hub-b, hub-c", "hub-c"),
            Predecessor::Hub("hub-b")
        );
        assert_eq!(predecessor("hub-a", "hub-x"), Predecessor::NotOnPath);
    }

    #[test]
    fn missing_and_bad_headers() {
        let mut h = HeaderMap::new();
        let err = |h: &HeaderMap| outcome_headers(h).err().map(|r| (r.status, r.kind));
        assert_eq!(err(&h), Some((400, "missing_header")));
        h.insert("x-request-id", HeaderValue::from_static("r1"));
        h.insert("x-provider-id", HeaderValue::from_static("provider-a"));
        assert_eq!(err(&h), Some((400, "missing_header")));
        h.insert("x-hub-path", HeaderValue::from_static("hub-a,bad hub"));
        assert_eq!(err(&h), Some((400, "bad_hub_path")));
        h.insert("x-hub-path", HeaderValue::from_static("hub-a,hub-b"));
        assert!(outcome_headers(&h).is_ok());
        h.insert("x-provider-id", HeaderValue::from_static("a,b"));
        assert_eq!(err(&h), Some((400, "bad_provider_id")));
    }
}
