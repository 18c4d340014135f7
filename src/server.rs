//! Builds the Pingora server: the proxy service, the DNS refresher, the optional demo upstream.

use crate::config::Config;
use crate::demo::DemoUpstream;
use crate::observe::ledger::Ledger;
use crate::proxy::EdgeProxy;
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::trace::Tracer;
use crate::upstream::dns::Dns;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use std::sync::Arc;
use std::time::Duration;

/// Process-level switches from the command line.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Take over listeners from a running instance (`-u`).
    pub upgrade: bool,
    /// Detach into the background (`-d`).
    pub daemon: bool,
}

/// A built server, ready to run.
pub struct EdgeServer {
    server: Server,
    state: SharedSnapshot,
}

impl EdgeServer {
    /// Builds every service from a validated config.
    ///
    /// # Panics
    /// When a trace sink cannot be opened; use [`EdgeServer::new`] to handle that error.
    pub fn build(cfg: Config, opts: RunOptions) -> Self {
        match Self::new(cfg, opts) {
            Ok(s) => s,
            Err(e) => panic!("llm-edge failed to start: {e}"),
        }
    }

    /// Builds every service from a validated config; fails when a trace sink cannot be opened.
    pub fn new(cfg: Config, opts: RunOptions) -> Result<Self, String> {
        let tracer = Arc::new(Tracer::start(&cfg.tracing).map_err(|e| format!("tracing: {e}"))?);
        let ledger = match &cfg.usage {
            None => None,
            Some(u) => Some(Arc::new(match &u.ledger {
                Some(p) => Ledger::open(p, u.flush_interval).map_err(|e| format!("usage: {e}"))?,
                None => Ledger::in_memory(),
            })),
        };
        Ok(Self::with_parts(cfg, opts, tracer, ledger))
    }

    /// Builds every service around a given tracer (tests use custom sinks); usage accounting
    /// in memory when the config has a `usage:` section.
    pub fn with_tracer(cfg: Config, opts: RunOptions, tracer: Arc<Tracer>) -> Self {
        let ledger = cfg.usage.as_ref().map(|_| Arc::new(Ledger::in_memory()));
        Self::with_parts(cfg, opts, tracer, ledger)
    }

    fn with_parts(
        cfg: Config,
        opts: RunOptions,
        tracer: Arc<Tracer>,
        ledger: Option<Arc<Ledger>>,
    ) -> Self {
        let conf = ServerConf {
            threads: cfg.server.threads,
            pid_file: cfg.server.pid_file.clone(),
            upgrade_sock: cfg.server.upgrade_sock.clone(),
            grace_period_seconds: Some(cfg.server.grace_period.as_secs()),
            graceful_shutdown_timeout_seconds: Some(5),
            daemon: opts.daemon,
            ..ServerConf::default()
        };
        let opt = Opt {
            upgrade: opts.upgrade,
            daemon: opts.daemon,
            ..Opt::default()
        };
        let mut server = Server::new_with_opt_and_conf(opt, conf);
        server.bootstrap();

        let dns = Arc::new(Dns::new());
        let listen = cfg.listen.clone();
        let demo = cfg.demo_upstream;
        let state: SharedSnapshot = Arc::new(ArcSwap::from_pointee(Snapshot::build(cfg, &dns)));

        let mut proxy = pingora::proxy::http_proxy_service_with_name(
            &server.configuration,
            EdgeProxy::new(state.clone(), tracer.clone(), ledger.clone()),
            "llm-edge proxy",
        );
        for addr in &listen {
            proxy.add_tcp(&addr.to_string());
        }
        server.add_service(proxy);
        server.add_service(background_service(
            "upstream refresher",
            Refresher {
                state: state.clone(),
            },
        ));
        server.add_service(background_service(
            "trace flusher",
            TraceFlusher { tracer, ledger },
        ));
        if let Some(addr) = demo {
            let mut svc = pingora::proxy::http_proxy_service_with_name(
                &server.configuration,
                DemoUpstream,
                "demo upstream",
            );
            svc.add_tcp(&addr.to_string());
            server.add_service(svc);
        }
        Self { server, state }
    }

    /// The shared config snapshot (for reloads and admin views).
    pub fn state(&self) -> SharedSnapshot {
        self.state.clone()
    }

    /// Runs until a shutdown signal (SIGTERM/SIGINT/SIGQUIT by default).
    pub fn run(self, args: RunArgs) {
        self.server.run(args)
    }
}

/// Re-resolves upstream hostnames periodically (first pass at start).
struct Refresher {
    state: SharedSnapshot,
}

#[async_trait]
impl BackgroundService for Refresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let snap = self.state.load_full();
            let mut every = Duration::from_secs(30);
            for up in snap.upstreams.values() {
                if up.needs_dns() {
                    up.refresh().await;
                    every = every.min(up.cfg.dns_refresh);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// On shutdown, waits (bounded) until queued traces are written.
struct TraceFlusher {
    tracer: Arc<Tracer>,
    ledger: Option<Arc<Ledger>>,
}

#[async_trait]
impl BackgroundService for TraceFlusher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let _ = shutdown.changed().await;
        if tokio::time::timeout(Duration::from_secs(10), self.tracer.flush())
            .await
            .is_err()
        {
            tracing::warn!("trace queue not drained within 10 s of shutdown");
        }
        if let Some(l) = &self.ledger {
            if let Err(e) = l.flush() {
                tracing::error!("saving the usage ledger at shutdown failed: {e}");
            }
        }
    }
}
