//! The outcome sink of the demo topology: accepts every POST, answers 200, and appends one JSON
//! line per outcome (request id, provider, hub path, body) to a file the demo reads.

use serde_json::json;
use std::path::PathBuf;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

/// Runs the sink until the task is dropped.
pub async fn run(listener: TcpListener, out: PathBuf) {
    let file = std::sync::Arc::new(Mutex::new(out));
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let file = file.clone();
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut r = BufReader::new(r);
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let mut headers = Vec::new();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                    }
                }
                let get = |n: &str| {
                    headers
                        .iter()
                        .find(|(k, _)| k == n)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                let len: usize = get("content-length").parse().unwrap_or(0);
                let mut body = vec![0; len.min(16 * 1024 * 1024)];
                if r.read_exact(&mut body).await.is_err() {
                    return;
                }
                let rec = json!({
                    "request_id": get("x-request-id"),
                    "provider": get("x-provider-id"),
                    "hub_path": get("x-hub-path"),
                    "body": String::from_utf8_lossy(&body),
                });
                {
                    // One writer at a time keeps lines whole.
                    let path = file.lock().await;
                    let _ = append(&path, rec.to_string()).await;
                }
                if w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

async fn append(path: &PathBuf, mut line: String) -> std::io::Result<()> {
    use std::io::Write;
    line.push('\n');
    // Small appends to a local file: done inline.
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(line.as_bytes())
}
