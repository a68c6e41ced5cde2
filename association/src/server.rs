//! Building and running the Pingora server: the API listener and the admin listener.

use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server};
use pingora_core::services::listening::Service;
use std::io::Write;
use std::sync::Arc;

use crate::api::{Admin, Api};
use crate::config::{Config, SignatureCheck};
use crate::core::Core;
use crate::error::AssociationError;
use crate::metrics::Metrics;
use multihub_protocol::net::{Probed, ProveUp};

/// The summary `--validate` prints for a valid configuration.
pub fn describe(c: &Config, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "ok: version {} listen {} admin {} store {}",
        c.version,
        c.listen,
        c.admin_listen,
        c.store_path.display()
    )?;
    for p in &c.providers {
        let ids: Vec<&str> = p.keys.iter().map(|k| k.key_id()).collect();
        writeln!(out, "provider {} keys [{}]", p.id, ids.join(","))?;
    }
    let check = match c.signature_check {
        SignatureCheck::Strict => "strict",
        SignatureCheck::Batch => "batch",
    };
    writeln!(out, "signature check {check}")?;
    writeln!(out, "policy default {}", c.policies.default.to_json())?;
    let mut routes: Vec<_> = c.policies.routes.iter().collect();
    routes.sort_by(|a, b| a.0.cmp(b.0));
    for (r, p) in routes {
        writeln!(out, "policy route:{r} {}", p.to_json())?;
    }
    Ok(())
}

/// Opens the store, starts the writer and runs both listeners until a shutdown signal
/// (SIGTERM graceful, SIGINT fast). Does not return on success: Pingora exits the process.
pub fn run(config: Config) -> Result<(), AssociationError> {
    let threads = config.threads;
    let listen = config.listen.to_string();
    let api_addr = config.listen;
    let admin_listen = config.admin_listen.to_string();
    // Before the store is opened: a service that cannot listen exits at once.
    multihub_protocol::net::check_listen(&[&listen, &admin_listen])?;
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(2),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new(&config)?);
    let core = Arc::new(Core::start(config, metrics)?);

    let api = Probed {
        app: Arc::new(Api { core: core.clone() }),
        listener: core.api_listener.clone(),
    };
    let mut api = Service::new("association api".into(), api);
    api.threads = Some(threads);
    api.add_tcp(&listen);
    let mut admin = Service::new(
        "association admin".into(),
        Admin::new(core.clone(), api_addr),
    );
    admin.threads = Some(1);
    admin.add_tcp(&admin_listen);
    server.add_service(api);
    server.add_service(admin);
    server.add_service(pingora_core::services::background::background_service(
        "api readiness",
        ProveUp {
            listener: core.api_listener.clone(),
            addr: Some(multihub_protocol::net::probe_addr(api_addr)),
        },
    ));
    log::info!("multihub-association listening on {listen}, admin on {admin_listen}");
    server.run(RunArgs::default());
    Ok(())
}
