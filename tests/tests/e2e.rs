//! End to end (issue 9): the seeds' topology of `conf/` — hub-a and hub-b, provider-a/b/c, the
//! association and the outcome sink — started by `multihub up` on fresh ports, driven as a
//! requester would, and checked at every component.

use multihub_protocol::hashing::{operation_hex, repr_of};
use multihub_tests::http::request;
use multihub_tests::provider::hub_headers;
use multihub_tests::topology::Topology;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);
const HUB_A: u16 = 8080;
const ASSOCIATION: u16 = 9300;

async fn send(
    t: &Topology,
    path: &str,
    request_id: &str,
    delegation: &str,
    body: &[u8],
) -> multihub_tests::Response {
    request(
        &t.addr(HUB_A),
        "POST",
        path,
        &[
            ("x-request-id", request_id),
            ("x-delegation-id", delegation),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", t.log()))
}

/// The receipts relayed back to the sink for a request: provider id → (hub path, answer JSON).
async fn receipts(t: &Topology, request_id: &str, n: usize) -> Vec<(String, String, Value)> {
    let end = Instant::now() + WAIT;
    loop {
        let got: Vec<(String, String, Value)> = t
            .outcomes()
            .into_iter()
            .filter(|o| o["request_id"] == request_id)
            .map(|o| {
                let body: Value =
                    serde_json::from_str(o["body"].as_str().unwrap_or("")).unwrap_or(Value::Null);
                (
                    o["provider"].as_str().unwrap_or("").to_string(),
                    o["hub_path"].as_str().unwrap_or("").to_string(),
                    body,
                )
            })
            .collect();
        if got.len() >= n || Instant::now() > end {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn operation(t: &Topology, op: &str) -> (u16, Value) {
    let r = request(
        &t.addr(ASSOCIATION),
        "GET",
        &format!("/operations/{op}"),
        &[],
        b"",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    (r.status, r.json())
}

/// Polls the association until `done(view)` holds (or the deadline passes) and returns the view.
async fn operation_until(t: &Topology, op: &str, done: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + WAIT;
    loop {
        let (_, v) = operation(t, op).await;
        if done(&v) || Instant::now() > end {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn stages(v: &Value, provider: &str) -> Vec<String> {
    v["signals"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["signal"]["provider"] == provider)
        .filter_map(|s| s["signal"]["stage"].as_str().map(str::to_string))
        .collect()
}

fn verdict(answer: &Value) -> &str {
    answer["receipt"]["verdict"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_behaviour_replay_and_offline_verification() {
    let mut t = Topology::start(|_| {}).await;
    let providers = ["provider-a", "provider-b", "provider-c"];

    // 1. An operation every provider accepts.
    let body = json!({"op": "transfer", "target": "acct-1", "amount": 50})
        .to_string()
        .into_bytes();
    let r = send(&t, "/v1/payments", "e2e-pass-1", "deleg-ops", &body).await;
    assert_eq!(r.status, 204, "{:?}\n{}", r.msg, t.component_log("hub-a"));
    assert!(
        r.body().is_empty(),
        "no authorization decision is returned to the requester"
    );
    assert!(r
        .msg
        .headers
        .iter()
        .all(|(k, _)| !k.to_ascii_lowercase().contains("verdict")));
    let repr = repr_of(&body);
    let op = operation_hex("e2e-pass-1", repr.as_str());
    let got = receipts(&t, "e2e-pass-1", 3).await;
    assert_eq!(
        got.len(),
        3,
        "a receipt from each provider, relayed back to the sink: {got:?}"
    );
    for (provider, path, answer) in &got {
        assert_eq!(verdict(answer), "pass", "{provider}: {answer}");
        // Each provider decided on exactly the requester's bytes, and on nothing else.
        assert_eq!(
            answer["receipt"]["request_repr"],
            repr.as_str(),
            "{provider}"
        );
        assert_eq!(answer["receipt"]["provider"], provider.as_str());
        assert_eq!(
            answer["receipt"]["intent"],
            json!({"op": "transfer", "target": "acct-1", "amount": 50, "params": {}})
        );
        let expected_path = if provider == "provider-a" {
            "hub-a"
        } else {
            "hub-a,hub-b"
        };
        assert_eq!(
            path, expected_path,
            "{provider}'s receipt travelled back along its hub path"
        );
        for other in providers.iter().filter(|p| **p != provider.as_str()) {
            assert!(
                !answer.to_string().contains(other),
                "{provider}'s receipt mentions {other}"
            );
        }
    }
    let v = operation_until(&t, &op, |v| !v["confirmation"].is_null()).await;
    for p in providers {
        let mut s = stages(&v, p);
        s.sort();
        assert_eq!(s, ["COMPLETE", "START"], "{p}: {v}");
    }
    assert!(
        !v["confirmation"].is_null(),
        "confirmed from boundary linkage alone: {v}"
    );
    assert_eq!(v["confirmation"]["linkage"], v["linkage"]);

    // 2. One request, three independent decisions: provider-b's policy caps amounts at 2000.
    let body2 = json!({"op": "transfer", "target": "acct-1", "amount": 3000})
        .to_string()
        .into_bytes();
    let r = send(&t, "/v1/payments", "e2e-mixed-1", "deleg-ops", &body2).await;
    assert_eq!(r.status, 204);
    let got = receipts(&t, "e2e-mixed-1", 3).await;
    let by: std::collections::BTreeMap<&str, &str> = got
        .iter()
        .map(|(p, _, a)| (p.as_str(), verdict(a)))
        .collect();
    assert_eq!(by.get("provider-a"), Some(&"pass"), "{got:?}");
    assert_eq!(by.get("provider-b"), Some(&"block"), "{got:?}");
    assert_eq!(by.get("provider-c"), Some(&"pass"), "{got:?}");

    // 3. Replaying the same request id through the topology executes nothing twice.
    let before = t.outcomes().len();
    let r = send(&t, "/v1/payments", "e2e-pass-1", "deleg-ops", &body).await;
    assert_eq!(r.status, 204);
    let replays = receipts(&t, "e2e-pass-1", 6).await;
    let first: Vec<&Value> = replays.iter().take(3).map(|(_, _, a)| a).collect();
    for (p, _, a) in replays.iter().skip(3) {
        let orig = first
            .iter()
            .find(|o| o["receipt"]["provider"] == p.as_str());
        assert_eq!(
            orig.map(|o| &o["audit"]),
            Some(&a["audit"]),
            "{p}: the stored receipt again, same audit seq"
        );
    }
    assert!(t.outcomes().len() >= before);
    let v = operation_until(&t, &op, |_| true).await;
    assert_eq!(
        v["signals"].as_array().map(Vec::len),
        Some(6),
        "no new signal for a replay: {v}"
    );

    // 4. Stop cleanly, then every receipt verifies offline and every linkage recomputes.
    assert_eq!(t.stop().await, Some(0), "{}", t.log());
    let root = t.root().to_path_buf();
    for p in providers {
        let store = root.join("state").join(p).join("provider.db");
        let (code, out, err) = multihub_tests::run_bin(
            "multihub-provider",
            &["verify", "--store", &store.to_string_lossy()],
        );
        assert_eq!(code, 0, "{p}: {out}{err}");
    }
    let (code, out, err) = multihub_tests::run_bin(
        "multihub-association",
        &[
            "verify",
            "--store",
            &root.join("state/association.db").to_string_lossy(),
            "--config",
            &root.join("state/association.json").to_string_lossy(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampering_hub_gets_400_and_nothing_executes() {
    let t = Topology::start(|_| {}).await;
    let provider_a = t.addr(9101);
    let body = json!({"op": "transfer", "target": "acct-1", "amount": 50})
        .to_string()
        .into_bytes();
    let mut altered = body.clone();
    let i = altered.len() - 2;
    altered[i] = b'9'; // a different target
                       // (a) The body altered after the hub hashed it.
    let mut headers = hub_headers("e2e-tamper-1", &body, b"");
    headers.push(("x-delegation-id", "deleg-ops".into()));
    let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = request(&provider_a, "POST", "/v1/payments", &hdrs, &altered)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("tampered")),
        "{:?}",
        r.msg
    );
    // (b) The binding header altered.
    let mut headers = hub_headers("e2e-tamper-2", &body, b"ctx");
    headers.push(("x-hub-context", "other-ctx".into()));
    headers.push(("x-delegation-id", "deleg-ops".into()));
    let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = request(&provider_a, "POST", "/v1/payments", &hdrs, &body)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 400, "{:?}", r.msg);
    // Nothing executed, nothing signalled.
    for (id, b) in [("e2e-tamper-1", &altered), ("e2e-tamper-2", &body)] {
        let op = operation_hex(id, repr_of(b).as_str());
        let (status, v) = operation(&t, &op).await;
        assert_eq!(status, 404, "no signal for a tampered request: {v}");
        let op2 = operation_hex(id, repr_of(&body).as_str());
        assert_eq!(operation(&t, &op2).await.0, 404);
    }
    let r = request(&t.addr(9111), "GET", "/metrics", &[], b"")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(r.body()).into_owned();
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("provider_receipts_total") && !l.ends_with(" 0")),
        "no receipt was made:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_delegation_blocks_one_provider_all_of_waits_quorum_confirms() {
    let t = Topology::start(|_| {}).await;
    let r = request(
        &t.addr(9112),
        "POST",
        "/admin/delegations/deleg-small/revoke",
        &[],
        b"",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(r.status < 300, "revoke at provider-b: {:?}", r.msg);
    let body = json!({"op": "transfer", "target": "acct-1", "amount": 50})
        .to_string()
        .into_bytes();
    // /v1/payments: the association's policy for route `payments` is all_of [a, b, c].
    let r = send(&t, "/v1/payments", "e2e-revoked-all", "deleg-small", &body).await;
    assert_eq!(r.status, 204);
    let got = receipts(&t, "e2e-revoked-all", 3).await;
    let by: std::collections::BTreeMap<&str, &str> = got
        .iter()
        .map(|(p, _, a)| (p.as_str(), verdict(a)))
        .collect();
    assert_eq!(by.get("provider-b"), Some(&"block"), "{got:?}");
    assert_eq!(by.get("provider-a"), Some(&"pass"));
    assert_eq!(by.get("provider-c"), Some(&"pass"));
    let op = operation_hex("e2e-revoked-all", repr_of(&body).as_str());
    let v = operation_until(&t, &op, |v| {
        v["signals"].as_array().map(Vec::len) >= Some(5)
    })
    .await;
    assert_eq!(
        stages(&v, "provider-b"),
        ["START"],
        "a blocked provider crosses no COMPLETE boundary: {v}"
    );
    assert!(v["confirmation"].is_null(), "all_of is not confirmed: {v}");
    assert_eq!(v["route"], "payments");
    // /v1/notify: policy quorum 2 — satisfied by provider-a and provider-c.
    let r = send(&t, "/v1/notify", "e2e-revoked-quorum", "deleg-small", &body).await;
    assert_eq!(r.status, 204);
    let op = operation_hex("e2e-revoked-quorum", repr_of(&body).as_str());
    let v = operation_until(&t, &op, |v| !v["confirmation"].is_null()).await;
    assert!(!v["confirmation"].is_null(), "quorum 2 confirmed: {v}");
    assert_eq!(v["route"], "notify");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_hubs_still_get_each_provider_to_decide_on_each_request() {
    // Both hubs pipeline their deliveries to providers and to the peer (opt-in per upstream).
    let t = Topology::start(|conf| {
        for hub in ["hub-a", "hub-b"] {
            let f = conf.join(hub).join("routes").join("2026-11-21.1.json");
            let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{e}"));
            let mut v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
            for section in ["providers", "peers"] {
                if let Some(m) = v[section].as_object_mut() {
                    for u in m.values_mut() {
                        u["pipeline"] = json!({ "depth": 8, "connections": 1 });
                    }
                }
            }
            std::fs::write(&f, v.to_string()).unwrap_or_else(|e| panic!("{e}"));
        }
    })
    .await;
    let n = 12;
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            json!({"op": "transfer", "target": "acct-1", "amount": 40 + i})
                .to_string()
                .into_bytes()
        })
        .collect();
    let sends: Vec<_> = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| {
            let (addr, body) = (t.addr(HUB_A), body.clone());
            tokio::spawn(async move {
                let id = format!("e2e-pipe-{i}");
                let h = [
                    ("x-request-id", id.as_str()),
                    ("x-delegation-id", "deleg-ops"),
                    ("content-type", "application/json"),
                ];
                request(&addr, "POST", "/v1/payments", &h, &body)
                    .await
                    .map(|r| r.status)
            })
        })
        .collect();
    for (i, s) in sends.into_iter().enumerate() {
        let status = s
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("request {i}: {e}\n{}", t.log()));
        assert_eq!(status, 204, "request {i}\n{}", t.component_log("hub-a"));
    }
    for (i, body) in bodies.iter().enumerate() {
        let id = format!("e2e-pipe-{i}");
        let got = receipts(&t, &id, 3).await;
        let mut providers: Vec<&str> = got.iter().map(|(p, _, _)| p.as_str()).collect();
        providers.sort();
        assert_eq!(
            providers,
            ["provider-a", "provider-b", "provider-c"],
            "{id}: {got:?}"
        );
        for (provider, _, answer) in &got {
            assert_eq!(verdict(answer), "pass", "{id} at {provider}: {answer}");
            // Decided on this request's own bytes: no answer went to another request.
            assert_eq!(
                answer["receipt"]["request_repr"],
                repr_of(body).as_str(),
                "{id} at {provider}"
            );
        }
    }
    let r = request(&t.addr(9180), "GET", "/metrics", &[], b"")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(r.body()).into_owned();
    let piped = text
        .lines()
        .find_map(|l| l.strip_prefix("hub_pipelined_deliveries_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    // Each request went to provider-a and to hub-b.
    assert_eq!(piped, Some(2.0 * n as f64), "{text}");
}

#[tokio::test]
async fn up_refuses_to_start_anything_while_an_address_of_conf_is_taken() {
    // As when an earlier `multihub up` still runs: hub-b's admin address is held.
    let (dir, ports) = Topology::copy_conf();
    let held = ports.get(&9181).copied().unwrap_or(9181);
    let _held = std::net::TcpListener::bind(("127.0.0.1", held))
        .unwrap_or_else(|e| panic!("bind {held}: {e}"));
    let log = dir.path().join("up.log");
    let (code, out) =
        multihub_tests::procs::exit_within(Topology::up(&dir), &log, Duration::from_secs(20)).await;
    assert!(matches!(code, Some(c) if c != 0), "{code:?}:\n{out}");
    assert!(
        out.contains(&format!("cannot listen on 127.0.0.1:{held}: ")),
        "{out}"
    );
    assert!(out.contains("earlier `multihub up`"), "{out}");
    assert!(!dir.path().join("state").exists(), "nothing was started");
}
