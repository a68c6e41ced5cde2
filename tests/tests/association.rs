//! The association service (issue 8) against the real `multihub-association` binary: refusals
//! record nothing, idempotency under 1,000 concurrent identical signals, exactly-once
//! confirmation under races (all_of and quorum), SSE with `Last-Event-ID` resume, `kill -9`
//! during load, and the offline `verify`. Every check reads the store, not only status codes.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey};
use multihub_protocol::hashing::{hex_into, repr_of};
use multihub_protocol::signal::{key_id, Signal, Stage};
use multihub_tests::association::{AssociationProc, EventStream};
use multihub_tests::http::{request, Conn};
use multihub_tests::procs::{assert_cannot_listen, taken_port};
use multihub_tests::{eventually, run_bin, workspace_root, TempDir};
use rand::seq::SliceRandom;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn pk_hex(k: &SigningKey) -> String {
    let mut s = String::new();
    hex_into(&mut s, k.verifying_key().as_bytes());
    s
}

fn config(providers: &[(&str, &[&SigningKey])], policy: Value) -> Value {
    let mut p = serde_json::Map::new();
    for (id, keys) in providers {
        let keys: Vec<Value> = keys
            .iter()
            .map(|k| json!({"public_key": pk_hex(k)}))
            .collect();
        p.insert(id.to_string(), json!({ "keys": keys }));
    }
    json!({
        "version": "test",
        "listen": "", "admin_listen": "", "store": {"path": ""},
        "providers": p,
        "policy": policy,
    })
}

fn signal(rid: &str, provider: &str, stage: Stage, boundary: &str, k: &SigningKey) -> Signal {
    Signal::signed(
        rid,
        repr_of(rid.as_bytes()).as_str(),
        provider,
        stage,
        boundary,
        k,
    )
}

fn resign(s: &mut Signal, k: &SigningKey) {
    s.sig = URL_SAFE_NO_PAD.encode(k.sign(&s.signing_bytes()).to_bytes());
}

async fn post(addr: &str, body: &[u8], route: Option<&str>) -> (u16, Value) {
    let headers: Vec<(&str, &str)> = route.map(|r| ("x-hub-route", r)).into_iter().collect();
    let r = request(addr, "POST", "/signals", &headers, body)
        .await
        .unwrap_or_else(|e| panic!("POST /signals: {e}"));
    (r.status, r.json())
}

fn db(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("open store {}: {e}", path.display()))
}

fn count(path: &Path, table: &str) -> i64 {
    db(path)
        .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("count {table}: {e}"))
}

fn stored_bytes(path: &Path) -> HashSet<Vec<u8>> {
    let c = db(path);
    let mut st = c
        .prepare("SELECT bytes FROM signals")
        .unwrap_or_else(|e| panic!("{e}"));
    let rows = st
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap_or_else(|e| panic!("{e}"));
    rows.map(|r| r.unwrap_or_default()).collect()
}

async fn metrics(a: &AssociationProc) -> String {
    let r = request(&a.admin, "GET", "/metrics", &[], b"")
        .await
        .unwrap_or_else(|e| panic!("metrics: {e}"));
    String::from_utf8_lossy(r.body()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_code_and_records_nothing() {
    let (ka1, ka2, kb, kx) = (key(1), key(2), key(3), key(9));
    let dir = TempDir::new("assoc-refuse");
    let a = AssociationProc::start(
        &dir,
        config(
            &[("p-a", &[&ka1, &ka2]), ("p-b", &[&kb])],
            json!({"default": {"all_of": ["p-a", "p-b"]}}),
        ),
    )
    .await;
    let good = signal("r-1", "p-a", Stage::Start, "b0", &ka1);
    let good_bytes = good.to_bytes();
    let mut cases: Vec<(&str, Vec<u8>, u16, &str)> = Vec::new();

    // Forged: right key id, signature by another key.
    let mut s = good.clone();
    resign(&mut s, &kx);
    cases.push(("forged signature", s.to_bytes(), 422, "bad_signature"));
    // A valid signature by another provider's key (its own key id): not p-a's key.
    let s = signal("r-1", "p-a", Stage::Start, "b0", &kb);
    cases.push(("another provider's key", s.to_bytes(), 401, "unknown_key"));
    // Another provider's key under p-a's key id.
    let mut s = good.clone();
    resign(&mut s, &kb);
    cases.push((
        "another provider's signature",
        s.to_bytes(),
        422,
        "bad_signature",
    ));
    // Unknown provider.
    let s = signal("r-1", "p-z", Stage::Start, "b0", &kx);
    cases.push(("unknown provider", s.to_bytes(), 401, "unknown_provider"));
    // Every field altered after signing (re-encoded canonically).
    type Alter = (&'static str, fn(&mut Signal), u16, &'static str);
    let alter: Vec<Alter> = vec![
        ("boundary", |s| s.boundary.push('x'), 422, "bad_signature"),
        ("stage", |s| s.stage = Stage::Complete, 422, "bad_signature"),
        (
            "request_id",
            |s| s.request_id.push('x'),
            422,
            "bad_operation",
        ),
        (
            "request_repr",
            |s| s.request_repr.push('0'),
            422,
            "bad_operation",
        ),
        (
            "operation",
            |s| s.operation.replace_range(0..1, "f"),
            422,
            "bad_operation",
        ),
        (
            "provider",
            |s| s.provider = "p-b".into(),
            401,
            "unknown_key",
        ),
        (
            "key_id",
            |s| s.key_id = key_id(&key(2).verifying_key()),
            422,
            "bad_signature",
        ),
        (
            "sig",
            |s| s.sig.replace_range(0..2, "AA"),
            422,
            "bad_signature",
        ),
        ("sig length", |s| s.sig.truncate(10), 422, "bad_signature"),
        ("v", |s| s.v = 2, 422, "malformed"),
    ];
    for (what, f, status, kind) in alter {
        let mut s = good.clone();
        f(&mut s);
        let name: &'static str = Box::leak(format!("altered {what}").into_boxed_str());
        cases.push((name, s.to_bytes(), status, kind));
    }
    // Non-canonical operation (upper-case hex), correctly signed: the formula refuses it.
    let mut s = good.clone();
    s.operation = s.operation.to_uppercase();
    resign(&mut s, &ka1);
    cases.push(("upper-case operation", s.to_bytes(), 422, "bad_operation"));
    // Non-canonical bytes of a valid signal.
    let v: Value = serde_json::from_slice(&good_bytes).unwrap_or_default();
    cases.push((
        "pretty-printed",
        serde_json::to_vec_pretty(&v).unwrap_or_default(),
        422,
        "non_canonical",
    ));
    let mut spaced = good_bytes.clone();
    spaced.push(b' ');
    cases.push(("trailing space", spaced, 422, "non_canonical"));
    let mut extra = v.clone();
    extra["extra"] = json!(1);
    cases.push((
        "unknown field",
        serde_json::to_vec(&extra).unwrap_or_default(),
        422,
        "malformed",
    ));
    cases.push((
        "truncated",
        good_bytes[..good_bytes.len() - 7].to_vec(),
        422,
        "malformed",
    ));
    cases.push(("empty", Vec::new(), 422, "malformed"));
    let mut big = good_bytes.clone();
    big.resize(100_000, b' ');
    cases.push(("oversized", big, 413, "body_too_large"));

    for (what, body, status, kind) in &cases {
        let (got, v) = post(&a.addr, body, None).await;
        assert_eq!(
            (got, v["error"].as_str()),
            (*status, Some(*kind)),
            "{what}: {v}"
        );
        assert!(v["detail"].is_string(), "{what}: {v}");
    }
    // Nothing recorded, by any path.
    assert_eq!(count(&a.store_path, "signals"), 0);
    assert_eq!(count(&a.store_path, "confirmations"), 0);
    let r = request(
        &a.addr,
        "GET",
        &format!("/operations/{}", good.operation),
        &[],
        b"",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 404);

    // Rotation: both of p-a's keys are accepted. First time 201, identical resend 200.
    let (st, v) = post(&a.addr, &good_bytes, None).await;
    assert_eq!((st, v["result"].as_str()), (201, Some("created")), "{v}");
    let (st, _) = post(&a.addr, &good_bytes, None).await;
    assert_eq!(st, 200);
    let rotated = signal("r-1", "p-a", Stage::Complete, "c0", &ka2).to_bytes();
    assert_eq!(post(&a.addr, &rotated, None).await.0, 201);
    assert_eq!(
        stored_bytes(&a.store_path),
        HashSet::from([good_bytes.clone(), rotated.clone()])
    );
    // A bad route header is refused before anything else.
    let other = signal("r-2", "p-a", Stage::Start, "b0", &ka1).to_bytes();
    assert_eq!(post(&a.addr, &other, Some("bad route")).await.0, 400);
    assert_eq!(count(&a.store_path, "signals"), 2);

    let m = metrics(&a).await;
    for line in [
        "association_signals_total{provider=\"p-a\",result=\"bad_signature\",stage=\"START\"}",
        "association_signals_total{provider=\"p-a\",result=\"created\",stage=\"START\"} 1",
        "association_signals_total{provider=\"p-a\",result=\"duplicate\",stage=\"START\"} 1",
        "association_signals_total{provider=\"_unknown\",result=\"unknown_provider\",stage=\"START\"} 1",
        "association_request_duration_seconds_count{endpoint=\"signals\"}",
    ] {
        assert!(m.contains(line), "metrics lack {line}:\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_identical_signals_make_one_record() {
    let ka = key(1);
    let dir = TempDir::new("assoc-idem");
    let a = AssociationProc::start(
        &dir,
        config(&[("p-a", &[&ka])], json!({"default": {"quorum": 1}})),
    )
    .await;
    let body = Arc::new(signal("r-1", "p-a", Stage::Start, "b0", &ka).to_bytes());
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (addr, body) = (a.addr.clone(), body.clone());
        tasks.push(tokio::spawn(
            async move { post(&addr, &body, None).await.0 },
        ));
    }
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap_or(0)).or_default() += 1;
    }
    assert_eq!(statuses, HashMap::from([(201, 1), (200, 999)]));
    assert_eq!(count(&a.store_path, "signals"), 1);
    assert_eq!(
        stored_bytes(&a.store_path),
        HashSet::from([(*body).clone()])
    );

    // A conflicting signal for the same (operation, provider, stage): 409, not recorded.
    let conflicting = signal("r-1", "p-a", Stage::Start, "b1", &ka).to_bytes();
    let (st, v) = post(&a.addr, &conflicting, None).await;
    assert_eq!((st, v["error"].as_str()), (409, Some("conflict")), "{v}");
    assert_eq!(
        stored_bytes(&a.store_path),
        HashSet::from([(*body).clone()])
    );

    // Racing conflicting signals: exactly one wins.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let addr = a.addr.clone();
        let b = signal("r-2", "p-a", Stage::Start, &format!("b{i}"), &ka).to_bytes();
        tasks.push(tokio::spawn(async move { post(&addr, &b, None).await.0 }));
    }
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap_or(0)).or_default() += 1;
    }
    assert_eq!(statuses, HashMap::from([(201, 1), (409, 49)]));
    assert_eq!(count(&a.store_path, "signals"), 2);
}

/// The API's HTTP/1.1 layer (`protocol::http1`) against the real binary: pipelined requests,
/// chunked bodies, `Expect: 100-continue`, keep-alive after a 404, and JSON refusals that close
/// the connection for ambiguous framing and oversized heads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_speaks_http1_framing() {
    let ka = key(1);
    let dir = TempDir::new("assoc-http1");
    let a = AssociationProc::start(
        &dir,
        config(&[("p-a", &[&ka])], json!({"default": {"quorum": 1}})),
    )
    .await;
    let bytes: Vec<Vec<u8>> = (0..4)
        .map(|i| signal(&format!("h-{i}"), "p-a", Stage::Start, "b", &ka).to_bytes())
        .collect();
    let post = |body: &[u8]| {
        let mut m = format!(
            "POST /signals HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        m.extend_from_slice(body);
        m
    };
    let mut c = Conn::open(&a.addr).await.unwrap_or_else(|e| panic!("{e}"));
    // Two requests in one write: two answers, in order.
    let mut two = post(&bytes[0]);
    two.extend_from_slice(&post(&bytes[1]));
    c.write(&two).await.unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..2 {
        let r = c.read_response().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, 201, "{:?}", r.json());
        assert!(r.header("date").is_some_and(|d| d.ends_with(" GMT")));
    }
    // A chunked body, split mid-signal.
    let (x, y) = bytes[2].split_at(100);
    let mut chunked =
        b"POST /signals HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for part in [x, y] {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    c.write(&chunked).await.unwrap_or_else(|e| panic!("{e}"));
    let r = c.read_response().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 201, "{:?}", r.json());
    // Expect: 100-continue gets its 100 before the body is sent.
    let head = format!(
        "POST /signals HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        bytes[3].len()
    );
    c.write(head.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let line = tokio::time::timeout(Duration::from_secs(10), c.read_line())
        .await
        .unwrap_or_else(|_| panic!("no 100 Continue"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
    assert_eq!(c.read_line().await.unwrap_or_default(), "\r\n");
    c.write(&bytes[3]).await.unwrap_or_else(|e| panic!("{e}"));
    let r = c.read_response().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 201, "{:?}", r.json());
    // A 404 keeps the connection.
    let r = c
        .request("GET", "/nowhere", &[], b"")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (404, Some("not_found"))
    );
    let r = c
        .request("GET", "/confirmations?after=0", &[], b"")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200);
    assert!(r.json()["confirmations"].is_array(), "{:?}", r.json());
    assert_eq!(
        stored_bytes(&a.store_path),
        bytes.iter().cloned().collect::<HashSet<_>>()
    );

    // Ambiguous framing and oversized heads: a JSON refusal, then the connection closes.
    let mut long = b"GET /confirmations HTTP/1.1\r\nx-long: ".to_vec();
    long.resize(70 * 1024, b'a');
    let refused: [(&[u8], u16, &str); 2] = [
        (
            b"POST /signals HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "bad_request",
        ),
        (&long, 431, "header_too_large"),
    ];
    for (raw, status, kind) in refused {
        let mut c = Conn::open(&a.addr).await.unwrap_or_else(|e| panic!("{e}"));
        c.write(raw).await.unwrap_or_else(|e| panic!("{e}"));
        let r = c.read_response().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.status, r.json()["error"].as_str()), (status, Some(kind)));
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.is_closed().await);
    }
    assert_eq!(count(&a.store_path, "signals"), 4);
}

/// Collects `n` events; panics on a duplicate id or when they do not arrive in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_signature_check_refuses_exactly_the_bad_signals() {
    let (ka, kb, kx) = (key(1), key(2), key(9));
    let dir = TempDir::new("assoc-batch");
    let mut c = config(
        &[("p-a", &[&ka]), ("p-b", &[&kb])],
        json!({"default": {"quorum": 1}}),
    );
    c["signature_check"] = json!("batch");
    let a = AssociationProc::start(&dir, c).await;
    // Good and forged signals interleaved and sent at once, so batches mix them.
    let mut good = HashSet::new();
    let mut tasks = Vec::new();
    for i in 0..160 {
        let (p, k) = if i % 2 == 0 {
            ("p-a", &ka)
        } else {
            ("p-b", &kb)
        };
        let mut s = signal(&format!("r-{i}"), p, Stage::Start, "b0", k);
        let forged = i % 8 == 3;
        if forged {
            resign(&mut s, &kx);
        } else {
            good.insert(s.to_bytes());
        }
        let (addr, body) = (a.addr.clone(), s.to_bytes());
        tasks.push(tokio::spawn(async move {
            let (st, v) = post(&addr, &body, None).await;
            (forged, st, v["error"].as_str().map(str::to_string))
        }));
    }
    for t in tasks {
        let (forged, st, err) = t.await.unwrap_or((false, 0, None));
        if forged {
            assert_eq!((st, err.as_deref()), (422, Some("bad_signature")));
        } else {
            assert_eq!(st, 201, "{err:?}");
        }
    }
    assert_eq!(count(&a.store_path, "signals"), 140);
    assert_eq!(stored_bytes(&a.store_path), good);
}

async fn collect(s: &mut EventStream, n: usize) -> Vec<(i64, Value)> {
    let mut out: Vec<(i64, Value)> = Vec::new();
    while out.len() < n {
        let ev = s
            .next(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("only {} of {n} events arrived", out.len()));
        assert_eq!(ev.event.as_deref(), Some("confirmation"));
        let id: i64 = ev.id.as_deref().and_then(|i| i.parse().ok()).unwrap_or(-1);
        let data: Value = serde_json::from_str(&ev.data).unwrap_or_default();
        assert_eq!(data["seq"].as_i64(), Some(id), "{data}");
        if let Some((last, _)) = out.last() {
            assert!(id > *last, "event ids must increase: {id} after {last}");
        }
        out.push((id, data));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmation_fires_exactly_once_under_races_and_sse_resumes() {
    let (ka, kb, kc) = (key(1), key(2), key(3));
    let dir = TempDir::new("assoc-race");
    let a = AssociationProc::start(
        &dir,
        config(
            &[("p-a", &[&ka]), ("p-b", &[&kb]), ("p-c", &[&kc])],
            json!({"default": {"all_of": ["p-a", "p-b"]}, "routes": {"q": {"quorum": 2}}}),
        ),
    )
    .await;
    let mut live = EventStream::open(&a.addr, None).await;

    const OPS: usize = 30;
    let keys = [("p-a", &ka), ("p-b", &kb), ("p-c", &kc)];
    // (body, route) — each distinct signal is sent 4 times from different connections.
    let mut reqs: Vec<(Arc<Vec<u8>>, Option<&'static str>)> = Vec::new();
    let mut distinct = 0;
    for i in 0..OPS {
        for (route, rid) in [(None, format!("all-{i}")), (Some("q"), format!("q-{i}"))] {
            for (p, k) in keys {
                for stage in [Stage::Start, Stage::Complete] {
                    // p-c is noise under all_of: only its START.
                    if route.is_none() && p == "p-c" && stage == Stage::Complete {
                        continue;
                    }
                    let b = Arc::new(signal(&rid, p, stage, "b", k).to_bytes());
                    distinct += 1;
                    for _ in 0..4 {
                        reqs.push((b.clone(), route));
                    }
                }
            }
        }
    }
    reqs.shuffle(&mut rand::thread_rng());
    let total = reqs.len();
    let queue = Arc::new(Mutex::new(reqs));
    let created: Arc<Mutex<HashMap<Vec<u8>, usize>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..48 {
        let (queue, created, addr) = (queue.clone(), created.clone(), a.addr.clone());
        workers.push(tokio::spawn(async move {
            let mut c = Conn::open(&addr).await.unwrap_or_else(|e| panic!("{e}"));
            loop {
                let Some((body, route)) = queue.lock().ok().and_then(|mut q| q.pop()) else {
                    return;
                };
                let headers: Vec<(&str, &str)> =
                    route.map(|r| ("x-hub-route", r)).into_iter().collect();
                let r = c
                    .request("POST", "/signals", &headers, &body)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                assert!(
                    r.status == 201 || r.status == 200,
                    "{} {:?}",
                    r.status,
                    r.json()
                );
                if r.status == 201 {
                    if let Ok(mut m) = created.lock() {
                        *m.entry((*body).clone()).or_default() += 1;
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap_or_else(|e| panic!("worker: {e}"));
    }
    let created = created.lock().map(|m| m.clone()).unwrap_or_default();
    assert_eq!(
        created.len(),
        distinct,
        "every distinct signal created once"
    );
    assert!(created.values().all(|n| *n == 1));
    assert_eq!(count(&a.store_path, "signals"), distinct as i64);
    assert!(total > distinct);

    // Exactly one confirmation per operation, with the right providers and policy.
    assert_eq!(count(&a.store_path, "confirmations"), 2 * OPS as i64);
    let r = request(
        &a.addr,
        "GET",
        "/confirmations?after=0&limit=1000",
        &[],
        b"",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let v = r.json();
    let confs = v["confirmations"].as_array().cloned().unwrap_or_default();
    assert_eq!(confs.len(), 2 * OPS);
    let ops: BTreeSet<&str> = confs
        .iter()
        .filter_map(|c| c["operation"].as_str())
        .collect();
    assert_eq!(ops.len(), 2 * OPS);
    for c in &confs {
        match c["policy"].as_str() {
            Some("default") => assert_eq!(c["providers"], json!(["p-a", "p-b"])),
            Some("route:q") => assert_eq!(c["providers"].as_array().map(Vec::len), Some(2)),
            other => panic!("policy {other:?}"),
        }
    }
    // Paging.
    let r = request(&a.addr, "GET", "/confirmations?after=10&limit=5", &[], b"")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let page = r.json();
    assert_eq!(page["confirmations"][0]["seq"], 11);
    assert_eq!(page["next_after"], 15);

    // The live SSE client saw each confirmation exactly once.
    let seen = collect(&mut live, 2 * OPS).await;
    let seen_ops: BTreeSet<&str> = seen
        .iter()
        .filter_map(|(_, d)| d["operation"].as_str())
        .collect();
    assert_eq!(seen_ops, ops);

    // Resume: read 20, drop, reconnect with Last-Event-ID; the rest arrives once.
    let mut s = EventStream::open(&a.addr, None).await;
    let first = collect(&mut s, 20).await;
    drop(s);
    let last_id = first[19].0.to_string();
    let mut s = EventStream::open(&a.addr, Some(&last_id)).await;
    let rest = collect(&mut s, 2 * OPS - 20).await;
    let ids: Vec<i64> = first.iter().chain(rest.iter()).map(|(i, _)| *i).collect();
    let all_ids: Vec<i64> = seen.iter().map(|(i, _)| *i).collect();
    assert_eq!(ids, all_ids);

    // COMPLETE without START is recorded but cannot confirm until START arrives.
    let late = [
        signal("late", "p-a", Stage::Complete, "c", &ka),
        signal("late", "p-b", Stage::Start, "s", &kb),
        signal("late", "p-b", Stage::Complete, "c", &kb),
    ];
    for s in &late {
        assert_eq!(post(&a.addr, &s.to_bytes(), None).await.0, 201);
    }
    let op = late[0].operation.clone();
    let r = request(&a.addr, "GET", &format!("/operations/{op}"), &[], b"")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let v = r.json();
    assert_eq!(v["confirmation"], Value::Null, "{v}");
    assert_eq!(v["missing"], json!(["p-a:START"]));
    assert_eq!(v["signals"].as_array().map(Vec::len), Some(3));
    // Signals are served verbatim.
    let first_sig = serde_json::to_vec(&v["signals"][0]["signal"]).unwrap_or_default();
    assert_eq!(first_sig, late[0].to_bytes());
    assert_eq!(count(&a.store_path, "confirmations"), 2 * OPS as i64);
    let start = signal("late", "p-a", Stage::Start, "s", &ka);
    let (st, v) = post(&a.addr, &start.to_bytes(), None).await;
    assert_eq!(st, 201);
    assert!(v["confirmation"].is_i64(), "{v}");
    let ev = collect(&mut live, 1).await;
    assert_eq!(ev[0].1["operation"], json!(op));
    let r = request(&a.addr, "GET", &format!("/operations/{op}"), &[], b"")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let v = r.json();
    assert_eq!(v["confirmation"]["providers"], json!(["p-a", "p-b"]));
    assert_eq!(v["linkage"], v["confirmation"]["linkage"]);
    let bytes: Vec<Vec<u8>> = [&late[0], &late[1], &late[2], &start]
        .iter()
        .map(|s| s.to_bytes())
        .collect();
    let want = multihub_protocol::signal::linkage([
        ("p-a", Stage::Complete, &bytes[0][..]),
        ("p-b", Stage::Start, &bytes[1][..]),
        ("p-b", Stage::Complete, &bytes[2][..]),
        ("p-a", Stage::Start, &bytes[3][..]),
    ]);
    assert_eq!(v["linkage"], json!(want));
    // No event beyond those.
    assert!(live.next(Duration::from_millis(300)).await.is_none());
    let (code, out) = a.verify();
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_load_loses_no_acknowledged_signal() {
    let (ka, kb) = (key(1), key(2));
    let dir = TempDir::new("assoc-kill");
    let mut a = AssociationProc::start(
        &dir,
        config(
            &[("p-a", &[&ka]), ("p-b", &[&kb])],
            json!({"default": {"all_of": ["p-a", "p-b"]}}),
        ),
    )
    .await;
    let mut bodies = Vec::new();
    for i in 0..2500 {
        let rid = format!("k-{i}");
        for stage in [Stage::Start, Stage::Complete] {
            bodies.push(signal(&rid, "p-a", stage, "b", &ka).to_bytes());
            bodies.push(signal(&rid, "p-b", stage, "b", &kb).to_bytes());
        }
    }
    bodies.reverse();
    let queue = Arc::new(Mutex::new(bodies));
    let ledger: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (queue, ledger, addr) = (queue.clone(), ledger.clone(), a.addr.clone());
        workers.push(tokio::spawn(async move {
            let Ok(mut c) = Conn::open(&addr).await else {
                return;
            };
            loop {
                let Some(body) = queue.lock().ok().and_then(|mut q| q.pop()) else {
                    return;
                };
                match c.request("POST", "/signals", &[], &body).await {
                    Ok(r) if r.status == 201 || r.status == 200 => {
                        if let Ok(mut l) = ledger.lock() {
                            l.push(body);
                        }
                    }
                    Ok(r) => panic!("unexpected {} {:?}", r.status, r.json()),
                    // The service was killed: stop.
                    Err(_) => return,
                }
            }
        }));
    }
    eventually("500 acknowledged signals", Duration::from_secs(60), || {
        (ledger.lock().map(|l| l.len()).unwrap_or(0) >= 500).then_some(())
    })
    .await;
    a.kill9();
    for w in workers {
        w.await.unwrap_or_else(|e| panic!("worker: {e}"));
    }
    let acknowledged = ledger.lock().map(|l| l.clone()).unwrap_or_default();
    assert!(
        !queue.lock().map(|q| q.is_empty()).unwrap_or(true),
        "the kill must land during the load"
    );

    a.restart(&dir).await;
    let stored = stored_bytes(&a.store_path);
    let missing = acknowledged.iter().filter(|b| !stored.contains(*b)).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} acknowledged signals lost",
        acknowledged.len()
    );
    // The restarted service serves them and keeps accepting.
    let again = &acknowledged[0];
    assert_eq!(post(&a.addr, again, None).await.0, 200);
    let (code, out) = a.verify();
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ok: "), "{out}");

    // verify notices tampering: one altered stored signal, one deleted confirmation.
    a.kill9();
    {
        let c = rusqlite::Connection::open(&a.store_path).unwrap_or_else(|e| panic!("{e}"));
        c.execute(
            "UPDATE signals SET bytes = CAST(REPLACE(CAST(bytes AS TEXT), '\"boundary\":\"b\"', '\"boundary\":\"x\"') AS BLOB) WHERE seq = 1",
            [],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        c.execute(
            "DELETE FROM confirmations WHERE seq = (SELECT MAX(seq) FROM confirmations)",
            [],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let (code, out) = a.verify();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("MISMATCH signal 1: signature does not verify"),
        "{out}"
    );
    assert!(out.contains("stored digest differs"), "{out}");
    assert!(out.contains("no confirmation is recorded"), "{out}");
}

#[test]
fn validate_accepts_the_example_and_reports_every_problem() {
    let root = workspace_root();
    let example = root.join("conf/association/association.json");
    let (code, out, err) = run_bin(
        "multihub-association",
        &["--config", &example.to_string_lossy(), "--validate"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok: version"), "{out}");
    let dir = root.join("conf/association/invalid");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.map(|e| e.path()).unwrap_or_default();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        n += 1;
        let expect = std::fs::read_to_string(p.with_extension("expect")).unwrap_or_default();
        let (code, out, err) = run_bin(
            "multihub-association",
            &["--config", &p.to_string_lossy(), "--validate"],
        );
        assert_eq!(code, 1, "{}: {out}{err}", p.display());
        for line in expect.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                err.contains(line.trim()),
                "{}: missing {line:?} in\n{err}",
                p.display()
            );
        }
    }
    assert!(n >= 2, "fixtures in {}", dir.display());
}

#[tokio::test]
async fn an_association_that_cannot_listen_exits_at_once_without_opening_its_store() {
    let dir = TempDir::new("assoc-listen");
    let ka = key(1);
    let (_held, taken) = taken_port();
    let free = format!("127.0.0.1:{}", multihub_tests::free_port());
    for (listen, admin) in [(&taken, &free), (&free, &taken)] {
        let store = dir.path().join("association.db");
        let mut c = config(&[("p-a", &[&ka])], json!({"default": {"quorum": 1}}));
        c["listen"] = json!(listen);
        c["admin_listen"] = json!(admin);
        c["store"] = json!({ "path": store });
        let f = dir.write("association.json", c.to_string());
        let args = ["--config".as_ref(), f.as_os_str()];
        let log = dir.path().join("association.log");
        assert_cannot_listen("multihub-association", &args, &log, &taken).await;
        assert!(
            !store.exists(),
            "no store made by a service that cannot run"
        );
    }
}
