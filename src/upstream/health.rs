//! Active health checks of replicas (pingora-load-balancing's `HttpHealthCheck`, run by our
//! own loop over the current snapshot so a reload picks up new upstreams and settings).

use crate::config::{Endpoint, HealthCheck};
use crate::snapshot::SharedSnapshot;
use async_trait::async_trait;
use pingora::lb::health_check::HttpHealthCheck;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The probe for one upstream: `GET <path>` with the endpoint's `Host`; any 200 is healthy.
pub fn http_check(hc: &HealthCheck, ep: &Endpoint) -> Box<HttpHealthCheck> {
    let mut check = HttpHealthCheck::new(&ep.authority, ep.tls);
    check.peer_template.sni = ep.host.clone();
    check.peer_template.options.connection_timeout = Some(hc.timeout);
    check.peer_template.options.read_timeout = Some(hc.timeout);
    check.consecutive_failure = hc.unhealthy_after as usize;
    check.consecutive_success = hc.healthy_after as usize;
    let path = format!("{}{}", ep.base_path, hc.path);
    match pingora::http::RequestHeader::build("GET", path.as_bytes(), None) {
        Ok(mut req) => {
            if req.append_header("Host", ep.authority.as_str()).is_ok() {
                check.req = req;
            }
        }
        Err(e) => tracing::error!("health check path {path:?}: {e}"),
    }
    Box::new(check)
}

/// Runs every upstream's health check at its interval.
pub struct HealthChecker {
    state: SharedSnapshot,
}

impl HealthChecker {
    /// A checker over the shared snapshot.
    pub fn new(state: SharedSnapshot) -> Self {
        Self { state }
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut due: HashMap<String, Instant> = HashMap::new();
        loop {
            let snap = self.state.load_full();
            let now = Instant::now();
            let mut next = now + Duration::from_secs(1);
            for up in snap.upstreams.values() {
                let Some(hc) = up.cfg.health_check.as_ref() else {
                    continue;
                };
                let at = due.entry(up.cfg.name.clone()).or_insert(now);
                if *at <= now {
                    up.lb.backends().run_health_check(true).await;
                    *at = Instant::now() + hc.interval;
                }
                next = next.min(*at);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
