//! Routing-table file model (DESIGN §2): what an operator writes, parsed strictly.
//!
//! This is only the *shape* of the file. `multihub-filters` lowers it into the validated,
//! compiled runtime table and reports every semantic problem with its JSON path.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One routing-table version.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    /// Version label, e.g. `2026-11-21.1`; stamped on every answer as `x-hub-route-version`.
    pub version: String,
    pub hub: HubFile,
    #[serde(default)]
    pub providers: BTreeMap<String, UpstreamFile>,
    #[serde(default)]
    pub peers: BTreeMap<String, UpstreamFile>,
    /// URLs that receive relayed provider outcomes (DESIGN §4).
    #[serde(default)]
    pub outcome_sinks: Vec<String>,
    pub routes: Vec<RouteFile>,
}

/// This hub's identity and limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HubFile {
    pub id: String,
    /// Base URL providers use to reach this hub (`x-hub-outcome-url` = advertise + `/_hub/outcomes`).
    pub advertise: String,
    #[serde(default = "default_max_hops")]
    pub max_hops: u32,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Upper bound on deliveries in flight at once across all routes (async, confirmed, copies).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Retries of one async delivery after a connect error, timeout or 5xx (0 = one attempt).
    #[serde(default = "default_async_retries")]
    pub async_retries: u32,
    /// How long an `async` request waits for in-flight slots when `max_in_flight` is reached
    /// before its deliveries are dropped (0 = drop at once). A wait delays that request's 204:
    /// back-pressure on requesters instead of loss when the providers fall behind.
    #[serde(default)]
    pub async_wait_ms: u64,
    /// First retry delay; doubles per attempt.
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Outcome relays queued or in delivery at once; beyond it `/_hub/outcomes` answers 503.
    #[serde(default = "default_outcome_queue")]
    pub outcome_queue: usize,
    /// Retries of one outcome delivery (at least once, bounded).
    #[serde(default = "default_outcome_retries")]
    pub outcome_retries: u32,
}

fn default_max_hops() -> u32 {
    8
}
fn default_max_body_bytes() -> u64 {
    1024 * 1024
}
fn default_max_in_flight() -> usize {
    4096
}
fn default_async_retries() -> u32 {
    2
}
fn default_retry_backoff_ms() -> u64 {
    50
}
fn default_timeout_ms() -> u64 {
    2000
}
fn default_outcome_queue() -> usize {
    1024
}
fn default_outcome_retries() -> u32 {
    5
}
fn default_route_timeout_ms() -> u64 {
    5000
}
fn default_max_response_bytes() -> u64 {
    1024 * 1024
}
fn default_copy_max_in_flight() -> usize {
    256
}

/// A provider or a peer hub.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// `http://host:port[/base-path]`; the request path is appended to the base path.
    pub url: String,
    /// Whole-delivery timeout: connect, send, and the complete response.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Opt-in HTTP/1.1 pipelining of the deliveries that wait for no streamed answer (`accept`
    /// routes, `proxy` copies): several requests per write on a few connections. Only for
    /// upstreams that answer pipelined requests in order (RFC 9112 §9.3.2).
    #[serde(default)]
    pub pipeline: Option<PipelineFile>,
}

/// How an upstream's deliveries are pipelined.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Most requests sent on one connection before their responses are read (2..=256).
    pub depth: usize,
    /// Connections carrying them (1..=256).
    #[serde(default = "default_pipeline_connections")]
    pub connections: usize,
}

fn default_pipeline_connections() -> usize {
    4
}

/// One route.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub id: String,
    #[serde(rename = "match")]
    pub matcher: MatchFile,
    pub targets: Vec<String>,
    #[serde(default)]
    pub select: Select,
    #[serde(default)]
    pub order: Order,
    #[serde(default)]
    pub relay: Vec<String>,
    #[serde(default)]
    pub respond: Respond,
    #[serde(default)]
    pub delivery: Delivery,
    /// `collect`: how long to wait for every target.
    #[serde(default = "default_route_timeout_ms")]
    pub timeout_ms: u64,
    /// `collect`: cap on each captured response body.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// `proxy`: bounds on the copies sent to the other targets and relays.
    #[serde(default)]
    pub copies: CopiesFile,
}

/// Bounds on `proxy` copies.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CopiesFile {
    /// Copies of this route in flight at once; beyond it a copy is skipped and counted.
    #[serde(default = "default_copy_max_in_flight")]
    pub max_in_flight: usize,
    /// Largest body copied; larger bodies go to the primary only (skipped copies are counted).
    /// Absent: the hub's `max_body_bytes`.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
}

impl Default for CopiesFile {
    fn default() -> Self {
        CopiesFile {
            max_in_flight: default_copy_max_in_flight(),
            max_body_bytes: None,
        }
    }
}

/// What a request must look like to take a route.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MatchFile {
    pub path_prefix: String,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub host: Option<String>,
    /// Header name → exact value; all must be equal.
    #[serde(default)]
    pub header: BTreeMap<String, String>,
}

/// Which of a route's targets get the request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Select {
    /// Every target.
    #[default]
    All,
    /// The first N healthy targets in listed order.
    Count(usize),
    /// One target, stable per value of this header.
    Hash(String),
    /// One target, rotating.
    RoundRobin,
}

/// How deliveries to several targets are ordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    #[default]
    Parallel,
    /// The next target only after the previous one acknowledged with 2xx.
    Sequential,
}

/// How the requester is answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Respond {
    /// 204 with request id and route version; the hub disengages.
    #[default]
    Accept,
    /// The first selected target's response streams back; others get copies.
    Proxy,
    /// 200 JSON with every target's response.
    Collect,
}

/// When an `accept` answer is given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Answer 204 only after every target (and relay) acknowledged with 2xx, else 502.
    #[default]
    Confirmed,
    /// Answer 204 at once and deliver in the background.
    Async,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_forms_parse() {
        let all: Select = serde_json::from_str(r#""all""#).unwrap_or(Select::Count(0));
        assert_eq!(all, Select::All);
        let rr: Select = serde_json::from_str(r#""round_robin""#).unwrap_or(Select::All);
        assert_eq!(rr, Select::RoundRobin);
        let c: Select = serde_json::from_str(r#"{"count":2}"#).unwrap_or(Select::All);
        assert_eq!(c, Select::Count(2));
        let h: Select = serde_json::from_str(r#"{"hash":"x-tenant"}"#).unwrap_or(Select::All);
        assert_eq!(h, Select::Hash("x-tenant".into()));
        assert!(serde_json::from_str::<Select>(r#""some""#).is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let doc =
            r#"{"version":"v","hub":{"id":"h","advertise":"http://a","bogus":1},"routes":[]}"#;
        let err = serde_json::from_str::<RoutesFile>(doc)
            .err()
            .map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("bogus"));
    }
}
