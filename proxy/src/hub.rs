//! The Pingora glue: `ProxyHttp` for the hub. Everything is decided by `multihub-filters`;
//! this file reads the request, calls the filters, hands the request to its response mode
//! (`modes.rs`) or to the outcome relay (`outcomes.rs`), and answers.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use multihub_filters::forward::{connection_tokens, hub_headers, is_forwarded};
use multihub_filters::{plan, Plan, Reject, RequestView};
use multihub_protocol::hashing::{binding_hex, repr_of};
use multihub_protocol::headers::{HUB_ROUTE_VERSION, OUTCOMES_PATH, REQUEST_ID};
use multihub_protocol::routes::Respond;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{ProxyHttp, Session};
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
        session: &mut Session,
        ctx: &mut Ctx,
        status: u16,
        body: Option<Vec<u8>>,
    ) -> Result<()> {
        Self::respond_with(session, ctx, status, body, &[]).await
    }

    pub(crate) async fn respond_with(
        session: &mut Session,
        ctx: &mut Ctx,
        status: u16,
        body: Option<Vec<u8>>,
        extra: &[(&'static str, HeaderValue)],
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(status, Some(6))?;
        stamp(&mut resp, ctx)?;
        for (k, v) in extra {
            resp.insert_header(*k, v.clone())?;
        }
        ctx.status = status;
        match body {
            None => {
                resp.insert_header(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"))?;
                session.write_response_header(Box::new(resp), true).await
            }
            Some(b) => {
                resp.insert_header(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )?;
                resp.insert_header(http::header::CONTENT_LENGTH, HeaderValue::from(b.len()))?;
                session.write_response_header(Box::new(resp), false).await?;
                session
                    .write_response_body(Some(Bytes::from(b)), true)
                    .await
            }
        }
    }

    /// Answers a refusal; closes the connection when an unread body would follow.
    pub(crate) async fn reject(session: &mut Session, ctx: &mut Ctx, r: Reject) -> Result<()> {
        if has_body(session.req_header()) && !session.is_body_done() {
            session.set_keepalive(None);
        }
        Self::respond(session, ctx, r.status, Some(r.body())).await
    }

    /// Reads the whole request body, enforcing the cap: a declared Content-Length over the cap
    /// is refused before reading; a chunked body as soon as it exceeds it.
    pub(crate) async fn read_body(
        session: &mut Session,
        max: u64,
    ) -> std::result::Result<Bytes, BodyError> {
        let declared = match session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
        {
            Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(n) => Some(n),
                None => return Err(BodyError::Bad("content-length is not a number".into())),
            },
            None => None,
        };
        if let Some(n) = declared {
            if n > max {
                return Err(BodyError::TooLarge(n));
            }
        }
        if expects_continue(session.req_header()) {
            // Pingora turns keep-alive off when any header (even a 100) is written before the
            // body is read; the body will be read in full, so restore it.
            let keepalive = session.get_keepalive();
            session
                .write_continue_response()
                .await
                .map_err(|e| BodyError::Bad(e.to_string()))?;
            session.set_keepalive(keepalive);
        }
        let mut first: Option<Bytes> = None;
        let mut rest: Option<BytesMut> = None;
        let mut total: u64 = 0;
        loop {
            let chunk = match session.read_request_body().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => return Err(BodyError::Bad(e.to_string())),
            };
            total += chunk.len() as u64;
            if total > max {
                return Err(BodyError::TooLarge(total));
            }
            match (&mut first, &mut rest) {
                (None, None) => first = Some(chunk),
                (Some(f), None) => {
                    let mut b = BytesMut::with_capacity(declared.unwrap_or(0).max(total) as usize);
                    b.extend_from_slice(f);
                    b.extend_from_slice(&chunk);
                    rest = Some(b);
                }
                (_, Some(b)) => b.extend_from_slice(&chunk),
            }
        }
        Ok(match (first, rest) {
            (_, Some(b)) => b.freeze(),
            (Some(f), None) => f,
            (None, None) => Bytes::new(),
        })
    }

    /// The head sent to every upstream, minus `Host`: requester headers that may be forwarded,
    /// then the hub headers of DESIGN §3.
    fn base_header(
        req: &RequestHeader,
        t: &HubTable,
        plan: &Plan,
        body: &Bytes,
    ) -> Result<RequestHeader> {
        let path = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut out = RequestHeader::build(
            req.method.clone(),
            path.as_bytes(),
            Some(req.headers.len() + 12),
        )?;
        let conn = connection_tokens(&req.headers);
        for (name, value) in req.headers.iter() {
            if is_forwarded(name, &conn) {
                out.append_header(name.clone(), value.clone())?;
            }
        }
        let repr = repr_of(body);
        let binding = binding_hex(repr.as_str(), plan.inbound.context.as_bytes());
        let repr = HeaderValue::from_str(repr.as_str())
            .map_err(|_| Error::new(ErrorType::InternalError))?;
        let binding =
            HeaderValue::from_str(&binding).map_err(|_| Error::new(ErrorType::InternalError))?;
        for (name, value) in hub_headers(&t.table, plan, repr, binding) {
            out.insert_header(name, value)?;
        }
        out.insert_header(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()))?;
        Ok(out)
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
pub(crate) fn stamp(resp: &mut ResponseHeader, ctx: &Ctx) -> Result<()> {
    if let Some(id) = &ctx.request_id {
        resp.insert_header(REQUEST_ID, id.clone())?;
    }
    if let Some(t) = &ctx.table {
        resp.insert_header(HUB_ROUTE_VERSION, t.table.version_header.clone())?;
    }
    Ok(())
}

#[async_trait]
impl ProxyHttp for Hub {
    type CTX = Ctx;

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

    /// Runs once the request head is parsed. The hub answers every request here (returns
    /// `Ok(true)`): route, read the body, deliver per the route's mode, respond.
    /// Nothing reaches `upstream_peer`.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let t = self.tables.load_full();
        ctx.table = Some(t.clone());
        if session.req_header().uri.path() == OUTCOMES_PATH {
            self.relay_outcome(session, ctx, &t).await?;
            return Ok(true);
        }
        let req = session.req_header();
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.authority().map(|a| a.as_str()));
        let view = RequestView {
            method: &req.method,
            path: req.uri.path(),
            host,
            headers: &req.headers,
        };
        let plan = match plan(&t.table, &view, |i| t.healthy(i)) {
            Ok(p) => p,
            Err(r) => {
                if r.status != 400 {
                    // Keep a valid requester id on 404/508 answers.
                    ctx.request_id = req
                        .headers
                        .get(REQUEST_ID)
                        .filter(|v| multihub_protocol::validate_request_id(v.as_bytes()).is_ok())
                        .cloned();
                }
                Self::reject(session, ctx, r).await?;
                return Ok(true);
            }
        };
        ctx.request_id = Some(plan.inbound.request_id.clone());
        ctx.route = Some(plan.route);
        let max = t.table.hub.max_body_bytes;
        let body = match Self::read_body(session, max).await {
            Ok(b) => b,
            Err(e) => {
                Self::reject(session, ctx, e.reject(max)).await?;
                return Ok(true);
            }
        };
        Self::count_suppressed(&self.engine, &plan);
        let base = Self::base_header(session.req_header(), &t, &plan, &body)?;
        match t.table.routes[plan.route].respond {
            Respond::Accept => self.accept(session, ctx, &t, &plan, base, body).await?,
            Respond::Proxy => self.proxy(session, ctx, &t, &plan, base, body).await?,
            Respond::Collect => self.collect(session, ctx, &t, &plan, base, body).await?,
        }
        Ok(true)
    }

    /// Never reached: `request_filter` answers every request.
    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        Error::e_explain(
            ErrorType::InternalError,
            "the hub answers every request in request_filter",
        )
    }

    /// Runs last for every request, answered or failed: metrics and the access log.
    async fn logging(
        &self,
        session: &mut Session,
        e: Option<&pingora_error::Error>,
        ctx: &mut Ctx,
    ) {
        let status = if ctx.status != 0 {
            ctx.status
        } else {
            session
                .response_written()
                .map(|r| r.status.as_u16())
                .unwrap_or(0)
        };
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

/// `Expect: 100-continue` on an HTTP/1.1 request: the client waits for a 100 before the body.
fn expects_continue(req: &RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && req
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// True unless the request declares no body (no Transfer-Encoding, Content-Length absent or 0).
fn has_body(req: &RequestHeader) -> bool {
    req.headers.contains_key(http::header::TRANSFER_ENCODING)
        || req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}
