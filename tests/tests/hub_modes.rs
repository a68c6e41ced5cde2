//! Hub response modes (issue 6): proxy (streamed primary, non-blocking copies), collect, and the
//! outcome relay. Real `multihub-hub` processes against in-process recording upstreams.

use base64::Engine as _;
use multihub_tests::http::{request, Conn};
use multihub_tests::{
    eventually, eventually_async, free_port, sha256_hex, Behaviour, HubProc, Recorder, TempDir,
    DOWN_URL,
};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn table(
    id: &str,
    providers: &[(&str, String)],
    peers: &[(&str, String)],
    sinks: &[String],
    hub_extra: Value,
    routes: Value,
) -> String {
    let p: serde_json::Map<String, Value> = providers
        .iter()
        .map(|(k, u)| (k.to_string(), json!({ "url": u, "timeout_ms": 3000 })))
        .collect();
    let q: serde_json::Map<String, Value> = peers
        .iter()
        .map(|(k, u)| (k.to_string(), json!({ "url": u })))
        .collect();
    let mut hub = json!({ "id": id, "advertise": "http://127.0.0.1:1", "max_body_bytes": 300000 });
    if let (Some(h), Some(extra)) = (hub.as_object_mut(), hub_extra.as_object()) {
        h.extend(extra.clone());
    }
    json!({ "version": "v7", "hub": hub, "providers": p, "peers": q, "outcome_sinks": sinks, "routes": routes }).to_string()
}

async fn start(providers: &[(&str, String)], routes: Value) -> (HubProc, TempDir) {
    let dir = TempDir::new("modes");
    let f = dir.write(
        "t.json",
        table("hub-a", providers, &[], &[], json!({}), routes),
    );
    (HubProc::start(&f, &[]).await, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_streams_the_primary_chunk_by_chunk() {
    let primary = Recorder::start(Behaviour::StreamGated {
        first: b"first-".to_vec(),
        rest: b"rest".to_vec(),
    })
    .await;
    let (hub, _d) = start(&[("p", primary.url())], json!([{ "id": "px", "match": { "path_prefix": "/" }, "targets": ["p"], "respond": "proxy" }])).await;
    let mut c = Conn::open(&hub.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.write(b"POST /s HTTP/1.1\r\nHost: t\r\nx-request-id: s-1\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = c
        .read_head()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", hub.logs()));
    assert!(head.start.contains(" 200 "), "{head:?}");
    assert_eq!(
        head.header("x-up"),
        Some("stream"),
        "upstream headers verbatim"
    );
    assert_eq!(head.header("x-request-id"), Some("s-1"));
    assert_eq!(head.header("x-hub-route-version"), Some("v7"));
    // The first chunk arrives while the upstream is still held: it has not finished.
    let first = c.read_chunk().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.as_deref(), Some(&b"first-"[..]));
    assert_eq!(primary.answered(), 0, "upstream has not finished yet");
    primary.open_gate();
    let mut rest = Vec::new();
    while let Some(ch) = c.read_chunk().await.unwrap_or_else(|e| panic!("{e}")) {
        rest.extend_from_slice(&ch);
    }
    assert_eq!(rest, b"rest");
    let got = &primary.requests()[0];
    assert_eq!(got.body, b"hi");
    assert_eq!(got.header("x-hub-route-version"), Some("v7"));
    assert_eq!(
        got.header("x-hub-request-repr").map(str::to_string),
        Some(format!("sha256={}", sha256_hex(b"hi")))
    );
}

/// A Content-Length answer passes with its length; a HEAD answer keeps the upstream's
/// Content-Length without a body; the requester's connection stays usable after both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_keeps_lengths_and_head_answers_intact() {
    let primary = Recorder::start(Behaviour::Body(200, b"hello".to_vec())).await;
    let (hub, _d) = start(&[("p", primary.url())], json!([{ "id": "px", "match": { "path_prefix": "/" }, "targets": ["p"], "respond": "proxy" }])).await;
    let mut c = Conn::open(&hub.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let r = c
        .request("POST", "/a", &[], b"x")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", hub.logs()));
    assert_eq!((r.status, r.body()), (200, &b"hello"[..]));
    assert_eq!(r.header("content-length"), Some("5"));
    assert_eq!(r.header("transfer-encoding"), None);
    c.write(b"HEAD /a HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = c.read_head().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(head.start.contains(" 200 "), "{head:?}");
    assert_eq!(head.header("content-length"), Some("5"));
    // No body followed: the next answer on this connection is the next request's.
    let r = c
        .request("POST", "/b", &[], b"y")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", hub.logs()));
    assert_eq!((r.status, r.body()), (200, &b"hello"[..]));
    let methods: Vec<String> = primary
        .requests()
        .iter()
        .map(|r| r.method.clone())
        .collect();
    assert_eq!(methods, ["POST", "HEAD", "POST"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_passes_coded_bodies_raw_and_drops_hop_by_hop_answer_fields() {
    // A body with a transfer coding the hub does not decode (gzip, then chunked), plus fields
    // that belong to the upstream's connection only.
    let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 99\r\n\
                Connection: x-private\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\n\
                Date: Sun, 06 Nov 1994 08:49:37 GMT\r\nX-Kept: 1\r\n\r\n\
                4\r\nGZ!!\r\n0\r\n\r\n";
    let primary = Recorder::start(Behaviour::Raw(raw.to_vec())).await;
    let (hub, _d) = start(
        &[("p", primary.url())],
        json!([{ "id": "px", "match": { "path_prefix": "/" }, "targets": ["p"], "respond": "proxy" }]),
    )
    .await;
    let mut c = Conn::open(&hub.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.write(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = c.read_head().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(head.start.contains(" 200 "), "{head:?}");
    assert_eq!(head.header("transfer-encoding"), Some("gzip, chunked"));
    assert_eq!(
        head.header("content-length"),
        None,
        "Transfer-Encoding overrides it"
    );
    assert_eq!(head.header("x-kept"), Some("1"));
    for gone in ["x-private", "keep-alive"] {
        assert_eq!(head.header(gone), None, "{gone} passed on");
    }
    assert_eq!(head.header_all("date"), ["Sun, 06 Nov 1994 08:49:37 GMT"]);
    assert_eq!(head.header("connection"), Some("close"));
    // The coded body arrives byte for byte, unframed by the hub, then the connection closes.
    let rest = c.read_to_end().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rest, b"4\r\nGZ!!\r\n0\r\n\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_copies_never_delay_the_primary_or_its_keep_alive() {
    let primary = Recorder::start(Behaviour::Body(201, b"from-primary".to_vec())).await;
    let stuck = Recorder::start(Behaviour::Gated).await;
    let copy = Recorder::start(Behaviour::Status(200)).await;
    let (hub, _d) = start(
        &[("p", primary.url()), ("stuck", stuck.url()), ("copy", copy.url())],
        json!([{ "id": "px", "match": { "path_prefix": "/" }, "targets": ["p", "stuck", "copy"], "respond": "proxy" }]),
    )
    .await;
    let mut c = Conn::open(&hub.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    for (i, body) in [&b"small"[..], &big[..]].iter().enumerate() {
        let r = c
            .request("POST", "/x", &[("x-request-id", &format!("k-{i}"))], body)
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}\n{}", hub.logs()));
        assert_eq!(r.status, 201);
        assert_eq!(r.body(), b"from-primary");
        assert_eq!(r.header("x-hub-route-version"), Some("v7"));
    }
    // Both answered on one client connection while the stuck copy target has answered nothing.
    assert_eq!(stuck.answered(), 0);
    eventually("copies to arrive", WAIT, || {
        (copy.count() == 2 && stuck.count() == 2).then_some(())
    })
    .await;
    for rec in [&primary, &stuck, &copy] {
        let got = rec.requests();
        // Copies run in the background, so the two may arrive in either order: find the big one
        // by its request id.
        let big_copy = got
            .iter()
            .find(|q| q.header("x-request-id") == Some("k-1"))
            .unwrap_or_else(|| {
                let ids: Vec<_> = got.iter().map(|q| q.header("x-request-id")).collect();
                panic!("no copy of k-1 among {ids:?}")
            });
        assert_eq!(
            sha256_hex(&big_copy.body),
            sha256_hex(&big),
            "copy of the 100 KB body is byte-identical"
        );
        for q in &got {
            let repr = format!("sha256={}", sha256_hex(&q.body));
            assert_eq!(q.header("x-hub-request-repr"), Some(repr.as_str()));
            for h in [
                "x-hub-id",
                "x-hub-route",
                "x-hub-binding",
                "x-hub-path",
                "x-hub-hops",
                "x-hub-outcome-url",
                "x-request-id",
            ] {
                assert!(q.header(h).is_some(), "{h} missing on a copy");
            }
        }
    }
    stuck.open_gate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_primary_down_is_502_and_copy_over_cap_is_skipped() {
    let copy = Recorder::start(Behaviour::Status(200)).await;
    let primary = Recorder::start(Behaviour::Status(200)).await;
    let down = DOWN_URL.to_string();
    let (hub, _d) = start(
        &[("down", down), ("p", primary.url()), ("copy", copy.url())],
        json!([{ "id": "d", "match": { "path_prefix": "/down" }, "targets": ["down", "copy"], "respond": "proxy" },
               { "id": "cap", "match": { "path_prefix": "/cap" }, "targets": ["p", "copy"], "respond": "proxy",
                 "copies": { "max_body_bytes": 10 } }]),
    )
    .await;
    let r = request(&hub.addr, "POST", "/down", &[], b"x")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"], "primary_unreachable");
    assert!(r.json()["detail"].as_str().unwrap_or("").contains("down"));
    let r = request(&hub.addr, "POST", "/cap", &[], b"more than ten bytes")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200, "primary unaffected by the copy cap");
    assert_eq!(primary.count(), 1);
    eventually("the /down copy", WAIT, || (copy.count() == 1).then_some(())).await;
    // The over-cap copy was skipped: still only the /down copy.
    let r = request(&hub.addr, "POST", "/cap", &[], b"tiny")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200);
    eventually("the small copy", WAIT, || (copy.count() == 2).then_some(())).await;
    assert_eq!(copy.requests()[1].body, b"tiny");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_beyond_the_bound_are_dropped_and_counted_before_any_work() {
    let primary = Recorder::start(Behaviour::Status(200)).await;
    let stuck = Recorder::start(Behaviour::Gated).await;
    let (hub, _d) = start(
        &[("p", primary.url()), ("stuck", stuck.url())],
        json!([{ "id": "px", "match": { "path_prefix": "/" }, "targets": ["p", "stuck"], "respond": "proxy",
                 "copies": { "max_in_flight": 1 } }]),
    )
    .await;
    for i in 0..3 {
        let r = request(&hub.addr, "POST", "/x", &[], b"x")
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status, 200, "the primary answers whatever the copies do");
    }
    // The first copy holds the only slot (its target never answers); the other two were
    // refused before anything was sent, and counted when their requests were answered.
    assert_eq!(
        hub.metric("hub_deliveries_dropped_total{reason=\"in_flight_full\"}")
            .await,
        2.0
    );
    assert_eq!(
        hub.metric("hub_deliveries_total{result=\"in_flight_full\",route=\"px\",target=\"stuck\"}")
            .await,
        2.0
    );
    eventually("the admitted copy", WAIT, || {
        (stuck.count() == 1).then_some(())
    })
    .await;
    assert_eq!(primary.count(), 3);
    stuck.open_gate();
    // With the slot back (it is counted as delivered only once free), the next copy goes out.
    eventually_async("the held copy delivered", WAIT, || async {
        let ok = "hub_deliveries_total{result=\"ok\",route=\"px\",target=\"stuck\"}";
        (hub.metric(ok).await == 1.0).then_some(())
    })
    .await;
    let r = request(&hub.addr, "POST", "/x", &[], b"y")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200);
    eventually("the next copy", WAIT, || (stuck.count() == 2).then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collect_reports_every_target_verbatim() {
    let err = Recorder::start(Behaviour::Status(500)).await;
    let binary: Vec<u8> = vec![0, 159, 146, 150, 255, b'{', 0];
    let ok = Recorder::start(Behaviour::Body(200, binary.clone())).await;
    let down = DOWN_URL.to_string();
    let (hub, _d) = start(
        &[("err", err.url()), ("down", down), ("ok", ok.url())],
        json!([{ "id": "c", "match": { "path_prefix": "/" }, "targets": ["err", "down", "ok"], "respond": "collect" }]),
    )
    .await;
    let r = request(
        &hub.addr,
        "POST",
        "/q",
        &[("x-request-id", "col-1")],
        b"question",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200, "{}", hub.logs());
    assert_eq!(r.header("x-hub-route-version"), Some("v7"));
    let j = r.json();
    assert_eq!(j["request_id"], "col-1");
    assert_eq!(j["route_version"], "v7");
    let rs = j["responses"].as_array().cloned().unwrap_or_default();
    assert_eq!(rs.len(), 3, "{j}");
    let get = |t: &str| {
        rs.iter()
            .find(|x| x["target"] == t)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(get("err")["status"], 500);
    assert_eq!(get("down")["status"], Value::Null);
    assert!(
        get("down")["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("refused"),
        "{j}"
    );
    assert_eq!(get("ok")["status"], 200);
    let b = base64::engine::general_purpose::STANDARD
        .decode(get("ok")["body_b64"].as_str().unwrap_or(""))
        .unwrap_or_default();
    assert_eq!(b, binary, "binary body round-trips exactly");
    assert_eq!(ok.requests()[0].body, b"question");
    assert!(ok.requests()[0].header("x-hub-binding").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collect_caps_each_response_body() {
    let big = Recorder::start(Behaviour::Body(200, vec![b'x'; 5000])).await;
    let (hub, _d) = start(
        &[("big", big.url())],
        json!([{ "id": "c", "match": { "path_prefix": "/" }, "targets": ["big"], "respond": "collect", "max_response_bytes": 100 }]),
    )
    .await;
    let r = request(&hub.addr, "POST", "/", &[], b"")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let j = r.json();
    assert_eq!(j["responses"][0]["error"], "response_too_large", "{j}");
    assert_eq!(j["responses"][0]["status"], 200);
    assert_eq!(j["responses"][0]["body_b64"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_travel_back_along_the_path_byte_for_byte() {
    let sink = Recorder::start(Behaviour::Status(200)).await;
    let (port_a, port_b) = (free_port(), free_port());
    let dir = TempDir::new("outcomes");
    let route = json!([{ "id": "r", "match": { "path_prefix": "/" }, "targets": ["p"] }]);
    let p = [("p", "http://127.0.0.1:9".to_string())];
    let fa = dir.write(
        "a.json",
        table(
            "hub-a",
            &p,
            &[],
            &[format!("{}/outcomes", sink.url())],
            json!({}),
            route.clone(),
        ),
    );
    let fb = dir.write(
        "b.json",
        table(
            "hub-b",
            &p,
            &[("hub-a", format!("http://127.0.0.1:{port_a}"))],
            &[],
            json!({}),
            route,
        ),
    );
    let _hub_a = HubProc::start_on(port_a, &fa, &[]).await;
    let hub_b = HubProc::start_on(port_b, &fb, &[]).await;

    let mut body = b"{not json".to_vec();
    body.extend_from_slice(&[0, 255, 254, 10, 13]);
    let hdrs = [
        ("x-request-id", "out-1"),
        ("x-provider-id", "provider-c"),
        ("x-hub-path", "hub-a,hub-b"),
        ("content-type", "application/octet-stream"),
    ];
    let r = request(&hub_b.addr, "POST", "/_hub/outcomes", &hdrs, &body)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 202, "{}", hub_b.logs());
    assert_eq!(r.header("x-request-id"), Some("out-1"));
    eventually("the sink to receive the outcome via hub-a", WAIT, || {
        (sink.count() == 1).then_some(())
    })
    .await;
    let got = &sink.requests()[0];
    assert_eq!(got.path, "/outcomes");
    assert_eq!(got.body, body, "byte-identical, never parsed");
    assert_eq!(got.header("x-request-id"), Some("out-1"));
    assert_eq!(got.header("x-provider-id"), Some("provider-c"));
    assert_eq!(got.header("x-hub-path"), Some("hub-a,hub-b"));
    assert_eq!(got.header("content-type"), Some("application/octet-stream"));

    let r = request(&hub_b.addr, "POST", "/_hub/outcomes", &hdrs[..2], b"x")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("missing_header"))
    );
    let r = request(
        &hub_b.addr,
        "POST",
        "/_hub/outcomes",
        &hdrs,
        &vec![b'z'; 300_001],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 413);
    let r = request(&hub_b.addr, "GET", "/_hub/outcomes", &hdrs, b"")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 405);
    assert_eq!(sink.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcome_queue_full_is_503_with_retry_after() {
    let sink = Recorder::start(Behaviour::Gated).await;
    let dir = TempDir::new("outq");
    let f = dir.write(
        "t.json",
        table(
            "hub-a",
            &[("p", "http://127.0.0.1:9".into())],
            &[],
            &[sink.url()],
            json!({ "outcome_queue": 1 }),
            json!([{ "id": "r", "match": { "path_prefix": "/" }, "targets": ["p"] }]),
        ),
    );
    let hub = HubProc::start(&f, &[]).await;
    let hdrs = [
        ("x-request-id", "q-1"),
        ("x-provider-id", "p"),
        ("x-hub-path", "hub-a"),
    ];
    let r = request(&hub.addr, "POST", "/_hub/outcomes", &hdrs, b"1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 202);
    eventually("the first outcome to reach the held sink", WAIT, || {
        (sink.count() == 1).then_some(())
    })
    .await;
    let r = request(&hub.addr, "POST", "/_hub/outcomes", &hdrs, b"2")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    sink.open_gate();
    eventually("the queue to drain", WAIT, || {
        (sink.answered() == 1).then_some(())
    })
    .await;
    let r = eventually_status(&hub.addr, &hdrs).await;
    assert_eq!(r, 202);
}

/// Retries until the hub has released the queue slot of the delivered outcome.
async fn eventually_status(addr: &str, hdrs: &[(&str, &str)]) -> u16 {
    let end = std::time::Instant::now() + WAIT;
    loop {
        let s = request(addr, "POST", "/_hub/outcomes", hdrs, b"3")
            .await
            .map(|r| r.status)
            .unwrap_or(0);
        if s == 202 || std::time::Instant::now() > end {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_deliveries_reach_every_target_once_on_one_connection_each() {
    let a = Recorder::start(Behaviour::Status(204)).await;
    let b = Recorder::start(Behaviour::Body(200, b"ack".to_vec())).await;
    let dir = TempDir::new("modes");
    let piped = json!({ "depth": 8, "connections": 1 });
    let t = json!({
        "version": "v1",
        "hub": { "id": "hub-a", "advertise": "http://127.0.0.1:1" },
        "providers": {
            "a": { "url": a.url(), "pipeline": piped },
            "b": { "url": b.url(), "pipeline": piped },
        },
        "routes": [
            { "id": "sure", "match": { "path_prefix": "/sure" }, "targets": ["a", "b"],
              "respond": "accept", "delivery": "confirmed" },
            { "id": "bg", "match": { "path_prefix": "/bg" }, "targets": ["a", "b"],
              "respond": "accept", "delivery": "async" },
        ],
    });
    let f = dir.write("t.json", t.to_string());
    let hub = HubProc::start(&f, &[]).await;
    let n = 24;
    let sends = (0..n).map(|i| {
        let addr = hub.addr.clone();
        tokio::spawn(async move {
            let (path, id) = if i % 2 == 0 {
                ("/sure", format!("pipe-{i}"))
            } else {
                ("/bg", format!("pipe-{i}"))
            };
            request(&addr, "POST", path, &[("x-request-id", &id)], id.as_bytes())
                .await
                .map(|r| r.status)
        })
    });
    let sends: Vec<_> = sends.collect();
    for (i, r) in sends.into_iter().enumerate() {
        let status = r
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"))
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(status, 204, "request {i}");
    }
    for (name, up) in [("a", &a), ("b", &b)] {
        eventually(&format!("{name} got every request"), WAIT, || {
            (up.count() == n).then_some(())
        })
        .await;
        let mut ids: Vec<String> = up
            .requests()
            .iter()
            .map(|r| {
                let id = r.header("x-request-id").unwrap_or("").to_string();
                assert_eq!(
                    r.body,
                    id.as_bytes(),
                    "{name}: a body went with another head"
                );
                id
            })
            .collect();
        ids.sort();
        let mut want: Vec<String> = (0..n).map(|i| format!("pipe-{i}")).collect();
        want.sort();
        assert_eq!(ids, want, "{name}: each request exactly once");
        assert_eq!(up.connections(), 1, "{name}: one pipelined connection");
    }
    eventually_async("every delivery counted as delivered", WAIT, || async {
        let ok = |r: &'static str, t: &'static str| {
            format!("hub_deliveries_total{{result=\"ok\",route=\"{r}\",target=\"{t}\"}}")
        };
        let mut sum = 0.0;
        for (r, t) in [("sure", "a"), ("sure", "b"), ("bg", "a"), ("bg", "b")] {
            sum += hub.metric(&ok(r, t)).await;
        }
        (sum == 2.0 * n as f64).then_some(())
    })
    .await;
    assert_eq!(
        hub.metric("hub_pipelined_deliveries_total").await,
        2.0 * n as f64
    );
    let writes = hub.metric("hub_pipeline_writes_total").await;
    assert!(
        (1.0..=2.0 * n as f64).contains(&writes),
        "batches written: {writes}"
    );
}
