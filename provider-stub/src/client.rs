//! Outgoing HTTP/1.1 POSTs over pooled connections (Pingora's connector and v1 client), as the
//! hub's deliveries do: a connection goes back to the pool only after a clean, complete exchange;
//! a reused connection that fails before any response byte is retried once on a fresh one.

use pingora_core::connectors::{ConnectorOptions, TransportConnector};
use pingora_core::protocols::http::v1::client::HttpSession;
use pingora_core::protocols::Stream;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_http::RequestHeader;
use std::time::Duration;

use crate::config::HttpUrl;

const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Client {
    transport: TransportConnector,
    /// Parsed destinations by URL: the peer and a request head without per-request headers.
    /// Bounded: cleared when it grows past `MAX_CACHED`.
    cache: std::sync::Mutex<std::collections::HashMap<String, (HttpPeer, RequestHeader)>>,
}

const MAX_CACHED: usize = 1024;

enum Fail {
    BeforeResponse(String),
    After(String),
}

impl Client {
    pub fn new(pool_size: usize) -> Client {
        let mut opts = ConnectorOptions::new(pool_size);
        opts.keepalive_pool_size = pool_size;
        Client {
            transport: TransportConnector::new(Some(opts)),
            cache: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// POSTs `body` to `url` and returns the status (any status), or why no response came.
    pub async fn post(
        &self,
        url: &str,
        headers: &[(String, String)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<u16, String> {
        let cached = self.cache.lock().ok().and_then(|c| c.get(url).cloned());
        let (peer, mut req) = match cached {
            Some(x) => x,
            None => {
                let x = Self::destination(url)?;
                if let Ok(mut c) = self.cache.lock() {
                    if c.len() >= MAX_CACHED {
                        c.clear();
                    }
                    c.insert(url.to_string(), x.clone());
                }
                x
            }
        };
        req.insert_header("content-length", body.len().to_string())
            .map_err(|e| e.to_string())?;
        for (k, v) in headers {
            req.insert_header(k.clone(), v.as_str())
                .map_err(|e| e.to_string())?;
        }
        match tokio::time::timeout(timeout, self.post_inner(&peer, &req, body)).await {
            Ok(r) => r,
            Err(_) => Err("timeout".into()),
        }
    }

    fn destination(url: &str) -> Result<(HttpPeer, RequestHeader), String> {
        let u = HttpUrl::parse(url)?;
        let peer = HttpPeer::new(u.authority.as_str(), false, String::new());
        let path = if u.path.is_empty() {
            "/"
        } else {
            u.path.as_str()
        };
        let mut req =
            RequestHeader::build("POST", path.as_bytes(), None).map_err(|e| e.to_string())?;
        req.insert_header("host", u.host.as_str())
            .map_err(|e| e.to_string())?;
        req.insert_header("content-type", "application/json")
            .map_err(|e| e.to_string())?;
        Ok((peer, req))
    }

    async fn post_inner(
        &self,
        peer: &HttpPeer,
        req: &RequestHeader,
        body: &[u8],
    ) -> Result<u16, String> {
        let (stream, reused) = self
            .transport
            .get_stream(peer)
            .await
            .map_err(|e| e.to_string())?;
        match self.exchange(stream, peer, req, body).await {
            Ok(s) => Ok(s),
            Err(Fail::BeforeResponse(_)) if reused => {
                let stream = self
                    .transport
                    .new_stream(peer)
                    .await
                    .map_err(|e| e.to_string())?;
                self.exchange(stream, peer, req, body)
                    .await
                    .map_err(|(Fail::BeforeResponse(e) | Fail::After(e))| e)
            }
            Err(Fail::BeforeResponse(e) | Fail::After(e)) => Err(e),
        }
    }

    async fn exchange(
        &self,
        stream: Stream,
        peer: &HttpPeer,
        req: &RequestHeader,
        body: &[u8],
    ) -> Result<u16, Fail> {
        let before = |e: pingora_error::BError| Fail::BeforeResponse(e.to_string());
        let mut s = HttpSession::new_with_options(stream, peer);
        s.write_request_header(Box::new(req.clone()))
            .await
            .map_err(before)?;
        if !body.is_empty() {
            s.write_body(body).await.map_err(before)?;
        }
        s.finish_body().await.map_err(before)?;
        s.read_response().await.map_err(before)?;
        let status = s.get_status().map(|c| c.as_u16()).unwrap_or(0);
        loop {
            match s.read_body_bytes().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Err(Fail::After(e.to_string())),
            }
        }
        s.respect_keepalive();
        if let Some(stream) = s.reuse().await {
            self.transport
                .release_stream(stream, peer.reuse_hash(), Some(IDLE_TIMEOUT));
        }
        Ok(status)
    }
}
