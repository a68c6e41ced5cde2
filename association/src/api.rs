//! The public API listener and the admin listener: Pingora `ServerApp`s (Pingora owns the
//! listeners, graceful shutdown and upgrades) serving HTTP/1.1 through the lean
//! [`multihub_protocol::http1::Conn`]: one read and one write buffer per connection, heads
//! parsed in place, every answer in one write. Pingora's per-request HTTP session machinery cost
//! more CPU per signal than the signature check.
//!
//! Each connection runs one loop: read a head, dispatch, write the whole answer (or stream
//! events until the client leaves or shutdown), and go on while the connection stays reusable.

use async_trait::async_trait;
use multihub_protocol::http1::{BodyError, Conn, Limits, Next};
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::Core;
use crate::error::ApiError;
use crate::metrics::Endpoint;

const JSON: &[u8] = b"application/json";
/// A connection of either listener.
type Http = Conn<Stream>;

/// Writes a complete answer; false when the client went away.
async fn respond(c: &mut Http, status: u16, ctype: &[u8], body: &[u8]) -> bool {
    c.respond(
        status,
        &[("content-type", ctype), ("cache-control", b"no-store")],
        body,
    )
    .await
}

async fn respond_err(c: &mut Http, e: &ApiError) -> bool {
    let (status, _) = e.status_kind();
    respond(c, status, JSON, &e.body()).await
}

async fn answer(c: &mut Http, r: Result<Vec<u8>, ApiError>) -> bool {
    match r {
        Ok(body) => respond(c, 200, JSON, &body).await,
        Err(e) => respond_err(c, &e).await,
    }
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// Serves requests on one connection with `handle` until it closes. `handle` answers one
/// request and returns false when the connection must not carry another.
macro_rules! serve {
    ($io:expr, $shutdown:expr, |$c:ident, $req:ident| $handle:expr) => {{
        let mut $c = Conn::new($io, Limits::default(), $shutdown.clone());
        loop {
            let $req = match $c.next_request().await {
                Next::Request(r) => r,
                Next::Refused(r) => {
                    respond_err(&mut $c, &ApiError::Http(r.status, r.detail)).await;
                    break;
                }
                Next::Closed => break,
            };
            if !$handle || !$c.keep_alive() {
                break;
            }
        }
        None
    }};
}

/// The public API listener.
pub struct Api {
    pub core: Arc<Core>,
}

#[async_trait]
impl ServerApp for Api {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        serve!(io, shutdown, |c, req| self
            .handle(&mut c, &req, shutdown)
            .await)
    }
}

impl Api {
    /// Answers one request; false when the connection must close.
    async fn handle(
        &self,
        c: &mut Http,
        req: &multihub_protocol::http1::Request,
        shutdown: &ShutdownWatch,
    ) -> bool {
        let started = Instant::now();
        let (endpoint, ok) = match (req.method(), req.path()) {
            ("POST", "/signals") => (Endpoint::Signals, self.post_signal(c, req).await),
            ("GET", "/confirmations") => {
                let after = query_param(req.query(), "after").unwrap_or("0");
                let limit = query_param(req.query(), "limit").unwrap_or("100");
                let r = match (after.parse::<i64>(), limit.parse::<usize>()) {
                    (Ok(a), Ok(l)) if a >= 0 => self.core.confirmations(a, l).await,
                    _ => Err(ApiError::BadRequest(
                        "after and limit must be non-negative integers".into(),
                    )),
                };
                (Endpoint::Confirmations, answer(c, r).await)
            }
            ("GET", "/events") => {
                // An event stream (or its refusal) never returns its connection. The result
                // only says whether the stream ended cleanly.
                let _clean = self.events(c, req, shutdown).await;
                self.core
                    .metrics
                    .request(Endpoint::Events, started.elapsed().as_secs_f64());
                return false;
            }
            ("GET", p) if p.starts_with("/operations/") => {
                let op = &p["/operations/".len()..];
                let r = self.core.operation(op).await;
                (Endpoint::Operations, answer(c, r).await)
            }
            (_, "/signals" | "/confirmations" | "/events") => (
                Endpoint::Other,
                respond_err(c, &ApiError::MethodNotAllowed).await,
            ),
            _ => (
                Endpoint::Other,
                respond_err(c, &ApiError::NotFound("no such endpoint".into())).await,
            ),
        };
        self.core
            .metrics
            .request(endpoint, started.elapsed().as_secs_f64());
        ok
    }

    async fn post_signal(&self, c: &mut Http, req: &multihub_protocol::http1::Request) -> bool {
        let cap = self.core.config.limits.max_body_bytes;
        let body = match c.read_body(req, cap).await {
            Ok(b) => b,
            Err(e) => {
                let e = match e {
                    BodyError::TooLarge(n) => ApiError::TooLarge(n),
                    BodyError::Bad(d) => ApiError::Malformed(format!("reading the body: {d}")),
                };
                self.core.metrics.signal(None, None, e.signal_result());
                return respond_err(c, &e).await;
            }
        };
        let route = match req.header("x-hub-route").map(std::str::from_utf8) {
            Some(Ok(r)) if r.bytes().all(|b| (b' '..=b'~').contains(&b) || b == b'\t') => Some(r),
            Some(_) => {
                let e = ApiError::BadRequest("x-hub-route is not visible ASCII".into());
                return respond_err(c, &e).await;
            }
            None => None,
        };
        match self.core.submit(body, route).await {
            Ok(a) => respond(c, a.status, JSON, &a.body).await,
            Err(e) => respond_err(c, &e).await,
        }
    }

    /// `GET /events`: Server-Sent Events of confirmations, resuming after `Last-Event-ID`
    /// (or `?after=`). Each event is `id: <seq>`, `event: confirmation`, `data: <json>`.
    /// Returns true when the stream ended cleanly (shutdown), false when the client left or a
    /// write failed.
    async fn events(
        &self,
        c: &mut Http,
        req: &multihub_protocol::http1::Request,
        shutdown: &ShutdownWatch,
    ) -> bool {
        let resume = req
            .header("last-event-id")
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|s| s.trim().to_string())
            .or_else(|| query_param(req.query(), "after").map(str::to_string))
            .unwrap_or_else(|| "0".into());
        let Ok(mut last) = resume.parse::<i64>() else {
            let e = ApiError::BadRequest("Last-Event-ID must be a confirmation seq".into());
            return respond_err(c, &e).await;
        };
        let Ok(_permit) = self.core.sse_clients.clone().try_acquire_owned() else {
            let e = ApiError::Unavailable("too many event-stream clients".into());
            return respond_err(c, &e).await;
        };
        let headers: [(&str, &[u8]); 2] = [
            ("content-type", b"text/event-stream"),
            ("cache-control", b"no-store"),
        ];
        // Open the stream at once so clients know they are subscribed.
        if !c.start_stream(200, &headers).await || !c.stream(b": subscribed\n\n").await {
            return false;
        }
        let mut events = self.core.events.clone();
        let mut shutdown = shutdown.clone();
        let keepalive = Duration::from_millis(self.core.config.limits.sse_keepalive_ms);
        let page = self.core.config.limits.page_limit;
        let mut out = Vec::new();
        loop {
            if *shutdown.borrow() {
                return c.end_stream().await;
            }
            // Mark the current value seen *before* reading, so a commit after the read wakes us.
            events.borrow_and_update();
            let batch = match self.core.confirmations_after(last, page).await {
                Ok(b) => b,
                Err(_) => return false,
            };
            let full = batch.len() == page;
            if !batch.is_empty() {
                out.clear();
                for e in &batch {
                    out.extend_from_slice(b"id: ");
                    out.extend_from_slice(e.seq.to_string().as_bytes());
                    out.extend_from_slice(b"\nevent: confirmation\ndata: ");
                    let _ = serde_json::to_writer(&mut out, e);
                    out.extend_from_slice(b"\n\n");
                    last = e.seq;
                }
                if !c.stream(&out).await {
                    return false;
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                r = events.changed() => { if r.is_err() { return false; } }
                _ = shutdown.changed() => {}
                _ = tokio::time::sleep(keepalive) => {
                    if !c.stream(b": keep-alive\n\n").await {
                        return false;
                    }
                }
            }
        }
    }
}

/// The admin listener: `/metrics`, `/healthz`, `/readyz`.
pub struct Admin {
    pub core: Arc<Core>,
    /// The API listener's address, probed by `/readyz` until the API listener sees the probe
    /// arrive (Pingora starts the two listeners independently: the admin one can be up first).
    pub api_probe: std::net::SocketAddr,
}

impl Admin {
    pub fn new(core: Arc<Core>, api: std::net::SocketAddr) -> Admin {
        Admin {
            core,
            api_probe: multihub_protocol::net::probe_addr(api),
        }
    }

    /// `None` when the API listener is up, else why not.
    async fn api_down(&self) -> Option<&'static str> {
        use multihub_protocol::net::Probe;
        match self.core.api_listener.probe(self.api_probe).await {
            Probe::Ours => None,
            Probe::Refused => Some("API listener is not accepting yet"),
            Probe::Foreign => Some("another process accepts on the API address"),
        }
    }

    /// Answers one request; false when the connection must close.
    async fn handle(&self, c: &mut Http, req: &multihub_protocol::http1::Request) -> bool {
        match (req.method() == "GET", req.path()) {
            (true, "/metrics") => {
                let body = self.core.metrics.render();
                respond(c, 200, b"text/plain; version=0.0.4; charset=utf-8", &body).await
            }
            (true, "/healthz") => respond(c, 200, JSON, b"{\"ok\":true}").await,
            (true, "/readyz") => {
                if !self.core.ready() {
                    let e = ApiError::Unavailable("store writer is not running".into());
                    respond_err(c, &e).await
                } else if let Some(why) = self.api_down().await {
                    respond_err(c, &ApiError::Unavailable(why.into())).await
                } else {
                    respond(c, 200, JSON, b"{\"ready\":true}").await
                }
            }
            (false, "/metrics" | "/healthz" | "/readyz") => {
                respond_err(c, &ApiError::MethodNotAllowed).await
            }
            _ => respond_err(c, &ApiError::NotFound("no such endpoint".into())).await,
        }
    }
}

#[async_trait]
impl ServerApp for Admin {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        serve!(io, shutdown, |c, req| self.handle(&mut c, &req).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params() {
        assert_eq!(query_param(Some("after=5&limit=2"), "limit"), Some("2"));
        assert_eq!(query_param(Some("after=5&limit=2"), "after"), Some("5"));
        assert_eq!(query_param(Some("x"), "after"), None);
        assert_eq!(query_param(None, "after"), None);
    }
}
