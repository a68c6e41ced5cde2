//! `multihub-slow-upstream [--listen ADDR] [--delay-ms N]`: an HTTP/1.1 keep-alive upstream that
//! answers every request with 204 after a fixed delay (default 20 ms). Prints `listening ADDR`.

use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen = arg(&args, "--listen").unwrap_or_else(|| "127.0.0.1:0".into());
    let delay = Duration::from_millis(
        arg(&args, "--delay-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    );
    let l = TcpListener::bind(&listen).await?;
    println!("listening {}", l.local_addr()?);
    loop {
        let (sock, _) = l.accept().await?;
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut r = BufReader::new(r);
            loop {
                let mut len = 0usize;
                let mut line = String::new();
                // Request line and headers.
                loop {
                    line.clear();
                    match r.read_line(&mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if line == "\r\n" || line == "\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                }
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).await.is_err() {
                    return;
                }
                tokio::time::sleep(delay).await;
                if w.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}
