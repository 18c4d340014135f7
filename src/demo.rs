//! A built-in OpenAI-compatible mock upstream for the quick start and smoke tests: answers
//! chat/completions (JSON or SSE), completions, embeddings and `/v1/models` with canned data.

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::time::Duration;

/// The demo upstream service (answers everything itself, never proxies).
pub struct DemoUpstream;

const WORDS: [&str; 6] = ["Hello", " from", " the", " llm-edge", " demo", " upstream."];

async fn write(
    session: &mut Session,
    status: u16,
    ctype: &str,
    body: Bytes,
) -> pingora::Result<()> {
    crate::proxy::respond::text(session, status, ctype, body).await
}

fn model_of(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("model").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_else(|| "demo".to_string())
}

#[async_trait]
impl ProxyHttp for DemoUpstream {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> pingora::Result<bool> {
        let path = session.req_header().uri.path().to_string();
        let mut body = Vec::new();
        while let Some(chunk) = session.read_request_body().await? {
            if body.len() + chunk.len() > (8 << 20) {
                write(
                    session,
                    413,
                    "application/json",
                    Bytes::from_static(b"{\"error\":{\"message\":\"too large\"}}"),
                )
                .await?;
                return Ok(true);
            }
            body.extend_from_slice(&chunk);
        }
        let model = model_of(&body);
        let stream = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("stream").and_then(|s| s.as_bool()))
            .unwrap_or(false);
        match path.as_str() {
            "/v1/chat/completions" if stream => {
                let mut resp = ResponseHeader::build(200, Some(2))?;
                resp.insert_header("content-type", "text/event-stream")?;
                resp.insert_header("cache-control", "no-cache")?;
                session.write_response_header(Box::new(resp), false).await?;
                for (i, w) in WORDS.iter().enumerate() {
                    let chunk = serde_json::json!({
                        "id": "chatcmpl-demo", "object": "chat.completion.chunk", "created": 0, "model": model,
                        "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": if i + 1 == WORDS.len() { Some("stop") } else { None }}]
                    });
                    session
                        .write_response_body(Some(Bytes::from(format!("data: {chunk}\n\n"))), false)
                        .await?;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                session
                    .write_response_body(Some(Bytes::from_static(b"data: [DONE]\n\n")), true)
                    .await?;
            }
            "/v1/chat/completions" => {
                let r = serde_json::json!({
                    "id": "chatcmpl-demo", "object": "chat.completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": WORDS.concat()}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
                });
                write(session, 200, "application/json", Bytes::from(r.to_string())).await?;
            }
            "/v1/completions" => {
                let r = serde_json::json!({
                    "id": "cmpl-demo", "object": "text_completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "text": WORDS.concat(), "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
                });
                write(session, 200, "application/json", Bytes::from(r.to_string())).await?;
            }
            "/v1/embeddings" => {
                let r = serde_json::json!({
                    "object": "list", "model": model,
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                    "usage": {"prompt_tokens": 3, "total_tokens": 3}
                });
                write(session, 200, "application/json", Bytes::from(r.to_string())).await?;
            }
            "/v1/models" | "/health" => {
                let r = serde_json::json!({"object": "list", "data": [{"id": "demo", "object": "model", "created": 0, "owned_by": "demo"}]});
                write(session, 200, "application/json", Bytes::from(r.to_string())).await?;
            }
            _ => {
                write(session, 404, "application/json", Bytes::from_static(b"{\"error\":{\"message\":\"not found\",\"type\":\"invalid_request_error\",\"code\":\"not_found\"}}")).await?;
            }
        }
        Ok(true)
    }

    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> pingora::Result<Box<HttpPeer>> {
        Error::e_explain(ErrorType::InternalError, "the demo upstream never proxies")
    }
}
