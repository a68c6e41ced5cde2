//! Hot-swapping routing versions: a `notify` watcher on the routes directory (or the single
//! file's directory) plus SIGHUP. A new version is parsed, validated and compiled completely
//! before one `ArcSwap` store; on any error the previous version keeps serving and the error is
//! logged with its JSON path, counted and shown on `/routes`. Also `routes activate` / `list`.

use async_trait::async_trait;
use multihub_filters::source::{self, ACTIVE_POINTER};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::metrics::Metrics;
use crate::state::{Engine, HubTable, Tables};

/// Quiet time after a file event before reloading (editors and syncs write in several steps).
const DEBOUNCE: Duration = Duration::from_millis(50);

pub struct Reloader {
    pub routes: PathBuf,
    pub tables: Tables,
    pub engine: Arc<Engine>,
}

impl Reloader {
    /// Loads the active version and swaps it in, unless it is the one already serving.
    pub async fn reload(&self, why: &str) {
        let path = self.routes.clone();
        let loaded = match tokio::task::spawn_blocking(move || source::load(&path)).await {
            Ok(r) => r,
            Err(e) => {
                log::error!("reload ({why}) failed to run: {e}");
                return;
            }
        };
        let m = &self.engine.metrics;
        match loaded {
            Ok(l) => {
                let current = self.tables.load();
                if l.sha256 == current.sha256 && l.file == current.file {
                    m.reloads.with_label_values(&["unchanged"]).inc();
                    log::debug!(
                        "routing table reload ({why}): {} unchanged",
                        current.table.version
                    );
                    return;
                }
                for (name, slots, n) in [
                    (
                        "max_in_flight",
                        &self.engine.in_flight,
                        l.table.hub.max_in_flight,
                    ),
                    (
                        "outcome_queue",
                        &self.engine.outcome_slots,
                        l.table.hub.outcome_queue,
                    ),
                ] {
                    if slots.limit() != n {
                        log::info!("hub.{name}: {} -> {n}", slots.limit());
                        slots.resize(n);
                    }
                }
                let old = current.table.version.clone();
                let new = HubTable::new(l, m);
                let version = new.table.version.clone();
                let sha = new.sha256.clone();
                self.tables.store(Arc::new(new));
                let _ = m.active_info.remove_label_values(&[&old]);
                activated(m, &version);
                self.engine
                    .reload
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .last_error = None;
                log::info!("routing table {version} active (was {old}; sha256 {sha}; {why})");
            }
            Err(e) => {
                m.reloads.with_label_values(&["error"]).inc();
                let problems: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
                let text = problems.join("; ");
                log::error!(
                    "routing table reload ({why}) refused, {} keeps serving: {text}",
                    self.tables.load().table.version
                );
                let mut st = self.engine.reload.lock().unwrap_or_else(|e| e.into_inner());
                st.last_error = Some(text);
                st.last_error_at = Some(SystemTime::now());
            }
        }
    }
}

/// Metrics of a table version that became active (at start-up or by a reload).
pub(crate) fn activated(m: &Metrics, version: &str) {
    m.active_info.with_label_values(&[version]).set(1);
    m.reloads.with_label_values(&["ok"]).inc();
    m.last_reload_success.set(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
    );
}

/// Whether a file event concerns the routing table: in a routes directory, the `active` pointer
/// or a `*.json` version; beside a single table file, that file. Anything else in the same
/// directory (logs, temporary files of a sync, the hub's own output) is ignored, so a busy
/// neighbour never causes reloads.
fn concerns_table(routes: &Path, is_dir: bool, ev: &Event) -> bool {
    if matches!(ev.kind, EventKind::Access(_)) {
        return false;
    }
    let table_name = (!is_dir).then(|| routes.file_name()).flatten();
    ev.paths.iter().any(|p| {
        let Some(name) = p.file_name() else {
            return false;
        };
        match table_name {
            Some(t) => name == t,
            None => {
                name == ACTIVE_POINTER || Path::new(name).extension().is_some_and(|e| e == "json")
            }
        }
    })
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let dir = if self.routes.is_dir() {
            self.routes.clone()
        } else {
            self.routes
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."))
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let (routes, is_dir) = (self.routes.clone(), self.routes.is_dir());
        let watcher = notify::recommended_watcher(move |res: notify::Result<Event>| {
            if let Ok(ev) = res {
                if concerns_table(&routes, is_dir, &ev) {
                    // A full channel means a reload is already pending: coalesce.
                    let _ = tx.try_send(());
                }
            }
        });
        let _watcher = match watcher {
            Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    log::error!("cannot watch {}: {e}; reload with SIGHUP", dir.display());
                    None
                }
            },
            Err(e) => {
                log::error!("cannot start the file watcher: {e}; reload with SIGHUP");
                None
            }
        };
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("cannot install the SIGHUP handler: {e}");
                None
            }
        };
        loop {
            tokio::select! {
                Some(()) = rx.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                    self.reload("file change").await;
                }
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.reload("SIGHUP").await;
                }
                _ = shutdown.changed() => break,
            }
        }
    }
}

/// `multihub-hub routes activate`: validates the version, then atomically replaces the pointer.
pub fn activate(dir: &Path, version: &str, force: bool) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(format!("{} is not a routes directory", dir.display()));
    }
    multihub_protocol::ids::validate_hub_id(version)
        .map_err(|e| format!("version {version:?} {e}"))?;
    let file = dir.join(format!("{version}.json"));
    if !file.is_file() {
        return Err(format!("{} does not exist", file.display()));
    }
    if !force {
        let bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let parsed = multihub_filters::table::parse(&bytes).map_err(|e| e.to_string())?;
        if parsed.version != version {
            return Err(format!(
                "$.version: {:?} does not match the file name {version:?}",
                parsed.version
            ));
        }
        multihub_filters::compile(&parsed).map_err(|e| e.to_string())?;
    }
    let tmp = dir.join(format!(".{ACTIVE_POINTER}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, format!("{version}\n")).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(ACTIVE_POINTER)).map_err(|e| format!("rename: {e}"))?;
    Ok(())
}

/// `multihub-hub routes list`: every version file, whether it validates, and the active one.
pub fn list(dir: &Path, out: &mut impl std::io::Write) -> Result<(), String> {
    let active = source::active_file(dir)
        .ok()
        .and_then(|(_, v)| v)
        .unwrap_or_default();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    for v in names {
        let file = dir.join(format!("{v}.json"));
        let status = match std::fs::read(&file).map(|b| multihub_filters::table::load_bytes(&b)) {
            Ok(Ok(t)) if t.version == v => "valid".to_string(),
            Ok(Ok(t)) => format!(
                "invalid: $.version {:?} does not match the file name",
                t.version
            ),
            Ok(Err(e)) => format!(
                "invalid: {}",
                e.problems()
                    .first()
                    .map(|p| p.to_string())
                    .unwrap_or_default()
            ),
            Err(e) => format!("unreadable: {e}"),
        };
        let mark = if v == active { "*" } else { " " };
        writeln!(out, "{mark} {v}  {status}").map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind};

    fn ev(kind: EventKind, paths: &[&str]) -> Event {
        let mut e = Event::new(kind);
        for p in paths {
            e = e.add_path(PathBuf::from(p));
        }
        e
    }

    #[test]
    fn only_events_on_the_table_cause_a_reload() {
        let write = EventKind::Modify(ModifyKind::Any);
        let create = EventKind::Create(CreateKind::File);
        let read = EventKind::Access(notify::event::AccessKind::Any);
        let file = Path::new("/srv/hub/table.json");
        assert!(concerns_table(
            file,
            false,
            &ev(write, &["/srv/hub/table.json"])
        ));
        assert!(!concerns_table(
            file,
            false,
            &ev(write, &["/srv/hub/hub.log"])
        ));
        assert!(!concerns_table(
            file,
            false,
            &ev(write, &["/srv/hub/other.json"])
        ));
        assert!(!concerns_table(
            file,
            false,
            &ev(read, &["/srv/hub/table.json"])
        ));
        // A rename onto the table names it as the destination.
        assert!(concerns_table(
            file,
            false,
            &ev(write, &["/srv/hub/.table.json.tmp", "/srv/hub/table.json"])
        ));
        let dir = Path::new("/srv/hub/routes");
        assert!(concerns_table(
            dir,
            true,
            &ev(create, &["/srv/hub/routes/active"])
        ));
        assert!(concerns_table(
            dir,
            true,
            &ev(create, &["/srv/hub/routes/v2.json"])
        ));
        assert!(!concerns_table(
            dir,
            true,
            &ev(create, &["/srv/hub/routes/.active.tmp-7"])
        ));
        assert!(!concerns_table(
            dir,
            true,
            &ev(write, &["/srv/hub/routes/notes.txt"])
        ));
    }
}
