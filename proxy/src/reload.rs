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

/// What a file event means for the routing table.
#[derive(Debug, PartialEq, Eq)]
enum Relevance {
    /// It names the table: in a routes directory the `active` pointer or a `*.json` version,
    /// beside a single table file that file.
    Table,
    /// It names nothing (the watcher lost events and asks for a rescan): reload to be sure.
    Unknown,
    /// It names only other files. They may still be the table's: a symlink swap (how
    /// Kubernetes updates a mounted volume) renames a hidden directory and never names the
    /// table. Whether the table changed is told by [`Fingerprint`].
    Other,
    /// Reads.
    None,
}

fn relevance(routes: &Path, is_dir: bool, ev: &Event) -> Relevance {
    if matches!(ev.kind, EventKind::Access(_)) {
        return Relevance::None;
    }
    if ev.need_rescan() || ev.paths.is_empty() {
        return Relevance::Unknown;
    }
    let table_name = (!is_dir).then(|| routes.file_name()).flatten();
    let names_table = ev.paths.iter().any(|p| {
        let Some(name) = p.file_name() else {
            return false;
        };
        match table_name {
            Some(t) => name == t,
            None => {
                name == ACTIVE_POINTER || Path::new(name).extension().is_some_and(|e| e == "json")
            }
        }
    });
    if names_table {
        Relevance::Table
    } else {
        Relevance::Other
    }
}

/// The identity of the files a reload reads, as a reload would see them (symlinks followed):
/// device, inode, length and modification time of each.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint(Vec<Option<FileId>>);

/// Device, inode, length, mtime (seconds, nanoseconds) of one file.
type FileId = (u64, u64, u64, i64, i64);

impl Fingerprint {
    fn of(paths: &[PathBuf]) -> Fingerprint {
        use std::os::unix::fs::MetadataExt;
        Fingerprint(
            paths
                .iter()
                .map(|p| {
                    let m = std::fs::metadata(p).ok()?;
                    Some((m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
                })
                .collect(),
        )
    }
}

/// The files a reload reads: the single table file, or the `active` pointer and the version
/// serving now.
fn table_files(routes: &Path, is_dir: bool, serving: &Path) -> Vec<PathBuf> {
    if is_dir {
        vec![routes.join(ACTIVE_POINTER), serving.to_path_buf()]
    } else {
        vec![routes.to_path_buf()]
    }
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
        let tables = self.tables.clone();
        let files = move || table_files(&routes, is_dir, &tables.load().file);
        let mut seen = Fingerprint::of(&files());
        let routes = self.routes.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<Event>| {
            let changed = match res {
                Ok(ev) => match relevance(&routes, is_dir, &ev) {
                    Relevance::Table | Relevance::Unknown => {
                        seen = Fingerprint::of(&files());
                        true
                    }
                    Relevance::Other => {
                        let now = Fingerprint::of(&files());
                        let changed = now != seen;
                        seen = now;
                        changed
                    }
                    Relevance::None => false,
                },
                // The watcher itself failed: reload rather than miss a change.
                Err(_) => true,
            };
            if changed {
                // A full channel means a reload is already pending: coalesce.
                let _ = tx.try_send(());
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
    fn events_naming_the_table_reload_and_the_others_are_checked() {
        let write = EventKind::Modify(ModifyKind::Any);
        let create = EventKind::Create(CreateKind::File);
        let read = EventKind::Access(notify::event::AccessKind::Any);
        let file = Path::new("/srv/hub/table.json");
        let r = |routes, dir, e: Event| relevance(routes, dir, &e);
        assert_eq!(
            r(file, false, ev(write, &["/srv/hub/table.json"])),
            Relevance::Table
        );
        assert_eq!(
            r(file, false, ev(write, &["/srv/hub/hub.log"])),
            Relevance::Other
        );
        assert_eq!(
            r(file, false, ev(write, &["/srv/hub/other.json"])),
            Relevance::Other
        );
        assert_eq!(
            r(file, false, ev(read, &["/srv/hub/table.json"])),
            Relevance::None
        );
        // A rename onto the table names it as the destination.
        assert_eq!(
            r(
                file,
                false,
                ev(write, &["/srv/hub/.table.json.tmp", "/srv/hub/table.json"])
            ),
            Relevance::Table
        );
        let dir = Path::new("/srv/hub/routes");
        assert_eq!(
            r(dir, true, ev(create, &["/srv/hub/routes/active"])),
            Relevance::Table
        );
        assert_eq!(
            r(dir, true, ev(create, &["/srv/hub/routes/v2.json"])),
            Relevance::Table
        );
        assert_eq!(
            r(dir, true, ev(create, &["/srv/hub/routes/.active.tmp-7"])),
            Relevance::Other
        );
        // Lost events: the watcher asks for a rescan and names nothing.
        let rescan = Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(r(dir, true, rescan), Relevance::Unknown);
        assert_eq!(r(file, false, ev(write, &[])), Relevance::Unknown);
    }

    #[test]
    fn a_symlink_swap_changes_the_fingerprint_without_naming_the_table() {
        // The layout of a Kubernetes volume: table.json -> ..data/table.json, ..data -> a
        // timestamped directory, replaced by renaming a new link onto ..data.
        let dir = std::env::temp_dir().join(format!("multihub-fp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let made = (|| -> std::io::Result<()> {
            for (d, body) in [("v1", "one"), ("v2", "two!")] {
                std::fs::create_dir_all(dir.join(d))?;
                std::fs::write(dir.join(d).join("table.json"), body)?;
            }
            std::os::unix::fs::symlink("v1", dir.join("..data"))?;
            std::os::unix::fs::symlink("..data/table.json", dir.join("table.json"))
        })();
        made.unwrap_or_else(|e| panic!("{e}"));
        let table = dir.join("table.json");
        let files = table_files(&table, false, &table);
        let before = Fingerprint::of(&files);
        assert_eq!(
            before,
            Fingerprint::of(&files),
            "stable while nothing changes"
        );
        std::os::unix::fs::symlink("v2", dir.join("..data_tmp")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(before, Fingerprint::of(&files), "the swap is seen");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
