//! Pass-through routes: nginx-style prefix routing. A request with a small body of known
//! length goes through llm-edge's own forwarder (the API calls' connection pool and response
//! relay, without their body edits, key leases or status retries); everything else (uploads,
//! chunked or unknown-length bodies, `Expect`, upgrades) goes through Pingora's proxy path.

use super::api_call::read_body_up_to;
use super::ctx::{PassThrough, RequestCtx};
use super::forward::{self, AttemptError, Outbound, Request};
use super::headers::ClientHead;
use crate::error::EdgeError;
use crate::route::table::rewrite_path;
use crate::shaping::body::Pieces;
use crate::snapshot::Snapshot;
use crate::upstream::connector::UpstreamConnector as Connector;
use http::header;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use tokio::time::Instant;

/// Largest request body (declared by `Content-Length`) a pass-through request may carry to
/// take the forwarder; larger ones stream through Pingora's proxy path. Pingora's own replay
/// buffer is this size, and a body this small arrives in a read or two.
pub const FORWARDER_MAX_BODY: u64 = 64 << 10;

/// The pass-through decision for a request, if a route matches. `path_and_query` is the
/// request's, with any rLLM metadata segments already stripped.
pub fn plan(snap: &Snapshot, path_and_query: &str) -> Option<PassThrough> {
    let path = path_and_query.split('?').next().unwrap_or(path_and_query);
    let route = snap.routes.route(path)?;
    let upstream = snap.upstreams.get(&route.upstream)?.clone();
    Some(PassThrough {
        upstream,
        path_and_query: rewrite_path(route, path_and_query),
        tried: Vec::with_capacity(2),
        replica: None,
    })
}

/// Whether the forwarder can take this pass-through request: its body is known to be small
/// (HTTP/1 without `Content-Length` or `Transfer-Encoding` has none; HTTP/2 has to say), and
/// it asks for nothing only Pingora's path does (`Expect: 100-continue`, protocol upgrades).
pub fn fits_forwarder(req: &RequestHeader, http2: bool) -> bool {
    let h = &req.headers;
    if req.method == http::Method::CONNECT
        || h.contains_key(header::UPGRADE)
        || h.contains_key(header::EXPECT)
        || h.contains_key(header::TRANSFER_ENCODING)
    {
        return false;
    }
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
    match (lengths.next(), lengths.next()) {
        (None, _) => !http2,
        (Some(v), None) => std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n <= FORWARDER_MAX_BODY),
        // Repeated lengths: Pingora's path judges them.
        _ => false,
    }
}

/// Forwards a pass-through request that [`fits_forwarder`] with the API calls' forwarder:
/// the body read whole (it is small), a key from the pool as Pingora's path would add it,
/// another replica tried only when a connection fails, and the answer relayed untouched
/// whatever its status. Errors are returned for the caller to answer, as for API calls.
pub async fn forward(
    session: &mut Session,
    connector: &Connector,
    snap: &Snapshot,
    pt: &PassThrough,
    ctx: &mut RequestCtx,
) -> Result<(), EdgeError> {
    let limits = &snap.cfg.limits;
    let body = read_body_up_to(session, limits, FORWARDER_MAX_BODY as usize).await?;
    let up = &pt.upstream;
    let t = up.cfg.timeouts;
    let client = ClientHead::of_pass_through(session.req_header(), &ctx.upstream_headers);
    let out = Outbound {
        upstream: up,
        client: &client,
        path_and_query: &pt.path_and_query,
        body: Pieces::whole(body),
        strip: None,
        model: "",
        session: None,
        error_event: false,
    };
    let key = up.keys.pick();
    ctx.key_id = key.map(|k| k.id.clone());
    let request = Request {
        out: &out,
        key,
        ours: &ctx.upstream_headers,
    };
    let deadline = Instant::now() + t.total;
    ctx.upstream_started = Some(std::time::Instant::now());
    let mut tried = Vec::with_capacity(2);
    let mut last_err = None;
    for attempt in 0..up.cfg.max_attempts {
        let Some(replica) = up.select_replica(&tried, None) else {
            break;
        };
        if attempt > 0 {
            forward::backoff(attempt).await;
        }
        let addr = replica.peer._address.as_inet().copied();
        ctx.attempts += 1;
        ctx.replica = Some(replica.label.clone());
        let attempt_started = Instant::now();
        let mut us = match forward::send(connector, &replica, &request, deadline, &t).await {
            Ok(us) => us,
            Err(AttemptError::Stale(e)) => {
                tracing::info!(upstream = %up.cfg.name, replica = %replica.label, attempt, "{e}");
                last_err = Some(e);
                continue;
            }
            Err(AttemptError::Retry(e)) => {
                tracing::warn!(upstream = %up.cfg.name, replica = %replica.label, attempt, "{e}");
                tried.extend(addr);
                last_err = Some(e);
                continue;
            }
            Err(AttemptError::Fatal(e)) => return Err(e),
        };
        ctx.upstream_ttfb = Some(attempt_started.elapsed());
        if let Some(h) = us.header() {
            ctx.status = h.status.as_u16();
        }
        let r = forward::relay(session, &mut us, &replica, &out, ctx, None, deadline, &t).await;
        if r.is_ok() {
            connector.release(us, &replica).await;
        }
        return r;
    }
    Err(last_err.unwrap_or_else(|| forward::no_replica(up)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, b"/x", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn small_known_bodies_take_the_forwarder() {
        assert!(fits_forwarder(&req("GET", &[]), false));
        assert!(fits_forwarder(
            &req("POST", &[("content-length", "300")]),
            false
        ));
        assert!(fits_forwarder(
            &req("POST", &[("content-length", "65536")]),
            true
        ));
        assert!(fits_forwarder(&req("HEAD", &[("accept", "*/*")]), false));
    }

    #[test]
    fn everything_else_takes_pingoras_path() {
        // Too large, of unknown length, or oddly framed.
        assert!(!fits_forwarder(
            &req("POST", &[("content-length", "65537")]),
            false
        ));
        assert!(!fits_forwarder(
            &req("POST", &[("transfer-encoding", "chunked")]),
            false
        ));
        assert!(!fits_forwarder(
            &req("POST", &[("content-length", "x")]),
            false
        ));
        let twice = [("content-length", "3"), ("content-length", "3")];
        assert!(!fits_forwarder(&req("POST", &twice), false));
        // HTTP/2 requests without a length may still carry a body.
        assert!(!fits_forwarder(&req("GET", &[]), true));
        // What only Pingora's path does.
        assert!(!fits_forwarder(
            &req("GET", &[("upgrade", "websocket")]),
            false
        ));
        let expect = [("content-length", "3"), ("expect", "100-continue")];
        assert!(!fits_forwarder(&req("POST", &expect), false));
        assert!(!fits_forwarder(&req("CONNECT", &[]), false));
    }
}
