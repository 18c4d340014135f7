//! Pooled upstream connections for API calls. HTTP/1-only peers (plain HTTP, or TLS without
//! h2 in ALPN) go through Pingora's HTTP/1 connector directly: a pooled connection is taken
//! with a small future, and the large connect future is boxed for the rare new connection
//! (moving it inline cost a multi-KB copy on every request). Other peers use the general
//! connector, which negotiates h2.

use pingora::connectors::http::v1::Connector as H1Connector;
use pingora::connectors::http::Connector as AnyConnector;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::{HttpPeer, Peer};
use std::time::Duration;

/// The API-call forwarder's connection pools.
pub struct UpstreamConnector {
    h1: H1Connector,
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
            h1: H1Connector::new(None),
            any: AnyConnector::new(None),
        }
    }

    /// A session to `peer`, pooled when one is idle; the flag says whether it was reused.
    pub async fn get(&self, peer: &HttpPeer) -> pingora::Result<(HttpSession, bool)> {
        if h1_only(peer) {
            if let Some(s) = self.h1.reused_http_session(peer).await {
                return Ok((HttpSession::H1(s), true));
            }
            let (s, reused) = Box::pin(self.h1.get_http_session(peer)).await?;
            return Ok((HttpSession::H1(s), reused));
        }
        Box::pin(self.any.get_http_session(peer)).await
    }

    /// Returns a finished session to the pool it came from (or closes it).
    pub async fn release(&self, session: HttpSession, peer: &HttpPeer, idle: Option<Duration>) {
        // Both connectors' release futures are boxed: they are about 3 KB, and every future
        // that awaits this one (up to the boxed request filter of each in-flight call) would
        // carry that size for the whole call, a stream's lifetime. A short-lived box costs
        // less than that much memory per open stream.
        match session {
            HttpSession::H1(s) if h1_only(peer) => {
                Box::pin(self.h1.release_http_session(s, peer, idle)).await
            }
            other => {
                Box::pin(self.any.release_http_session(other, peer, idle)).await;
            }
        }
    }
}
