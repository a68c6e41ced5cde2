//! Deliveries of one buffered request to several upstreams, bounded and counted.

use bytes::Bytes;
use multihub_filters::forward::Outbound;
use multihub_protocol::routes::Order;
use std::time::Duration;
use std::time::Instant;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::deliver::{result_index, retrying, Failure, Request};
use crate::metrics::DropReason;
use crate::state::{Engine, HubTable};

/// One delivery outcome: upstream index and result (a 2xx status on success).
pub type Outcome = (usize, std::result::Result<u16, Failure>);

/// A slot of `slots`, waiting at most `wait` for one to free up. A free slot is taken at once;
/// only waiting arms a timer.
pub async fn slot_within(slots: &Semaphore, wait: Duration) -> Option<SemaphorePermit<'_>> {
    match slots.try_acquire() {
        Ok(p) => Some(p),
        Err(_) => tokio::time::timeout(wait, slots.acquire()).await.ok()?.ok(),
    }
}

/// Counts a delivery of route `route` to upstream `i` that was not attempted because no slot
/// was free.
pub fn count_dropped(engine: &Engine, t: &HubTable, route: usize, i: usize) {
    engine.metrics.drop(DropReason::InFlightFull);
    t.count_delivery(&engine.metrics, route, i, Failure::InFlightFull.index());
}

/// One request's deliveries: everything but the upstream index.
pub struct Job<'a> {
    pub engine: &'a Engine,
    /// Index of the route in the table.
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
        let Some(up) = self.t.table.upstream(i) else {
            return (i, Err(Failure::Broken("unknown upstream".into())));
        };
        let permit = if self.wait {
            match slot_within(self.slots, up.timeout).await {
                Some(p) => p,
                None => return (i, Err(Failure::InFlightFull)),
            }
        } else {
            match self.slots.try_acquire() {
                Ok(p) => p,
                Err(_) => return self.dropped(i),
            }
        };
        self.deliver_held(i, permit).await
    }

    fn dropped(&self, i: usize) -> Outcome {
        count_dropped(self.engine, self.t, self.route_index, i);
        (i, Err(Failure::InFlightFull))
    }

    /// Delivers to upstream `i` under the slot `permit`, released when the delivery ends.
    pub async fn deliver_held<P>(&self, i: usize, permit: P) -> Outcome {
        let (engine, t) = (self.engine, self.t);
        let Some(up) = t.table.upstream(i) else {
            return (i, Err(Failure::Broken("unknown upstream".into())));
        };
        let head = Bytes::from(self.out.head(up));
        let req = Request::of(self.out, &head, self.body);
        let started = Instant::now();
        let result = retrying(self.retries, t.table.hub.retry_backoff, |_| async {
            let r = match up.pipeline {
                Some(p) => {
                    let body = self.body.clone();
                    let pipes = &engine.deliverer.pipes;
                    pipes
                        .deliver(up.addr, p, head.clone(), body, req.head_only, up.timeout)
                        .await
                }
                None => engine.deliverer.deliver(up.addr, req, up.timeout).await,
            };
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
        self.record(i, &result);
        (i, result)
    }

    /// `hub_deliveries_total` (and `hub_relays_total` for peers).
    fn record(&self, i: usize, r: &std::result::Result<u16, Failure>) {
        self.t
            .count_delivery(&self.engine.metrics, self.route_index, i, result_index(r));
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
                        self.record(i, &Err(Failure::Skipped));
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
