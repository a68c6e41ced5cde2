//! Start-up readiness and graceful shutdown. Pingora stops accepting when SIGTERM (or SIGQUIT,
//! for an upgrade) arrives; this service then waits until every in-flight request and background
//! delivery is done, or the grace period is over, reports what was dropped, flushes the access
//! log and exits 0 — without sitting out the rest of Pingora's fixed grace sleep.

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use multihub_protocol::net::Probe;

use crate::access::AccessLog;
use crate::metrics::DropReason;
use crate::state::Engine;

/// How long the hub must be idle before a graceful shutdown exits early.
const QUIET: Duration = Duration::from_millis(500);

pub struct Lifecycle {
    pub engine: Arc<Engine>,
    pub listen: String,
    pub grace: Duration,
    pub access_log: Option<Arc<AccessLog>>,
}

#[async_trait]
impl BackgroundService for Lifecycle {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let e = &self.engine;
        let probe = multihub_protocol::net::listen_addr(&self.listen)
            .ok()
            .map(multihub_protocol::net::probe_addr);
        // Every 20 ms until the listener is up, then once a second for the access log.
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        // Another process's listener taking the probes: during an upgrade the old hub keeps
        // accepting for up to 5 s after the handover; longer than that is worth a warning.
        let mut foreign_since: Option<Instant> = None;
        let mut warned = false;
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {
                    if e.listener.is_ready() {
                        if let Some(l) = &self.access_log { l.flush(); }
                        continue;
                    }
                    let up = match probe {
                        Some(a) => e.listener.probe(a).await,
                        None => {
                            e.listener.set_ready();
                            Probe::Ours
                        }
                    };
                    let since = *foreign_since.get_or_insert_with(Instant::now);
                    if up != Probe::Foreign {
                        foreign_since = None;
                    } else if !warned && since.elapsed() >= Duration::from_secs(10) {
                        warned = true;
                        log::warn!(
                            "proxy listener {}: another process accepts connections there (the hub handing over in an upgrade, or one holding the address); not ready until this one does",
                            self.listen
                        );
                    }
                    if up == Probe::Ours {
                        log::info!("ready: proxy listener {} is up", self.listen);
                        tick = tokio::time::interval(Duration::from_secs(1));
                        // The first tick of an interval is immediate.
                        tick.tick().await;
                    }
                }
            }
        }
        e.draining.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + self.grace;
        log::info!(
            "graceful shutdown: not accepting; draining {} requests and {} background deliveries (grace {:?})",
            e.active_requests.load(Ordering::SeqCst),
            e.background.load(Ordering::SeqCst),
            self.grace
        );
        let mut quiet_since: Option<Instant> = None;
        loop {
            let (req, bg) = (
                e.active_requests.load(Ordering::SeqCst),
                e.background.load(Ordering::SeqCst),
            );
            if req == 0 && bg == 0 {
                // A connection accepted just before the listener closed is counted only once
                // its request head is parsed: require a short continuous quiet period.
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= QUIET {
                    log::info!("graceful shutdown: drained, nothing dropped");
                    break;
                }
            } else {
                quiet_since = None;
            }
            if Instant::now() >= deadline {
                for _ in 0..bg {
                    e.metrics.drop(DropReason::Shutdown);
                }
                log::warn!("graceful shutdown: grace period over; dropped {req} requests and {bg} background deliveries");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(l) = &self.access_log {
            l.flush();
        }
        std::process::exit(0);
    }
}
