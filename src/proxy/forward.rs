//! The forwarder (DESIGN §1): sends a fully read body over the pooled connections, retries on
//! another key or replica before the first byte goes downstream, then streams the response
//! back chunk by chunk. API calls use all of it ([`forward`]); small pass-through requests use
//! its steps (`send`, `relay`) with their own, plainer retry rule (`passthrough`).

use super::ctx::RequestCtx;
use super::headers;
use super::respond;
use crate::error::EdgeError;
use crate::observe::metrics::RetryReason;
use crate::observe::usage::UsageScanner;
use crate::shaping::body::Pieces;
use crate::shaping::strip::{SseStripper, Strip};
use crate::trace::accumulate::{Accumulator, Flavor};
use crate::upstream::connector::UpstreamConnector as Connector;
use crate::upstream::exchange::{Conn, Exchange};
use crate::upstream::h1_response::H1Response;
use crate::upstream::keys::{Pick, PooledKey};
use crate::upstream::replica::Replica;
use crate::upstream::Upstream;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::protocols::http::HttpTask;
use pingora::proxy::Session;
use pingora::ErrorType;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

/// Whether a response is Server-Sent Events.
fn is_event_stream(resp: &ResponseHeader) -> bool {
    resp.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Statuses worth another replica or key when one is left.
fn is_retryable_status(status: u16) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504)
}

/// Statuses that mean the key itself is refused.
fn is_key_refused(status: u16) -> bool {
    (401..=403).contains(&status)
}

/// Response bodies read whole before deciding on a retry, at most this long.
const DECISION_BODY_CAP: usize = 1 << 20;

/// What went wrong with one attempt, before anything was sent downstream.
pub(super) enum AttemptError {
    /// Try another replica (connect failure, bad answer on a fresh connection).
    Retry(EdgeError),
    /// A pooled connection the upstream had closed: says nothing of the replica, which may
    /// take the request again on a fresh connection.
    Stale(EdgeError),
    /// Give up now (timeouts: retrying would double a long wait).
    Fatal(EdgeError),
}

/// One outbound API call.
pub struct Outbound<'a> {
    /// Upstream chosen by model.
    pub upstream: &'a Arc<Upstream>,
    /// The client's method and the headers forwarded upstream.
    pub client: &'a headers::ClientHead,
    /// Path and query to send.
    pub path_and_query: &'a str,
    /// The body to send (whole, possibly edited), in the pieces it is written in.
    pub body: Pieces,
    /// Injected fields to remove from a successful response (`strip_injected_fields`).
    pub strip: Option<Strip>,
    /// Model as the upstream sees it (keys cool down per key and model).
    pub model: &'a str,
    /// Session affinity key (`key_strategy: session`).
    pub session: Option<&'a [u8]>,
    /// Whether an SSE stream that breaks gets llm-edge's error event before it is aborted
    /// (API calls); pass-through streams are only aborted, as on Pingora's proxy path.
    pub error_event: bool,
}

/// A response already read (status decided it), kept to pass through if no retry is possible.
struct Held {
    header: ResponseHeader,
    body: Bytes,
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
    let started = Instant::now();
    let deadline = started + t.total;
    let retry_deadline = started + up.cfg.retry_deadline;
    let mut tried_replicas: Vec<SocketAddr> = Vec::with_capacity(2);
    let mut tried_keys: Vec<usize> = Vec::new();
    let mut soft_keys: Vec<usize> = Vec::new();
    let mut held: Option<Box<Held>> = None;
    // Built only when the call fails: formatting it up front cost every call a `format!`.
    let mut last_err: Option<EdgeError> = None;
    let mut attempt = 0;
    // Why the previous attempt failed, and where it went (metrics: retries and failovers).
    let mut retry_reason: Option<RetryReason> = None;
    let mut prev_replica: Option<SocketAddr> = None;
    while attempt < up.cfg.max_attempts {
        if attempt > 0 && Instant::now() >= retry_deadline {
            break;
        }
        // Key first: without one there is nothing to send.
        // Keys that answered 5xx are avoided while another key is available.
        let pick = if soft_keys.is_empty() {
            up.keys.select(out.model, out.session, &tried_keys)
        } else {
            let avoid = [&tried_keys[..], &soft_keys[..]].concat();
            match up.keys.select(out.model, out.session, &avoid) {
                Pick::Key(l) => Pick::Key(l),
                _ => up.keys.select(out.model, out.session, &tried_keys),
            }
        };
        let lease = match pick {
            Pick::Key(l) => Some(l),
            Pick::NoKeys => None,
            Pick::Busy => {
                let left = retry_deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(EdgeError::RateLimited {
                        retry_after: 1,
                        why: "every upstream key is at its concurrency limit".into(),
                    });
                }
                up.keys
                    .wait_for_release(left.min(std::time::Duration::from_secs(1)))
                    .await;
                continue;
            }
            Pick::Exhausted(recovery) => {
                if let Some(h) = held.take() {
                    // The upstream already answered; its answer is the most useful one.
                    return pass_through(session, ctx, h).await;
                }
                return Err(match recovery {
                    Some(d) => EdgeError::RateLimited {
                        retry_after: d.as_secs_f64().ceil().max(1.0) as u64,
                        why: format!(
                            "every key of upstream {:?} is cooling down for model {:?}",
                            up.cfg.name, out.model
                        ),
                    },
                    None => EdgeError::CredentialsExhausted(format!(
                        "every key of upstream {:?} is refused or excluded for model {:?}",
                        up.cfg.name, out.model
                    )),
                });
            }
        };
        let replica = match up.select_replica(&tried_replicas, out.session) {
            Some(r) => r,
            // Every replica tried: a new key may still go to one of them.
            None if lease.is_some() && !tried_replicas.is_empty() => {
                match up.select_replica(&[], out.session) {
                    Some(r) => r,
                    None => break,
                }
            }
            None => break,
        };
        if attempt > 0 {
            backoff(attempt).await;
        }
        attempt += 1;
        let this_replica = replica.peer._address.as_inet().copied();
        if let Some(reason) = retry_reason.take() {
            ctx.retries.push((reason, this_replica != prev_replica));
        }
        prev_replica = this_replica;
        let attempt_started = Instant::now();
        if let Some(a) = this_replica {
            if !tried_replicas.contains(&a) {
                tried_replicas.push(a);
            }
        }
        ctx.attempts += 1;
        ctx.replica = Some(replica.label.clone());
        let key = lease.as_ref().map(|l| l.key());
        ctx.key_id = key.map(|k| k.id.clone());
        let request = Request {
            out: &out,
            key,
            ours: &ctx.upstream_headers,
        };
        let mut us = match send(connector, &replica, &request, deadline, &t).await {
            Ok(us) => us,
            Err(AttemptError::Stale(e)) => {
                // The replica may take the request again, on a fresh connection.
                tracing::info!(upstream = %up.cfg.name, replica = %replica.label, attempt, "{e}");
                tried_replicas.retain(|a| Some(*a) != this_replica);
                retry_reason = Some(RetryReason::ConnectError);
                last_err = Some(e);
                continue;
            }
            Err(AttemptError::Retry(e)) => {
                tracing::warn!(upstream = %up.cfg.name, replica = %replica.label, attempt, "{e}");
                retry_reason = Some(match e {
                    EdgeError::UpstreamTimeout(_) => RetryReason::Timeout,
                    _ => RetryReason::ConnectError,
                });
                if let Some(l) = &lease {
                    up.keys.on_error(l.index, "connect");
                }
                last_err = Some(e);
                continue;
            }
            Err(AttemptError::Fatal(e)) => return Err(e),
        };
        ctx.upstream_ttfb = Some(attempt_started.elapsed());
        let Some(resp) = us.header() else {
            return Err(EdgeError::Internal(
                "response header missing after read".into(),
            ));
        };
        let status = resp.status.as_u16();
        let key_refused = is_key_refused(status) && lease.is_some();
        if is_retryable_status(status) || key_refused {
            // Read the (small) answer: it carries retry hints, and is passed through as it is
            // when no other key or replica can take the request.
            let Some(h) = read_decision_body(&mut us, &t).await else {
                ctx.status = status;
                let r = relay(session, &mut us, &replica, &out, ctx, obs, deadline, &t).await;
                ctx.upstream_time = Some(attempt_started.elapsed());
                if r.is_ok() {
                    connector.release(us, &replica).await;
                }
                return r;
            };
            connector.release(us, &replica).await;
            if let Some(l) = &lease {
                if status == 429 {
                    let hint = crate::upstream::cooldown::hint(
                        &h.header.headers,
                        &h.body,
                        std::time::SystemTime::now(),
                    );
                    let d = up.keys.on_rate_limited(l.index, out.model, hint);
                    tracing::info!(upstream = %up.cfg.name, key = %l.key().id, model = %out.model, "key rate limited; cooling down for {d:?}");
                    tried_keys.push(l.index);
                } else if key_refused {
                    if up.keys.on_auth_failure(l.index, status) {
                        tracing::warn!(upstream = %up.cfg.name, key = %l.key().id, status, "upstream refused the key; it is excluded until reset (or a reload that changes its secret)");
                    }
                    tried_keys.push(l.index);
                } else {
                    up.keys.on_error(l.index, "upstream_5xx");
                    soft_keys.push(l.index);
                }
            }
            retry_reason = Some(match status {
                429 => RetryReason::RateLimited,
                s if is_key_refused(s) => RetryReason::Auth,
                _ => RetryReason::ServerError,
            });
            if status >= 500 {
                replica.mark_server_error();
            }
            if key_refused {
                last_err = Some(EdgeError::CredentialsExhausted(format!(
                    "the last key tried was refused with {status}"
                )));
            } else {
                held = Some(h);
            }
            let more = attempt < up.cfg.max_attempts && Instant::now() < retry_deadline;
            let other_replica = up.select_replica(&tried_replicas, out.session).is_some();
            let other_key = !up.keys.is_empty()
                && up
                    .keys
                    .has_eligible(out.model, &[&tried_keys[..], &soft_keys[..]].concat());
            let worth = match status {
                429 => other_key || (up.keys.is_empty() && other_replica),
                s if is_key_refused(s) => other_key,
                _ => other_replica || (other_key && up.keys.len() > 1),
            };
            if more && worth {
                tracing::info!(upstream = %up.cfg.name, replica = %replica.label, status, "retrying on another key or replica");
                continue;
            }
            if let Some(h) = held.take() {
                return pass_through(session, ctx, h).await;
            }
            return Err(last_err.unwrap_or_else(|| no_replica(up)));
        }
        replica.mark_ok();
        if let Some(l) = &lease {
            if (200..300).contains(&status) {
                up.keys.on_success(l.index, out.model);
            }
        }
        ctx.status = status;
        // The lease stays alive (in flight) until the response has been relayed.
        let r = relay(session, &mut us, &replica, &out, ctx, obs, deadline, &t).await;
        ctx.upstream_time = Some(attempt_started.elapsed());
        drop(lease);
        // Read to its end: the connection goes back to the pool. Any other outcome drops
        // it, which closes it (the upstream sees the abort).
        if r.is_ok() {
            connector.release(us, &replica).await;
        }
        return r;
    }
    if let Some(h) = held.take() {
        return pass_through(session, ctx, h).await;
    }
    Err(last_err.unwrap_or_else(|| no_replica(up)))
}

/// Why a call found no replica to try.
pub(super) fn no_replica(up: &Upstream) -> EdgeError {
    if up.replica_count() == 0 && up.egress_refused() > 0 {
        EdgeError::EgressRefused(format!(
            "every address upstream {:?} resolved to is refused by the egress policy",
            up.cfg.name
        ))
    } else {
        EdgeError::UpstreamUnreachable(format!(
            "upstream {:?} has no resolved replica",
            up.cfg.name
        ))
    }
}

/// Jittered exponential backoff before a retry: ~25 ms, 50 ms, 100 ms … capped at 1 s.
pub(super) async fn backoff(attempt: usize) {
    let base = 25u64 << attempt.min(6);
    let jitter = crate::ids::new_id("")
        .bytes()
        .fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64))
        % (base / 2 + 1);
    tokio::time::sleep(std::time::Duration::from_millis(
        (base / 2 + jitter).min(1000),
    ))
    .await;
}

/// Reads a whole small response (for the retry decision). `None` when it is too large or
/// streamed, in which case it must be relayed as it comes.
/// Boxed: a held response waits across retries inside the call's future (S5 memory).
async fn read_decision_body(us: &mut Exchange, t: &crate::config::Timeouts) -> Option<Box<Held>> {
    let header = us.header()?.clone();
    let is_sse = is_event_stream(&header);
    let declared = header
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if is_sse || declared.is_some_and(|n| n > DECISION_BODY_CAP) {
        return None;
    }
    us.set_read_timeout(Some(t.idle));
    let mut body = Vec::new();
    loop {
        match us.read_body().await {
            Ok(Some(c)) => {
                body.extend_from_slice(&c);
                if body.len() > DECISION_BODY_CAP {
                    // Too large to hold: cannot be replayed, so no retry either.
                    return Some(Box::new(Held {
                        header,
                        body: Bytes::from(body),
                    }));
                }
            }
            Ok(None) => break,
            Err(_) => break,
        }
    }
    Some(Box::new(Held {
        header,
        body: Bytes::from(body),
    }))
}

/// Sends a held upstream response to the client unchanged (status, headers, body).
async fn pass_through(
    session: &mut Session,
    ctx: &mut RequestCtx,
    h: Box<Held>,
) -> Result<(), EdgeError> {
    ctx.status = h.header.status.as_u16();
    let Held { header, body } = *h;
    let mut down = headers::downstream_response(header, &ctx.response_headers)
        .map_err(|e| EdgeError::Internal(format!("building the downstream response: {e}")))?;
    down.remove_header(&http::header::TRANSFER_ENCODING);
    down.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())
        .map_err(|e| EdgeError::Internal(format!("building the downstream response: {e}")))?;
    if session
        .write_response_header(Box::new(down), false)
        .await
        .is_err()
    {
        return Err(EdgeError::ClientClosed);
    }
    ctx.responded = true;
    if session.write_response_body(Some(body), true).await.is_err() {
        return Err(EdgeError::ClientClosed);
    }
    Ok(())
}

/// Relays a response whose header has been read: header now (or held for a JSON rewrite),
/// then the body chunk by chunk.
#[allow(clippy::too_many_arguments)]
pub(super) async fn relay(
    session: &mut Session,
    us: &mut Exchange,
    replica: &Replica,
    out: &Outbound<'_>,
    ctx: &mut RequestCtx,
    obs: Option<&mut Observer>,
    deadline: Instant,
    t: &crate::config::Timeouts,
) -> Result<(), EdgeError> {
    let Some(resp) = us.take_header() else {
        return Err(EdgeError::Internal(
            "response header missing after read".into(),
        ));
    };
    let status = resp.status.as_u16();
    let is_sse = is_event_stream(&resp);
    let mut down = headers::downstream_response(resp, &ctx.response_headers)
        .map_err(|e| EdgeError::Internal(format!("building the downstream response: {e}")))?;
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
        error_event: is_sse && out.error_event,
        transform,
        held_header: None,
        header_sent: false,
    };
    // From here the stream's own idle timer (in `stream_body`) replaces a timeout per read.
    us.set_read_timeout(None);
    let mut initial = None;
    if matches!(relay.transform, Transform::Json(..)) {
        // The rewritten body changes length: the header waits for the whole body.
        relay.held_header = Some(down);
    } else {
        if matches!(relay.transform, Transform::Sse(_)) {
            down.remove_header(&http::header::CONTENT_LENGTH);
            let _ = down.insert_header(http::header::TRANSFER_ENCODING, "chunked");
        }
        // When body bytes arrived with the header, send both in one write (one wakeup of the
        // client instead of two); otherwise the header goes now, so the client sees it while
        // the upstream is still thinking.
        match us.read_ready() {
            Some(Ok(c)) => {
                relay.held_header = Some(down);
                initial = Some(Step::Chunk(c));
            }
            other => {
                if session
                    .write_response_header(Box::new(down), false)
                    .await
                    .is_err()
                {
                    return Err(EdgeError::ClientClosed);
                }
                relay.header_sent = true;
                initial = match other {
                    Some(Err(e)) => Some(Step::UpstreamFailed(e)),
                    _ => None,
                };
            }
        }
    }
    let r = stream_body(session, us, replica, &mut relay, initial, deadline, t, obs).await;
    ctx.responded = relay.header_sent;
    r
}

/// What one attempt sends (the key may differ between attempts).
pub(super) struct Request<'a> {
    /// The call.
    pub out: &'a Outbound<'a>,
    /// The upstream key of this attempt.
    pub key: Option<&'a PooledKey>,
    /// Headers llm-edge sets itself (forwarding headers, request id).
    pub ours: &'a [(http::HeaderName, http::HeaderValue)],
}

/// Writes all of `bufs` (vectored: one syscall for head and body when the socket takes it).
async fn write_all_vectored(
    stream: &mut pingora::protocols::Stream,
    mut bufs: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    while !bufs.is_empty() {
        let n = stream.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut bufs, n);
    }
    stream.flush().await
}

/// Sends the request on `us`. HTTP/1: head and body written together, straight from the
/// client's header (no upstream header map); HTTP/2: through Pingora's session.
async fn write_request(
    conn: Conn,
    replica: &Replica,
    req: &Request<'_>,
    idle: std::time::Duration,
) -> Result<Exchange, AttemptError> {
    let out = req.out;
    let build_failed = |e: pingora::BError| {
        AttemptError::Fatal(EdgeError::Internal(format!(
            "building the upstream request: {e}"
        )))
    };
    match conn {
        Conn::H1(mut stream) => {
            let mut head = bytes::BytesMut::with_capacity(512 + out.client.headers.len() * 48);
            headers::api_request_h1_head(
                &mut head,
                out.client,
                out.path_and_query,
                &replica.endpoint,
                req.key,
                out.body.len(),
                req.ours,
            )
            .map_err(build_failed)?;
            // Head and body pieces in one vectored write; on the stack for up to 3 pieces.
            let empty = std::io::IoSlice::new(&[]);
            let mut small = [empty; 4];
            let mut many = Vec::new();
            let bufs: &mut [std::io::IoSlice<'_>] = if out.body.count() < small.len() {
                let pieces = std::iter::once(&head[..]).chain(out.body.parts().map(|p| &p[..]));
                for (slot, p) in small.iter_mut().zip(pieces) {
                    *slot = std::io::IoSlice::new(p);
                }
                &mut small[..1 + out.body.count()]
            } else {
                many.push(std::io::IoSlice::new(&head));
                many.extend(out.body.parts().map(|p| std::io::IoSlice::new(p)));
                &mut many[..]
            };
            // Pingora's timer wheel: arming a tokio timer costs a wake-up syscall per request.
            match pingora::time::fast_timeout::fast_timeout(
                idle,
                write_all_vectored(&mut stream, bufs),
            )
            .await
            {
                Ok(Ok(())) => Ok(Exchange::H1(H1Response::new(
                    stream,
                    out.client.method == http::Method::HEAD,
                ))),
                Ok(Err(e)) => Err(sending_failed(replica, e.kind().to_string())),
                Err(_) => Err(sending_failed(replica, "write timed out".into())),
            }
        }
        Conn::Session(mut us) => {
            let header = headers::upstream_api_request(
                out.client,
                out.path_and_query,
                &replica.endpoint,
                req.key,
                out.body.len(),
                req.ours,
            )
            .map_err(build_failed)?;
            us.set_write_timeout(Some(idle));
            let write = async {
                us.write_request_header(Box::new(header)).await?;
                us.write_request_body(out.body.to_bytes(), true).await?;
                us.finish_request_body().await
            };
            match write.await {
                Ok(()) => Ok(Exchange::Session(*us)),
                Err(e) => Err(sending_failed(replica, e.etype().as_str().to_string())),
            }
        }
    }
}

/// A pooled connection the upstream closed meanwhile: a fresh one will do.
fn sending_failed(replica: &Replica, why: String) -> AttemptError {
    AttemptError::Retry(EdgeError::UpstreamUnreachable(format!(
        "sending the request to replica {}: {why}",
        replica.label
    )))
}

/// Connects (or reuses a pooled connection), sends header and body, reads the response header.
pub(super) async fn send(
    connector: &Connector,
    replica: &Replica,
    req: &Request<'_>,
    deadline: Instant,
    t: &crate::config::Timeouts,
) -> Result<Exchange, AttemptError> {
    let name = &replica.label;
    let left = deadline.saturating_duration_since(Instant::now());
    // The peer's own connect timeout (`timeouts.connect`) already bounds a new connection, so
    // the total deadline needs a timer of its own only when it is the nearer one. Arming one
    // always would mean a tokio timer per request: the total (1 h by default) is above
    // Pingora's fast-timer threshold, and each tokio timer costs a wake-up syscall.
    let got = if left < t.connect {
        match pingora::time::fast_timeout::fast_timeout(left, connector.get(replica)).await {
            Ok(got) => got,
            Err(_) => {
                return Err(AttemptError::Fatal(EdgeError::UpstreamTimeout(format!(
                    "connecting to replica {name}"
                ))))
            }
        }
    } else {
        connector.get(replica).await
    };
    let (us, reused) = match got {
        Err(e) => {
            replica.mark_connect_failure();
            return Err(AttemptError::Retry(EdgeError::UpstreamUnreachable(
                format!("connecting to replica {name}: {}", e.etype().as_str()),
            )));
        }
        Ok(s) => s,
    };
    // Boxed: writing is brief, but its state is the largest of the whole call, which would
    // otherwise keep every open stream's future that large (S5 peak memory).
    let mut us = match Box::pin(write_request(us, replica, req, t.idle)).await {
        Err(AttemptError::Retry(e)) if reused => return Err(AttemptError::Stale(e)),
        other => other?,
    };
    let first_byte = t
        .first_byte
        .min(deadline.saturating_duration_since(Instant::now()));
    us.set_read_timeout(Some(first_byte));
    if let Err(e) = us.read_header().await {
        if matches!(e.etype(), ErrorType::ReadTimedout) {
            return Err(AttemptError::Fatal(EdgeError::UpstreamTimeout(format!(
                "no response header from replica {name} within {first_byte:?}"
            ))));
        }
        let why = match (e.etype(), &e.context) {
            // The reader says what was wrong with the answer (status line, a length, size).
            (ErrorType::InvalidHTTPHeader, Some(what)) => {
                format!("replica {name} sent an invalid response: {}", what.as_str())
            }
            _ => format!(
                "reading the response header from replica {name}: {}",
                e.etype().as_str()
            ),
        };
        if reused {
            return Err(AttemptError::Stale(EdgeError::UpstreamUnreachable(why)));
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
    /// The idle timer found the upstream quiet for too long.
    Idle,
}

/// Most bytes sent downstream in one write when several chunks are already waiting.
const COALESCE_LIMIT: usize = 64 << 10;

/// Hot path: appends body chunks that have already arrived (no waiting) to `first`, so a burst
/// of small SSE chunks leaves in one write instead of one syscall each. Returns the end or
/// error seen while doing so, to be handled after the write.
fn coalesce_ready(us: &mut Exchange, first: Bytes) -> (Bytes, Option<Step>) {
    // The chunks are gathered first and copied once into a buffer of the exact size: growing
    // one buffer chunk by chunk reallocated several times per burst (callgrind S3).
    let mut more: Vec<Bytes> = Vec::new();
    let mut len = first.len();
    let mut next = None;
    while len < COALESCE_LIMIT {
        match us.read_ready() {
            Some(Ok(Some(c))) => {
                len += c.len();
                if more.is_empty() {
                    more.reserve(16);
                }
                more.push(c);
            }
            Some(Ok(None)) => {
                next = Some(Step::Chunk(None));
                break;
            }
            Some(Err(e)) => {
                next = Some(Step::UpstreamFailed(e));
                break;
            }
            None => break,
        }
    }
    if more.is_empty() {
        return (first, next);
    }
    let mut buf = bytes::BytesMut::with_capacity(len);
    buf.extend_from_slice(&first);
    for c in &more {
        buf.extend_from_slice(c);
    }
    (buf.freeze(), next)
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
    /// A break ends the stream with an SSE error event first.
    error_event: bool,
    transform: Transform,
    /// Header not yet sent (JSON rewrite: sent with the rewritten body; otherwise sent with
    /// the first body bytes).
    held_header: Option<ResponseHeader>,
    /// Whether the response header went downstream.
    header_sent: bool,
}

/// Hot path: relays response body chunks downstream as they arrive, watching for the client
/// going away so the upstream request is dropped promptly.
#[allow(clippy::too_many_arguments)]
async fn stream_body(
    session: &mut Session,
    us: &mut Exchange,
    replica: &Replica,
    relay: &mut Relay,
    initial: Option<Step>,
    deadline: Instant,
    t: &crate::config::Timeouts,
    mut obs: Option<&mut Observer>,
) -> Result<(), EdgeError> {
    let mut watch_client = true;
    // Last two bytes sent, so an error event can start on an event boundary.
    let mut tail: [u8; 2] = *b"\n\n";
    let mut pending: Option<Step> = initial;
    // One idle timer per stream, re-armed only when it fires before the current wait has been
    // quiet long enough. A read timeout registered Pingora's timer on every wait (about 40 per
    // S4 stream, a tenth of the stream's instructions). Boxed: the call future stays small.
    let mut timer = Box::pin(pingora::time::sleep(
        t.idle
            .min(deadline.saturating_duration_since(Instant::now())),
    ));
    loop {
        let waiting_since = Instant::now();
        let step = if let Some(p) = pending.take() {
            p
        } else if waiting_since >= deadline {
            Step::Deadline
        } else {
            let down = session.as_downstream_mut();
            tokio::select! {
                biased;
                r = us.read_body() => match r {
                    Ok(c) => Step::Chunk(c),
                    Err(e) => Step::UpstreamFailed(e),
                },
                r = down.read_body_or_idle(true), if watch_client => match r {
                    Err(e) if matches!(e.etype(), ErrorType::ReadTimedout) => {
                        Step::ClientQuiet
                    }
                    Err(_) => Step::ClientGone,
                    Ok(_) => Step::ClientQuiet,
                },
                () = &mut timer => {
                    match quiet_verdict(Instant::now(), waiting_since, deadline, t.idle) {
                        Quiet::Deadline => Step::Deadline,
                        Quiet::Idle => Step::Idle,
                        Quiet::Rearm(d) => {
                            timer.set(pingora::time::sleep(d));
                            continue;
                        }
                    }
                }
            }
        };
        match step {
            Step::Chunk(Some(chunk)) => {
                let (chunk, next) = coalesce_ready(us, chunk);
                pending = next;
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
                let json_hold = matches!(relay.transform, Transform::Json(..));
                if let Some(out) = outgoing {
                    if out.len() >= 2 {
                        tail = [out[out.len() - 2], out[out.len() - 1]];
                    } else if let Some(&b) = out.last() {
                        tail = [tail[1], b];
                    }
                    let written = match relay.held_header.take() {
                        Some(h) => {
                            let tasks = vec![
                                HttpTask::Header(Box::new(h), false),
                                HttpTask::Body(Some(out), false),
                            ];
                            // Once per stream; boxed, as its future is the largest here.
                            let r = Box::pin(session.write_response_tasks(tasks)).await;
                            relay.header_sent = true;
                            r.map(|_| ())
                        }
                        None => session.write_response_body(Some(out), false).await,
                    };
                    if written.is_err() {
                        // The caller drops `us`, closing the upstream connection: the
                        // upstream sees the abort.
                        return Err(EdgeError::ClientClosed);
                    }
                } else if !json_hold {
                    if let Some(h) = relay.held_header.take() {
                        relay.header_sent = true;
                        if session
                            .write_response_header(Box::new(h), false)
                            .await
                            .is_err()
                        {
                            return Err(EdgeError::ClientClosed);
                        }
                    }
                }
                if let (Some(o), Some(c)) = (obs.as_deref_mut(), seen) {
                    o.on_chunk(&c);
                }
            }
            Step::Chunk(None) => {
                if finish_body(session, relay).await.is_err() {
                    return Err(EdgeError::ClientClosed);
                }
                // The client has everything: now parse what was observed.
                if let Some(o) = obs.as_deref_mut() {
                    o.finish();
                }
                return Ok(());
            }
            Step::ClientGone => return Err(EdgeError::ClientClosed),
            Step::ClientQuiet => watch_client = false,
            Step::UpstreamFailed(_) | Step::Idle | Step::Deadline => {
                let err = match step {
                    Step::UpstreamFailed(e) if !matches!(e.etype(), ErrorType::ReadTimedout) => {
                        EdgeError::UpstreamStreamBroken(format!(
                            "replica {}: {}",
                            replica.label,
                            e.etype().as_str()
                        ))
                    }
                    Step::Deadline => {
                        EdgeError::UpstreamTimeout(format!("total time {:?} exceeded", t.total))
                    }
                    // The idle timer fired, or a read timed out.
                    _ => EdgeError::UpstreamTimeout(format!(
                        "no data from replica {} for {:?}",
                        replica.label, t.idle
                    )),
                };
                if relay.held_header.is_none() {
                    end_broken_stream(session, relay.error_event, tail, &err).await;
                }
                return Err(err);
            }
        }
    }
}

/// What a fired idle timer means for the wait that began at `since`.
#[derive(Debug, PartialEq)]
enum Quiet {
    /// The call's total time is up.
    Deadline,
    /// The upstream has sent nothing for the idle timeout.
    Idle,
    /// The timer was armed before this wait began: wait this much longer.
    Rearm(std::time::Duration),
}

/// Hot path (once per idle period, not per read): judges a fired idle timer.
fn quiet_verdict(
    now: Instant,
    since: Instant,
    deadline: Instant,
    idle: std::time::Duration,
) -> Quiet {
    if now >= deadline {
        return Quiet::Deadline;
    }
    let quiet_until = since + idle;
    if now >= quiet_until {
        return Quiet::Idle;
    }
    Quiet::Rearm(quiet_until.min(deadline) - now)
}

/// Ends the downstream body: flushes a stripper's remainder, or sends a held header with the
/// rewritten JSON body.
async fn finish_body(session: &mut Session, relay: &mut Relay) -> pingora::Result<()> {
    if !matches!(relay.transform, Transform::Json(..)) {
        if let Some(h) = relay.held_header.take() {
            relay.header_sent = true;
            session.write_response_header(Box::new(h), false).await?;
        }
    }
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
                relay.header_sent = true;
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

/// The request's side of a traced call, kept from the parse the call is routed by.
pub struct ObservedRequest {
    /// `messages`/`prompt`/`input`, raw.
    pub input: crate::trace::record::TraceInput,
    /// The body asked for a stream.
    pub stream: bool,
}

/// Watches a traced response beside the forwarding path: time to first byte, and the
/// accumulated output. Parsing happens after the chunk was written downstream.
pub struct Observer {
    /// When the request started.
    pub started: std::time::Instant,
    /// Time to the first response body chunk.
    pub ttft: Option<std::time::Duration>,
    /// The output so far (traced calls).
    pub acc: Option<Accumulator>,
    /// The request's side of the trace, read from the body's parse (traced calls).
    pub request: Option<ObservedRequest>,
    /// Usage byte scanner (untraced calls counted in the ledger).
    scanner: Option<UsageScanner>,
    want_usage: bool,
    is_sse: bool,
}

impl Observer {
    /// An observer for a response of `flavor`: `trace` accumulates the whole output,
    /// `usage` (when not tracing) only scans for token usage.
    pub fn new(flavor: Flavor, started: std::time::Instant, trace: bool, usage: bool) -> Self {
        Self {
            started,
            ttft: None,
            acc: trace.then(|| Accumulator::new(flavor)),
            request: None,
            scanner: None,
            want_usage: usage && !trace,
            is_sse: false,
        }
    }

    fn begin(&mut self, is_sse: bool) {
        self.is_sse = is_sse;
        if self.want_usage {
            self.scanner = Some(UsageScanner::new(is_sse));
        }
    }

    fn on_chunk(&mut self, chunk: &[u8]) {
        if self.ttft.is_none() {
            self.ttft = Some(self.started.elapsed());
        }
        if let Some(acc) = self.acc.as_mut() {
            if self.is_sse {
                acc.feed_sse(chunk);
            } else {
                acc.feed_json(chunk);
            }
        }
        if let Some(s) = self.scanner.as_mut() {
            s.feed(chunk);
        }
    }

    /// Ends the response (parses a buffered JSON body). Also called for partial output.
    pub fn finish(&mut self) {
        if !self.is_sse {
            if let Some(acc) = self.acc.as_mut() {
                acc.finish_json();
            }
        }
    }

    /// Token usage reported by the upstream, if seen.
    pub fn tokens(&mut self) -> Option<crate::trace::record::Tokens> {
        match (self.acc.as_ref(), self.scanner.as_mut()) {
            (Some(acc), _) => acc.usage(),
            (None, Some(s)) => s.finish(),
            (None, None) => None,
        }
    }

    /// Whether the response was SSE.
    pub fn is_sse(&self) -> bool {
        self.is_sse
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_fired_idle_timer_is_judged_from_the_current_wait() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let deadline = t0 + s(100);
        // Armed at t0 for 10 s; data kept coming, and this wait began at 7 s.
        assert_eq!(
            quiet_verdict(t0 + s(10), t0 + s(7), deadline, s(10)),
            Quiet::Rearm(s(7))
        );
        // Quiet since the wait began 10 s ago.
        assert_eq!(
            quiet_verdict(t0 + s(17), t0 + s(7), deadline, s(10)),
            Quiet::Idle
        );
        // A re-armed timer never runs past the total deadline.
        assert_eq!(
            quiet_verdict(t0 + s(95), t0 + s(94), deadline, s(10)),
            Quiet::Rearm(s(5))
        );
        // The deadline wins over the idle timeout when both are due.
        assert_eq!(
            quiet_verdict(t0 + s(110), t0 + s(90), deadline, s(10)),
            Quiet::Deadline
        );
    }
}
