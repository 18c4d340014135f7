//! Upstreams at run time: replicas behind pingora-load-balancing, credentials, DNS refresh.

pub mod connector;
pub mod discovery;
pub mod dns;
pub mod egress;
pub mod exchange;
pub mod h1_response;
pub mod health;
pub mod idle_pool;
pub mod keys;
pub mod replica;

use crate::config::UpstreamConfig;
use discovery::EndpointDiscovery;
use dns::Dns;
use futures::FutureExt;
use keys::KeyPool;
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backends, LoadBalancer};
use replica::Replica;
use std::net::SocketAddr;
use std::sync::Arc;

/// One upstream, ready to serve.
pub struct Upstream {
    /// Validated config.
    pub cfg: Arc<UpstreamConfig>,
    /// Replicas: membership (discovery) and active health. `select_replica` balances them
    /// itself; the balancer's own selector is not used on the request path.
    pub lb: LoadBalancer<RoundRobin>,
    /// Credentials.
    pub keys: KeyPool,
    /// Resolved addresses the egress policy refused at the last resolution.
    refused: Arc<std::sync::atomic::AtomicUsize>,
    /// Round-robin position over the replicas.
    next: std::sync::atomic::AtomicUsize,
}

impl Upstream {
    /// Builds the upstream. Literal-IP endpoints are usable at once; hostnames become usable
    /// after the first background resolution.
    pub fn new(
        cfg: UpstreamConfig,
        dns: Arc<Dns>,
        egress: Arc<egress::EgressPolicy>,
        on_refusal: discovery::RefusalHook,
        carried: &std::collections::HashMap<String, Arc<keys::KeyState>>,
    ) -> Self {
        let cfg = Arc::new(cfg);
        let discovery = EndpointDiscovery::new(cfg.clone(), dns, egress, on_refusal);
        let refused = discovery.refused.clone();
        let all_literal = cfg.endpoints.iter().all(|e| e.literal_ip.is_some());
        let mut lb = LoadBalancer::from_backends(Backends::new(Box::new(discovery)));
        if let (Some(hc), Some(ep)) = (cfg.health_check.as_ref(), cfg.endpoints.first()) {
            lb.set_health_check(health::http_check(hc, ep));
        }
        if all_literal {
            // Literal endpoints never await, so the first update completes synchronously.
            if let Some(Err(e)) = lb.update().now_or_never() {
                tracing::error!(upstream = %cfg.name, "initial backend update failed: {e}");
            }
        }
        let keys = KeyPool::new(
            cfg.kind,
            &cfg.keys,
            cfg.key_strategy,
            cfg.max_cooldown,
            carried,
        );
        Self {
            cfg,
            lb,
            keys,
            refused,
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Re-runs discovery (DNS) and rebuilds the selector when the addresses changed.
    pub async fn refresh(&self) {
        if let Err(e) = self.lb.update().await {
            tracing::warn!(upstream = %self.cfg.name, "refreshing replicas failed: {e}");
        }
    }

    /// How many resolved addresses the egress policy refused at the last resolution.
    pub fn egress_refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether any endpoint needs DNS.
    pub fn needs_dns(&self) -> bool {
        self.cfg.endpoints.iter().any(|e| e.literal_ip.is_none())
    }

    /// Picks the next replica, skipping `tried` ones and, while others are available,
    /// passively ejected ones. With a `session`, the same session keeps its replica
    /// (rendezvous hashing) while that replica is usable.
    pub fn select_replica(
        &self,
        tried: &[SocketAddr],
        session: Option<&[u8]>,
    ) -> Option<Arc<Replica>> {
        let accept = |r: &Replica, skip_ejected: bool| {
            let was_tried = tried.iter().any(|t| r.peer._address.as_inet() == Some(t));
            let ejected = skip_ejected && r.is_ejected();
            !was_tried && !ejected
        };
        if let (Some(s), crate::config::schema::KeyStrategy::Session) =
            (session, self.cfg.key_strategy)
        {
            let backends = self.lb.backends().get_backend();
            let pick = |skip_ejected: bool| {
                backends
                    .iter()
                    .filter(|b| self.lb.backends().ready(b))
                    .filter_map(|b| b.ext.get::<Arc<Replica>>())
                    .filter(|r| accept(r, skip_ejected))
                    .max_by_key(|r| {
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        std::hash::Hash::hash(&s, &mut h);
                        std::hash::Hash::hash(&r.label, &mut h);
                        std::hash::Hasher::finish(&h)
                    })
                    .cloned()
            };
            return pick(true).or_else(|| pick(false));
        }
        // Our own round robin over the current replicas: the load balancer's `select_with`
        // hashes every candidate twice (a seen-set and the readiness map) and clones the
        // backend it returns, about 2k instructions per request for one replica.
        let backends = self.lb.backends().get_backend();
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
        let checked = self.cfg.health_check.is_some();
        let pick = |skip_ejected: bool| {
            backends
                .iter()
                .cycle()
                .skip(start)
                .take(n)
                .filter(|b| !checked || self.lb.backends().ready(b))
                .filter_map(|b| b.ext.get::<Arc<Replica>>())
                .find(|r| accept(r, skip_ejected))
                .cloned()
        };
        pick(true).or_else(|| pick(false))
    }

    /// Replicas known, and how many of them are usable now (healthy and not ejected).
    pub fn health_counts(&self) -> (usize, usize) {
        let backends = self.lb.backends().get_backend();
        let healthy = backends
            .iter()
            .filter(|b| self.lb.backends().ready(b))
            .filter(|b| b.ext.get::<Arc<Replica>>().is_some_and(|r| !r.is_ejected()))
            .count();
        (backends.len(), healthy)
    }

    /// Every replica's label and whether it is usable now (metrics).
    pub fn replica_health(&self) -> Vec<(String, bool)> {
        self.lb
            .backends()
            .get_backend()
            .iter()
            .filter_map(|b| {
                let r = b.ext.get::<Arc<Replica>>()?;
                Some((
                    r.label.clone(),
                    self.lb.backends().ready(b) && !r.is_ejected(),
                ))
            })
            .collect()
    }

    /// Number of replicas currently known.
    pub fn replica_count(&self) -> usize {
        self.lb.backends().get_backend().len()
    }
}
pub mod cooldown;
