//! A recording upstream: an in-process HTTP/1.1 server on 127.0.0.1:0 that stores every request
//! it receives and answers according to a switchable behaviour.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::read_message;

/// How the recorder answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Behaviour {
    /// Answer this status with an empty body.
    Status(u16),
    /// Answer this status with this body.
    Body(u16, Vec<u8>),
    /// Record the request, then wait until the gate opens, then answer 200.
    Gated,
    /// Record the request and close the connection without answering.
    Close,
    /// Answer 200 chunked: send `first`, wait until the gate opens, then send `rest`.
    StreamGated { first: Vec<u8>, rest: Vec<u8> },
    /// Write these bytes as the whole answer (head and body), then close the connection.
    Raw(Vec<u8>),
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    v
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub conn: u64,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .count()
    }
}

struct Shared {
    log: Mutex<Vec<Recorded>>,
    behaviour: Mutex<Behaviour>,
    conns: AtomicU64,
    answered: AtomicU64,
    gate: watch::Sender<bool>,
}

/// A running recorder; stops when dropped (its task is aborted).
pub struct Recorder {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    pub async fn start(behaviour: Behaviour) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (gate, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            log: Mutex::new(Vec::new()),
            behaviour: Mutex::new(behaviour),
            conns: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            gate,
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let conn = s.conns.fetch_add(1, Ordering::SeqCst) + 1;
                let s = s.clone();
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut r = BufReader::new(r);
                    while let Ok(Some(m)) = read_message(&mut r, true).await {
                        let mut parts = m.start.split(' ');
                        let method = parts.next().unwrap_or("").to_string();
                        let head_only = method == "HEAD";
                        let path = parts.next().unwrap_or("").to_string();
                        s.log
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Recorded {
                                method,
                                path,
                                headers: m.headers,
                                body: m.body,
                                conn,
                            });
                        let b = s
                            .behaviour
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .clone();
                        let (status, body) = match b {
                            Behaviour::Status(st) => (st, Vec::new()),
                            Behaviour::Body(st, body) => (st, body),
                            Behaviour::Close => return,
                            Behaviour::Raw(bytes) => {
                                let _ = w.write_all(&bytes).await;
                                s.answered.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Behaviour::StreamGated { first, rest } => {
                                let mut head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Up: stream\r\n\r\n".to_vec();
                                head.extend_from_slice(&chunk(&first));
                                if w.write_all(&head).await.is_err() || w.flush().await.is_err() {
                                    return;
                                }
                                let mut rx = s.gate.subscribe();
                                if rx.wait_for(|open| *open).await.is_err() {
                                    return;
                                }
                                let mut tail = chunk(&rest);
                                tail.extend_from_slice(b"0\r\n\r\n");
                                if w.write_all(&tail).await.is_err() {
                                    return;
                                }
                                s.answered.fetch_add(1, Ordering::SeqCst);
                                continue;
                            }
                            Behaviour::Gated => {
                                let mut rx = s.gate.subscribe();
                                if rx.wait_for(|open| *open).await.is_err() {
                                    return;
                                }
                                (200, Vec::new())
                            }
                        };
                        let head = format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        );
                        // A HEAD answer describes the body without sending it.
                        if w.write_all(head.as_bytes()).await.is_err()
                            || (!head_only && w.write_all(&body).await.is_err())
                        {
                            return;
                        }
                        s.answered.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        Recorder { addr, shared, task }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, b: Behaviour) {
        *self
            .shared
            .behaviour
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = b;
    }

    /// Opens the gate for `Behaviour::Gated` requests (held ones are answered).
    pub fn open_gate(&self) {
        self.shared.gate.send_replace(true);
    }

    /// Closes the gate again: requests from now on are held until the next `open_gate`.
    /// (`send_replace`: `send` would not change the value while nothing waits on the gate.)
    pub fn close_gate(&self) {
        self.shared.gate.send_replace(false);
    }

    /// Everything received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn count(&self) -> usize {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.conns.load(Ordering::SeqCst)
    }

    /// Responses written so far.
    pub fn answered(&self) -> u64 {
        self.shared.answered.load(Ordering::SeqCst)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
