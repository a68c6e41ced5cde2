//! What `conf/` describes: the hubs (`conf/hub-*/routes`), the providers
//! (`conf/provider-*/provider.json`), the association (`conf/association/association.json`) and the
//! outcome sink (the hubs' `outcome_sinks`).

use multihub_protocol::routes::RoutesFile;
use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::LaunchError;

#[derive(Debug, Clone)]
pub struct HubSpec {
    pub id: String,
    pub routes: PathBuf,
    pub listen: String,
    pub admin: String,
}

#[derive(Debug, Clone)]
pub struct ProviderSpec {
    pub id: String,
    pub config: PathBuf,
    pub key_file: PathBuf,
    pub listen: String,
    pub admin: String,
}

#[derive(Debug, Clone)]
pub struct AssociationSpec {
    pub template: PathBuf,
    pub listen: String,
    pub admin: String,
}

#[derive(Debug, Clone)]
pub struct Topology {
    pub hubs: Vec<HubSpec>,
    pub providers: Vec<ProviderSpec>,
    pub association: AssociationSpec,
    /// `host:port` and path of the outcome sink, if any hub has one.
    pub sink: Option<(String, String)>,
}

fn conf_err(path: &Path, detail: impl Into<String>) -> LaunchError {
    LaunchError::Conf {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

fn read_json(path: &Path) -> Result<Value, LaunchError> {
    let bytes = std::fs::read(path).map_err(|e| conf_err(path, e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| conf_err(path, e.to_string()))
}

fn field(v: &Value, path: &Path, name: &str) -> Result<String, LaunchError> {
    v.get(name)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| conf_err(path, format!("missing string field {name:?}")))
}

/// `http://host:port/path` → (`host:port`, `/path`).
pub fn split_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    match rest.find('/') {
        Some(i) => Some((rest[..i].to_string(), rest[i..].to_string())),
        None => Some((rest.to_string(), "/".to_string())),
    }
}

fn sorted_dirs(conf: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(conf)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

impl Topology {
    /// Reads `conf/`. A hub's admin listener is in `conf/hub-*/admin`, else 127.0.0.1:9180, 9181,
    /// ... in hub order.
    pub fn load(conf: &Path) -> Result<Topology, LaunchError> {
        let mut hubs = Vec::new();
        let mut sink = None;
        for (i, dir) in sorted_dirs(conf, "hub-").into_iter().enumerate() {
            let routes = dir.join("routes");
            let active = std::fs::read_to_string(routes.join("active"))
                .map_err(|e| conf_err(&routes, e.to_string()))?;
            let file = routes.join(format!("{}.json", active.trim()));
            let bytes = std::fs::read(&file).map_err(|e| conf_err(&file, e.to_string()))?;
            let t: RoutesFile =
                serde_json::from_slice(&bytes).map_err(|e| conf_err(&file, e.to_string()))?;
            let (listen, _) = split_url(&t.hub.advertise)
                .ok_or_else(|| conf_err(&file, "hub.advertise must be http://host:port"))?;
            if sink.is_none() {
                sink = t.outcome_sinks.first().and_then(|u| split_url(u));
            }
            // The admin listener: `conf/hub-*/admin` (one line), else 127.0.0.1:9180 + index.
            let admin = std::fs::read_to_string(dir.join("admin"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| format!("127.0.0.1:{}", 9180 + i));
            hubs.push(HubSpec {
                id: t.hub.id,
                routes,
                listen,
                admin,
            });
        }
        let mut providers = Vec::new();
        for dir in sorted_dirs(conf, "provider-") {
            let config = dir.join("provider.json");
            let v = read_json(&config)?;
            providers.push(ProviderSpec {
                id: field(&v, &config, "provider")?,
                key_file: PathBuf::from(field(&v, &config, "key_file")?),
                listen: field(&v, &config, "listen")?,
                admin: field(&v, &config, "admin_listen")?,
                config,
            });
        }
        let template = conf.join("association").join("association.json");
        let v = read_json(&template)?;
        let association = AssociationSpec {
            listen: field(&v, &template, "listen")?,
            admin: field(&v, &template, "admin_listen")?,
            template,
        };
        if hubs.is_empty() || providers.is_empty() {
            return Err(conf_err(
                conf,
                "expected conf/hub-*/routes and conf/provider-*/provider.json",
            ));
        }
        Ok(Topology {
            hubs,
            providers,
            association,
            sink,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_conf_describes_the_seed_topology() {
        let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf");
        let t = Topology::load(&conf).unwrap_or_else(|e| panic!("{e}"));
        let hubs: Vec<&str> = t.hubs.iter().map(|h| h.id.as_str()).collect();
        assert_eq!(hubs, ["hub-a", "hub-b"]);
        let providers: Vec<&str> = t.providers.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(providers, ["provider-a", "provider-b", "provider-c"]);
        assert_eq!(t.hubs[0].listen, "127.0.0.1:8080");
        assert_eq!(
            t.sink,
            Some(("127.0.0.1:9200".to_string(), "/outcomes".to_string()))
        );
    }

    #[test]
    fn urls_split() {
        assert_eq!(
            split_url("http://a:1/x/y"),
            Some(("a:1".into(), "/x/y".into()))
        );
        assert_eq!(split_url("http://a:1"), Some(("a:1".into(), "/".into())));
        assert_eq!(split_url("https://a"), None);
    }
}
