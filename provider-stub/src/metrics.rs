//! `provider_*` metrics in a private registry, served on the admin listener. Labels come only
//! from small fixed vocabularies.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

pub struct Metrics {
    registry: Registry,
    /// Ingest answers by outcome (`pass`, `block`, `escalate`, `replay`, `in_flight`,
    /// `mismatch`, `tampered`, `bad_request`, `too_large`, `overloaded`, `error`).
    pub requests: IntCounterVec,
    pub request_seconds: Histogram,
    pub commit_batch: Histogram,
    pub commit_seconds: Histogram,
    /// Outbox deliveries by kind (`signal`, `outcome`) and result (`ok`, `conflict`, `retry`).
    pub outbox: IntCounterVec,
    pub outbox_in_flight: IntGauge,
    /// Admin actions (`revoke`, `approve`, `deny`).
    pub admin: IntCounterVec,
}

fn buckets(v: &[f64]) -> Vec<f64> {
    v.to_vec()
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("provider_requests_total", "Ingest answers by outcome"),
            &["outcome"],
        )?;
        let request_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "provider_request_seconds",
                "Ingest request latency (body read to durable answer)",
            )
            .buckets(buckets(&[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ])),
        )?;
        let commit_batch = Histogram::with_opts(
            HistogramOpts::new("provider_commit_batch_ops", "Ops per group commit").buckets(
                buckets(&[
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                ]),
            ),
        )?;
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new("provider_commit_seconds", "Group commit duration").buckets(
                buckets(&[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5]),
            ),
        )?;
        let outbox = IntCounterVec::new(
            Opts::new(
                "provider_outbox_deliveries_total",
                "Outbox delivery attempts",
            ),
            &["kind", "result"],
        )?;
        let outbox_in_flight =
            IntGauge::new("provider_outbox_in_flight", "Outbox rows being delivered")?;
        let admin = IntCounterVec::new(
            Opts::new("provider_admin_actions_total", "Admin actions"),
            &["action"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_seconds.clone()))?;
        registry.register(Box::new(commit_batch.clone()))?;
        registry.register(Box::new(commit_seconds.clone()))?;
        registry.register(Box::new(outbox.clone()))?;
        registry.register(Box::new(outbox_in_flight.clone()))?;
        registry.register(Box::new(admin.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            request_seconds,
            commit_batch,
            commit_seconds,
            outbox,
            outbox_in_flight,
            admin,
        })
    }

    /// Text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
