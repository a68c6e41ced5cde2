//! Library-level tests of the pipeline and the store, in-process (no listener): tampering with
//! stored rows is caught by `verify` naming the seq; a request in flight answers 409.

use http::HeaderMap;
use multihub_protocol::hashing::{binding_hex, repr_of};
use multihub_provider::config::{self, Config};
use multihub_provider::server::build;
use multihub_provider::service::Provider;
use multihub_provider::verify::verify_store;
use rusqlite::{params, Connection};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const POLICY: &str = r#"{"id":"p","version":"1","ops":{"transfer":"credit"},"max_amount":1000,
 "scoring":{"weights":{"amount":1},"default_target_trust_bp":8000}}"#;
const DELEGATIONS: &str =
    r#"{"version":1,"delegations":{"d":{"ops":["transfer"],"targets":["*"],"max_amount":1000}}}"#;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup(tag: &str) -> (Dir, Config) {
    let d = std::env::temp_dir().join(format!("mh-provider-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("pol")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(d.join("pol/p.json"), POLICY).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(d.join("deleg.json"), DELEGATIONS).unwrap_or_else(|e| panic!("{e}"));
    let cfg = serde_json::json!({
        "version": 1, "provider": "provider-x",
        "listen": "127.0.0.1:1", "admin_listen": "127.0.0.1:2",
        "key_file": d.join("state/key"), "store": d.join("state/db"),
        "policy": {"dir": d.join("pol"), "id": "p", "version": "1"},
        "delegations": d.join("deleg.json"),
        "association": {"url": "http://127.0.0.1:1"},
    });
    std::fs::write(d.join("cfg.json"), cfg.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let c = config::load(&d.join("cfg.json")).unwrap_or_else(|e| panic!("{e}"));
    (Dir(d), c)
}

fn headers(rid: &str, body: &[u8]) -> HeaderMap {
    let repr = repr_of(body);
    let mut h = HeaderMap::new();
    let mut put = |k: &'static str, v: String| {
        h.insert(k, v.parse().unwrap_or_else(|_| panic!("header {k}")));
    };
    put("x-request-id", rid.to_string());
    put("x-hub-binding", binding_hex(repr.as_str(), b""));
    put("x-hub-request-repr", repr.as_str().to_string());
    put("x-delegation-id", "d".into());
    h
}

fn body(amount: u64) -> Vec<u8> {
    serde_json::json!({"op": "transfer", "target": format!("acct-{}", amount % 2), "amount": amount})
        .to_string()
        .into_bytes()
}

async fn fill(p: &Provider, n: u64) {
    for i in 1..=n {
        let b = body(i);
        let r = p.ingest(&headers(&format!("r{i}"), &b), &b).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
}

fn broken_seq(store: &Path) -> Option<Option<u64>> {
    match verify_store(store).unwrap_or_else(|e| panic!("{e}")) {
        Ok(_) => None,
        Err(b) => Some(b.seq),
    }
}

fn copy_store(from: &Path, to: &Path) {
    // A consistent copy through SQLite's backup (the source is live, in WAL mode).
    let src = Connection::open(from).unwrap_or_else(|e| panic!("{e}"));
    src.execute("VACUUM INTO ?1", params![to.to_string_lossy()])
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_any_stored_row_is_caught_naming_the_seq() {
    let (dir, cfg) = setup("tamper");
    let built = build(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let p: Arc<Provider> = built.provider;
    fill(&p, 5).await;
    assert_eq!(broken_seq(&cfg.store), None, "untouched store verifies");

    type Tamper = (&'static str, &'static str, Option<u64>);
    let cases: [Tamper; 8] = [
        (
            "receipt body",
            "UPDATE receipts SET body = CAST(replace(CAST(body AS TEXT), '\"delta\":3', '\"delta\":4') AS BLOB) WHERE seq = 3",
            Some(3),
        ),
        (
            "receipt signature",
            "UPDATE receipts SET sig = 'AAAA' || substr(sig, 5) WHERE seq = 4",
            Some(4),
        ),
        (
            "stored request",
            "UPDATE receipts SET request = CAST('{}' AS BLOB) WHERE seq = 2",
            Some(2),
        ),
        (
            "audit recorded_at",
            "UPDATE audit SET recorded_at = recorded_at + 1 WHERE seq = 2",
            Some(2),
        ),
        (
            "order (two receipts swapped)",
            "UPDATE receipts SET seq = CASE seq WHEN 2 THEN -3 WHEN 3 THEN -2 END WHERE seq IN (2, 3);
             UPDATE receipts SET seq = -seq WHERE seq < 0",
            Some(2),
        ),
        ("audit entry deleted", "DELETE FROM audit WHERE seq = 4", Some(4)),
        (
            "receipt row deleted",
            "DELETE FROM receipts WHERE seq = 5",
            Some(5),
        ),
        (
            "ledger balance",
            "UPDATE ledger SET balance = balance + 1 WHERE account = 'acct-1'",
            None,
        ),
    ];
    for (what, sql, want) in cases {
        let copy = dir.0.join(format!("copy-{}.db", what.replace(' ', "-")));
        let _ = std::fs::remove_file(&copy);
        copy_store(&cfg.store, &copy);
        assert_eq!(
            broken_seq(&copy),
            None,
            "{what}: copy verifies before tampering"
        );
        let c = Connection::open(&copy).unwrap_or_else(|e| panic!("{e}"));
        c.execute_batch(sql)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        drop(c);
        assert_eq!(broken_seq(&copy), Some(want), "{what}");
        // The binary reports it and exits 1.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_multihub-provider"))
            .args(["verify", "--store"])
            .arg(&copy)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.status.code(), Some(1), "{what}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        match want {
            Some(s) => assert!(
                text.starts_with(&format!("broken at seq {s}:")),
                "{what}: {text}"
            ),
            None => assert!(text.starts_with("broken: ledger"), "{what}: {text}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_signed_but_wrong_receipt_fails_the_re_run() {
    // Even with the key, a receipt whose decision does not follow from its inputs and policy is
    // caught: the forger re-signs, re-hashes and re-chains, and verify still names the seq.
    let (_dir, cfg) = setup("resign");
    let built = build(&cfg).unwrap_or_else(|e| panic!("{e}"));
    fill(&built.provider, 3).await;
    let key = multihub_provider::keys::load(&cfg.key_file).unwrap_or_else(|e| panic!("{e}"));
    let c = Connection::open(&cfg.store).unwrap_or_else(|e| panic!("{e}"));
    let b: Vec<u8> = c
        .query_row("SELECT body FROM receipts WHERE seq = 2", [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut v: multihub_protocol::receipt::ReceiptBody =
        serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{e}"));
    v.scores.total_bp += 1;
    let forged = v.to_bytes();
    let sig = multihub_protocol::receipt::sign(&forged, &key);
    c.execute(
        "UPDATE receipts SET body = ?1, sig = ?2 WHERE seq = 2",
        params![forged, sig],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Re-chain from seq 2 on.
    let mut prev: String = c
        .query_row("SELECT entry_sha256 FROM audit WHERE seq = 1", [], |r| {
            r.get(0)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    for seq in 2..=3u64 {
        let (body, at): (Vec<u8>, i64) = c
            .query_row(
                "SELECT r.body, a.recorded_at FROM receipts r JOIN audit a ON a.seq = r.seq WHERE r.seq = ?1",
                params![seq as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let rs = multihub_protocol::receipt::receipt_sha256(&body);
        let e = multihub_protocol::receipt::AuditEntry::next(seq, &prev, &rs, at as u64);
        c.execute(
            "UPDATE audit SET prev = ?1, receipt_sha256 = ?2, entry_sha256 = ?3 WHERE seq = ?4",
            params![e.prev, e.receipt_sha256, e.entry_sha256, seq as i64],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        prev = e.entry_sha256;
    }
    drop(c);
    match verify_store(&cfg.store).unwrap_or_else(|e| panic!("{e}")) {
        Err(b) => {
            assert_eq!(b.seq, Some(2));
            assert!(b.reason.contains("re-running"), "{}", b.reason);
        }
        Ok(v) => panic!("forgery verified: {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_answers_409_with_retry_after() {
    let (_dir, cfg) = setup("inflight");
    let built = build(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let p = built.provider;
    // Hold the database's write lock so the first request waits in its START commit.
    let blocker = Connection::open(&cfg.store).unwrap_or_else(|e| panic!("{e}"));
    blocker
        .execute_batch("BEGIN IMMEDIATE")
        .unwrap_or_else(|e| panic!("{e}"));
    let b = body(9);
    let first = {
        let (p, b) = (p.clone(), b.clone());
        tokio::spawn(async move { p.ingest(&headers("same", &b), &b).await })
    };
    // Poll until the first request holds the key: then a duplicate answers 409.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while p.in_flight() == 0 {
        assert!(
            std::time::Instant::now() < end,
            "first request never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let dup = p.ingest(&headers("same", &b), &b).await;
    assert_eq!(dup.status, 409);
    assert!(dup
        .headers
        .iter()
        .any(|(k, v)| *k == "retry-after" && v == "1"));
    let v: serde_json::Value = serde_json::from_slice(&dup.body).unwrap_or_default();
    assert_eq!(v["error"], "in_flight");
    blocker
        .execute_batch("COMMIT")
        .unwrap_or_else(|e| panic!("{e}"));
    let r = first.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let again = p.ingest(&headers("same", &b), &b).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, r.body);
}
