//! Errors, and the one place that maps them to a status code and a JSON body
//! `{"error": "<kind>", "detail": "..."}`.

use thiserror::Error;

use crate::config::ConfigProblems;
use crate::metrics::SignalResult;
use crate::store::StoreError;

/// A refusal answered to a client.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ApiError {
    #[error("unknown provider \"{0}\"")]
    UnknownProvider(String),
    #[error("key {0} is not registered for this provider")]
    UnknownKey(String),
    #[error("malformed signal: {0}")]
    Malformed(String),
    #[error("signal bytes are not RFC 8785 canonical JSON")]
    NonCanonical,
    #[error("operation does not equal sha256(\"multihub-op-v1\\n\" + request_id + \"\\n\" + request_repr)")]
    BadOperation,
    #[error("signature does not verify")]
    BadSignature,
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Unavailable(String),
    /// A request head the HTTP layer cannot serve (400, 417 or 431).
    #[error("{1}")]
    Http(u16, String),
}

impl ApiError {
    /// Status code and `error` kind.
    pub fn status_kind(&self) -> (u16, &'static str) {
        match self {
            ApiError::UnknownProvider(_) => (401, "unknown_provider"),
            ApiError::UnknownKey(_) => (401, "unknown_key"),
            ApiError::Malformed(_) => (422, "malformed"),
            ApiError::NonCanonical => (422, "non_canonical"),
            ApiError::BadOperation => (422, "bad_operation"),
            ApiError::BadSignature => (422, "bad_signature"),
            ApiError::TooLarge(_) => (413, "body_too_large"),
            ApiError::Conflict(_) => (409, "conflict"),
            ApiError::BadRequest(_) => (400, "bad_request"),
            ApiError::NotFound(_) => (404, "not_found"),
            ApiError::MethodNotAllowed => (405, "method_not_allowed"),
            ApiError::Unavailable(_) => (503, "unavailable"),
            ApiError::Http(431, _) => (431, "header_too_large"),
            ApiError::Http(417, _) => (417, "expectation_failed"),
            ApiError::Http(_, _) => (400, "bad_request"),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        let (_, kind) = self.status_kind();
        serde_json::to_vec(&serde_json::json!({"error": kind, "detail": self.to_string()}))
            .unwrap_or_default()
    }

    /// The `result` label for `association_signals_total`.
    pub fn signal_result(&self) -> SignalResult {
        match self {
            ApiError::UnknownProvider(_) => SignalResult::UnknownProvider,
            ApiError::UnknownKey(_) => SignalResult::UnknownKey,
            ApiError::Malformed(_)
            | ApiError::NonCanonical
            | ApiError::BadRequest(_)
            | ApiError::Http(_, _) => SignalResult::Malformed,
            ApiError::BadOperation => SignalResult::BadOperation,
            ApiError::BadSignature => SignalResult::BadSignature,
            ApiError::TooLarge(_) => SignalResult::TooLarge,
            ApiError::Conflict(_) => SignalResult::Conflict,
            ApiError::NotFound(_) | ApiError::MethodNotAllowed | ApiError::Unavailable(_) => {
                SignalResult::Unavailable
            }
        }
    }
}

/// Start-up and offline-check failures.
#[derive(Debug, Error)]
pub enum AssociationError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigProblems),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Listen(#[from] multihub_protocol::net::ListenError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_json_with_kind_and_detail() {
        let e = ApiError::UnknownProvider("p-z".into());
        assert_eq!(e.status_kind(), (401, "unknown_provider"));
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap_or_default();
        assert_eq!(v["error"], "unknown_provider");
        assert_eq!(v["detail"], "unknown provider \"p-z\"");
        assert_eq!(ApiError::BadSignature.status_kind().0, 422);
        assert_eq!(ApiError::Conflict(String::new()).status_kind().0, 409);
        assert_eq!(
            ApiError::Http(431, String::new()).status_kind(),
            (431, "header_too_large")
        );
        assert_eq!(ApiError::Http(499, String::new()).status_kind().0, 400);
    }
}
