//! Every refusal the hub answers itself: one status code and one JSON body shape,
//! `{"error": "<kind>", "detail": "..."}`.

use serde::Serialize;

/// A refusal: status code, a stable machine-readable kind, and a human detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub kind: &'static str,
    pub detail: String,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    detail: &'a str,
}

impl Reject {
    pub fn new(status: u16, kind: &'static str, detail: impl Into<String>) -> Self {
        Reject {
            status,
            kind,
            detail: detail.into(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&Body {
            error: self.kind,
            detail: &self.detail,
        })
        .unwrap_or_else(|_| br#"{"error":"internal","detail":"cannot encode error"}"#.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_json_naming_the_problem() {
        let r = Reject::new(404, "no_route", "no route for \"/x\"");
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap_or_default();
        assert_eq!(v["error"], "no_route");
        assert_eq!(v["detail"], "no route for \"/x\"");
    }
}
