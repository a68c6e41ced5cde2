//! Runtime state: the active table version (swapped whole through `ArcSwap`) with its Pingora
//! peers and passive health, and the process-wide delivery engine (pool, in-flight bound, counters).

use arc_swap::ArcSwap;
use multihub_filters::source::Loaded;
use multihub_filters::RoutingTable;
use pingora_core::upstreams::peer::HttpPeer;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;

use crate::deliver::Deliverer;

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
    /// Per upstream: milliseconds since `epoch` until which it is considered down.
    down_until: Vec<AtomicU64>,
    epoch: Instant,
    pub file: PathBuf,
    pub sha256: String,
    pub loaded_at: SystemTime,
}

impl HubTable {
    pub fn new(loaded: Loaded) -> Self {
        let table = loaded.table;
        let peers = table
            .upstreams
            .iter()
            .map(|u| {
                let mut p = HttpPeer::new(u.addr, false, String::new());
                p.options.connection_timeout = Some(u.timeout);
                p.options.idle_timeout = Some(Duration::from_secs(60));
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
        HubTable {
            table,
            peers,
            sink_peers,
            copy_slots,
            down_until,
            epoch: Instant::now(),
            file: loaded.file,
            sha256: loaded.sha256,
            loaded_at: SystemTime::now(),
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
            let v = if reachable {
                0
            } else {
                self.now_ms() + DOWN_FOR.as_millis() as u64
            };
            d.store(v, Ordering::Relaxed);
        }
    }
}

/// Counters kept by the engine (exported as metrics by the admin listener).
#[derive(Default)]
pub struct Stats {
    pub deliveries_ok: AtomicU64,
    pub deliveries_failed: AtomicU64,
    pub dropped_in_flight_full: AtomicU64,
    pub dropped_retries_exhausted: AtomicU64,
    pub dropped_skipped: AtomicU64,
    pub copies_skipped_body: AtomicU64,
    pub relays_suppressed_loop: AtomicU64,
    pub relays_suppressed_hops: AtomicU64,
    pub outcomes_accepted: AtomicU64,
    pub outcomes_rejected: AtomicU64,
    pub outcomes_queue_full: AtomicU64,
    pub outcomes_unknown_predecessor: AtomicU64,
    pub outcomes_not_on_path: AtomicU64,
    pub outcome_deliveries_ok: AtomicU64,
    pub outcome_deliveries_failed: AtomicU64,
}

impl Stats {
    pub fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Process-wide delivery machinery, shared by every table version.
pub struct Engine {
    pub deliverer: Deliverer,
    /// Bounds deliveries in flight (async, confirmed, collect and relays alike).
    pub in_flight: Arc<Semaphore>,
    /// Bounds outcome relays queued or in delivery.
    pub outcome_slots: Arc<Semaphore>,
    pub stats: Stats,
}

/// The table slot: loaded once per request with `load_full`, swapped whole on reload.
pub type Tables = Arc<ArcSwap<HubTable>>;
