//! Runtime state: the active table version (swapped whole through `ArcSwap`) with its Pingora
//! peers, metric handles and passive health, and the process-wide delivery engine (pool,
//! in-flight bounds, metrics, drain tracking).

use arc_swap::ArcSwap;
use multihub_filters::source::Loaded;
use multihub_filters::{RoutingTable, Upstream};
use pingora_core::upstreams::peer::HttpPeer;
use prometheus::{Histogram, IntCounter};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;

use crate::deliver::{Deliverer, IDLE_TIMEOUT};
use crate::metrics::{Metrics, RouteMetrics};

/// How long an upstream that refused or timed out is skipped by `select: {"count": N}`.
const DOWN_FOR: Duration = Duration::from_secs(2);

/// One compiled table version plus what the proxy needs to use it. Immutable except health.
pub struct HubTable {
    pub table: RoutingTable,
    /// One Pingora peer per upstream index of `table`.
    pub peers: Vec<HttpPeer>,
    /// One Pingora peer per outcome sink.
    pub sink_peers: Vec<HttpPeer>,
    /// Per route: the bound on its `proxy` copies in flight.
    pub copy_slots: Vec<Semaphore>,
    /// Per route: request metrics.
    pub route_metrics: Vec<RouteMetrics>,
    /// Requests answered before a route was known (404, 400, ...).
    pub unrouted_metrics: RouteMetrics,
    /// Per upstream: delivery duration.
    pub delivery_duration: Vec<Histogram>,
    /// Per route, per upstream: `hub_deliveries_total{result="ok"}`.
    pub delivered_ok: Vec<Vec<IntCounter>>,
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
        let peers = table
            .upstreams
            .iter()
            .map(|u| {
                let mut p = HttpPeer::new(u.addr, false, String::new());
                p.options.connection_timeout = Some(u.timeout);
                p.options.idle_timeout = Some(IDLE_TIMEOUT);
                p
            })
            .collect();
        let down_until = table.upstreams.iter().map(|_| AtomicU64::new(0)).collect();
        let sink_peers = table
            .outcome_sinks
            .iter()
            .map(|s| HttpPeer::new(s.addr, false, String::new()))
            .collect();
        let copy_slots = table
            .routes
            .iter()
            .map(|r| Semaphore::new(r.copy_max_in_flight))
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
        let delivered_ok = table
            .routes
            .iter()
            .map(|r| {
                table
                    .upstreams
                    .iter()
                    .map(|u| {
                        metrics
                            .deliveries
                            .with_label_values(&[r.id.as_str(), u.id.as_str(), "ok"])
                    })
                    .collect()
            })
            .collect();
        HubTable {
            delivered_ok,
            peers,
            sink_peers,
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

    /// Upstream `i` of the table with its Pingora peer.
    pub fn target(&self, i: usize) -> Option<(&Upstream, &HttpPeer)> {
        Some((self.table.upstream(i)?, self.peers.get(i)?))
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
            let v = if reachable {
                0
            } else {
                self.now_ms() + DOWN_FOR.as_millis() as u64
            };
            d.store(v, Ordering::Relaxed);
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

/// Process-wide delivery machinery and lifecycle, shared by every table version.
pub struct Engine {
    pub deliverer: Deliverer,
    /// Bounds deliveries in flight (async, confirmed, collect and relays alike).
    pub in_flight: Arc<Semaphore>,
    pub max_in_flight: usize,
    /// Bounds outcome relays queued or in delivery.
    pub outcome_slots: Arc<Semaphore>,
    pub metrics: Metrics,
    /// Requests being handled now.
    pub active_requests: AtomicUsize,
    /// Background tasks (async deliveries, copies, outcome relays) running now.
    pub background: AtomicUsize,
    /// Set once a graceful shutdown started: `/readyz` answers 503.
    pub draining: AtomicBool,
    /// Set once the proxy listener accepted a connection probe.
    pub listening: AtomicBool,
    pub reload: Mutex<ReloadStatus>,
}

impl Engine {
    pub fn new(metrics: Metrics, max_in_flight: usize, outcome_queue: usize) -> Engine {
        Engine {
            deliverer: Deliverer::new(1024),
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            outcome_slots: Arc::new(Semaphore::new(outcome_queue)),
            metrics,
            active_requests: AtomicUsize::new(0),
            background: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            listening: AtomicBool::new(false),
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
