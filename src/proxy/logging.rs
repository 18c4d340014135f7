//! The end of every request: metrics and the access log line, from what the context gathered.
//! Runs in Pingora's `logging` phase, after the response is complete.

use super::ctx::RequestCtx;
use crate::observe::access_log::AccessRecord;
use crate::observe::metrics::{Metrics, RejectReason, RequestKind};
use crate::runtime::Runtime;
use pingora::proxy::Session;
use std::time::SystemTime;

/// The rejection a client-facing error code counts as, if any.
pub fn reject_reason(code: &str) -> Option<RejectReason> {
    Some(match code {
        "invalid_api_key" => RejectReason::Auth,
        "model_not_allowed" => RejectReason::ForbiddenModel,
        "rate_limit_exceeded" => RejectReason::RateLimit,
        "request_too_large" => RejectReason::BodyTooLarge,
        "headers_too_large" => RejectReason::HeadersTooLarge,
        "uri_too_long" => RejectReason::UriTooLong,
        "request_timeout" => RejectReason::RequestTimeout,
        "overloaded" => RejectReason::Overloaded,
        "egress_refused" => RejectReason::Egress,
        "origin_not_allowed" => RejectReason::Cors,
        "invalid_json" | "missing_model" | "bad_request" => RejectReason::BadRequest,
        _ => return None,
    })
}

/// Records the finished request in metrics and the access log.
pub fn finish(rt: &Runtime, session: &Session, ctx: &mut RequestCtx) {
    if ctx.request_id.is_empty() {
        // The request failed before the first phase (e.g. an unparsable header).
        ctx.request_id = crate::ids::new_id("req_");
    }
    let ctx = &*ctx;
    let m: &Metrics = &rt.metrics;
    let elapsed = ctx.started.elapsed();
    let status = match ctx.status {
        0 => session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0),
        s => s,
    };
    // Label values must be bounded: a model name the client made up is "-".
    let model = ctx
        .model
        .as_deref()
        .filter(|name| {
            ctx.snapshot
                .as_ref()
                .is_some_and(|s| s.routes.model(name).is_some())
        })
        .unwrap_or("-");
    let upstream = ctx.upstream.as_deref().unwrap_or("-");
    m.record_request(ctx.kind, model, upstream, status, elapsed);
    if ctx.kind != RequestKind::Local {
        let overhead = elapsed.saturating_sub(ctx.upstream_time.unwrap_or_default());
        m.observe_overhead(ctx.kind, overhead);
    }
    if let Some(t) = ctx.upstream_ttfb {
        m.observe_upstream_ttfb(upstream, t);
    }
    if let Some(t) = ctx.upstream_time {
        m.observe_upstream_duration(upstream, t);
    }
    for (reason, failover) in &ctx.retries {
        m.count_retry(upstream, *reason);
        if *failover {
            m.count_failover(upstream, *reason);
        }
    }
    if let Some(t) = &ctx.tokens {
        m.add_tokens(
            model,
            upstream,
            ctx.key_id.as_deref().unwrap_or("-"),
            ctx.client_id(),
            t.prompt,
            t.completion,
        );
    }
    if let Some(r) = ctx.error_code.and_then(reject_reason) {
        m.count_rejected(r);
    }
    if !rt.access_log.is_enabled() {
        return;
    }
    let req = session.req_header();
    let header = |name: &str| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    // The path as routed (rLLM slug stripped); the query is kept.
    let path = match (&ctx.path_meta, req.uri.query()) {
        (Some(meta), Some(q)) => format!("{}?{q}", meta.path),
        (Some(meta), None) => meta.path.clone(),
        (None, _) => req
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
    };
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    rt.access_log.log(AccessRecord {
        time: SystemTime::now(),
        request_id: ctx.request_id.clone(),
        client_addr: ctx.client_addr,
        client_key: ctx.client.as_ref().map(|c| c.id.clone()),
        method: req.method.to_string(),
        path,
        protocol: match req.version {
            http::Version::HTTP_2 => "HTTP/2.0",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
        status,
        bytes_in: session.body_bytes_read() as u64,
        bytes_out: session.body_bytes_sent() as u64,
        referer: header("referer"),
        user_agent: header("user-agent"),
        route: ctx.kind.as_str(),
        model: ctx.model.clone(),
        upstream: ctx.upstream.clone(),
        replica: ctx.replica.clone(),
        key_id: ctx.key_id.clone(),
        session_name: ctx
            .path_meta
            .as_ref()
            .and_then(|m| m.session_name())
            .map(str::to_string),
        total_ms: ms(elapsed),
        upstream_ms: ctx.upstream_time.map(ms),
        ttfb_ms: ctx.upstream_ttfb.map(ms),
        tokens_in: ctx.tokens.as_ref().map(|t| t.prompt),
        tokens_out: ctx.tokens.as_ref().map(|t| t.completion),
        retries: ctx.retries.len() as u32,
        error: ctx.error_code,
    });
}
