//! Outcome relay (DESIGN §4): `POST /_hub/outcomes` from a provider, forwarded byte for byte and
//! unparsed to every outcome sink and to the hub just before this one on the path.

use bytes::Bytes;
use http::HeaderValue;
use multihub_filters::forward::wire_head;
use multihub_filters::outcome::{outcome_headers, predecessor, OutcomeHeaders, Predecessor};
use multihub_filters::{Headers, Reject};
use multihub_protocol::headers::{HUB_PATH, OUTCOMES_PATH, PROVIDER_ID, REQUEST_ID};
use pingora_error::Result;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::deliver::{retrying, Request};
use crate::hub::{Ctx, Downstream, Hub};
use crate::state::{Busy, Engine, HubTable};

/// Timeout of one outcome delivery attempt.
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(5);

/// One destination of an outcome: a sink or the predecessor hub.
struct Destination {
    /// Metric label: `sink<N>` or the peer id.
    label: String,
    addr: SocketAddr,
    /// The request head on the wire format.
    head: Vec<u8>,
}

fn outcome_head(
    h: &OutcomeHeaders,
    host: &HeaderValue,
    path: &str,
    content_type: Option<&[u8]>,
    len: usize,
) -> Vec<u8> {
    let mut fields: [(&str, &[u8]); 4] = [
        (REQUEST_ID, h.request_id.as_bytes()),
        (PROVIDER_ID, h.provider_id.as_bytes()),
        (HUB_PATH, h.path.as_bytes()),
        ("content-type", b""),
    ];
    let n = match content_type {
        Some(ct) => {
            fields[3].1 = ct;
            4
        }
        None => 3,
    };
    wire_head("POST", path, host.as_bytes(), &fields[..n], Some(len))
}

impl Hub {
    /// Validates, queues (bounded) and answers 202; delivery continues in the background.
    pub(crate) async fn relay_outcome(
        &self,
        session: &mut Downstream<'_>,
        ctx: &mut Ctx,
        t: &Arc<HubTable>,
    ) -> Result<()> {
        let req = session.raw;
        if session.method != http::Method::POST {
            return Self::reject(
                session,
                ctx,
                Reject::new(405, "method_not_allowed", "use POST on /_hub/outcomes"),
            )
            .await;
        }
        let h = match outcome_headers(req) {
            Ok(h) => h,
            Err(r) => {
                self.engine
                    .metrics
                    .outcomes
                    .with_label_values(&["rejected"])
                    .inc();
                return Self::reject(session, ctx, r).await;
            }
        };
        ctx.request_id = Some(h.request_id.clone());
        let content_type = req.first("content-type");
        let max = t.table.hub.max_body_bytes;
        let body = match Self::read_body(session, max).await {
            Ok(b) => b,
            Err(e) => {
                self.engine
                    .metrics
                    .outcomes
                    .with_label_values(&["rejected"])
                    .inc();
                return Self::reject(session, ctx, e.reject(max)).await;
            }
        };

        let mut dests = Vec::with_capacity(t.table.outcome_sinks.len() + 1);
        for (n, sink) in t.table.outcome_sinks.iter().enumerate() {
            let path = if sink.url.base_path.is_empty() {
                "/"
            } else {
                sink.url.base_path.as_str()
            };
            dests.push(Destination {
                label: format!("sink{n}"),
                addr: sink.addr,
                head: outcome_head(&h, &sink.host_header, path, content_type, body.len()),
            });
        }
        let path = h.path.to_str().unwrap_or("");
        match predecessor(path, &t.table.hub.id) {
            Predecessor::Hub(prev) => match t.table.peer_index.get(prev) {
                Some(&i) => {
                    if let Some(up) = t.table.upstream(i) {
                        let mut p =
                            String::with_capacity(up.url.base_path.len() + OUTCOMES_PATH.len());
                        p.push_str(&up.url.base_path);
                        p.push_str(OUTCOMES_PATH);
                        dests.push(Destination {
                            label: up.id.clone(),
                            addr: up.addr,
                            head: outcome_head(&h, &up.host_header, &p, content_type, body.len()),
                        });
                    }
                }
                None => self
                    .engine
                    .metrics
                    .outcomes
                    .with_label_values(&["unknown_predecessor"])
                    .inc(),
            },
            Predecessor::First => {}
            Predecessor::NotOnPath => self
                .engine
                .metrics
                .outcomes
                .with_label_values(&["not_on_path"])
                .inc(),
        }

        let Ok(permit) = self.engine.outcome_slots.shared().try_acquire_owned() else {
            self.engine
                .metrics
                .outcomes
                .with_label_values(&["queue_full"])
                .inc();
            let retry = [(
                http::header::RETRY_AFTER.as_str(),
                HeaderValue::from_static("1"),
            )];
            let r = Reject::new(
                503,
                "outcome_queue_full",
                "outcome relay queue is full; retry later",
            );
            return Self::respond_with(session, ctx, 503, Some(r.body()), &retry).await;
        };
        self.engine
            .metrics
            .outcomes
            .with_label_values(&["accepted"])
            .inc();
        let engine = self.engine.clone();
        let retries = t.table.hub.outcome_retries;
        let backoff = t.table.hub.retry_backoff;
        let busy = Busy::background(&engine);
        tokio::spawn(async move {
            let _busy = busy;
            futures::future::join_all(
                dests
                    .iter()
                    .map(|d| deliver_outcome(&engine, d, &body, retries, backoff)),
            )
            .await;
            drop(permit);
        });
        Self::respond(session, ctx, 202, None).await
    }
}

/// At least once, bounded: retries connect errors, timeouts and 5xx with doubling backoff.
async fn deliver_outcome(
    engine: &Engine,
    d: &Destination,
    body: &Bytes,
    retries: u32,
    backoff: Duration,
) {
    let req = Request {
        head: &d.head,
        body,
        head_only: false,
    };
    let mut attempts = 0;
    let r = retrying(retries, backoff, |attempt| {
        attempts = attempt + 1;
        engine.deliverer.deliver(d.addr, req, OUTCOME_TIMEOUT)
    })
    .await;
    match r {
        Ok(_) => engine
            .metrics
            .outcome_deliveries
            .with_label_values(&[&d.label, "ok"])
            .inc(),
        Err(f) => {
            engine
                .metrics
                .outcome_deliveries
                .with_label_values(&[&d.label, "failed"])
                .inc();
            log::warn!(
                "outcome delivery to {} dropped after {attempts} attempts: {f}",
                d.label
            );
        }
    }
}
