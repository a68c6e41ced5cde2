//! Deliveries of one buffered request to several upstreams, bounded and counted.

use bytes::Bytes;
use multihub_filters::forward::Outbound;
use multihub_filters::{Upstream, UpstreamKind};
use multihub_protocol::routes::Order;
use std::time::Instant;
use tokio::sync::Semaphore;

use crate::deliver::{retrying, Failure, Request};
use crate::metrics::DropReason;
use crate::state::{Engine, HubTable};

/// One delivery outcome: upstream index and result (a 2xx status on success).
pub type Outcome = (usize, std::result::Result<u16, Failure>);

/// One request's deliveries: everything but the upstream index.
pub struct Job<'a> {
    pub engine: &'a Engine,
    /// Route id (metric label) and index.
    pub route: &'a str,
    pub route_index: usize,
    pub t: &'a HubTable,
    pub out: &'a Outbound,
    pub body: &'a Bytes,
    /// The in-flight bound these deliveries count against.
    pub slots: &'a Semaphore,
    /// Confirmed deliveries wait for a slot (up to the upstream's timeout); background ones
    /// never wait: no slot = dropped and counted.
    pub wait: bool,
    /// Extra attempts on retryable failures, with doubling backoff.
    pub retries: u32,
}

impl Job<'_> {
    /// Delivers to upstream `i` under the in-flight bound.
    pub async fn deliver_one(&self, i: usize) -> Outcome {
        let (engine, t) = (self.engine, self.t);
        let Some(up) = t.table.upstream(i) else {
            return (i, Err(Failure::Broken("unknown upstream".into())));
        };
        let permit = if self.wait {
            match pingora_timeout::timeout(up.timeout, self.slots.acquire()).await {
                Ok(Ok(p)) => p,
                _ => return (i, Err(Failure::InFlightFull)),
            }
        } else {
            match self.slots.try_acquire() {
                Ok(p) => p,
                Err(_) => {
                    engine.metrics.drop(DropReason::InFlightFull);
                    self.record(i, up, &Err(Failure::InFlightFull));
                    return (i, Err(Failure::InFlightFull));
                }
            }
        };
        let head = self.out.head(up);
        let req = Request {
            head: &head,
            body: self.body,
            head_only: self.out.method == http::Method::HEAD,
        };
        let started = Instant::now();
        let result = retrying(self.retries, t.table.hub.retry_backoff, |_| async {
            let r = engine.deliverer.deliver(up.addr, req, up.timeout).await;
            t.mark(i, !matches!(&r, Err(f) if f.unreachable()));
            r
        })
        .await;
        drop(permit);
        if let Some(h) = t.delivery_duration.get(i) {
            h.observe(started.elapsed().as_secs_f64());
        }
        if result.is_err() && self.retries > 0 {
            engine.metrics.drop(DropReason::RetriesExhausted);
        }
        self.record(i, up, &result);
        (i, result)
    }

    /// `hub_deliveries_total` (and `hub_relays_total` for peers).
    fn record(&self, i: usize, up: &Upstream, r: &std::result::Result<u16, Failure>) {
        let m = &self.engine.metrics;
        // The common case uses the handle resolved when the table was loaded.
        let ok = self
            .t
            .delivered_ok
            .get(self.route_index)
            .and_then(|v| v.get(i));
        match (r, ok) {
            (Ok(_), Some(c)) => c.inc(),
            _ => {
                let result = r.as_ref().map_or_else(Failure::reason, |_| "ok");
                m.deliveries
                    .with_label_values(&[self.route, up.id.as_str(), result])
                    .inc();
            }
        }
        if up.kind == UpstreamKind::Peer {
            m.relays
                .with_label_values(&[up.id.as_str(), if r.is_ok() { "ok" } else { "failed" }])
                .inc();
        }
    }

    /// Delivers to every upstream in `list` (targets, then relays), in parallel or in sequence.
    pub async fn deliver_all(&self, order: Order, list: &[usize]) -> Vec<Outcome> {
        match order {
            Order::Parallel => {
                futures::future::join_all(list.iter().map(|&i| self.deliver_one(i))).await
            }
            Order::Sequential => {
                let mut out = Vec::with_capacity(list.len());
                let mut broken = false;
                for &i in list {
                    if broken {
                        self.engine.metrics.drop(DropReason::SequenceBroken);
                        if let Some(up) = self.t.table.upstream(i) {
                            self.record(i, up, &Err(Failure::Skipped));
                        }
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
