//! Delivering one buffered request to one upstream over pooled HTTP/1.1 connections.
//!
//! Upstream connections are plain Tokio TCP streams (`TCP_NODELAY`), each kept with its read
//! buffer; idle ones wait in [`Pool`], a plain per-upstream stack (Pingora's pool spawns a
//! watcher task with a timer for every connection it takes back and checks the socket's peer
//! on every reuse, and its stream wrapper times every pending read). The exchange itself is
//! [`multihub_protocol::http1::client::Exchange`]: head and body in one vectored write, the
//! response head parsed in place, the body read without copies.
//!
//! A delivery is: take a pooled connection (or connect), send the head and the body, read the
//! complete response (draining its body), and give the connection back to the pool only after a
//! clean, complete exchange. A reused connection that fails before any response byte is retried
//! once on a fresh connection (the upstream closed an idle keep-alive connection).

use bytes::{Bytes, BytesMut};
use multihub_filters::forward::Outbound;
use multihub_protocol::http1::client::{Exchange, ExchangeError, ResponseHead};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

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

/// Every delivery result as a metric label: `ok`, then each [`Failure::reason`].
pub const RESULTS: [&str; 7] = [
    "ok",
    "refused",
    "timeout",
    "status",
    "broken",
    "skipped",
    "in_flight_full",
];

/// The index of a delivery result in [`RESULTS`].
pub fn result_index<T>(r: &Result<T, Failure>) -> usize {
    r.as_ref().map_or_else(Failure::index, |_| 0)
}

impl Failure {
    /// The position of this failure's label in [`RESULTS`].
    pub fn index(&self) -> usize {
        match self {
            Failure::Refused(_) => 1,
            Failure::Timeout => 2,
            Failure::Status(_) => 3,
            Failure::Broken(_) => 4,
            Failure::Skipped => 5,
            Failure::InFlightFull => 6,
        }
    }

    /// A small fixed vocabulary, usable as a metric label.
    pub fn reason(&self) -> &'static str {
        RESULTS[self.index()]
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
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
            }
            other => return other,
        }
    }
}

/// How long an idle upstream connection stays in the pool.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// An upstream connection with its read buffer (kept together so a reused connection reads
/// into the same memory).
pub struct Link {
    pub io: TcpStream,
    pub buf: BytesMut,
}

/// Idle upstream connections, per upstream address, most recently used last. A connection is
/// taken only if it idled less than [`IDLE_TIMEOUT`] and shows no sign of having been closed
/// (a readiness check that costs no system call while the socket is quiet). One the upstream
/// closed without that showing yet fails before any response byte and the delivery retries on
/// a fresh connection. At most `cap` connections idle per upstream; beyond that the oldest is
/// closed.
pub struct Pool {
    idle: Mutex<IdleLinks>,
    cap: usize,
}

/// Per upstream address: idle connections with the time each was put back, oldest first.
type IdleLinks = HashMap<SocketAddr, VecDeque<(Link, Instant)>, BuildHasherDefault<AddrHasher>>;

/// The hasher of maps keyed by upstream addresses (the pool, the pipelining lanes): the keys
/// come from the routing table, not requester input, so a multiply-rotate mix does (SipHash
/// cost more than the lookup it guards).
#[derive(Default)]
pub(crate) struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Pool {
    pub fn new(cap: usize) -> Pool {
        Pool {
            idle: Mutex::new(HashMap::default()),
            cap,
        }
    }

    /// A usable idle connection to `addr`, if any.
    pub fn take(&self, addr: SocketAddr) -> Option<Link> {
        loop {
            let (link, since) = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.get_mut(&addr)?.pop_back()?
            };
            if since.elapsed() < IDLE_TIMEOUT && quiet(&link.io) {
                return Some(link);
            }
        }
    }

    /// Keeps `link` for the next delivery to `addr`.
    pub fn put(&self, addr: SocketAddr, link: Link) {
        if !quiet(&link.io) {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(addr).or_default();
        // Expired connections sit at the front (oldest first).
        while list
            .front()
            .is_some_and(|(_, since)| now.saturating_duration_since(*since) >= IDLE_TIMEOUT)
        {
            list.pop_front();
        }
        if list.len() >= self.cap {
            list.pop_front();
        }
        list.push_back((link, now));
    }

    /// How many connections idle for `addr`.
    pub fn idle(&self, addr: SocketAddr) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.get(&addr).map_or(0, VecDeque::len)
    }
}

/// True when an idle connection has nothing to read and is not closed: the upstream sends
/// nothing unasked, so readable means closed (or broken). Costs no system call while tokio
/// knows the socket is not readable.
pub(crate) fn quiet(io: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(io.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// The upstream connections shared by every delivery of the process (across table versions:
/// the pool key is the upstream's address, so connections survive reloads).
pub struct Deliverer {
    pool: Pool,
    /// Lanes of the upstreams whose deliveries are pipelined.
    pub pipes: crate::pipeline::Pipes,
}

/// An exchange positioned at its response body.
pub type Started = (Exchange<TcpStream>, ResponseHead);

/// A complete response captured for `collect`.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body, or `None` when it exceeded the cap (the connection is then not reused).
    pub body: Option<Bytes>,
}

/// One request to send: its head on the wire format, its body, and whether it is a HEAD
/// (whose response has no body).
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub head: &'a [u8],
    pub body: &'a [u8],
    pub head_only: bool,
}

impl<'a> Request<'a> {
    /// The request `out` makes of one upstream: `head` is `out.head(upstream)`.
    pub fn of(out: &Outbound, head: &'a [u8], body: &'a [u8]) -> Request<'a> {
        Request {
            head,
            body,
            head_only: out.method == http::Method::HEAD,
        }
    }
}

pub(crate) async fn connect(addr: SocketAddr) -> Result<Link, Failure> {
    let io = TcpStream::connect(addr)
        .await
        .map_err(|e| Failure::Refused(e.to_string()))?;
    // Heads and bodies leave in one write each; never hold them back.
    let _ = io.set_nodelay(true);
    Ok(Link {
        io,
        buf: BytesMut::new(),
    })
}

impl Deliverer {
    pub fn new(pool_size: usize, pipes: crate::pipeline::Pipes) -> Self {
        Deliverer {
            pool: Pool::new(pool_size),
            pipes,
        }
    }

    /// Sends the request and reads the response head. The returned exchange is positioned at
    /// the response body; hand it back with [`Deliverer::release`] once the body is fully read.
    /// A pooled connection that fails before any response byte is retried once on a fresh one
    /// (safe: the request was not answered, and providers deduplicate by request id).
    pub async fn start(&self, addr: SocketAddr, req: Request<'_>) -> Result<Started, Failure> {
        let (link, reused) = match self.pool.take(addr) {
            Some(l) => (l, true),
            None => (connect(addr).await?, false),
        };
        let send = |l: Link| Exchange::send(l.io, l.buf, req.head, req.body, req.head_only);
        match send(link).await {
            Ok(s) => Ok(s),
            Err(ExchangeError::BeforeResponse(_)) if reused => {
                send(connect(addr).await?).await.map_err(
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

    /// Returns the connection of an exchange whose response was read completely to the pool
    /// (if the upstream keeps it alive).
    pub fn release(&self, ex: Exchange<TcpStream>, addr: SocketAddr) {
        if let Some((io, buf)) = ex.into_reusable() {
            self.pool.put(addr, Link { io, buf });
        }
    }

    /// Sends one request and reads (drains) the whole response. `Ok(status)` is always a 2xx.
    pub async fn deliver(
        &self,
        addr: SocketAddr,
        req: Request<'_>,
        timeout: Duration,
    ) -> Result<u16, Failure> {
        let status = tokio::time::timeout(timeout, async {
            let (mut ex, resp) = self.start(addr, req).await?;
            loop {
                match ex.piece().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(ExchangeError::BeforeResponse(e) | ExchangeError::Broken(e)) => {
                        return Err(Failure::Broken(e))
                    }
                }
            }
            self.release(ex, addr);
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
    pub async fn fetch(
        &self,
        addr: SocketAddr,
        req: Request<'_>,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Fetched, Failure> {
        tokio::time::timeout(timeout, async {
            let (mut ex, resp) = self.start(addr, req).await?;
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
            let mut buf = BytesMut::new();
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
            self.release(ex, addr);
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
    use tokio::net::TcpListener;

    async fn pair() -> (Link, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        let c = c.unwrap_or_else(|e| panic!("{e}"));
        let (s, _) = s.unwrap_or_else(|e| panic!("{e}"));
        (
            Link {
                io: c,
                buf: BytesMut::new(),
            },
            s,
        )
    }

    fn port(l: &Link) -> u16 {
        l.io.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    #[tokio::test]
    async fn the_pool_hands_back_live_connections_last_in_first_out_and_drops_closed_ones() {
        let pool = Pool::new(2);
        let key: SocketAddr = ([127, 0, 0, 7], 7).into();
        let other: SocketAddr = ([127, 0, 0, 8], 7).into();
        let (a, _sa) = pair().await;
        let (b, _sb) = pair().await;
        let (c, _sc) = pair().await;
        let pc = port(&c);
        pool.put(key, a);
        pool.put(key, b);
        pool.put(key, c);
        assert_eq!(pool.idle(key), 2, "the oldest was closed at the cap");
        assert_eq!(pool.take(key).map(|l| port(&l)), Some(pc));
        assert!(pool.take(other).is_none());
        drop(pool.take(key));
        assert!(pool.take(key).is_none());

        // An upstream that closed an idle connection: the pool stops handing it out.
        let (d, sd) = pair().await;
        pool.put(key, d);
        drop(sd);
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(l) = pool.take(key) {
            assert!(
                Instant::now() < deadline,
                "a closed connection kept being handed out"
            );
            pool.put(key, l);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.idle(key), 0);
    }
}
