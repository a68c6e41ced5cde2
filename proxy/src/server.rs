//! Validating a table, and building and running the Pingora server.

use arc_swap::ArcSwap;
use multihub_filters::source::{self, Loaded};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server};
use std::io::Write;
use std::sync::Arc;
use tokio::sync::Semaphore;

use crate::cli::Cli;
use crate::deliver::Deliverer;
use crate::hub::Hub;
use crate::state::{Engine, HubTable, Stats};
use crate::HubError;

/// Writes the summary `--validate` prints for a valid table: the version, then one line per route.
pub fn describe(loaded: &Loaded, out: &mut impl Write) -> std::io::Result<()> {
    let t = &loaded.table;
    writeln!(
        out,
        "ok: version {} ({}, sha256 {})",
        t.version,
        loaded.file.display(),
        loaded.sha256
    )?;
    for r in &t.routes {
        let names = |ids: &[usize]| {
            ids.iter()
                .filter_map(|i| t.upstream(*i).map(|u| u.id.as_str()))
                .collect::<Vec<_>>()
                .join(",")
        };
        let methods = if r.methods.is_empty() {
            "*".to_string()
        } else {
            r.methods
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        writeln!(
            out,
            "route {} {} {} -> [{}] relay [{}] respond={:?} delivery={:?} order={:?}",
            r.id,
            methods,
            r.path_prefix,
            names(&r.targets),
            names(&r.relay),
            r.respond,
            r.delivery,
            r.order
        )?;
    }
    Ok(())
}

/// Loads and validates the table named on the command line.
pub fn load(cli: &Cli) -> Result<Loaded, HubError> {
    Ok(source::load(&cli.routes)?)
}

/// Builds the server and runs it until a shutdown signal (SIGTERM graceful, SIGINT fast).
pub fn run(cli: &Cli, loaded: Loaded) -> Result<(), HubError> {
    if cli.threads == 0 {
        return Err(HubError::Usage("--threads must be at least 1".into()));
    }
    let max_in_flight = loaded.table.hub.max_in_flight;
    let outcome_queue = loaded.table.hub.outcome_queue;
    let conf = ServerConf {
        threads: cli.threads,
        grace_period_seconds: Some(cli.grace_period),
        graceful_shutdown_timeout_seconds: Some(cli.grace_period.max(1)),
        upstream_keepalive_pool_size: 1024,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();

    let tables = Arc::new(ArcSwap::from_pointee(HubTable::new(loaded)));
    let engine = Arc::new(Engine {
        deliverer: Deliverer::new(1024),
        in_flight: Arc::new(Semaphore::new(max_in_flight)),
        outcome_slots: Arc::new(Semaphore::new(outcome_queue)),
        stats: Stats::default(),
    });
    let hub = Hub::new(tables, engine);
    let mut svc = pingora_proxy::http_proxy_service(&server.configuration, hub);
    svc.threads = Some(cli.threads);
    svc.add_tcp(&cli.listen);
    server.add_service(svc);
    log::info!("multihub-hub listening on {}", cli.listen);
    server.run(RunArgs::default());
    Ok(())
}
