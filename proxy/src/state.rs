//! Runtime state: the active table version (swapped whole through `ArcSwap`) with its metric
//! handles and passive health, and the process-wide delivery engine (pool,
//! in-flight bounds, metrics, drain tracking).

use arc_swap::ArcSwap;
use multihub_filters::source::Loaded;
use multihub_filters::RoutingTable;
use prometheus::{Histogram, IntCounter};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;

use crate::deliver::{Deliverer, RESULTS};
use crate::metrics::{Metrics, RouteMetrics};
use crate::pipeline::Pipes;

/// How long an upstream that refused or timed out is skipped by `select: {"count": N}`.
const DOWN_FOR: Duration = Duration::from_secs(2);

/// One compiled table version plus what the proxy needs to use it. Immutable except health.
pub struct HubTable {
    pub table: RoutingTable,
    /// Per route: the bound on its `proxy` copies in flight.
    pub copy_slots: Vec<Arc<Semaphore>>,
    /// Per route: request metrics.
    pub route_metrics: Vec<RouteMetrics>,
    /// Requests answered before a route was known (404, 400, ...).
    pub unrouted_metrics: RouteMetrics,
    /// Per upstream: delivery duration.
    pub delivery_duration: Vec<Histogram>,
    /// Per route, per upstream, per result (`deliver::RESULTS`): `hub_deliveries_total`,
    /// `ok` resolved at load, the others on first use (no series for results never seen).
    deliveries: Vec<Vec<[OnceLock<IntCounter>; RESULTS.len()]>>,
    /// Per upstream: `hub_relays_total{result="ok"|"failed"}` (peers only), on first use.
    relays: Vec<[OnceLock<IntCounter>; 2]>,
    /// Per upstream: milliseconds since `epoch` until which it is considered down.
    down_until: Vec<AtomicU64>,
    epoch: Instant,
    pub file: PathBuf,
    pub sha256: String,
    pub loaded_at: SystemTime,
}

impl HubTable {
    pub fn new(loaded: Loaded, metrics: &Metrics) -> Self {
        let table = loaded.table;
        let down_until = table.upstreams.iter().map(|_| AtomicU64::new(0)).collect();
        let copy_slots = table
            .routes
            .iter()
            .map(|r| Arc::new(Semaphore::new(r.copy_max_in_flight)))
            .collect();
        let route_metrics = table
            .routes
            .iter()
            .map(|r| metrics.route(&r.id, respond_label(r.respond)))
            .collect();
        let delivery_duration = table
            .upstreams
            .iter()
            .map(|u| {
                metrics
                    .delivery_duration
                    .with_label_values(&[u.id.as_str()])
            })
            .collect();
        let deliveries = table
            .routes
            .iter()
            .map(|r| {
                table
                    .upstreams
                    .iter()
                    .map(|u| {
                        let c: [OnceLock<IntCounter>; RESULTS.len()] = Default::default();
                        let _ = c[0].set(metrics.deliveries.with_label_values(&[
                            r.id.as_str(),
                            u.id.as_str(),
                            RESULTS[0],
                        ]));
                        c
                    })
                    .collect()
            })
            .collect();
        let relays = table.upstreams.iter().map(|_| Default::default()).collect();
        HubTable {
            deliveries,
            relays,
            copy_slots,
            route_metrics,
            unrouted_metrics: metrics.route("", "none"),
            delivery_duration,
            down_until,
            epoch: Instant::now(),
            file: loaded.file,
            sha256: loaded.sha256,
            loaded_at: SystemTime::now(),
            table,
        }
    }

    /// Counts one delivery of route `route` to upstream `i` with result `result` (an index
    /// into `deliver::RESULTS`), and the relay result for peers.
    pub fn count_delivery(&self, metrics: &Metrics, route: usize, i: usize, result: usize) {
        let (Some(r), Some(up)) = (self.table.routes.get(route), self.table.upstream(i)) else {
            return;
        };
        if let Some(c) = self
            .deliveries
            .get(route)
            .and_then(|v| v.get(i))
            .and_then(|c| c.get(result))
        {
            c.get_or_init(|| {
                metrics.deliveries.with_label_values(&[
                    r.id.as_str(),
                    up.id.as_str(),
                    RESULTS[result],
                ])
            })
            .inc();
        }
        if up.kind == multihub_filters::UpstreamKind::Peer {
            let failed = usize::from(result != 0);
            if let Some(c) = self.relays.get(i).and_then(|c| c.get(failed)) {
                c.get_or_init(|| {
                    metrics
                        .relays
                        .with_label_values(&[up.id.as_str(), ["ok", "failed"][failed]])
                })
                .inc();
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Passive health: false for a short while after the upstream refused or timed out.
    pub fn healthy(&self, i: usize) -> bool {
        self.down_until
            .get(i)
            .is_none_or(|d| d.load(Ordering::Relaxed) <= self.now_ms())
    }

    pub fn mark(&self, i: usize, reachable: bool) {
        if let Some(d) = self.down_until.get(i) {
            if reachable {
                // The common case writes nothing (no shared cache line dirtied per delivery).
                if d.load(Ordering::Relaxed) != 0 {
                    d.store(0, Ordering::Relaxed);
                }
            } else {
                d.store(
                    self.now_ms() + DOWN_FOR.as_millis() as u64,
                    Ordering::Relaxed,
                );
            }
        }
    }
}

/// `respond` as a metric label.
pub fn respond_label(r: multihub_protocol::routes::Respond) -> &'static str {
    use multihub_protocol::routes::Respond;
    match r {
        Respond::Accept => "accept",
        Respond::Proxy => "proxy",
        Respond::Collect => "collect",
    }
}

/// The last reload attempt's error, shown on `/routes`.
#[derive(Default)]
pub struct ReloadStatus {
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
}

/// Largest `hub.max_in_flight` / `hub.outcome_queue` the hub accepts (the routing-table
/// validation refuses more).
pub const MAX_SLOTS: usize = multihub_filters::MAX_SLOTS;

/// A process-wide bound on work in flight whose size a routing-table reload can change.
/// Growing adds permits at once. Shrinking takes permits back one at a time as work in flight
/// returns them (queued fairly with waiting work), so work already admitted is never cut short
/// and the bound reaches its new size as that work ends.
pub struct Slots {
    sem: Arc<Semaphore>,
    /// The configured size.
    limit: AtomicUsize,
    /// Permits that exist: the configured size plus what a shrink has yet to take back.
    total: Arc<AtomicUsize>,
}

impl Slots {
    pub fn new(n: usize) -> Slots {
        let n = n.min(MAX_SLOTS);
        Slots {
            sem: Arc::new(Semaphore::new(n)),
            limit: AtomicUsize::new(n),
            total: Arc::new(AtomicUsize::new(n)),
        }
    }

    pub fn semaphore(&self) -> &Semaphore {
        &self.sem
    }

    /// The semaphore, for permits that outlive a borrow.
    pub fn shared(&self) -> Arc<Semaphore> {
        self.sem.clone()
    }

    /// The configured size.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::SeqCst)
    }

    /// Permits that exist now: the configured size plus what a shrink has yet to take back.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// Permits held by work now (during a shrink, plus at most the one permit being taken back).
    pub fn in_use(&self) -> usize {
        self.total
            .load(Ordering::SeqCst)
            .saturating_sub(self.sem.available_permits())
    }

    /// Changes the size to `n` (see the type). Needs a Tokio runtime when it shrinks.
    pub fn resize(&self, n: usize) {
        let n = n.min(MAX_SLOTS);
        let old = self.limit.swap(n, Ordering::SeqCst);
        if n > old {
            self.total.fetch_add(n - old, Ordering::SeqCst);
            self.sem.add_permits(n - old);
        } else if n < old {
            let (sem, total) = (self.sem.clone(), self.total.clone());
            tokio::spawn(async move {
                for _ in n..old {
                    let Ok(p) = sem.acquire().await else { return };
                    p.forget();
                    total.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
    }
}

/// Process-wide delivery machinery and lifecycle, shared by every table version.
pub struct Engine {
    pub deliverer: Deliverer,
    /// Bounds deliveries in flight (async, confirmed, collect and relays alike):
    /// `hub.max_in_flight`.
    pub in_flight: Slots,
    /// Bounds outcome relays queued or in delivery: `hub.outcome_queue`.
    pub outcome_slots: Slots,
    pub metrics: Metrics,
    /// Requests being handled now.
    pub active_requests: AtomicUsize,
    /// Background tasks (async deliveries, copies, outcome relays) running now.
    pub background: AtomicUsize,
    /// Set once a graceful shutdown started: `/readyz` answers 503.
    pub draining: AtomicBool,
    /// Whether the proxy listener is up (proved by the lifecycle's probe arriving here).
    pub listener: Arc<multihub_protocol::net::ListenerProbe>,
    pub reload: Mutex<ReloadStatus>,
}

impl Engine {
    pub fn new(metrics: Metrics, max_in_flight: usize, outcome_queue: usize) -> Engine {
        Engine {
            deliverer: Deliverer::new(
                1024,
                Pipes::new(
                    metrics.pipeline_writes.clone(),
                    metrics.pipelined_deliveries.clone(),
                ),
            ),
            in_flight: Slots::new(max_in_flight),
            outcome_slots: Slots::new(outcome_queue),
            metrics,
            active_requests: AtomicUsize::new(0),
            background: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            listener: Default::default(),
            reload: Mutex::new(ReloadStatus::default()),
        }
    }
}

/// Counts one unit of work in `counter` for as long as it lives.
pub struct Busy(Arc<Engine>, fn(&Engine) -> &AtomicUsize);

impl Busy {
    pub fn request(e: &Arc<Engine>) -> Busy {
        e.active_requests.fetch_add(1, Ordering::SeqCst);
        Busy(e.clone(), |e| &e.active_requests)
    }
    pub fn background(e: &Arc<Engine>) -> Busy {
        e.background.fetch_add(1, Ordering::SeqCst);
        Busy(e.clone(), |e| &e.background)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        (self.1)(&self.0).fetch_sub(1, Ordering::SeqCst);
    }
}

/// The table slot: loaded once per request with `load_full`, swapped whole on reload.
pub type Tables = Arc<ArcSwap<HubTable>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Lets the shrink task run until `slots` has `total` permits (bounded, so it can fail).
    async fn settle(slots: &Slots, total: usize) {
        for _ in 0..10_000 {
            if slots.total() == total {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("total stayed {}, expected {total}", slots.total());
    }

    #[tokio::test]
    async fn growing_applies_at_once_and_shrinking_waits_for_work_in_flight() {
        let s = Slots::new(2);
        let a = s
            .semaphore()
            .try_acquire()
            .unwrap_or_else(|e| panic!("{e}"));
        let b = s
            .semaphore()
            .try_acquire()
            .unwrap_or_else(|e| panic!("{e}"));
        s.resize(4);
        assert_eq!((s.limit(), s.total(), s.in_use()), (4, 4, 2));
        // Shrinking to 1 takes the two free slots back at once, then waits for work to end.
        s.resize(1);
        settle(&s, 2).await;
        assert_eq!((s.limit(), s.in_use()), (1, 2));
        assert!(
            s.semaphore().try_acquire().is_err(),
            "no slot beyond the work in flight"
        );
        drop(a);
        settle(&s, 1).await;
        assert_eq!(s.in_use(), 1);
        assert!(
            s.semaphore().try_acquire().is_err(),
            "the freed slot was taken back"
        );
        drop(b);
        assert_eq!((s.total(), s.in_use()), (1, 0));
        assert_eq!(s.semaphore().available_permits(), 1);
    }

    #[tokio::test]
    async fn any_order_of_resizes_ends_at_the_last_size() {
        let s = Slots::new(10);
        let held = s
            .semaphore()
            .try_acquire_many(10)
            .unwrap_or_else(|e| panic!("{e}"));
        s.resize(5);
        s.resize(12);
        s.resize(3);
        drop(held);
        settle(&s, 3).await;
        assert_eq!((s.limit(), s.in_use()), (3, 0));
        assert_eq!(s.semaphore().available_permits(), 3);
    }

    #[test]
    fn sizes_are_capped() {
        let s = Slots::new(usize::MAX);
        assert_eq!(s.limit(), MAX_SLOTS);
    }
}
