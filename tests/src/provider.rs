//! Starting the real `multihub-provider` as a child process, and building hub-stamped requests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::http::{request, Response};
use crate::procs::{bin_path, free_port, wait_ready, workspace_root, TempDir};

/// A test policy: transfer/deposit credit, refund debit; max 1000; escalate above 500; target
/// `acct-risky` scores low and escalates; `acct-frozen` is blocked.
pub const TEST_POLICY: &str = r#"{
  "id": "test-policy", "version": "1", "allow_anonymous": false,
  "ops": {"transfer": "credit", "deposit": "credit", "refund": "debit"},
  "max_amount": 1000, "escalate_above": 500, "blocked_targets": ["acct-frozen"],
  "scoring": {"weights": {"amount": 2, "delegation": 1, "target": 1},
              "target_trust_bp": {"acct-risky": 1000}, "default_target_trust_bp": 8000,
              "critical": {"target": {"min_bp": 2000, "action": "escalate"}}}
}
"#;

/// Delegations of the test registry: `d-ops` (every op, any target, max 5000), `d-small`.
pub const TEST_DELEGATIONS: &str = r#"{"version": 1, "delegations": {
  "d-ops": {"ops": ["transfer", "deposit", "refund"], "targets": ["*"], "max_amount": 5000},
  "d-small": {"ops": ["transfer"], "targets": ["acct-1"], "max_amount": 10}
}}
"#;

/// A running provider; killed (SIGKILL) on drop. Its directory (store, key) outlives restarts.
pub struct ProviderProc {
    child: Option<Child>,
    pub id: String,
    pub addr: String,
    pub admin: String,
    pub config: PathBuf,
    pub store: PathBuf,
    pub key_file: PathBuf,
    pub policy_file: PathBuf,
    pub delegations_file: PathBuf,
    log: PathBuf,
    pub dir: TempDir,
}

impl ProviderProc {
    /// Writes a config (test policy and delegations, fresh ports) whose signals go to
    /// `association` and starts the provider.
    pub async fn start(id: &str, association: &str) -> ProviderProc {
        let dir = TempDir::new("provider");
        let (addr, admin) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let config = write_config(&dir, id, association, &addr, &admin);
        let mut p = ProviderProc {
            child: None,
            id: id.to_string(),
            addr,
            admin,
            config,
            store: dir.path().join("state/provider.db"),
            key_file: dir.path().join("state/key"),
            policy_file: dir.path().join("policies/test-policy.json"),
            delegations_file: dir.path().join("delegations.json"),
            log: dir.path().join("provider.log"),
            dir,
        };
        p.spawn().await;
        p
    }

    /// (Re)starts the process with the same config and waits until `/readyz` answers 200.
    pub async fn spawn(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("{e}"));
        let err = out.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(bin_path("multihub-provider"))
            .arg("--config")
            .arg(&self.config)
            .env("MULTIHUB_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn multihub-provider: {e}"));
        let child = self.child.insert(child);
        wait_ready(
            "multihub-provider",
            child,
            &self.admin,
            &self.addr,
            &self.log,
        )
        .await;
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// POSTs an intent stamped like a hub would (repr, binding, request id) plus `extra` headers.
    pub async fn post(
        &self,
        request_id: &str,
        body: &[u8],
        extra: &[(&str, &str)],
    ) -> std::io::Result<Response> {
        let h = hub_headers(request_id, body, b"");
        let mut all: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(extra);
        request(&self.addr, "POST", "/v1/payments", &all, body).await
    }

    /// `GET /admin/ledger` → (balances, receipts).
    pub async fn ledger(&self) -> serde_json::Value {
        request(&self.admin, "GET", "/admin/ledger", &[], b"")
            .await
            .map(|r| r.json())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Runs `multihub-provider verify` on the store: (exit code, stdout).
    pub fn verify(&self) -> (i32, String) {
        let (code, out, err) = run_in_root(&["verify", "--store", &self.store.to_string_lossy()]);
        (code, format!("{out}{err}"))
    }
}

impl Drop for ProviderProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The headers a hub adds that the provider checks: x-request-id, repr and binding.
pub fn hub_headers(request_id: &str, body: &[u8], context: &[u8]) -> Vec<(&'static str, String)> {
    let repr = multihub_protocol::hashing::repr_of(body);
    let binding = multihub_protocol::hashing::binding_hex(repr.as_str(), context);
    vec![
        ("x-request-id", request_id.to_string()),
        ("x-hub-request-repr", repr.as_str().to_string()),
        ("x-hub-binding", binding),
    ]
}

/// The receipt body bytes embedded verbatim in a provider answer
/// (`{"audit":..,"key_id":..,"receipt":<body>,"sig":..}`).
pub fn receipt_bytes(answer: &[u8]) -> Vec<u8> {
    let s = String::from_utf8_lossy(answer);
    let start = s.find(",\"receipt\":").map(|i| i + 11);
    let end = s.rfind(",\"sig\":");
    match (start, end) {
        (Some(a), Some(b)) if a < b => s[a..b].as_bytes().to_vec(),
        _ => Vec::new(),
    }
}

/// Runs `multihub-provider` with the workspace root as working directory (the example configs
/// name paths relative to it): (exit code, stdout, stderr).
pub fn run_in_root(args: &[&str]) -> (i32, String, String) {
    run_provider_in(&workspace_root(), args)
}

/// Writes into `dir` a provider config (test policy and delegations, key and store under
/// `state/`) listening on `addr` and `admin`, whose signals go to `association`; its path.
pub fn write_config(
    dir: &TempDir,
    id: &str,
    association: &str,
    addr: &str,
    admin: &str,
) -> PathBuf {
    let policy_dir = dir.path().join("policies");
    dir.write("policies/test-policy.json", TEST_POLICY);
    let delegations_file = dir.write("delegations.json", TEST_DELEGATIONS);
    let cfg = serde_json::json!({
        "version": 1,
        "provider": id,
        "listen": addr,
        "admin_listen": admin,
        "key_file": dir.path().join("state/key"),
        "store": dir.path().join("state/provider.db"),
        "policy": {"dir": policy_dir, "id": "test-policy", "version": "1"},
        "delegations": delegations_file,
        "association": {"url": association},
        "limits": {"max_body_bytes": 4096, "threads": 2},
        "outbox": {"initial_backoff_ms": 10, "max_backoff_ms": 200, "timeout_ms": 2000},
    });
    dir.write("provider.json", cfg.to_string())
}

/// Runs `multihub-provider` in `dir`.
pub fn run_provider_in(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_path("multihub-provider"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run multihub-provider: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
