//! `multihub-association` as a child process, and a Server-Sent Events reader.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::http::read_chunk;
use crate::procs::{bin_path, free_port, wait_ready, TempDir};

/// A running association; killed on drop. The store lives in `dir` and survives restarts.
pub struct AssociationProc {
    child: Option<Child>,
    pub addr: String,
    pub admin: String,
    pub config_path: PathBuf,
    pub store_path: PathBuf,
    log: PathBuf,
    restarts: u32,
}

impl AssociationProc {
    /// Writes `config` (with `listen`, `admin_listen` and `store.path` filled in on fresh ports
    /// and a store in `dir`), starts the service and waits until `/readyz` answers 200
    /// (deadline 60 s).
    pub async fn start(dir: &TempDir, mut config: serde_json::Value) -> AssociationProc {
        let store_path = dir.path().join("association.db");
        config["store"] = serde_json::json!({ "path": store_path });
        let config_path = dir.path().join("association.json");
        let mut p = AssociationProc {
            child: None,
            addr: String::new(),
            admin: String::new(),
            config_path,
            store_path,
            log: dir.path().join("association-0.log"),
            restarts: 0,
        };
        p.launch(dir.path(), config).await;
        p
    }

    async fn launch(&mut self, dir: &Path, mut config: serde_json::Value) {
        self.addr = format!("127.0.0.1:{}", free_port());
        self.admin = format!("127.0.0.1:{}", free_port());
        config["listen"] = serde_json::json!(self.addr);
        config["admin_listen"] = serde_json::json!(self.admin);
        std::fs::write(&self.config_path, config.to_string())
            .unwrap_or_else(|e| panic!("write config: {e}"));
        self.log = dir.join(format!("association-{}.log", self.restarts));
        let out = std::fs::File::create(&self.log).unwrap_or_else(|e| panic!("{e}"));
        let err = out.try_clone().unwrap_or_else(|e| panic!("{e}"));
        self.kill9();
        let child = Command::new(bin_path("multihub-association"))
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn multihub-association: {e}"));
        let child = self.child.insert(child);
        wait_ready(
            "multihub-association",
            child,
            &self.admin,
            &self.addr,
            &self.log,
        )
        .await;
    }

    /// SIGKILL (no graceful shutdown, no chance to flush anything).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same store with the same configuration (fresh ports).
    pub async fn restart(&mut self, dir: &TempDir) {
        self.kill9();
        self.restarts += 1;
        let text = std::fs::read_to_string(&self.config_path).unwrap_or_default();
        let config: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        self.launch(dir.path(), config).await;
    }

    /// Everything the service wrote so far (this incarnation).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `multihub-association verify` on this store; (exit code, stdout).
    pub fn verify(&self) -> (i32, String) {
        let out = Command::new(bin_path("multihub-association"))
            .arg("verify")
            .arg("--store")
            .arg(&self.store_path)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .unwrap_or_else(|e| panic!("run verify: {e}"));
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

impl Drop for AssociationProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// A `GET /events` stream (chunked transfer encoding).
pub struct EventStream {
    r: BufReader<TcpStream>,
    pending: String,
}

impl EventStream {
    /// Connects and reads the response head; panics unless it is 200 `text/event-stream`.
    pub async fn open(addr: &str, last_event_id: Option<&str>) -> EventStream {
        let mut s = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let mut req =
            "GET /events HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n".to_string();
        if let Some(id) = last_event_id {
            req.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("write: {e}"));
        let mut r = BufReader::new(s);
        let mut status = String::new();
        r.read_line(&mut status).await.unwrap_or_default();
        assert!(status.contains(" 200 "), "events status: {status}");
        let mut chunked = false;
        let mut ctype = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap_or_default();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("transfer-encoding") && v.trim() == "chunked" {
                    chunked = true;
                }
                if k.eq_ignore_ascii_case("content-type") {
                    ctype = v.trim().to_string();
                }
            }
        }
        assert!(chunked, "event stream must be chunked");
        assert_eq!(ctype, "text/event-stream");
        EventStream {
            r,
            pending: String::new(),
        }
    }

    /// The next event (comments skipped), or `None` at the end of the stream or after `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Event> {
        let end = Instant::now() + wait;
        loop {
            if let Some(pos) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..pos + 2).collect();
                let mut ev = Event {
                    id: None,
                    event: None,
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        ev.id = Some(v.to_string());
                        any = true;
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        ev.event = Some(v.to_string());
                        any = true;
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        ev.data.push_str(v);
                        any = true;
                    }
                }
                if any {
                    return Some(ev);
                }
                continue;
            }
            let left = end.checked_duration_since(Instant::now())?;
            let chunk = tokio::time::timeout(left, self.read_chunk()).await.ok()??;
            self.pending.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    async fn read_chunk(&mut self) -> Option<Vec<u8>> {
        read_chunk(&mut self.r).await.ok()?
    }
}
