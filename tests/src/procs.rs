//! Starting the real binaries as child processes.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p =
            std::env::temp_dir().join(format!("multihub-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// Writes a file below the directory and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(name);
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        std::fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The workspace's target directory (this test binary lives in `<target>/<profile>/deps/`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| panic!("unexpected test binary location {}", exe.display()))
}

/// Path of a workspace binary, building it first when it is missing.
pub fn bin_path(name: &str) -> PathBuf {
    let p = profile_dir().join(name);
    if !p.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "--bin", name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok && p.exists(),
            "cannot build {name}; run `cargo build --workspace --bins` first"
        );
    }
    p
}

/// A port that was free a moment ago on 127.0.0.1 and that this test process has not handed
/// out before (the kernel may offer a just-released port again; two components of one test
/// must never get the same one).
pub fn free_port() -> u16 {
    let (l, port) = unique_listener();
    drop(l);
    port
}

/// The ports [`free_port`] and [`taken_port`] handed out.
static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// A listener on 127.0.0.1 on a port not handed out before, and that port (now handed out).
fn unique_listener() -> (TcpListener, u16) {
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("no free port: {e}"));
        let port = l
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port: {e}"));
        if !given.contains(&port) {
            given.push(port);
            return (l, port);
        }
    }
}

/// A port held by a listener of this test process (until the listener is dropped), as
/// `127.0.0.1:<port>`: a process told to listen there finds it taken.
pub fn taken_port() -> (TcpListener, String) {
    let (l, port) = unique_listener();
    (l, format!("127.0.0.1:{port}"))
}

/// Runs `cmd` with its output in `log` until it exits or `deadline` passes (then kills it):
/// its exit code, `None` when it was still running at the deadline, and what it wrote.
pub async fn exit_within(
    mut cmd: Command,
    log: &Path,
    deadline: Duration,
) -> (Option<i32>, String) {
    let out = std::fs::File::create(log).unwrap_or_else(|e| panic!("{e}"));
    let err = out.try_clone().unwrap_or_else(|e| panic!("{e}"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn: {e}"));
    let end = Instant::now() + deadline;
    let code = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code();
        }
        if Instant::now() > end {
            // SIGINT first: a launcher stops what it started.
            signal(child.id(), "INT");
            let stop = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < stop {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    (code, std::fs::read_to_string(log).unwrap_or_default())
}

/// Runs the workspace binary `bin` with `args` (output in `log`) and asserts that it refused
/// to start: exit status 1 within 20 s (Pingora alone retries a taken address for 30 s) and
/// `<bin>: cannot listen on <addr>: ` in what it wrote.
pub async fn assert_cannot_listen<S: AsRef<std::ffi::OsStr>>(
    bin: &str,
    args: &[S],
    log: &Path,
    addr: &str,
) {
    let mut cmd = Command::new(bin_path(bin));
    cmd.args(args);
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    let (code, out) = exit_within(cmd, log, Duration::from_secs(20)).await;
    assert_eq!(code, Some(1), "{bin} {}:\n{out}", shown.join(" "));
    assert!(
        out.contains(&format!("{bin}: cannot listen on {addr}: ")),
        "{out}"
    );
}

/// An upstream address nothing in the tests can listen on (port 1 is privileged and unused):
/// connections to it are refused.
pub const DOWN_URL: &str = "http://127.0.0.1:1";

/// The workspace root (for `conf/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Polls until `child` (a `what` process) is ready: `/readyz` on `admin` answers 200 and its
/// main listener `addr` accepts connections. Panics with the process's `log` when it exits
/// first or is not ready within 60 s.
pub async fn wait_ready(what: &str, child: &mut Child, admin: &str, addr: &str, log: &Path) {
    let logs = || std::fs::read_to_string(log).unwrap_or_default();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited early ({st}):\n{}", logs());
        }
        // One probe never outlives the deadline (a stalled accept or answer would hang it).
        let probe = async {
            let ready = crate::http::request(admin, "GET", "/readyz", &[], b"")
                .await
                .map(|r| r.status == 200)
                .unwrap_or(false);
            ready && tokio::net::TcpStream::connect(addr).await.is_ok()
        };
        let left = end.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, probe).await.unwrap_or(false) {
            return;
        }
        if Instant::now() > end {
            panic!("{what} not ready on {addr} in time:\n{}", logs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running `multihub-hub`; killed on drop.
pub struct HubProc {
    child: Child,
    pub addr: String,
    pub port: u16,
    /// Admin listener address.
    pub admin: String,
    log: PathBuf,
    _dir: TempDir,
}

/// Sends a signal (`TERM`, `QUIT`, `HUP`, `KILL`, ...) to a process.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -s {sig} {pid} failed");
}

impl HubProc {
    /// Starts a hub on `port` (admin on a fresh port) with `--routes routes` plus `extra`
    /// arguments and waits until `/readyz` answers 200 (deadline 60 s).
    pub async fn start_on(port: u16, routes: &Path, extra: &[&str]) -> HubProc {
        let mut hub = Self::spawn(port, free_port(), routes, extra);
        hub.wait_ready().await;
        hub
    }

    /// Starts a hub on a fresh port.
    pub async fn start(routes: &Path, extra: &[&str]) -> HubProc {
        Self::start_on(free_port(), routes, extra).await
    }

    /// The value of the first `/metrics` sample line starting with `name_and_labels`
    /// (0 when absent).
    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        let text = crate::http::request(&self.admin, "GET", "/metrics", &[], b"")
            .await
            .map(|r| String::from_utf8_lossy(r.body()).into_owned())
            .unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with(name_and_labels))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Spawns without waiting for readiness.
    pub fn spawn(port: u16, admin_port: u16, routes: &Path, extra: &[&str]) -> HubProc {
        let dir = TempDir::new("hub");
        let log = dir.path().join("hub.log");
        let out = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let err = out.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let addr = format!("127.0.0.1:{port}");
        let admin = format!("127.0.0.1:{admin_port}");
        let mut cmd = Command::new(bin_path("multihub-hub"));
        cmd.arg("--routes")
            .arg(routes)
            .args(["--listen", &addr, "--admin", &admin])
            .args(extra)
            .env("MULTIHUB_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn multihub-hub: {e}"));
        HubProc {
            child,
            addr,
            port,
            admin,
            log,
            _dir: dir,
        }
    }

    /// Polls until ready (see [`wait_ready`]).
    pub async fn wait_ready(&mut self) {
        wait_ready(
            "multihub-hub",
            &mut self.child,
            &self.admin,
            &self.addr,
            &self.log,
        )
        .await;
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Option<i32> {
        let end = Instant::now() + deadline;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    /// Everything the hub wrote so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a binary to completion and returns (exit code, stdout, stderr).
pub fn run_bin(name: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_path(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
