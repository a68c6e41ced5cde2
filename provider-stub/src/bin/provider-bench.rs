//! `provider-bench`: a load driver for `multihub-provider` (a benchmark, not a test).
//!
//! Starts a dummy association (answers every signal 201 and counts them), writes a config into a
//! temporary directory, starts the provider binary on loopback, then drives `--connections`
//! keep-alive connections, each sending hub-stamped intents with unique request ids for
//! `--seconds`. Every 200 answer is a durable, signed, hash-chained receipt. Prints receipts/s,
//! then waits for the outbox to deliver every START / COMPLETE and optionally runs `verify`.

use clap::Parser;
use multihub_protocol::hashing::{binding_hex, repr_of};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
#[command(name = "provider-bench", about = "load driver for multihub-provider")]
struct Args {
    /// The provider binary (default: `multihub-provider` beside this one).
    #[arg(long)]
    provider_bin: Option<PathBuf>,
    /// Concurrent keep-alive connections. Durable throughput comes from group commit, which
    /// needs concurrent requests: measured on 2 cores, 256 gave ~40 ops per commit and 512 ~45–58
    /// with ~20 % less CPU per receipt (mean latency ~75 ms, two fsynced commits per request).
    #[arg(long, default_value_t = 512)]
    connections: usize,
    /// Measured duration.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Warm-up before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Provider ingest threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Run `multihub-provider verify` on the store afterwards.
    #[arg(long)]
    verify: bool,
}

const POLICY: &str = r#"{"id":"bench","version":"1","ops":{"transfer":"credit"},"max_amount":1000000,
 "scoring":{"weights":{"amount":1,"delegation":1,"target":1},"default_target_trust_bp":8000}}"#;
const DELEGATIONS: &str = r#"{"version":1,"delegations":{"bench":{"ops":["transfer"],"targets":["*"],"max_amount":1000000}}}"#;

/// Reads header lines (after the request or status line) through the blank line that ends the
/// head, using `line` as the buffer. Returns the `Content-Length` (0 if absent or unparsable), or
/// `None` if the connection ended or failed first.
async fn read_headers<R: AsyncBufRead + Unpin>(r: &mut R, line: &mut String) -> Option<usize> {
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(line).await.unwrap_or(0) == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Some(len);
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
}

/// A dummy association: 201 to every request, counting them.
async fn association(listener: TcpListener, count: Arc<AtomicU64>) {
    while let Ok((sock, _)) = listener.accept().await {
        let count = count.clone();
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            let (r, mut w) = sock.into_split();
            let mut r = BufReader::new(r);
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let Some(len) = read_headers(&mut r, &mut line).await else {
                    return;
                };
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).await.is_err() {
                    return;
                }
                count.fetch_add(1, Ordering::Relaxed);
                if w.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

/// One client connection: sequential requests until `stop`; returns 200s counted while
/// `measuring`.
async fn client(
    addr: String,
    conn: usize,
    stop: Arc<AtomicBool>,
    measuring: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    bad: Arc<AtomicU64>,
    all_ok: Arc<AtomicU64>,
) {
    let Ok(sock) = TcpStream::connect(&addr).await else {
        bad.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let _ = sock.set_nodelay(true);
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let body = format!(
            r#"{{"op":"transfer","target":"acct-{}","amount":{}}}"#,
            conn % 64,
            i % 100 + 1
        );
        let repr = repr_of(body.as_bytes());
        let binding = binding_hex(repr.as_str(), b"");
        let req = format!(
            "POST /v1/payments HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\nx-request-id: b{conn}-{i}\r\nx-delegation-id: bench\r\nx-hub-request-repr: {}\r\nx-hub-binding: {binding}\r\n\r\n{body}",
            body.len(),
            repr.as_str()
        );
        if w.write_all(req.as_bytes()).await.is_err() {
            bad.fetch_add(1, Ordering::Relaxed);
            return;
        }
        line.clear();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            bad.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let Some(len) = read_headers(&mut r, &mut line).await else {
            return;
        };
        let mut b = vec![0u8; len];
        if r.read_exact(&mut b).await.is_err() {
            return;
        }
        if status == 200 {
            all_ok.fetch_add(1, Ordering::Relaxed);
        }
        let counted = if measuring.load(Ordering::Relaxed) {
            if status == 200 {
                &ok
            } else {
                &bad
            }
        } else {
            continue;
        };
        counted.fetch_add(1, Ordering::Relaxed);
    }
}

async fn fetch_metrics(admin: &str) -> String {
    let Ok(mut s) = TcpStream::connect(admin).await else {
        return String::new();
    };
    if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

/// CPU seconds (user + system) used so far by each thread of process `pid`, by thread name.
fn cpu_by_thread(pid: u32) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Vec::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(l), Some(r)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[l + 1..r].to_string();
        let f: Vec<&str> = stat[r + 2..].split(' ').collect();
        // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the name.
        let ticks = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some(x) => x.1 += ticks / 100.0,
            None => out.push((name, ticks / 100.0)),
        }
    }
    out
}

/// Fraction of both cores busy during the last `secs` (from /proc/loadavg is too coarse; use
/// /proc/stat deltas kept in a static).
fn busy_fraction(_secs: f64) -> f64 {
    static PREV: std::sync::Mutex<Option<(f64, f64)>> = std::sync::Mutex::new(None);
    let now = proc_stat();
    let mut prev = PREV.lock().unwrap_or_else(|e| e.into_inner());
    let r = match (*prev, now) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) / (t1 - t0),
        _ => 0.0,
    };
    *prev = now;
    r
}

/// (busy, total) jiffies of all CPUs.
fn proc_stat() -> Option<(f64, f64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    Some((total - idle, total))
}

fn total(v: &[(String, f64)]) -> f64 {
    v.iter().map(|(_, c)| c).sum()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), String> {
    let a = Args::parse();
    let bin = match a.provider_bin {
        Some(b) => b,
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("multihub-provider"),
    };
    let dir = std::env::temp_dir().join(format!("multihub-provider-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("pol")).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("pol/bench.json"), POLICY).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("deleg.json"), DELEGATIONS).map_err(|e| e.to_string())?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let assoc_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let signals = Arc::new(AtomicU64::new(0));
    tokio::spawn(association(listener, signals.clone()));
    let (port, admin) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{port}");
    let cfg = serde_json::json!({
        "version": 1, "provider": "provider-bench",
        "listen": addr, "admin_listen": format!("127.0.0.1:{admin}"),
        "key_file": dir.join("state/key"), "store": dir.join("state/provider.db"),
        "policy": {"dir": dir.join("pol"), "id": "bench", "version": "1"},
        "delegations": dir.join("deleg.json"),
        "association": {"url": format!("http://{assoc_addr}")},
        "limits": {"threads": a.threads, "max_in_flight": 65536, "write_queue": 65536},
        "outbox": {"concurrency": 64, "queue": 1000000},
    });
    std::fs::write(dir.join("cfg.json"), cfg.to_string()).map_err(|e| e.to_string())?;
    let mut child = Command::new(&bin)
        .arg("--config")
        .arg(dir.join("cfg.json"))
        .env("MULTIHUB_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let end = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(&addr).await.is_err() {
        if Instant::now() > end {
            let _ = child.kill();
            return Err("provider not ready".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let all_ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..a.connections {
        tasks.push(tokio::spawn(client(
            addr.clone(),
            c,
            stop.clone(),
            measuring.clone(),
            ok.clone(),
            bad.clone(),
            all_ok.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    let sig0 = signals.load(Ordering::Relaxed);
    measuring.store(true, Ordering::SeqCst);
    let cpu0 = cpu_by_thread(child.id());
    let me0 = total(&cpu_by_thread(std::process::id()));
    busy_fraction(0.0);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    measuring.store(false, Ordering::SeqCst);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_by_thread(child.id());
    let me1 = total(&cpu_by_thread(std::process::id()));
    let sig1 = signals.load(Ordering::Relaxed);
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }
    let n = ok.load(Ordering::Relaxed);
    println!(
        "receipts: {n} durable signed receipts in {elapsed:.2}s = {:.0} receipts/s ({} connections, {} provider threads, {} non-200)",
        n as f64 / elapsed,
        a.connections,
        a.threads,
        bad.load(Ordering::Relaxed)
    );
    if n > 0 {
        let per = |c: f64| 1e6 * c / n as f64;
        let mut parts: Vec<String> = cpu1
            .iter()
            .map(|(name, c1)| {
                let c0 = cpu0
                    .iter()
                    .find(|(x, _)| x == name)
                    .map(|x| x.1)
                    .unwrap_or(0.0);
                (name.clone(), c1 - c0)
            })
            .filter(|(_, c)| *c > 0.0)
            .map(|(name, c)| format!("{name} {:.0}", per(c)))
            .collect();
        parts.sort();
        let prov = total(&cpu1) - total(&cpu0);
        let drv = me1 - me0;
        println!(
            "cpu per receipt: provider {:.0} us ({}), driver + dummy association {:.0} us; machine busy {:.0}% incl. other tenants",
            per(prov),
            parts.join(", "),
            per(drv),
            100.0 * busy_fraction(elapsed)
        );
        println!(
            "cpu-bound estimate on 2 idle cores (provider + driver), not a measurement: {:.0} receipts per second",
            2.0e6 / (per(prov) + per(drv))
        );
    }
    println!(
        "signals acknowledged by the dummy association during the window: {:.0}/s",
        (sig1 - sig0) as f64 / elapsed
    );
    // Drain: every committed receipt has a START and a COMPLETE in the outbox.
    let drain = Instant::now();
    let want = 2 * all_ok.load(Ordering::Relaxed);
    let mut last = signals.load(Ordering::Relaxed);
    let mut still = Instant::now();
    while last < want {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = signals.load(Ordering::Relaxed);
        if now != last {
            last = now;
            still = Instant::now();
        } else if still.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    println!(
        "outbox: {last} of {want} signals acknowledged ({} receipts in total incl. warm-up), drain took {:.1}s after the load",
        want / 2,
        drain.elapsed().as_secs_f64()
    );
    let metrics = fetch_metrics(&format!("127.0.0.1:{admin}")).await;
    let pick = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let reqs = pick("provider_request_seconds_count");
    if reqs > 0.0 {
        println!(
            "provider: mean {:.2} ms from body read to durable answer",
            1000.0 * pick("provider_request_seconds_sum") / reqs
        );
    }
    let commits = pick("provider_commit_seconds_count");
    if commits > 0.0 {
        println!(
            "store: {commits:.0} group commits, {:.1} ops per commit, {:.2} ms per commit",
            pick("provider_commit_batch_ops_sum") / commits,
            1000.0 * pick("provider_commit_seconds_sum") / commits
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    if a.verify {
        let t = Instant::now();
        let out = Command::new(&bin)
            .args(["verify", "--store"])
            .arg(dir.join("state/provider.db"))
            .output()
            .map_err(|e| e.to_string())?;
        print!(
            "verify ({:.1}s): {}",
            t.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
