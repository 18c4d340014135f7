//! Builds the Pingora server: the proxy service, the admin listener, the DNS refresher, health
//! checks, signal handling, the shutdown drain, and the optional demo upstream.

use crate::admin::AdminService;
use crate::config::Config;
use crate::demo::DemoUpstream;
use crate::observe::ledger::Ledger;
use crate::proxy::front::EdgeApp;
use crate::proxy::EdgeProxy;
use crate::runtime::Runtime;
use crate::snapshot::SharedSnapshot;
use crate::trace::Tracer;
use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Process-level switches from the command line.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Take over listeners from a running instance (`-u`).
    pub upgrade: bool,
    /// Detach into the background (`-d`).
    pub daemon: bool,
    /// The config file, re-read on reload (SIGHUP, `POST /admin/reload`).
    pub config_path: Option<PathBuf>,
    /// Handle SIGHUP (reload) and SIGUSR1 (reopen the access log), and exit as soon as open
    /// requests are done after SIGTERM. Only for a real process: tests run several servers in
    /// one process.
    pub process_signals: bool,
}

/// A built server, ready to run.
pub struct EdgeServer {
    server: Server,
    rt: Arc<Runtime>,
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
        let access_log = crate::runtime::open_access_log(cfg.access_log.as_ref())
            .map_err(|e| format!("access_log: {e}"))?;
        Ok(Self::with_parts(cfg, opts, tracer, ledger, access_log))
    }

    /// Builds every service around a given tracer (tests use custom sinks); usage accounting
    /// in memory when the config has a `usage:` section.
    pub fn with_tracer(cfg: Config, opts: RunOptions, tracer: Arc<Tracer>) -> Self {
        let ledger = cfg.usage.as_ref().map(|_| Arc::new(Ledger::in_memory()));
        let access_log = match crate::runtime::open_access_log(cfg.access_log.as_ref()) {
            Ok(a) => a,
            Err(e) => panic!("access_log: {e}"),
        };
        Self::with_parts(cfg, opts, tracer, ledger, access_log)
    }

    fn with_parts(
        cfg: Config,
        opts: RunOptions,
        tracer: Arc<Tracer>,
        ledger: Option<Arc<Ledger>>,
        access_log: crate::observe::access_log::AccessLog,
    ) -> Self {
        let grace = cfg.server.grace_period;
        let conf = ServerConf {
            threads: cfg.server.threads,
            work_stealing: cfg.server.work_stealing,
            pid_file: cfg.server.pid_file.clone(),
            upgrade_sock: cfg.server.upgrade_sock.clone(),
            // Pingora sleeps this long after SIGTERM; the drain service below exits earlier
            // when nothing is in flight.
            grace_period_seconds: Some(grace.as_secs()),
            graceful_shutdown_timeout_seconds: Some(1),
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

        for w in &cfg.warnings {
            tracing::warn!("config: {w}");
        }
        let listen = cfg.listen.clone();
        let mut certs = Vec::new();
        for l in &listen {
            let cert = match &l.tls {
                Some(files) => match crate::listeners::ReloadableCert::load(files) {
                    Ok(c) => Some(c),
                    Err(e) => panic!("listener {}: {e}", l.addr),
                },
                None => None,
            };
            certs.push(cert);
        }
        let admin_addr = cfg.admin.listen;
        let demo = cfg.demo_upstream;
        let rt = Runtime::new(
            cfg,
            tracer.clone(),
            ledger.clone(),
            opts.config_path.clone(),
            access_log,
            certs.iter().flatten().cloned().collect(),
        );

        let edge = EdgeProxy::new(rt.clone());
        let pingora_proxy = pingora::proxy::http_proxy(&server.configuration, edge.clone());
        let mut proxy = pingora::services::listening::Service::new(
            "llm-edge proxy".to_string(),
            EdgeApp::new(edge, pingora_proxy),
        );
        for (l, cert) in listen.iter().zip(certs) {
            crate::listeners::add(&mut proxy, l, cert);
        }
        server.add_service(proxy);

        let mut admin = pingora::proxy::http_proxy_service_with_name(
            &server.configuration,
            AdminService::new(rt.clone()),
            "llm-edge admin",
        );
        admin.add_tcp(&admin_addr.to_string());
        server.add_service(admin);

        server.add_service(background_service(
            "upstream refresher",
            Refresher {
                state: rt.state.clone(),
            },
        ));
        server.add_service(background_service(
            "health checker",
            crate::upstream::health::HealthChecker::new(rt.state.clone()),
        ));
        server.add_service(background_service(
            "trace flusher",
            Drain {
                rt: rt.clone(),
                tracer,
                ledger,
                grace,
                exit_when_drained: opts.process_signals,
            },
        ));
        if opts.process_signals {
            server.add_service(background_service("signals", Signals { rt: rt.clone() }));
        }
        if let Some(addr) = demo {
            let mut svc = pingora::proxy::http_proxy_service_with_name(
                &server.configuration,
                DemoUpstream,
                "demo upstream",
            );
            svc.add_tcp(&addr.to_string());
            server.add_service(svc);
        }
        Self { server, rt }
    }

    /// The shared config snapshot (for reloads and admin views).
    pub fn state(&self) -> SharedSnapshot {
        self.rt.state.clone()
    }

    /// The process runtime (reloads, usage state).
    pub fn runtime(&self) -> Arc<Runtime> {
        self.rt.clone()
    }

    /// Runs until a shutdown signal (SIGTERM/SIGINT/SIGQUIT by default).
    pub fn run(self, args: RunArgs) {
        self.server.run(args)
    }
}

/// SIGHUP: reload the config; SIGUSR1: reopen the access log.
struct Signals {
    rt: Arc<Runtime>,
}

#[async_trait]
impl BackgroundService for Signals {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut hup), Ok(mut usr1)) = (
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined1()),
        ) else {
            tracing::error!("cannot install the SIGHUP/SIGUSR1 handlers");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    if let Err(why) = self.rt.reload().await {
                        tracing::error!("reload refused; the running config is kept: {why}");
                    }
                }
                _ = usr1.recv() => {
                    tracing::info!("SIGUSR1: reopening the access log");
                    self.rt.reopen_logs();
                }
                _ = shutdown.changed() => return,
            }
        }
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

/// On shutdown: waits for requests in flight (up to the grace period), then flushes the
/// trace queue, the usage ledger and the access log; a real process then exits at once
/// instead of sleeping out Pingora's whole grace period.
struct Drain {
    rt: Arc<Runtime>,
    tracer: Arc<Tracer>,
    ledger: Option<Arc<Ledger>>,
    grace: Duration,
    exit_when_drained: bool,
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let _ = shutdown.changed().await;
        let until = Instant::now() + self.grace;
        loop {
            let n = self.rt.in_flight.load(Ordering::Acquire);
            if n == 0 || Instant::now() >= until {
                if n > 0 {
                    tracing::warn!("grace period over with {n} requests still open");
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
        self.rt.flush_logs();
        if self.exit_when_drained {
            tracing::info!("shutdown complete");
            std::process::exit(0);
        }
    }
}
