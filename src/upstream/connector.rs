//! Pooled upstream connections for API calls. HTTP/1-only peers (plain HTTP, or TLS without
//! h2 in ALPN) keep their idle connections in our own pool (`idle_pool`) and connect through
//! Pingora's transport connector, its large future boxed for the rare new connection (moving
//! it inline cost a multi-KB copy on every request). Other peers use Pingora's general
//! connector, which negotiates h2 and pools those connections itself.

use super::idle_pool::IdlePool;
use futures::FutureExt;
use pingora::connectors::http::Connector as AnyConnector;
use pingora::connectors::TransportConnector;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::v1::client::HttpSession as H1Session;
use pingora::upstreams::peer::{HttpPeer, Peer};
use std::time::Duration;

/// The API-call forwarder's connection pools.
pub struct UpstreamConnector {
    transport: TransportConnector,
    idle: IdlePool,
    any: AnyConnector,
}

impl Default for UpstreamConnector {
    fn default() -> Self {
        Self::new()
    }
}

fn h1_only(peer: &HttpPeer) -> bool {
    peer.get_peer_options()
        .is_none_or(|o| o.alpn.get_max_http_version() == 1)
}

impl UpstreamConnector {
    /// Empty pools with Pingora's default connector options.
    pub fn new() -> Self {
        Self {
            transport: TransportConnector::new(None),
            idle: IdlePool::new(),
            any: AnyConnector::new(None),
        }
    }

    /// A session to `peer` (pool key `key`, its `reuse_hash`), pooled when one is idle; the
    /// flag says whether it was reused.
    pub async fn get(&self, peer: &HttpPeer, key: u64) -> pingora::Result<(HttpSession, bool)> {
        if h1_only(peer) {
            if let Some(s) = self.idle.take(key) {
                return Ok((HttpSession::H1(H1Session::new_with_options(s, peer)), true));
            }
            let s = Box::pin(self.transport.new_stream(peer)).await?;
            return Ok((HttpSession::H1(H1Session::new_with_options(s, peer)), false));
        }
        Box::pin(self.any.get_http_session(peer)).await
    }

    /// Returns a finished session to the pool it came from, or closes it when the response
    /// does not allow reuse.
    pub async fn release(
        &self,
        session: HttpSession,
        peer: &HttpPeer,
        key: u64,
        idle: Option<Duration>,
    ) {
        match session {
            HttpSession::H1(mut s) if h1_only(peer) => {
                s.respect_keepalive();
                // A reusable connection comes back at once; only a closing one would wait
                // (for a graceful shutdown), and dropping it closes it just as well.
                if let Some(Some(stream)) = s.reuse().now_or_never() {
                    self.idle.put(key, stream, idle);
                }
            }
            other => {
                // Boxed for the same reason: about 3 KB.
                Box::pin(self.any.release_http_session(other, peer, idle)).await;
            }
        }
    }
}
