//! The routing-table runtime model and its lowering from the file model.
//!
//! `compile` checks everything it can without touching the network and collects *every*
//! problem with its JSON path; a table that compiles is complete: matchers built, upstream
//! addresses resolved, every header value the hub stamps prebuilt.

use http::{HeaderName, HeaderValue, Method};
use multihub_protocol::headers::{OUTCOMES_PATH, RESERVED_PATH_PREFIX};
use multihub_protocol::ids::validate_hub_id;
use multihub_protocol::routes::{Delivery, Order, Respond, RoutesFile, Select};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use thiserror::Error;

use crate::url::{self, UpstreamUrl};

/// One problem in a routing table, located by its JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a routing table was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", join_problems(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// Every problem; an I/O error is one problem at the root.
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            ConfigError::Io { .. } => vec![Problem {
                path: "$".into(),
                message: self.to_string(),
            }],
            ConfigError::Invalid(p) => p.clone(),
        }
    }
}

fn join_problems(p: &[Problem]) -> String {
    let mut s = String::new();
    for (i, p) in p.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        s.push_str(&p.to_string());
    }
    s
}

/// Whether an upstream is a provider or a peer hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    Provider,
    Peer,
}

impl UpstreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamKind::Provider => "provider",
            UpstreamKind::Peer => "peer",
        }
    }
}

/// A provider or peer hub, resolved.
#[derive(Debug)]
pub struct Upstream {
    pub id: String,
    pub kind: UpstreamKind,
    pub url: UpstreamUrl,
    pub addr: SocketAddr,
    /// Prebuilt `Host` header value.
    pub host_header: HeaderValue,
    pub timeout: Duration,
    /// Pipelining of this upstream's deliveries (`None`: one request per connection at a time).
    pub pipeline: Option<Pipeline>,
}

/// Validated pipelining settings of one upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pipeline {
    /// Most requests in flight on one connection.
    pub depth: usize,
    /// Connections per upstream.
    pub connections: usize,
}

/// One outcome sink, resolved.
#[derive(Debug)]
pub struct Sink {
    pub url: UpstreamUrl,
    pub addr: SocketAddr,
    pub host_header: HeaderValue,
}

/// This hub's settings with prebuilt header values.
#[derive(Debug)]
pub struct HubSettings {
    pub id: String,
    pub id_header: HeaderValue,
    pub outcome_url_header: HeaderValue,
    pub max_hops: u32,
    pub max_body_bytes: u64,
    pub max_in_flight: usize,
    pub async_retries: u32,
    pub retry_backoff: Duration,
    /// `async_wait_ms`: an async request's wait for in-flight slots (zero: none).
    pub async_wait: Duration,
    pub outcome_queue: usize,
    pub outcome_retries: u32,
}

/// How targets are selected, compiled.
#[derive(Debug)]
pub enum Selection {
    All,
    Count(usize),
    Hash(HeaderName),
    RoundRobin(AtomicUsize),
}

/// One route, compiled.
#[derive(Debug)]
pub struct Route {
    pub id: String,
    pub id_header: HeaderValue,
    pub path_prefix: String,
    /// Empty: any method.
    pub methods: Vec<Method>,
    /// Lower case, without port.
    pub host: Option<String>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Indices into [`RoutingTable::upstreams`].
    pub targets: Vec<usize>,
    pub select: Selection,
    pub order: Order,
    /// Indices into [`RoutingTable::upstreams`] (peers).
    pub relay: Vec<usize>,
    pub respond: Respond,
    pub delivery: Delivery,
    /// `collect`: overall wait.
    pub timeout: Duration,
    /// `collect`: cap per captured response body.
    pub max_response_bytes: usize,
    /// `proxy`: copies in flight at once for this route.
    pub copy_max_in_flight: usize,
    /// `proxy`: largest body copied.
    pub copy_max_body_bytes: u64,
    /// The hub fields every copy this route sends carries unchanged, on the wire format
    /// ([`crate::forward::route_fields`]).
    pub hub_fields: Vec<u8>,
}

/// Largest accepted `hub.max_in_flight`, `hub.outcome_queue` and `copies.max_in_flight`
/// (each sizes a semaphore; far beyond what one process can hold open).
pub const MAX_SLOTS: usize = 1_000_000;
const SLOTS_RANGE: &str = "must be between 1 and 1000000";

/// One compiled, validated routing-table version. Immutable once built; swapped whole.
#[derive(Debug)]
pub struct RoutingTable {
    pub version: String,
    pub version_header: HeaderValue,
    pub hub: HubSettings,
    /// Providers then peers; routes refer to them by index.
    pub upstreams: Vec<Upstream>,
    pub outcome_sinks: Vec<Sink>,
    /// Routes sorted by descending `path_prefix` length (longest prefix wins), then file order.
    pub routes: Vec<Route>,
    /// Peer id → index into `upstreams`.
    pub peer_index: HashMap<String, usize>,
}

impl RoutingTable {
    /// The upstream with this index (indices come from this table, so they are in range).
    pub fn upstream(&self, i: usize) -> Option<&Upstream> {
        self.upstreams.get(i)
    }
}

struct Collector {
    problems: Vec<Problem>,
}

impl Collector {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }
}

fn header_value(c: &mut Collector, path: &str, v: &str) -> HeaderValue {
    match HeaderValue::from_str(v) {
        Ok(h) => h,
        Err(_) => {
            c.push(path, format!("{v:?} is not a valid header value"));
            HeaderValue::from_static("")
        }
    }
}

fn resolve(c: &mut Collector, path: &str, u: &UpstreamUrl) -> Option<SocketAddr> {
    match (u.host.as_str(), u.port).to_socket_addrs() {
        Ok(mut it) => match it.next() {
            Some(a) => Some(a),
            None => {
                c.push(path, format!("host {:?} resolves to no address", u.host));
                None
            }
        },
        Err(e) => {
            c.push(path, format!("cannot resolve host {:?}: {e}", u.host));
            None
        }
    }
}

fn upstream_url(
    c: &mut Collector,
    path: &str,
    raw: &str,
) -> Option<(UpstreamUrl, SocketAddr, HeaderValue)> {
    match url::parse(raw) {
        Ok(u) if u.tls => {
            c.push(
                path,
                format!(
                    "{raw:?}: https upstreams need a TLS-enabled build, which this release is not"
                ),
            );
            None
        }
        Ok(u) => {
            let addr = resolve(c, path, &u)?;
            let host = header_value(c, path, &u.authority());
            Some((u, addr, host))
        }
        Err(e) => {
            c.push(path, format!("bad URL {e}"));
            None
        }
    }
}

/// Parses routing-table bytes: structural errors (with their JSON path) or the file model.
pub fn parse(bytes: &[u8]) -> Result<RoutesFile, ConfigError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            "$".to_string()
        } else {
            format!("$.{path}")
        };
        ConfigError::Invalid(vec![Problem {
            path,
            message: e.into_inner().to_string(),
        }])
    })
}

/// Lowers a parsed file into a runtime table, collecting every problem.
pub fn compile(file: &RoutesFile) -> Result<RoutingTable, ConfigError> {
    let mut c = Collector {
        problems: Vec::new(),
    };

    if file.version.is_empty() {
        c.push("$.version", "must not be empty");
    } else if let Err(e) = validate_hub_id(&file.version) {
        c.push("$.version", format!("{:?} {e}", file.version));
    }
    let version_header = header_value(&mut c, "$.version", &file.version);

    // Hub.
    let h = &file.hub;
    if let Err(e) = validate_hub_id(&h.id) {
        c.push("$.hub.id", format!("{:?} {e}", h.id));
    }
    if h.max_hops == 0 {
        c.push("$.hub.max_hops", "must be at least 1");
    }
    if h.max_body_bytes == 0 {
        c.push("$.hub.max_body_bytes", "must be at least 1");
    }
    if h.max_in_flight == 0 || h.max_in_flight > MAX_SLOTS {
        c.push("$.hub.max_in_flight", SLOTS_RANGE);
    }
    if h.async_wait_ms > 600_000 {
        c.push("$.hub.async_wait_ms", "must be at most 600000");
    }
    if h.async_retries > 10 {
        c.push("$.hub.async_retries", "must be at most 10");
    }
    if h.outcome_retries > 20 {
        c.push("$.hub.outcome_retries", "must be at most 20");
    }
    if h.outcome_queue == 0 || h.outcome_queue > MAX_SLOTS {
        c.push("$.hub.outcome_queue", SLOTS_RANGE);
    }
    let outcome_url = match url::parse(&h.advertise) {
        Ok(u) => {
            let scheme = if u.tls { "https" } else { "http" };
            format!("{scheme}://{}{}{OUTCOMES_PATH}", u.authority(), u.base_path)
        }
        Err(e) => {
            c.push("$.hub.advertise", format!("bad URL {e}"));
            String::new()
        }
    };
    let hub = HubSettings {
        id: h.id.clone(),
        id_header: header_value(&mut c, "$.hub.id", &h.id),
        outcome_url_header: header_value(&mut c, "$.hub.advertise", &outcome_url),
        max_hops: h.max_hops,
        max_body_bytes: h.max_body_bytes,
        max_in_flight: h.max_in_flight,
        async_retries: h.async_retries,
        retry_backoff: Duration::from_millis(h.retry_backoff_ms),
        async_wait: Duration::from_millis(h.async_wait_ms),
        outcome_queue: h.outcome_queue,
        outcome_retries: h.outcome_retries,
    };

    // Upstreams: providers, then peers.
    let mut upstreams = Vec::new();
    let mut provider_index = BTreeMap::new();
    let mut peer_index = HashMap::new();
    for (kind, map, section) in [
        (UpstreamKind::Provider, &file.providers, "providers"),
        (UpstreamKind::Peer, &file.peers, "peers"),
    ] {
        for (id, u) in map {
            let path = format!("$.{section}.{id}");
            if let Err(e) = validate_hub_id(id) {
                c.push(&path, format!("id {id:?} {e}"));
            }
            if kind == UpstreamKind::Peer && *id == h.id {
                c.push(&path, "a peer must not have this hub's own id");
            }
            if u.timeout_ms == 0 || u.timeout_ms > 600_000 {
                c.push(format!("{path}.timeout_ms"), "must be 1..=600000");
            }
            let pipeline = u.pipeline.as_ref().map(|p| Pipeline {
                depth: p.depth,
                connections: p.connections,
            });
            if let Some(p) = &pipeline {
                if !(2..=256).contains(&p.depth) {
                    c.push(format!("{path}.pipeline.depth"), "must be 2..=256");
                }
                if !(1..=256).contains(&p.connections) {
                    c.push(format!("{path}.pipeline.connections"), "must be 1..=256");
                }
            }
            let Some((url, addr, host_header)) =
                upstream_url(&mut c, &format!("{path}.url"), &u.url)
            else {
                continue;
            };
            let idx = upstreams.len();
            upstreams.push(Upstream {
                id: id.clone(),
                kind,
                url,
                addr,
                host_header,
                timeout: Duration::from_millis(u.timeout_ms),
                pipeline,
            });
            match kind {
                UpstreamKind::Provider => {
                    provider_index.insert(id.as_str(), idx);
                }
                UpstreamKind::Peer => {
                    peer_index.insert(id.clone(), idx);
                }
            }
        }
    }
    for id in file.providers.keys() {
        if file.peers.contains_key(id) {
            c.push(format!("$.peers.{id}"), "id is also a provider id");
        }
    }

    let mut outcome_sinks = Vec::new();
    for (i, raw) in file.outcome_sinks.iter().enumerate() {
        if let Some((url, addr, host_header)) =
            upstream_url(&mut c, &format!("$.outcome_sinks[{i}]"), raw)
        {
            outcome_sinks.push(Sink {
                url,
                addr,
                host_header,
            });
        }
    }

    // Routes.
    let mut routes = Vec::new();
    let mut seen_ids = BTreeMap::new();
    for (ri, r) in file.routes.iter().enumerate() {
        let rp = format!("$.routes[{ri}]");
        if let Err(e) = validate_hub_id(&r.id) {
            c.push(format!("{rp}.id"), format!("{:?} {e}", r.id));
        }
        if let Some(prev) = seen_ids.insert(r.id.as_str(), ri) {
            c.push(
                format!("{rp}.id"),
                format!("duplicate route id {:?} (also routes[{prev}])", r.id),
            );
        }
        let m = &r.matcher;
        if !m.path_prefix.starts_with('/') {
            c.push(
                format!("{rp}.match.path_prefix"),
                format!("{:?} must start with /", m.path_prefix),
            );
        }
        if m.path_prefix.starts_with(RESERVED_PATH_PREFIX) || m.path_prefix == "/_hub" {
            c.push(
                format!("{rp}.match.path_prefix"),
                format!(
                    "{:?} is under the reserved prefix {RESERVED_PATH_PREFIX}",
                    m.path_prefix
                ),
            );
        }
        let mut methods = Vec::new();
        for (mi, name) in m.methods.iter().enumerate() {
            match Method::from_bytes(name.as_bytes()) {
                Ok(meth) if name.bytes().all(|b| b.is_ascii_uppercase()) => methods.push(meth),
                _ => c.push(
                    format!("{rp}.match.methods[{mi}]"),
                    format!("{name:?} is not an upper-case HTTP method"),
                ),
            }
        }
        let host = m.host.as_ref().map(|h| h.to_ascii_lowercase());
        let mut headers = Vec::new();
        for (name, value) in &m.header {
            let p = format!("{rp}.match.header.{name}");
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(n) => headers.push((n, header_value(&mut c, &p, value))),
                Err(_) => c.push(p, format!("{name:?} is not a valid header name")),
            }
        }

        if r.targets.is_empty() {
            c.push(format!("{rp}.targets"), "must name at least one provider");
        }
        let mut targets = Vec::new();
        for (ti, t) in r.targets.iter().enumerate() {
            match provider_index.get(t.as_str()) {
                Some(i) if targets.contains(i) => c.push(
                    format!("{rp}.targets[{ti}]"),
                    format!("provider {t:?} listed twice"),
                ),
                Some(i) => targets.push(*i),
                None if file.providers.contains_key(t) => {} // its URL problem is reported already
                None => c.push(
                    format!("{rp}.targets[{ti}]"),
                    format!("unknown provider {t:?}"),
                ),
            }
        }
        let mut relay = Vec::new();
        for (pi, p) in r.relay.iter().enumerate() {
            if *p == h.id {
                c.push(
                    format!("{rp}.relay[{pi}]"),
                    "a hub must not relay to itself",
                );
                continue;
            }
            match peer_index.get(p) {
                Some(i) if relay.contains(i) => c.push(
                    format!("{rp}.relay[{pi}]"),
                    format!("peer {p:?} listed twice"),
                ),
                Some(i) => relay.push(*i),
                None if file.peers.contains_key(p) => {}
                None => c.push(format!("{rp}.relay[{pi}]"), format!("unknown peer {p:?}")),
            }
        }
        let select = match &r.select {
            Select::All => Selection::All,
            Select::RoundRobin => Selection::RoundRobin(AtomicUsize::new(0)),
            Select::Count(n) => {
                if *n == 0 {
                    c.push(format!("{rp}.select.count"), "must be at least 1");
                } else if *n > r.targets.len() {
                    c.push(
                        format!("{rp}.select.count"),
                        format!("{n} is more than the {} targets", r.targets.len()),
                    );
                }
                Selection::Count(*n)
            }
            Select::Hash(name) => match HeaderName::from_bytes(name.as_bytes()) {
                Ok(n) => Selection::Hash(n),
                Err(_) => {
                    c.push(
                        format!("{rp}.select.hash"),
                        format!("{name:?} is not a valid header name"),
                    );
                    Selection::All
                }
            },
        };
        if r.timeout_ms == 0 || r.timeout_ms > 600_000 {
            c.push(format!("{rp}.timeout_ms"), "must be 1..=600000");
        }
        if r.max_response_bytes == 0 {
            c.push(format!("{rp}.max_response_bytes"), "must be at least 1");
        }
        if r.copies.max_in_flight == 0 || r.copies.max_in_flight > MAX_SLOTS {
            c.push(format!("{rp}.copies.max_in_flight"), SLOTS_RANGE);
        }
        routes.push(Route {
            id: r.id.clone(),
            id_header: header_value(&mut c, &format!("{rp}.id"), &r.id),
            path_prefix: m.path_prefix.clone(),
            methods,
            host,
            headers,
            targets,
            select,
            order: r.order,
            relay,
            respond: r.respond,
            delivery: r.delivery,
            timeout: Duration::from_millis(r.timeout_ms),
            max_response_bytes: usize::try_from(r.max_response_bytes).unwrap_or(usize::MAX),
            copy_max_in_flight: r.copies.max_in_flight,
            copy_max_body_bytes: r.copies.max_body_bytes.unwrap_or(h.max_body_bytes),
            hub_fields: Vec::new(),
        });
    }

    if !c.problems.is_empty() {
        return Err(ConfigError::Invalid(c.problems));
    }
    // Longest prefix first; stable sort keeps file order among equals.
    routes.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
    for r in &mut routes {
        r.hub_fields = crate::forward::route_fields(&hub, version_header.as_bytes(), r);
    }
    Ok(RoutingTable {
        version: file.version.clone(),
        version_header,
        hub,
        upstreams,
        outcome_sinks,
        routes,
        peer_index,
    })
}

/// Parses and compiles routing-table bytes.
pub fn load_bytes(bytes: &[u8]) -> Result<RoutingTable, ConfigError> {
    compile(&parse(bytes)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> String {
        r#"{
          "version": "v1",
          "hub": { "id": "hub-a", "advertise": "http://127.0.0.1:8080", "max_hops": 8 },
          "providers": {
            "provider-a": { "url": "http://127.0.0.1:9101" },
            "provider-b": { "url": "http://127.0.0.1:9102", "timeout_ms": 500 },
            "provider-c": { "url": "http://127.0.0.1:9103/base/" }
          },
          "peers": { "hub-b": { "url": "http://127.0.0.1:8081" } },
          "outcome_sinks": ["http://127.0.0.1:9200/outcomes"],
          "routes": [
            { "id": "payments", "match": { "path_prefix": "/v1/payments", "methods": ["POST"] },
              "targets": ["provider-a", "provider-b", "provider-c"], "relay": ["hub-b"] },
            { "id": "v1", "match": { "path_prefix": "/v1" }, "targets": ["provider-a"],
              "select": "round_robin", "delivery": "async" }
          ]
        }"#
        .to_string()
    }

    fn problems(doc: &str) -> Vec<String> {
        match load_bytes(doc.as_bytes()) {
            Ok(_) => vec![],
            Err(e) => e.problems().iter().map(|p| p.to_string()).collect(),
        }
    }

    /// Asserts that every problem of `want` is among `p`, word for word.
    fn has_all(p: &[String], want: &[&str]) {
        for e in want {
            assert!(p.iter().any(|x| x == e), "missing {e:?} in {p:#?}");
        }
    }

    #[test]
    fn sample_compiles() {
        let t = load_bytes(sample().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.version, "v1");
        assert_eq!(t.routes[0].id, "payments", "longest prefix first");
        assert_eq!(t.routes[0].targets.len(), 3);
        assert_eq!(
            t.hub.outcome_url_header,
            "http://127.0.0.1:8080/_hub/outcomes"
        );
        assert_eq!(t.upstreams[2].url.base_path, "/base");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let doc = sample()
            .replace(r#""max_hops": 8"#, r#""max_hops": 0"#)
            .replace(
                r#"["provider-a", "provider-b", "provider-c"]"#,
                r#"["provider-z"]"#,
            )
            .replace(r#""relay": ["hub-b"]"#, r#""relay": ["hub-q"]"#)
            .replace(r#""path_prefix": "/v1" }"#, r#""path_prefix": "/_hub/x" }"#)
            .replace("http://127.0.0.1:8081", "htp://x");
        let p = problems(&doc);
        let expect = [
            "$.hub.max_hops: must be at least 1",
            "$.routes[0].targets[0]: unknown provider \"provider-z\"",
            "$.routes[1].match.path_prefix",
            "$.peers.hub-b.url: bad URL",
        ];
        for e in expect {
            assert!(
                p.iter().any(|x| x.starts_with(e)),
                "missing {e:?} in {p:#?}"
            );
        }
        // hub-q is unknown; hub-b exists but has a bad URL and is reported there only.
        assert!(
            p.iter()
                .any(|x| x.starts_with("$.routes[0].relay[0]: unknown peer \"hub-q\"")),
            "{p:#?}"
        );
    }

    #[test]
    fn pipelining_is_per_upstream_and_bounded() {
        let t = load_bytes(sample().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            t.upstreams.iter().all(|u| u.pipeline.is_none()),
            "off unless asked"
        );
        let doc = sample()
            .replace(
                r#""timeout_ms": 500 }"#,
                r#""timeout_ms": 500, "pipeline": { "depth": 16 } }"#,
            )
            .replace(
                r#""url": "http://127.0.0.1:8081" }"#,
                r#""url": "http://127.0.0.1:8081", "pipeline": { "depth": 4, "connections": 2 } }"#,
            );
        let t = load_bytes(doc.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let by_id = |id: &str| {
            t.upstreams
                .iter()
                .find(|u| u.id == id)
                .and_then(|u| u.pipeline)
        };
        assert_eq!(
            by_id("provider-b"),
            Some(Pipeline {
                depth: 16,
                connections: 4
            })
        );
        assert_eq!(
            by_id("hub-b"),
            Some(Pipeline {
                depth: 4,
                connections: 2
            })
        );
        assert_eq!(by_id("provider-a"), None);
        let bad = sample().replace(
            r#""timeout_ms": 500 }"#,
            r#""timeout_ms": 500, "pipeline": { "depth": 1, "connections": 0 } }"#,
        );
        has_all(
            &problems(&bad),
            &[
                "$.providers.provider-b.pipeline.depth: must be 2..=256",
                "$.providers.provider-b.pipeline.connections: must be 1..=256",
            ],
        );
        let unknown = sample().replace(
            r#""timeout_ms": 500 }"#,
            r#""timeout_ms": 500, "pipeline": { "depth": 4, "window": 2 } }"#,
        );
        let p = problems(&unknown);
        assert!(
            p.iter()
                .any(|x| x.starts_with("$.providers.provider-b.pipeline")),
            "{p:#?}"
        );
    }

    #[test]
    fn bounds_that_size_semaphores_have_a_ceiling() {
        let doc = sample().replace(
            r#""max_hops": 8"#,
            r#""max_hops": 8, "max_in_flight": 1000001, "outcome_queue": 0, "async_wait_ms": 600001"#,
        );
        has_all(
            &problems(&doc),
            &[
                "$.hub.max_in_flight: must be between 1 and 1000000",
                "$.hub.outcome_queue: must be between 1 and 1000000",
                "$.hub.async_wait_ms: must be at most 600000",
            ],
        );
        let ok = sample().replace(
            r#""max_hops": 8"#,
            r#""max_hops": 8, "max_in_flight": 1000000"#,
        );
        assert!(problems(&ok).is_empty(), "{:#?}", problems(&ok));
    }

    #[test]
    fn structural_errors_carry_the_json_path() {
        let doc = sample().replace(r#""timeout_ms": 500"#, r#""timeout_ms": 500, "retries": 1"#);
        let p = problems(&doc);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("$.providers.provider-b.retries"), "{p:?}");
    }

    #[test]
    fn duplicate_ids_self_peer_count_and_empty_targets() {
        let doc = sample()
            .replace(r#""id": "v1""#, r#""id": "payments""#)
            .replace(r#""hub-b": { "url""#, r#""hub-a": { "url""#)
            .replace(
                r#""relay": ["hub-b"]"#,
                r#""relay": [], "select": {"count": 4}"#,
            )
            .replace(r#""targets": ["provider-a"],"#, r#""targets": [],"#);
        let p = problems(&doc);
        for e in [
            "$.routes[1].id: duplicate route id",
            "$.peers.hub-a: a peer must not have this hub's own id",
            "$.routes[0].select.count: 4 is more than the 3 targets",
            "$.routes[1].targets: must name at least one provider",
        ] {
            assert!(
                p.iter().any(|x| x.starts_with(e)),
                "missing {e:?} in {p:#?}"
            );
        }
    }
}
