//! `association-bench`: a load tool (not a test) for `multihub-association`.
//!
//! - `association-bench config --listen A --admin B --store P --providers N` prints a
//!   configuration whose provider keys are derived from fixed bench seeds (never use them for
//!   anything real), with policy `all_of` every provider.
//! - `association-bench run --addr A --providers N --operations M --connections C` signs
//!   `M × N × 2` signals up front (START and COMPLETE per provider per operation), sends them as
//!   fast as `C` keep-alive connections allow, and prints the rate of signals answered 201 —
//!   each of which the service verified and committed durably before answering.

use clap::{Parser, Subcommand};
use ed25519_dalek::SigningKey;
use multihub_protocol::hashing::{hex_into, repr_of};
use multihub_protocol::signal::{Signal, Stage};
use sha2::{Digest, Sha256};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
#[command(name = "association-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a configuration for the bench keys.
    Config {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        admin: String,
        #[arg(long)]
        store: String,
        #[arg(long, default_value_t = 2)]
        providers: usize,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// `strict` or `batch` (the service's `signature_check`).
        #[arg(long, default_value = "strict")]
        signature_check: String,
    },
    /// Drive signed signals and report the rate.
    Run {
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 2)]
        providers: usize,
        #[arg(long, default_value_t = 25_000)]
        operations: usize,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Distinguishes runs against the same store.
        #[arg(long, default_value = "bench")]
        tag: String,
    },
}

fn provider_key(i: usize) -> SigningKey {
    let seed: [u8; 32] = Sha256::digest(format!("multihub-bench-provider-{i}")).into();
    SigningKey::from_bytes(&seed)
}

fn provider_id(i: usize) -> String {
    format!("bench-{i}")
}

fn config(
    listen: &str,
    admin: &str,
    store: &str,
    n: usize,
    threads: usize,
    signature_check: &str,
) -> String {
    let mut providers = serde_json::Map::new();
    for i in 0..n {
        let mut pk = String::new();
        hex_into(&mut pk, provider_key(i).verifying_key().as_bytes());
        providers.insert(
            provider_id(i),
            serde_json::json!({"keys": [{"public_key": pk}]}),
        );
    }
    let all: Vec<String> = (0..n).map(provider_id).collect();
    let v = serde_json::json!({
        "version": "bench",
        "listen": listen,
        "admin_listen": admin,
        "store": {"path": store},
        "threads": threads,
        "signature_check": signature_check,
        "providers": providers,
        "policy": {"default": {"all_of": all}},
        "limits": {"queue": 65536, "max_batch": 8192}
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// One pre-built request (head and body in one buffer).
fn request_bytes(body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST /signals HTTP/1.1\r\nHost: association\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Reads one response; returns its status. Minimal: Content-Length bodies only.
async fn read_status(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).unwrap_or("");
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            let total = end + 4 + len;
            while buf.len() < total {
                let mut tmp = [0u8; 4096];
                let n = s.read(&mut tmp).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            buf.drain(..total);
            return Ok(status);
        }
        let mut tmp = [0u8; 4096];
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

async fn run(addr: String, providers: usize, operations: usize, connections: usize, tag: String) {
    let keys: Vec<SigningKey> = (0..providers).map(provider_key).collect();
    let t = Instant::now();
    let mut reqs = Vec::with_capacity(operations * providers * 2);
    for op in 0..operations {
        let rid = format!("{tag}-{op}");
        let repr = repr_of(rid.as_bytes());
        for stage in [Stage::Start, Stage::Complete] {
            for (i, k) in keys.iter().enumerate() {
                let s = Signal::signed(&rid, repr.as_str(), &provider_id(i), stage, "b", k);
                reqs.push(request_bytes(&s.to_bytes()));
            }
        }
    }
    eprintln!(
        "signed {} signals in {:.2}s; sending over {connections} connections",
        reqs.len(),
        t.elapsed().as_secs_f64()
    );
    let reqs = Arc::new(reqs);
    let next = Arc::new(AtomicUsize::new(0));
    let created = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (reqs, next, created, other, addr) = (
            reqs.clone(),
            next.clone(),
            created.clone(),
            other.clone(),
            addr.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let Ok(mut s) = TcpStream::connect(&addr).await else {
                return;
            };
            let _ = s.set_nodelay(true);
            let mut buf = Vec::with_capacity(8192);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(r) = reqs.get(i) else { return };
                if s.write_all(r).await.is_err() {
                    return;
                }
                match read_status(&mut s, &mut buf).await {
                    Ok(201) => created.fetch_add(1, Ordering::Relaxed),
                    Ok(_) => other.fetch_add(1, Ordering::Relaxed),
                    Err(_) => return,
                };
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    let c = created.load(Ordering::Relaxed);
    println!(
        "{c} signals answered 201 (verified, durable) in {secs:.2}s = {:.0} signals/s; {} other answers; {} not sent",
        c as f64 / secs,
        other.load(Ordering::Relaxed),
        reqs.len().saturating_sub((c + other.load(Ordering::Relaxed)) as usize)
    );
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Config {
            listen,
            admin,
            store,
            providers,
            threads,
            signature_check,
        } => {
            let c = config(
                &listen,
                &admin,
                &store,
                providers,
                threads,
                &signature_check,
            );
            println!("{c}");
            ExitCode::SUCCESS
        }
        Cmd::Run {
            addr,
            providers,
            operations,
            connections,
            tag,
        } => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            rt.block_on(run(addr, providers, operations, connections, tag));
            ExitCode::SUCCESS
        }
    }
}
