//! `multihub-hub`: parse the command line, load and validate the table, then run or report.

use clap::Parser;
use multihub_proxy::{cli::Cli, logger, server};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    logger::init();
    let loaded = match server::load(&cli) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("invalid routing table {}:", cli.routes.display());
            if let multihub_proxy::HubError::Config(c) = &e {
                for p in c.problems() {
                    eprintln!("  {p}");
                }
            } else {
                eprintln!("  {e}");
            }
            return ExitCode::from(1);
        }
    };
    if cli.validate {
        let mut out = std::io::stdout().lock();
        return match server::describe(&loaded, &mut out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(1),
        };
    }
    match server::run(&cli, loaded) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("multihub-hub: {e}");
            ExitCode::from(1)
        }
    }
}
