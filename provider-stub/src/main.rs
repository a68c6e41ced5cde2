//! `multihub-provider`: parse the command line, load and validate the config, then run; or one of
//! the tools (`keygen`, `verify`, `replay`).

use clap::Parser;
use multihub_protocol::receipt::EscalationDecision;
use multihub_provider::cli::{Cli, Cmd};
use multihub_provider::{config, keys, server, verify};
use std::io::Write;
use std::process::ExitCode;

/// mimalloc instead of glibc malloc: request handling allocates and frees many small buffers on
/// several threads; glibc's malloc/free (incl. `malloc_consolidate`) was ~15% of the ingest
/// threads' CPU in the profile (same choice as the hub).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("multihub-provider: {msg}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    multihub_protocol::logging::init();
    match cli.cmd {
        Some(Cmd::Keygen { out }) => match keys::generate(&out) {
            Ok(k) => {
                let vk = k.verifying_key();
                println!("key_id {}", multihub_protocol::signal::key_id(&vk));
                println!("public_key {}", keys::hex(vk.as_bytes()));
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Some(Cmd::Verify { store }) => match verify::verify_store(&store) {
            Ok(Ok(v)) => {
                println!(
                    "ok: {} receipts, chain verified (tip {}), signatures valid, every receipt re-derived, {} ledger accounts match",
                    v.receipts, v.tip, v.accounts
                );
                ExitCode::SUCCESS
            }
            Ok(Err(b)) => {
                println!("{b}");
                ExitCode::from(1)
            }
            Err(e) => fail(e),
        },
        Some(Cmd::Replay(r)) => {
            let decision = match (r.decision, r.operator) {
                (Some(decision), Some(operator)) => Some(EscalationDecision { decision, operator }),
                _ => None,
            };
            let args = verify::ReplayArgs {
                intent: &r.intent,
                delegation: r.delegation.as_deref(),
                policy: &r.policy,
                delegations: r.delegations.as_deref(),
                provider: &r.provider,
                request_id: &r.request_id,
                revoked: r.revoked,
                decision,
            };
            match verify::replay(&args) {
                Ok(bytes) => {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&bytes).and_then(|()| out.write_all(b"\n"));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        None => {
            let Some(path) = cli.config else {
                return fail(
                    "--config <file> is required (or a subcommand: keygen, verify, replay)",
                );
            };
            let cfg = match config::load(&path) {
                Ok(c) => c,
                Err(p) => {
                    eprintln!("invalid provider config {}:", path.display());
                    for m in &p.0 {
                        eprintln!("  {m}");
                    }
                    return ExitCode::from(1);
                }
            };
            if cli.validate {
                println!(
                    "ok: provider {} listen {} admin {} policy {}@{} (sha256 {}) delegations {} association {}",
                    cfg.provider,
                    cfg.listen,
                    cfg.admin_listen,
                    cfg.policy.reference.id,
                    cfg.policy.reference.version,
                    cfg.policy.reference.sha256,
                    cfg.delegations.delegations.len(),
                    cfg.association.authority
                );
                return ExitCode::SUCCESS;
            }
            match server::run(&cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
    }
}
