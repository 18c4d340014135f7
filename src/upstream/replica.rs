//! Replicas: a resolved endpoint address with its fully built `HttpPeer`, kept with each
//! load-balancing backend so a request only selects and never builds.

use crate::config::{Endpoint, UpstreamConfig};
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One replica of an upstream at one resolved address.
#[derive(Debug)]
pub struct Replica {
    /// The peer handed to Pingora's connector.
    pub peer: HttpPeer,
    /// The peer's idle-connection pool key (`reuse_hash`, computed once).
    pub pool_key: u64,
    /// Endpoint this replica came from.
    pub endpoint: Arc<Endpoint>,
    /// `ip:port`, for logs.
    pub label: String,
    /// Unix millis until which the replica is skipped after a connect failure.
    down_until_ms: AtomicU64,
    /// Consecutive 5xx answers.
    server_errors: AtomicU32,
    passive: crate::config::PassiveHealth,
}

impl Replica {
    /// Builds the replica and its peer at load/resolution time.
    pub fn new(endpoint: Arc<Endpoint>, addr: SocketAddr, cfg: &UpstreamConfig) -> Self {
        let sni = cfg.sni.clone().unwrap_or_else(|| endpoint.host.clone());
        let mut peer = HttpPeer::new(addr, endpoint.tls, sni);
        let o = &mut peer.options;
        o.connection_timeout = Some(cfg.timeouts.connect);
        o.total_connection_timeout = Some(cfg.timeouts.connect);
        // Pass-through routes read with this; API calls set first-byte and idle timeouts per phase.
        o.read_timeout = Some(cfg.timeouts.first_byte.max(cfg.timeouts.idle));
        o.write_timeout = Some(cfg.timeouts.idle);
        o.idle_timeout = Some(Duration::from_secs(60));
        o.verify_cert = cfg.verify_tls;
        o.verify_hostname = cfg.verify_tls;
        o.max_h2_streams = cfg.max_h2_streams;
        if endpoint.tls {
            o.alpn = ALPN::H2H1;
        }
        let pool_key = pingora::upstreams::peer::Peer::reuse_hash(&peer);
        Self {
            peer,
            pool_key,
            label: addr.to_string(),
            endpoint,
            down_until_ms: AtomicU64::new(0),
            server_errors: AtomicU32::new(0),
            passive: cfg.passive,
        }
    }

    /// Whether a recent connect failure says to skip this replica now.
    pub fn is_ejected(&self) -> bool {
        self.down_until_ms.load(Ordering::Relaxed) > now_ms()
    }

    /// Records a connect failure: a refused connection ejects at once for `passive_health.eject_for`.
    pub fn mark_connect_failure(&self) {
        self.eject();
    }

    /// Records a 5xx answer; `passive_health.failures` in a row eject the replica.
    pub fn mark_server_error(&self) {
        let n = self.server_errors.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.passive.failures {
            self.server_errors.store(0, Ordering::Relaxed);
            tracing::warn!(replica = %self.label, "{n} server errors in a row; ejected for {:?}", self.passive.eject_for);
            self.eject();
        }
    }

    fn eject(&self) {
        let until = now_ms() + self.passive.eject_for.as_millis() as u64;
        self.down_until_ms.store(until, Ordering::Relaxed);
    }

    /// Records a success: back in rotation.
    pub fn mark_ok(&self) {
        if self.server_errors.load(Ordering::Relaxed) != 0 {
            self.server_errors.store(0, Ordering::Relaxed);
        }
        if self.down_until_ms.load(Ordering::Relaxed) != 0 {
            self.down_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
