//! Configuration: the JSON file model (`deny_unknown_fields`, `version`) lowered into a validated
//! runtime model. Validation reports every problem with its JSON path and never panics.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::policy::{DelegationsFile, Policy};

/// Config format version.
pub const CONFIG_VERSION: u32 = 1;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub version: u32,
    /// This provider's id (signals, receipts, `x-provider-id`).
    pub provider: String,
    /// Ingest listener (`POST` on any path).
    pub listen: String,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`, `/admin/...`).
    pub admin_listen: String,
    /// ed25519 key file (64 hex chars); generated on first start when missing.
    pub key_file: PathBuf,
    /// SQLite database file; created when missing.
    pub store: PathBuf,
    pub policy: PolicySel,
    /// Delegation registry file.
    pub delegations: PathBuf,
    pub association: AssociationFile,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub outbox: OutboxFile,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySel {
    pub dir: PathBuf,
    pub id: String,
    pub version: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssociationFile {
    /// Base URL; signals go to `<url>/signals`.
    pub url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsFile {
    pub max_body_bytes: usize,
    /// Requests being processed at once; beyond it 503.
    pub max_in_flight: usize,
    /// Commands waiting for the store writer.
    pub write_queue: usize,
    /// Commands committed in one transaction at most.
    pub max_batch: usize,
    /// Worker threads of the ingest listener.
    pub threads: usize,
}

impl Default for LimitsFile {
    fn default() -> Self {
        LimitsFile {
            max_body_bytes: 65536,
            max_in_flight: 4096,
            write_queue: 8192,
            max_batch: 2048,
            threads: 2,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxFile {
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Rows queued in memory for the worker; beyond it rows wait in the store.
    pub queue: usize,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub timeout_ms: u64,
}

impl Default for OutboxFile {
    fn default() -> Self {
        OutboxFile {
            concurrency: 64,
            queue: 65536,
            initial_backoff_ms: 50,
            max_backoff_ms: 5000,
            timeout_ms: 2000,
        }
    }
}

/// An `http://host:port[/path]` URL, split for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `host:port` to connect to.
    pub authority: String,
    /// Host name for the `Host` header.
    pub host: String,
    /// Path (begins with `/`), possibly empty for the root.
    pub path: String,
}

impl HttpUrl {
    /// Parses `http://host[:port][/path]` (no query, no TLS).
    pub fn parse(s: &str) -> Result<HttpUrl, String> {
        let rest = s
            .strip_prefix("http://")
            .ok_or_else(|| format!("\"{s}\" must start with http:// (TLS is not supported)"))?;
        let (auth, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if auth.is_empty()
            || !auth
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'))
        {
            return Err(format!("\"{s}\": bad host"));
        }
        if path.bytes().any(|b| b <= b' ' || b == b'?' || b == b'#') {
            return Err(format!("\"{s}\": bad path"));
        }
        let (host, authority) = match auth.rsplit_once(':') {
            Some((h, p)) => {
                p.parse::<u16>().map_err(|_| format!("\"{s}\": bad port"))?;
                (h.to_string(), auth.to_string())
            }
            None => (auth.to_string(), format!("{auth}:80")),
        };
        Ok(HttpUrl {
            authority,
            host,
            path: path.trim_end_matches('/').to_string(),
        })
    }
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub provider: String,
    pub listen: String,
    pub admin_listen: String,
    pub key_file: PathBuf,
    pub store: PathBuf,
    pub policy: Arc<Policy>,
    pub delegations: Arc<DelegationsFile>,
    pub delegations_file: PathBuf,
    pub association: HttpUrl,
    pub limits: LimitsFile,
    pub outbox: OutboxFile,
}

impl Config {
    pub fn outbox_timeout(&self) -> Duration {
        Duration::from_millis(self.outbox.timeout_ms)
    }
}

/// Every problem found, each prefixed with its JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblems(pub Vec<String>);

impl std::error::Error for ConfigProblems {}

impl std::fmt::Display for ConfigProblems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

/// True for a valid provider id: 1–64 of `[A-Za-z0-9._:-]`.
pub fn id_ok(s: &str) -> bool {
    multihub_protocol::validate_hub_id(s).is_ok()
}

impl ConfigFile {
    pub fn parse(bytes: &[u8]) -> Result<ConfigFile, ConfigProblems> {
        serde_json::from_slice(bytes).map_err(|e| ConfigProblems(vec![format!("(file): {e}")]))
    }

    /// Checks everything and builds the runtime model.
    pub fn lower(self) -> Result<Config, ConfigProblems> {
        let mut p = Vec::new();
        if self.version != CONFIG_VERSION {
            p.push(format!("version: must be {CONFIG_VERSION}"));
        }
        if !id_ok(&self.provider) {
            p.push(format!(
                "provider: \"{}\" must be 1-64 of [A-Za-z0-9._:-]",
                self.provider
            ));
        }
        for (name, v) in [
            ("listen", &self.listen),
            ("admin_listen", &self.admin_listen),
        ] {
            if v.parse::<SocketAddr>().is_err() {
                p.push(format!("{name}: \"{v}\" is not an ip:port socket address"));
            }
        }
        if self.listen == self.admin_listen {
            p.push("admin_listen: must differ from listen".into());
        }
        let association = match HttpUrl::parse(&self.association.url) {
            Ok(u) => Some(u),
            Err(e) => {
                p.push(format!("association.url: {e}"));
                None
            }
        };
        let l = &self.limits;
        for (name, v) in [
            ("limits.max_body_bytes", l.max_body_bytes),
            ("limits.max_in_flight", l.max_in_flight),
            ("limits.write_queue", l.write_queue),
            ("limits.max_batch", l.max_batch),
            ("limits.threads", l.threads),
            ("outbox.concurrency", self.outbox.concurrency),
            ("outbox.queue", self.outbox.queue),
        ] {
            if v == 0 {
                p.push(format!("{name}: must be at least 1"));
            }
        }
        let o = &self.outbox;
        if o.initial_backoff_ms == 0 || o.max_backoff_ms < o.initial_backoff_ms {
            p.push("outbox.max_backoff_ms: must be ≥ initial_backoff_ms ≥ 1".into());
        }
        if o.timeout_ms == 0 {
            p.push("outbox.timeout_ms: must be at least 1".into());
        }
        let policy = match Policy::find(&self.policy.dir, &self.policy.id, &self.policy.version) {
            Ok(x) => Some(x),
            Err(e) => {
                p.extend(e);
                None
            }
        };
        let delegations = match DelegationsFile::load(&self.delegations) {
            Ok(x) => Some(x),
            Err(e) => {
                p.extend(e);
                None
            }
        };
        match (policy, delegations, association) {
            (Some(policy), Some(delegations), Some(association)) if p.is_empty() => Ok(Config {
                provider: self.provider,
                listen: self.listen,
                admin_listen: self.admin_listen,
                key_file: self.key_file,
                store: self.store,
                policy: Arc::new(policy),
                delegations: Arc::new(delegations),
                delegations_file: self.delegations,
                association,
                limits: self.limits,
                outbox: self.outbox,
            }),
            _ => Err(ConfigProblems(p)),
        }
    }
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigProblems> {
    let bytes = std::fs::read(path).map_err(|e| ConfigProblems(vec![format!("(file): {e}")]))?;
    ConfigFile::parse(&bytes)?.lower()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = HttpUrl::parse("http://127.0.0.1:9300/base/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.authority, "127.0.0.1:9300");
        assert_eq!(u.path, "/base");
        assert!(HttpUrl::parse("https://x").is_err());
        assert!(HttpUrl::parse("http://x:99999").is_err());
        assert!(HttpUrl::parse("http://x/a b").is_err());
        assert_eq!(
            HttpUrl::parse("http://h").map(|u| u.authority),
            Ok("h:80".into())
        );
    }

    #[test]
    fn every_problem_is_listed_with_its_path() {
        let f = ConfigFile::parse(
            br#"{"version":2,"provider":"bad id","listen":"x","admin_listen":"127.0.0.1:1",
            "key_file":"k","store":"s","policy":{"dir":"/nonexistent","id":"p","version":"1"},
            "delegations":"/nonexistent.json","association":{"url":"ftp://x"},
            "limits":{"max_batch":0}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let e = f.lower().err().map(|e| e.0).unwrap_or_default();
        for want in [
            "version:",
            "provider:",
            "listen:",
            "association.url:",
            "limits.max_batch:",
            "policy.dir:",
            "delegations (",
        ] {
            assert!(e.iter().any(|m| m.starts_with(want)), "{want} in {e:?}");
        }
        assert!(ConfigFile::parse(br#"{"version":1,"nope":1}"#).is_err());
    }
}
