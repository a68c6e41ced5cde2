//! The Pingora glue: `ProxyHttp` for the hub. Everything is decided by `multihub-filters`;
//! this file reads the request, calls the filters, delivers, and answers.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use multihub_filters::forward::{connection_tokens, hub_headers, is_forwarded};
use multihub_filters::relay::Suppressed;
use multihub_filters::{plan, Plan, Reject, RequestView, Upstream};
use multihub_protocol::hashing::{binding_hex, repr_of};
use multihub_protocol::headers::{HUB_ROUTE_VERSION, REQUEST_ID};
use multihub_protocol::routes::{Delivery, Order};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{ProxyHttp, Session};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

use crate::deliver::Failure;
use crate::state::{Engine, HubTable, Stats, Tables};

/// The hub service.
pub struct Hub {
    pub tables: Tables,
    pub engine: Arc<Engine>,
}

/// Per-request scratch.
pub struct Ctx {
    started: Instant,
    /// The table version serving this request (pinned for its whole life).
    table: Option<Arc<HubTable>>,
    route: Option<usize>,
    request_id: Option<HeaderValue>,
    status: u16,
    delivered: u16,
    failed: u16,
}

/// One delivery outcome: upstream index and result.
type Outcome = (usize, Result<u16, Failure>);

#[derive(Serialize)]
struct Undelivered<'a> {
    target: &'a str,
    kind: &'static str,
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    detail: String,
}

#[derive(Serialize)]
struct UndeliveredBody<'a> {
    error: &'static str,
    detail: String,
    request_id: &'a str,
    route_version: &'a str,
    undelivered: Vec<Undelivered<'a>>,
}

/// Why the body could not be read.
enum BodyError {
    TooLarge(u64),
    Bad(String),
}

impl Hub {
    pub fn new(tables: Tables, engine: Arc<Engine>) -> Self {
        Hub { tables, engine }
    }

    /// Writes a complete response. `body` is JSON when present.
    async fn respond(
        session: &mut Session,
        ctx: &mut Ctx,
        status: u16,
        body: Option<Vec<u8>>,
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(status, Some(5))?;
        if let Some(id) = &ctx.request_id {
            resp.insert_header(REQUEST_ID, id.clone())?;
        }
        if let Some(t) = &ctx.table {
            resp.insert_header(HUB_ROUTE_VERSION, t.table.version_header.clone())?;
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

    async fn reject(session: &mut Session, ctx: &mut Ctx, r: Reject) -> Result<()> {
        Self::respond(session, ctx, r.status, Some(r.body())).await
    }

    /// Reads the whole request body, enforcing the cap: a declared Content-Length over the cap
    /// is refused before reading; a chunked body as soon as it exceeds it.
    async fn read_body(session: &mut Session, max: u64) -> std::result::Result<Bytes, BodyError> {
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

    fn suppressions(engine: &Engine, plan: &Plan) {
        for (_, why) in &plan.relay.suppressed {
            match why {
                Suppressed::Loop => Stats::add(&engine.stats.relays_suppressed_loop),
                Suppressed::Hops => Stats::add(&engine.stats.relays_suppressed_hops),
            }
        }
    }
}

/// The head for one upstream: the base head with this upstream's `Host` and base path.
fn head_for(base: &RequestHeader, up: &Upstream) -> Result<Box<RequestHeader>> {
    let mut h = Box::new(base.clone());
    h.insert_header(http::header::HOST, up.host_header.clone())?;
    if !up.url.base_path.is_empty() {
        let pq = base.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut s = String::with_capacity(up.url.base_path.len() + pq.len());
        s.push_str(&up.url.base_path);
        s.push_str(pq);
        let uri = s
            .parse::<http::Uri>()
            .map_err(|_| Error::new(ErrorType::InternalError))?;
        h.set_uri(uri);
    }
    Ok(h)
}

/// One request's deliveries: everything but the upstream index.
pub(crate) struct Job<'a> {
    pub engine: &'a Engine,
    pub t: &'a HubTable,
    pub base: &'a RequestHeader,
    pub body: &'a Bytes,
    /// Confirmed deliveries wait for an in-flight permit (up to the upstream's timeout); async
    /// ones never wait: no permit = dropped and counted.
    pub wait: bool,
    /// Extra attempts on retryable failures, with doubling backoff.
    pub retries: u32,
}

impl Job<'_> {
    /// Delivers to upstream `i` under the in-flight bound.
    async fn deliver_one(&self, i: usize) -> Outcome {
        let (engine, t) = (self.engine, self.t);
        let (Some(up), Some(peer)) = (t.table.upstream(i), t.peers.get(i)) else {
            return (i, Err(Failure::Broken("unknown upstream".into())));
        };
        let permit = if self.wait {
            match tokio::time::timeout(up.timeout, engine.in_flight.acquire()).await {
                Ok(Ok(p)) => p,
                _ => return (i, Err(Failure::InFlightFull)),
            }
        } else {
            match engine.in_flight.try_acquire() {
                Ok(p) => p,
                Err(_) => {
                    Stats::add(&engine.stats.dropped_in_flight_full);
                    return (i, Err(Failure::InFlightFull));
                }
            }
        };
        let head = match head_for(self.base, up) {
            Ok(h) => h,
            Err(e) => return (i, Err(Failure::Broken(e.to_string()))),
        };
        let mut backoff = t.table.hub.retry_backoff;
        let mut attempt = 0;
        let result = loop {
            let r = engine
                .deliverer
                .deliver(peer, &head, self.body, up.timeout)
                .await;
            t.mark(i, !matches!(&r, Err(f) if f.unreachable()));
            match r {
                Err(f) if f.retryable() && attempt < self.retries => {
                    attempt += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                }
                other => break other,
            }
        };
        drop(permit);
        match &result {
            Ok(_) => Stats::add(&engine.stats.deliveries_ok),
            Err(_) => {
                Stats::add(&engine.stats.deliveries_failed);
                if self.retries > 0 {
                    Stats::add(&engine.stats.dropped_retries_exhausted);
                }
            }
        }
        (i, result)
    }

    /// Delivers to every upstream in `list` (targets, then relays), in parallel or in sequence.
    async fn deliver_all(&self, order: Order, list: &[usize]) -> Vec<Outcome> {
        match order {
            Order::Parallel => {
                futures::future::join_all(list.iter().map(|&i| self.deliver_one(i))).await
            }
            Order::Sequential => {
                let mut out = Vec::with_capacity(list.len());
                let mut broken = false;
                for &i in list {
                    if broken {
                        Stats::add(&self.engine.stats.dropped_skipped);
                        out.push((i, Err(Failure::Skipped)));
                        continue;
                    }
                    let o = self.deliver_one(i).await;
                    broken = o.1.is_err();
                    out.push(o);
                }
                out
            }
        }
    }
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
        }
    }

    /// Runs once the request head is parsed. The hub answers every request here (returns
    /// `Ok(true)`): route, read the body, deliver, respond. Nothing reaches `upstream_peer`.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let t = self.tables.load_full();
        ctx.table = Some(t.clone());
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
                if has_body(session.req_header()) {
                    // The unread body would be taken for the next request: close instead.
                    session.set_keepalive(None);
                }
                Self::reject(session, ctx, r).await?;
                return Ok(true);
            }
        };
        ctx.request_id = Some(plan.inbound.request_id.clone());
        ctx.route = Some(plan.route);
        let body = match Self::read_body(session, t.table.hub.max_body_bytes).await {
            Ok(b) => b,
            Err(BodyError::TooLarge(n)) => {
                session.set_keepalive(None);
                let r = Reject::new(
                    413,
                    "body_too_large",
                    format!(
                        "body of {n} bytes exceeds max_body_bytes {}",
                        t.table.hub.max_body_bytes
                    ),
                );
                Self::reject(session, ctx, r).await?;
                return Ok(true);
            }
            Err(BodyError::Bad(e)) => {
                session.set_keepalive(None);
                Self::reject(session, ctx, Reject::new(400, "bad_body", e)).await?;
                return Ok(true);
            }
        };
        Self::suppressions(&self.engine, &plan);
        let base = Self::base_header(session.req_header(), &t, &plan, &body)?;
        let route = &t.table.routes[plan.route];
        let mut list = plan.targets.clone();
        list.extend_from_slice(&plan.relay.relays);

        match route.delivery {
            Delivery::Async => {
                let engine = self.engine.clone();
                let tt = t.clone();
                let order = route.order;
                let retries = t.table.hub.async_retries;
                ctx.delivered = list.len() as u16;
                tokio::spawn(async move {
                    let job = Job {
                        engine: &engine,
                        t: &tt,
                        base: &base,
                        body: &body,
                        wait: false,
                        retries,
                    };
                    let out = job.deliver_all(order, &list).await;
                    for (i, r) in out {
                        if let Err(f) = r {
                            let id = tt.table.upstream(i).map(|u| u.id.as_str()).unwrap_or("?");
                            log::debug!("async delivery to {id} failed: {f}");
                        }
                    }
                });
                Self::respond(session, ctx, 204, None).await?;
            }
            Delivery::Confirmed => {
                let job = Job {
                    engine: &self.engine,
                    t: &t,
                    base: &base,
                    body: &body,
                    wait: true,
                    retries: 0,
                };
                let out = job.deliver_all(route.order, &list).await;
                let failed: Vec<&Outcome> = out.iter().filter(|o| o.1.is_err()).collect();
                ctx.delivered = (out.len() - failed.len()) as u16;
                ctx.failed = failed.len() as u16;
                if failed.is_empty() {
                    Self::respond(session, ctx, 204, None).await?;
                } else {
                    let undelivered = failed
                        .iter()
                        .filter_map(|(i, r)| {
                            let up = t.table.upstream(*i)?;
                            let f = r.as_ref().err()?;
                            Some(Undelivered {
                                target: &up.id,
                                kind: up.kind.as_str(),
                                reason: f.reason(),
                                status: match f {
                                    Failure::Status(s) => Some(*s),
                                    _ => None,
                                },
                                detail: f.to_string(),
                            })
                        })
                        .collect::<Vec<_>>();
                    let names: Vec<&str> = undelivered.iter().map(|u| u.target).collect();
                    let body = UndeliveredBody {
                        error: "undelivered",
                        detail: format!(
                            "{} of {} deliveries failed: {}",
                            failed.len(),
                            out.len(),
                            names.join(", ")
                        ),
                        request_id: plan.inbound.request_id.to_str().unwrap_or(""),
                        route_version: &t.table.version,
                        undelivered,
                    };
                    let bytes = serde_json::to_vec(&body).unwrap_or_default();
                    Self::respond(session, ctx, 502, Some(bytes)).await?;
                }
            }
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

    /// Runs last for every request, answered or failed.
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
        if let Some(e) = e {
            log::debug!("request failed: {e}");
        }
        log::debug!(
            "request_id={} route={} status={} delivered={} failed={} duration_us={}",
            ctx.request_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-"),
            ctx.route
                .and_then(|r| ctx.table.as_ref().map(|t| t.table.routes[r].id.as_str()))
                .unwrap_or("-"),
            status,
            ctx.delivered,
            ctx.failed,
            ctx.started.elapsed().as_micros()
        );
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
