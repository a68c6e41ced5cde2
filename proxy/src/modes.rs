//! The three response modes of a route (DESIGN §2 `respond`), each answering the requester.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use multihub_filters::forward::{connection_tokens, hop_by_hop, Outbound};
use multihub_filters::Plan;
use multihub_protocol::headers::{HUB_ROUTE_VERSION, REQUEST_ID};
use multihub_protocol::http1::client::Framing;
use multihub_protocol::http1::Answer;
use multihub_protocol::routes::{Delivery, Order};
use pingora_error::{Error, ErrorType, Result};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::deliver::{Failure, Fetched, Request};
use crate::fanout::{count_dropped, slot_within, Job, Outcome};
use crate::hub::{stamp, Ctx, Downstream, Hub};
use crate::metrics::DropReason;
use crate::state::{Busy, HubTable};

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

#[derive(Serialize)]
struct Collected<'a> {
    target: &'a str,
    status: Option<u16>,
    headers: Vec<(String, String)>,
    body_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct CollectBody<'a> {
    request_id: &'a str,
    route_version: &'a str,
    responses: Vec<Collected<'a>>,
}

/// Counts one waiting request in a gauge for as long as it lives (also when the waiting
/// request is cancelled).
struct Waiting<'a>(&'a prometheus::IntGauge);

impl<'a> Waiting<'a> {
    fn new(g: &'a prometheus::IntGauge) -> Self {
        g.inc();
        Waiting(g)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Which in-flight bound background deliveries count against.
#[derive(Clone, Copy)]
enum Bound {
    Hub,
    Copies,
}

/// Methods whose request may be sent twice without a different effect (RFC 9110 §9.2.2).
fn idempotent(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::OPTIONS
            | http::Method::TRACE
    )
}

/// Selected targets, then relay peers: everything the request is delivered to.
fn all_upstreams(plan: &Plan) -> Vec<usize> {
    let mut list = Vec::with_capacity(plan.targets.len() + plan.relay.relays.len());
    list.extend_from_slice(&plan.targets);
    list.extend_from_slice(&plan.relay.relays);
    list
}

impl Hub {
    /// `respond: accept`: 204 once delivered (`confirmed`), or at once (`async`).
    pub(crate) async fn accept(
        &self,
        session: &mut Downstream<'_>,
        ctx: &mut Ctx,
        t: &Arc<HubTable>,
        plan: &Plan,
        out: Outbound,
        body: Bytes,
    ) -> Result<()> {
        let route = &t.table.routes[plan.route];
        let list = all_upstreams(plan);
        match route.delivery {
            Delivery::Async => {
                ctx.delivered = list.len() as u16;
                let wait = t.table.hub.async_wait;
                if wait.is_zero() || route.order != Order::Parallel {
                    self.spawn_background(t, plan.route, out, body, list, Bound::Hub);
                } else {
                    self.admit_then_spawn(t, plan.route, out, body, list, wait)
                        .await;
                }
                Self::respond(session, ctx, 204, None).await
            }
            Delivery::Confirmed => {
                let job = Job {
                    engine: &self.engine,
                    route_index: plan.route,
                    t,
                    out: &out,
                    body: &body,
                    slots: self.engine.in_flight.semaphore(),
                    wait: true,
                    retries: 0,
                };
                let out = job.deliver_all(route.order, &list).await;
                let failed: Vec<&Outcome> = out.iter().filter(|o| o.1.is_err()).collect();
                ctx.delivered = (out.len() - failed.len()) as u16;
                ctx.failed = failed.len() as u16;
                if failed.is_empty() {
                    return Self::respond(session, ctx, 204, None).await;
                }
                let undelivered: Vec<Undelivered> = failed
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
                    .collect();
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
                Self::respond(session, ctx, 502, Some(bytes)).await
            }
        }
    }

    /// `respond: proxy`: the first selected target's response streams back verbatim; every
    /// other target and relay peer gets a copy in the background that never delays it.
    pub(crate) async fn proxy(
        &self,
        session: &mut Downstream<'_>,
        ctx: &mut Ctx,
        t: &Arc<HubTable>,
        plan: &Plan,
        out: Outbound,
        body: Bytes,
    ) -> Result<()> {
        let route = &t.table.routes[plan.route];
        let Some((&primary, others)) = plan.targets.split_first() else {
            return Error::e_explain(ErrorType::InternalError, "route without targets");
        };
        let Some(up) = t.table.upstream(primary) else {
            return Error::e_explain(ErrorType::InternalError, "unknown primary");
        };
        let head = out.head(up);
        let method = out.method.clone();
        let req = Request::of(&out, &head, &body);
        let mut copies: Vec<usize> = others.to_vec();
        copies.extend_from_slice(&plan.relay.relays);
        if !copies.is_empty() {
            if body.len() as u64 > route.copy_max_body_bytes {
                for _ in &copies {
                    self.engine.metrics.drop(DropReason::CopyTooLarge);
                }
            } else {
                self.spawn_background(t, plan.route, out, body.clone(), copies, Bound::Copies);
            }
        }

        let attempts = if idempotent(&method) { 2 } else { 1 };
        let mut last = Failure::Timeout;
        let mut started = None;
        for _ in 0..attempts {
            match tokio::time::timeout(up.timeout, self.engine.deliverer.start(up.addr, req)).await
            {
                Ok(Ok(s)) => {
                    started = Some(s);
                    break;
                }
                Ok(Err(f)) => last = f,
                Err(_) => last = Failure::Timeout,
            }
        }
        let Some((mut up_session, resp)) = started else {
            t.mark(primary, !last.unreachable());
            ctx.failed = 1;
            let r = multihub_filters::Reject::new(
                502,
                "primary_unreachable",
                format!("primary {}: {last}", up.id),
            );
            return Self::reject(session, ctx, r).await;
        };
        ctx.delivered = 1;
        let status = resp.status();
        // How the body is framed towards the requester: re-framed by us, except for answers
        // that carry no body, whose Content-Length passes through as given.
        let answer = if method == http::Method::HEAD || status == 204 || status == 304 {
            Answer::NoBody
        } else {
            match resp.framing() {
                Framing::Chunked | Framing::UntilClose => Answer::Chunked,
                // Codings the hub does not decode pass through raw, with their
                // Transfer-Encoding, until the connection closes.
                Framing::Coded => Answer::Raw,
                Framing::Length => match resp
                    .header("content-length")
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                {
                    Some(n) => Answer::Length(n),
                    None => Answer::Chunked,
                },
            }
        };
        // Hop-by-hop headers, those the upstream's Connection names, framing (ours now) and
        // the hub's own stamps stay behind. Transfer-Encoding is hop-by-hop; kept only for a
        // raw body, which it frames.
        let conn = connection_tokens(&resp);
        let keep = |n: &str| {
            let is = |h: &str| n.eq_ignore_ascii_case(h);
            if answer == Answer::Raw && is("transfer-encoding") {
                return true;
            }
            let length = is("content-length") && answer != Answer::NoBody;
            !(length || hop_by_hop(n.as_bytes(), &conn) || is(REQUEST_ID) || is(HUB_ROUTE_VERSION))
        };
        ctx.status = status;
        let mut headers: Vec<(&str, &[u8])> = Vec::with_capacity(resp.header_count() + 2);
        headers.extend(
            resp.headers()
                .filter_map(|(k, v)| Some((std::str::from_utf8(k).ok()?, v)))
                .filter(|(k, _)| keep(k)),
        );
        stamp(&mut headers, ctx);
        if !session.conn.start_answer(status, &headers, answer).await {
            return Error::e_explain(ErrorType::WriteError, "downstream went away");
        }
        if answer == Answer::NoBody {
            if up_session.is_done() {
                self.engine.deliverer.release(up_session, up.addr);
            }
            return Ok(());
        }
        loop {
            let piece = match tokio::time::timeout(up.timeout, up_session.piece()).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    return Error::e_explain(ErrorType::ReadError, format!("primary body: {e:?}"))
                }
                Err(_) => return Error::e_explain(ErrorType::ReadTimedout, "primary body stalled"),
            };
            let ok = match piece {
                Some(c) => session.conn.stream(&c).await,
                None => {
                    if !session.conn.end_stream().await {
                        return Error::e_explain(ErrorType::WriteError, "downstream went away");
                    }
                    break;
                }
            };
            if !ok {
                return Error::e_explain(ErrorType::WriteError, "downstream went away");
            }
        }
        self.engine.deliverer.release(up_session, up.addr);
        Ok(())
    }

    /// Delivers `list` in the background; never waits for a slot (none free = dropped and
    /// counted). `Bound::Hub` counts against `hub.max_in_flight` and retries (`accept` +
    /// `async`); `Bound::Copies` against the route's `copies.max_in_flight`, one attempt
    /// (`proxy` copies). Parallel deliveries take their slots before anything is spawned, so
    /// work beyond the bound (a slow copy target) costs no task, no head and no wake-up.
    fn spawn_background(
        &self,
        t: &Arc<HubTable>,
        route: usize,
        out: Outbound,
        body: Bytes,
        list: Vec<usize>,
        bound: Bound,
    ) {
        let Some(r) = t.table.routes.get(route) else {
            return;
        };
        let (slots, retries, order) = match bound {
            Bound::Hub => (
                self.engine.in_flight.shared(),
                t.table.hub.async_retries,
                r.order,
            ),
            Bound::Copies => match t.copy_slots.get(route) {
                Some(s) => (s.clone(), 0, Order::Parallel),
                None => return,
            },
        };
        let mut admitted = Vec::new();
        if order == Order::Parallel {
            admitted = self.admit_free(t, route, &slots, &list);
            if admitted.is_empty() {
                return;
            }
        }
        self.spawn_admitted(t, route, out, body, list, slots, retries, order, admitted);
    }

    /// A free slot of `slots` for each delivery of `list` that can have one now; the others
    /// are dropped and counted.
    fn admit_free(
        &self,
        t: &HubTable,
        route: usize,
        slots: &Arc<Semaphore>,
        list: &[usize],
    ) -> Vec<(usize, OwnedSemaphorePermit)> {
        let mut admitted = Vec::with_capacity(list.len());
        for &i in list {
            match slots.clone().try_acquire_owned() {
                Ok(p) => admitted.push((i, p)),
                Err(_) => count_dropped(&self.engine, t, route, i),
            }
        }
        admitted
    }

    /// `accept` + `async` (parallel) with `hub.async_wait_ms`: takes the request's slots (one
    /// per delivery) all at once, waiting up to `wait` for them when they are not free (the
    /// request's 204 waits with it), and spawns what was admitted. After the wait, a delivery
    /// with no free slot is dropped and counted. At most `max_in_flight` requests wait at once;
    /// beyond that one does not wait.
    async fn admit_then_spawn(
        &self,
        t: &Arc<HubTable>,
        route: usize,
        out: Outbound,
        body: Bytes,
        list: Vec<usize>,
        wait: Duration,
    ) {
        let slots = self.engine.in_flight.shared();
        let n = u32::try_from(list.len()).unwrap_or(u32::MAX);
        let waiting = &self.engine.metrics.async_waiting;
        // All of the request's slots at once: a request never holds some while it waits
        // for more (holding them idle could leave every slot parked and nothing in flight).
        // At most `max_in_flight` requests wait (each holds its body): beyond, no wait.
        let all = match slots.clone().try_acquire_many_owned(n) {
            Ok(p) => Some(p),
            Err(_) if usize::try_from(waiting.get()).unwrap_or(0) >= t.table.hub.max_in_flight => {
                None
            }
            Err(_) => {
                let _waiting = Waiting::new(waiting);
                tokio::time::timeout(wait, slots.clone().acquire_many_owned(n))
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
        };
        let admitted = match all {
            Some(mut all) => list
                .iter()
                .filter_map(|&i| all.split(1).map(|one| (i, one)))
                .collect(),
            // Waited long enough: what is free now goes out, the rest is dropped.
            None => self.admit_free(t, route, &slots, &list),
        };
        if admitted.is_empty() {
            return;
        }
        let retries = t.table.hub.async_retries;
        self.spawn_admitted(
            t,
            route,
            out,
            body,
            list,
            slots,
            retries,
            Order::Parallel,
            admitted,
        );
    }

    /// Spawns the background task of [`Hub::spawn_background`]: the `admitted` deliveries
    /// (parallel) or all of `list` (sequential, slots taken one by one inside).
    #[allow(clippy::too_many_arguments)]
    fn spawn_admitted(
        &self,
        t: &Arc<HubTable>,
        route: usize,
        out: Outbound,
        body: Bytes,
        list: Vec<usize>,
        slots: Arc<Semaphore>,
        retries: u32,
        order: Order,
        admitted: Vec<(usize, OwnedSemaphorePermit)>,
    ) {
        let engine = self.engine.clone();
        let t = t.clone();
        let busy = Busy::background(&engine);
        tokio::spawn(async move {
            let _busy = busy;
            let job = Job {
                engine: &engine,
                route_index: route,
                t: &t,
                out: &out,
                body: &body,
                slots: &slots,
                wait: false,
                retries,
            };
            let results = if admitted.is_empty() {
                job.deliver_all(order, &list).await
            } else {
                futures::future::join_all(admitted.into_iter().map(|(i, p)| job.deliver_held(i, p)))
                    .await
            };
            for (i, r) in results {
                if let Err(f) = r {
                    let id = t.table.upstream(i).map(|u| u.id.as_str()).unwrap_or("?");
                    log::debug!("background delivery to {id} failed: {f}");
                }
            }
        });
    }

    /// `respond: collect`: every target's and relay's response, verbatim, in one JSON answer.
    pub(crate) async fn collect(
        &self,
        session: &mut Downstream<'_>,
        ctx: &mut Ctx,
        t: &Arc<HubTable>,
        plan: &Plan,
        out: Outbound,
        body: Bytes,
    ) -> Result<()> {
        let route = &t.table.routes[plan.route];
        let list = all_upstreams(plan);
        let engine = &self.engine;
        let fetches = list.iter().map(|&i| {
            let out = &out;
            let body = &body;
            async move {
                let Some(up) = t.table.upstream(i) else {
                    return (i, Err(Failure::Broken("unknown upstream".into())));
                };
                let wait = up.timeout.min(route.timeout);
                let Some(_permit) = slot_within(engine.in_flight.semaphore(), wait).await else {
                    return (i, Err(Failure::InFlightFull));
                };
                let head = out.head(up);
                let req = Request::of(out, &head, body);
                let r = engine
                    .deliverer
                    .fetch(up.addr, req, wait, route.max_response_bytes)
                    .await;
                t.mark(i, !matches!(&r, Err(f) if f.unreachable()));
                (i, r)
            }
        });
        let results: Vec<(usize, std::result::Result<Fetched, Failure>)> =
            futures::future::join_all(fetches).await;
        let mut responses = Vec::with_capacity(results.len());
        for (i, r) in &results {
            let target = t.table.upstream(*i).map(|u| u.id.as_str()).unwrap_or("?");
            responses.push(match r {
                Ok(f) => {
                    if (200..300).contains(&f.status) {
                        ctx.delivered += 1;
                    } else {
                        ctx.failed += 1;
                    }
                    Collected {
                        target,
                        status: Some(f.status),
                        headers: f.headers.clone(),
                        body_b64: f.body.as_ref().map(|b| B64.encode(b)),
                        error: f.body.is_none().then(|| "response_too_large".to_string()),
                    }
                }
                Err(e) => {
                    ctx.failed += 1;
                    Collected {
                        target,
                        status: None,
                        headers: Vec::new(),
                        body_b64: None,
                        error: Some(format!("{}: {e}", e.reason())),
                    }
                }
            });
        }
        let body = CollectBody {
            request_id: plan.inbound.request_id.to_str().unwrap_or(""),
            route_version: &t.table.version,
            responses,
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        Self::respond(session, ctx, 200, Some(bytes)).await
    }
}
