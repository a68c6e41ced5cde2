//! `multihub`: `up` runs the topology of `conf/`, `demo` drives it.

use clap::{Parser, Subcommand};
use multihub_launcher::{demo, up};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "multihub",
    version,
    about = "Run and demonstrate the multihub topology of conf/"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start hubs, providers, the association and the outcome sink from conf/; Ctrl-C stops all.
    Up {
        #[arg(long, default_value = "conf")]
        conf: PathBuf,
        #[arg(long, default_value = "state")]
        state: PathBuf,
        /// Directory of the multihub-* binaries (default: beside this one).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Send a passing, a blocked and an escalating operation through a running `multihub up`.
    Demo {
        #[arg(long, default_value = "conf")]
        conf: PathBuf,
        #[arg(long, default_value = "state")]
        state: PathBuf,
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Seconds to wait for each operation's signals and receipts.
        #[arg(long, default_value_t = 10)]
        wait: u64,
    },
}

fn default_bin_dir(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.to_path_buf()))
            .unwrap_or_else(|| PathBuf::from("."))
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let r = match Cli::parse().cmd {
        Cmd::Up {
            conf,
            state,
            bin_dir,
        } => up::run(up::UpOpts {
            conf,
            state,
            bin_dir: default_bin_dir(bin_dir),
        })
        .await
        .map(|()| true),
        Cmd::Demo {
            conf,
            state,
            bin_dir,
            wait,
        } => {
            demo::run(demo::DemoOpts {
                conf,
                state,
                bin_dir: default_bin_dir(bin_dir),
                wait: Duration::from_secs(wait),
            })
            .await
        }
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("multihub: {e}");
            ExitCode::from(1)
        }
    }
}
