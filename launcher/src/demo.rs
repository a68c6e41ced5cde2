//! `multihub demo`: sends one operation that passes, one that is blocked and one that escalates
//! through hub-a, then shows, per operation, what each provider decided (from the receipts relayed
//! back through the hubs to the sink), the START / COMPLETE signals at the association, the
//! linkage and the confirmation; finally it verifies every store offline.

use multihub_protocol::hashing::{operation_hex, repr_of};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::client::request;
use crate::topology::Topology;
use crate::LaunchError;

/// Options of `multihub demo`.
#[derive(Debug, Clone)]
pub struct DemoOpts {
    pub conf: PathBuf,
    pub state: PathBuf,
    pub bin_dir: PathBuf,
    /// How long to wait for signals and receipts per operation.
    pub wait: Duration,
}

struct Style(bool);

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn verdict(&self, v: &str) -> String {
        match v {
            "pass" => self.paint("32", v),
            "block" => self.paint("31", v),
            "escalate" => self.paint("33", v),
            _ => v.to_string(),
        }
    }
    fn ok(&self, yes: bool) -> String {
        if yes {
            self.paint("32", "yes")
        } else {
            self.paint("31", "no")
        }
    }
}

/// The three demo operations: (label, intent).
pub fn operations() -> [(&'static str, Value); 3] {
    [
        (
            "pass",
            json!({"op": "transfer", "target": "acct-1", "amount": 50}),
        ),
        (
            "block",
            json!({"op": "transfer", "target": "acct-frozen", "amount": 50}),
        ),
        (
            "escalate",
            json!({"op": "transfer", "target": "acct-2", "amount": 6000}),
        ),
    ]
}

fn outcomes_for(path: &Path, request_id: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["request_id"] == request_id)
        .collect()
}

/// Runs the demo against a running `multihub up`.
pub async fn run(opts: DemoOpts) -> Result<bool, LaunchError> {
    let topo = Topology::load(&opts.conf)?;
    let st = Style(std::io::stdout().is_terminal());
    let hub = &topo.hubs[0].listen;
    let assoc = &topo.association.listen;
    let outcomes = opts.state.join("outcomes.jsonl");
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let providers: Vec<&str> = topo.providers.iter().map(|p| p.id.as_str()).collect();
    let mut all_ok = true;
    let mut held = Vec::new();

    for (n, (label, intent)) in operations().iter().enumerate() {
        let body = intent.to_string().into_bytes();
        let request_id = format!("demo-{stamp}-{n}");
        let repr = repr_of(&body);
        let operation = operation_hex(&request_id, repr.as_str());
        println!("\n{} {label}: {}", st.paint("1", "==>"), intent);
        let r = request(
            hub,
            "POST",
            "/v1/payments",
            &[
                ("x-request-id", &request_id),
                ("x-delegation-id", "deleg-ops"),
                ("content-type", "application/json"),
            ],
            &body,
            Duration::from_secs(10),
        )
        .await?;
        println!(
            "    requester: {} (request id {request_id}; the hub returns no decision)",
            r.status
        );
        if r.status != 204 {
            println!("    {}", String::from_utf8_lossy(&r.body));
            all_ok = false;
        }
        // Wait until every provider's receipt came back and the association has the signals.
        let deadline = Instant::now() + opts.wait;
        let (mut receipts, mut op) = (Vec::new(), Value::Null);
        while Instant::now() < deadline {
            receipts = outcomes_for(&outcomes, &request_id);
            op = request(
                assoc,
                "GET",
                &format!("/operations/{operation}"),
                &[],
                b"",
                Duration::from_secs(2),
            )
            .await
            .map(|r| r.json())
            .unwrap_or(Value::Null);
            let signals = op["signals"].as_array().map(Vec::len).unwrap_or(0);
            if receipts.len() >= providers.len() && signals >= 2 * providers.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("    provider     verdict   START  COMPLETE  receipt via        rules");
        for p in &providers {
            let rec = receipts.iter().find(|r| r["provider"] == *p);
            let receipt: Value = rec
                .and_then(|r| serde_json::from_str(r["body"].as_str().unwrap_or("")).ok())
                .unwrap_or(Value::Null);
            let verdict = receipt["receipt"]["verdict"].as_str().unwrap_or("-");
            let rules = receipt["receipt"]["rules"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let has = |stage: &str| {
                op["signals"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s["signal"]["provider"] == *p && s["signal"]["stage"] == stage)
            };
            let via = rec
                .map(|r| r["hub_path"].as_str().unwrap_or("").replace(',', " -> "))
                .unwrap_or_else(|| "-".into());
            let (shown, rules) = if rec.is_none() && has("START") && !has("COMPLETE") {
                (
                    st.verdict("escalate"),
                    "held for an operator decision".to_string(),
                )
            } else {
                (st.verdict(verdict), rules)
            };
            println!(
                "    {:<12} {:<9} {:<6} {:<9} {:<18} {}",
                p,
                shown,
                st.ok(has("START")),
                st.ok(has("COMPLETE")),
                via,
                rules
            );
            if rec.is_none() && has("START") && !has("COMPLETE") {
                if let Some(spec) = topo.providers.iter().find(|x| x.id == *p) {
                    held.push(format!(
                        "curl -s -X POST http://{}/admin/escalations/{request_id} -d '{{\"decision\":\"approve\",\"operator\":\"ops-1\"}}'",
                        spec.admin
                    ));
                }
            }
        }
        println!("    linkage      {}", op["linkage"].as_str().unwrap_or("-"));
        match &op["confirmation"] {
            Value::Null => println!(
                "    confirmation {} (missing: {})",
                st.paint("33", "not confirmed"),
                op["missing"]
            ),
            c => println!(
                "    confirmation {} (seq {}, policy {}: {})",
                st.paint("32", "confirmed"),
                c["seq"],
                op["policy"]["name"].as_str().unwrap_or("-"),
                c["providers"]
            ),
        }
    }

    if !held.is_empty() {
        println!(
            "\n{} held escalations: an operator decides at the provider's admin listener, e.g.",
            st.paint("1", "==>")
        );
        for h in &held {
            println!("    {h}");
        }
    }
    println!("\n{} offline verification", st.paint("1", "==>"));
    let root = opts
        .conf
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    for p in &topo.providers {
        let cfg: Value = serde_json::from_slice(&std::fs::read(&p.config)?).unwrap_or(Value::Null);
        let store = root.join(cfg["store"].as_str().unwrap_or(""));
        let ok = run_check(
            Command::new(opts.bin_dir.join("multihub-provider"))
                .args(["verify", "--store"])
                .arg(&store),
            &p.id,
            "receipts, signatures, audit chain",
            &st,
        )?;
        all_ok &= ok;
    }
    let ok = run_check(
        Command::new(opts.bin_dir.join("multihub-association"))
            .args(["verify", "--store"])
            .arg(opts.state.join("association.db"))
            .arg("--config")
            .arg(opts.state.join("association.json")),
        "association",
        "signals, linkages, confirmations",
        &st,
    )?;
    all_ok &= ok;
    Ok(all_ok)
}

/// Runs an offline check and prints one line with its first line of output.
fn run_check(cmd: &mut Command, who: &str, what: &str, st: &Style) -> Result<bool, LaunchError> {
    let out = cmd.output()?;
    let ok = out.status.success();
    let first = String::from_utf8_lossy(if ok { &out.stdout } else { &out.stderr })
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    println!("    {who:<12} {what}: {}  {first}", st.ok(ok));
    Ok(ok)
}
