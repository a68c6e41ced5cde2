//! The whole topology of `conf/`, started through `multihub up` on fresh loopback ports: the
//! repository's `conf/` is copied into a temporary root with every fixed port replaced.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::procs::{bin_path, free_port, workspace_root, TempDir};

/// Every fixed port used in `conf/`.
pub const CONF_PORTS: [u16; 13] = [
    8080, 8081, 9101, 9102, 9103, 9111, 9112, 9113, 9180, 9181, 9200, 9300, 9301,
];

pub struct Topology {
    pub dir: TempDir,
    child: Child,
    ports: BTreeMap<u16, u16>,
}

fn copy_tree(from: &Path, to: &Path, map: &BTreeMap<u16, u16>) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{e}"));
    for e in std::fs::read_dir(from).into_iter().flatten().flatten() {
        let name = e.file_name();
        if name == "invalid" {
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        if src.is_dir() {
            copy_tree(&src, &dst, map);
        } else {
            let mut text =
                std::fs::read_to_string(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
            for (old, new) in map {
                text = text.replace(&format!("127.0.0.1:{old}"), &format!("127.0.0.1:{new}"));
            }
            std::fs::write(&dst, text).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

impl Topology {
    /// Copies `conf/`, lets `tweak` edit the copy (its path is `<root>/conf`), starts
    /// `multihub up` and waits until it reports every component ready.
    pub async fn start(tweak: impl FnOnce(&Path)) -> Topology {
        let (dir, ports) = Topology::copy_conf();
        tweak(&dir.path().join("conf"));
        for b in ["multihub-hub", "multihub-provider", "multihub-association"] {
            bin_path(b);
        }
        let log =
            std::fs::File::create(dir.path().join("up.log")).unwrap_or_else(|e| panic!("{e}"));
        let err = log.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let child = Topology::up(&dir)
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn multihub up: {e}"));
        let mut t = Topology { dir, child, ports };
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            if t.log().contains("multihub is up") {
                return t;
            }
            if let Ok(Some(st)) = t.child.try_wait() {
                panic!("multihub up exited ({st}):\n{}", t.log());
            }
            if Instant::now() > end {
                panic!("multihub up not ready in time:\n{}", t.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A temporary root holding a copy of `conf/` as `conf`, with every fixed port replaced
    /// by a fresh one (old → new).
    pub fn copy_conf() -> (TempDir, BTreeMap<u16, u16>) {
        let dir = TempDir::new("e2e");
        let ports: BTreeMap<u16, u16> = CONF_PORTS.iter().map(|p| (*p, free_port())).collect();
        copy_tree(
            &workspace_root().join("conf"),
            &dir.path().join("conf"),
            &ports,
        );
        (dir, ports)
    }

    /// The `multihub up` command for the copy in `dir` (state in `<dir>/state`).
    pub fn up(dir: &TempDir) -> Command {
        let mut cmd = Command::new(bin_path("multihub"));
        cmd.args(["up", "--conf", "conf", "--state", "state"])
            .current_dir(dir.path())
            .stdin(Stdio::null());
        cmd
    }

    /// `127.0.0.1:<port>` standing for the `conf/` port `conf_port`.
    pub fn addr(&self, conf_port: u16) -> String {
        format!(
            "127.0.0.1:{}",
            self.ports.get(&conf_port).copied().unwrap_or(conf_port)
        )
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The launcher's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }

    /// A component's log (`hub-a`, `provider-b`, `association`, ...).
    pub fn component_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.state().join("logs").join(format!("{name}.log")))
            .unwrap_or_default()
    }

    /// Every outcome the sink received: JSON lines `{request_id, provider, hub_path, body}`.
    pub fn outcomes(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.state().join("outcomes.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Stops everything through the launcher (SIGINT), as Ctrl-C would; returns its exit code.
    pub async fn stop(&mut self) -> Option<i32> {
        crate::procs::signal(self.child.id(), "INT");
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            crate::procs::signal(self.child.id(), "INT");
            let end = Instant::now() + Duration::from_secs(20);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
