//! The admin listener (never routed): `/metrics`, `/healthz`, `/readyz`, `/routes`.

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use crate::state::{Engine, Tables};

pub struct Admin {
    pub tables: Tables,
    pub engine: Arc<Engine>,
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

fn json_reply(status: u16, v: serde_json::Value) -> Response<Vec<u8>> {
    reply(
        status,
        "application/json",
        serde_json::to_vec(&v).unwrap_or_default(),
    )
}

impl Admin {
    /// Body of `GET /routes`: the active version and the last reload error, if any.
    pub fn routes_json(&self) -> serde_json::Value {
        let t = self.tables.load();
        let secs = |t: std::time::SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0)
        };
        let status = self.engine.reload.lock().unwrap_or_else(|e| e.into_inner());
        let routes: Vec<_> = t
            .table
            .routes
            .iter()
            .map(|r| json!({ "id": r.id, "path_prefix": r.path_prefix }))
            .collect();
        json!({
            "version": t.table.version,
            "sha256": t.sha256,
            "file": t.file.display().to_string(),
            "loaded_at": secs(t.loaded_at),
            "routes": routes,
            "last_reload_error": status.last_error.as_ref().map(|e| json!({
                "error": e,
                "at": status.last_error_at.map(secs),
            })),
        })
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path();
        match path {
            "/metrics" => {
                let e = &self.engine;
                e.metrics
                    .deliveries_in_flight
                    .set(e.in_flight.in_use() as i64);
                e.metrics
                    .deliveries_in_flight_bound
                    .set(e.in_flight.total() as i64);
                reply(200, "text/plain; version=0.0.4", e.metrics.render())
            }
            "/healthz" => json_reply(200, json!({ "status": "alive" })),
            "/readyz" => {
                if self.engine.draining.load(Ordering::SeqCst) {
                    json_reply(503, json!({ "status": "draining" }))
                } else if !self.engine.listener.is_ready() {
                    json_reply(503, json!({ "status": "starting" }))
                } else {
                    json_reply(
                        200,
                        json!({ "status": "ready", "version": self.tables.load().table.version }),
                    )
                }
            }
            "/routes" => json_reply(200, self.routes_json()),
            _ => json_reply(
                404,
                json!({ "error": "not_found", "detail": "admin endpoints: /metrics /healthz /readyz /routes" }),
            ),
        }
    }
}
