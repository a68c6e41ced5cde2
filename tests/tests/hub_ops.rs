//! Hub operations (issue 5): hot reload under load, invalid versions, SIGHUP, rollback, metrics,
//! graceful shutdown and zero-downtime upgrade. Real processes, recording upstreams.

use multihub_tests::http::{request, Conn};
use multihub_tests::procs::{assert_cannot_listen, run_bin, taken_port};
use multihub_tests::{
    eventually, eventually_async, free_port, Behaviour, HubProc, Recorder, TempDir, DOWN_URL,
};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn version(v: &str, target: &str, providers: &[(&str, String)]) -> String {
    let p: serde_json::Map<String, Value> = providers
        .iter()
        .map(|(k, u)| (k.to_string(), json!({ "url": u })))
        .collect();
    json!({
        "version": v,
        "hub": { "id": "hub-a", "advertise": "http://127.0.0.1:1" },
        "providers": p,
        "routes": [{ "id": format!("r-{v}"), "match": { "path_prefix": "/" }, "targets": [target] }],
    })
    .to_string()
}

fn activate(dir: &Path, v: &str) {
    let (code, out, err) = run_bin(
        "multihub-hub",
        &["routes", "activate", "--routes", &dir.to_string_lossy(), v],
    );
    assert_eq!(code, 0, "{out}{err}");
}

/// The table version that answers a request now (`x-hub-route-version`).
async fn served_version(hub: &HubProc) -> Option<String> {
    request(&hub.addr, "POST", "/", &[], b"")
        .await
        .ok()
        .and_then(|r| r.header("x-hub-route-version").map(str::to_string))
}

async fn metric(hub: &HubProc, name_and_labels: &str) -> f64 {
    hub.metric(name_and_labels).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_serves_each_request_by_one_version() {
    let (a, b) = (
        Recorder::start(Behaviour::Status(200)).await,
        Recorder::start(Behaviour::Status(200)).await,
    );
    let providers = [("pa", a.url()), ("pb", b.url())];
    let dir = TempDir::new("reload");
    let routes = dir.path().join("routes");
    std::fs::create_dir_all(&routes).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(routes.join("va.json"), version("va", "pa", &providers))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(routes.join("vb.json"), version("vb", "pb", &providers))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(routes.join("active"), "va\n").unwrap_or_else(|e| panic!("{e}"));
    let hub = HubProc::start(&routes, &["--access-log", "off"]).await;

    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 2500;
    let done = Arc::new(AtomicBool::new(false));
    let activations = Arc::new(AtomicU64::new(0));
    let flipper = {
        let (done, activations, routes) = (done.clone(), activations.clone(), routes.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !done.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                n += 1;
                let v = if n % 2 == 1 { "vb" } else { "va" };
                let r = routes.clone();
                // Counted only when `routes activate` succeeded (it panics otherwise).
                if tokio::task::spawn_blocking(move || activate(&r, v))
                    .await
                    .is_ok()
                {
                    activations.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let addr = hub.addr.clone();
        let activations = activations.clone();
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::with_capacity(PER_CLIENT);
            let mut conn = Conn::open(&addr).await.unwrap_or_else(|e| panic!("{e}"));
            // At least PER_CLIENT requests, and on until the table has flipped a few times
            // (on a fast machine the load alone can finish between two flips).
            let mut i = 0;
            // (Bounded, so failing activations fail the assertion below instead of hanging.)
            while i < PER_CLIENT || (activations.load(Ordering::SeqCst) < 5 && i < 20 * PER_CLIENT)
            {
                i += 1;
                let id = format!("c{c}-{i}");
                let r = conn
                    .request("POST", "/op", &[("x-request-id", &id)], b"x")
                    .await
                    .unwrap_or_else(|e| panic!("{id}: {e}"));
                assert_eq!(r.status, 204, "{id} failed: {:?}", r.msg);
                seen.push((
                    id,
                    r.header("x-hub-route-version").unwrap_or("").to_string(),
                ));
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for c in clients {
        all.extend(c.await.unwrap_or_else(|e| panic!("{e}")));
    }
    done.store(true, Ordering::SeqCst);
    let _ = flipper.await;
    assert!(all.len() >= CLIENTS * PER_CLIENT);
    assert!(
        activations.load(Ordering::SeqCst) >= 5,
        "too few activations during the load"
    );

    let ids = |r: &Recorder| {
        r.requests()
            .iter()
            .filter_map(|q| q.header("x-request-id").map(str::to_string))
            .collect::<HashSet<_>>()
    };
    let (at_a, at_b) = (ids(&a), ids(&b));
    let mut per_version = (0, 0);
    for (id, v) in &all {
        match v.as_str() {
            "va" => {
                per_version.0 += 1;
                assert!(
                    at_a.contains(id) && !at_b.contains(id),
                    "{id} answered by va must reach pa only"
                );
            }
            "vb" => {
                per_version.1 += 1;
                assert!(
                    at_b.contains(id) && !at_a.contains(id),
                    "{id} answered by vb must reach pb only"
                );
            }
            other => panic!("{id}: unknown version {other:?}"),
        }
    }
    assert!(
        per_version.0 > 0 && per_version.1 > 0,
        "both versions served: {per_version:?}"
    );
    assert_eq!(
        a.count() + b.count(),
        all.len(),
        "exactly one delivery per request"
    );
    // Every copy carries the version it was routed by.
    for q in a.requests() {
        assert_eq!(q.header("x-hub-route-version"), Some("va"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_version_keeps_the_old_one_and_sighup_and_rollback_work() {
    let a = Recorder::start(Behaviour::Status(200)).await;
    let providers = [("pa", a.url())];
    let dir = TempDir::new("invalid");
    let routes = dir.path().join("routes");
    std::fs::create_dir_all(&routes).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(routes.join("v1.json"), version("v1", "pa", &providers))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(routes.join("v2.json"), version("v2", "pa", &providers))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(routes.join("v3.json"), version("v3", "nobody", &providers))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(routes.join("active"), "v1\n").unwrap_or_else(|e| panic!("{e}"));
    let hub = HubProc::start(&routes, &[]).await;
    let served = || served_version(&hub);
    assert_eq!(served().await.as_deref(), Some("v1"));

    // `routes activate` refuses an invalid version; a pointer written by hand (a file sync) is refused by the hub.
    let (code, _, err) = run_bin(
        "multihub-hub",
        &[
            "routes",
            "activate",
            "--routes",
            &routes.to_string_lossy(),
            "v3",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("$.routes[0].targets[0]: unknown provider \"nobody\""),
        "{err}"
    );
    let before = metric(&hub, "hub_routes_reloads_total{result=\"error\"}").await;
    std::fs::write(routes.join(".tmp"), "v3\n").unwrap_or_else(|e| panic!("{e}"));
    std::fs::rename(routes.join(".tmp"), routes.join("active")).unwrap_or_else(|e| panic!("{e}"));
    let mut after = 0.0;
    for _ in 0..1000 {
        after = metric(&hub, "hub_routes_reloads_total{result=\"error\"}").await;
        if after > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(after > before, "reload error counted");
    assert_eq!(
        served().await.as_deref(),
        Some("v1"),
        "old version keeps serving"
    );
    let r = request(&hub.admin, "GET", "/routes", &[], b"")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let j = r.json();
    assert_eq!(j["version"], "v1");
    assert!(
        j["last_reload_error"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("$.routes[0].targets[0]"),
        "{j}"
    );

    // Activate v2 with the CLI: served.
    activate(&routes, "v2");
    let mut v = None;
    for _ in 0..1000 {
        v = served().await;
        if v.as_deref() == Some("v2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(v.as_deref(), Some("v2"));
    let r = request(&hub.admin, "GET", "/routes", &[], b"")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.json()["last_reload_error"], Value::Null);

    // SIGHUP reloads (here: nothing changed) and does not kill the hub.
    let unchanged = metric(&hub, "hub_routes_reloads_total{result=\"unchanged\"}").await;
    hub.signal("HUP");
    let mut now = unchanged;
    for _ in 0..1000 {
        now = metric(&hub, "hub_routes_reloads_total{result=\"unchanged\"}").await;
        if now > unchanged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(now > unchanged, "SIGHUP triggered a reload");

    // Rollback = point back.
    activate(&routes, "v1");
    for _ in 0..1000 {
        v = served().await;
        if v.as_deref() == Some("v1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(v.as_deref(), Some("v1"));
    let (code, out, _) = run_bin(
        "multihub-hub",
        &["routes", "list", "--routes", &routes.to_string_lossy()],
    );
    assert_eq!(code, 0);
    assert!(out.contains("* v1  valid"), "{out}");
    assert!(
        out.contains("  v3  invalid: $.routes[0].targets[0]"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_swapped_table_reloads_and_neighbouring_writes_do_not() {
    // A Kubernetes volume: table.json -> ..data/table.json, ..data -> a versioned directory,
    // updated by renaming a new ..data link into place (no event names table.json).
    let a = Recorder::start(Behaviour::Status(200)).await;
    let providers = [("pa", a.url())];
    let dir = TempDir::new("swap");
    let d = dir.path();
    for v in ["v1", "v2"] {
        std::fs::create_dir_all(d.join(v)).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(d.join(v).join("table.json"), version(v, "pa", &providers))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    std::os::unix::fs::symlink("v1", d.join("..data")).unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::symlink("..data/table.json", d.join("table.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    let hub = HubProc::start(&d.join("table.json"), &[]).await;
    let reloads = |result: &'static str| {
        let hub = &hub;
        async move {
            hub.metric(&format!("hub_routes_reloads_total{{result=\"{result}\"}}"))
                .await
        }
    };
    let served = || served_version(&hub);
    assert_eq!(served().await.as_deref(), Some("v1"));
    let ok_before = reloads("ok").await;

    // Writes to other files beside the table are not reloads.
    for i in 0..20 {
        std::fs::write(d.join("hub.log"), format!("line {i}\n")).unwrap_or_else(|e| panic!("{e}"));
    }
    hub.signal("HUP");
    eventually_async("the SIGHUP reload", WAIT, || async {
        (reloads("unchanged").await >= 1.0).then_some(())
    })
    .await;
    assert_eq!(reloads("ok").await, ok_before);

    std::os::unix::fs::symlink("v2", d.join("..data_tmp")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap_or_else(|e| panic!("{e}"));
    eventually_async("v2 to serve after the swap", WAIT, || async {
        (served().await.as_deref() == Some("v2")).then_some(())
    })
    .await;
    assert_eq!(reloads("ok").await, ok_before + 1.0);
    // Long after the writes: the SIGHUP was the only reload that found nothing new.
    assert_eq!(
        reloads("unchanged").await,
        1.0,
        "writes beside the table reloaded it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_every_family_with_its_type() {
    let a = Recorder::start(Behaviour::Status(200)).await;
    let dir = TempDir::new("metrics");
    let f = dir.write("t.json", version("v1", "pa", &[("pa", a.url())]));
    let hub = HubProc::start(&f, &[]).await;
    for _ in 0..3 {
        request(&hub.addr, "POST", "/", &[], b"x")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    request(&hub.addr, "POST", "/_hub/nothing", &[], b"")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Request metrics are recorded in the logging phase, just after the answer: poll.
    let expected = [
        "hub_requests_total{code_class=\"2xx\",respond=\"accept\",route=\"r-v1\"} 3",
        "hub_requests_total{code_class=\"4xx\",respond=\"none\",route=\"\"} 1",
        "hub_deliveries_total{result=\"ok\",route=\"r-v1\",target=\"pa\"} 3",
        "hub_routes_active_info{version=\"v1\"} 1",
    ];
    let mut text = String::new();
    for _ in 0..500 {
        text = String::from_utf8_lossy(
            request(&hub.admin, "GET", "/metrics", &[], b"")
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .body(),
        )
        .into_owned();
        if expected.iter().all(|e| text.contains(e)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for e in expected {
        assert!(text.contains(e), "{e} missing:\n{text}");
    }
    for (family, kind) in [
        ("hub_requests_total", "counter"),
        ("hub_request_duration_seconds", "histogram"),
        ("hub_deliveries_total", "counter"),
        ("hub_delivery_duration_seconds", "histogram"),
        ("hub_deliveries_in_flight", "gauge"),
        ("hub_deliveries_in_flight_bound", "gauge"),
        ("hub_deliveries_dropped_total", "counter"),
        ("hub_relays_total", "counter"),
        ("hub_relays_suppressed_total", "counter"),
        ("hub_routes_reloads_total", "counter"),
        ("hub_routes_active_info", "gauge"),
        ("hub_routes_last_reload_success_timestamp_seconds", "gauge"),
        ("hub_outcomes_total", "counter"),
        ("hub_outcome_deliveries_total", "counter"),
    ] {
        // Families without samples yet are registered but not printed by the encoder: create one.
        let line = format!("# TYPE {family} {kind}");
        if !text.contains(&line) {
            assert!(
                [
                    "hub_deliveries_dropped_total",
                    "hub_relays_total",
                    "hub_relays_suppressed_total",
                    "hub_outcomes_total",
                    "hub_outcome_deliveries_total"
                ]
                .contains(&family),
                "{family} ({kind}) missing:\n{text}"
            );
        }
    }
    // Every sample line parses as `name{labels} value`.
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let v = l.rsplit(' ').next().unwrap_or("");
        assert!(
            v.parse::<f64>().is_ok() || v == "+Inf",
            "bad sample line {l:?}"
        );
    }
    match std::process::Command::new("promtool").args(["check", "metrics"]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn() {
        Ok(mut child) => {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(text.as_bytes());
            }
            let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
            assert!(out.status.success(), "promtool: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        Err(_) => eprintln!("promtool not installed (Debian: apt-get install -y prometheus): skipping `promtool check metrics`"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_accepted_requests_and_finishes_async_deliveries() {
    let held = Recorder::start(Behaviour::Gated).await;
    let dir = TempDir::new("term");
    let doc = json!({
        "version": "v1",
        "hub": { "id": "hub-a", "advertise": "http://127.0.0.1:1" },
        "providers": { "held": { "url": held.url(), "timeout_ms": 30000 } },
        "routes": [{ "id": "async", "match": { "path_prefix": "/async" }, "targets": ["held"], "delivery": "async" },
                   { "id": "conf", "match": { "path_prefix": "/conf" }, "targets": ["held"] }],
    });
    let f = dir.write("t.json", doc.to_string());
    let mut hub = HubProc::start(&f, &["--grace-period", "60"]).await;
    for i in 0..10 {
        let r = request(
            &hub.addr,
            "POST",
            "/async",
            &[("x-request-id", &format!("a{i}"))],
            b"x",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, 204);
    }
    // Two confirmed requests in flight (their target is held).
    let mut pending = Vec::new();
    for i in 0..2 {
        let addr = hub.addr.clone();
        pending.push(tokio::spawn(async move {
            request(
                &addr,
                "POST",
                "/conf",
                &[("x-request-id", &format!("c{i}"))],
                b"y",
            )
            .await
            .map(|r| r.status)
        }));
    }
    eventually("all 12 deliveries to reach the held target", WAIT, || {
        (held.count() == 12).then_some(())
    })
    .await;
    hub.signal("TERM");
    // Draining: new connections are refused, the process waits for the held work.
    eventually("the listener to close", WAIT, || {
        std::net::TcpStream::connect(&hub.addr)
            .is_err()
            .then_some(())
    })
    .await;
    assert!(
        hub.alive(),
        "exited before its in-flight work was done:\n{}",
        hub.logs()
    );
    held.open_gate();
    for p in pending {
        assert_eq!(
            p.await.ok().and_then(Result::ok),
            Some(204),
            "accepted request answered"
        );
    }
    let code = hub.wait_exit(WAIT).await;
    assert_eq!(code, Some(0), "{}", hub.logs());
    assert_eq!(
        held.answered(),
        12,
        "every async delivery completed within the grace period"
    );
    assert!(
        hub.logs().contains("drained, nothing dropped"),
        "{}",
        hub.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_hands_over_listeners_without_failed_requests() {
    let a = Recorder::start(Behaviour::Status(200)).await;
    let dir = TempDir::new("upgrade");
    let f = dir.write("t.json", version("v1", "pa", &[("pa", a.url())]));
    let sock = dir.path().join("upgrade.sock");
    let sock = sock.to_string_lossy().to_string();
    let (port, admin_port) = (free_port(), free_port());
    let mut old = HubProc::spawn(port, admin_port, &f, &["--upgrade-sock", &sock]);
    old.wait_ready().await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let resets = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for c in 0..4 {
        let (stop, ok, resets, addr) = (stop.clone(), ok.clone(), resets.clone(), old.addr.clone());
        load.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let id = format!("u{c}-{i}");
                let hdrs = [("connection", "close"), ("x-request-id", id.as_str())];
                // PUT is idempotent: like any HTTP client, retry once when the connection is
                // reset before any response byte (Pingora drops connections whose request head
                // has not arrived when the old process stops; the request was never processed).
                let mut r = request(&addr, "PUT", "/x", &hdrs, b"z").await;
                if matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset || e.kind() == std::io::ErrorKind::UnexpectedEof) {
                    resets.fetch_add(1, Ordering::SeqCst);
                    r = request(&addr, "PUT", "/x", &hdrs, b"z").await;
                }
                match r {
                    Ok(r) if r.status == 204 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => failures.push(format!("{id}: {other:?}")),
                }
            }
            failures
        }));
    }
    eventually("load to start", WAIT, || {
        (ok.load(Ordering::SeqCst) > 50).then_some(())
    })
    .await;
    let mut new = HubProc::spawn(
        port,
        admin_port,
        &f,
        &["--upgrade", "--upgrade-sock", &sock],
    );
    // The new process waits for the sockets; hand them over.
    let mut handed = false;
    for _ in 0..500 {
        if Path::new(&sock).exists() {
            handed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        handed,
        "new process never opened the upgrade socket:\n{}",
        new.logs()
    );
    old.signal("QUIT");
    assert_eq!(
        old.wait_exit(WAIT).await,
        Some(0),
        "old process exits after draining:\n{}",
        old.logs()
    );
    let served_before = ok.load(Ordering::SeqCst);
    eventually("the new process to serve", WAIT, || {
        (ok.load(Ordering::SeqCst) > served_before + 50).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for l in load {
        failures.extend(l.await.unwrap_or_default());
    }
    assert!(
        failures.is_empty(),
        "{} failed requests across the handover, first: {:?}\nold:\n{}\nnew:\n{}",
        failures.len(),
        failures.first(),
        old.logs(),
        new.logs()
    );
    assert!(new.alive());
    new.wait_ready().await;
    eprintln!(
        "upgrade: {} requests answered, {} retried after a reset before any response byte",
        ok.load(Ordering::SeqCst),
        resets.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_async_wait_a_request_at_the_bound_waits_for_a_slot_instead_of_dropping() {
    const DROPPED: &str = "hub_deliveries_dropped_total{reason=\"in_flight_full\"}";
    // With the long wait, a third request finds `max_in_flight` (1) requests waiting already:
    // it does not wait, its delivery is the one dropped.
    for (wait_ms, dropped) in [(600_000, 1.0), (1, 1.0)] {
        let held = Recorder::start(Behaviour::Gated).await;
        let dir = TempDir::new("wait");
        let hub = fill_bound(&dir, &held, 1, wait_ms).await;
        let addr = hub.addr.clone();
        let second = tokio::spawn(async move { request(&addr, "POST", "/", &[], b"second").await });
        if wait_ms > 1 {
            eventually_async("the second request waits for the slot", WAIT, || async {
                (metric(&hub, "hub_async_waiting").await == 1.0).then_some(())
            })
            .await;
            assert!(!second.is_finished(), "its 204 waits with it");
            let r = request(&hub.addr, "POST", "/", &[], b"third")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.status, 204, "no second waiter: answered at once");
            assert_eq!(metric(&hub, DROPPED).await, 1.0);
            held.open_gate();
        }
        let r = second
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, 204, "wait {wait_ms} ms");
        assert_eq!(metric(&hub, DROPPED).await, dropped, "wait {wait_ms} ms");
        assert_eq!(metric(&hub, "hub_async_waiting").await, 0.0);
        if wait_ms > 1 {
            eventually("the second delivered once the first ended", WAIT, || {
                (held.count() == 2).then_some(())
            })
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_async_wait_fan_out_requests_take_all_their_slots_at_once() {
    // Bound 3, three targets per request: one request fills the bound; two more wait, each
    // for all three of its slots, and both go out once the first one's deliveries end.
    let held = Recorder::start(Behaviour::Gated).await;
    let dir = TempDir::new("wait3");
    let hub = fill_bound(&dir, &held, 3, 600_000).await;
    let waiting: Vec<_> = ["second", "third"]
        .iter()
        .map(|b| {
            let addr = hub.addr.clone();
            tokio::spawn(async move { request(&addr, "POST", "/", &[], b.as_bytes()).await })
        })
        .collect();
    eventually_async("both wait", WAIT, || async {
        (metric(&hub, "hub_async_waiting").await == 2.0).then_some(())
    })
    .await;
    assert_eq!(metric(&hub, "hub_deliveries_in_flight").await, 3.0);
    held.open_gate();
    for w in waiting {
        let r = w
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, 204);
    }
    eventually("every delivery of all three requests", WAIT, || {
        (held.count() == 9).then_some(())
    })
    .await;
    assert_eq!(
        metric(
            &hub,
            "hub_deliveries_dropped_total{reason=\"in_flight_full\"}"
        )
        .await,
        0.0
    );
}

/// Starts a hub whose only route delivers `async` to `bound` targets, all `held`, with
/// `hub.max_in_flight` = `bound` and `async_wait_ms` = `wait_ms`, and fills the bound with a
/// first request (answered 204 at once, its deliveries held).
async fn fill_bound(dir: &TempDir, held: &Recorder, bound: usize, wait_ms: u64) -> HubProc {
    let mut t: Value = serde_json::from_str(&bounded_to("w", bound, &held.url(), bound))
        .unwrap_or_else(|e| panic!("{e}"));
    t["hub"]["async_wait_ms"] = json!(wait_ms);
    let f = dir.write("t.json", t.to_string());
    let hub = HubProc::start(&f, &[]).await;
    let r = request(&hub.addr, "POST", "/", &[], b"first")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 204);
    eventually(
        "the first request's deliveries hold the bound",
        WAIT,
        || (held.count() == bound).then_some(()),
    )
    .await;
    hub
}

/// A version whose only route delivers `async` to `target`, with `hub.max_in_flight` = `bound`.
/// Held deliveries neither time out nor retry (either would reach the target again and skew the
/// counts on a slow machine).
fn bounded(v: &str, bound: usize, target: &str) -> String {
    bounded_to(v, bound, target, 1)
}

/// [`bounded`] with `targets` providers (`held`, `held2`, ...), all at `target`.
fn bounded_to(v: &str, bound: usize, target: &str, targets: usize) -> String {
    let ids: Vec<String> = (1..=targets)
        .map(|k| {
            if k == 1 {
                "held".to_string()
            } else {
                format!("held{k}")
            }
        })
        .collect();
    let providers: serde_json::Map<String, Value> = ids
        .iter()
        .map(|id| (id.clone(), json!({ "url": target, "timeout_ms": 600000 })))
        .collect();
    json!({
        "version": v,
        "hub": {
            "id": "hub-a", "advertise": "http://127.0.0.1:1",
            "max_in_flight": bound, "async_retries": 0,
        },
        "providers": providers,
        "routes": [{ "id": "r", "match": { "path_prefix": "/" }, "targets": ids, "delivery": "async" }],
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_resizes_the_in_flight_bound() {
    let held = Recorder::start(Behaviour::Gated).await;
    let dir = TempDir::new("bound");
    let routes = dir.path().join("routes");
    std::fs::create_dir_all(&routes).unwrap_or_else(|e| panic!("{e}"));
    for (v, bound) in [("one", 1), ("four", 4)] {
        std::fs::write(
            routes.join(format!("{v}.json")),
            bounded(v, bound, &held.url()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    std::fs::write(routes.join("active"), "one\n").unwrap_or_else(|e| panic!("{e}"));
    let hub = HubProc::start(&routes, &[]).await;
    const DROPPED: &str = "hub_deliveries_dropped_total{reason=\"in_flight_full\"}";
    let send = |n: usize| {
        let addr = hub.addr.clone();
        async move {
            for _ in 0..n {
                let r = request(&addr, "POST", "/", &[], b"x")
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(r.status, 204);
            }
        }
    };
    // Waits until each of the `sent` requests so far was either delivered or dropped (the
    // deliveries are admitted in the background after the 204), then returns (held, dropped).
    let settled = |sent: usize| {
        let hub = &hub;
        let held = &held;
        async move {
            eventually_async("every delivery admitted or dropped", WAIT, || async {
                let dropped = metric(hub, DROPPED).await as usize;
                (held.count() + dropped == sent).then_some((held.count(), dropped))
            })
            .await
        }
    };
    let active = |v: &'static str| {
        let admin = hub.admin.clone();
        move || {
            let admin = admin.clone();
            async move {
                let r = request(&admin, "GET", "/routes", &[], b"").await.ok()?;
                (r.json()["version"].as_str() == Some(v)).then_some(())
            }
        }
    };

    // Bound 1: the first delivery holds the only slot, the next two are dropped and counted.
    send(3).await;
    assert_eq!(settled(3).await, (1, 2));

    // Reloaded to 4: three more slots at once, while the first delivery is still held.
    activate(&routes, "four");
    eventually_async("version four active", WAIT, active("four")).await;
    send(3).await;
    assert_eq!(settled(6).await, (4, 2));
    assert_eq!(metric(&hub, "hub_deliveries_in_flight").await, 4.0);
    assert_eq!(metric(&hub, "hub_deliveries_in_flight_bound").await, 4.0);

    // Back to 1: nothing admitted is cut short; the bound shrinks as the held ones end.
    activate(&routes, "one");
    eventually_async("version one active", WAIT, active("one")).await;
    // All four slots are busy, so none can be taken back yet.
    assert_eq!(metric(&hub, "hub_deliveries_in_flight").await, 4.0);
    assert_eq!(metric(&hub, "hub_deliveries_in_flight_bound").await, 4.0);
    held.open_gate();
    eventually("the held deliveries to be answered", WAIT, || {
        (held.answered() == 4).then_some(())
    })
    .await;
    eventually_async("the bound to shrink to 1", WAIT, || async {
        let text = request(&hub.admin, "GET", "/metrics", &[], b"")
            .await
            .map(|r| String::from_utf8_lossy(r.body()).into_owned())
            .ok()?;
        text.lines()
            .any(|l| l == "hub_deliveries_in_flight_bound 1")
            .then_some(())
    })
    .await;
    held.close_gate();
    send(3).await;
    assert_eq!(settled(9).await, (5, 4));
    held.open_gate();
}

#[tokio::test]
async fn a_hub_that_cannot_listen_exits_at_once_naming_the_address() {
    // Pingora alone would retry a taken address for 30 s, then only its listener thread would
    // panic, the process living on and /readyz reaching whoever holds the address.
    let dir = TempDir::new("listen");
    let f = dir.write(
        "t.json",
        version("v1", "pa", &[("pa", DOWN_URL.to_string())]),
    );
    let (_held, taken) = taken_port();
    let free = || format!("127.0.0.1:{}", free_port());
    let (same, other) = (free(), free());
    for (listen, admin) in [(&taken, &other), (&other, &taken), (&same, &same)] {
        let args = [
            "--routes".as_ref(),
            f.as_os_str(),
            "--listen".as_ref(),
            listen.as_ref(),
            "--admin".as_ref(),
            admin.as_ref(),
        ];
        let bad = if listen == &taken { listen } else { admin };
        assert_cannot_listen("multihub-hub", &args, &dir.path().join("hub.log"), bad).await;
    }
    // Validating a table binds nothing: it works beside the running hub.
    let f = f.to_string_lossy();
    let (code, out, err) = run_bin(
        "multihub-hub",
        &["--routes", &f, "--listen", &taken, "--validate"],
    );
    assert_eq!(code, 0, "{out}{err}");
}
