//! Pooled upstream connections for API calls. HTTP/1-only peers (plain HTTP, or TLS without
//! h2 in ALPN) keep their idle connections in our own pool (`idle_pool`) and connect through
//! Pingora's transport connector, its large future boxed for the rare new connection (moving
//! it inline cost a multi-KB copy on every request). Other peers use Pingora's general
//! connector, which negotiates h2 and pools those connections itself.

use super::idle_pool::IdlePool;
use super::replica::Replica;
use futures::FutureExt;
use pingora::connectors::http::Connector as AnyConnector;
use pingora::connectors::TransportConnector;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::v1::client::HttpSession as H1Session;
use pingora::upstreams::peer::{HttpPeer, Peer};

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

    /// A session to `replica`, pooled when one is idle; the flag says whether it was reused.
    pub async fn get(&self, replica: &Replica) -> pingora::Result<(HttpSession, bool)> {
        let peer = &replica.peer;
        if h1_only(peer) {
            if let Some(s) = self.idle.take(replica.pool_key) {
                return Ok((HttpSession::H1(H1Session::new_with_options(s, peer)), true));
            }
            let s = Box::pin(self.transport.new_stream(peer)).await?;
            return Ok((HttpSession::H1(H1Session::new_with_options(s, peer)), false));
        }
        Box::pin(self.any.get_http_session(peer)).await
    }

    /// Returns a finished session to the pool it came from, or closes it when the response
    /// does not allow reuse.
    pub async fn release(&self, session: HttpSession, replica: &Replica) {
        let peer = &replica.peer;
        let idle = peer.options.idle_timeout;
        match session {
            HttpSession::H1(mut s) if h1_only(peer) => {
                s.respect_keepalive();
                // A reusable connection comes back at once; only a closing one would wait
                // (for a graceful shutdown), and dropping it closes it just as well.
                if let Some(Some(stream)) = s.reuse().now_or_never() {
                    self.idle.put(replica.pool_key, stream, idle);
                }
            }
            other => {
                // Boxed: about 3 KB, which every future awaiting this one (up to each
                // in-flight call's) would otherwise carry for the whole call.
                Box::pin(self.any.release_http_session(other, peer, idle)).await;
            }
        }
    }
}
