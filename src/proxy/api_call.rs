//! API calls: read the body (bounded), route by `model`, edit the top level, forward.

use super::ctx::RequestCtx;
use super::forward::{self, Observer, Outbound};
use crate::config::{Limits, ModelConfig, UpstreamConfig};
use crate::error::EdgeError;
use crate::observe::ledger::{CallUsage, Ledger};
use crate::route::api::ApiEndpoint;
use crate::route::slug::PathMeta;
use crate::runtime::Runtime;
use crate::shaping::body::{Edit, Pieces, TopLevel};
use crate::shaping::sampling;
use crate::shaping::strip::Strip;
use crate::snapshot::Snapshot;
use crate::trace::build::{build_record, flavor_of, CallFacts};
use crate::trace::Tracer;
use crate::upstream::connector::UpstreamConnector as Connector;
use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use serde_json::{Map, Value};
use std::borrow::Cow;

/// Reads the whole request body, refusing more than `limit` bytes. A declared
/// `Content-Length` over the limit is refused before reading anything.
pub async fn read_body(session: &mut Session, limits: &Limits) -> Result<Bytes, EdgeError> {
    read_body_up_to(session, limits, limits.max_body).await
}

/// [`read_body`] with a limit of its own; the timeouts are still `limits`'.
pub async fn read_body_up_to(
    session: &mut Session,
    limits: &Limits,
    limit: usize,
) -> Result<Bytes, EdgeError> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(EdgeError::BodyTooLarge { limit });
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
    // Each read waits at most body_timeout; past that much time in all, the average rate must
    // stay above min_body_rate (slowloris trickling one byte per timeout is refused).
    session.set_read_timeout(Some(limits.body_timeout));
    let started = std::time::Instant::now();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    return Err(EdgeError::BodyTooLarge { limit });
                }
                buf.extend_from_slice(&chunk);
                let elapsed = started.elapsed();
                if limits.min_body_rate > 0
                    && elapsed > limits.body_timeout
                    && (buf.len() as f64) < limits.min_body_rate as f64 * elapsed.as_secs_f64()
                {
                    return Err(EdgeError::RequestTimeout(format!(
                        "request body arrives slower than {} bytes/s",
                        limits.min_body_rate
                    )));
                }
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(e) => {
                return Err(match e.etype() {
                    pingora::ErrorType::ReadTimedout => EdgeError::RequestTimeout(format!(
                        "no request body data for {:?}",
                        limits.body_timeout
                    )),
                    _ => EdgeError::ClientClosed,
                })
            }
        }
    }
}

/// The body to forward and what was injected into it.
#[derive(Debug)]
pub struct Shaped {
    /// Body to send upstream: the client's buffer, or slices of it around the edits.
    pub body: Pieces,
    /// Fields added that the client did not send.
    pub injected: Vec<String>,
}

/// Shapes the body for the upstream: `model` renamed when the upstream id differs, the
/// sampling policy applied (`inject` false keeps only drops), rLLM metadata added when the
/// upstream opted in. Every other byte stays as the client sent it; with nothing to change the
/// original buffer is forwarded as is.
pub fn shape_body(
    body: &Bytes,
    top: &TopLevel<'_>,
    model: &ModelConfig,
    upstream: &UpstreamConfig,
    meta: &PathMeta,
    inject: bool,
) -> Shaped {
    let planned = sampling::plan(top, &model.sampling, inject);
    let mut edits = planned.edits;
    if let Some(upstream_model) = model.upstream_model_json.as_deref() {
        edits.push(Edit::Set("model", Cow::Borrowed(upstream_model)));
    }
    if upstream.forward_metadata && meta.has_metadata() {
        if let Some(v) = metadata_with_rllm(top, meta) {
            edits.push(Edit::Set("metadata", Cow::Owned(v)));
        }
    }
    if edits.is_empty() {
        return Shaped {
            body: Pieces::whole(body.clone()),
            injected: planned.injected,
        };
    }
    Shaped {
        body: top.apply_pieces(body, &edits),
        injected: planned.injected,
    }
}

/// The client's `metadata` object with `rllm_metadata` added (a `/sessions/` id becomes
/// `{"session_id": id}`); `None` when the client's `metadata` is not an object.
fn metadata_with_rllm(top: &TopLevel<'_>, meta: &PathMeta) -> Option<String> {
    let mut obj = match top.get("metadata") {
        Some(raw) => match serde_json::from_str::<Value>(raw.get()) {
            Ok(Value::Object(m)) => m,
            _ => return None,
        },
        None => Map::new(),
    };
    let rllm = match (&meta.metadata, &meta.session_id) {
        (Some(m), _) => Value::Object(m.clone()),
        (None, Some(id)) => serde_json::json!({ "session_id": id }),
        (None, None) => return None,
    };
    obj.insert("rllm_metadata".to_string(), rllm);
    Some(Value::Object(obj).to_string())
}

/// Whether injection is on for this request: `x-llm-edge-inject: off` or the slug metadata key
/// `llm_edge_inject` set to `false`/`"off"` turns it off.
pub fn injection_enabled(client: &pingora::http::RequestHeader, meta: &PathMeta) -> bool {
    let header_off = client
        .headers
        .get(&INJECT_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("off"));
    let meta_off = meta
        .metadata
        .as_ref()
        .and_then(|m| m.get(INJECT_META_KEY))
        .is_some_and(|v| v == &Value::Bool(false) || v.as_str() == Some("off"));
    !(header_off || meta_off)
}

/// Request header that turns injection off for one call.
/// (A `HeaderName` constant, so a lookup does not parse the name first.)
pub const INJECT_HEADER: http::HeaderName = http::HeaderName::from_static("x-llm-edge-inject");
/// Slug metadata key that turns injection off for one call.
pub const INJECT_META_KEY: &str = "llm_edge_inject";

/// The model named by a body, or the error to answer.
pub fn model_of(top: &TopLevel<'_>) -> Result<String, EdgeError> {
    match top.get_str("model") {
        Some(m) if !m.is_empty() => Ok(m.into_owned()),
        _ => Err(EdgeError::MissingModel),
    }
}

/// Handles one API call end to end. Errors before the response started are returned for the
/// caller to answer; after that the stream was already ended. Traced calls get a record
/// whether they succeed or fail.
#[allow(clippy::too_many_arguments)]
pub async fn handle(
    session: &mut Session,
    connector: &Connector,
    rt: &Runtime,
    snap: &Snapshot,
    api: ApiEndpoint,
    path_and_query: &str,
    meta: &PathMeta,
    ctx: &mut RequestCtx,
) -> Result<(), EdgeError> {
    let tracer: &Tracer = &rt.tracer;
    let ledger: Option<&Ledger> = rt.ledger.as_deref();
    ctx.api = Some(api);
    let body = read_body(session, &snap.cfg.limits).await?;
    let traced = tracer.wants(meta.has_metadata());
    // Held until the record is queued, so a flush waits for this call.
    let _ticket = traced.then(|| tracer.begin());
    let timestamp = unix_now();
    // Usage is always observed (a byte scan; the token metrics, the access log, the ledger and
    // tokens-per-minute limits use it); the full accumulation only for traced calls.
    // Boxed, like the other per-call state below: this future lives as long as the stream,
    // and its size class is what each open stream costs (S5).
    let mut obs = Box::new(Observer::new(flavor_of(api), ctx.started, traced, true));
    let result = route_and_forward(
        session,
        connector,
        &rt.metrics,
        snap,
        &body,
        path_and_query,
        meta,
        ctx,
        Some(&mut *obs),
    )
    .await;
    if traced && ctx.upstream.is_some() && result.is_err() {
        // Keep what arrived before the failure.
        obs.finish();
    }
    let tokens = if ctx.attempts > 0 { obs.tokens() } else { None };
    if traced && ctx.upstream.is_some() {
        let model = ctx.model.clone().unwrap_or_default();
        let upstream_model = snap
            .routes
            .model(&model)
            .and_then(|m| m.upstream_model.clone())
            .unwrap_or_else(|| model.clone());
        let status = match &result {
            Ok(()) => ctx.status,
            Err(_) if ctx.responded => ctx.status,
            Err(e) => e.status(),
        };
        let rec = build_record(CallFacts {
            request_id: &ctx.request_id,
            api,
            model,
            upstream_model,
            upstream: ctx.upstream.as_deref().unwrap_or_default(),
            replica: ctx.replica.as_deref(),
            meta,
            body: &body,
            timestamp,
            latency_ms: ctx.started.elapsed().as_secs_f64() * 1000.0,
            status,
            error: result.as_ref().err().map(|e| e.to_string()),
            ttft: obs.ttft,
            acc: obs.acc.take(),
            request: obs.request.take(),
        });
        tracer.submit(rec);
    }
    if let (Some(c), Some(t)) = (ctx.client.as_ref(), tokens.as_ref()) {
        crate::security::rate::charge_tokens(&c.usage, &c.limit, t.total);
    }
    ctx.tokens = tokens.clone();
    // Only calls that reached an upstream are charged to it.
    if let (Some(l), Some(upstream), true) = (ledger, ctx.upstream.clone(), ctx.attempts > 0) {
        let failure = match &result {
            Ok(()) if (200..300).contains(&ctx.status) => None,
            Ok(()) => Some(match ctx.status {
                429 => "upstream_rate_limited".to_string(),
                s if s >= 500 => "upstream_5xx".to_string(),
                _ => "upstream_4xx".to_string(),
            }),
            Err(e) => Some(e.code().to_string()),
        };
        l.record(CallUsage {
            client: ctx.client_id().to_string(),
            upstream,
            key_id: ctx.key_id.clone(),
            model: ctx.model.clone().unwrap_or_default(),
            stream: ctx.stream,
            failure,
            tokens,
        });
    }
    result
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[allow(clippy::too_many_arguments)]
async fn route_and_forward(
    session: &mut Session,
    connector: &Connector,
    metrics: &crate::observe::metrics::Metrics,
    snap: &Snapshot,
    body: &Bytes,
    path_and_query: &str,
    meta: &PathMeta,
    ctx: &mut RequestCtx,
    obs: Option<&mut Observer>,
) -> Result<(), EdgeError> {
    let top = TopLevel::parse(body)?;
    let model = model_of(&top)?;
    ctx.stream = top.get_bool("stream") == Some(true);
    let mut obs = obs;
    if let Some(o) = obs.as_deref_mut().filter(|o| o.acc.is_some()) {
        o.request = Some(crate::proxy::forward::ObservedRequest {
            input: crate::trace::build::request_input(&top),
            stream: ctx.stream,
        });
    }
    if ctx.stream {
        ctx.gauges.1 = Some(metrics.stream_guard());
    }
    let Some(m) = snap.routes.model(&model) else {
        ctx.model = Some(model.clone());
        return Err(EdgeError::UnknownModel(model));
    };
    crate::security::auth::check_model_of(
        ctx.client.as_ref().and_then(|c| c.models.as_deref()),
        &model,
    )?;
    ctx.model = Some(model);
    let Some(upstream) = snap.upstreams.get(&m.upstream) else {
        return Err(EdgeError::Internal(format!(
            "model's upstream {:?} missing",
            m.upstream
        )));
    };
    ctx.upstream = Some(upstream.cfg.name.clone());
    let inject = injection_enabled(session.req_header(), meta);
    let shaped = shape_body(body, &top, m, &upstream.cfg, meta, inject);
    drop(top);
    ctx.injected = shaped.injected.clone();
    let client = super::headers::ClientHead::of(session.req_header(), &ctx.upstream_headers);
    // The usage chunk llm-edge asked for is withheld from a client that did not ask for it;
    // with strip_injected_fields everything else injected is removed too.
    let strip = if m.strip_injected_fields {
        Strip::for_injected(&shaped.injected)
    } else {
        Strip {
            usage_event: m.usage_injected
                && shaped
                    .injected
                    .iter()
                    .any(|f| f == "stream_options.include_usage"),
            ..Strip::default()
        }
    };
    let strip = (!strip.is_empty()).then_some(strip);
    let upstream_model = m.upstream_model.as_deref().unwrap_or(m.name.as_str());
    let session_value = upstream
        .cfg
        .session_header
        .as_ref()
        .and_then(|h| session.req_header().headers.get(h))
        .map(|v| v.as_bytes().to_vec())
        .or_else(|| meta.session_name().map(|s| s.as_bytes().to_vec()));
    let out = Outbound {
        upstream,
        client: &client,
        path_and_query,
        body: shaped.body,
        strip,
        model: upstream_model,
        session: session_value.as_deref(),
        error_event: true,
    };
    forward::forward(session, connector, out, ctx, obs).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_errors() {
        let m = |b: &[u8]| model_of(&TopLevel::parse(b)?);
        assert_eq!(m(br#"{"model":"q"}"#).unwrap(), "q");
        assert_eq!(m(br#"{"messages":[]}"#), Err(EdgeError::MissingModel));
        assert_eq!(m(br#"{"model":""}"#), Err(EdgeError::MissingModel));
        assert_eq!(m(br#"{"model":3}"#), Err(EdgeError::MissingModel));
        assert!(matches!(m(b"{nope"), Err(EdgeError::InvalidJson(_))));
    }

    fn setup(yaml_model: &str) -> (ModelConfig, UpstreamConfig) {
        let text = format!(
            "auth: {{mode: open}}\nupstreams: {{v: {{kind: vllm, endpoints: ['http://127.0.0.1:1'], forward_metadata: body}}}}\nmodels:\n  - {yaml_model}\n"
        );
        let c = crate::config::from_yaml_str(&text, &|_| None).unwrap();
        (c.models[0].clone(), c.upstreams["v"].clone())
    }

    fn no_meta() -> PathMeta {
        PathMeta {
            path: "/v1/chat/completions".into(),
            metadata: None,
            session_id: None,
        }
    }

    #[test]
    fn rename_changes_only_model() {
        let b = Bytes::from_static(br#"{"model":"q","messages":[{"content":"\u00e9"}]}"#);
        let top = TopLevel::parse(&b).unwrap();
        let (m, u) = setup("{name: q, upstream: v}");
        let same = shape_body(&b, &top, &m, &u, &no_meta(), true);
        assert_eq!(
            same.body.to_bytes().as_ptr(),
            b.as_ptr(),
            "unchanged body is not copied"
        );
        assert_eq!(same.body.count(), 1);
        let (m, u) = setup("{name: q, upstream: v, model: Qwen/Q}");
        assert_eq!(
            shape_body(&b, &top, &m, &u, &no_meta(), true)
                .body
                .to_bytes(),
            Bytes::from_static(br#"{"model":"Qwen/Q","messages":[{"content":"\u00e9"}]}"#)
        );
        // A name that needs escaping is written as a JSON string.
        let (m, u) = setup(r#"{name: q, upstream: v, model: "a\"b\\c\u00e9"}"#);
        assert_eq!(
            shape_body(&b, &top, &m, &u, &no_meta(), true)
                .body
                .to_bytes(),
            Bytes::from(r#"{"model":"a\"b\\cé","messages":[{"content":"\u00e9"}]}"#)
        );
    }

    #[test]
    fn injection_and_metadata_forwarding() {
        let b = Bytes::from_static(
            br#"{"model":"q","messages":[ {"content":"x"} ],"metadata":{"a":1}}"#,
        );
        let top = TopLevel::parse(&b).unwrap();
        let (m, u) = setup("{name: q, upstream: v, sampling: {set_if_absent: {logprobs: true}}}");
        let meta = PathMeta {
            path: "/v1/chat/completions".into(),
            metadata: Some(serde_json::from_str(r#"{"session_name":"s1"}"#).unwrap()),
            session_id: None,
        };
        let s = shape_body(&b, &top, &m, &u, &meta, true);
        assert_eq!(
            std::str::from_utf8(&s.body.to_bytes()).unwrap(),
            r#"{"model":"q","messages":[ {"content":"x"} ],"metadata":{"a":1,"rllm_metadata":{"session_name":"s1"}},"logprobs":true}"#
        );
        assert_eq!(s.injected, ["logprobs"]);
        let s = shape_body(&b, &top, &m, &u, &meta, false);
        assert!(!std::str::from_utf8(&s.body.to_bytes())
            .unwrap()
            .contains("logprobs"));
    }
}
