//! `multihub up`: generate provider keys on first start, derive the association config from its
//! template with those keys, start every component on loopback, wait for every `/readyz`, print
//! the endpoints, supervise, and stop everything cleanly on Ctrl-C.

use ed25519_dalek::SigningKey;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::request;
use crate::topology::Topology;
use crate::LaunchError;

/// Options of `multihub up`.
#[derive(Debug, Clone)]
pub struct UpOpts {
    pub conf: PathBuf,
    pub state: PathBuf,
    /// Where the `multihub-*` binaries are (default: beside this one).
    pub bin_dir: PathBuf,
}

/// One supervised process.
pub struct Component {
    pub name: String,
    pub kind: &'static str,
    pub url: String,
    pub admin: String,
    pub child: Child,
    pub log: PathBuf,
}

/// Hex of the ed25519 public key of a key file (64 hex chars of the secret seed).
pub fn public_key_hex(key_file: &Path) -> Result<String, LaunchError> {
    let text = std::fs::read_to_string(key_file)?;
    let t = text.trim();
    let seed = multihub_protocol::hashing::unhex32(t).ok_or_else(|| {
        LaunchError::Failed(format!(
            "{}: expected 64 hex characters",
            key_file.display()
        ))
    })?;
    let vk = SigningKey::from_bytes(&seed).verifying_key();
    let mut s = String::with_capacity(64);
    multihub_protocol::hashing::hex_into(&mut s, vk.as_bytes());
    Ok(s)
}

fn bin(opts: &UpOpts, name: &str) -> PathBuf {
    opts.bin_dir.join(name)
}

/// Writes `state/association.json`: the template with each provider's current public key and the
/// store inside the state directory.
pub fn association_config(
    topo: &Topology,
    root: &Path,
    state: &Path,
) -> Result<PathBuf, LaunchError> {
    let bytes = std::fs::read(&topo.association.template)?;
    let mut v: Value =
        serde_json::from_slice(&bytes).map_err(|e| LaunchError::Failed(e.to_string()))?;
    let mut providers = serde_json::Map::new();
    for p in &topo.providers {
        let key = public_key_hex(&root.join(&p.key_file))?;
        providers.insert(p.id.clone(), json!({ "keys": [{ "public_key": key }] }));
    }
    v["providers"] = Value::Object(providers);
    let store = std::path::absolute(state.join("association.db"))?;
    v["store"]["path"] = Value::String(store.display().to_string());
    let out = state.join("association.json");
    std::fs::write(
        &out,
        serde_json::to_vec_pretty(&v).map_err(|e| LaunchError::Failed(e.to_string()))?,
    )?;
    Ok(out)
}

/// Generates a provider key with `multihub-provider keygen` when its file does not exist.
pub fn ensure_key(opts: &UpOpts, root: &Path, key_file: &Path) -> Result<(), LaunchError> {
    let path = root.join(key_file);
    if path.exists() {
        return Ok(());
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let st = Command::new(bin(opts, "multihub-provider"))
        .args(["keygen", "--out"])
        .arg(&path)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        return Err(LaunchError::Failed(format!(
            "keygen for {} failed",
            path.display()
        )));
    }
    Ok(())
}

fn spawn(
    opts: &UpOpts,
    root: &Path,
    name: &str,
    program: &str,
    args: &[String],
) -> Result<(Child, PathBuf), LaunchError> {
    let log = opts.state.join("logs").join(format!("{name}.log"));
    let out = std::fs::File::create(&log)?;
    let err = out.try_clone()?;
    let child = Command::new(bin(opts, program))
        .args(args)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| {
            LaunchError::Failed(format!(
                "cannot start {program}: {e} (build with `cargo build --release --bins`)"
            ))
        })?;
    Ok((child, log))
}

/// Fails unless every address of `topo` (components and outcome sink) is free: a component
/// that finds its address taken exits, but polling that address's `/readyz` could reach
/// whoever holds it (an earlier `up` still running) and take it for the new component.
fn check_addresses(opts: &UpOpts, topo: &Topology) -> Result<(), LaunchError> {
    let mut addrs = vec![
        topo.association.listen.as_str(),
        topo.association.admin.as_str(),
    ];
    for p in &topo.providers {
        addrs.extend([p.listen.as_str(), p.admin.as_str()]);
    }
    for h in &topo.hubs {
        addrs.extend([h.listen.as_str(), h.admin.as_str()]);
    }
    if let Some((sink, _)) = &topo.sink {
        addrs.push(sink.as_str());
    }
    multihub_protocol::net::check_listen(&addrs).map_err(|e| {
        LaunchError::Failed(format!(
            "{e}; is an earlier `multihub up` still running? Stop it, or change the addresses in {}",
            opts.conf.display()
        ))
    })
}

/// Starts every component (association, providers, hubs) of `topo` and waits for each `/readyz`.
pub async fn start(opts: &UpOpts, topo: &Topology) -> Result<Vec<Component>, LaunchError> {
    let root = opts
        .conf
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let root = if root.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        root
    };
    std::fs::create_dir_all(opts.state.join("logs"))?;
    for p in &topo.providers {
        ensure_key(opts, &root, &p.key_file)?;
    }
    let assoc_conf = association_config(topo, &root, &opts.state)?;

    let mut comps = Vec::new();
    let a = &topo.association;
    let (child, log) = spawn(
        opts,
        &root,
        "association",
        "multihub-association",
        &["--config".into(), assoc_conf.display().to_string()],
    )?;
    comps.push(Component {
        name: "association".into(),
        kind: "association",
        url: format!("http://{}", a.listen),
        admin: a.admin.clone(),
        child,
        log,
    });
    for p in &topo.providers {
        let (child, log) = spawn(
            opts,
            &root,
            &p.id,
            "multihub-provider",
            &["--config".into(), p.config.display().to_string()],
        )?;
        comps.push(Component {
            name: p.id.clone(),
            kind: "provider",
            url: format!("http://{}", p.listen),
            admin: p.admin.clone(),
            child,
            log,
        });
    }
    for h in &topo.hubs {
        let args = vec![
            "--routes".into(),
            h.routes.display().to_string(),
            "--listen".into(),
            h.listen.clone(),
            "--admin".into(),
            h.admin.clone(),
            "--access-log".into(),
            opts.state
                .join("logs")
                .join(format!("{}.access.log", h.id))
                .display()
                .to_string(),
        ];
        let (child, log) = spawn(opts, &root, &h.id, "multihub-hub", &args)?;
        comps.push(Component {
            name: h.id.clone(),
            kind: "hub",
            url: format!("http://{}", h.listen),
            admin: h.admin.clone(),
            child,
            log,
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for c in comps.iter_mut() {
        loop {
            if let Ok(Some(st)) = c.child.try_wait() {
                let tail = std::fs::read_to_string(&c.log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(15).collect();
                return Err(LaunchError::Failed(format!(
                    "{} exited ({st}) before it was ready; its log ({}):\n{}",
                    c.name,
                    c.log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )));
            }
            let ok = request(&c.admin, "GET", "/readyz", &[], b"", Duration::from_secs(1))
                .await
                .map(|r| r.status == 200)
                .unwrap_or(false);
            if ok {
                break;
            }
            if Instant::now() > deadline {
                return Err(LaunchError::Failed(format!(
                    "{} not ready after 60 s (log: {})",
                    c.name,
                    c.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(comps)
}

/// SIGTERM to every component (hubs first), then wait; SIGKILL what is still running after 15 s.
pub fn stop(comps: &mut [Component]) {
    for c in comps.iter().rev() {
        let _ = Command::new("kill")
            .args(["-s", "TERM", &c.child.id().to_string()])
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for c in comps.iter_mut().rev() {
        loop {
            match c.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = c.child.kill();
                    let _ = c.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// `multihub up`: runs until Ctrl-C.
pub async fn run(opts: UpOpts) -> Result<(), LaunchError> {
    let topo = Topology::load(&opts.conf)?;
    // Before anything is made or started.
    check_addresses(&opts, &topo)?;
    std::fs::create_dir_all(opts.state.join("logs"))?;
    let outcomes = opts.state.join("outcomes.jsonl");
    let sink = match &topo.sink {
        Some((addr, _)) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| LaunchError::Failed(format!("outcome sink {addr}: {e}")))?;
            Some(tokio::spawn(crate::sink::run(l, outcomes.clone())))
        }
        None => None,
    };
    let mut comps = start(&opts, &topo).await?;
    println!(
        "multihub is up (state in {}, logs in {}/logs):\n",
        opts.state.display(),
        opts.state.display()
    );
    println!(
        "  {:<12} {:<12} {:<24} {:<24}",
        "component", "kind", "url", "admin"
    );
    for c in &comps {
        println!(
            "  {:<12} {:<12} {:<24} {:<24}",
            c.name,
            c.kind,
            c.url,
            format!("http://{}", c.admin)
        );
    }
    if let Some((addr, path)) = &topo.sink {
        println!(
            "  {:<12} {:<12} {:<24} {}",
            "sink",
            "outcomes",
            format!("http://{addr}{path}"),
            outcomes.display()
        );
    }
    let hub = &topo.hubs[0].listen;
    println!("\nTry:\n  curl -si -X POST http://{hub}/v1/payments -H 'x-delegation-id: deleg-ops' \\\n       -H 'content-type: application/json' -d '{{\"op\":\"transfer\",\"target\":\"acct-1\",\"amount\":50}}'");
    println!("  target/release/multihub demo        # a guided tour: pass, block, escalate\n\nCtrl-C stops everything.");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                for c in comps.iter_mut() {
                    if let Ok(Some(st)) = c.child.try_wait() {
                        eprintln!("{} exited ({st}); see {}", c.name, c.log.display());
                    }
                }
                if comps.iter_mut().all(|c| matches!(c.child.try_wait(), Ok(Some(_)))) {
                    break;
                }
            }
        }
    }
    println!("\nstopping ...");
    stop(&mut comps);
    if let Some(s) = sink {
        s.abort();
    }
    for c in &mut comps {
        let st = c
            .child
            .try_wait()
            .ok()
            .flatten()
            .map(|s| s.to_string())
            .unwrap_or_else(|| "killed".into());
        println!("  {:<12} {st}", c.name);
    }
    Ok(())
}
