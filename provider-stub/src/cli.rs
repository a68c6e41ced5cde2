//! The command line of `multihub-provider`.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "multihub-provider",
    about = "multihub reference provider",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Provider config file (JSON).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Validate the config (and the policy and delegation files it names), print a summary, exit.
    #[arg(long)]
    pub validate: bool,
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Write a new ed25519 key file (mode 0600); print the key id and the public key.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify a store: audit chain, signatures, receipts re-run under their policy, ledger.
    Verify {
        #[arg(long)]
        store: PathBuf,
    },
    /// Run one intent through the decision and print the receipt body bytes.
    Replay(ReplayCli),
}

#[derive(Debug, Args)]
pub struct ReplayCli {
    /// The exact request body (its sha256 is the request repr).
    #[arg(long)]
    pub intent: PathBuf,
    /// Delegation id (omit for an anonymous request).
    #[arg(long)]
    pub delegation: Option<String>,
    /// Policy file.
    #[arg(long)]
    pub policy: PathBuf,
    /// Delegation registry file (without it every delegation is unknown).
    #[arg(long)]
    pub delegations: Option<PathBuf>,
    #[arg(long, default_value = "provider")]
    pub provider: String,
    #[arg(long, default_value = "replay")]
    pub request_id: String,
    /// Treat the delegation as revoked.
    #[arg(long)]
    pub revoked: bool,
    /// Operator decision for an escalating intent: approve or deny.
    #[arg(long, requires = "operator")]
    pub decision: Option<String>,
    #[arg(long)]
    pub operator: Option<String>,
}
