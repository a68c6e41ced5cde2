//! Errors of the hub crate.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum HubError {
    #[error(transparent)]
    Config(#[from] multihub_filters::ConfigError),
    #[error("bad command line: {0}")]
    Usage(String),
    #[error(transparent)]
    Listen(#[from] multihub_protocol::net::ListenError),
    #[error("cannot start the server: {0}")]
    Server(String),
}
