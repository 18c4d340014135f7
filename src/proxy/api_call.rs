//! API calls: read the body (bounded), route by `model`, edit the top level, forward.

use super::ctx::RequestCtx;
use super::forward::{self, Outbound};
use crate::error::EdgeError;
use crate::route::api::ApiEndpoint;
use crate::shaping::body::{json_string, Edit, TopLevel};
use crate::snapshot::Snapshot;
use bytes::{Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::proxy::Session;
use std::borrow::Cow;

/// Reads the whole request body, refusing more than `limit` bytes. A declared
/// `Content-Length` over the limit is refused before reading anything.
pub async fn read_body(session: &mut Session, limit: usize) -> Result<Bytes, EdgeError> {
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
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    return Err(EdgeError::BodyTooLarge { limit });
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(e) => {
                return Err(match e.etype() {
                    pingora::ErrorType::ReadTimedout => {
                        EdgeError::BadRequest("timed out reading the request body".into())
                    }
                    _ => EdgeError::ClientClosed,
                })
            }
        }
    }
}

/// The body to forward: `model` rewritten when the upstream id differs, every other byte as sent.
pub fn shape_body(body: &Bytes, top: &TopLevel<'_>, upstream_model: Option<&str>) -> Bytes {
    let Some(upstream_model) = upstream_model else {
        return body.clone();
    };
    let value = String::from_utf8(json_string(upstream_model)).unwrap_or_default();
    Bytes::from(top.apply(&[Edit::Set("model", Cow::Owned(value))]))
}

/// The model named by a body, or the error to answer.
pub fn model_of(top: &TopLevel<'_>) -> Result<String, EdgeError> {
    match top.get_str("model") {
        Some(m) if !m.is_empty() => Ok(m.into_owned()),
        _ => Err(EdgeError::MissingModel),
    }
}

/// Handles one API call end to end. Errors before the response started are returned for the
/// caller to answer; after that the stream was already ended.
pub async fn handle(
    session: &mut Session,
    connector: &Connector,
    snap: &Snapshot,
    api: ApiEndpoint,
    ctx: &mut RequestCtx,
) -> Result<(), EdgeError> {
    ctx.api = Some(api);
    let body = read_body(session, snap.cfg.limits.max_body).await?;
    let top = TopLevel::parse(&body)?;
    let model = model_of(&top)?;
    let Some(m) = snap.routes.model(&model) else {
        ctx.model = Some(model.clone());
        return Err(EdgeError::UnknownModel(model));
    };
    ctx.model = Some(model);
    let Some(upstream) = snap.upstreams.get(&m.upstream) else {
        return Err(EdgeError::Internal(format!(
            "model's upstream {:?} missing",
            m.upstream
        )));
    };
    ctx.upstream = Some(upstream.cfg.name.clone());
    let body = shape_body(&body, &top, m.upstream_model.as_deref());
    drop(top);
    let client = session.req_header().clone();
    let path_and_query = client
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let out = Outbound {
        upstream,
        client: &client,
        path_and_query,
        body,
    };
    forward::forward(session, connector, out, ctx).await
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

    #[test]
    fn rename_changes_only_model() {
        let b = Bytes::from_static(br#"{"model":"q","messages":[{"content":"\u00e9"}]}"#);
        let top = TopLevel::parse(&b).unwrap();
        assert_eq!(shape_body(&b, &top, None), b);
        assert_eq!(
            shape_body(&b, &top, Some("Qwen/Q")),
            Bytes::from_static(br#"{"model":"Qwen/Q","messages":[{"content":"\u00e9"}]}"#)
        );
    }
}
