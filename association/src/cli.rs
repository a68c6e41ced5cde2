//! The command line.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// multihub association: verified, durable boundary signals, deterministic linkage,
/// exactly-once confirmation.
#[derive(Debug, Parser)]
#[command(
    name = "multihub-association",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Configuration file (JSON).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print a summary and exit (0 valid, 1 invalid).
    #[arg(long)]
    pub validate: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Re-verify every stored signal and recompute every linkage and confirmation; exit 1 on
    /// any mismatch.
    Verify {
        /// The SQLite store file.
        #[arg(long)]
        store: PathBuf,
        /// The configuration whose provider keys and policies to check against.
        #[arg(long)]
        config: PathBuf,
    },
}
