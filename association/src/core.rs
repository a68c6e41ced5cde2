//! The service without HTTP: signal intake (parse, registry lookup, `verify_strict`), the group
//! commit writer, the read pool and the read API's JSON documents.
//!
//! Intake order: parse (canonical bytes, `deny_unknown_fields`) → provider and key lookup → the
//! operation formula and the signature → the writer. Only the writer touches the store for
//! writing; it drains up to `max_batch` queued signals, applies them in one transaction, and
//! only after the commit returns answers each waiting request.

use bytes::Bytes;
use multihub_protocol::signal::{verify_batch, Signal, SignalError, Stage};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::TrySendError;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::config::{valid_route, Config, SignatureCheck};
use crate::error::ApiError;
use crate::metrics::{Metrics, SignalResult};
use crate::policy::{digest, OpSignals};
use crate::store::{
    Applied, Checkpointer, Confirmation, Incoming, SignalStore, SqliteStore, StoreError,
};

/// One signal waiting for the writer.
struct Job {
    incoming: Incoming,
    reply: oneshot::Sender<Result<Applied, ()>>,
}

/// One signature waiting for the batch verifier.
struct Check {
    provider: usize,
    key: usize,
    sig: [u8; 64],
    message: Vec<u8>,
    reply: oneshot::Sender<bool>,
}

/// Most signatures checked in one batch.
const MAX_VERIFY_BATCH: usize = 256;

/// The batch verifier thread: takes every signature waiting, checks them together with
/// `verify_batch`, and when that fails (or for a single one) checks each with `verify_strict`'s
/// contract to answer exactly which are bad.
fn run_verifier(config: &Config, rx: std::sync::mpsc::Receiver<Check>) {
    let mut rng = rand::thread_rng();
    let mut batch: Vec<Check> = Vec::with_capacity(MAX_VERIFY_BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_VERIFY_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let key_of = |c: &Check| {
            config
                .providers
                .get(c.provider)
                .and_then(|p| p.keys.get(c.key))
        };
        let items: Option<Vec<_>> = batch
            .iter()
            .map(|c| key_of(c).map(|k| (k, &c.sig, &c.message[..])))
            .collect();
        let all_ok = match &items {
            Some(items) if items.len() > 1 => verify_batch(items, &mut rng),
            _ => false,
        };
        for c in batch.drain(..) {
            let ok = all_ok || key_of(&c).is_some_and(|k| k.verifies(&c.sig, &c.message));
            let _ = c.reply.send(ok);
        }
    }
}

/// What `POST /signals` answers when the signal was accepted or refused by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub status: u16,
    pub body: Vec<u8>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Read-only connections for the read API, used on the blocking pool.
struct ReadPool {
    path: std::path::PathBuf,
    conns: Mutex<Vec<SqliteStore>>,
    permits: Semaphore,
}

impl ReadPool {
    async fn with<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut SqliteStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| ApiError::Unavailable("read pool closed".into()))?;
        let pool = self.clone();
        let r = tokio::task::spawn_blocking(move || {
            let conn = pool.conns.lock().ok().and_then(|mut v| v.pop());
            let mut conn = match conn {
                Some(c) => c,
                None => SqliteStore::open_read_only(&pool.path)?,
            };
            let r = f(&mut conn);
            if let Ok(mut v) = pool.conns.lock() {
                v.push(conn);
            }
            r
        })
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        r.map_err(|e| ApiError::Unavailable(e.to_string()))
    }
}

/// The running service state shared by the listeners.
pub struct Core {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    writer: mpsc::Sender<Job>,
    /// The batch verifier's queue (`"signature_check": "batch"`).
    verifier: Option<std::sync::mpsc::SyncSender<Check>>,
    readers: Arc<ReadPool>,
    /// Latest confirmation seq, advanced by the writer after each commit.
    pub events: watch::Receiver<i64>,
    writer_alive: Arc<AtomicBool>,
    pub sse_clients: Arc<Semaphore>,
    /// Whether the API listener is up (proved by `/readyz`'s probe arriving at it).
    pub api_listener: Arc<multihub_protocol::net::ListenerProbe>,
    /// SQLite WAL checkpoints off the writer's path (stopped when the core is dropped).
    checkpointer: Option<Checkpointer>,
}

impl Core {
    /// Opens the store, starts the writer thread and returns the core.
    pub fn start(config: Arc<Config>, metrics: Arc<Metrics>) -> Result<Core, StoreError> {
        let store = SqliteStore::open(&config.store_path)?;
        let (mut store, checkpointer) = match Checkpointer::spawn(&config.store_path) {
            Ok(c) => (store.without_auto_checkpoint()?, Some(c)),
            Err(e) => {
                log::warn!("background WAL checkpointer not started ({e}); commits checkpoint");
                (store, None)
            }
        };
        let last = store.last_confirmation_seq()?;
        let mut core = Self::start_with(config, metrics, Box::new(store), last);
        core.checkpointer = checkpointer;
        Ok(core)
    }

    /// Starts the writer over any [`SignalStore`]; `last_confirmation` seeds the event watch.
    pub fn start_with(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        store: Box<dyn SignalStore>,
        last_confirmation: i64,
    ) -> Core {
        let (tx, rx) = mpsc::channel(config.limits.queue);
        let (ev_tx, ev_rx) = watch::channel(last_confirmation);
        let alive = Arc::new(AtomicBool::new(true));
        let w = Writer {
            store,
            rx,
            config: config.clone(),
            metrics: metrics.clone(),
            events: ev_tx,
            alive: alive.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("association-writer".into())
            .spawn(move || w.run());
        if spawned.is_err() {
            alive.store(false, Ordering::SeqCst);
        }
        let verifier = match config.signature_check {
            SignatureCheck::Strict => None,
            SignatureCheck::Batch => {
                let (tx, rx) = std::sync::mpsc::sync_channel(config.limits.queue);
                let c = config.clone();
                match std::thread::Builder::new()
                    .name("association-verify".into())
                    .spawn(move || run_verifier(&c, rx))
                {
                    Ok(_) => Some(tx),
                    Err(e) => {
                        log::warn!(
                            "batch verifier thread not started ({e}); checking each signature"
                        );
                        None
                    }
                }
            }
        };
        let readers = Arc::new(ReadPool {
            path: config.store_path.clone(),
            conns: Mutex::new(Vec::new()),
            permits: Semaphore::new(8),
        });
        Core {
            sse_clients: Arc::new(Semaphore::new(config.limits.max_sse_clients)),
            config,
            metrics,
            writer: tx,
            verifier,
            readers,
            events: ev_rx,
            writer_alive: alive,
            api_listener: Default::default(),
            checkpointer: None,
        }
    }

    /// True while the writer runs (readiness).
    pub fn ready(&self) -> bool {
        self.writer_alive.load(Ordering::SeqCst) && !self.writer.is_closed()
    }

    /// `POST /signals`: checks the body and waits until the store has durably answered.
    /// Every refusal is an `Err` and nothing is recorded for it.
    pub async fn submit(&self, body: Bytes, route: Option<&str>) -> Result<Accepted, ApiError> {
        let mut provider_idx = None;
        let mut stage_idx = None;
        let r = self
            .submit_inner(body, route, &mut provider_idx, &mut stage_idx)
            .await;
        let result = match &r {
            Ok(a) if a.status == 201 => SignalResult::Created,
            Ok(_) => SignalResult::Duplicate,
            Err(e) => e.signal_result(),
        };
        self.metrics.signal(provider_idx, stage_idx, result);
        r
    }

    async fn submit_inner(
        &self,
        body: Bytes,
        route: Option<&str>,
        provider_idx: &mut Option<usize>,
        stage_idx: &mut Option<usize>,
    ) -> Result<Accepted, ApiError> {
        if body.len() > self.config.limits.max_body_bytes {
            return Err(ApiError::TooLarge(self.config.limits.max_body_bytes));
        }
        if let Some(r) = route {
            if !valid_route(r) {
                return Err(ApiError::BadRequest(
                    "x-hub-route must be 1-64 of [A-Za-z0-9._:-]".into(),
                ));
            }
        }
        let mut scratch = Vec::with_capacity(body.len());
        let signal = Signal::parse_with(&body, &mut scratch).map_err(ApiError::from_signal)?;
        *stage_idx = Some(match signal.stage {
            Stage::Start => 0,
            Stage::Complete => 1,
        });
        let idx = self
            .config
            .provider_index(&signal.provider)
            .ok_or_else(|| ApiError::UnknownProvider(signal.provider.clone()))?;
        *provider_idx = Some(idx);
        let provider = &self.config.providers[idx];
        let key_idx = provider
            .keys
            .iter()
            .position(|k| k.key_id() == signal.key_id)
            .ok_or_else(|| ApiError::UnknownKey(signal.key_id.clone()))?;
        let key = &provider.keys[key_idx];
        match &self.verifier {
            None => key
                .verify_with(&signal, &mut scratch)
                .map_err(ApiError::from_signal)?,
            Some(verifier) => {
                let sig = key
                    .prepare(&signal, &mut scratch)
                    .map_err(ApiError::from_signal)?;
                let (reply, answer) = oneshot::channel();
                let check = Check {
                    provider: idx,
                    key: key_idx,
                    sig,
                    message: std::mem::take(&mut scratch),
                    reply,
                };
                let ok = match verifier.try_send(check) {
                    Ok(()) => answer
                        .await
                        .map_err(|_| ApiError::Unavailable("signature verifier stopped".into()))?,
                    // Queue full or verifier gone: check it here.
                    Err(TrySendError::Full(c) | TrySendError::Disconnected(c)) => {
                        key.verifies(&c.sig, &c.message)
                    }
                };
                if !ok {
                    return Err(ApiError::from_signal(SignalError::BadSignature));
                }
            }
        }
        let incoming = Incoming {
            digest: digest(&body),
            operation: signal.operation,
            provider: signal.provider,
            stage: signal.stage,
            route: route.map(str::to_string),
            bytes: body,
        };
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Job {
                incoming,
                reply: tx,
            })
            .await
            .map_err(|_| ApiError::Unavailable("store writer stopped".into()))?;
        let applied = rx
            .await
            .map_err(|_| ApiError::Unavailable("store writer stopped".into()))?
            .map_err(|_| ApiError::Unavailable("store commit failed".into()))?;
        match applied {
            Applied::Created { seq, confirmation } => Ok(Accepted {
                status: 201,
                body: created_body(seq, confirmation.map(|c| c.seq)),
            }),
            Applied::Duplicate { seq } => Ok(Accepted {
                status: 200,
                body: duplicate_body(seq),
            }),
            Applied::Conflict { seq } => Err(ApiError::Conflict(format!(
                "a different signal is recorded for this (operation, provider, stage) as seq {seq}"
            ))),
            Applied::RouteConflict { route } => Err(ApiError::Conflict(format!(
                "the operation is recorded under route \"{route}\""
            ))),
        }
    }

    /// `GET /operations/{operation}`: signals verbatim, linkage, confirmation or what is missing.
    pub async fn operation(&self, operation: &str) -> Result<Vec<u8>, ApiError> {
        if operation.len() != 64
            || !operation
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ApiError::BadRequest(
                "operation must be 64 lower-case hex characters".into(),
            ));
        }
        let op = operation.to_string();
        let (signals, confirmation) = self
            .readers
            .with(move |s| Ok((s.signals_of(&op)?, s.confirmation_of(&op)?)))
            .await?;
        if signals.is_empty() {
            return Err(ApiError::NotFound(format!(
                "no signal for operation {operation}"
            )));
        }
        let mut set = OpSignals::default();
        let mut route = None;
        for s in &signals {
            let d: [u8; 32] = s.digest.as_slice().try_into().unwrap_or([0; 32]);
            set.entries.push((s.provider.clone(), s.stage, d));
            if route.is_none() {
                route.clone_from(&s.route);
            }
        }
        let (policy, name) = self.config.policies.for_route(route.as_deref());
        // Hand-built so that each signal appears verbatim: its stored bytes are canonical JSON.
        let mut out = Vec::with_capacity(512 * signals.len() + 512);
        out.extend_from_slice(b"{\"operation\":");
        push_json(&mut out, &serde_json::Value::String(operation.to_string()));
        out.extend_from_slice(b",\"route\":");
        push_json(&mut out, &serde_json::json!(route));
        out.extend_from_slice(b",\"linkage\":");
        push_json(&mut out, &serde_json::Value::String(set.linkage()));
        out.extend_from_slice(b",\"policy\":");
        push_json(
            &mut out,
            &serde_json::json!({"name": name.to_string(), "rule": policy.to_json()}),
        );
        out.extend_from_slice(b",\"confirmation\":");
        push_json(&mut out, &serde_json::json!(confirmation));
        out.extend_from_slice(b",\"missing\":");
        if confirmation.is_some() {
            out.extend_from_slice(b"null");
        } else {
            push_json(&mut out, &policy.missing(&set));
        }
        out.extend_from_slice(b",\"signals\":[");
        for (i, s) in signals.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"seq\":");
            out.extend_from_slice(s.seq.to_string().as_bytes());
            out.extend_from_slice(b",\"received_at_ms\":");
            out.extend_from_slice(s.received_at_ms.to_string().as_bytes());
            out.extend_from_slice(b",\"signal\":");
            out.extend_from_slice(&s.bytes);
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        Ok(out)
    }

    /// `GET /confirmations?after=&limit=`.
    pub async fn confirmations(&self, after: i64, limit: usize) -> Result<Vec<u8>, ApiError> {
        let limit = limit.clamp(1, self.config.limits.page_limit);
        let v = self.confirmations_after(after, limit).await?;
        let next = v.last().map_or(after, |c| c.seq);
        Ok(serde_json::to_vec(&serde_json::json!({
            "confirmations": v, "next_after": next,
        }))
        .unwrap_or_default())
    }

    /// Confirmations with `seq > after` from the store.
    pub async fn confirmations_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Confirmation>, ApiError> {
        self.readers
            .with(move |s| s.confirmations_after(after, limit))
            .await
    }
}

fn push_json(out: &mut Vec<u8>, v: &serde_json::Value) {
    let _ = serde_json::to_writer(&mut *out, v);
}

/// The single writer: group commit on its own thread.
struct Writer {
    store: Box<dyn SignalStore>,
    rx: mpsc::Receiver<Job>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    events: watch::Sender<i64>,
    alive: Arc<AtomicBool>,
}

/// The 201 answer to a signal, `{"confirmation":<seq>|null,"result":"created","seq":<seq>}`.
/// Written by hand, keys in the order serde_json's map sorts them: this is the answer to every
/// signal, and a `json!` map costs a handful of allocations.
fn created_body(seq: i64, confirmation: Option<i64>) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    let _ = match confirmation {
        Some(c) => write!(
            body,
            r#"{{"confirmation":{c},"result":"created","seq":{seq}}}"#
        ),
        None => write!(
            body,
            r#"{{"confirmation":null,"result":"created","seq":{seq}}}"#
        ),
    };
    body
}

/// The 200 answer to an identical resend, `{"result":"duplicate","seq":<seq>}`.
fn duplicate_body(seq: i64) -> Vec<u8> {
    let mut body = Vec::with_capacity(48);
    let _ = write!(body, r#"{{"result":"duplicate","seq":{seq}}}"#);
    body
}

impl Writer {
    fn run(mut self) {
        let max = self.config.limits.max_batch;
        // Each job split as it arrives: the signals go to the store, the reply channels wait.
        let mut replies: Vec<oneshot::Sender<Result<Applied, ()>>> = Vec::with_capacity(max);
        let mut batch: Vec<Incoming> = Vec::with_capacity(max);
        while let Some(first) = self.rx.blocking_recv() {
            let mut next = Some(first);
            while let Some(j) = next.take() {
                batch.push(j.incoming);
                replies.push(j.reply);
                if batch.len() < max {
                    next = self.rx.try_recv().ok();
                }
            }
            let t = Instant::now();
            let r = self
                .store
                .apply_batch(&batch, &self.config.policies, now_ms());
            self.metrics
                .commit_seconds
                .observe(t.elapsed().as_secs_f64());
            self.metrics.batch_size.observe(batch.len() as f64);
            match r {
                Ok(results) => {
                    let mut last = None;
                    for r in &results {
                        if let Applied::Created {
                            confirmation: Some(c),
                            ..
                        } = r
                        {
                            self.metrics.confirmations.inc();
                            last = Some(c.seq);
                        }
                    }
                    if let Some(seq) = last {
                        self.events.send_replace(seq);
                    }
                    for (reply, r) in replies.drain(..).zip(results) {
                        let _ = reply.send(Ok(r));
                    }
                }
                Err(e) => {
                    log::error!("group commit of {} signals failed: {e}", batch.len());
                    self.metrics.store_errors.inc();
                    for reply in replies.drain(..) {
                        let _ = reply.send(Err(()));
                    }
                }
            }
            batch.clear();
        }
        self.alive.store(false, Ordering::SeqCst);
    }
}

impl ApiError {
    fn from_signal(e: SignalError) -> ApiError {
        match e {
            SignalError::Malformed(d) => ApiError::Malformed(d),
            SignalError::NonCanonical => ApiError::NonCanonical,
            SignalError::Version(v) => ApiError::Malformed(format!("unsupported version {v}")),
            SignalError::Operation => ApiError::BadOperation,
            SignalError::KeyId => ApiError::UnknownKey("key id mismatch".into()),
            SignalError::SignatureEncoding | SignalError::BadSignature => ApiError::BadSignature,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use multihub_protocol::hashing::{hex_into, repr_of};
    use multihub_protocol::signal::Signal;

    #[test]
    fn hand_written_answers_equal_their_json_maps() {
        let j = |v: serde_json::Value| serde_json::to_vec(&v).unwrap_or_default();
        assert_eq!(
            created_body(7, Some(3)),
            j(serde_json::json!({"result": "created", "seq": 7, "confirmation": 3}))
        );
        assert_eq!(
            created_body(i64::MAX, None),
            j(serde_json::json!({"result": "created", "seq": i64::MAX, "confirmation": null}))
        );
        assert_eq!(
            duplicate_body(-1),
            j(serde_json::json!({"result": "duplicate", "seq": -1}))
        );
    }

    fn core(dir: &std::path::Path) -> Core {
        let mut pk = String::new();
        hex_into(
            &mut pk,
            SigningKey::from_bytes(&[1; 32]).verifying_key().as_bytes(),
        );
        let text = format!(
            r#"{{"version":"t","listen":"127.0.0.1:1","admin_listen":"127.0.0.1:2",
            "store":{{"path":"s.db"}},"providers":{{"p":{{"keys":[{{"public_key":"{pk}"}}]}}}},
            "policy":{{"default":{{"all_of":["p"]}}}}}}"#
        );
        let config = Arc::new(crate::config::parse(&text, dir).unwrap_or_else(|e| panic!("{e}")));
        let metrics = Arc::new(Metrics::new(&config).unwrap_or_else(|e| panic!("{e}")));
        Core::start(config, metrics).unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn intake_in_process() {
        let dir = std::env::temp_dir().join(format!(
            "assoc-core-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let _ = std::fs::create_dir_all(&dir);
        let c = core(&dir);
        assert!(c.ready());
        let k = SigningKey::from_bytes(&[1; 32]);
        let repr = repr_of(b"x");
        let start = Signal::signed("r", repr.as_str(), "p", Stage::Start, "b", &k).to_bytes();
        let done = Signal::signed("r", repr.as_str(), "p", Stage::Complete, "b", &k).to_bytes();
        let other = Signal::signed("r", repr.as_str(), "p", Stage::Start, "c", &k).to_bytes();
        let a = c.submit(Bytes::from(start.clone()), None).await;
        assert_eq!(a.as_ref().map(|a| a.status), Ok(201));
        let a = c.submit(Bytes::from(start), None).await;
        assert_eq!(a.as_ref().map(|a| a.status), Ok(200));
        let e = c.submit(Bytes::from(other), None).await;
        assert!(matches!(e, Err(ApiError::Conflict(_))), "{e:?}");
        let a = c.submit(Bytes::from(done), None).await;
        let body: serde_json::Value = a
            .map(|a| serde_json::from_slice(&a.body).unwrap_or_default())
            .unwrap_or_default();
        assert_eq!(body["confirmation"], 1, "{body}");
        assert_eq!(*c.events.borrow(), 1);
        let forged = Signal::signed("r", repr.as_str(), "q", Stage::Start, "b", &k).to_bytes();
        let e = c.submit(Bytes::from(forged), None).await;
        assert!(matches!(e, Err(ApiError::UnknownProvider(_))), "{e:?}");
        let page = c.confirmations_after(0, 10).await.unwrap_or_default();
        assert_eq!(page.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
