//! Validating a table, and building and running the Pingora server: the proxy listener, the
//! admin listener, the table reloader and the lifecycle (readiness, graceful drain).

use arc_swap::ArcSwap;
use multihub_filters::source::{self, Loaded};
use pingora_core::apps::http_app::HttpServer;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server};
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::access::AccessLog;
use crate::admin::Admin;
use crate::cli::RunOpts;
use crate::hub::Hub;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::state::{Engine, HubTable};
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

/// Loads and validates a table.
pub fn load(routes: &Path) -> Result<Loaded, HubError> {
    Ok(source::load(routes)?)
}

/// Builds the server and runs it until shutdown (SIGTERM graceful, SIGINT fast, SIGQUIT upgrade).
pub fn run(opts: &RunOpts, routes: &Path, loaded: Loaded) -> Result<(), HubError> {
    if opts.threads == 0 {
        return Err(HubError::Usage("--threads must be at least 1".into()));
    }
    if !opts.upgrade {
        // (An upgrade takes over the running hub's listeners instead of binding.)
        multihub_protocol::net::check_listen(&[&opts.listen, &opts.admin])?;
    }
    let access_log = match opts.access_log.as_str() {
        "off" => None,
        target => {
            Some(Arc::new(AccessLog::open(target).map_err(|e| {
                HubError::Usage(format!("--access-log {target}: {e}"))
            })?))
        }
    };
    let metrics = Metrics::new().map_err(|e| HubError::Server(format!("metrics: {e}")))?;
    let engine = Arc::new(Engine::new(
        metrics,
        loaded.table.hub.max_in_flight,
        loaded.table.hub.outcome_queue,
    ));
    let version = loaded.table.version.clone();
    let tables = Arc::new(ArcSwap::from_pointee(HubTable::new(
        loaded,
        &engine.metrics,
    )));
    crate::reload::activated(&engine.metrics, &version);

    let conf = ServerConf {
        threads: opts.threads,
        // One thread: a current-thread runtime (no work-stealing machinery on every wake-up).
        // More: work stealing, so pooled upstream connections serve every thread alike.
        work_stealing: opts.threads > 1,
        // Our lifecycle service exits as soon as the drain completes; Pingora's fixed grace
        // sleep is only the backstop.
        grace_period_seconds: Some(opts.grace_period + 1),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: opts.upgrade_sock(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: opts.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let hub = Hub::new(tables.clone(), engine.clone(), access_log.clone());
    // Behind the readiness proof: the lifecycle's probe must arrive at this listener.
    let hub = multihub_protocol::net::Probed {
        app: Arc::new(hub),
        listener: engine.listener.clone(),
    };
    let mut svc = Service::new("multihub proxy".to_string(), hub);
    svc.threads = Some(opts.threads);
    svc.add_tcp(&opts.listen);
    server.add_service(svc);

    let mut admin = Service::new(
        "multihub admin".to_string(),
        HttpServer::new_app(Admin {
            tables: tables.clone(),
            engine: engine.clone(),
        }),
    );
    admin.threads = Some(1);
    admin.add_tcp(&opts.admin);
    server.add_service(admin);

    server.add_service(background_service(
        "routing table reloader",
        Reloader {
            routes: routes.to_path_buf(),
            tables,
            engine: engine.clone(),
        },
    ));
    server.add_service(background_service(
        "lifecycle",
        Lifecycle {
            engine,
            listen: opts.listen.clone(),
            grace: Duration::from_secs(opts.grace_period),
            access_log,
        },
    ));
    log::info!(
        "multihub-hub {version}: proxy {} admin {}",
        opts.listen,
        opts.admin
    );
    server.run(RunArgs::default());
    Ok(())
}
