//! Prometheus metrics of the hub, registered once in a private registry and served on the
//! admin listener. Labels come only from config ids and small enums. Per-route and per-target
//! handles are resolved when a table loads, so the request path does no label lookup for them.

use prometheus::{
    exponential_buckets, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric family of the hub.
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub deliveries: IntCounterVec,
    pub delivery_duration: HistogramVec,
    pub deliveries_in_flight: IntGauge,
    pub deliveries_in_flight_bound: IntGauge,
    pub dropped: IntCounterVec,
    /// `dropped` per [`DropReason`], resolved once.
    dropped_by: [IntCounter; DropReason::ALL.len()],
    pub relays: IntCounterVec,
    pub relays_suppressed: IntCounterVec,
    pub reloads: IntCounterVec,
    pub active_info: IntGaugeVec,
    pub last_reload_success: Gauge,
    pub outcomes: IntCounterVec,
    pub outcome_deliveries: IntCounterVec,
    /// Pipelined batches written (one write each) and the deliveries they carried.
    pub pipeline_writes: IntCounter,
    pub pipelined_deliveries: IntCounter,
    /// `async` requests waiting for in-flight slots now (`hub.async_wait_ms`).
    pub async_waiting: IntGauge,
}

/// Why a delivery or copy was dropped (label values of `hub_deliveries_dropped_total`).
#[derive(Clone, Copy, Debug)]
pub enum DropReason {
    InFlightFull,
    RetriesExhausted,
    SequenceBroken,
    CopyTooLarge,
    Shutdown,
}

impl DropReason {
    const ALL: [DropReason; 5] = [
        DropReason::InFlightFull,
        DropReason::RetriesExhausted,
        DropReason::SequenceBroken,
        DropReason::CopyTooLarge,
        DropReason::Shutdown,
    ];

    /// The position in [`DropReason::ALL`].
    fn index(self) -> usize {
        match self {
            DropReason::InFlightFull => 0,
            DropReason::RetriesExhausted => 1,
            DropReason::SequenceBroken => 2,
            DropReason::CopyTooLarge => 3,
            DropReason::Shutdown => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::InFlightFull => "in_flight_full",
            DropReason::RetriesExhausted => "retries_exhausted",
            DropReason::SequenceBroken => "sequence_broken",
            DropReason::CopyTooLarge => "copy_too_large",
            DropReason::Shutdown => "shutdown",
        }
    }
}

/// Per-route handles, resolved at table load.
pub struct RouteMetrics {
    /// `hub_requests_total` by status class 1xx..5xx (index 0..5), plus index 5 for anything else.
    pub by_class: [IntCounter; 6],
    pub duration: Histogram,
}

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

impl RouteMetrics {
    pub fn observe(&self, status: u16, seconds: f64) {
        let i = match status {
            100..=599 => usize::from(status / 100 - 1),
            _ => 5,
        };
        self.by_class[i].inc();
        self.duration.observe(seconds);
    }
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<HistogramVec, prometheus::Error> {
    // 100 µs .. ~26 s.
    let buckets = exponential_buckets(0.0001, 2.0, 19)?;
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let r = Registry::new();
        let deliveries_in_flight = IntGauge::new(
            "hub_deliveries_in_flight",
            "Deliveries to upstreams in flight now.",
        )?;
        r.register(Box::new(deliveries_in_flight.clone()))?;
        let deliveries_in_flight_bound = IntGauge::new(
            "hub_deliveries_in_flight_bound",
            "Delivery slots that exist now: hub.max_in_flight, plus what a shrink at a reload \
             has yet to take back.",
        )?;
        r.register(Box::new(deliveries_in_flight_bound.clone()))?;
        let active_info = IntGaugeVec::new(
            Opts::new(
                "hub_routes_active_info",
                "The active routing-table version (value 1).",
            ),
            &["version"],
        )?;
        r.register(Box::new(active_info.clone()))?;
        let last_reload_success = Gauge::new(
            "hub_routes_last_reload_success_timestamp_seconds",
            "Unix time of the last successful table load.",
        )?;
        r.register(Box::new(last_reload_success.clone()))?;
        let pipeline_writes = IntCounter::new(
            "hub_pipeline_writes_total",
            "Batches of pipelined deliveries written to upstreams (one vectored write each).",
        )?;
        r.register(Box::new(pipeline_writes.clone()))?;
        let pipelined_deliveries = IntCounter::new(
            "hub_pipelined_deliveries_total",
            "Requests sent in pipelined batches, a request sent again after a closed \
             connection counted again (divided by hub_pipeline_writes_total: the mean batch).",
        )?;
        r.register(Box::new(pipelined_deliveries.clone()))?;
        let async_waiting = IntGauge::new(
            "hub_async_waiting",
            "Async requests waiting for in-flight slots now (hub.async_wait_ms; their 204 waits \
             with them).",
        )?;
        r.register(Box::new(async_waiting.clone()))?;
        let dropped = counter(
            &r,
            "hub_deliveries_dropped_total",
            "Deliveries given up or not attempted, by reason.",
            &["reason"],
        )?;
        Ok(Metrics {
            dropped_by: DropReason::ALL.map(|d| dropped.with_label_values(&[d.as_str()])),
            dropped,
            requests: counter(
                &r,
                "hub_requests_total",
                "Requests answered, by route, response mode and status class.",
                &["route", "respond", "code_class"],
            )?,
            request_duration: histogram(
                &r,
                "hub_request_duration_seconds",
                "Time from request head to the end of the answer.",
                &["route"],
            )?,
            deliveries: counter(
                &r,
                "hub_deliveries_total",
                "Deliveries to targets and relay peers, by result.",
                &["route", "target", "result"],
            )?,
            delivery_duration: histogram(
                &r,
                "hub_delivery_duration_seconds",
                "Duration of one delivery (all attempts).",
                &["target"],
            )?,
            relays: counter(
                &r,
                "hub_relays_total",
                "Relays to peer hubs, by result.",
                &["peer", "result"],
            )?,
            relays_suppressed: counter(
                &r,
                "hub_relays_suppressed_total",
                "Relays not sent (peer on the path, or no hops left).",
                &["reason"],
            )?,
            reloads: counter(
                &r,
                "hub_routes_reloads_total",
                "Routing-table loads, by result.",
                &["result"],
            )?,
            outcomes: counter(
                &r,
                "hub_outcomes_total",
                "Outcome relays received, by result.",
                &["result"],
            )?,
            outcome_deliveries: counter(
                &r,
                "hub_outcome_deliveries_total",
                "Outcome deliveries to sinks and predecessor hubs, by result.",
                &["sink", "result"],
            )?,
            deliveries_in_flight,
            deliveries_in_flight_bound,
            pipeline_writes,
            pipelined_deliveries,
            async_waiting,
            active_info,
            last_reload_success,
            registry: r,
        })
    }

    /// Handles for one route.
    pub fn route(&self, route: &str, respond: &str) -> RouteMetrics {
        RouteMetrics {
            by_class: CLASSES.map(|c| self.requests.with_label_values(&[route, respond, c])),
            duration: self.request_duration.with_label_values(&[route]),
        }
    }

    pub fn drop(&self, reason: DropReason) {
        if let Some(c) = self.dropped_by.get(reason.index()) {
            c.inc();
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_index_their_counters() {
        for (i, d) in DropReason::ALL.iter().enumerate() {
            assert_eq!(d.index(), i, "{}", d.as_str());
        }
    }
}
