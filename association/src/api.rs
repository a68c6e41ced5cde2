//! Pingora glue: the public API listener and the admin listener, each an
//! [`HttpServerApp`] so that `GET /events` can stream.
//!
//! `process_new_http` runs once per request on a connection: it reads the head, dispatches,
//! writes the whole answer (or streams events until the client leaves or shutdown), and returns
//! the connection for reuse only when the request body was fully read and the answer complete.

use async_trait::async_trait;
use bytes::Bytes;
use http::Method;
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_http::ResponseHeader;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::Core;
use crate::error::ApiError;
use crate::metrics::Endpoint;

const JSON: &str = "application/json";

/// Writes a complete answer; false when the client went away.
async fn respond(session: &mut ServerSession, status: u16, ctype: &str, body: Vec<u8>) -> bool {
    let Ok(mut h) = ResponseHeader::build(status, Some(3)) else {
        return false;
    };
    let len = body.len();
    if h.insert_header("content-type", ctype).is_err()
        || h.insert_header("content-length", len).is_err()
        || h.insert_header("cache-control", "no-store").is_err()
    {
        return false;
    }
    if session.write_response_header(Box::new(h)).await.is_err() {
        return false;
    }
    session
        .write_response_body(Bytes::from(body), true)
        .await
        .is_ok()
}

async fn respond_err(session: &mut ServerSession, e: &ApiError) -> bool {
    let (status, _) = e.status_kind();
    respond(session, status, JSON, e.body()).await
}

async fn finish(session: ServerSession) -> Option<ReusedHttpStream> {
    let settings = HttpPersistentSettings::for_session(&session);
    match session.finish().await {
        Ok(c) => c.map(|s| ReusedHttpStream::from_reusable_stream(s, settings)),
        Err(_) => None,
    }
}

/// Reads the request body up to `cap` bytes. `Err(TooLarge)` as soon as it exceeds the cap
/// (declared length checked first); the connection is then not reused.
async fn read_body(session: &mut ServerSession, cap: usize) -> Result<Bytes, ApiError> {
    if let Some(n) = session
        .get_header("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        if n > cap {
            return Err(ApiError::TooLarge(cap));
        }
    }
    let mut buf = bytes::BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > cap {
                    return Err(ApiError::TooLarge(cap));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(e) => return Err(ApiError::Malformed(format!("reading the body: {e}"))),
        }
    }
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// The public API listener.
pub struct Api {
    pub core: Arc<Core>,
}

#[async_trait]
impl HttpServerApp for Api {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            _ => return None,
        }
        let started = Instant::now();
        if *shutdown.borrow() {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(60));
        }
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query = session.req_header().uri.query().map(str::to_string);
        let (endpoint, ok) = match (method, path.as_str()) {
            (Method::POST, "/signals") => (Endpoint::Signals, self.post_signal(&mut session).await),
            (Method::GET, "/confirmations") => {
                let after = query_param(query.as_deref(), "after").unwrap_or("0");
                let limit = query_param(query.as_deref(), "limit").unwrap_or("100");
                let r = match (after.parse::<i64>(), limit.parse::<usize>()) {
                    (Ok(a), Ok(l)) if a >= 0 => self.core.confirmations(a, l).await,
                    _ => Err(ApiError::BadRequest(
                        "after and limit must be non-negative integers".into(),
                    )),
                };
                (Endpoint::Confirmations, answer(&mut session, r).await)
            }
            (Method::GET, "/events") => {
                // An event stream (or its refusal) never returns its connection. The result
                // only says whether the stream ended cleanly.
                let _clean = self.events(&mut session, query.as_deref(), shutdown).await;
                self.core
                    .metrics
                    .request(Endpoint::Events, started.elapsed().as_secs_f64());
                return None;
            }
            (Method::GET, p) if p.starts_with("/operations/") => {
                let op = &p["/operations/".len()..];
                let r = self.core.operation(op).await;
                (Endpoint::Operations, answer(&mut session, r).await)
            }
            (_, "/signals" | "/confirmations" | "/events") => (
                Endpoint::Other,
                respond_err(&mut session, &ApiError::MethodNotAllowed).await,
            ),
            _ => (
                Endpoint::Other,
                respond_err(&mut session, &ApiError::NotFound("no such endpoint".into())).await,
            ),
        };
        self.core
            .metrics
            .request(endpoint, started.elapsed().as_secs_f64());
        if !ok {
            return None;
        }
        finish(session).await
    }
}

async fn answer(session: &mut ServerSession, r: Result<Vec<u8>, ApiError>) -> bool {
    match r {
        Ok(body) => respond(session, 200, JSON, body).await,
        Err(e) => respond_err(session, &e).await,
    }
}

impl Api {
    async fn post_signal(&self, session: &mut ServerSession) -> bool {
        let cap = self.core.config.limits.max_body_bytes;
        let body = match read_body(session, cap).await {
            Ok(b) => b,
            Err(e) => {
                // The rest of the body is unread: never reuse this connection.
                session.set_keepalive(None);
                self.core.metrics.signal(None, None, e.signal_result());
                return respond_err(session, &e).await;
            }
        };
        let route = session
            .get_header("x-hub-route")
            .map(|v| v.to_str().map(str::to_string));
        let route = match route {
            Some(Ok(r)) => Some(r),
            Some(Err(_)) => {
                let e = ApiError::BadRequest("x-hub-route is not visible ASCII".into());
                return respond_err(session, &e).await;
            }
            None => None,
        };
        match self.core.submit(body, route.as_deref()).await {
            Ok(a) => respond(session, a.status, JSON, a.body).await,
            Err(e) => respond_err(session, &e).await,
        }
    }

    /// `GET /events`: Server-Sent Events of confirmations, resuming after `Last-Event-ID`
    /// (or `?after=`). Each event is `id: <seq>`, `event: confirmation`, `data: <json>`.
    /// Returns true when the stream ended cleanly (shutdown), false when the client left or a
    /// write failed.
    async fn events(
        &self,
        session: &mut ServerSession,
        query: Option<&str>,
        shutdown: &ShutdownWatch,
    ) -> bool {
        let resume = session
            .get_header("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().to_string())
            .or_else(|| query_param(query, "after").map(str::to_string))
            .unwrap_or_else(|| "0".into());
        let Ok(mut last) = resume.parse::<i64>() else {
            let e = ApiError::BadRequest("Last-Event-ID must be a confirmation seq".into());
            return respond_err(session, &e).await;
        };
        let Ok(_permit) = self.core.sse_clients.clone().try_acquire_owned() else {
            let e = ApiError::Unavailable("too many event-stream clients".into());
            return respond_err(session, &e).await;
        };
        session.set_keepalive(None);
        let Ok(mut h) = ResponseHeader::build(200, Some(4)) else {
            return false;
        };
        if h.insert_header("content-type", "text/event-stream")
            .is_err()
            || h.insert_header("cache-control", "no-store").is_err()
            || h.insert_header("transfer-encoding", "chunked").is_err()
        {
            return false;
        }
        if session.write_response_header(Box::new(h)).await.is_err() {
            return false;
        }
        let mut events = self.core.events.clone();
        let mut shutdown = shutdown.clone();
        let keepalive = Duration::from_millis(self.core.config.limits.sse_keepalive_ms);
        let page = self.core.config.limits.page_limit;
        // Open the stream at once so clients know they are subscribed.
        if session
            .write_response_body(Bytes::from_static(b": subscribed\n\n"), false)
            .await
            .is_err()
        {
            return false;
        }
        loop {
            if *shutdown.borrow() {
                let _ = session.write_response_body(Bytes::new(), true).await;
                return true;
            }
            // Mark the current value seen *before* reading, so a commit after the read wakes us.
            events.borrow_and_update();
            let batch = match self.core.confirmations_after(last, page).await {
                Ok(b) => b,
                Err(_) => return false,
            };
            let full = batch.len() == page;
            if !batch.is_empty() {
                let mut out = Vec::with_capacity(batch.len() * 400);
                for c in &batch {
                    out.extend_from_slice(b"id: ");
                    out.extend_from_slice(c.seq.to_string().as_bytes());
                    out.extend_from_slice(b"\nevent: confirmation\ndata: ");
                    let _ = serde_json::to_writer(&mut out, c);
                    out.extend_from_slice(b"\n\n");
                    last = c.seq;
                }
                if session
                    .write_response_body(Bytes::from(out), false)
                    .await
                    .is_err()
                {
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
                    if session
                        .write_response_body(Bytes::from_static(b": keep-alive\n\n"), false)
                        .await
                        .is_err()
                    {
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
    /// The API listener's address, probed by `/readyz` until it accepts a connection (Pingora
    /// starts the two listeners independently: the admin one can be up first).
    pub api_probe: std::net::SocketAddr,
    pub api_listening: std::sync::atomic::AtomicBool,
}

impl Admin {
    pub fn new(core: Arc<Core>, api: std::net::SocketAddr) -> Admin {
        Admin {
            core,
            api_probe: multihub_protocol::net::probe_addr(api),
            api_listening: std::sync::atomic::AtomicBool::new(false),
        }
    }

    async fn api_up(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.api_listening.load(Ordering::Relaxed) {
            return true;
        }
        let up = multihub_protocol::net::accepts(self.api_probe).await;
        if up {
            self.api_listening.store(true, Ordering::Relaxed);
        }
        up
    }
}

#[async_trait]
impl HttpServerApp for Admin {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        _shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            _ => return None,
        }
        session.set_keepalive(Some(60));
        let ok = match (
            session.req_header().method == Method::GET,
            session.req_header().uri.path(),
        ) {
            (true, "/metrics") => {
                let body = self.core.metrics.render();
                respond(
                    &mut session,
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    body,
                )
                .await
            }
            (true, "/healthz") => respond(&mut session, 200, JSON, b"{\"ok\":true}".to_vec()).await,
            (true, "/readyz") => {
                if !self.core.ready() {
                    let e = ApiError::Unavailable("store writer is not running".into());
                    respond_err(&mut session, &e).await
                } else if !self.api_up().await {
                    let e = ApiError::Unavailable("API listener is not accepting yet".into());
                    respond_err(&mut session, &e).await
                } else {
                    respond(&mut session, 200, JSON, b"{\"ready\":true}".to_vec()).await
                }
            }
            (false, "/metrics" | "/healthz" | "/readyz") => {
                respond_err(&mut session, &ApiError::MethodNotAllowed).await
            }
            _ => respond_err(&mut session, &ApiError::NotFound("no such endpoint".into())).await,
        };
        if !ok {
            return None;
        }
        finish(session).await
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
