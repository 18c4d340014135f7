//! Responses llm-edge writes itself (errors, `/v1/models`).

use crate::error::EdgeError;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

/// Writes a complete JSON response.
pub async fn json(session: &mut Session, status: u16, body: Bytes) -> pingora::Result<()> {
    json_with(session, status, body, &[]).await
}

/// Extra response headers (request id, CORS, rate limits).
pub type Extra = [(&'static str, String)];

fn add_extra(resp: &mut ResponseHeader, extra: &Extra) -> pingora::Result<()> {
    for (k, v) in extra {
        resp.append_header(*k, v.as_str())?;
    }
    Ok(())
}

/// Writes an empty response (CORS preflight).
pub async fn empty(session: &mut Session, status: u16, extra: &Extra) -> pingora::Result<()> {
    let mut resp = ResponseHeader::build(status, Some(extra.len() + 1))?;
    resp.insert_header(http::header::CONTENT_LENGTH, "0")?;
    add_extra(&mut resp, extra)?;
    session.write_response_header(Box::new(resp), true).await
}

/// Writes a complete JSON response with extra headers.
pub async fn json_with(
    session: &mut Session,
    status: u16,
    body: Bytes,
    extra: &Extra,
) -> pingora::Result<()> {
    let mut resp = ResponseHeader::build(status, Some(3 + extra.len()))?;
    add_extra(&mut resp, extra)?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Writes a complete response with the given content type.
pub async fn text(
    session: &mut Session,
    status: u16,
    ctype: &str,
    body: Bytes,
) -> pingora::Result<()> {
    let mut resp = ResponseHeader::build(status, Some(2))?;
    resp.insert_header(http::header::CONTENT_TYPE, ctype)?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Writes our OpenAI-shaped error response (with `Retry-After` when the error has one).
pub async fn error(session: &mut Session, err: &EdgeError) -> pingora::Result<()> {
    error_with(session, err, &[]).await
}

/// [`error`] with extra headers.
pub async fn error_with(
    session: &mut Session,
    err: &EdgeError,
    extra: &Extra,
) -> pingora::Result<()> {
    let body = err.body();
    let mut resp = ResponseHeader::build(err.status(), Some(4 + extra.len()))?;
    add_extra(&mut resp, extra)?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    if let Some(secs) = err.retry_after() {
        resp.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// The SSE event that ends a stream which broke after it started.
pub fn stream_error_event(err: &EdgeError) -> Bytes {
    let body = err.body();
    let mut out = Vec::with_capacity(body.len() + 10);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&body);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}
