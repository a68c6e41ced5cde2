//! `multihub-association`: parse the command line, load and validate the configuration, then
//! run, report (`--validate`) or check a store (`verify`).

use clap::{CommandFactory, Parser};
use multihub_association::cli::{Cli, Command};
use multihub_association::{config, server, store, verify};
use std::path::Path;
use std::process::ExitCode;

/// mimalloc instead of glibc malloc: request handling allocates and frees many small buffers on
/// several threads; glibc's malloc/free (incl. `malloc_consolidate`) was ~15% of the ingest
/// threads' CPU in the profile (same choice as the hub).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn load(path: &Path) -> Option<config::Config> {
    match config::load(path) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("invalid configuration {}:", path.display());
            for p in &e.0 {
                eprintln!("  {p}");
            }
            None
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    multihub_protocol::logging::init();
    if let Some(Command::Verify { store, config }) = &cli.command {
        let Some(c) = load(config) else {
            return ExitCode::from(1);
        };
        let mut s = match store::SqliteStore::open_read_only(store) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot open store {}: {e}", store.display());
                return ExitCode::from(1);
            }
        };
        return match verify::verify(&mut s, &c) {
            Ok(r) => {
                for p in &r.problems {
                    println!("MISMATCH {p}");
                }
                println!(
                    "{}: {} signals, {} operations, {} confirmations checked",
                    if r.ok() { "ok" } else { "FAILED" },
                    r.signals,
                    r.operations,
                    r.confirmations
                );
                if r.ok() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("verify: {e}");
                ExitCode::from(1)
            }
        };
    }
    let Some(path) = &cli.config else {
        let _ = Cli::command().print_help();
        return ExitCode::from(2);
    };
    let Some(c) = load(path) else {
        return ExitCode::from(1);
    };
    if cli.validate {
        let mut out = std::io::stdout().lock();
        return match server::describe(&c, &mut out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(1),
        };
    }
    match server::run(c) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("multihub-association: {e}");
            ExitCode::from(1)
        }
    }
}
