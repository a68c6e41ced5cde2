//! Command line of `multihub-hub`.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// multihub hub: routes operation requests to providers and peer hubs by a versioned table.
#[derive(Debug, Parser)]
#[command(name = "multihub-hub", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunOpts,
}

/// Options of the hub itself (no subcommand).
#[derive(Debug, Args)]
pub struct RunOpts {
    /// Routing table: a JSON file, or a directory of `<version>.json` files with an `active` pointer.
    #[arg(long, value_name = "FILE|DIR")]
    pub routes: Option<PathBuf>,
    /// Address of the proxy listener.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: String,
    /// Address of the admin listener (/metrics, /healthz, /readyz, /routes); keep it private.
    #[arg(long, default_value = "127.0.0.1:9180", value_name = "ADDR")]
    pub admin: String,
    /// Worker threads of the proxy service.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Seconds a graceful shutdown (SIGTERM, or SIGQUIT on upgrade) waits for in-flight
    /// requests and background deliveries before exiting.
    #[arg(long, default_value_t = 10)]
    pub grace_period: u64,
    /// Access log: `stdout`, `off`, or a file path (appended).
    #[arg(long, default_value = "stdout", value_name = "stdout|off|PATH")]
    pub access_log: String,
    /// Take over the listening sockets of a running hub (zero-downtime upgrade): start the new
    /// binary with `--upgrade`, then send SIGQUIT to the old process.
    #[arg(long, short = 'u')]
    pub upgrade: bool,
    /// Unix socket used to hand listeners over on upgrade; old and new process must agree.
    /// Default: /tmp/multihub-hub-<listen>.sock.
    #[arg(long, value_name = "PATH")]
    pub upgrade_sock: Option<String>,
    /// Validate the routing table, print it, and exit (0 valid, 1 invalid). Opens no listener.
    #[arg(long)]
    pub validate: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the versions of a routes directory.
    Routes {
        #[command(subcommand)]
        action: RoutesCmd,
    },
}

#[derive(Debug, Subcommand)]
pub enum RoutesCmd {
    /// Atomically point `active` at a version (after validating it). Rollback = activate the old one.
    Activate {
        #[arg(long, value_name = "DIR")]
        routes: PathBuf,
        version: String,
        /// Activate without validating (the running hub still refuses an invalid table).
        #[arg(long)]
        force: bool,
    },
    /// List the versions of a routes directory, which one is active and whether each validates.
    List {
        #[arg(long, value_name = "DIR")]
        routes: PathBuf,
    },
}

impl RunOpts {
    /// The upgrade socket path for this listen address.
    pub fn upgrade_sock(&self) -> String {
        self.upgrade_sock.clone().unwrap_or_else(|| {
            let tag: String = self
                .listen
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            format!("/tmp/multihub-hub-{tag}.sock")
        })
    }
}
