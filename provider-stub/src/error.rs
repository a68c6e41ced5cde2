//! The crate's error type, and the one place that maps request errors to status and JSON body.

use thiserror::Error;

/// Start-up, CLI and store errors.
#[derive(Debug, Error)]
pub enum ProviderError {
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigProblems),
    #[error("key: {0}")]
    Key(String),
    #[error("store: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("store: {0}")]
    StoreState(String),
    #[error("{0}")]
    Usage(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Listen(#[from] multihub_protocol::net::ListenError),
}

/// A refusal or failure of one request: `kind` is the `error` field, `detail` names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            detail: detail.into(),
        }
    }

    /// `{"error": "<kind>", "detail": "..."}`.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"error": self.kind, "detail": self.detail}))
            .unwrap_or_default()
    }
}
