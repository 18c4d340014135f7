//! Pooled upstream connections for API calls. HTTP/1 connections wait in our own pool
//! (`idle_pool`); HTTP/1-only peers (plain HTTP, or TLS without h2 in ALPN) connect through
//! Pingora's transport connector, its large future boxed for the rare new connection (moving
//! it inline cost a multi-KB copy on every request). Other peers use Pingora's general
//! connector, which negotiates h2 and pools HTTP/2 connections itself; an HTTP/1 connection it
//! makes (the server chose http/1.1) is pooled with the others.

use super::exchange::{Conn, Exchange};
use super::idle_pool::IdlePool;
use super::replica::Replica;
use pingora::connectors::http::Connector as AnyConnector;
use pingora::connectors::TransportConnector;
use pingora::protocols::http::client::HttpSession;
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

    /// A connection to `replica`, pooled when one is idle; the flag says whether it was reused.
    pub async fn get(&self, replica: &Replica) -> pingora::Result<(Conn, bool)> {
        let peer = &replica.peer;
        if let Some(s) = self.idle.take(replica.pool_key) {
            return Ok((Conn::H1(s), true));
        }
        if h1_only(peer) {
            let s = Box::pin(self.transport.new_stream(peer)).await?;
            return Ok((Conn::H1(s), false));
        }
        let (session, reused) = Box::pin(self.any.get_http_session(peer)).await?;
        let conn = match session {
            HttpSession::H1(h1) => Conn::H1(h1.into_inner()),
            other => Conn::Session(Box::new(other)),
        };
        Ok((conn, reused))
    }

    /// Returns a finished exchange's connection to the pool it came from, or closes it when
    /// the response does not allow reuse.
    pub async fn release(&self, exchange: Exchange, replica: &Replica) {
        let peer = &replica.peer;
        let idle = peer.options.idle_timeout;
        match exchange {
            Exchange::H1(r) => {
                // Dropping a connection that cannot be reused closes it.
                if r.reusable() {
                    self.idle.put(replica.pool_key, r.into_io(), idle);
                }
            }
            Exchange::Session(s) => {
                // Boxed: about 3 KB, which every future awaiting this one (up to each
                // in-flight call's) would otherwise carry for the whole call.
                Box::pin(self.any.release_http_session(s, peer, idle)).await;
            }
        }
    }
}
