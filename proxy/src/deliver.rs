//! Delivering one buffered request to one upstream over pooled HTTP/1.1 connections.
//!
//! A delivery is: take a pooled connection (or connect), send the head and the body, read the
//! complete response (draining its body), and give the connection back to the pool only after a
//! clean, complete exchange. A reused connection that fails before any response byte is retried
//! once on a fresh connection (the upstream closed an idle keep-alive connection).

use bytes::Bytes;
use pingora_core::connectors::{ConnectorOptions, TransportConnector};
use pingora_core::protocols::http::v1::client::{http_req_header_to_wire, HttpSession};
use pingora_core::protocols::Stream;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_http::RequestHeader;
use std::fmt;
use std::future::Future;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Why a delivery did not end in a 2xx.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made.
    Refused(String),
    /// No complete response within the upstream's timeout.
    Timeout,
    /// The upstream answered with a non-2xx status.
    Status(u16),
    /// The exchange broke after connecting.
    Broken(String),
    /// Not attempted: an earlier target of a sequential route did not acknowledge.
    Skipped,
    /// Not attempted: the in-flight bound was reached.
    InFlightFull,
}

impl Failure {
    /// A small fixed vocabulary, usable as a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Refused(_) => "refused",
            Failure::Timeout => "timeout",
            Failure::Status(_) => "status",
            Failure::Broken(_) => "broken",
            Failure::Skipped => "skipped",
            Failure::InFlightFull => "in_flight_full",
        }
    }

    /// Worth another attempt (connect errors, timeouts, 5xx, broken exchanges).
    pub fn retryable(&self) -> bool {
        match self {
            Failure::Refused(_) | Failure::Timeout | Failure::Broken(_) => true,
            Failure::Status(s) => *s >= 500,
            Failure::Skipped | Failure::InFlightFull => false,
        }
    }

    /// True when the upstream is probably unreachable (used for passive health).
    pub fn unreachable(&self) -> bool {
        matches!(self, Failure::Refused(_) | Failure::Timeout)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused(e) => write!(f, "connection refused or failed: {e}"),
            Failure::Timeout => f.write_str("no complete response within the timeout"),
            Failure::Status(s) => write!(f, "answered status {s}"),
            Failure::Broken(e) => write!(f, "exchange broken: {e}"),
            Failure::Skipped => {
                f.write_str("not attempted: an earlier target in the sequence did not acknowledge")
            }
            Failure::InFlightFull => {
                f.write_str("not attempted: the hub's in-flight delivery bound was reached")
            }
        }
    }
}

/// Runs `attempt` (called with the attempt number, from 0) until it succeeds, fails with a
/// non-[retryable](Failure::retryable) failure, or `retries` extra attempts are spent. The wait
/// before each retry starts at `backoff` and doubles. Returns the last attempt's result.
pub async fn retrying<T, F, Fut>(
    retries: u32,
    mut backoff: Duration,
    mut attempt: F,
) -> Result<T, Failure>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut n = 0;
    loop {
        match attempt(n).await {
            Err(f) if f.retryable() && n < retries => {
                n += 1;
                pingora_timeout::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
            }
            other => return other,
        }
    }
}

/// How long an idle upstream connection stays in the pool (also every peer's `idle_timeout`).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The upstream connection pool shared by every delivery of the process (across table versions:
/// the pool key is the peer's address, so connections survive reloads).
pub struct Deliverer {
    transport: TransportConnector,
}

enum ExchangeError {
    /// Failed before any response byte: the request may be retried on a fresh connection.
    BeforeResponse(String),
}

/// A complete response captured for `collect`.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body, or `None` when it exceeded the cap (the connection is then not reused).
    pub body: Option<Bytes>,
}

impl Deliverer {
    pub fn new(pool_size: usize) -> Self {
        let mut opts = ConnectorOptions::new(pool_size);
        opts.keepalive_pool_size = pool_size;
        Deliverer {
            transport: TransportConnector::new(Some(opts)),
        }
    }

    /// Sends the request and reads the response head. The returned session is positioned at
    /// the response body; hand it back with [`Deliverer::release`] once the body is fully read.
    /// `head` builds the request head (called again only for a retry). A pooled connection that
    /// fails before any response byte is retried once on a fresh one (safe: the request was not
    /// answered, and providers deduplicate by request id).
    pub async fn start<F>(
        &self,
        peer: &HttpPeer,
        head: &F,
        body: &[u8],
    ) -> Result<HttpSession, Failure>
    where
        F: Fn() -> pingora_error::Result<RequestHeader>,
    {
        let broken = |e: pingora_error::BError| Failure::Broken(e.to_string());
        let (stream, reused) = self
            .transport
            .get_stream(peer)
            .await
            .map_err(|e| Failure::Refused(e.to_string()))?;
        match Self::send(stream, peer, Box::new(head().map_err(broken)?), body).await {
            Ok(s) => Ok(s),
            Err(ExchangeError::BeforeResponse(_)) if reused => {
                let stream = self
                    .transport
                    .new_stream(peer)
                    .await
                    .map_err(|e| Failure::Refused(e.to_string()))?;
                Self::send(stream, peer, Box::new(head().map_err(broken)?), body)
                    .await
                    .map_err(|ExchangeError::BeforeResponse(e)| Failure::Broken(e))
            }
            Err(ExchangeError::BeforeResponse(e)) => Err(Failure::Broken(e)),
        }
    }

    async fn send(
        mut stream: Stream,
        peer: &HttpPeer,
        req: Box<RequestHeader>,
        body: &[u8],
    ) -> Result<HttpSession, ExchangeError> {
        let before = |e: pingora_error::BError| ExchangeError::BeforeResponse(e.to_string());
        if req.method == http::Method::HEAD {
            // The session must know about HEAD to read a response without a body.
            let mut s = HttpSession::new_with_options(stream, peer);
            s.write_request_header(req).await.map_err(before)?;
            s.finish_body().await.map_err(before)?;
            s.read_response().await.map_err(before)?;
            return Ok(s);
        }
        // Head and body in one write: Pingora's client flushes the head on its own, which costs a
        // second send (and on loopback a second trip through the receiver's stack) per delivery.
        // Our heads never ask for an upgrade or `Connection: close`, which is all the session
        // needs the written request for besides HEAD.
        let mut wire = http_req_header_to_wire(&req).ok_or_else(|| {
            ExchangeError::BeforeResponse("request head cannot be encoded".into())
        })?;
        wire.extend_from_slice(body);
        let io = |e: std::io::Error| ExchangeError::BeforeResponse(e.to_string());
        stream.write_all(&wire).await.map_err(io)?;
        stream.flush().await.map_err(io)?;
        let mut s = HttpSession::new_with_options(stream, peer);
        s.read_response().await.map_err(before)?;
        Ok(s)
    }

    /// Returns a session whose response was read completely to the pool (if keep-alive allows).
    pub async fn release(&self, mut s: HttpSession, peer: &HttpPeer) {
        s.respect_keepalive();
        if let Some(stream) = s.reuse().await {
            self.transport
                .release_stream(stream, peer.reuse_hash(), Some(IDLE_TIMEOUT));
        }
    }

    /// Sends one request and reads (drains) the whole response. `Ok(status)` is always a 2xx.
    pub async fn deliver<F>(
        &self,
        peer: &HttpPeer,
        head: &F,
        body: &[u8],
        timeout: Duration,
    ) -> Result<u16, Failure>
    where
        F: Fn() -> pingora_error::Result<RequestHeader>,
    {
        let status = pingora_timeout::timeout(timeout, async {
            let mut s = self.start(peer, head, body).await?;
            let status = s.get_status().map(|c| c.as_u16()).unwrap_or(0);
            loop {
                match s.read_body_bytes().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => return Err(Failure::Broken(e.to_string())),
                }
            }
            self.release(s, peer).await;
            Ok(status)
        })
        .await
        .map_err(|_| Failure::Timeout)??;
        if (200..300).contains(&status) {
            Ok(status)
        } else {
            Err(Failure::Status(status))
        }
    }

    /// Sends one request and captures the response (any status), the body up to `max_body`.
    pub async fn fetch<F>(
        &self,
        peer: &HttpPeer,
        head: &F,
        body: &[u8],
        timeout: Duration,
        max_body: usize,
    ) -> Result<Fetched, Failure>
    where
        F: Fn() -> pingora_error::Result<RequestHeader>,
    {
        pingora_timeout::timeout(timeout, async {
            let mut s = self.start(peer, head, body).await?;
            let status = s.get_status().map(|c| c.as_u16()).unwrap_or(0);
            let headers = s
                .resp_header()
                .map(|h| {
                    h.headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_string(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut buf = bytes::BytesMut::new();
            loop {
                match s.read_body_bytes().await {
                    Ok(Some(chunk)) => {
                        if buf.len() + chunk.len() > max_body {
                            return Ok(Fetched {
                                status,
                                headers,
                                body: None,
                            });
                        }
                        buf.extend_from_slice(&chunk);
                    }
                    Ok(None) => break,
                    Err(e) => return Err(Failure::Broken(e.to_string())),
                }
            }
            self.release(s, peer).await;
            Ok(Fetched {
                status,
                headers,
                body: Some(buf.freeze()),
            })
        })
        .await
        .map_err(|_| Failure::Timeout)?
    }
}
