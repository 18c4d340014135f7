//! Process-lifetime state shared by the proxy, the admin listener and background services:
//! the swappable config snapshot, per-client usage, trace and usage writers, and reloads.

use crate::config::edge::{AccessLogSettings, AccessLogTarget};
use crate::config::{self, Config};
use crate::observe::access_log::{AccessLog, Format, Target};
use crate::observe::ledger::Ledger;
use crate::observe::metrics::Metrics;
use crate::security::rate::ClientUsage;
use crate::snapshot::{BuildInputs, SharedSnapshot, Snapshot};
use crate::trace::Tracer;
use crate::upstream::discovery::RefusalHook;
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Shared state of one llm-edge process.
pub struct Runtime {
    /// The current config snapshot; a request loads it once and keeps it.
    pub state: SharedSnapshot,
    /// Client key usage, by id (survives reloads).
    pub clients: ClientUsage,
    /// Trace writer.
    pub tracer: Arc<Tracer>,
    /// Usage ledger, when `usage:` is configured.
    pub ledger: Option<Arc<Ledger>>,
    /// The file reloads re-read (`None`: reload re-validates the config in memory only).
    pub config_path: Option<PathBuf>,
    /// Requests in flight (for `limits.max_concurrent_requests`).
    pub in_flight: AtomicUsize,
    /// Prometheus metrics of this instance.
    pub metrics: Arc<Metrics>,
    /// Access log writer (disabled when `access_log` is off).
    pub access_log: AccessLog,
    /// Certificates of the TLS listeners (re-read on reload).
    pub certs: Vec<Arc<crate::listeners::ReloadableCert>>,
    reload_lock: tokio::sync::Mutex<()>,
}

/// Outcome of a reload, for logs and `POST /admin/reload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Settings that changed in the file but only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
}

impl Runtime {
    /// Builds the first snapshot.
    pub fn new(
        cfg: Config,
        tracer: Arc<Tracer>,
        ledger: Option<Arc<Ledger>>,
        config_path: Option<PathBuf>,
        access_log: AccessLog,
        certs: Vec<Arc<crate::listeners::ReloadableCert>>,
    ) -> Arc<Self> {
        let clients = ClientUsage::default();
        let metrics = Metrics::new();
        metrics.mark_config_loaded(std::time::SystemTime::now());
        let snap = Snapshot::build(
            cfg,
            BuildInputs {
                clients: &clients,
                on_refusal: refusal_hook(&metrics),
                previous: None,
            },
        );
        Arc::new(Self {
            state: Arc::new(ArcSwap::from_pointee(snap)),
            clients,
            tracer,
            ledger,
            config_path,
            in_flight: AtomicUsize::new(0),
            metrics,
            access_log,
            certs,
            reload_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Re-reads the config file and swaps it in. An invalid file leaves the running config in
    /// place and returns every problem. Requests in flight keep the snapshot they started with;
    /// key cooldowns and client usage carry over for unchanged key ids.
    pub async fn reload(&self) -> Result<ReloadReport, String> {
        let Some(path) = self.config_path.clone() else {
            return Err("no config file to reload (started from an in-memory config)".into());
        };
        let _one_at_a_time = self.reload_lock.lock().await;
        let loaded = tokio::task::spawn_blocking(move || config::load_file(&path))
            .await
            .map_err(|e| format!("reading the config: {e}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
        let result = match loaded {
            Ok(cfg) => self.swap_in(cfg).await,
            Err(e) => Err(e),
        };
        self.metrics.record_config_reload(result.is_ok());
        result
    }

    /// Swaps a validated config in (the second half of [`Runtime::reload`]).
    pub async fn swap_in(&self, cfg: Config) -> Result<ReloadReport, String> {
        let old = self.state.load_full();
        let needs_restart = restart_only_changes(&old.cfg, &cfg);
        for w in &cfg.warnings {
            tracing::warn!("config: {w}");
        }
        let snap = Snapshot::build(
            cfg,
            BuildInputs {
                clients: &self.clients,
                on_refusal: refusal_hook(&self.metrics),
                previous: Some(&old),
            },
        );
        // Hostname upstreams get their addresses before the swap, so no request sees an
        // upstream with no replica.
        for up in snap.upstreams.values().filter(|u| u.needs_dns()) {
            if tokio::time::timeout(Duration::from_secs(5), up.refresh())
                .await
                .is_err()
            {
                tracing::warn!(upstream = %up.cfg.name, "resolving the reloaded upstream timed out");
            }
        }
        self.state.store(Arc::new(snap));
        for c in &self.certs {
            match c.reload() {
                Ok(()) => tracing::info!("reload: certificate {} re-read", c.cert_path()),
                Err(e) => tracing::error!("reload: keeping the current certificate: {e}"),
            }
        }
        for what in &needs_restart {
            tracing::warn!("reload: {what} changed; it takes effect at the next restart");
        }
        tracing::info!("configuration reloaded");
        Ok(ReloadReport { needs_restart })
    }

    /// Reopens the access log file (logrotate, SIGUSR1).
    pub fn reopen_logs(&self) {
        self.access_log.reopen();
    }

    /// Writes out every queued access log line (blocks up to 5 s; shutdown only).
    pub fn flush_logs(&self) {
        if !self.access_log.flush() {
            tracing::warn!("access log not fully written at shutdown");
        }
    }

    /// Counts a request in flight until the guard drops; `None` when over
    /// `limits.max_concurrent_requests`.
    pub fn admit_request(self: &Arc<Self>, max: usize) -> Option<InFlightGuard> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if max > 0 && before >= max {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(InFlightGuard(self.clone()))
    }
}

/// One request in flight.
pub struct InFlightGuard(Arc<Runtime>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn refusal_hook(metrics: &Arc<Metrics>) -> RefusalHook {
    let m = Arc::downgrade(metrics);
    Arc::new(
        move |upstream: &str, refusal: &crate::upstream::egress::Refusal| {
            if let Some(m) = m.upgrade() {
                m.count_egress_refused(upstream, refusal.class.as_str());
            }
        },
    )
}

/// Opens the access log the config asks for.
pub fn open_access_log(settings: Option<&AccessLogSettings>) -> std::io::Result<AccessLog> {
    let Some(s) = settings else {
        return AccessLog::start(Target::Off, Format::Combined, 1);
    };
    let target = match &s.target {
        AccessLogTarget::Stderr => Target::Stderr,
        AccessLogTarget::File(p) => Target::File(p.clone()),
    };
    let format = match s.format {
        crate::config::schema::AccessLogFormat::Combined => Format::Combined,
        crate::config::schema::AccessLogFormat::Json => Format::Json,
    };
    AccessLog::start(target, format, s.queue)
}

/// Settings read once at start (listeners, process settings, writers).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.listen != new.listen {
        out.push("listen");
    }
    if old.admin.listen != new.admin.listen {
        out.push("admin.listen");
    }
    if old.server.threads != new.server.threads
        || old.server.work_stealing != new.server.work_stealing
        || old.server.pid_file != new.server.pid_file
        || old.server.upgrade_sock != new.server.upgrade_sock
        || old.server.grace_period != new.server.grace_period
    {
        out.push("server / shutdown");
    }
    if format!("{:?}", old.tracing) != format!("{:?}", new.tracing) {
        out.push("tracing");
    }
    if format!("{:?}", old.usage) != format!("{:?}", new.usage) {
        out.push("usage");
    }
    if format!("{:?}", old.access_log) != format!("{:?}", new.access_log) {
        out.push("access_log");
    }
    if old.demo_upstream != new.demo_upstream {
        out.push("demo_upstream");
    }
    out
}
