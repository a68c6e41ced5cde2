//! Reference provider (issue 7): every test runs the real `multihub-provider` binary against
//! in-process recording upstreams (association, outcome sink).

use multihub_protocol::signal::{Signal, Stage};
use multihub_tests::http::request;
use multihub_tests::procs::{assert_cannot_listen, taken_port};
use multihub_tests::provider::{
    hub_headers, receipt_bytes, run_in_root, run_provider_in, write_config, ProviderProc,
};
use multihub_tests::{eventually, sha256_hex, Behaviour, Recorder, TempDir};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

fn intent(op: &str, target: &str, amount: u64) -> Vec<u8> {
    json!({"op": op, "target": target, "amount": amount})
        .to_string()
        .into_bytes()
}

/// Signals recorded by the association, parsed (every one must be canonical).
fn signals(assoc: &Recorder) -> Vec<(Signal, Vec<u8>)> {
    assoc
        .requests()
        .into_iter()
        .filter(|r| r.path == "/signals")
        .map(|r| {
            let s = Signal::parse(&r.body).unwrap_or_else(|e| panic!("non-canonical signal: {e}"));
            (s, r.body)
        })
        .collect()
}

fn has_signal(assoc: &Recorder, request_id: &str, stage: Stage) -> bool {
    signals(assoc)
        .iter()
        .any(|(s, _)| s.request_id == request_id && s.stage == stage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_receipt_signals_and_outcome() {
    let assoc = Recorder::start(Behaviour::Status(201)).await;
    let sink = Recorder::start(Behaviour::Status(202)).await;
    let p = ProviderProc::start("provider-t", &assoc.url()).await;
    let body = intent("transfer", "acct-1", 40);
    let outcome_url = format!("{}/_hub/outcomes", sink.url());
    let r = p
        .post(
            "req-pass-1",
            &body,
            &[
                ("x-delegation-id", "d-ops"),
                ("x-hub-outcome-url", &outcome_url),
                ("x-hub-path", "hub-a,hub-b"),
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", p.logs()));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(r.body()));
    assert_eq!(r.header("x-provider-id"), Some("provider-t"));
    let v = r.json();
    assert_eq!(v["receipt"]["verdict"], "pass");
    assert_eq!(
        v["receipt"]["effect"],
        json!({"account": "acct-1", "delta": 40})
    );
    assert_eq!(v["receipt"]["delegation"]["id"], "d-ops");
    assert_eq!(v["receipt"]["policy"]["id"], "test-policy");
    assert_eq!(v["audit"]["seq"], 1);
    // No clock, sequence or chain data inside the signed body.
    let receipt = receipt_bytes(r.body());
    let text = String::from_utf8_lossy(&receipt).into_owned();
    for banned in ["recorded_at", "seq", "prev", "entry_sha256"] {
        assert!(!text.contains(banned), "{banned} in {text}");
    }
    // START and COMPLETE reach the association; COMPLETE's boundary is the receipt's sha256.
    eventually("START and COMPLETE", WAIT, || {
        (has_signal(&assoc, "req-pass-1", Stage::Start)
            && has_signal(&assoc, "req-pass-1", Stage::Complete))
        .then_some(())
    })
    .await;
    let sigs = signals(&assoc);
    let complete = sigs
        .iter()
        .find(|(s, _)| s.stage == Stage::Complete)
        .map(|(s, _)| s.clone())
        .unwrap_or_else(|| panic!("no COMPLETE"));
    assert_eq!(complete.boundary, sha256_hex(&receipt));
    assert_eq!(complete.provider, "provider-t");
    assert_eq!(complete.key_id, v["key_id"].as_str().unwrap_or(""));
    assert_eq!(
        Some(complete.request_repr.as_str()),
        v["receipt"]["request_repr"].as_str()
    );
    assert_eq!(
        sigs.iter()
            .find(|(s, _)| s.stage == Stage::Start)
            .map(|(s, _)| s.operation.clone()),
        Some(complete.operation.clone())
    );
    // The outcome: the same bytes the provider answered, with the relay headers.
    let o = eventually("outcome", WAIT, || sink.requests().into_iter().next()).await;
    assert_eq!(o.path, "/_hub/outcomes");
    assert_eq!(o.body, r.body());
    assert_eq!(o.header("x-request-id"), Some("req-pass-1"));
    assert_eq!(o.header("x-provider-id"), Some("provider-t"));
    assert_eq!(o.header("x-hub-path"), Some("hub-a,hub-b"));
    // The store verifies; the ledger holds the effect once.
    let (code, out) = p.verify();
    assert_eq!(code, 0, "{out}");
    let l = p.ledger().await;
    assert_eq!(l["balances"]["acct-1"], 40);
    assert_eq!(l["receipts"], 1);
    // replay: same inputs → byte-identical receipt.
    let dir = TempDir::new("replay");
    let f = dir.write("intent.json", &body);
    let (code, out, err) = run_provider_in(
        dir.path(),
        &[
            "replay",
            "--intent",
            &f.to_string_lossy(),
            "--delegation",
            "d-ops",
            "--policy",
            &p.policy_file.to_string_lossy(),
            "--delegations",
            &p.delegations_file.to_string_lossy(),
            "--provider",
            "provider-t",
            "--request-id",
            "req-pass-1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim_end().as_bytes(), &receipt[..]);
    // Metrics are served on the admin listener.
    let m = request(&p.admin, "GET", "/metrics", &[], b"")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let m = String::from_utf8_lossy(m.body()).into_owned();
    assert!(
        m.contains("provider_requests_total{outcome=\"pass\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_conflict_and_mismatch_semantics() {
    let assoc = Recorder::start(Behaviour::Status(201)).await;
    let p = ProviderProc::start("provider-t", &assoc.url()).await;
    let body = intent("deposit", "acct-2", 7);
    let d = [("x-delegation-id", "d-ops")];
    let first = p
        .post("req-idem", &body, &d)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-idempotent-replay"), None);
    let again = p
        .post("req-idem", &body, &d)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.status, 200);
    assert_eq!(again.header("x-idempotent-replay"), Some("true"));
    assert_eq!(again.body(), first.body(), "stored response bytes again");
    // Same key, different intent → 422.
    let other = intent("deposit", "acct-2", 8);
    let r = p
        .post("req-idem", &other, &d)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["error"], "idempotency_mismatch");
    // Idempotency-Key takes precedence over x-request-id.
    let k = [("x-delegation-id", "d-ops"), ("idempotency-key", "key-1")];
    let a = p
        .post("req-k1", &body, &k)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let b = p
        .post("req-k2", &body, &k)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(b.header("x-idempotent-replay"), Some("true"));
    assert_eq!(a.body(), b.body());
    // The key is per caller: the same request id under another delegation is a new request.
    let r = p
        .post(
            "req-idem",
            &intent("transfer", "acct-1", 5),
            &[("x-delegation-id", "d-small")],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-idempotent-replay"), None);
    // Concurrent duplicates: exactly one executes; the others replay or get 409 + Retry-After.
    let body = intent("deposit", "acct-3", 1);
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let addr = p.addr.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let h = hub_headers("req-race", &body, b"");
            let mut all: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            all.push(("x-delegation-id", "d-ops"));
            request(&addr, "POST", "/v1/payments", &all, &body).await
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        let r = t
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        match r.status {
            200 if r.header("x-idempotent-replay").is_none() => fresh += 1,
            200 => {}
            409 => {
                assert_eq!(r.header("retry-after"), Some("1"));
                assert_eq!(r.json()["error"], "in_flight");
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(fresh, 1);
    let l = p.ledger().await;
    assert_eq!(l["balances"]["acct-3"], 1, "one effect");
    assert_eq!(l["balances"]["acct-2"], 14, "req-idem once, key-1 once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_or_invalid_requests_execute_nothing() {
    let assoc = Recorder::start(Behaviour::Status(201)).await;
    let p = ProviderProc::start("provider-t", &assoc.url()).await;
    let body = intent("transfer", "acct-1", 5);
    let h = hub_headers("req-t", &body, b"ctx");
    let repr = h[1].1.clone();
    let binding = h[2].1.clone();
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<u8>, &'a str);
    let cases: Vec<Case> = vec![
        // Body changed in transit: repr no longer matches.
        (
            vec![
                ("x-hub-request-repr", &repr),
                ("x-hub-binding", &binding),
                ("x-hub-context", "ctx"),
            ],
            intent("transfer", "acct-1", 500),
            "x-hub-request-repr",
        ),
        // Context changed: binding no longer matches.
        (
            vec![
                ("x-hub-request-repr", &repr),
                ("x-hub-binding", &binding),
                ("x-hub-context", "other"),
            ],
            body.clone(),
            "x-hub-binding",
        ),
        (
            vec![("x-hub-binding", &binding)],
            body.clone(),
            "x-hub-request-repr: missing",
        ),
        (
            vec![("x-hub-request-repr", &repr), ("x-hub-context", "ctx")],
            body.clone(),
            "x-hub-binding: missing",
        ),
    ];
    for (headers, b, field) in cases {
        let mut all = vec![("x-request-id", "req-t"), ("x-delegation-id", "d-ops")];
        all.extend(headers);
        let r = request(&p.addr, "POST", "/v1/payments", &all, &b)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, 400, "{field}");
        assert_eq!(r.json()["error"], "tampered");
        assert!(
            r.json()["detail"].as_str().unwrap_or("").contains(field),
            "{}",
            r.json()
        );
    }
    // With the right context the same headers are accepted.
    // Invalid intents name the field.
    for (b, field) in [
        (
            br#"{"op":"transfer","target":"acct-1","amount":1.5}"#.to_vec(),
            "amount",
        ),
        (
            br#"{"op":"transfer","target":"acct-1","amount":1,"extra":1}"#.to_vec(),
            "extra",
        ),
        (br#"{"op":"transfer","amount":1}"#.to_vec(), "target"),
        (
            br#"{"op":"transfer","target":"a","amount":1,"params":{"x":0.5}}"#.to_vec(),
            "params.x",
        ),
    ] {
        let r = p
            .post("req-bad", &b, &[("x-delegation-id", "d-ops")])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["error"], "bad_intent");
        assert!(
            r.json()["detail"].as_str().unwrap_or("").starts_with(field),
            "{}",
            r.json()
        );
    }
    // Body cap (4096 in the test config) → 413.
    let big = vec![b' '; 5000];
    let r = p
        .post("req-big", &big, &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"], "body_too_large");
    // Missing request id.
    let r = request(&p.addr, "POST", "/x", &[], &body)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("bad_request_id"))
    );
    let r = request(&p.addr, "GET", "/x", &[], b"")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 405);
    // Nothing executed, nothing signalled: a valid request afterwards is receipt seq 1 and its
    // START / COMPLETE are the only signals.
    let ok = p
        .post("req-ok", &body, &[("x-delegation-id", "d-ops")])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["audit"]["seq"], 1);
    eventually("signals of req-ok", WAIT, || {
        has_signal(&assoc, "req-ok", Stage::Complete).then_some(())
    })
    .await;
    let ids: Vec<String> = signals(&assoc)
        .into_iter()
        .map(|(s, _)| s.request_id)
        .collect();
    assert!(ids.iter().all(|i| i == "req-ok"), "{ids:?}");
    assert_eq!(p.ledger().await["balances"], json!({"acct-1": 5}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_delegation_gets_a_blocked_receipt() {
    let assoc = Recorder::start(Behaviour::Status(201)).await;
    let p = ProviderProc::start("provider-t", &assoc.url()).await;
    let d = [("x-delegation-id", "d-ops")];
    let r = p
        .post("req-before", &intent("transfer", "acct-1", 3), &d)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.json()["receipt"]["verdict"], "pass");
    let rv = request(
        &p.admin,
        "POST",
        "/admin/delegations/d-ops/revoke",
        &[],
        b"",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rv.status, 200, "{}", String::from_utf8_lossy(rv.body()));
    let unknown = request(&p.admin, "POST", "/admin/delegations/nope/revoke", &[], b"")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(unknown.status, 404);
    let r = p
        .post("req-after", &intent("transfer", "acct-1", 3), &d)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["receipt"]["verdict"], "block");
    assert_eq!(v["receipt"]["rules"], json!(["delegation.revoked"]));
    assert_eq!(v["receipt"]["delegation"]["revoked"], true);
    assert_eq!(v["receipt"]["effect"], Value::Null);
    assert!(v["sig"].as_str().is_some_and(|s| !s.is_empty()));
    // Unknown delegation and anonymous callers: blocked with a named rule, still signed.
    let r = p
        .post(
            "req-unk",
            &intent("transfer", "acct-1", 3),
            &[("x-delegation-id", "ghost")],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.json()["receipt"]["rules"], json!(["delegation.unknown"]));
    let r = p
        .post("req-anon", &intent("transfer", "acct-1", 3), &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.json()["receipt"]["rules"], json!(["delegation.missing"]));
    // Revocation is durable: after a restart the delegation is still revoked.
    let mut p = p;
    p.kill9();
    p.spawn().await;
    let r = p
        .post("req-after-restart", &intent("transfer", "acct-1", 3), &d)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.json()["receipt"]["rules"], json!(["delegation.revoked"]));
    assert_eq!(p.ledger().await["balances"]["acct-1"], 3);
    let (code, out) = p.verify();
    assert_eq!(code, 0, "{out}");
    // A blocked request crosses START only: no effect, so no COMPLETE boundary.
    eventually("START of the blocked request", WAIT, || {
        has_signal(&assoc, "req-after", Stage::Start).then_some(())
    })
    .await;
    assert!(!has_signal(&assoc, "req-after", Stage::Complete));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalate_then_approve_or_deny() {
    let assoc = Recorder::start(Behaviour::Status(201)).await;
    let p = ProviderProc::start("provider-t", &assoc.url()).await;
    let d = [("x-delegation-id", "d-ops")];
    let body = intent("transfer", "acct-9", 700); // above escalate_above (500)
    let r = p
        .post("req-esc", &body, &d)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(r.body()));
    assert_eq!(r.json()["status"], "escalated");
    assert_eq!(r.json()["rules"], json!(["policy.escalate_amount"]));
    // Held: a retry gets the same 202; nothing executed yet.
    let again = p
        .post("req-esc", &body, &d)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.status, 202);
    assert_eq!(p.ledger().await["receipts"], 0);
    // Bad decisions name the field; unknown request ids are 404.
    let bad = request(
        &p.admin,
        "POST",
        "/admin/escalations/req-esc",
        &[],
        br#"{"decision":"maybe","operator":"op-1"}"#,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bad.status, 400);
    assert!(bad.json()["detail"]
        .as_str()
        .unwrap_or("")
        .starts_with("decision"));
    let none = request(
        &p.admin,
        "POST",
        "/admin/escalations/nope",
        &[],
        br#"{"decision":"approve","operator":"op-1"}"#,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(none.status, 404);
    // Approve: the pipeline resumes and the decision is an input recorded in the receipt.
    let ok = request(
        &p.admin,
        "POST",
        "/admin/escalations/req-esc",
        &[],
        br#"{"decision":"approve","operator":"op-1"}"#,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(ok.body()));
    let v = ok.json();
    assert_eq!(v["receipt"]["verdict"], "pass");
    assert_eq!(
        v["receipt"]["escalation"],
        json!({"decision": "approve", "operator": "op-1"})
    );
    assert!(v["receipt"]["rules"]
        .as_array()
        .is_some_and(|a| a.contains(&json!("escalation.approved"))));
    assert_eq!(
        v["receipt"]["effect"],
        json!({"account": "acct-9", "delta": 700})
    );
    // The requester's retry now replays the receipt.
    let r = p
        .post("req-esc", &body, &d)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-idempotent-replay"), Some("true"));
    assert_eq!(r.body(), ok.body());
    // A second decision finds nothing held.
    let twice = request(
        &p.admin,
        "POST",
        "/admin/escalations/req-esc",
        &[],
        br#"{"decision":"deny","operator":"op-2"}"#,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(twice.status, 404);
    // Deny: a blocked receipt, no effect.
    let body2 = intent("transfer", "acct-risky", 10); // low target trust escalates
    let r = p
        .post("req-esc-2", &body2, &d)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 202);
    let no = request(
        &p.admin,
        "POST",
        "/admin/escalations/req-esc-2",
        &[],
        br#"{"decision":"deny","operator":"op-2"}"#,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let v = no.json();
    assert_eq!(v["receipt"]["verdict"], "block");
    assert_eq!(v["receipt"]["effect"], Value::Null);
    assert_eq!(p.ledger().await["balances"], json!({"acct-9": 700}));
    let (code, out) = p.verify();
    assert_eq!(code, 0, "{out}");
    // replay with the recorded decision reproduces the approved receipt byte for byte.
    let dir = TempDir::new("replay-esc");
    let f = dir.write("intent.json", &body);
    let (code, out, err) = run_provider_in(
        dir.path(),
        &[
            "replay",
            "--intent",
            &f.to_string_lossy(),
            "--delegation",
            "d-ops",
            "--policy",
            &p.policy_file.to_string_lossy(),
            "--delegations",
            &p.delegations_file.to_string_lossy(),
            "--provider",
            "provider-t",
            "--request-id",
            "req-esc",
            "--decision",
            "approve",
            "--operator",
            "op-1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim_end().as_bytes(), &receipt_bytes(ok.body())[..]);
}

/// Sends one request until it gets a 200 (retrying on connection errors, 409 and 5xx).
async fn until_done(addr: &str, i: usize) -> Vec<u8> {
    let body = intent("deposit", &format!("acct-{}", i % 5), (i % 7 + 1) as u64);
    let rid = format!("crash-{i}");
    let h = hub_headers(&rid, &body, b"");
    let mut all: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.push(("x-delegation-id", "d-ops"));
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(r) = request(addr, "POST", "/v1/payments", &all, &body).await {
            if r.status == 200 {
                return r.body().to_vec();
            }
            assert!(
                r.status == 409 || r.status >= 500,
                "request {i}: {}",
                r.status
            );
        }
        assert!(Instant::now() < end, "request {i} never completed");
        // Client retry backoff (not a timing assumption of the test).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_load_then_restart_keeps_exactly_once() {
    const N: usize = 240;
    let assoc = Recorder::start(Behaviour::Status(201)).await;
    let mut p = ProviderProc::start("provider-t", &assoc.url()).await;
    let addr = Arc::new(p.addr.clone());
    let done = Arc::new(std::sync::Mutex::new(HashMap::<usize, Vec<u8>>::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (addr, done, next) = (addr.clone(), done.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= N {
                    return;
                }
                let b = until_done(&addr, i).await;
                done.lock().unwrap_or_else(|e| e.into_inner()).insert(i, b);
            }
        }));
    }
    // Kill mid-load, once some requests are done and others are in flight.
    eventually("a third of the load", WAIT, || {
        (done.lock().map(|d| d.len()).unwrap_or(0) >= N / 3).then_some(())
    })
    .await;
    p.kill9();
    let completed_before = done.lock().map(|d| d.len()).unwrap_or(0);
    assert!(completed_before < N, "the kill must land during the load");
    eprintln!("killed with {completed_before} of {N} requests answered");
    p.spawn().await;
    for w in workers {
        w.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let done = done.lock().map(|d| d.clone()).unwrap_or_default();
    assert_eq!(done.len(), N);
    // Every answer is a receipt; retrying now replays the same bytes.
    for i in [0, N / 2, N - 1] {
        let again = until_done(&p.addr, i).await;
        assert_eq!(Some(&again), done.get(&i), "request {i}");
    }
    // Exactly one effect and one receipt per request.
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..N {
        *want.entry(format!("acct-{}", i % 5)).or_default() += (i % 7 + 1) as i64;
    }
    let l = p.ledger().await;
    assert_eq!(l["receipts"], N, "{l}");
    assert_eq!(
        l["balances"],
        serde_json::to_value(&want).unwrap_or_default()
    );
    let mut seqs: Vec<u64> = done
        .values()
        .map(|b| {
            serde_json::from_slice::<Value>(b)
                .map(|v| v["audit"]["seq"].as_u64().unwrap_or(0))
                .unwrap_or(0)
        })
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), N, "distinct audit seqs");
    let (code, out) = p.verify();
    assert_eq!(code, 0, "{out}");
    // START and COMPLETE for every committed operation; duplicates only as identical resends.
    let receipts: HashMap<String, Vec<u8>> = done
        .values()
        .map(|b| {
            let r = receipt_bytes(b);
            let v: Value = serde_json::from_slice(&r).unwrap_or_default();
            (v["request_id"].as_str().unwrap_or("").to_string(), r)
        })
        .collect();
    eventually(
        "START and COMPLETE for every request",
        Duration::from_secs(60),
        || {
            let mut stages: HashMap<(String, Stage), usize> = HashMap::new();
            for (s, _) in signals(&assoc) {
                *stages.entry((s.request_id, s.stage)).or_default() += 1;
            }
            (0..N)
                .all(|i| {
                    let rid = format!("crash-{i}");
                    stages.contains_key(&(rid.clone(), Stage::Start))
                        && stages.contains_key(&(rid, Stage::Complete))
                })
                .then_some(())
        },
    )
    .await;
    let mut by_key: HashMap<(String, Stage), Vec<u8>> = HashMap::new();
    for (s, bytes) in signals(&assoc) {
        if s.stage == Stage::Complete {
            let r = receipts
                .get(&s.request_id)
                .unwrap_or_else(|| panic!("unknown {}", s.request_id));
            assert_eq!(
                s.boundary,
                sha256_hex(r),
                "COMPLETE boundary of {}",
                s.request_id
            );
        }
        let prev = by_key
            .entry((s.request_id.clone(), s.stage))
            .or_insert_with(|| bytes.clone());
        assert_eq!(
            *prev, bytes,
            "non-identical duplicate for {} {:?}",
            s.request_id, s.stage
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_retries_until_acknowledged_and_survives_restart() {
    let assoc = Recorder::start(Behaviour::Status(503)).await;
    let mut p = ProviderProc::start("provider-t", &assoc.url()).await;
    let r = p
        .post(
            "req-ob",
            &intent("transfer", "acct-1", 2),
            &[("x-delegation-id", "d-ops")],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        r.status, 200,
        "the answer does not wait for the association"
    );
    eventually("retries", WAIT, || (assoc.count() >= 4).then_some(())).await;
    p.kill9();
    assoc.set(Behaviour::Status(201));
    let before = assoc.count();
    p.spawn().await;
    eventually("delivery after restart", WAIT, || {
        let recent: Vec<_> = assoc.requests().into_iter().skip(before).collect();
        let stages: Vec<String> = recent
            .iter()
            .filter_map(|r| Signal::parse(&r.body).ok())
            .map(|s| s.stage.as_str().to_string())
            .collect();
        (stages.contains(&"START".to_string()) && stages.contains(&"COMPLETE".to_string()))
            .then_some(())
    })
    .await;
    // The restarted provider's own acknowledgements (a request the killed process sent may be
    // recorded late and is not proof that the new one is done).
    eventually("req-ob acknowledged after restart", WAIT, || {
        metrics_text(&p.admin)
            .contains("provider_outbox_deliveries_total{kind=\"signal\",result=\"ok\"} 2")
            .then_some(())
    })
    .await;
    // A 409 is final: counted, not retried forever.
    assoc.set(Behaviour::Status(409));
    let r = p
        .post(
            "req-409",
            &intent("transfer", "acct-1", 2),
            &[("x-delegation-id", "d-ops")],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200);
    let m = eventually("conflict counted", WAIT, || {
        let m = metrics_text(&p.admin);
        m.contains("provider_outbox_deliveries_total{kind=\"signal\",result=\"conflict\"} 2")
            .then_some(m)
    })
    .await;
    assert!(!m.contains("result=\"conflict\"} 3"));
}

/// Fetches /metrics synchronously (for use inside `eventually`).
fn metrics_text(admin: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(admin) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn example_configs_validate_and_keygen_writes_a_0600_key() {
    for x in ["a", "b", "c"] {
        let cfg = format!("conf/provider-{x}/provider.json");
        let (code, out, err) = run_in_root(&["--config", &cfg, "--validate"]);
        assert_eq!(code, 0, "{cfg}: {out}{err}");
        assert!(out.contains(&format!("provider provider-{x}")), "{out}");
    }
    let dir = TempDir::new("cfg");
    let bad = dir.write(
        "bad.json",
        r#"{"version":2,"provider":"p q","listen":"nope","admin_listen":"127.0.0.1:1",
            "key_file":"k","store":"s","policy":{"dir":"/nonexistent","id":"x","version":"1"},
            "delegations":"/nonexistent.json","association":{"url":"ftp://x"}}"#,
    );
    let (code, _, err) = run_in_root(&["--config", &bad.to_string_lossy(), "--validate"]);
    assert_eq!(code, 1);
    for path in [
        "version:",
        "provider:",
        "listen:",
        "association.url:",
        "policy.dir:",
    ] {
        assert!(err.contains(path), "{path} in {err}");
    }
    let key = dir.path().join("k/key");
    let (code, out, err) = run_in_root(&["keygen", "--out", &key.to_string_lossy()]);
    assert_eq!(code, 0, "{err}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&key).unwrap_or_default();
    assert_eq!(text.len(), 65);
    let kid = out
        .lines()
        .find_map(|l| l.strip_prefix("key_id "))
        .unwrap_or("");
    let public = out
        .lines()
        .find_map(|l| l.strip_prefix("public_key "))
        .unwrap_or("");
    assert_eq!(kid.len(), 64);
    let raw: Vec<u8> = (0..public.len() / 2)
        .filter_map(|i| u8::from_str_radix(&public[2 * i..2 * i + 2], 16).ok())
        .collect();
    assert_eq!(raw.len(), 32);
    assert_eq!(kid, sha256_hex(&raw), "key id = sha256 of the public key");
    let (code, _, _) = run_in_root(&["keygen", "--out", &key.to_string_lossy()]);
    assert_eq!(code, 1, "never overwrites a key");
}

#[tokio::test]
async fn a_provider_that_cannot_listen_exits_at_once_without_touching_its_state() {
    let (_held, taken) = taken_port();
    let free = format!("127.0.0.1:{}", multihub_tests::free_port());
    for (listen, admin) in [(&taken, &free), (&free, &taken)] {
        let dir = TempDir::new("provider-listen");
        let config = write_config(&dir, "p-a", "http://127.0.0.1:1", listen, admin);
        let args = ["--config".as_ref(), config.as_os_str()];
        let log = dir.path().join("provider.log");
        assert_cannot_listen("multihub-provider", &args, &log, &taken).await;
        assert!(
            !dir.path().join("state").exists(),
            "no key or store made by a provider that cannot run"
        );
    }
}
