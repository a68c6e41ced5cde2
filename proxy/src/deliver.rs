//! Delivering one buffered request to one upstream over pooled HTTP/1.1 connections.
//!
//! Pingora's `TransportConnector` connects; idle connections wait in [`Pool`], a plain
//! per-upstream stack (Pingora's own pool spawns a watcher task with a timer for every
//! connection it takes back and checks the socket's peer on every reuse). The exchange itself
//! is [`multihub_protocol::http1::client::Exchange`] (head and body in one write, the response
//! head parsed in place, the body read without copies) rather than Pingora's client session,
//! which builds header maps and per-exchange state for every delivery.
//!
//! A delivery is: take a pooled connection (or connect), send the head and the body, read the
//! complete response (draining its body), and give the connection back to the pool only after a
//! clean, complete exchange. A reused connection that fails before any response byte is retried
//! once on a fresh connection (the upstream closed an idle keep-alive connection).

use bytes::Bytes;
use futures::FutureExt as _;
use multihub_protocol::http1::client::{Exchange, ExchangeError, ResponseHead};
use pingora_core::connectors::{ConnectorOptions, TransportConnector};
use pingora_core::protocols::http::v1::client::http_req_header_to_wire;
use pingora_core::protocols::Stream;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_http::RequestHeader;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt as _;

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

/// Idle upstream connections, per upstream (key: the peer's reuse hash), most recently used
/// last. A connection is taken only if it idled less than [`IDLE_TIMEOUT`] and shows no sign
/// of having been closed (a readiness check that costs no system call while the socket is
/// quiet). One the upstream closed without that showing yet fails before any response byte
/// and the delivery retries on a fresh connection. At most `cap` connections idle per
/// upstream; beyond that the oldest is closed.
pub struct Pool {
    idle: Mutex<HashMap<u64, VecDeque<(Stream, Instant)>>>,
    cap: usize,
}

impl Pool {
    pub fn new(cap: usize) -> Pool {
        Pool {
            idle: Mutex::new(HashMap::new()),
            cap,
        }
    }

    /// A usable idle connection to the upstream `key`, if any.
    pub fn take(&self, key: u64) -> Option<Stream> {
        loop {
            let (mut stream, since) = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.get_mut(&key)?.pop_back()?
            };
            if since.elapsed() < IDLE_TIMEOUT && quiet(&mut stream) {
                return Some(stream);
            }
        }
    }

    /// Keeps `stream` for the next delivery to `key`.
    pub fn put(&self, key: u64, mut stream: Stream) {
        if !quiet(&mut stream) {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(key).or_default();
        // Expired connections sit at the front (oldest first).
        while list
            .front()
            .is_some_and(|(_, since)| since.elapsed() >= IDLE_TIMEOUT)
        {
            list.pop_front();
        }
        if list.len() >= self.cap {
            list.pop_front();
        }
        list.push_back((stream, Instant::now()));
    }

    /// How many connections idle for `key`.
    pub fn idle(&self, key: u64) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.get(&key).map_or(0, VecDeque::len)
    }
}

/// True when an idle connection has nothing to read and is not closed: the upstream sends
/// nothing unasked, so readable means closed (or broken). Costs no system call while tokio
/// knows the socket is not readable.
fn quiet(stream: &mut Stream) -> bool {
    let mut b = [0u8; 1];
    tokio::task::unconstrained(stream.read(&mut b))
        .now_or_never()
        .is_none()
}

/// The upstream connections shared by every delivery of the process (across table versions:
/// the pool key is the peer's address, so connections survive reloads).
pub struct Deliverer {
    transport: TransportConnector,
    pool: Pool,
}

/// An exchange positioned at its response body.
pub type Started = (Exchange<Stream>, ResponseHead);

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
            pool: Pool::new(pool_size),
        }
    }

    /// Sends the request and reads the response head. The returned exchange is positioned at
    /// the response body; hand it back with [`Deliverer::release`] once the body is fully read.
    /// `head` builds the request head (called again only for a retry). A pooled connection that
    /// fails before any response byte is retried once on a fresh one (safe: the request was not
    /// answered, and providers deduplicate by request id).
    pub async fn start<F>(&self, peer: &HttpPeer, head: &F, body: &[u8]) -> Result<Started, Failure>
    where
        F: Fn() -> pingora_error::Result<RequestHeader>,
    {
        let broken = |e: pingora_error::BError| Failure::Broken(e.to_string());
        let (stream, reused) = match self.pool.take(peer.reuse_hash()) {
            Some(s) => (s, true),
            None => (
                self.transport
                    .new_stream(peer)
                    .await
                    .map_err(|e| Failure::Refused(e.to_string()))?,
                false,
            ),
        };
        match Self::send(stream, &head().map_err(broken)?, body).await {
            Ok(s) => Ok(s),
            Err(ExchangeError::BeforeResponse(_)) if reused => {
                let stream = self
                    .transport
                    .new_stream(peer)
                    .await
                    .map_err(|e| Failure::Refused(e.to_string()))?;
                Self::send(stream, &head().map_err(broken)?, body)
                    .await
                    .map_err(
                        |(ExchangeError::BeforeResponse(e) | ExchangeError::Broken(e))| {
                            Failure::Broken(e)
                        },
                    )
            }
            Err(ExchangeError::BeforeResponse(e) | ExchangeError::Broken(e)) => {
                Err(Failure::Broken(e))
            }
        }
    }

    /// Head and body in one write, then the response head.
    async fn send(
        stream: Stream,
        req: &RequestHeader,
        body: &[u8],
    ) -> Result<Started, ExchangeError> {
        let mut wire = http_req_header_to_wire(req).ok_or_else(|| {
            ExchangeError::BeforeResponse("request head cannot be encoded".into())
        })?;
        wire.extend_from_slice(body);
        Exchange::send(stream, &wire, req.method == http::Method::HEAD).await
    }

    /// Returns the connection of an exchange whose response was read completely to the pool
    /// (if the upstream keeps it alive).
    pub fn release(&self, ex: Exchange<Stream>, peer: &HttpPeer) {
        if let Some(stream) = ex.into_reusable() {
            self.pool.put(peer.reuse_hash(), stream);
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
            let (mut ex, resp) = self.start(peer, head, body).await?;
            loop {
                match ex.piece().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(ExchangeError::BeforeResponse(e) | ExchangeError::Broken(e)) => {
                        return Err(Failure::Broken(e))
                    }
                }
            }
            self.release(ex, peer);
            Ok(resp.status())
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
            let (mut ex, resp) = self.start(peer, head, body).await?;
            let status = resp.status();
            let headers = resp
                .headers()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(k).to_ascii_lowercase(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .collect();
            let mut buf = bytes::BytesMut::new();
            loop {
                match ex.piece().await {
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
                    Err(ExchangeError::BeforeResponse(e) | ExchangeError::Broken(e)) => {
                        return Err(Failure::Broken(e))
                    }
                }
            }
            self.release(ex, peer);
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

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_core::protocols::l4::stream::Stream as L4;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (Stream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        let c = c.unwrap_or_else(|e| panic!("{e}"));
        let (s, _) = s.unwrap_or_else(|e| panic!("{e}"));
        (Box::new(L4::from(c)), s)
    }

    #[tokio::test]
    async fn the_pool_hands_back_live_connections_last_in_first_out_and_drops_closed_ones() {
        let pool = Pool::new(2);
        let (a, _sa) = pair().await;
        let (b, _sb) = pair().await;
        let (c, _sc) = pair().await;
        let idc = c.id();
        pool.put(7, a);
        pool.put(7, b);
        pool.put(7, c);
        assert_eq!(pool.idle(7), 2, "the oldest was closed at the cap");
        assert_eq!(pool.take(7).map(|s| s.id()), Some(idc));
        assert!(pool.take(8).is_none());
        drop(pool.take(7));
        assert!(pool.take(7).is_none());

        // An upstream that closed an idle connection: the pool stops handing it out.
        let (d, sd) = pair().await;
        pool.put(7, d);
        drop(sd);
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(s) = pool.take(7) {
            assert!(
                Instant::now() < deadline,
                "a closed connection kept being handed out"
            );
            pool.put(7, s);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.idle(7), 0);
    }
}
