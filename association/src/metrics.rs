//! Prometheus metrics, registered once in a private registry; every handle is built at start-up
//! so the request path only increments. Labels come from config ids or small enums.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

use crate::config::Config;

/// Result label of `association_signals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalResult {
    Created,
    Duplicate,
    Conflict,
    UnknownProvider,
    UnknownKey,
    Malformed,
    BadSignature,
    BadOperation,
    TooLarge,
    Unavailable,
}

impl SignalResult {
    pub const ALL: [SignalResult; 10] = [
        SignalResult::Created,
        SignalResult::Duplicate,
        SignalResult::Conflict,
        SignalResult::UnknownProvider,
        SignalResult::UnknownKey,
        SignalResult::Malformed,
        SignalResult::BadSignature,
        SignalResult::BadOperation,
        SignalResult::TooLarge,
        SignalResult::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SignalResult::Created => "created",
            SignalResult::Duplicate => "duplicate",
            SignalResult::Conflict => "conflict",
            SignalResult::UnknownProvider => "unknown_provider",
            SignalResult::UnknownKey => "unknown_key",
            SignalResult::Malformed => "malformed",
            SignalResult::BadSignature => "bad_signature",
            SignalResult::BadOperation => "bad_operation",
            SignalResult::TooLarge => "too_large",
            SignalResult::Unavailable => "unavailable",
        }
    }
}

/// Endpoint label of `association_request_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Signals,
    Operations,
    Confirmations,
    Events,
    Other,
}

impl Endpoint {
    const ALL: [Endpoint; 5] = [
        Endpoint::Signals,
        Endpoint::Operations,
        Endpoint::Confirmations,
        Endpoint::Events,
        Endpoint::Other,
    ];
    fn as_str(self) -> &'static str {
        match self {
            Endpoint::Signals => "signals",
            Endpoint::Operations => "operations",
            Endpoint::Confirmations => "confirmations",
            Endpoint::Events => "events",
            Endpoint::Other => "other",
        }
    }
}

/// Every metric handle.
pub struct Metrics {
    registry: Registry,
    /// `[provider + 1 (0 = unknown)][stage (0 START, 1 COMPLETE, 2 unknown)][result]`.
    signals: Vec<[[IntCounter; SignalResult::ALL.len()]; 3]>,
    pub confirmations: IntCounter,
    requests: Vec<Histogram>,
    pub commit_seconds: Histogram,
    pub batch_size: Histogram,
    pub store_errors: IntCounter,
}

fn counter_array<const N: usize>(
    vec: &IntCounterVec,
    provider: &str,
    stage: &str,
) -> Result<[IntCounter; N], prometheus::Error> {
    let mut v = Vec::with_capacity(N);
    for r in SignalResult::ALL.iter().take(N) {
        v.push(vec.get_metric_with_label_values(&[provider, stage, r.as_str()])?);
    }
    v.try_into()
        .map_err(|_| prometheus::Error::Msg("label table size".into()))
}

impl Metrics {
    /// Registers every metric for the providers of `config`.
    pub fn new(config: &Config) -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let sig = IntCounterVec::new(
            Opts::new(
                "association_signals_total",
                "POST /signals answers by provider, stage and result",
            ),
            &["provider", "stage", "result"],
        )?;
        registry.register(Box::new(sig.clone()))?;
        let mut signals = Vec::with_capacity(config.providers.len() + 1);
        let names =
            std::iter::once("_unknown").chain(config.providers.iter().map(|p| p.id.as_str()));
        for p in names {
            signals.push([
                counter_array(&sig, p, "START")?,
                counter_array(&sig, p, "COMPLETE")?,
                counter_array(&sig, p, "_unknown")?,
            ]);
        }
        let confirmations = IntCounter::new(
            "association_confirmations_total",
            "Confirmation records written",
        )?;
        registry.register(Box::new(confirmations.clone()))?;
        let req = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "association_request_duration_seconds",
                "Time from request head to answer, by endpoint",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["endpoint"],
        )?;
        registry.register(Box::new(req.clone()))?;
        let mut requests = Vec::new();
        for e in Endpoint::ALL {
            requests.push(req.get_metric_with_label_values(&[e.as_str()])?);
        }
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "association_commit_duration_seconds",
                "Duration of one group commit (checks, writes, fsync)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
        )?;
        registry.register(Box::new(commit_seconds.clone()))?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("association_commit_batch_size", "Signals per group commit")
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
                ]),
        )?;
        registry.register(Box::new(batch_size.clone()))?;
        let store_errors = IntCounter::new(
            "association_store_errors_total",
            "Group commits that failed (their requests were answered 503)",
        )?;
        registry.register(Box::new(store_errors.clone()))?;
        Ok(Metrics {
            registry,
            signals,
            confirmations,
            requests,
            commit_seconds,
            batch_size,
            store_errors,
        })
    }

    /// Counts one `POST /signals` answer. `provider` is an index into the config's providers.
    pub fn signal(&self, provider: Option<usize>, stage: Option<usize>, result: SignalResult) {
        let p = provider.map_or(0, |i| i + 1);
        let s = stage.unwrap_or(2).min(2);
        let r = SignalResult::ALL
            .iter()
            .position(|x| *x == result)
            .unwrap_or(0);
        if let Some(c) = self.signals.get(p).map(|t| &t[s][r]) {
            c.inc();
        }
    }

    /// Observes one request's duration.
    pub fn request(&self, e: Endpoint, seconds: f64) {
        let i = Endpoint::ALL.iter().position(|x| *x == e).unwrap_or(0);
        if let Some(h) = self.requests.get(i) {
            h.observe(seconds);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}
