//! Configuration: the serde file model (`deny_unknown_fields`) and its lowering into a validated
//! runtime model. Lowering collects every problem with its JSON path instead of stopping at the
//! first one, and never panics.

use ed25519_dalek::VerifyingKey;
use multihub_protocol::signal::SignalVerifier;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::policy::Policy;

/// Default request body cap for `POST /signals` (a signal is about 500 bytes).
pub const DEFAULT_MAX_BODY_BYTES: usize = 8192;

// ---------------------------------------------------------------------------------------------
// File model
// ---------------------------------------------------------------------------------------------

/// The configuration file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub version: String,
    pub listen: String,
    pub admin_listen: String,
    pub store: FileStore,
    #[serde(default)]
    pub threads: Option<usize>,
    /// `"strict"` (default): `verify_strict` per signal. `"batch"`: batch verification (see
    /// `SignatureCheck::Batch`).
    #[serde(default)]
    pub signature_check: SignatureCheck,
    pub providers: BTreeMap<String, FileProvider>,
    pub policy: FilePolicySet,
    #[serde(default)]
    pub limits: FileLimits,
}

/// How `POST /signals` checks signatures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureCheck {
    /// Each signature on its own, exactly `verify_strict` (DESIGN §6).
    #[default]
    Strict,
    /// Signatures waiting at the same moment are checked together with
    /// `protocol::signal::verify_batch` on one verifier thread; a failed batch falls back to
    /// one check each. Forged or altered signatures are still refused. The one difference from
    /// `verify_strict`: a provider can deliberately sign with a torsion component in its nonce
    /// point and get that signal stored with probability up to 1/2, and the offline `verify`
    /// would then report it.
    Batch,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStore {
    pub path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileProvider {
    pub keys: Vec<FileKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileKey {
    /// 64 lower-case hex characters: the 32-byte ed25519 public key.
    pub public_key: String,
    /// Optional; when present it must equal hex sha256 of the public key bytes.
    #[serde(default)]
    pub key_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePolicySet {
    pub default: FilePolicy,
    #[serde(default)]
    pub routes: BTreeMap<String, FilePolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePolicy {
    #[serde(default)]
    pub all_of: Option<Vec<String>>,
    #[serde(default)]
    pub quorum: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    pub max_body_bytes: Option<usize>,
    pub queue: Option<usize>,
    pub max_batch: Option<usize>,
    pub page_limit: Option<usize>,
    pub max_sse_clients: Option<usize>,
    pub sse_keepalive_ms: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// Runtime model
// ---------------------------------------------------------------------------------------------

/// One registered key, with its key id and verification tables prepared at load.
pub type Key = SignalVerifier;

/// A registered provider.
#[derive(Debug, Clone)]
pub struct Provider {
    pub id: String,
    pub keys: Vec<Key>,
}

/// The confirmation policies: a default and optional per-route overrides.
#[derive(Debug, Clone)]
pub struct Policies {
    pub default: Policy,
    pub routes: HashMap<String, Policy>,
}

impl Policies {
    /// The policy for an operation whose route is `route` (the label recorded with a
    /// confirmation is `default` or `route:<id>`).
    pub fn for_route(&self, route: Option<&str>) -> (&Policy, PolicyName) {
        if let Some(r) = route {
            if let Some(p) = self.routes.get(r) {
                return (p, PolicyName::Route(r.to_string()));
            }
        }
        (&self.default, PolicyName::Default)
    }
}

/// Which policy applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyName {
    Default,
    Route(String),
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyName::Default => f.write_str("default"),
            PolicyName::Route(r) => write!(f, "route:{r}"),
        }
    }
}

/// Limits, all bounded.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub queue: usize,
    pub max_batch: usize,
    pub page_limit: usize,
    pub max_sse_clients: usize,
    pub sse_keepalive_ms: u64,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub version: String,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub store_path: PathBuf,
    pub threads: usize,
    pub signature_check: SignatureCheck,
    /// Sorted by id.
    pub providers: Vec<Provider>,
    pub policies: Policies,
    pub limits: Limits,
}

impl Config {
    /// Index of a provider by id.
    pub fn provider_index(&self, id: &str) -> Option<usize> {
        self.providers
            .binary_search_by(|p| p.id.as_str().cmp(id))
            .ok()
    }
}

/// One validation problem: a JSON path and what is wrong there.
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

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblems(pub Vec<Problem>);

impl fmt::Display for ConfigProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

impl std::error::Error for ConfigProblems {}

/// Whether `s` is a valid route id (same grammar as provider ids); used for `x-hub-route`.
pub fn valid_route(s: &str) -> bool {
    valid_id(s)
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    multihub_protocol::hashing::unhex32(s)
}

/// Parses the text of a configuration file and lowers it.
pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigProblems> {
    let file: FileConfig = serde_json::from_str(text).map_err(|e| {
        ConfigProblems(vec![Problem {
            path: format!("$ (line {}, column {})", e.line(), e.column()),
            message: e.to_string(),
        }])
    })?;
    lower(file, base)
}

/// Reads and lowers a configuration file; a relative store path is relative to the file.
pub fn load(path: &Path) -> Result<Config, ConfigProblems> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigProblems(vec![Problem {
            path: "$".into(),
            message: format!("cannot read {}: {e}", path.display()),
        }])
    })?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    parse(&text, base)
}

fn lower_policy(
    p: &FilePolicy,
    path: &str,
    providers: &BTreeMap<String, FileProvider>,
    problems: &mut Vec<Problem>,
) -> Option<Policy> {
    let mut push = |path: String, message: String| problems.push(Problem { path, message });
    match (&p.all_of, p.quorum) {
        (Some(list), None) => {
            if list.is_empty() {
                push(
                    format!("{path}.all_of"),
                    "must name at least one provider".into(),
                );
                return None;
            }
            let mut ok = true;
            let mut seen = std::collections::BTreeSet::new();
            for (i, id) in list.iter().enumerate() {
                if !providers.contains_key(id) {
                    push(
                        format!("{path}.all_of[{i}]"),
                        format!("unknown provider \"{id}\""),
                    );
                    ok = false;
                }
                if !seen.insert(id.clone()) {
                    push(
                        format!("{path}.all_of[{i}]"),
                        format!("provider \"{id}\" listed twice"),
                    );
                    ok = false;
                }
            }
            ok.then(|| Policy::AllOf(seen.into_iter().collect()))
        }
        (None, Some(n)) => {
            if n == 0 || n > providers.len() {
                push(
                    format!("{path}.quorum"),
                    format!(
                        "must be between 1 and the number of providers ({})",
                        providers.len()
                    ),
                );
                None
            } else {
                Some(Policy::Quorum(n))
            }
        }
        _ => {
            push(
                path.to_string(),
                "exactly one of \"all_of\" or \"quorum\" is required".into(),
            );
            None
        }
    }
}

fn addr(s: &str, path: &str, problems: &mut Vec<Problem>) -> Option<SocketAddr> {
    match s.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            problems.push(Problem {
                path: path.into(),
                message: format!("\"{s}\" is not an ip:port address"),
            });
            None
        }
    }
}

/// Lowers the file model into the runtime model, collecting every problem.
pub fn lower(f: FileConfig, base: &Path) -> Result<Config, ConfigProblems> {
    let mut problems = Vec::new();
    if f.version.trim().is_empty() {
        problems.push(Problem {
            path: "$.version".into(),
            message: "must not be empty".into(),
        });
    }
    let listen = addr(&f.listen, "$.listen", &mut problems);
    let admin = addr(&f.admin_listen, "$.admin_listen", &mut problems);
    if listen.is_some() && listen == admin {
        problems.push(Problem {
            path: "$.admin_listen".into(),
            message: "must differ from listen".into(),
        });
    }
    if f.store.path.as_os_str().is_empty() {
        problems.push(Problem {
            path: "$.store.path".into(),
            message: "must not be empty".into(),
        });
    }
    let threads = f.threads.unwrap_or(2);
    if threads == 0 || threads > 64 {
        problems.push(Problem {
            path: "$.threads".into(),
            message: "must be between 1 and 64".into(),
        });
    }
    if f.providers.is_empty() {
        problems.push(Problem {
            path: "$.providers".into(),
            message: "at least one provider is required".into(),
        });
    }
    let mut providers = Vec::new();
    let mut all_key_ids: HashMap<String, String> = HashMap::new();
    for (id, p) in &f.providers {
        let ppath = format!("$.providers[\"{id}\"]");
        if !valid_id(id) {
            problems.push(Problem {
                path: ppath.clone(),
                message: "provider id must be 1-64 of [A-Za-z0-9._:-]".into(),
            });
        }
        if p.keys.is_empty() {
            problems.push(Problem {
                path: format!("{ppath}.keys"),
                message: "at least one key is required".into(),
            });
        }
        let mut keys = Vec::new();
        for (i, k) in p.keys.iter().enumerate() {
            let kpath = format!("{ppath}.keys[{i}]");
            let Some(raw) = parse_hex32(&k.public_key) else {
                problems.push(Problem {
                    path: format!("{kpath}.public_key"),
                    message: "must be 64 lower-case hex characters (32-byte ed25519 public key)"
                        .into(),
                });
                continue;
            };
            let key = match VerifyingKey::from_bytes(&raw) {
                Ok(k) if !k.is_weak() => k,
                _ => {
                    problems.push(Problem {
                        path: format!("{kpath}.public_key"),
                        message: "not a valid (non-weak) ed25519 public key".into(),
                    });
                    continue;
                }
            };
            let key = Key::new(key);
            let kid = key.key_id().to_string();
            if let Some(given) = &k.key_id {
                if *given != kid {
                    problems.push(Problem {
                        path: format!("{kpath}.key_id"),
                        message: format!("does not match the public key (expected {kid})"),
                    });
                }
            }
            if let Some(other) = all_key_ids.insert(kid.clone(), id.clone()) {
                problems.push(Problem {
                    path: format!("{kpath}.public_key"),
                    message: format!("key already registered for provider \"{other}\" (no key is shared between providers)"),
                });
            }
            keys.push(key);
        }
        providers.push(Provider {
            id: id.clone(),
            keys,
        });
    }
    let default = lower_policy(
        &f.policy.default,
        "$.policy.default",
        &f.providers,
        &mut problems,
    );
    let mut routes = HashMap::new();
    for (route, p) in &f.policy.routes {
        let rpath = format!("$.policy.routes[\"{route}\"]");
        if !valid_id(route) {
            problems.push(Problem {
                path: rpath.clone(),
                message: "route id must be 1-64 of [A-Za-z0-9._:-]".into(),
            });
        }
        if let Some(p) = lower_policy(p, &rpath, &f.providers, &mut problems) {
            routes.insert(route.clone(), p);
        }
    }
    let l = &f.limits;
    let mut limit = |name: &str, v: Option<usize>, def: usize, min: usize, max: usize| {
        let v = v.unwrap_or(def);
        if v < min || v > max {
            problems.push(Problem {
                path: format!("$.limits.{name}"),
                message: format!("must be between {min} and {max}"),
            });
        }
        v
    };
    let limits = Limits {
        max_body_bytes: limit(
            "max_body_bytes",
            l.max_body_bytes,
            DEFAULT_MAX_BODY_BYTES,
            256,
            1 << 20,
        ),
        queue: limit("queue", l.queue, 16384, 1, 1 << 20),
        max_batch: limit("max_batch", l.max_batch, 4096, 1, 65536),
        page_limit: limit("page_limit", l.page_limit, 1000, 1, 100_000),
        max_sse_clients: limit("max_sse_clients", l.max_sse_clients, 256, 1, 100_000),
        sse_keepalive_ms: l.sse_keepalive_ms.unwrap_or(15_000),
    };
    if !(100..=600_000).contains(&limits.sse_keepalive_ms) {
        problems.push(Problem {
            path: "$.limits.sse_keepalive_ms".into(),
            message: "must be between 100 and 600000".into(),
        });
    }
    if !problems.is_empty() {
        return Err(ConfigProblems(problems));
    }
    let (Some(listen), Some(admin_listen), Some(default)) = (listen, admin, default) else {
        return Err(ConfigProblems(vec![Problem {
            path: "$".into(),
            message: "invalid configuration".into(),
        }]));
    };
    let store_path = if f.store.path.is_absolute() {
        f.store.path
    } else {
        base.join(f.store.path)
    };
    Ok(Config {
        version: f.version,
        listen,
        admin_listen,
        store_path,
        threads,
        signature_check: f.signature_check,
        providers,
        policies: Policies { default, routes },
        limits,
    })
}

/// A shared, validated configuration.
pub type SharedConfig = Arc<Config>;

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use multihub_protocol::hashing::hex_into;

    pub(crate) fn pk_hex(seed: u8) -> String {
        let mut s = String::new();
        hex_into(
            &mut s,
            SigningKey::from_bytes(&[seed; 32])
                .verifying_key()
                .as_bytes(),
        );
        s
    }

    fn good() -> String {
        format!(
            r#"{{"version":"1","listen":"127.0.0.1:1","admin_listen":"127.0.0.1:2",
            "store":{{"path":"a.db"}},
            "providers":{{"p-a":{{"keys":[{{"public_key":"{}"}},{{"public_key":"{}"}}]}},
                          "p-b":{{"keys":[{{"public_key":"{}"}}]}}}},
            "policy":{{"default":{{"all_of":["p-a","p-b"]}},"routes":{{"r1":{{"quorum":1}}}}}}}}"#,
            pk_hex(1),
            pk_hex(2),
            pk_hex(3)
        )
    }

    #[test]
    fn a_good_config_lowers() {
        let c = parse(&good(), Path::new("/etc")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.providers.len(), 2);
        assert_eq!(c.providers[0].keys.len(), 2);
        assert_eq!(c.store_path, PathBuf::from("/etc/a.db"));
        assert_eq!(c.provider_index("p-b"), Some(1));
        let (p, name) = c.policies.for_route(Some("r1"));
        assert_eq!(*p, Policy::Quorum(1));
        assert_eq!(name.to_string(), "route:r1");
        let (p, name) = c.policies.for_route(Some("other"));
        assert_eq!(*p, Policy::AllOf(vec!["p-a".into(), "p-b".into()]));
        assert_eq!(name, PolicyName::Default);
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = format!(
            r#"{{"version":"","listen":"nope","admin_listen":"127.0.0.1:2",
            "store":{{"path":"a.db"}}, "threads": 0,
            "providers":{{"p-a":{{"keys":[{{"public_key":"XYZ"}},{{"public_key":"{}","key_id":"00"}}]}},
                          "p-b":{{"keys":[{{"public_key":"{}"}}]}}}},
            "policy":{{"default":{{"all_of":["p-a","p-z"]}},"routes":{{"r1":{{"quorum":3}},"r2":{{}}}}}},
            "limits":{{"max_body_bytes":1}}}}"#,
            pk_hex(1),
            pk_hex(1)
        );
        let e = parse(&text, Path::new("."))
            .err()
            .unwrap_or(ConfigProblems(vec![]));
        let s: Vec<String> = e.0.iter().map(|p| p.to_string()).collect();
        let want = [
            "$.version: must not be empty",
            "$.listen: \"nope\" is not an ip:port address",
            "$.threads: must be between 1 and 64",
            "$.providers[\"p-a\"].keys[0].public_key: must be 64 lower-case hex",
            "$.providers[\"p-a\"].keys[1].key_id: does not match",
            "$.providers[\"p-b\"].keys[0].public_key: key already registered for provider \"p-a\"",
            "$.policy.default.all_of[1]: unknown provider \"p-z\"",
            "$.policy.routes[\"r1\"].quorum: must be between 1 and the number of providers (2)",
            "$.policy.routes[\"r2\"]: exactly one of",
            "$.limits.max_body_bytes: must be between 256",
        ];
        for w in want {
            assert!(s.iter().any(|p| p.starts_with(w)), "missing {w} in {s:#?}");
        }
        assert_eq!(s.len(), want.len(), "{s:#?}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = good().replacen("\"version\"", "\"extra\":1,\"version\"", 1);
        let e = parse(&text, Path::new("."))
            .err()
            .unwrap_or(ConfigProblems(vec![]));
        assert!(e.to_string().contains("unknown field `extra`"), "{e}");
    }
}
