//! The hub's listener: a Pingora `ServerApp` (Pingora owns the listeners, threads, graceful
//! shutdown and upgrades) that serves HTTP/1.1 through the lean
//! [`multihub_protocol::http1::Conn`] instead of Pingora's per-request proxy session (measured
//! on one thread answering from the request head: ~11 µs of CPU per request against 19–31).
//! Everything is decided by `multihub-filters`; this file reads the request, calls the
//! filters, hands the request to its response mode (`modes.rs`) or to the outcome relay
//! (`outcomes.rs`), and answers.

use async_trait::async_trait;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method};
use multihub_filters::forward::Outbound;
use multihub_filters::{plan, Headers, Plan, Reject, RequestView};
use multihub_protocol::headers::{HUB_ROUTE_VERSION, OUTCOMES_PATH, REQUEST_ID};
use multihub_protocol::http1::{self, Conn, Limits, Next};
use multihub_protocol::routes::Respond;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use pingora_error::{Error, ErrorType, Result};
use std::sync::Arc;
use std::time::Instant;

use crate::access::{AccessLog, AccessRecord};
use crate::state::{Busy, Engine, HubTable, Tables};

/// The hub service.
pub struct Hub {
    pub tables: Tables,
    pub engine: Arc<Engine>,
    /// Where access-log lines go; `None` = off.
    pub access_log: Option<Arc<AccessLog>>,
}

/// Per-request scratch.
pub struct Ctx {
    pub(crate) started: Instant,
    /// The table version serving this request (pinned for its whole life).
    pub(crate) table: Option<Arc<HubTable>>,
    pub(crate) route: Option<usize>,
    pub(crate) request_id: Option<HeaderValue>,
    pub(crate) status: u16,
    pub(crate) delivered: u16,
    pub(crate) failed: u16,
    /// Counts this request as active until the context is dropped (graceful drain).
    _busy: Busy,
}

/// Why the body could not be read.
pub(crate) enum BodyError {
    TooLarge(u64),
    Bad(String),
}

impl BodyError {
    pub(crate) fn reject(self, max: u64) -> Reject {
        match self {
            BodyError::TooLarge(n) => Reject::new(
                413,
                "body_too_large",
                format!("body of {n} bytes exceeds max_body_bytes {max}"),
            ),
            BodyError::Bad(e) => Reject::new(400, "bad_body", e),
        }
    }
}

impl Hub {
    pub fn new(tables: Tables, engine: Arc<Engine>, access_log: Option<Arc<AccessLog>>) -> Self {
        Hub {
            tables,
            engine,
            access_log,
        }
    }

    /// Writes a complete response with the request id and route version. `body` is JSON.
    pub(crate) async fn respond(
        session: &mut Downstream<'_>,
        ctx: &mut Ctx,
        status: u16,
        body: Option<Vec<u8>>,
    ) -> Result<()> {
        Self::respond_with(session, ctx, status, body, &[]).await
    }

    pub(crate) async fn respond_with(
        session: &mut Downstream<'_>,
        ctx: &mut Ctx,
        status: u16,
        body: Option<Vec<u8>>,
        extra: &[(&'static str, HeaderValue)],
    ) -> Result<()> {
        ctx.status = status;
        let mut headers: Vec<(&str, &[u8])> = Vec::with_capacity(3 + extra.len());
        stamp(&mut headers, ctx);
        for (k, v) in extra {
            headers.push((k, v.as_bytes()));
        }
        if body.is_some() {
            headers.push(("content-type", b"application/json"));
        }
        let body = body.as_deref().unwrap_or_default();
        if session.conn.respond(status, &headers, body).await {
            Ok(())
        } else {
            Error::e_explain(ErrorType::WriteError, "downstream went away")
        }
    }

    /// Answers a refusal (the connection closes after it when the body was left unread).
    pub(crate) async fn reject(
        session: &mut Downstream<'_>,
        ctx: &mut Ctx,
        r: Reject,
    ) -> Result<()> {
        Self::respond(session, ctx, r.status, Some(r.body())).await
    }

    /// Reads the whole request body, enforcing the cap: a declared Content-Length over the cap
    /// is refused before reading; a chunked body as soon as it exceeds it.
    pub(crate) async fn read_body(
        session: &mut Downstream<'_>,
        max: u64,
    ) -> std::result::Result<Bytes, BodyError> {
        if let Some(n) = session.raw.content_length() {
            if n > max {
                session.conn.close_after_answer();
                return Err(BodyError::TooLarge(n));
            }
        }
        let cap = usize::try_from(max).unwrap_or(usize::MAX);
        match session.conn.read_body(session.raw, cap).await {
            Ok(b) => Ok(b),
            Err(http1::BodyError::TooLarge(_)) => Err(BodyError::TooLarge(max.saturating_add(1))),
            Err(http1::BodyError::Bad(e)) => Err(BodyError::Bad(e)),
        }
    }

    fn count_suppressed(engine: &Engine, plan: &Plan) {
        for (_, why) in &plan.relay.suppressed {
            engine
                .metrics
                .relays_suppressed
                .with_label_values(&[why.as_str()])
                .inc();
        }
    }
}

/// Adds `x-request-id` and `x-hub-route-version` to an answer.
pub(crate) fn stamp<'a>(headers: &mut Vec<(&'a str, &'a [u8])>, ctx: &'a Ctx) {
    if let Some(id) = &ctx.request_id {
        headers.push((REQUEST_ID, id.as_bytes()));
    }
    if let Some(t) = &ctx.table {
        headers.push((HUB_ROUTE_VERSION, t.table.version_header.as_bytes()));
    }
}

/// One request on a downstream connection: the connection, the parsed head, and what routing
/// reads of it.
pub struct Downstream<'a> {
    pub(crate) conn: &'a mut Conn<Stream>,
    pub(crate) raw: &'a http1::Request,
    pub(crate) method: Method,
    pub(crate) target: Target,
}

/// The request target (RFC 9112 §3.2): what is forwarded (path and query, validated, without a
/// fragment) and what routes (the path, and the authority of an absolute-form target).
pub(crate) struct Target {
    pub(crate) path_and_query: PathAndQuery,
    /// The authority of an absolute-form target (it overrides `Host`, RFC 9112 §3.2.2).
    pub(crate) authority: Option<String>,
}

impl Target {
    /// The path, without the query.
    pub(crate) fn path(&self) -> &str {
        self.path_and_query.path()
    }

    /// The host that routes: the target's authority, else the one `Host` field.
    pub(crate) fn host<'a>(&'a self, raw: &'a http1::Request) -> Option<&'a str> {
        self.authority
            .as_deref()
            .or_else(|| raw.first("host").and_then(|h| std::str::from_utf8(h).ok()))
    }
}

/// Splits a request's method and target and refuses, with 400, what cannot be forwarded: a
/// method or target that is not valid HTTP (the target's characters are checked as `http::Uri`
/// checks them; a fragment is dropped), an authority-form or scheme-less target, and an
/// HTTP/1.1 request without exactly one `Host` (RFC 9112 §3.2).
fn request_line(r: &http1::Request) -> std::result::Result<(Method, Target), Reject> {
    let bad = |what: &str| Reject::new(400, "bad_request", format!("invalid {what}"));
    // Standard methods are recognised without allocating.
    let method = Method::from_bytes(r.method().as_bytes()).map_err(|_| bad("method"))?;
    let hosts = r.values_of("host").count();
    if hosts > 1 || (hosts == 0 && !r.is_http10()) {
        return Err(Reject::new(
            400,
            "bad_request",
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    let raw = r.target_bytes();
    let target = if raw.first() == Some(&b'/') || &raw[..] == b"*" {
        // Origin form: checked and split in place, without a copy.
        Target {
            path_and_query: PathAndQuery::from_maybe_shared(raw)
                .map_err(|_| bad("request target"))?,
            authority: None,
        }
    } else {
        // Absolute form (`http://host/path`), as sent to proxies.
        let uri: http::Uri = r.target().parse().map_err(|_| bad("request target"))?;
        let (Some(_), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(bad("request target"));
        };
        let authority = Some(authority.as_str().to_owned());
        let pq = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Target {
            path_and_query: pq,
            authority,
        }
    };
    Ok((method, target))
}

#[async_trait]
impl ServerApp for Hub {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let mut conn = Conn::new(io, Limits::default(), shutdown.clone());
        loop {
            let raw = match conn.next_request().await {
                Next::Request(r) => r,
                Next::Refused(r) => {
                    let mut ctx = self.new_ctx();
                    ctx.table = Some(self.tables.load_full());
                    let kind = match r.status {
                        431 => "header_too_large",
                        417 => "expectation_failed",
                        _ => "bad_request",
                    };
                    let body = Reject::new(r.status, kind, r.detail).body();
                    let mut headers = Vec::with_capacity(2);
                    stamp(&mut headers, &ctx);
                    headers.push(("content-type", b"application/json".as_slice()));
                    conn.respond(r.status, &headers, &body).await;
                    ctx.status = r.status;
                    self.log(None, &ctx);
                    break;
                }
                Next::Closed => break,
            };
            let mut ctx = self.new_ctx();
            let (method, target) = match request_line(&raw) {
                Ok(h) => h,
                Err(r) => {
                    ctx.table = Some(self.tables.load_full());
                    conn.close_after_answer();
                    let mut headers = Vec::with_capacity(2);
                    stamp(&mut headers, &ctx);
                    headers.push(("content-type", b"application/json".as_slice()));
                    conn.respond(r.status, &headers, &r.body()).await;
                    ctx.status = r.status;
                    self.log(None, &ctx);
                    break;
                }
            };
            let mut session = Downstream {
                conn: &mut conn,
                raw: &raw,
                method,
                target,
            };
            let r = self.handle(&mut session, &mut ctx).await;
            if let Err(e) = &r {
                if ctx.status == 0 {
                    // Nothing answered yet: say so, then close.
                    session.conn.close_after_answer();
                    let r = Reject::new(500, "internal_error", e.to_string());
                    let _ = Self::reject(&mut session, &mut ctx, r).await;
                }
            }
            self.log(r.as_ref().err().map(|e| e.as_ref()), &ctx);
            if r.is_err() || !conn.keep_alive() {
                break;
            }
        }
        None
    }
}

impl Hub {
    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: Instant::now(),
            table: None,
            route: None,
            request_id: None,
            status: 0,
            delivered: 0,
            failed: 0,
            _busy: Busy::request(&self.engine),
        }
    }

    /// Answers one request: route, read the body, deliver per the route's mode, respond.
    async fn handle(&self, session: &mut Downstream<'_>, ctx: &mut Ctx) -> Result<()> {
        let t = self.tables.load_full();
        ctx.table = Some(t.clone());
        if session.target.path() == OUTCOMES_PATH {
            return self.relay_outcome(session, ctx, &t).await;
        }
        let raw = session.raw;
        let host = session.target.host(raw);
        let view = RequestView {
            method: &session.method,
            path: session.target.path(),
            host,
            headers: raw,
        };
        let plan = match plan(&t.table, &view, |i| t.healthy(i)) {
            Ok(p) => p,
            Err(r) => {
                if r.status != 400 {
                    // Keep a valid requester id on 404/508 answers.
                    ctx.request_id = raw
                        .first(REQUEST_ID)
                        .filter(|v| multihub_protocol::validate_request_id(v).is_ok())
                        .and_then(|v| HeaderValue::from_bytes(v).ok());
                }
                return Self::reject(session, ctx, r).await;
            }
        };
        ctx.request_id = Some(plan.inbound.request_id.clone());
        ctx.route = Some(plan.route);
        let max = t.table.hub.max_body_bytes;
        let body = match Self::read_body(session, max).await {
            Ok(b) => b,
            Err(e) => return Self::reject(session, ctx, e.reject(max)).await,
        };
        Self::count_suppressed(&self.engine, &plan);
        let out = Outbound::new(
            &session.method,
            session.target.path_and_query.as_str(),
            raw,
            &t.table,
            &plan,
            &body,
        );
        match t.table.routes[plan.route].respond {
            Respond::Accept => self.accept(session, ctx, &t, &plan, out, body).await,
            Respond::Proxy => self.proxy(session, ctx, &t, &plan, out, body).await,
            Respond::Collect => self.collect(session, ctx, &t, &plan, out, body).await,
        }
    }

    /// Runs last for every request, answered or failed: metrics and the access log.
    fn log(&self, e: Option<&pingora_error::Error>, ctx: &Ctx) {
        let status = ctx.status;
        let elapsed = ctx.started.elapsed();
        let Some(t) = &ctx.table else { return };
        let m = match ctx.route.and_then(|r| t.route_metrics.get(r)) {
            Some(m) => m,
            None => &t.unrouted_metrics,
        };
        m.observe(status, elapsed.as_secs_f64());
        if let Some(log) = &self.access_log {
            let route = ctx
                .route
                .and_then(|r| t.table.routes.get(r))
                .map(|r| r.id.as_str())
                .unwrap_or("");
            let id = ctx
                .request_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            log.write(&AccessRecord {
                request_id: id,
                route,
                version: &t.table.version,
                status,
                delivered: ctx.delivered,
                failed: ctx.failed,
                duration_us: elapsed.as_micros() as u64,
                error: e.map(|e| e.etype().as_str()),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(head: &'static str) -> std::result::Result<(Method, Target, http1::Request), u16> {
        let r = http1::Request::parse(Bytes::from_static(head.as_bytes())).map_err(|r| r.status)?;
        let (m, t) = request_line(&r).map_err(|r| r.status)?;
        Ok((m, t, r))
    }

    #[test]
    fn targets_are_checked_split_and_hosted_as_rfc_9112_says() {
        let (m, t, r) = line("POST /v1/a?b=1#frag HTTP/1.1\r\nHost: hub:8080\r\n\r\n")
            .unwrap_or_else(|s| panic!("{s}"));
        assert_eq!(m, Method::POST);
        assert_eq!(
            t.path_and_query.as_str(),
            "/v1/a?b=1",
            "the fragment is dropped"
        );
        assert_eq!(t.path(), "/v1/a");
        assert_eq!(t.host(&r), Some("hub:8080"));
        // Absolute form: the target's authority wins over Host.
        let (_, t, r) = line("GET http://api.example/v1?x HTTP/1.1\r\nHost: other\r\n\r\n")
            .unwrap_or_else(|s| panic!("{s}"));
        assert_eq!(t.path_and_query.as_str(), "/v1?x");
        assert_eq!(t.host(&r), Some("api.example"));
        let (_, t, _) = line("GET http://api.example HTTP/1.1\r\nHost: h\r\n\r\n")
            .unwrap_or_else(|s| panic!("{s}"));
        assert_eq!(t.path(), "/");
        // HTTP/1.0 may omit Host.
        let (_, t, r) = line("GET / HTTP/1.0\r\n\r\n").unwrap_or_else(|s| panic!("{s}"));
        assert_eq!(t.host(&r), None);
        for bad in [
            "GET /a<b> HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET /a?q=\"x\" HTTP/1.1\r\nHost: h\r\n\r\n",
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n",
            "GET mailto:x@y HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
        ] {
            assert_eq!(line(bad).err(), Some(400), "{bad:?}");
        }
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            /// Any target either gets a 400 or routes on a path that starts with `/` (or is
            /// `*`) and carries no fragment; a Host, when one routes, is what was sent.
            #[test]
            fn any_target_is_refused_or_split_cleanly(
                target in prop_oneof![
                    "[!-~]{1,40}",
                    "(/|http://|https://|\\*|//|h:1|/_hub)[!-~]{0,30}",
                ],
                hosts in prop::collection::vec("[!-~]{1,10}", 0..3),
                http10 in any::<bool>(),
            ) {
                let mut head = format!("GET {target} HTTP/1.{}\r\n", u8::from(!http10));
                for h in &hosts {
                    head.push_str(&format!("Host: {h}\r\n"));
                }
                head.push_str("\r\n");
                let Ok(r) = http1::Request::parse(Bytes::from(head)) else { return Ok(()) };
                let Ok((_, t)) = request_line(&r) else { return Ok(()) };
                let pq = t.path_and_query.as_str();
                prop_assert!(t.path().starts_with('/') || pq == "*", "{}", pq);
                prop_assert!(!pq.contains('#'), "{}", pq);
                if t.authority.is_none() {
                    prop_assert!(hosts.len() == 1 || (http10 && hosts.is_empty()));
                    prop_assert_eq!(t.host(&r), hosts.first().map(String::as_str));
                }
            }
        }
    }
}
