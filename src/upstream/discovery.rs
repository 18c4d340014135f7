//! pingora-load-balancing `ServiceDiscovery` over an upstream's endpoints: literal IPs are used
//! as written, hostnames are resolved with hickory. Each backend carries its built [`Replica`].

use super::dns::Dns;
use super::replica::Replica;
use crate::config::{Endpoint, UpstreamConfig};
use async_trait::async_trait;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::Backend;
use pingora::protocols::l4::socket::SocketAddr as PSocketAddr;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

/// Discovers the replicas of one upstream.
pub struct EndpointDiscovery {
    cfg: Arc<UpstreamConfig>,
    endpoints: Vec<Arc<Endpoint>>,
    dns: Arc<Dns>,
    egress: Arc<super::egress::EgressPolicy>,
    on_refusal: RefusalHook,
    /// Addresses refused by the egress policy at the last resolution.
    pub refused: Arc<std::sync::atomic::AtomicUsize>,
}

/// Called for every resolved address the egress policy refuses (metrics).
pub type RefusalHook = Arc<dyn Fn(&str, &super::egress::Refusal) + Send + Sync>;

impl EndpointDiscovery {
    /// Discovery for `cfg`'s endpoints, resolving hostnames with `dns`.
    pub fn new(
        cfg: Arc<UpstreamConfig>,
        dns: Arc<Dns>,
        egress: Arc<super::egress::EgressPolicy>,
        on_refusal: RefusalHook,
    ) -> Self {
        let endpoints = cfg.endpoints.iter().cloned().map(Arc::new).collect();
        Self {
            cfg,
            endpoints,
            dns,
            egress,
            on_refusal,
            refused: Arc::default(),
        }
    }

    /// Backends for the endpoints that need no DNS (literal IPs, `localhost`).
    pub fn literal_backends(&self) -> BTreeSet<Backend> {
        let mut set = BTreeSet::new();
        for ep in &self.endpoints {
            if let Some(ip) = ep.literal_ip {
                set.insert(self.backend(ep, SocketAddr::new(ip, ep.port)));
            }
        }
        set
    }

    fn backend(&self, ep: &Arc<Endpoint>, addr: SocketAddr) -> Backend {
        let mut b = Backend {
            addr: PSocketAddr::Inet(addr),
            weight: 1,
            ext: http::Extensions::new(),
        };
        b.ext
            .insert(Arc::new(Replica::new(ep.clone(), addr, &self.cfg)));
        b
    }
}

#[async_trait]
impl ServiceDiscovery for EndpointDiscovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let mut set = self.literal_backends();
        let mut refused = 0;
        for ep in &self.endpoints {
            if ep.literal_ip.is_some() {
                continue;
            }
            match self.dns.lookup(&ep.host).await {
                Ok(ips) => {
                    for ip in ips {
                        let addr = SocketAddr::new(ip, ep.port);
                        // Checked on the very address handed to HttpPeer: an answer that flips
                        // to an internal address is refused here, before anything dials it.
                        match self.egress.check_resolved(addr, self.cfg.allow_private) {
                            Ok(()) => {
                                set.insert(self.backend(ep, addr));
                            }
                            Err(refusal) => {
                                refused += 1;
                                (self.on_refusal)(&self.cfg.name, &refusal);
                                tracing::warn!(upstream = %self.cfg.name, endpoint = %ep.url, "{refusal}");
                            }
                        }
                    }
                }
                // Keep serving the other endpoints; the refresher retries on its next tick.
                Err(why) => tracing::warn!(upstream = %self.cfg.name, endpoint = %ep.url, "{why}"),
            }
        }
        self.refused
            .store(refused, std::sync::atomic::Ordering::Relaxed);
        Ok((set, HashMap::new()))
    }
}
