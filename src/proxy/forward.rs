//! The API-call forwarder (DESIGN §1): sends a fully read body over Pingora's pooled connector,
//! retries on another replica before the first byte goes downstream, then streams the response
//! back chunk by chunk.

use super::ctx::RequestCtx;
use super::headers;
use super::respond;
use crate::error::EdgeError;
use crate::shaping::strip::{SseStripper, Strip};
use crate::trace::accumulate::{Accumulator, Flavor};
use crate::upstream::replica::Replica;
use crate::upstream::Upstream;
use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use pingora::ErrorType;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

/// Statuses worth another replica when one is left (the upstream may be overloaded or failing).
fn is_retryable_status(status: u16) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504)
}

/// What went wrong with one attempt, before anything was sent downstream.
enum AttemptError {
    /// Try another replica (connect failure, stale pooled connection).
    Retry(EdgeError),
    /// Give up now (timeouts: retrying would double a long wait).
    Fatal(EdgeError),
}

/// One outbound API call.
pub struct Outbound<'a> {
    /// Upstream chosen by model.
    pub upstream: &'a Arc<Upstream>,
    /// The client's request header (credentials are removed when building the upstream one).
    pub client: &'a RequestHeader,
    /// Path and query to send.
    pub path_and_query: &'a str,
    /// The body to send (whole, possibly edited).
    pub body: Bytes,
    /// Injected fields to remove from a successful response (`strip_injected_fields`).
    pub strip: Option<Strip>,
}

/// Forwards the call and streams the response downstream. `Ok` means the exchange completed;
/// `Err` carries our error: before any byte went downstream the caller answers it, after that
/// (`ctx.responded`) the stream has been ended with an error event and must be aborted.
pub async fn forward(
    session: &mut Session,
    connector: &Connector,
    out: Outbound<'_>,
    ctx: &mut RequestCtx,
    obs: Option<&mut Observer>,
) -> Result<(), EdgeError> {
    let up = out.upstream;
    let t = up.cfg.timeouts;
    let deadline = Instant::now() + t.total;
    let mut tried: Vec<SocketAddr> = Vec::with_capacity(2);
    let mut last_err = EdgeError::UpstreamUnreachable(format!(
        "upstream {:?} has no resolved replica",
        up.cfg.name
    ));
    for attempt in 0..up.cfg.max_attempts {
        let Some(replica) = up.select_replica(&tried) else {
            break;
        };
        if let Some(a) = replica.peer._address.as_inet() {
            tried.push(*a);
        }
        ctx.attempts += 1;
        ctx.replica = Some(replica.label.clone());
        let key = up.keys.pick();
        ctx.key_id = key.map(|k| k.id.clone());
        let header = headers::upstream_api_request(
            out.client,
            out.path_and_query,
            &replica.endpoint,
            key,
            out.body.len(),
        )
        .map_err(|e| EdgeError::Internal(format!("building the upstream request: {e}")))?;

        let mut us = match send(connector, &replica, header, out.body.clone(), deadline, &t).await {
            Ok(us) => us,
            Err(AttemptError::Retry(e)) => {
                tracing::warn!(upstream = %up.cfg.name, replica = %replica.label, attempt, "{e}");
                last_err = e;
                continue;
            }
            Err(AttemptError::Fatal(e)) => return Err(e),
        };
        let Some(resp) = us.response_header() else {
            return Err(EdgeError::Internal(
                "response header missing after read".into(),
            ));
        };
        let status = resp.status.as_u16();
        let more_attempts = attempt + 1 < up.cfg.max_attempts;
        if is_retryable_status(status) && more_attempts && up.select_replica(&tried).is_some() {
            tracing::info!(upstream = %up.cfg.name, replica = %replica.label, status, "retrying on another replica");
            last_err = EdgeError::UpstreamUnreachable(format!("replica answered {status}"));
            // The connection still has an unread body: close it rather than pool it.
            us.shutdown().await;
            continue;
        }
        replica.mark_ok();
        ctx.status = status;
        let mut down = headers::downstream_response(resp)
            .map_err(|e| EdgeError::Internal(format!("building the downstream response: {e}")))?;
        let is_sse = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let transform = match (&out.strip, (200..300).contains(&status)) {
            (Some(st), true) if is_sse => Transform::Sse(SseStripper::new(st.clone())),
            (Some(st), true) => Transform::Json(st.clone(), Vec::new()),
            _ => Transform::None,
        };
        let mut obs = obs;
        if let Some(o) = obs.as_deref_mut() {
            o.begin(is_sse);
        }
        let mut relay = Relay {
            is_sse,
            transform,
            held_header: None,
        };
        if matches!(relay.transform, Transform::Json(..)) {
            // The rewritten body changes length: the header waits for the whole body.
            relay.held_header = Some(down);
        } else {
            if matches!(relay.transform, Transform::Sse(_)) {
                down.remove_header(&http::header::CONTENT_LENGTH);
                let _ = down.insert_header(http::header::TRANSFER_ENCODING, "chunked");
            }
            if session
                .write_response_header(Box::new(down), false)
                .await
                .is_err()
            {
                return Err(EdgeError::ClientClosed);
            }
            ctx.responded = true;
        }
        let r = stream_body(session, connector, us, &replica, relay, deadline, &t, obs).await;
        if r.is_ok() {
            ctx.responded = true;
        }
        return r;
    }
    Err(last_err)
}

/// Connects (or reuses a pooled connection), sends header and body, reads the response header.
async fn send(
    connector: &Connector,
    replica: &Replica,
    header: RequestHeader,
    body: Bytes,
    deadline: Instant,
    t: &crate::config::Timeouts,
) -> Result<HttpSession, AttemptError> {
    let name = &replica.label;
    let (mut us, reused) =
        match tokio::time::timeout_at(deadline, connector.get_http_session(&replica.peer)).await {
            Err(_) => {
                return Err(AttemptError::Fatal(EdgeError::UpstreamTimeout(format!(
                    "connecting to replica {name}"
                ))))
            }
            Ok(Err(e)) => {
                replica.mark_connect_failure();
                return Err(AttemptError::Retry(EdgeError::UpstreamUnreachable(
                    format!("connecting to replica {name}: {}", e.etype().as_str()),
                )));
            }
            Ok(Ok(s)) => s,
        };
    us.set_write_timeout(Some(t.idle));
    let write = async {
        us.write_request_header(Box::new(header)).await?;
        us.write_request_body(body, true).await?;
        us.finish_request_body().await
    };
    if let Err(e) = write.await {
        // A pooled connection the upstream closed meanwhile: a fresh one will do.
        let why = format!(
            "sending the request to replica {name} (reused: {reused}): {}",
            e.etype().as_str()
        );
        return Err(AttemptError::Retry(EdgeError::UpstreamUnreachable(why)));
    }
    let first_byte = t
        .first_byte
        .min(deadline.saturating_duration_since(Instant::now()));
    us.set_read_timeout(Some(first_byte));
    if let Err(e) = us.read_response_header().await {
        if matches!(e.etype(), ErrorType::ReadTimedout) {
            return Err(AttemptError::Fatal(EdgeError::UpstreamTimeout(format!(
                "no response header from replica {name} within {first_byte:?}"
            ))));
        }
        let why = format!(
            "reading the response header from replica {name}: {}",
            e.etype().as_str()
        );
        if reused {
            return Err(AttemptError::Retry(EdgeError::UpstreamUnreachable(why)));
        }
        replica.mark_connect_failure();
        return Err(AttemptError::Retry(EdgeError::UpstreamUnreachable(why)));
    }
    Ok(us)
}

enum Step {
    Chunk(Option<Bytes>),
    UpstreamFailed(pingora::BError),
    ClientGone,
    ClientQuiet,
    Deadline,
}

/// How the response body reaches the client.
enum Transform {
    /// Byte for byte (the normal case).
    None,
    /// SSE events re-emitted with injected fields stripped.
    Sse(SseStripper),
    /// A JSON body collected, stripped, and sent with its new length.
    Json(Strip, Vec<u8>),
}

/// Relay state for one response.
struct Relay {
    is_sse: bool,
    transform: Transform,
    /// Header not yet sent (JSON rewrite: sent with the rewritten body).
    held_header: Option<ResponseHeader>,
}

/// Hot path: relays response body chunks downstream as they arrive, watching for the client
/// going away so the upstream request is dropped promptly.
#[allow(clippy::too_many_arguments)]
async fn stream_body(
    session: &mut Session,
    connector: &Connector,
    mut us: HttpSession,
    replica: &Replica,
    mut relay: Relay,
    deadline: Instant,
    t: &crate::config::Timeouts,
    mut obs: Option<&mut Observer>,
) -> Result<(), EdgeError> {
    us.set_read_timeout(Some(t.idle));
    let sleep = tokio::time::sleep_until(deadline);
    tokio::pin!(sleep);
    let mut watch_client = true;
    // Last two bytes sent, so an error event can start on an event boundary.
    let mut tail: [u8; 2] = *b"\n\n";
    loop {
        let step = {
            let down = session.as_downstream_mut();
            tokio::select! {
                biased;
                r = us.read_response_body() => match r {
                    Ok(c) => Step::Chunk(c),
                    Err(e) => Step::UpstreamFailed(e),
                },
                r = down.read_body_or_idle(true), if watch_client => match r {
                    Err(e) if matches!(e.etype(), ErrorType::ReadTimedout) => Step::ClientQuiet,
                    Err(_) => Step::ClientGone,
                    Ok(_) => Step::ClientQuiet,
                },
                _ = &mut sleep => Step::Deadline,
            }
        };
        match step {
            Step::Chunk(Some(chunk)) => {
                // Forward first; the observer gets a cheap clone afterwards.
                let seen = obs.is_some().then(|| chunk.clone());
                let outgoing = match &mut relay.transform {
                    Transform::None => Some(chunk),
                    Transform::Sse(st) => {
                        let out = st.feed(&chunk);
                        (!out.is_empty()).then(|| Bytes::from(out))
                    }
                    Transform::Json(_, buf) => {
                        buf.extend_from_slice(&chunk);
                        None
                    }
                };
                if let Some(out) = outgoing {
                    if out.len() >= 2 {
                        tail = [out[out.len() - 2], out[out.len() - 1]];
                    } else if let Some(&b) = out.last() {
                        tail = [tail[1], b];
                    }
                    if session.write_response_body(Some(out), false).await.is_err() {
                        // Dropping `us` closes the upstream connection: the upstream sees the abort.
                        return Err(EdgeError::ClientClosed);
                    }
                }
                if let (Some(o), Some(c)) = (obs.as_deref_mut(), seen) {
                    o.on_chunk(&c);
                }
            }
            Step::Chunk(None) => {
                if let Some(o) = obs.as_deref_mut() {
                    o.finish();
                }
                if finish_body(session, &mut relay).await.is_err() {
                    return Err(EdgeError::ClientClosed);
                }
                connector
                    .release_http_session(us, &replica.peer, replica.peer.options.idle_timeout)
                    .await;
                return Ok(());
            }
            Step::ClientGone => return Err(EdgeError::ClientClosed),
            Step::ClientQuiet => watch_client = false,
            Step::UpstreamFailed(e) => {
                let err = if matches!(e.etype(), ErrorType::ReadTimedout) {
                    EdgeError::UpstreamTimeout(format!(
                        "no data from replica {} for {:?}",
                        replica.label, t.idle
                    ))
                } else {
                    EdgeError::UpstreamStreamBroken(format!(
                        "replica {}: {}",
                        replica.label,
                        e.etype().as_str()
                    ))
                };
                if relay.held_header.is_none() {
                    end_broken_stream(session, relay.is_sse, tail, &err).await;
                }
                return Err(err);
            }
            Step::Deadline => {
                let err = EdgeError::UpstreamTimeout(format!("total time {:?} exceeded", t.total));
                if relay.held_header.is_none() {
                    end_broken_stream(session, relay.is_sse, tail, &err).await;
                }
                return Err(err);
            }
        }
    }
}

/// Ends the downstream body: flushes a stripper's remainder, or sends a held header with the
/// rewritten JSON body.
async fn finish_body(session: &mut Session, relay: &mut Relay) -> pingora::Result<()> {
    match &mut relay.transform {
        Transform::None => {}
        Transform::Sse(st) => {
            let rest = st.finish();
            if !rest.is_empty() {
                session
                    .write_response_body(Some(Bytes::from(rest)), false)
                    .await?;
            }
        }
        Transform::Json(strip, buf) => {
            let body = strip
                .rewrite_json(buf)
                .map(Bytes::from)
                .unwrap_or_else(|| Bytes::from(std::mem::take(buf)));
            if let Some(mut h) = relay.held_header.take() {
                h.remove_header(&http::header::TRANSFER_ENCODING);
                h.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
                session.write_response_header(Box::new(h), false).await?;
            }
            return session.write_response_body(Some(body), true).await;
        }
    }
    session.write_response_body(None, true).await
}

/// Appends an SSE error event to a stream that broke; the caller then aborts the body so the
/// client never sees a clean end.
async fn end_broken_stream(session: &mut Session, is_sse: bool, tail: [u8; 2], err: &EdgeError) {
    if !is_sse {
        return;
    }
    let mut event = Vec::new();
    if tail != *b"\n\n" {
        event.extend_from_slice(b"\n\n");
    }
    event.extend_from_slice(&respond::stream_error_event(err));
    let _ = session
        .write_response_body(Some(Bytes::from(event)), false)
        .await;
}

/// Watches a traced response beside the forwarding path: time to first byte, and the
/// accumulated output. Parsing happens after the chunk was written downstream.
pub struct Observer {
    /// When the request started.
    pub started: std::time::Instant,
    /// Time to the first response body chunk.
    pub ttft: Option<std::time::Duration>,
    /// The output so far.
    pub acc: Accumulator,
    is_sse: bool,
}

impl Observer {
    /// An observer for a response of `flavor`.
    pub fn new(flavor: Flavor, started: std::time::Instant) -> Self {
        Self {
            started,
            ttft: None,
            acc: Accumulator::new(flavor),
            is_sse: false,
        }
    }

    fn begin(&mut self, is_sse: bool) {
        self.is_sse = is_sse;
    }

    fn on_chunk(&mut self, chunk: &[u8]) {
        if self.ttft.is_none() {
            self.ttft = Some(self.started.elapsed());
        }
        if self.is_sse {
            self.acc.feed_sse(chunk);
        } else {
            self.acc.feed_json(chunk);
        }
    }

    /// Ends the response (parses a buffered JSON body). Also called for partial output.
    pub fn finish(&mut self) {
        if !self.is_sse {
            self.acc.finish_json();
        }
    }

    /// Whether the response was SSE.
    pub fn is_sse(&self) -> bool {
        self.is_sse
    }
}
