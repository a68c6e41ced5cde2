//! Command line of `multihub-hub`.

use clap::Parser;
use std::path::PathBuf;

/// multihub hub: routes operation requests to providers and peer hubs by a versioned table.
#[derive(Debug, Parser)]
#[command(name = "multihub-hub", version)]
pub struct Cli {
    /// Routing table: a JSON file, or a directory of `<version>.json` files with an `active` pointer.
    #[arg(long, value_name = "FILE|DIR")]
    pub routes: PathBuf,
    /// Address of the proxy listener.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: String,
    /// Worker threads of the proxy service.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Seconds a graceful shutdown waits for in-flight requests before stopping.
    #[arg(long, default_value_t = 10)]
    pub grace_period: u64,
    /// Validate the routing table, print it, and exit (0 valid, 1 invalid). Opens no listener.
    #[arg(long)]
    pub validate: bool,
}
