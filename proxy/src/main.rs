//! `multihub-hub`: parse the command line, load and validate the table, then run or report.

use clap::Parser;
use multihub_proxy::cli::{Cli, Command, RoutesCmd};
use multihub_proxy::{reload, server, HubError};
use std::process::ExitCode;

/// mimalloc instead of glibc malloc: the hub allocates and frees small buffers per request on
/// several threads; glibc's malloc/free showed ~12% of the hub's CPU in the profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    multihub_protocol::logging::init();
    match cli.command {
        Some(Command::Routes { action }) => {
            let r = match action {
                RoutesCmd::Activate {
                    routes,
                    version,
                    force,
                } => reload::activate(&routes, &version, force).map(|()| {
                    println!("activated {version} in {}", routes.display());
                }),
                RoutesCmd::List { routes } => reload::list(&routes, &mut std::io::stdout().lock()),
            };
            return match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("multihub-hub routes: {e}");
                    ExitCode::from(1)
                }
            };
        }
        None => {}
    }
    let Some(routes) = cli.run.routes.clone() else {
        eprintln!("multihub-hub: --routes <FILE|DIR> is required (see --help)");
        return ExitCode::from(2);
    };
    let loaded = match server::load(&routes) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("invalid routing table {}:", routes.display());
            if let HubError::Config(c) = &e {
                for p in c.problems() {
                    eprintln!("  {p}");
                }
            } else {
                eprintln!("  {e}");
            }
            return ExitCode::from(1);
        }
    };
    if cli.run.validate {
        let mut out = std::io::stdout().lock();
        return match server::describe(&loaded, &mut out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(1),
        };
    }
    match server::run(&cli.run, &routes, loaded) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("multihub-hub: {e}");
            ExitCode::from(1)
        }
    }
}
