//! `bench-mock`: a fast mock OpenAI upstream for the end-to-end benchmark (hyper 1, HTTP/1.1
//! keep-alive, one thread).
//!
//! `POST …/chat/completions` answers
//! - without a `chunks` parameter: a `chat.completion` JSON of about 400 bytes, with
//!   `Content-Length`;
//! - with `chunks=N`: an SSE stream of N `chat.completion.chunk` events, the first after
//!   `first_ms`, the next ones `gap_ms` apart (on a fixed schedule, so delays do not drift); the
//!   last event carries `finish_reason` and is followed, in the same write, by a usage event and
//!   `data: [DONE]`.
//!
//! With `logprobs=1`, the stream is shaped as vLLM sends it with `logprobs: true` and
//! `return_token_ids: true`: the first event also carries a top-level `prompt_token_ids` (57
//! ids, or `prompt=N`; as many as the usage event's `prompt_tokens`), and every chunk's choice carries
//! `"logprobs":{"content":[{"token":…,"logprob":…,"bytes":[…],"top_logprobs":[]}]}` (the token
//! is the delta's text, `bytes` its UTF-8 bytes, `logprob` a deterministic negative number of 6
//! significant digits that varies per chunk) and, after `finish_reason`, `"token_ids":[ID]`
//! (one id per chunk). Without it, chunks carry `"logprobs":null` and no token ids.
//!
//! Parameters come from the query string (`?chunks=20&first_ms=50&gap_ms=20&logprobs=1`) or,
//! when absent there, from the headers `x-mock-chunks`, `x-mock-first-ms`, `x-mock-gap-ms`,
//! `x-mock-logprobs`, `x-mock-prompt`, so one mock serves every scenario. The reply echoes the request's
//! `model` (found by a byte scan of the first KiB of the body, no JSON parse), which lets a
//! client check that a proxy renamed it.
//! `GET /health` answers `ok`.
//!
//! Usage: `bench-mock --listen 127.0.0.1:PORT`

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use llm_edge_e2e_tools::Flags;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpSocket;
use tokio::time::{Instant, Sleep};

/// Bytes of the request body searched for `"model"`.
const MODEL_SCAN: usize = 1024;

/// Longest time a stream may be asked to take before its first event or between events.
const MAX_DELAY_MS: u64 = 600_000;

fn main() {
    let flags = match Flags::from_env(&[]) {
        Ok(f) => f,
        Err(e) => fail(&e),
    };
    let listen: SocketAddr = match flags
        .required("listen")
        .and_then(|v| v.parse().map_err(|e| format!("--listen {v:?}: {e}")))
    {
        Ok(a) => a,
        Err(e) => fail(&e),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("building the runtime: {e}")));
    if let Err(e) = rt.block_on(serve(listen)) {
        fail(&e);
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("bench-mock: {msg}");
    std::process::exit(2);
}

async fn serve(listen: SocketAddr) -> Result<(), String> {
    let socket = if listen.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("creating the socket: {e}"))?;
    socket
        .set_reuseaddr(true)
        .map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    socket
        .bind(listen)
        .map_err(|e| format!("binding {listen}: {e}"))?;
    // A deep backlog: the 1,000-stream scenario opens its connections all at once.
    let listener = socket
        .listen(4096)
        .map_err(|e| format!("listening on {listen}: {e}"))?;
    eprintln!("bench-mock: listening on {listen}");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors, usually: back off instead of spinning.
                eprintln!("bench-mock: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service_fn(handle));
            // Clients and proxies closing connections are normal here.
            let _ = conn.await;
        });
    }
}

/// Stream parameters of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct StreamParams {
    chunks: usize,
    first_ms: u64,
    gap_ms: u64,
    /// vLLM-shaped chunks: per-token logprobs and token ids, prompt token ids first.
    logprobs: bool,
    /// Prompt tokens: the usage event's count, and the ids of a vLLM-shaped stream.
    prompt_tokens: usize,
}

fn param(req: &Request<Incoming>, query_name: &str, header_name: &str) -> Option<u64> {
    let from_query = req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == query_name)
            .and_then(|(_, v)| v.parse().ok())
    });
    from_query.or_else(|| {
        req.headers()
            .get(header_name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
    })
}

fn stream_params(req: &Request<Incoming>) -> Option<StreamParams> {
    let chunks = param(req, "chunks", "x-mock-chunks")?;
    Some(StreamParams {
        chunks: chunks.max(1) as usize,
        first_ms: param(req, "first_ms", "x-mock-first-ms")
            .unwrap_or(0)
            .min(MAX_DELAY_MS),
        gap_ms: param(req, "gap_ms", "x-mock-gap-ms")
            .unwrap_or(0)
            .min(MAX_DELAY_MS),
        logprobs: param(req, "logprobs", "x-mock-logprobs").is_some_and(|v| v != 0),
        prompt_tokens: param(req, "prompt", "x-mock-prompt")
            .map_or(PROMPT_TOKENS, |n| n.min(MAX_PROMPT_TOKENS) as usize),
    })
}

/// The `model` string of a JSON body, found by a byte scan of `head`; `None` when it is not a
/// plain identifier (the value is echoed into JSON without escaping).
fn model_in(head: &[u8]) -> Option<&str> {
    let key = b"\"model\"";
    let at = head.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &head[at..];
    let rest = &rest[rest.iter().position(|b| !b.is_ascii_whitespace())?..];
    let rest = rest.strip_prefix(b":")?;
    let rest = &rest[rest.iter().position(|b| !b.is_ascii_whitespace())?..];
    let rest = rest.strip_prefix(b"\"")?;
    let end = rest.iter().position(|&b| b == b'"')?;
    let model = &rest[..end];
    let plain = !model.is_empty()
        && model.len() <= 128
        && model
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._/:-".contains(b));
    if plain {
        std::str::from_utf8(model).ok()
    } else {
        None
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<MockBody>, Infallible> {
    let path = req.uri().path();
    if req.method() == Method::GET && path == "/health" {
        return Ok(reply(
            StatusCode::OK,
            "text/plain",
            Bytes::from_static(b"ok\n"),
        ));
    }
    if req.method() != Method::POST || !path.ends_with("/chat/completions") {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "application/json",
            Bytes::from_static(
                b"{\"error\":{\"message\":\"bench-mock: no such route\",\"type\":\"invalid_request_error\",\"code\":\"not_found\"}}",
            ),
        ));
    }
    let params = stream_params(&req);
    // Read the whole body (the connection is reused), keeping only its head.
    let mut head: Vec<u8> = Vec::with_capacity(MODEL_SCAN);
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                Bytes::from_static(b"bad body\n"),
            ));
        };
        if let Some(data) = frame.data_ref() {
            let room = MODEL_SCAN - head.len();
            head.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    let model = model_in(&head).unwrap_or("unknown");
    match params {
        None => Ok(reply(
            StatusCode::OK,
            "application/json",
            completion_json(model),
        )),
        Some(p) => {
            let mut resp = Response::new(MockBody::Sse(Box::new(SseBody::new(model, p))));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            Ok(resp)
        }
    }
}

fn reply(status: StatusCode, ctype: &'static str, body: Bytes) -> Response<MockBody> {
    let len = body.len();
    let mut resp = Response::new(MockBody::Full(Some(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// A non-stream reply of realistic size (about 400 bytes).
fn completion_json(model: &str) -> Bytes {
    Bytes::from(format!(
        concat!(
            r#"{{"id":"chatcmpl-bench0123456789abcdefghijklmnop","object":"chat.completion","#,
            r#""created":1700000000,"model":"{model}","system_fingerprint":"fp_bench","#,
            r#""choices":[{{"index":0,"message":{{"role":"assistant","content":"#,
            r#""This is a canned answer from the llm-edge benchmark mock upstream, about as long as a short reply.""#,
            r#"}},"logprobs":null,"finish_reason":"stop"}}],"#,
            r#""usage":{{"prompt_tokens":57,"completion_tokens":21,"total_tokens":78}}}}"#
        ),
        model = model
    ))
}

/// Prompt tokens of a stream without `prompt=N` (the ids of a `logprobs` stream are as many).
const PROMPT_TOKENS: usize = 57;
/// Most prompt tokens a stream may ask for (a long agent context).
const MAX_PROMPT_TOKENS: u64 = 200_000;
/// First prompt token id; the prompt is `PROMPT_ID0..PROMPT_ID0 + 57`.
const PROMPT_ID0: usize = 1000;
/// Token id of chunk `i` of a `logprobs` stream: `COMPLETION_ID0 + i`.
const COMPLETION_ID0: usize = 20_000;

/// The log-probability of chunk `i`'s token: `-0.dddddd`, 6 significant digits that vary from
/// chunk to chunk (a multiplicative hash of `i` mapped to 100000..=999999), written exactly as
/// vLLM's JSON would write such a float.
fn logprob_text(i: usize) -> String {
    let n = (i as u64).wrapping_mul(2_654_435_761).wrapping_add(123_457) % 900_000 + 100_000;
    format!("-0.{n}")
}

/// One SSE event of the stream; the last one also carries the usage event and `[DONE]`. With
/// `logprobs`, the event is vLLM-shaped (see the module doc), the first one with `prompt`
/// prompt token ids; without, it has `"logprobs":null`.
fn chunk_event(model: &str, i: usize, last: bool, logprobs: bool, prompt: usize) -> Bytes {
    let finish = if last { r#""stop""# } else { "null" };
    let token = format!(" tok{i:05}");
    let mut s = format!(
        concat!(
            r#"data: {{"id":"chatcmpl-bench0123456789abcdefghijklmnop","object":"chat.completion.chunk","#,
            r#""created":1700000000,"model":"{model}","choices":[{{"index":0,"delta":{{"content":"{token}"}},"#,
        ),
        model = model,
        token = token,
    );
    if logprobs {
        // The token is plain ASCII (no JSON escaping needed).
        let _ = write!(
            s,
            r#""logprobs":{{"content":[{{"token":"{token}","logprob":{lp},"bytes":["#,
            lp = logprob_text(i),
        );
        for (k, b) in token.bytes().enumerate() {
            let sep = if k == 0 { "" } else { "," };
            let _ = write!(s, "{sep}{b}");
        }
        let _ = write!(
            s,
            r#"],"top_logprobs":[]}}]}},"finish_reason":{finish},"token_ids":[{id}]}}]"#,
            id = COMPLETION_ID0 + i,
        );
        if i == 0 {
            s.push_str(r#","prompt_token_ids":["#);
            for id in PROMPT_ID0..PROMPT_ID0 + prompt {
                let sep = if id == PROMPT_ID0 { "" } else { "," };
                let _ = write!(s, "{sep}{id}");
            }
            s.push(']');
        }
        s.push_str("}\n\n");
    } else {
        let _ = write!(s, "\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n");
    }
    if last {
        let _ = write!(
            s,
            concat!(
                r#"data: {{"id":"chatcmpl-bench0123456789abcdefghijklmnop","object":"chat.completion.chunk","#,
                r#""created":1700000000,"model":"{model}","choices":[],"#,
                r#""usage":{{"prompt_tokens":{p},"completion_tokens":{n},"total_tokens":{t}}}}}"#,
                "\n\n",
                "data: [DONE]\n\n"
            ),
            model = model,
            p = prompt,
            n = i + 1,
            t = prompt + i + 1
        );
    }
    Bytes::from(s)
}

/// Response body: a whole buffer, or a timed SSE stream.
enum MockBody {
    Full(Option<Bytes>),
    Sse(Box<SseBody>),
}

/// Emits event `i` at `start + first + i * gap`.
struct SseBody {
    model: String,
    params: StreamParams,
    next: usize,
    start: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl SseBody {
    fn new(model: &str, params: StreamParams) -> Self {
        Self {
            model: model.to_string(),
            params,
            next: 0,
            start: Instant::now(),
            timer: None,
        }
    }

    fn due(&self, i: usize) -> Instant {
        self.start
            + Duration::from_millis(self.params.first_ms)
            + Duration::from_millis(self.params.gap_ms) * i as u32
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            MockBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Sse(s) => {
                if s.next >= s.params.chunks {
                    return Poll::Ready(None);
                }
                let due = s.due(s.next);
                if due > Instant::now() {
                    let timer = match s.timer.as_mut() {
                        Some(t) => {
                            if t.deadline() != due {
                                t.as_mut().reset(due);
                            }
                            t
                        }
                        None => s.timer.insert(Box::pin(tokio::time::sleep_until(due))),
                    };
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                let i = s.next;
                s.next += 1;
                let last = s.next == s.params.chunks;
                let event =
                    chunk_event(&s.model, i, last, s.params.logprobs, s.params.prompt_tokens);
                Poll::Ready(Some(Ok(Frame::data(event))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(b) => b.is_none(),
            MockBody::Sse(s) => s.next >= s.params.chunks,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Sse(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_is_found_by_byte_scan() {
        assert_eq!(
            model_in(br#"{"model":"bench","messages":[]}"#),
            Some("bench")
        );
        assert_eq!(model_in(br#"{ "model" : "org/m-1.5" }"#), Some("org/m-1.5"));
        assert_eq!(model_in(br#"{"model":"a\"b"}"#), None);
        assert_eq!(model_in(br#"{"messages":[]}"#), None);
    }

    #[test]
    fn replies_are_valid_json_of_realistic_size() {
        let b = completion_json("bench");
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["model"], "bench");
        assert!((350..=450).contains(&b.len()), "{} bytes", b.len());
        let last = chunk_event("bench", 19, true, false, PROMPT_TOKENS);
        let text = std::str::from_utf8(&last).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"));
        for ev in text
            .split("\n\n")
            .filter(|e| !e.is_empty() && *e != "data: [DONE]")
        {
            serde_json::from_str::<serde_json::Value>(ev.strip_prefix("data: ").unwrap()).unwrap();
        }
    }

    #[test]
    fn plain_chunks_are_unchanged() {
        // Byte for byte what the mock sent before `logprobs` existed (S3, S4, S5 depend on it).
        assert_eq!(
            &chunk_event("bench", 0, false, false, PROMPT_TOKENS)[..],
            concat!(
                r#"data: {"id":"chatcmpl-bench0123456789abcdefghijklmnop","object":"chat.completion.chunk","#,
                r#""created":1700000000,"model":"bench","choices":[{"index":0,"delta":{"content":" tok00000"},"#,
                r#""logprobs":null,"finish_reason":null}]}"#,
                "\n\n"
            )
            .as_bytes()
        );
        assert_eq!(
            &chunk_event("m", 2, true, false, PROMPT_TOKENS)[..],
            concat!(
                r#"data: {"id":"chatcmpl-bench0123456789abcdefghijklmnop","object":"chat.completion.chunk","#,
                r#""created":1700000000,"model":"m","choices":[{"index":0,"delta":{"content":" tok00002"},"#,
                r#""logprobs":null,"finish_reason":"stop"}]}"#,
                "\n\n",
                r#"data: {"id":"chatcmpl-bench0123456789abcdefghijklmnop","object":"chat.completion.chunk","#,
                r#""created":1700000000,"model":"m","choices":[],"#,
                r#""usage":{"prompt_tokens":57,"completion_tokens":3,"total_tokens":60}}"#,
                "\n\n",
                "data: [DONE]\n\n"
            )
            .as_bytes()
        );
    }

    #[test]
    fn logprobs_streams_are_vllm_shaped() {
        let chunks = 20;
        let stream: String = (0..chunks)
            .map(|i| {
                let ev = chunk_event("bench", i, i + 1 == chunks, true, PROMPT_TOKENS);
                String::from_utf8(ev.to_vec()).unwrap()
            })
            .collect();
        assert!(stream.ends_with("\n\ndata: [DONE]\n\n"), "{stream}");
        let events: Vec<&str> = stream
            .split("\n\n")
            .filter(|e| !e.is_empty() && *e != "data: [DONE]")
            .map(|e| e.strip_prefix("data: ").unwrap())
            .collect();
        assert_eq!(events.len(), chunks + 1, "the chunks and the usage event");
        let mut ids = Vec::new();
        let mut logprobs = Vec::new();
        for (i, text) in events[..chunks].iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            let choice = &v["choices"][0];
            let content = choice["delta"]["content"].as_str().unwrap();
            let entries = choice["logprobs"]["content"].as_array().unwrap();
            assert_eq!(entries.len(), 1, "{text}");
            let entry = &entries[0];
            assert_eq!(entry["token"].as_str(), Some(content), "{text}");
            let bytes: Vec<u8> = entry["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| u8::try_from(b.as_u64().unwrap()).unwrap())
                .collect();
            assert_eq!(bytes, content.as_bytes(), "{text}");
            assert_eq!(entry["top_logprobs"], serde_json::json!([]));
            let lp = entry["logprob"].as_f64().unwrap();
            assert!((-1.0..=-0.1).contains(&lp), "{text}");
            logprobs.push(lp);
            let token_ids = choice["token_ids"].as_array().unwrap();
            assert_eq!(token_ids.len(), 1, "{text}");
            ids.push(token_ids[0].as_u64().unwrap());
            let finish = if i + 1 == chunks { "stop" } else { "" };
            assert_eq!(choice["finish_reason"].as_str().unwrap_or(""), finish);
            // vLLM's field order within the choice.
            let at = |k: &str| text.find(k).unwrap_or_else(|| panic!("{k} in {text}"));
            assert!(at(r#""index":0"#) < at(r#""delta":"#));
            assert!(at(r#""delta":"#) < at(r#""logprobs":"#));
            assert!(at(r#""logprobs":"#) < at(r#""finish_reason":"#));
            assert!(at(r#""finish_reason":"#) < at(r#""token_ids":"#));
            let prompt = v.get("prompt_token_ids");
            if i == 0 {
                assert_eq!(prompt.unwrap().as_array().unwrap().len(), PROMPT_TOKENS);
            } else {
                assert!(prompt.is_none(), "{text}");
            }
        }
        ids.dedup();
        assert_eq!(
            ids.len(),
            chunks,
            "one token id per chunk, distinct: {ids:?}"
        );
        logprobs.sort_by(f64::total_cmp);
        logprobs.dedup();
        assert!(logprobs.len() > chunks / 2, "logprobs vary: {logprobs:?}");
        let usage: serde_json::Value = serde_json::from_str(events[chunks]).unwrap();
        assert_eq!(usage["usage"]["prompt_tokens"], PROMPT_TOKENS);
        assert_eq!(usage["usage"]["completion_tokens"], chunks);
        assert!(usage.get("prompt_token_ids").is_none());

        // A long prompt: as many ids as asked, counted in the usage event.
        let first = chunk_event("bench", 0, false, true, 3000);
        let text = std::str::from_utf8(&first).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(text.trim_start_matches("data: ").trim_end()).unwrap();
        let ids = v["prompt_token_ids"].as_array().unwrap();
        assert_eq!(ids.len(), 3000);
        assert_eq!(
            (ids[0].as_u64(), ids[2999].as_u64()),
            (Some(1000), Some(3999))
        );
        let last = chunk_event("bench", 1, true, true, 3000);
        let usage = std::str::from_utf8(&last)
            .unwrap()
            .split("\n\n")
            .nth(1)
            .unwrap();
        let usage: serde_json::Value =
            serde_json::from_str(usage.trim_start_matches("data: ")).unwrap();
        assert_eq!(usage["usage"]["prompt_tokens"], 3000);
        assert_eq!(usage["usage"]["total_tokens"], 3002);
    }
}
