//! The durable store behind the [`SignalStore`] trait, and its SQLite implementation (WAL,
//! `synchronous=FULL`). A PostgreSQL-wire backend can implement the same trait.
//!
//! [`SignalStore::apply_batch`] is the group commit: every signal of a batch is checked and
//! written inside **one** transaction, together with any confirmation it triggers; the caller
//! answers the requests only after it returned `Ok`, i.e. after the commit is durable.

use multihub_protocol::signal::Stage;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use thiserror::Error;

use crate::config::Policies;
use crate::policy::OpSignals;

/// A store failure (the request is answered 503 and nothing of its batch is recorded).
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("starting a thread: {0}")]
    Thread(String),
}

/// A verified signal on its way into the store.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub operation: String,
    pub provider: String,
    pub stage: Stage,
    /// The `x-hub-route` the provider passed along, if any (selects a per-route policy).
    pub route: Option<String>,
    /// The exact bytes received.
    pub bytes: bytes::Bytes,
    /// sha256 of `bytes`.
    pub digest: [u8; 32],
}

/// What the store did with one signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Recorded now (201); `confirmation` when this signal made the policy hold first.
    Created {
        seq: i64,
        confirmation: Option<Confirmation>,
    },
    /// The same bytes were already recorded (200).
    Duplicate { seq: i64 },
    /// A different signal is recorded for the same (operation, provider, stage) (409).
    Conflict { seq: i64 },
    /// The operation is already recorded under a different route (409).
    RouteConflict { route: String },
}

/// A confirmation record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Confirmation {
    pub seq: i64,
    pub operation: String,
    pub linkage: String,
    pub providers: Vec<String>,
    pub policy: String,
    /// The signal whose arrival made the policy hold.
    pub signal_seq: i64,
    pub confirmed_at_ms: i64,
}

/// A stored signal row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSignal {
    pub seq: i64,
    pub operation: String,
    pub provider: String,
    pub stage: Stage,
    pub route: Option<String>,
    pub digest: Vec<u8>,
    pub bytes: Vec<u8>,
    pub received_at_ms: i64,
}

/// Durable storage of signals and confirmations.
pub trait SignalStore: Send {
    /// Checks and records a batch in one transaction (see the module doc); one result per input,
    /// in order. On `Err` nothing of the batch is recorded.
    fn apply_batch(
        &mut self,
        batch: &[Incoming],
        policies: &Policies,
        now_ms: i64,
    ) -> Result<Vec<Applied>, StoreError>;
    /// Every signal of an operation, in arrival order.
    fn signals_of(&mut self, operation: &str) -> Result<Vec<StoredSignal>, StoreError>;
    /// The confirmation of an operation, if any.
    fn confirmation_of(&mut self, operation: &str) -> Result<Option<Confirmation>, StoreError>;
    /// Confirmations with `seq > after`, ascending, at most `limit`.
    fn confirmations_after(
        &mut self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Confirmation>, StoreError>;
    /// Signals with `seq > after`, ascending, at most `limit` (for the offline check).
    fn signals_after(&mut self, after: i64, limit: usize) -> Result<Vec<StoredSignal>, StoreError>;
    /// (number of signals, number of confirmations).
    fn counts(&mut self) -> Result<(i64, i64), StoreError>;
    /// The highest confirmation seq (0 when none).
    fn last_confirmation_seq(&mut self) -> Result<i64, StoreError>;
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS operations (
    op_seq    INTEGER PRIMARY KEY,
    operation TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS signals (
    seq            INTEGER PRIMARY KEY,
    op_seq         INTEGER NOT NULL REFERENCES operations (op_seq),
    provider       TEXT NOT NULL,
    stage          TEXT NOT NULL,
    route          TEXT,
    digest         BLOB NOT NULL,
    bytes          BLOB NOT NULL,
    received_at_ms INTEGER NOT NULL,
    UNIQUE (op_seq, provider, stage)
);
CREATE TABLE IF NOT EXISTS confirmations (
    seq             INTEGER PRIMARY KEY,
    op_seq          INTEGER NOT NULL UNIQUE REFERENCES operations (op_seq),
    operation       TEXT NOT NULL,
    linkage         TEXT NOT NULL,
    providers       TEXT NOT NULL,
    policy          TEXT NOT NULL,
    signal_seq      INTEGER NOT NULL,
    confirmed_at_ms INTEGER NOT NULL
);
";

/// Operations the writer keeps in memory (cleared beyond this; reloaded on demand).
const CACHE_CAP: usize = 250_000;

/// What the writer knows about one operation (mirrors the committed rows).
#[derive(Debug, Default)]
struct OpState {
    /// Row of `operations`, once the first signal is recorded.
    op_seq: Option<i64>,
    signals: OpSignals,
    seqs: Vec<i64>,
    route: Option<String>,
    confirmed: bool,
}

/// SQLite implementation. The writing instance keeps a bounded cache of each operation's
/// (provider, stage, digest) so that checking a signal costs no query; the database stays the
/// authority (the cache is dropped whenever a batch fails).
pub struct SqliteStore {
    conn: Connection,
    cache: HashMap<String, OpState>,
}

fn stage_of(s: &str) -> Result<Stage, StoreError> {
    match s {
        "START" => Ok(Stage::Start),
        "COMPLETE" => Ok(Stage::Complete),
        other => Err(StoreError::Corrupt(format!("stage {other:?}"))),
    }
}

fn signal_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(StoredSignal, String)> {
    let stage: String = r.get(3)?;
    Ok((
        StoredSignal {
            seq: r.get(0)?,
            operation: r.get(1)?,
            provider: r.get(2)?,
            stage: Stage::Start,
            route: r.get(4)?,
            digest: r.get(5)?,
            bytes: r.get(6)?,
            received_at_ms: r.get(7)?,
        },
        stage,
    ))
}

fn fix_stage(v: Vec<(StoredSignal, String)>) -> Result<Vec<StoredSignal>, StoreError> {
    v.into_iter()
        .map(|(mut s, st)| {
            s.stage = stage_of(&st)?;
            Ok(s)
        })
        .collect()
}

fn confirmation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Confirmation, String)> {
    let providers: String = r.get(3)?;
    Ok((
        Confirmation {
            seq: r.get(0)?,
            operation: r.get(1)?,
            linkage: r.get(2)?,
            providers: Vec::new(),
            policy: r.get(4)?,
            signal_seq: r.get(5)?,
            confirmed_at_ms: r.get(6)?,
        },
        providers,
    ))
}

fn fix_providers(v: Vec<(Confirmation, String)>) -> Result<Vec<Confirmation>, StoreError> {
    v.into_iter()
        .map(|(mut c, p)| {
            c.providers = serde_json::from_str(&p)
                .map_err(|e| StoreError::Corrupt(format!("providers {p:?}: {e}")))?;
            Ok(c)
        })
        .collect()
}

/// How often the background checkpointer copies committed WAL frames into the database file.
pub const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// Size the WAL file is cut back to when it restarts after a complete checkpoint.
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// Runs SQLite's WAL checkpoints on its own thread and connection, so that the writer's group
/// commits never pay for them. With SQLite's default automatic checkpoint the committing
/// thread copies ~1,000 pages into the database file and syncs it every few hundred commits;
/// under load those stalls held every waiting request (measured: 17.1–18.7k signals/s with
/// them, 20.0–22.3k without, `bench/association 25000 512 2 batch`). Checkpoints are PASSIVE:
/// they never block the writer or readers, and they touch only frames already durable in the
/// WAL, so they change nothing about what a 2xx promises.
pub struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Opens a second connection to the store at `path` and checkpoints every
    /// [`CHECKPOINT_INTERVAL`] until dropped.
    pub fn spawn(path: &Path) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("association-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(CHECKPOINT_INTERVAL)
                {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        log::warn!("WAL checkpoint failed: {e}");
                    }
                }
            })
            .map_err(|e| StoreError::Thread(e.to_string()))?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Signal columns, from `signals s JOIN operations o`.
const SIGNAL_COLS: &str =
    "s.seq, o.operation, s.provider, s.stage, s.route, s.digest, s.bytes, s.received_at_ms";
const SIGNAL_FROM: &str = "signals s JOIN operations o ON o.op_seq = s.op_seq";
const CONF_COLS: &str = "seq, operation, linkage, providers, policy, signal_seq, confirmed_at_ms";

impl SqliteStore {
    /// Opens (creating if needed) the store for writing: WAL, `synchronous=FULL`.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // 4 MiB page cache. A bigger one costs CPU at every commit: SQLite's page cache scans its
        // whole hash table at the end of each write transaction while the database is smaller
        // than 1 GiB (its pending-byte page is cached), and that table grows with the cache.
        // Measured (batches of 28 rows, synchronous=FULL, 400k rows): 22.6 us of CPU per row at
        // 4 MiB, 26.6 at 16 MiB, 31.8 at 64 MiB. Misses are served by the OS page cache.
        conn.pragma_update(None, "cache_size", -4096)?;
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(SqliteStore {
            conn,
            cache: HashMap::new(),
        })
    }

    /// Leaves WAL checkpoints to a [`Checkpointer`]: commits no longer run them.
    pub fn without_auto_checkpoint(self) -> Result<SqliteStore, StoreError> {
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(self)
    }

    /// Opens an existing store read-only (readers and the offline check).
    pub fn open_read_only(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(SqliteStore {
            conn,
            cache: HashMap::new(),
        })
    }

    /// The writer's view of an operation: from the cache, else loaded from the database.
    fn op_state<'c>(
        conn: &Connection,
        cache: &'c mut HashMap<String, OpState>,
        operation: &str,
    ) -> Result<&'c mut OpState, StoreError> {
        if !cache.contains_key(operation) {
            let mut st = OpState::default();
            let mut find =
                conn.prepare_cached("SELECT op_seq FROM operations WHERE operation = ?1")?;
            st.op_seq = find
                .query_row([operation], |r| r.get::<_, i64>(0))
                .optional()?;
            if let Some(op_seq) = st.op_seq {
                let mut sel = conn.prepare_cached(
                    "SELECT seq, provider, stage, route, digest FROM signals WHERE op_seq = ?1 ORDER BY seq",
                )?;
                let rows = sel
                    .query_map([op_seq], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, Option<String>>(3)?,
                            r.get::<_, Vec<u8>>(4)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                for (seq, provider, stage, route, digest) in rows {
                    let d: [u8; 32] = digest
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("digest length".into()))?;
                    if st.route.is_none() {
                        st.route = route;
                    }
                    st.signals.entries.push((provider, stage_of(&stage)?, d));
                    st.seqs.push(seq);
                }
                let mut c = conn.prepare_cached("SELECT 1 FROM confirmations WHERE op_seq = ?1")?;
                st.confirmed = c.exists([op_seq])?;
            }
            cache.insert(operation.to_string(), st);
        }
        cache
            .get_mut(operation)
            .ok_or_else(|| StoreError::Corrupt("cache".into()))
    }

    fn apply_one(
        conn: &Connection,
        cache: &mut HashMap<String, OpState>,
        s: &Incoming,
        policies: &Policies,
        now_ms: i64,
    ) -> Result<Applied, StoreError> {
        let st = Self::op_state(conn, cache, &s.operation)?;
        for (i, (provider, stage, digest)) in st.signals.entries.iter().enumerate() {
            if *provider == s.provider && *stage == s.stage {
                let seq = st.seqs[i];
                return Ok(if *digest == s.digest {
                    Applied::Duplicate { seq }
                } else {
                    Applied::Conflict { seq }
                });
            }
        }
        if let (Some(have), Some(want)) = (&st.route, &s.route) {
            if have != want {
                return Ok(Applied::RouteConflict {
                    route: have.clone(),
                });
            }
        }
        let op_seq = match st.op_seq {
            Some(o) => o,
            None => {
                let mut op =
                    conn.prepare_cached("INSERT INTO operations (operation) VALUES (?1)")?;
                op.execute([&s.operation])?;
                let o = conn.last_insert_rowid();
                st.op_seq = Some(o);
                o
            }
        };
        let mut ins = conn.prepare_cached(
            "INSERT INTO signals (op_seq, provider, stage, route, digest, bytes, received_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        ins.execute(params![
            op_seq,
            s.provider,
            s.stage.as_str(),
            s.route,
            &s.digest[..],
            &s.bytes[..],
            now_ms
        ])?;
        let seq = conn.last_insert_rowid();
        if st.route.is_none() {
            st.route.clone_from(&s.route);
        }
        st.signals
            .entries
            .push((s.provider.clone(), s.stage, s.digest));
        st.seqs.push(seq);
        let mut confirmation = None;
        if !st.confirmed {
            let (policy, name) = policies.for_route(st.route.as_deref());
            if let Some(providers) = policy.holds(&st.signals) {
                st.confirmed = true;
                let linkage = st.signals.linkage();
                let providers_json = serde_json::to_string(&providers)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let policy_name = name.to_string();
                let mut c = conn.prepare_cached(
                    "INSERT INTO confirmations (op_seq, operation, linkage, providers, policy, signal_seq, confirmed_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (op_seq) DO NOTHING",
                )?;
                let n = c.execute(params![
                    op_seq,
                    s.operation,
                    linkage,
                    providers_json,
                    policy_name,
                    seq,
                    now_ms
                ])?;
                if n == 1 {
                    confirmation = Some(Confirmation {
                        seq: conn.last_insert_rowid(),
                        operation: s.operation.clone(),
                        linkage,
                        providers,
                        policy: policy_name,
                        signal_seq: seq,
                        confirmed_at_ms: now_ms,
                    });
                }
            }
        }
        Ok(Applied::Created { seq, confirmation })
    }

    fn apply_in_tx(
        &mut self,
        batch: &[Incoming],
        policies: &Policies,
        now_ms: i64,
    ) -> Result<Vec<Applied>, StoreError> {
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let mut out = Vec::with_capacity(batch.len());
        for s in batch {
            out.push(Self::apply_one(
                &self.conn,
                &mut self.cache,
                s,
                policies,
                now_ms,
            )?);
        }
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(out)
    }
}

impl SignalStore for SqliteStore {
    fn apply_batch(
        &mut self,
        batch: &[Incoming],
        policies: &Policies,
        now_ms: i64,
    ) -> Result<Vec<Applied>, StoreError> {
        if self.cache.len() > CACHE_CAP {
            self.cache.clear();
        }
        let r = self.apply_in_tx(batch, policies, now_ms);
        if r.is_err() {
            // Nothing of the batch is recorded; the cache may hold part of it: drop it.
            self.cache.clear();
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
        }
        r
    }

    fn signals_of(&mut self, operation: &str) -> Result<Vec<StoredSignal>, StoreError> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {SIGNAL_COLS} FROM {SIGNAL_FROM} WHERE o.operation = ?1 ORDER BY s.seq"
        ))?;
        let v = st
            .query_map([operation], signal_row)?
            .collect::<Result<Vec<_>, _>>()?;
        fix_stage(v)
    }

    fn confirmation_of(&mut self, operation: &str) -> Result<Option<Confirmation>, StoreError> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {CONF_COLS} FROM confirmations
             WHERE op_seq = (SELECT op_seq FROM operations WHERE operation = ?1)"
        ))?;
        let v = st.query_row([operation], confirmation_row).optional()?;
        Ok(fix_providers(v.into_iter().collect())?.pop())
    }

    fn confirmations_after(
        &mut self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Confirmation>, StoreError> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {CONF_COLS} FROM confirmations WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))?;
        let v = st
            .query_map(params![after, limit as i64], confirmation_row)?
            .collect::<Result<Vec<_>, _>>()?;
        fix_providers(v)
    }

    fn signals_after(&mut self, after: i64, limit: usize) -> Result<Vec<StoredSignal>, StoreError> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {SIGNAL_COLS} FROM {SIGNAL_FROM} WHERE s.seq > ?1 ORDER BY s.seq LIMIT ?2"
        ))?;
        let v = st
            .query_map(params![after, limit as i64], signal_row)?
            .collect::<Result<Vec<_>, _>>()?;
        fix_stage(v)
    }

    fn counts(&mut self) -> Result<(i64, i64), StoreError> {
        let s = self
            .conn
            .query_row("SELECT COUNT(*) FROM signals", [], |r| r.get(0))?;
        let c = self
            .conn
            .query_row("SELECT COUNT(*) FROM confirmations", [], |r| r.get(0))?;
        Ok((s, c))
    }

    fn last_confirmation_seq(&mut self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM confirmations", [], |r| {
                r.get(0)
            })?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{digest, Policy};

    fn policies(p: Policy) -> Policies {
        Policies {
            default: p,
            routes: HashMap::from([("r1".to_string(), Policy::Quorum(1))]),
        }
    }

    fn inc(op: &str, provider: &str, stage: Stage, body: &str) -> Incoming {
        Incoming {
            operation: op.into(),
            provider: provider.into(),
            stage,
            route: None,
            bytes: bytes::Bytes::copy_from_slice(body.as_bytes()),
            digest: digest(body.as_bytes()),
        }
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "assoc-store-{name}-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let _ = std::fs::create_dir_all(&d);
        d.join("s.db")
    }

    #[test]
    fn created_duplicate_conflict_and_exactly_once_confirmation() {
        let path = tmp("a");
        let mut st = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let pol = policies(Policy::AllOf(vec!["a".into(), "b".into()]));
        let batch = vec![
            inc("op", "a", Stage::Complete, "ac"),
            inc("op", "a", Stage::Complete, "ac"),
            inc("op", "a", Stage::Complete, "ac2"),
            inc("op", "a", Stage::Start, "as"),
            inc("op", "b", Stage::Start, "bs"),
        ];
        let r = st
            .apply_batch(&batch, &pol, 1)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            r[0],
            Applied::Created {
                seq: 1,
                confirmation: None
            }
        ));
        assert_eq!(r[1], Applied::Duplicate { seq: 1 });
        assert_eq!(r[2], Applied::Conflict { seq: 1 });
        assert_eq!(st.counts().ok(), Some((3, 0)));
        let r = st
            .apply_batch(
                &[
                    inc("op", "b", Stage::Complete, "bc"),
                    inc("op", "c", Stage::Start, "cs"),
                ],
                &pol,
                2,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let Applied::Created {
            seq,
            confirmation: Some(c),
        } = &r[0]
        else {
            panic!("{r:?}")
        };
        assert_eq!(c.providers, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(c.signal_seq, *seq);
        assert_eq!(c.policy, "default");
        assert!(matches!(
            r[1],
            Applied::Created {
                confirmation: None,
                ..
            }
        ));
        let sigs = st.signals_of("op").unwrap_or_default();
        assert_eq!(sigs.len(), 5);
        assert_eq!(sigs[0].bytes, b"ac");
        // The confirmation linkage covers the four signals present when it fired.
        let want = multihub_protocol::signal::linkage(
            sigs[..4]
                .iter()
                .map(|s| (s.provider.as_str(), s.stage, &s.bytes[..])),
        );
        assert_eq!(c.linkage, want);
        assert_eq!(st.confirmation_of("op").ok().flatten().as_ref(), Some(c));
        assert_eq!(st.confirmations_after(0, 10).ok().map(|v| v.len()), Some(1));
        assert_eq!(
            st.confirmations_after(c.seq, 10).ok().map(|v| v.len()),
            Some(0)
        );
        // Reopen read-only: everything is there.
        drop(st);
        let mut ro = SqliteStore::open_read_only(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ro.counts().ok(), Some((5, 1)));
        assert_eq!(ro.signals_after(2, 100).ok().map(|v| v.len()), Some(3));
        // Reopen for writing (cold cache): state comes back from the database.
        let mut st = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let r = st
            .apply_batch(
                &[
                    inc("op", "b", Stage::Complete, "bc"),
                    inc("op", "b", Stage::Start, "other"),
                    inc("op", "d", Stage::Start, "ds"),
                ],
                &pol,
                3,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(r[0], Applied::Duplicate { .. }), "{r:?}");
        assert!(matches!(r[1], Applied::Conflict { .. }), "{r:?}");
        assert!(
            matches!(
                r[2],
                Applied::Created {
                    confirmation: None,
                    ..
                }
            ),
            "{r:?}"
        );
        assert_eq!(st.counts().ok(), Some((6, 1)));
    }

    #[test]
    fn routes_select_policies_and_cannot_change() {
        let path = tmp("b");
        let mut st = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let pol = policies(Policy::AllOf(vec!["a".into(), "b".into()]));
        let mut s1 = inc("op", "a", Stage::Start, "as");
        s1.route = Some("r1".into());
        let mut s2 = inc("op", "a", Stage::Complete, "ac");
        s2.route = Some("r2".into());
        let s3 = inc("op", "a", Stage::Complete, "ac");
        let r = st
            .apply_batch(&[s1, s2, s3], &pol, 1)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r[1], Applied::RouteConflict { route: "r1".into() });
        let Applied::Created {
            confirmation: Some(c),
            ..
        } = &r[2]
        else {
            panic!("{r:?}")
        };
        assert_eq!(c.policy, "route:r1");
        assert_eq!(c.providers, vec!["a".to_string()]);
    }

    /// Commits leave the WAL alone once the checkpointer runs; the checkpointer moves the
    /// committed pages into the database file.
    #[test]
    fn the_checkpointer_moves_committed_pages_into_the_database_file() {
        let path = tmp("ckpt");
        let mut st = SqliteStore::open(&path)
            .and_then(SqliteStore::without_auto_checkpoint)
            .unwrap_or_else(|e| panic!("{e}"));
        let pol = policies(Policy::Quorum(1));
        let size = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let before = size();
        for b in 0..20 {
            let batch: Vec<Incoming> = (0..100)
                .map(|i| inc(&format!("op-{b}-{i}"), "a", Stage::Start, &"x".repeat(400)))
                .collect();
            st.apply_batch(&batch, &pol, 1)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        // ~1 MB committed, none of it checkpointed by the commits.
        assert_eq!(size(), before);
        let ck = Checkpointer::spawn(&path).unwrap_or_else(|e| panic!("{e}"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while size() < before + 800_000 {
            assert!(std::time::Instant::now() < deadline, "no checkpoint ran");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        drop(ck);
        assert_eq!(st.counts().map(|c| c.0).unwrap_or_default(), 2000);
    }
}
