//! Pingora glue: the ingest and admin listeners (`ServeHttp` apps), the outbox background
//! service, and start-up (key, store, writer thread).

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::Response;
use multihub_protocol::net::{ListenerProbe, Probed, ProveUp};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server};
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;
use std::sync::Arc;

use crate::config::Config;
use crate::error::{ApiError, ProviderError};
use crate::keys;
use crate::metrics::Metrics;
use crate::outbox::{self, Outbox};
use crate::service::{Provider, Reply};
use crate::store::{spawn_writer, SqliteStore};

fn to_response(r: Reply) -> Response<Vec<u8>> {
    let mut b = Response::builder()
        .status(r.status)
        .header("content-type", "application/json")
        .header("content-length", r.body.len());
    for (k, v) in &r.headers {
        b = b.header(*k, v.as_str());
    }
    b.body(r.body).unwrap_or_else(|_| {
        let mut resp = Response::new(Vec::new());
        *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        resp
    })
}

/// Reads the request body up to `max` bytes; `Err` is the refusal to answer.
async fn read_body(s: &mut ServerSession, max: usize) -> Result<Bytes, ApiError> {
    let declared = s
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_large = || {
        ApiError::new(
            413,
            "body_too_large",
            format!("body: larger than max_body_bytes ({max})"),
        )
    };
    if declared.is_some_and(|n| n > max) {
        s.set_keepalive(None);
        return Err(too_large());
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(1024));
    loop {
        match s.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > max {
                    s.set_keepalive(None);
                    return Err(too_large());
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(e) => {
                s.set_keepalive(None);
                return Err(ApiError::new(400, "bad_body", format!("body: {e}")));
            }
        }
    }
}

/// The ingest listener: `POST` on any path.
pub struct IngestApp {
    pub provider: Arc<Provider>,
}

#[async_trait]
impl ServeHttp for IngestApp {
    async fn response(&self, s: &mut ServerSession) -> Response<Vec<u8>> {
        // A hub may pipeline its deliveries (an upstream's `pipeline` in its table): answer
        // them in order on the connection instead of closing it at the second request.
        s.set_pipelining_enabled(true);
        if s.req_header().method != http::Method::POST {
            s.set_keepalive(None);
            return to_response(
                ApiError::new(405, "method_not_allowed", "method: only POST is accepted").into(),
            );
        }
        let body = match read_body(s, self.provider.max_body).await {
            Ok(b) => b,
            Err(e) => {
                self.provider
                    .metrics
                    .requests
                    .with_label_values(&[if e.status == 413 {
                        "too_large"
                    } else {
                        "bad_request"
                    }])
                    .inc();
                return to_response(e.into());
            }
        };
        to_response(self.provider.ingest(&s.req_header().headers, &body).await)
    }
}

/// The admin listener.
pub struct AdminApp {
    pub provider: Arc<Provider>,
    /// Whether the ingest listener is proved up (`/readyz`).
    pub ingest: Arc<ListenerProbe>,
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, s: &mut ServerSession) -> Response<Vec<u8>> {
        let method = s.req_header().method.clone();
        let path = s.req_header().uri.path().to_string();
        let body = match read_body(s, 65536).await {
            Ok(b) => b,
            Err(e) => return to_response(e.into()),
        };
        let p = &self.provider;
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let r = match (method.as_str(), segs.as_slice()) {
            ("GET", ["metrics"]) => {
                let body = p.metrics.render();
                return Response::builder()
                    .status(200)
                    .header("content-type", "text/plain; version=0.0.4")
                    .header("content-length", body.len())
                    .body(body)
                    .unwrap_or_default();
            }
            ("GET", ["healthz"]) => Reply::json(200, br#"{"status":"ok"}"#.to_vec()),
            ("GET", ["readyz"]) => {
                if !p.writer.alive() {
                    ApiError::new(503, "not_ready", "store writer stopped").into()
                } else if !self.ingest.is_ready() {
                    ApiError::new(503, "not_ready", "ingest listener not proved up yet").into()
                } else {
                    Reply::json(200, br#"{"status":"ready"}"#.to_vec())
                }
            }
            ("GET", ["admin", "ledger"]) => p.ledger().await,
            ("POST", ["admin", "delegations", id, "revoke"]) => p.revoke(id).await,
            ("POST", ["admin", "escalations", rid]) => p.decide_escalation(rid, &body).await,
            _ => ApiError::new(404, "not_found", format!("path: no admin endpoint {path}")).into(),
        };
        to_response(r)
    }
}

/// Everything `run` built, before the Pingora server starts (also used by tests).
pub struct Built {
    pub provider: Arc<Provider>,
    pub outbox: Outbox,
    pub key_generated: bool,
}

/// Loads (or generates) the key, opens the store, starts the writer thread.
pub fn build(cfg: &Config) -> Result<Built, ProviderError> {
    let (key, key_generated) = keys::load_or_generate(&cfg.key_file)?;
    let metrics = Arc::new(Metrics::new().map_err(|e| ProviderError::StoreState(e.to_string()))?);
    let store = SqliteStore::open(&cfg.store)?;
    let kid = multihub_protocol::signal::key_id(&key.verifying_key());
    store.register(
        &kid,
        &keys::hex(key.verifying_key().as_bytes()),
        &cfg.policy,
    )?;
    let revoked = store.revoked()?;
    let (feed, rx) = outbox::channel(cfg.outbox.queue);
    let writer = spawn_writer(
        store,
        cfg.limits.write_queue,
        cfg.limits.max_batch,
        feed.clone(),
        metrics.clone(),
    )?;
    let provider = Arc::new(Provider::new(
        cfg,
        key,
        revoked,
        writer.clone(),
        metrics.clone(),
    ));
    let outbox = Outbox::new(rx, feed, writer, cfg.outbox.clone(), metrics);
    Ok(Built {
        provider,
        outbox,
        key_generated,
    })
}

/// Builds the server and runs it until a shutdown signal.
pub fn run(cfg: &Config) -> Result<(), ProviderError> {
    // Before the store and key are touched: a provider that cannot listen exits at once.
    multihub_protocol::net::check_listen(&[&cfg.listen, &cfg.admin_listen])?;
    let built = build(cfg)?;
    if built.key_generated {
        log::info!(
            "generated a new key in {} (key id {})",
            cfg.key_file.display(),
            built.provider.key_id
        );
    }
    let conf = ServerConf {
        threads: cfg.limits.threads,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(2),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let listener = Arc::new(ListenerProbe::default());
    let mut ingest = Service::new(
        "ingest".to_string(),
        Probed {
            app: Arc::new(IngestApp {
                provider: built.provider.clone(),
            }),
            listener: listener.clone(),
        },
    );
    ingest.threads = Some(cfg.limits.threads);
    ingest.add_tcp(&cfg.listen);
    let mut admin = Service::new(
        "admin".to_string(),
        AdminApp {
            provider: built.provider.clone(),
            ingest: listener.clone(),
        },
    );
    admin.threads = Some(1);
    admin.add_tcp(&cfg.admin_listen);
    server.add_service(ingest);
    server.add_service(admin);
    server.add_service(background_service("outbox", built.outbox));
    server.add_service(background_service(
        "ingest readiness",
        ProveUp {
            listener,
            addr: multihub_protocol::net::listen_addr(&cfg.listen)
                .ok()
                .map(multihub_protocol::net::probe_addr),
        },
    ));
    log::info!(
        "multihub-provider {} listening on {} (admin {}), key id {}, policy {}@{}",
        cfg.provider,
        cfg.listen,
        cfg.admin_listen,
        built.provider.key_id,
        cfg.policy.reference.id,
        cfg.policy.reference.version
    );
    server.run(RunArgs::default());
    Ok(())
}
