//! The outbox worker: delivers committed outbox rows (START / COMPLETE signals to the
//! association, receipts to `x-hub-outcome-url`) at least once, with exponential backoff, until
//! a 2xx. A 409 (the association holds a different signal for the same stage) is final: logged,
//! counted and kept in the store as `conflict`. Rows are deleted once acknowledged, so whatever is
//! still pending after a restart is sent again (same bytes).

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

use crate::client::Client;
use crate::config::OutboxFile;
use crate::metrics::Metrics;
use crate::store::{Applied, Op, OutRow, OutboxFeed, Writer};

/// The worker; run as a Pingora background service.
pub struct Outbox {
    rx: tokio::sync::Mutex<mpsc::Receiver<OutRow>>,
    feed: OutboxFeed,
    writer: Writer,
    client: Arc<Client>,
    conf: OutboxFile,
    metrics: Arc<Metrics>,
    /// Row ids dispatched and not yet acknowledged in the store (skipped by rescans).
    known: Arc<Mutex<HashSet<i64>>>,
}

/// Creates the feed the writer pushes into and the worker that drains it. The feed starts with
/// `overflow` raised so the worker first picks up rows left pending by an earlier run.
pub fn channel(queue: usize) -> (OutboxFeed, mpsc::Receiver<OutRow>) {
    let (tx, rx) = mpsc::channel(queue);
    let feed = OutboxFeed {
        tx,
        overflow: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        wake: Arc::new(tokio::sync::Notify::new()),
    };
    (feed, rx)
}

impl Outbox {
    pub fn new(
        rx: mpsc::Receiver<OutRow>,
        feed: OutboxFeed,
        writer: Writer,
        conf: OutboxFile,
        metrics: Arc<Metrics>,
    ) -> Outbox {
        Outbox {
            rx: tokio::sync::Mutex::new(rx),
            feed,
            writer,
            client: Arc::new(Client::new(conf.concurrency.max(16))),
            conf,
            metrics,
            known: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    fn is_known(&self, id: i64) -> bool {
        self.known.lock().map(|k| k.contains(&id)).unwrap_or(false)
    }

    async fn run(&self, mut shutdown: ShutdownWatch) {
        let sem = Arc::new(Semaphore::new(self.conf.concurrency));
        let (ack_tx, ack_rx) = mpsc::channel::<(i64, bool)>(self.conf.queue);
        tokio::spawn(acker(
            ack_rx,
            self.writer.clone(),
            self.known.clone(),
            self.feed.clone(),
        ));
        let mut rx = self.rx.lock().await;
        loop {
            // Rescan the store when rows could not be queued (or at start).
            if self.feed.overflow.swap(false, Ordering::SeqCst) {
                self.rescan(&sem, &ack_tx).await;
            }
            let row = tokio::select! {
                r = rx.recv() => r,
                _ = self.feed.wake.notified() => continue,
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(self.conf.max_backoff_ms)) => continue,
            };
            let Some(row) = row else { return };
            if let Ok(mut k) = self.known.lock() {
                if !k.insert(row.id) {
                    continue;
                }
            }
            self.dispatch(row, &sem, &ack_tx).await;
        }
    }

    async fn rescan(&self, sem: &Arc<Semaphore>, ack: &mpsc::Sender<(i64, bool)>) {
        let mut after = 0i64;
        loop {
            let rows = match self
                .writer
                .run(Op::PendingOutbox { after, limit: 512 })
                .await
            {
                Ok(Applied::Pending(rows)) => rows,
                Ok(_) => return,
                Err(e) => {
                    log::warn!("outbox rescan failed: {e}");
                    self.feed.overflow.store(true, Ordering::SeqCst);
                    return;
                }
            };
            let Some(last) = rows.last().map(|r| r.id) else {
                return;
            };
            after = last;
            for row in rows {
                if self.is_known(row.id) {
                    continue;
                }
                if let Ok(mut k) = self.known.lock() {
                    k.insert(row.id);
                }
                self.dispatch(row, sem, ack).await;
            }
        }
    }

    async fn dispatch(&self, row: OutRow, sem: &Arc<Semaphore>, ack: &mpsc::Sender<(i64, bool)>) {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            return;
        };
        let client = self.client.clone();
        let metrics = self.metrics.clone();
        let ack = ack.clone();
        let timeout = Duration::from_millis(self.conf.timeout_ms);
        let (initial, max) = (self.conf.initial_backoff_ms, self.conf.max_backoff_ms);
        metrics.outbox_in_flight.inc();
        tokio::spawn(async move {
            let mut backoff = initial;
            loop {
                match client
                    .post(&row.url, &row.headers, &row.body, timeout)
                    .await
                {
                    Ok(s) if (200..300).contains(&s) => {
                        metrics.outbox.with_label_values(&[row.kind, "ok"]).inc();
                        let _ = ack.send((row.id, false)).await;
                        break;
                    }
                    Ok(409) => {
                        log::warn!(
                            "outbox row {} to {}: 409 conflict, not retried",
                            row.id,
                            row.url
                        );
                        metrics
                            .outbox
                            .with_label_values(&[row.kind, "conflict"])
                            .inc();
                        let _ = ack.send((row.id, true)).await;
                        break;
                    }
                    other => {
                        log::debug!("outbox row {} to {}: {other:?}, retrying", row.id, row.url);
                        metrics.outbox.with_label_values(&[row.kind, "retry"]).inc();
                        tokio::time::sleep(Duration::from_millis(backoff)).await;
                        backoff = (backoff.saturating_mul(2)).min(max);
                    }
                }
            }
            metrics.outbox_in_flight.dec();
            drop(permit);
        });
    }
}

/// Batches acknowledgements into store writes; ids leave `known` once the write is durable.
/// When the write fails the rows stay pending in the store: they leave `known` and a rescan is
/// requested, so they are sent again (identical bytes).
async fn acker(
    mut rx: mpsc::Receiver<(i64, bool)>,
    writer: Writer,
    known: Arc<Mutex<HashSet<i64>>>,
    feed: OutboxFeed,
) {
    let mut buf = Vec::new();
    while rx.recv_many(&mut buf, 4096).await > 0 {
        let ids: Vec<(i64, bool)> = std::mem::take(&mut buf);
        let res = writer.run(Op::OutboxAck(ids.clone())).await;
        if let Err(e) = &res {
            log::warn!("outbox ack not stored ({e}); rows will be sent again");
            feed.overflow.store(true, Ordering::SeqCst);
            feed.wake.notify_one();
        }
        if let Ok(mut k) = known.lock() {
            for (id, _) in &ids {
                k.remove(id);
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Outbox {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.run(shutdown).await;
    }
}
