//! Durable state: a small [`Store`] trait, its SQLite implementation (WAL, `synchronous=FULL`),
//! and the single writer thread that group-commits concurrent requests.
//!
//! Every state change is an [`Op`] sent to the writer over a bounded channel. The writer takes
//! whatever is queued (up to `max_batch`), applies each op inside its own savepoint of one
//! transaction, commits once, and only then answers each op — so an answer means "durable".
//! New outbox rows are handed to the outbox worker after the commit.

use multihub_protocol::receipt::{response_bytes, AuditEntry, Effect, GENESIS};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

use crate::error::ProviderError;
use crate::metrics::Metrics;

/// An outbox row to insert; `dedup` makes re-inserting the same message a no-op.
#[derive(Debug, Clone)]
pub struct NewOut {
    pub dedup: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// `signal` or `outcome` (metric label).
    pub kind: &'static str,
}

/// A stored outbox row.
#[derive(Debug, Clone)]
pub struct OutRow {
    pub id: i64,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub kind: &'static str,
}

/// An escalated request, held for an operator decision.
#[derive(Debug, Clone)]
pub struct Held {
    pub request_id: String,
    pub caller: String,
    pub key: String,
    pub delegation: Option<String>,
    pub request: Vec<u8>,
    pub repr: String,
    pub outcome_url: Option<String>,
    pub hub_path: String,
}

/// Step 1: record the request and its START signal (before any effect).
#[derive(Debug, Clone)]
pub struct StartOp {
    pub caller: String,
    pub key: String,
    pub fingerprint: String,
    pub request_id: String,
    pub start: NewOut,
}

/// Step 2: the effect, receipt, audit entry, idempotency record and outbox rows, atomically.
#[derive(Debug, Clone)]
pub struct CompleteOp {
    pub caller: String,
    pub key: String,
    pub request_id: String,
    /// True when this resumes a held escalation (the held row is closed too).
    pub from_held: bool,
    pub receipt: Vec<u8>,
    pub receipt_sha256: String,
    pub sig: String,
    pub key_id: String,
    pub effect: Option<Effect>,
    /// The exact request body (kept for `verify`).
    pub request: Vec<u8>,
    /// The COMPLETE signal; `None` when no effect was committed (blocked, denied).
    pub complete: Option<NewOut>,
    /// Outcome destination and headers; the body is the response.
    pub outcome: Option<(String, Vec<(String, String)>)>,
}

/// A state change or read, executed by the writer.
#[derive(Debug, Clone)]
pub enum Op {
    Start(StartOp),
    Complete(Box<CompleteOp>),
    /// Hold an escalated request; `response` is the 202 body answered while it is held.
    Hold {
        held: Box<Held>,
        response: Vec<u8>,
    },
    /// Read a held escalation (still held).
    GetHeld {
        request_id: String,
    },
    Revoke {
        id: String,
    },
    /// Outbox rows delivered (`false`) or refused with a conflict (`true`).
    OutboxAck(Vec<(i64, bool)>),
    /// Pending outbox rows with id > `after`, at most `limit`.
    PendingOutbox {
        after: i64,
        limit: usize,
    },
    /// Ledger balances and the receipt count.
    Ledger,
}

/// Where the request stands after [`Op::Start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartState {
    /// New (or resumed after a crash before its receipt): go on.
    Go,
    /// Already decided: the stored answer.
    Done { status: u16, response: Vec<u8> },
    /// Held for an operator: the stored 202 body.
    Held { response: Vec<u8> },
    /// Same key, different fingerprint.
    Mismatch,
}

/// The result of an op.
#[derive(Debug, Clone)]
pub enum Applied {
    Start(StartState, Vec<OutRow>),
    /// The committed answer (the receipt response) and its audit seq.
    Completed {
        response: Vec<u8>,
        seq: u64,
        outbox: Vec<OutRow>,
    },
    /// The request was not in a state that can complete (already done or not held).
    NotCompletable,
    Held,
    HeldRow(Option<Held>),
    /// `true` when newly revoked.
    Revoked(bool),
    Acked,
    Pending(Vec<OutRow>),
    Ledger {
        balances: Vec<(String, i64)>,
        receipts: u64,
    },
}

impl Applied {
    fn take_outbox(&mut self) -> Vec<OutRow> {
        match self {
            Applied::Start(_, o) | Applied::Completed { outbox: o, .. } => std::mem::take(o),
            _ => Vec::new(),
        }
    }
}

/// Storage behind the writer: a group transaction of ops.
pub trait Store: Send + 'static {
    fn begin(&mut self) -> Result<(), ProviderError>;
    /// Applies one op; on error its partial changes are undone, the transaction goes on.
    fn apply(&mut self, op: &Op) -> Result<Applied, ProviderError>;
    /// Commits durably.
    fn commit(&mut self) -> Result<(), ProviderError>;
    /// Undoes the whole transaction (after a failed commit) and reloads cached state.
    fn rollback(&mut self) -> Result<(), ProviderError>;
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS keys(key_id TEXT PRIMARY KEY, public_hex TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policies(sha256 TEXT PRIMARY KEY, id TEXT NOT NULL, version TEXT NOT NULL, bytes BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS requests(caller TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL,
  request_id TEXT NOT NULL, state TEXT NOT NULL, seq INTEGER, held_response BLOB,
  PRIMARY KEY(caller, key));
CREATE TABLE IF NOT EXISTS receipts(seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL, caller TEXT NOT NULL,
  key TEXT NOT NULL, body BLOB NOT NULL, sig TEXT NOT NULL, key_id TEXT NOT NULL, request BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS audit(seq INTEGER PRIMARY KEY, prev TEXT NOT NULL, receipt_sha256 TEXT NOT NULL,
  entry_sha256 TEXT NOT NULL, recorded_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ledger(account TEXT PRIMARY KEY, balance INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox(id INTEGER PRIMARY KEY AUTOINCREMENT, dedup TEXT NOT NULL UNIQUE,
  kind TEXT NOT NULL, url TEXT NOT NULL, headers TEXT NOT NULL, body BLOB NOT NULL,
  state TEXT NOT NULL DEFAULT 'pending');
CREATE TABLE IF NOT EXISTS escalations(request_id TEXT PRIMARY KEY, caller TEXT NOT NULL, key TEXT NOT NULL,
  delegation TEXT, request BLOB NOT NULL, repr TEXT NOT NULL, outcome_url TEXT, hub_path TEXT NOT NULL,
  state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revocations(id TEXT PRIMARY KEY);
"#;

/// Opens (creating) a database with the provider's pragmas and schema.
pub fn open(path: &Path) -> Result<Connection, ProviderError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let c = Connection::open(path)?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "FULL")?;
    // A larger page cache keeps the hot B-tree pages in memory; checkpoints less often.
    c.pragma_update(None, "cache_size", -65536)?;
    c.pragma_update(None, "temp_store", "MEMORY")?;
    c.pragma_update(None, "wal_autocheckpoint", 8192)?;
    c.execute_batch(SCHEMA)?;
    Ok(c)
}

/// The outbox dedup key of one emission: `stage 0x00 caller 0x00 idempotency key` (stage `S`
/// START, `C` COMPLETE, `O` outcome).
pub fn dedup(stage: &str, caller: &str, key: &str) -> String {
    let mut s = String::with_capacity(stage.len() + caller.len() + key.len() + 2);
    s.push_str(stage);
    s.push('\0');
    s.push_str(caller);
    s.push('\0');
    s.push_str(key);
    s
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn kind_of(s: &str) -> &'static str {
    if s == "outcome" {
        "outcome"
    } else {
        "signal"
    }
}

/// (fingerprint, state, seq, held response) of a `requests` row.
type RequestRow = (String, String, Option<i64>, Option<Vec<u8>>);

/// The SQLite store.
pub struct SqliteStore {
    conn: Connection,
    last_seq: u64,
    last_entry: String,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, ProviderError> {
        let conn = open(path)?;
        let mut s = SqliteStore {
            conn,
            last_seq: 0,
            last_entry: GENESIS.to_string(),
        };
        s.load_tip()?;
        Ok(s)
    }

    fn load_tip(&mut self) -> Result<(), ProviderError> {
        let tip: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT seq, entry_sha256 FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (seq, entry) = tip.unwrap_or((0, GENESIS.to_string()));
        self.last_seq = u64::try_from(seq).unwrap_or(0);
        self.last_entry = entry;
        Ok(())
    }

    /// Records the public key and the active policy bytes (for `verify`).
    pub fn register(
        &self,
        key_id: &str,
        public_hex: &str,
        policy: &crate::policy::Policy,
    ) -> Result<(), ProviderError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO keys(key_id, public_hex) VALUES (?1, ?2)",
            params![key_id, public_hex],
        )?;
        self.conn.execute(
            "INSERT OR IGNORE INTO policies(sha256, id, version, bytes) VALUES (?1, ?2, ?3, ?4)",
            params![
                policy.reference.sha256,
                policy.reference.id,
                policy.reference.version,
                policy.bytes
            ],
        )?;
        Ok(())
    }

    /// Revoked delegation ids.
    pub fn revoked(&self) -> Result<Vec<String>, ProviderError> {
        let mut st = self.conn.prepare("SELECT id FROM revocations")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn insert_out(&self, o: &NewOut) -> Result<Option<OutRow>, ProviderError> {
        let headers = serde_json::to_string(&o.headers).unwrap_or_else(|_| "[]".into());
        let n = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO outbox(dedup, kind, url, headers, body) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![o.dedup, o.kind, o.url, headers, o.body])?;
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(OutRow {
            id: self.conn.last_insert_rowid(),
            url: o.url.clone(),
            headers: o.headers.clone(),
            body: o.body.clone(),
            kind: o.kind,
        }))
    }

    fn start(&self, s: &StartOp) -> Result<Applied, ProviderError> {
        // Common case first: a new key is one INSERT.
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT INTO requests(caller, key, fingerprint, request_id, state) VALUES (?1, ?2, ?3, ?4, 'pending')
                 ON CONFLICT(caller, key) DO NOTHING",
            )?
            .execute(params![s.caller, s.key, s.fingerprint, s.request_id])?;
        let state = if inserted == 1 {
            StartState::Go
        } else {
            let row: Option<RequestRow> = self
                .conn
                .prepare_cached(
                    "SELECT fingerprint, state, seq, held_response FROM requests WHERE caller = ?1 AND key = ?2",
                )?
                .query_row(params![s.caller, s.key], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()?;
            match row {
                Some((fp, _, _, _)) if fp != s.fingerprint => {
                    return Ok(Applied::Start(StartState::Mismatch, Vec::new()))
                }
                Some((_, st, Some(seq), _)) if st == "done" => StartState::Done {
                    status: 200,
                    response: self.response_of(seq)?,
                },
                Some((_, st, _, resp)) if st == "held" => StartState::Held {
                    response: resp.unwrap_or_default(),
                },
                _ => StartState::Go,
            }
        };
        let mut out = Vec::new();
        if state == StartState::Go {
            out.extend(self.insert_out(&s.start)?);
        }
        Ok(Applied::Start(state, out))
    }

    /// The stored answer of receipt `seq`, rebuilt from the receipt and its audit entry.
    fn response_of(&self, seq: i64) -> Result<Vec<u8>, ProviderError> {
        let (body, sig, kid, entry): (Vec<u8>, String, String, String) = self
            .conn
            .prepare_cached(
                "SELECT r.body, r.sig, r.key_id, a.entry_sha256 FROM receipts r JOIN audit a ON a.seq = r.seq WHERE r.seq = ?1",
            )?
            .query_row(params![seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        Ok(response_bytes(
            &body,
            &sig,
            &kid,
            u64::try_from(seq).unwrap_or(0),
            &entry,
        ))
    }

    fn complete(&mut self, c: &CompleteOp) -> Result<Applied, ProviderError> {
        let seq = self.last_seq + 1;
        let seq_i = i64::try_from(seq).map_err(|_| ProviderError::StoreState("seq".into()))?;
        let want = if c.from_held { "held" } else { "pending" };
        let n = self
            .conn
            .prepare_cached(
                "UPDATE requests SET state = 'done', seq = ?3 WHERE caller = ?1 AND key = ?2 AND state = ?4",
            )?
            .execute(params![c.caller, c.key, seq_i, want])?;
        if n != 1 {
            return Ok(Applied::NotCompletable);
        }
        if let Some(e) = &c.effect {
            self.conn
                .prepare_cached(
                    "INSERT INTO ledger(account, balance) VALUES (?1, ?2)
                     ON CONFLICT(account) DO UPDATE SET balance = balance + excluded.balance",
                )?
                .execute(params![e.account, e.delta])?;
        }
        let entry = AuditEntry::next(seq, &self.last_entry, &c.receipt_sha256, now_ms());
        self.conn
            .prepare_cached(
                "INSERT INTO receipts(seq, request_id, caller, key, body, sig, key_id, request) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                seq_i,
                c.request_id,
                c.caller,
                c.key,
                c.receipt,
                c.sig,
                c.key_id,
                c.request
            ])?;
        self.conn
            .prepare_cached(
                "INSERT INTO audit(seq, prev, receipt_sha256, entry_sha256, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                seq_i,
                entry.prev,
                entry.receipt_sha256,
                entry.entry_sha256,
                i64::try_from(entry.recorded_at).unwrap_or(i64::MAX)
            ])?;
        let response = response_bytes(&c.receipt, &c.sig, &c.key_id, seq, &entry.entry_sha256);
        if c.from_held {
            self.conn
                .prepare_cached("UPDATE escalations SET state = 'decided' WHERE request_id = ?1")?
                .execute(params![c.request_id])?;
        }
        let mut outbox = Vec::new();
        if let Some(complete) = &c.complete {
            outbox.extend(self.insert_out(complete)?);
        }
        if let Some((url, headers)) = &c.outcome {
            outbox.extend(self.insert_out(&NewOut {
                dedup: dedup("O", &c.caller, &c.key),
                url: url.clone(),
                headers: headers.clone(),
                body: response.clone(),
                kind: "outcome",
            })?);
        }
        self.last_seq = seq;
        self.last_entry = entry.entry_sha256;
        Ok(Applied::Completed {
            response,
            seq,
            outbox,
        })
    }

    fn hold(&self, h: &Held, response: &[u8]) -> Result<Applied, ProviderError> {
        self.conn.execute(
            "INSERT INTO escalations(request_id, caller, key, delegation, request, repr, outcome_url, hub_path, state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'held')",
            params![h.request_id, h.caller, h.key, h.delegation, h.request, h.repr, h.outcome_url, h.hub_path],
        )?;
        let n = self.conn.execute(
            "UPDATE requests SET state = 'held', held_response = ?3 WHERE caller = ?1 AND key = ?2 AND state = 'pending'",
            params![h.caller, h.key, response],
        )?;
        if n != 1 {
            return Err(ProviderError::StoreState(
                "request is not pending; cannot hold".into(),
            ));
        }
        Ok(Applied::Held)
    }

    fn get_held(&self, request_id: &str) -> Result<Applied, ProviderError> {
        let h = self
            .conn
            .query_row(
                "SELECT request_id, caller, key, delegation, request, repr, outcome_url, hub_path
                 FROM escalations WHERE request_id = ?1 AND state = 'held'",
                params![request_id],
                |r| {
                    Ok(Held {
                        request_id: r.get(0)?,
                        caller: r.get(1)?,
                        key: r.get(2)?,
                        delegation: r.get(3)?,
                        request: r.get(4)?,
                        repr: r.get(5)?,
                        outcome_url: r.get(6)?,
                        hub_path: r.get(7)?,
                    })
                },
            )
            .optional()?;
        Ok(Applied::HeldRow(h))
    }

    fn pending(&self, after: i64, limit: usize) -> Result<Applied, ProviderError> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, kind, url, headers, body FROM outbox WHERE state = 'pending' AND id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = st.query_map(params![after, i64::try_from(limit).unwrap_or(1000)], |r| {
            let headers: String = r.get(3)?;
            let kind: String = r.get(1)?;
            Ok(OutRow {
                id: r.get(0)?,
                kind: kind_of(&kind),
                url: r.get(2)?,
                headers: serde_json::from_str(&headers).unwrap_or_default(),
                body: r.get(4)?,
            })
        })?;
        Ok(Applied::Pending(rows.collect::<Result<Vec<_>, _>>()?))
    }

    fn ledger(&self) -> Result<Applied, ProviderError> {
        let mut st = self
            .conn
            .prepare("SELECT account, balance FROM ledger ORDER BY account")?;
        let balances = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        let receipts: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM receipts", [], |r| r.get(0))?;
        Ok(Applied::Ledger {
            balances,
            receipts: u64::try_from(receipts).unwrap_or(0),
        })
    }

    fn apply_inner(&mut self, op: &Op) -> Result<Applied, ProviderError> {
        match op {
            Op::Start(s) => self.start(s),
            Op::Complete(c) => self.complete(c),
            Op::Hold { held, response } => self.hold(held, response),
            Op::GetHeld { request_id } => self.get_held(request_id),
            Op::Revoke { id } => {
                let n = self.conn.execute(
                    "INSERT OR IGNORE INTO revocations(id) VALUES (?1)",
                    params![id],
                )?;
                Ok(Applied::Revoked(n == 1))
            }
            Op::OutboxAck(ids) => {
                let mut delivered = String::with_capacity(ids.len() * 8 + 2);
                delivered.push('[');
                let mut conflict = self
                    .conn
                    .prepare_cached("UPDATE outbox SET state = 'conflict' WHERE id = ?1")?;
                for (id, c) in ids {
                    if *c {
                        conflict.execute(params![id])?;
                    } else {
                        if delivered.len() > 1 {
                            delivered.push(',');
                        }
                        delivered.push_str(&id.to_string());
                    }
                }
                delivered.push(']');
                self.conn
                    .prepare_cached(
                        "DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?1))",
                    )?
                    .execute(params![delivered])?;
                Ok(Applied::Acked)
            }
            Op::PendingOutbox { after, limit } => self.pending(*after, *limit),
            Op::Ledger => self.ledger(),
        }
    }
}

impl Store for SqliteStore {
    fn begin(&mut self) -> Result<(), ProviderError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<Applied, ProviderError> {
        self.conn.prepare_cached("SAVEPOINT op")?.execute([])?;
        let (seq, entry) = (self.last_seq, self.last_entry.clone());
        match self.apply_inner(op) {
            Ok(a) => {
                self.conn.prepare_cached("RELEASE op")?.execute([])?;
                Ok(a)
            }
            Err(e) => {
                self.last_seq = seq;
                self.last_entry = entry;
                self.conn.execute_batch("ROLLBACK TO op; RELEASE op")?;
                Err(e)
            }
        }
    }

    fn commit(&mut self) -> Result<(), ProviderError> {
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }

    fn rollback(&mut self) -> Result<(), ProviderError> {
        let _ = self.conn.execute_batch("ROLLBACK");
        self.load_tip()
    }
}

type Reply = oneshot::Sender<Result<Applied, String>>;

/// The handle request tasks use to reach the writer.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<(Op, Reply)>,
}

impl Writer {
    /// False once the writer thread has stopped.
    pub fn alive(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Sends an op and waits until it is durable. `Err` carries a description.
    pub async fn run(&self, op: Op) -> Result<Applied, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((op, reply))
            .await
            .map_err(|_| "store writer stopped".to_string())?;
        rx.await.map_err(|_| "store writer stopped".to_string())?
    }
}

/// Where committed outbox rows go (the outbox worker's queue); `overflow` is raised when the
/// queue was full, so the worker rescans the store.
#[derive(Clone)]
pub struct OutboxFeed {
    pub tx: mpsc::Sender<OutRow>,
    pub overflow: Arc<std::sync::atomic::AtomicBool>,
    pub wake: Arc<tokio::sync::Notify>,
}

/// Starts the writer thread that owns `store`.
pub fn spawn_writer<S: Store>(
    mut store: S,
    queue: usize,
    max_batch: usize,
    feed: OutboxFeed,
    metrics: Arc<Metrics>,
) -> Result<Writer, ProviderError> {
    let (tx, mut rx) = mpsc::channel::<(Op, Reply)>(queue);
    std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || {
            let mut batch: Vec<(Op, Reply)> = Vec::with_capacity(max_batch);
            while let Some(first) = rx.blocking_recv() {
                batch.push(first);
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(x) => batch.push(x),
                        Err(_) => break,
                    }
                }
                let started = std::time::Instant::now();
                let mut results: Vec<Result<Applied, String>> = Vec::with_capacity(batch.len());
                match store.begin() {
                    Ok(()) => {
                        for (op, _) in &batch {
                            results.push(store.apply(op).map_err(|e| e.to_string()));
                        }
                        if let Err(e) = store.commit() {
                            log::error!("store commit failed: {e}");
                            let _ = store.rollback();
                            let msg = format!("commit failed: {e}");
                            for r in results.iter_mut() {
                                *r = Err(msg.clone());
                            }
                        }
                    }
                    Err(e) => {
                        log::error!("store begin failed: {e}");
                        let _ = store.rollback();
                        results.extend(batch.iter().map(|_| Err(format!("store: {e}"))));
                    }
                }
                metrics.commit_batch.observe(batch.len() as f64);
                metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                let mut new_rows = false;
                for ((_, reply), mut res) in batch.drain(..).zip(results) {
                    if let Ok(a) = res.as_mut() {
                        for row in a.take_outbox() {
                            new_rows = true;
                            if feed.tx.try_send(row).is_err() {
                                feed.overflow
                                    .store(true, std::sync::atomic::Ordering::SeqCst);
                            }
                        }
                    }
                    let _ = reply.send(res);
                }
                if new_rows {
                    feed.wake.notify_one();
                }
            }
        })?;
    Ok(Writer { tx })
}
