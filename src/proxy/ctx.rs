//! Per-request state shared across Pingora phases.

use crate::route::api::ApiEndpoint;
use crate::route::slug::PathMeta;
use crate::snapshot::Snapshot;
use crate::upstream::Upstream;
use std::sync::Arc;
use std::time::Instant;

/// A pass-through request's routing decision.
pub struct PassThrough {
    /// Upstream receiving it.
    pub upstream: Arc<Upstream>,
    /// Path (and query) to send, prefix already stripped if asked.
    pub path_and_query: String,
    /// Addresses already tried (connect failures), for Pingora's retries.
    pub tried: Vec<std::net::SocketAddr>,
    /// Replica chosen last.
    pub replica: Option<Arc<crate::upstream::replica::Replica>>,
}

/// The authenticated client key of a request.
pub struct ClientRef {
    /// Key id (logs, metrics, ledger).
    pub id: String,
    /// Models allowed (`None`: all).
    pub models: Option<Vec<String>>,
    /// Limits.
    pub limit: crate::config::edge::RateLimit,
    /// Usage state (rate limits).
    pub usage: Arc<crate::security::rate::KeyUsage>,
}

/// State of one request.
pub struct RequestCtx {
    /// When the request started.
    pub started: Instant,
    /// Request id (traces, logs); set by the first phase, empty until then.
    pub request_id: String,
    /// Config snapshot this request uses from start to end.
    pub snapshot: Option<Arc<Snapshot>>,
    /// API endpoint, for API calls.
    pub api: Option<ApiEndpoint>,
    /// Model the client asked for.
    pub model: Option<String>,
    /// Upstream name.
    pub upstream: Option<String>,
    /// Replica address used last.
    pub replica: Option<String>,
    /// Upstream key id used last.
    pub key_id: Option<String>,
    /// Attempts made upstream.
    pub attempts: u32,
    /// Our own error, when we answered with one.
    pub error_code: Option<&'static str>,
    /// Set once a response header went downstream (no retry, no second response after that).
    pub responded: bool,
    /// Pass-through routing, when the request takes Pingora's proxy path.
    pub pass_through: Option<PassThrough>,
    /// rLLM metadata and session from the path.
    pub path_meta: Option<PathMeta>,
    /// Fields injected into the request that the client did not send.
    pub injected: Vec<String>,
    /// Upstream status passed to the client (0 until a response started).
    pub status: u16,
    /// The request asked for a stream (`"stream": true`).
    pub stream: bool,
    /// The authenticated client key (`None` in open mode or before auth).
    pub client: Option<ClientRef>,
    /// The client's address (forwarding headers of trusted proxies applied).
    pub client_addr: Option<std::net::IpAddr>,
    /// Headers added to whatever response the client gets (request id, CORS, rate limits).
    pub response_headers: Vec<(&'static str, String)>,
    /// Headers set on the upstream request (request id, forwarding headers).
    pub upstream_headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// What kind of request this was (metrics label).
    pub kind: crate::observe::metrics::RequestKind,
    /// Upstream time to the response header (last attempt).
    pub upstream_ttfb: Option<std::time::Duration>,
    /// Upstream exchange time, request sent to last byte (last attempt).
    pub upstream_time: Option<std::time::Duration>,
    /// When the last upstream attempt started (pass-through).
    pub upstream_started: Option<Instant>,
    /// Why each extra attempt was made, and whether it moved to another replica.
    pub retries: Vec<(crate::observe::metrics::RetryReason, bool)>,
    /// Tokens the call used, when observed.
    pub tokens: Option<crate::trace::record::Tokens>,
    /// Active request / stream gauges, released when the request ends.
    pub gauges: (
        Option<crate::observe::metrics::ActiveGuard>,
        Option<crate::observe::metrics::ActiveGuard>,
    ),
    /// Held while the request runs: instance-wide and per-key in-flight slots.
    pub slots: (
        Option<crate::runtime::InFlightGuard>,
        Option<crate::security::rate::InFlight>,
    ),
}

impl RequestCtx {
    /// Client key id for logs, metrics and the ledger ("anonymous" in open mode).
    pub fn client_id(&self) -> &str {
        self.client
            .as_ref()
            .map(|c| c.id.as_str())
            .unwrap_or("anonymous")
    }

    /// A fresh context.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            request_id: String::new(),
            snapshot: None,
            api: None,
            model: None,
            upstream: None,
            replica: None,
            key_id: None,
            attempts: 0,
            error_code: None,
            responded: false,
            pass_through: None,
            path_meta: None,
            injected: Vec::new(),
            status: 0,
            stream: false,
            client: None,
            client_addr: None,
            response_headers: Vec::new(),
            upstream_headers: Vec::new(),
            slots: (None, None),
            kind: crate::observe::metrics::RequestKind::Local,
            upstream_ttfb: None,
            upstream_time: None,
            upstream_started: None,
            retries: Vec::new(),
            tokens: None,
            gauges: (None, None),
        }
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}
