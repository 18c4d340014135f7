//! End-to-end tests of how the API-call route frames the upstream's HTTP/1 response: header and
//! body framing (`Content-Length`, chunked, close-delimited), interim responses, malformed and
//! cut-short replies, and whether the upstream connection may be used again afterwards.
//!
//! The upstream here is a raw TCP server ([`RawUpstream`]) that writes scripted bytes, in
//! pieces and with pauses, so the proxy's response parser meets every framing edge exactly as
//! written. Each test asserts what the client sees (status, headers, exact body bytes) and how
//! many upstream connections were opened.

mod common;

use common::harness::Proxy;
use common::{
    assert_error, assert_sent_then_error_event, letters, post, read_until_end, wait_logged, within,
};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CHAT: &str = "/v1/chat/completions";

/// How long any one exchange with the proxy may take before the test fails.
const EXCHANGE: Duration = Duration::from_secs(5);

/// One vLLM upstream `u` at `url` serving model `m1`, as in `tests/core_proxy.rs`, with a
/// single attempt per call: a retry on a fresh connection would hide a reply the proxy
/// mis-framed or a connection it should not have reused.
fn vllm_config(url: &str) -> String {
    format!(
        r#"
upstreams:
  u:
    kind: vllm
    endpoints: ["{url}"]
    retries: {{max_attempts: 1}}
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
models:
  - {{name: m1, upstream: u}}
"#
    )
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

// ---------------------------------------------------------------------------------------------
// A raw upstream: scripted bytes on a plain TCP socket.
// ---------------------------------------------------------------------------------------------

/// What the raw upstream does with the connection once a reply has been written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// Wait for the next request on the same connection.
    KeepOpen,
    /// Close the connection (a FIN, not a reset).
    Close,
    /// Wait, then close the connection.
    CloseLater(Duration),
}

/// A scripted reply: raw bytes written in pieces, with `gap` between consecutive writes.
#[derive(Debug, Clone)]
struct Script {
    writes: Vec<Vec<u8>>,
    gap: Duration,
    after: After,
}

impl Script {
    /// `bytes` in one write, connection kept open.
    fn whole(bytes: impl AsRef<[u8]>) -> Self {
        Self {
            writes: vec![bytes.as_ref().to_vec()],
            gap: Duration::ZERO,
            after: After::KeepOpen,
        }
    }

    /// `bytes` cut at each of `offsets` (ascending), one write per piece, `gap` apart.
    fn split(bytes: impl AsRef<[u8]>, offsets: &[usize], gap: Duration) -> Self {
        let bytes = bytes.as_ref();
        let mut writes = Vec::new();
        let mut from = 0;
        for &at in offsets {
            assert!(
                from < at && at < bytes.len(),
                "split offset {at} out of order"
            );
            writes.push(bytes[from..at].to_vec());
            from = at;
        }
        writes.push(bytes[from..].to_vec());
        Self {
            writes,
            gap,
            after: After::KeepOpen,
        }
    }

    /// `bytes` one byte per write, `gap` apart.
    fn bytewise(bytes: impl AsRef<[u8]>, gap: Duration) -> Self {
        Self {
            writes: bytes.as_ref().iter().map(|&b| vec![b]).collect(),
            gap,
            after: After::KeepOpen,
        }
    }

    /// Sets what happens to the connection after the reply.
    fn then(mut self, after: After) -> Self {
        self.after = after;
        self
    }
}

/// One request as the raw upstream read it.
#[derive(Debug, Clone)]
struct RawRequest {
    /// Index of the connection it came on (0 for the first accepted).
    conn: usize,
    /// Index of the request on its connection (0 for the first).
    nth: usize,
    /// The request line and headers, up to and including the blank line.
    head: String,
    /// The body (`Content-Length` bytes).
    body: Vec<u8>,
}

type RawHandler = Arc<dyn Fn(&RawRequest) -> Script + Send + Sync>;

struct RawState {
    accepted: AtomicUsize,
    /// Requests read on each connection, by connection index.
    per_conn: Mutex<Vec<usize>>,
    requests: Mutex<Vec<RawRequest>>,
    stop: AtomicBool,
    handler: RawHandler,
}

/// A loopback HTTP/1 upstream that reads one request at a time (head, then exactly
/// `Content-Length` body bytes) and answers each with the bytes of a [`Script`]; a thread per
/// connection. Counts accepted connections and requests per connection. Stops accepting when
/// dropped; connection threads end when the proxy closes its side.
struct RawUpstream {
    addr: SocketAddr,
    state: Arc<RawState>,
}

impl RawUpstream {
    fn start(handler: impl Fn(&RawRequest) -> Script + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the raw upstream");
        let addr = listener.local_addr().expect("raw upstream address");
        let state = Arc::new(RawState {
            accepted: AtomicUsize::new(0),
            per_conn: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            handler: Arc::new(handler),
        });
        let accept_state = state.clone();
        std::thread::Builder::new()
            .name("raw-upstream".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if accept_state.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let index = {
                        let mut per_conn = accept_state.per_conn.lock().unwrap();
                        per_conn.push(0);
                        per_conn.len() - 1
                    };
                    accept_state.accepted.fetch_add(1, Ordering::SeqCst);
                    let state = accept_state.clone();
                    std::thread::spawn(move || serve_raw(conn, index, &state));
                }
            })
            .expect("spawn the raw upstream");
        Self { addr, state }
    }

    /// Answers every request with the same script.
    fn replying(script: Script) -> Self {
        Self::start(move |_| script.clone())
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// TCP connections accepted so far.
    fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Requests read so far on each connection, by connection index.
    fn per_conn(&self) -> Vec<usize> {
        self.state.per_conn.lock().unwrap().clone()
    }

    /// Every request read so far, in order.
    fn requests(&self) -> Vec<RawRequest> {
        self.state.requests.lock().unwrap().clone()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, ms(200));
    }
}

/// Serves one connection: request, scripted reply, and so on until the script or the peer
/// ends it.
fn serve_raw(mut conn: TcpStream, index: usize, state: &RawState) {
    let _ = conn.set_nodelay(true);
    // A leaked connection (the proxy never closing it) must not keep its thread forever.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut pending = Vec::new();
    for nth in 0.. {
        let Some((head, body)) = read_request(&mut conn, &mut pending) else {
            return;
        };
        let request = {
            let mut all = state.requests.lock().unwrap();
            let r = RawRequest {
                conn: index,
                nth,
                head,
                body,
            };
            all.push(r.clone());
            state.per_conn.lock().unwrap()[index] += 1;
            r
        };
        let script = (state.handler)(&request);
        for (i, piece) in script.writes.iter().enumerate() {
            if i > 0 && !script.gap.is_zero() {
                std::thread::sleep(script.gap);
            }
            // The proxy may give up mid-reply (malformed or oversized replies).
            if conn.write_all(piece).and_then(|()| conn.flush()).is_err() {
                return;
            }
        }
        match script.after {
            After::KeepOpen => continue,
            After::Close => return close_gracefully(conn),
            After::CloseLater(d) => {
                std::thread::sleep(d);
                return close_gracefully(conn);
            }
        }
    }
}

/// Sends a FIN, then waits (briefly) for the proxy to close its side, so the close is never a
/// reset that could discard bytes the proxy has not read yet.
fn close_gracefully(mut conn: TcpStream) {
    let _ = conn.shutdown(Shutdown::Write);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = [0u8; 4096];
    while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
}

/// Reads one request (head, then `Content-Length` body bytes) from `conn`, keeping any bytes
/// beyond it in `pending`. `None` when the peer closed or the read failed.
fn read_request(conn: &mut TcpStream, pending: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let mut buf = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>().expect("request content-length"))
        .unwrap_or(0);
    while pending.len() < head_end + len {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
    let body = pending[head_end..head_end + len].to_vec();
    pending.drain(..head_end + len);
    Some((head, body))
}

// ---------------------------------------------------------------------------------------------
// Helpers for the exchanges.
// ---------------------------------------------------------------------------------------------

/// A JSON chat-completion-like body of `n` bytes in total.
fn json_body(n: usize) -> String {
    let pad = n - "{\"id\":\"c1\",\"content\":\"\"}".len();
    format!("{{\"id\":\"c1\",\"content\":\"{}\"}}", letters(pad))
}

/// An HTTP/1.1 `Content-Length` JSON reply.
fn cl_reply(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// `body` as chunks of at most `size` bytes (lower-case hex sizes), with the terminal chunk.
fn chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in body.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Posts a chat call for `m1` (request `n`) and waits for the response header.
async fn call(proxy: &Proxy, n: usize) -> reqwest::Response {
    let body = format!("{{\"model\":\"m1\",\"n\":{n}}}");
    within(EXCHANGE, "the response header", post(proxy, CHAT, body)).await
}

/// Posts a chat call and returns its status, `content-type` and whole body.
async fn call_whole(proxy: &Proxy, n: usize) -> (u16, Option<String>, Vec<u8>) {
    let resp = call(proxy, n).await;
    let status = resp.status().as_u16();
    let ct = header(&resp, "content-type").map(str::to_string);
    let body = within(EXCHANGE, "the response body", resp.bytes())
        .await
        .unwrap_or_else(|e| panic!("request {n}: the body did not complete cleanly: {e}"));
    (status, ct, body.to_vec())
}

// ---------------------------------------------------------------------------------------------
// Content-Length replies.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_reply_written_byte_by_byte_arrives_whole_and_the_connection_is_reused() {
    let body = "{\"id\":\"c1\",\"choices\":[{\"message\":{\"content\":\"h\u{e9} \u{2713}\"}}]}";
    let reply = cl_reply(body);
    let up = RawUpstream::replying(Script::bytewise(&reply, ms(1)));
    let proxy = Proxy::start(&vllm_config(&up.url()));

    for n in 0..2 {
        let resp = call(&proxy, n).await;
        assert_eq!(resp.status(), 200, "request {n}");
        assert_eq!(header(&resp, "content-type"), Some("application/json"));
        let len = body.len().to_string();
        assert_eq!(header(&resp, "content-length"), Some(len.as_str()));
        let got = within(EXCHANGE, "the body", resp.bytes()).await.unwrap();
        assert_eq!(got, body.as_bytes(), "request {n}");
        wait_logged(&proxy, n as u64 + 1).await;
    }

    assert_eq!(up.accepted(), 1, "the second call reused the connection");
    assert_eq!(up.per_conn(), [2]);
    let reqs = up.requests();
    assert_eq!(
        (reqs[1].conn, reqs[1].nth),
        (0, 1),
        "second request, same connection"
    );
    assert_eq!(reqs[1].body, b"{\"model\":\"m1\",\"n\":1}");
    assert!(reqs[1]
        .head
        .starts_with("POST /v1/chat/completions HTTP/1.1\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_content_length_reply_arrives_byte_identical() {
    let body = json_body(1 << 20);
    let up = RawUpstream::replying(Script::whole(cl_reply(&body)));
    let proxy = Proxy::start(&vllm_config(&up.url()));

    let resp = call(&proxy, 0).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-length"), Some("1048576"));
    let got = within(EXCHANGE, "the body", resp.bytes()).await.unwrap();
    assert_eq!(got.len(), body.len());
    assert!(got == body.as_bytes(), "the 1 MiB body differs");
}

/// Two calls answered with `reply` (body `body`, JSON) by an upstream that keeps the socket
/// open: only the proxy's reading of the reply can make it open a new connection for the
/// second call, which it must.
async fn each_call_gets_a_new_connection(reply: String, body: &str) {
    let up = RawUpstream::replying(Script::whole(reply));
    let proxy = Proxy::start(&vllm_config(&up.url()));

    for n in 0..2 {
        let (status, ct, got) = call_whole(&proxy, n).await;
        assert_eq!(status, 200, "request {n}");
        assert_eq!(ct.as_deref(), Some("application/json"));
        assert_eq!(got, body.as_bytes(), "request {n}");
        wait_logged(&proxy, n as u64 + 1).await;
    }

    assert_eq!(up.accepted(), 2, "each call had a connection of its own");
    assert_eq!(up.per_conn(), [1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_content_length_reply_without_keep_alive_is_not_reused() {
    let body = "{\"ok\":\"1.0\"}";
    let reply = format!(
        "HTTP/1.0 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    each_call_gets_a_new_connection(reply, body).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_on_an_http_1_1_reply_is_respected() {
    let body = "{\"ok\":\"close\"}";
    let reply = format!(
        "HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    each_call_gets_a_new_connection(reply, body).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_beyond_the_content_length_are_dropped_with_the_connection() {
    // The first connection's reply declares 2 bytes and sends 9; the connection stays open, so
    // reusing it would hand the next call "GARBAGE" as the start of its reply.
    let good = "{\"ok\":\"fresh\"}";
    let up = RawUpstream::start(move |r| {
        if r.conn == 0 {
            Script::whole(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}GARBAGE",
            )
        } else {
            Script::whole(cl_reply(good))
        }
    });
    let proxy = Proxy::start(&vllm_config(&up.url()));

    let resp = call(&proxy, 0).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-length"), Some("2"));
    let got = within(EXCHANGE, "the body", resp.bytes()).await.unwrap();
    assert_eq!(got, "{}".as_bytes(), "exactly the declared length");
    wait_logged(&proxy, 1).await;

    let (status, _, got) = call_whole(&proxy, 1).await;
    assert_eq!(status, 200);
    assert_eq!(got, good.as_bytes(), "the second reply is its own, intact");
    assert_eq!(up.accepted(), 2, "the over-long connection was not reused");
    assert_eq!(up.per_conn(), [1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_reply_cut_short_does_not_look_complete() {
    // 40 bytes declared, 14 sent, then the upstream closes: the partial body comes with the
    // header (read with it) or 20 ms after it (read from the socket on its own).
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n";
    let partial = "{\"id\":\"c1\",\"co";
    let reply = format!("{head}{partial}");
    for (how, script) in [
        ("with the header", Script::whole(&reply)),
        (
            "after the header",
            Script::split(&reply, &[head.len()], ms(20)),
        ),
    ] {
        let up = RawUpstream::replying(script.then(After::Close));
        let proxy = Proxy::start(&vllm_config(&up.url()));

        let resp = call(&proxy, 0).await;
        // The header (with the declared length) goes downstream with the first body bytes or
        // before them, so the close is seen after it: the client gets a 200 whose body breaks
        // off.
        assert_eq!(resp.status(), 200, "{how}");
        assert_eq!(header(&resp, "content-length"), Some("40"), "{how}");
        let (got, failed) = read_until_end(resp).await;
        assert_eq!(
            got,
            partial.as_bytes(),
            "{how}: only the bytes the upstream sent"
        );
        assert!(
            failed.is_some(),
            "{how}: a body shorter than its content-length must fail, not end cleanly"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Chunked replies.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_reply_with_extensions_upper_case_sizes_and_trailers_is_decoded_and_reused() {
    let body = format!("hello{}", letters(26));
    let mut reply =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    reply.extend_from_slice(b"5;ext=1\r\nhello\r\n");
    reply.extend_from_slice(format!("1A;name=\"quoted value\"\r\n{}\r\n", letters(26)).as_bytes());
    reply.extend_from_slice(b"0\r\nX-Trailer: a\r\n\r\n");
    // The second reply arrives in pieces cut inside the trailer section; the third shows
    // that the pieces left nothing behind on the connection.
    let end = reply.len();
    let trailer_cuts = [end - 12, end - 4, end - 2, end - 1];
    let up = RawUpstream::start(move |r| match r.nth {
        1 => Script::split(&reply, &trailer_cuts, ms(20)),
        _ => Script::whole(&reply),
    });
    let proxy = Proxy::start(&vllm_config(&up.url()));

    for n in 0..3 {
        let resp = call(&proxy, n).await;
        assert_eq!(resp.status(), 200, "request {n}");
        assert_eq!(header(&resp, "content-type"), Some("application/json"));
        assert_eq!(header(&resp, "content-length"), None);
        assert_eq!(
            header(&resp, "x-trailer"),
            None,
            "a trailer is not a header"
        );
        let got = within(EXCHANGE, "the body", resp.bytes()).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            body,
            "request {n}: de-chunked, extensions and trailer dropped"
        );
        wait_logged(&proxy, n as u64 + 1).await;
    }

    assert_eq!(
        up.accepted(),
        1,
        "the trailer was consumed: the connection was reused"
    );
    assert_eq!(up.per_conn(), [3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_reply_split_inside_sizes_data_and_crlfs_is_decoded_intact() {
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    let data = letters(26);
    let reply = format!("{head}1A\r\n{data}\r\n7\r\n{{\"x\":1}}\r\n0\r\n\r\n");
    let h = head.len();
    let offsets = [
        h - 1,           // inside the header's closing CRLF
        h + 1,           // between "1" and "A" of the size
        h + 3,           // between the size line's CR and LF
        h + 4 + 10,      // inside the first chunk's data
        h + 4 + 26 + 1,  // between the data's CR and LF
        h + 4 + 28 + 2,  // inside the second size line's CRLF
        reply.len() - 3, // between the terminal size line's CR and LF
        reply.len() - 1, // between the final CR and LF
    ];
    let up = RawUpstream::replying(Script::split(&reply, &offsets, ms(20)));
    let proxy = Proxy::start(&vllm_config(&up.url()));

    let (status, ct, got) = call_whole(&proxy, 0).await;

    assert_eq!(status, 200);
    assert_eq!(ct.as_deref(), Some("application/json"));
    assert_eq!(String::from_utf8_lossy(&got), format!("{data}{{\"x\":1}}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_reply_with_a_content_length_too_is_read_as_chunked() {
    // The content-length (5) would end the body five bytes in, inside the first chunk.
    let body = "{\"choices\":[{\"message\":{\"content\":\"chunked wins\"}}]}";
    let mut reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    reply.extend_from_slice(&chunked(body.as_bytes(), 16));
    let up = RawUpstream::replying(Script::whole(reply));
    let proxy = Proxy::start(&vllm_config(&up.url()));

    for n in 0..2 {
        let resp = call(&proxy, n).await;
        assert_eq!(resp.status(), 200, "request {n}");
        assert_eq!(
            header(&resp, "content-length"),
            None,
            "the overridden length is not relayed"
        );
        let got = within(EXCHANGE, "the body", resp.bytes()).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&got), body, "request {n}");
        wait_logged(&proxy, n as u64 + 1).await;
    }
    assert_eq!(up.accepted(), 1, "the chunked body was read to its end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_chunked_reply_in_64_kib_chunks_arrives_byte_identical() {
    let body = json_body(1 << 20);
    let mut reply =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    reply.extend_from_slice(&chunked(body.as_bytes(), 64 << 10));
    let up = RawUpstream::replying(Script::whole(reply));
    let proxy = Proxy::start(&vllm_config(&up.url()));

    let resp = call(&proxy, 0).await;
    assert_eq!(resp.status(), 200);
    let got = within(EXCHANGE, "the body", resp.bytes()).await.unwrap();
    assert_eq!(got.len(), body.len());
    assert!(got == body.as_bytes(), "the 1 MiB body differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_stream_cut_before_the_terminal_chunk_ends_with_an_error_event() {
    let events = [
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n",
    ];
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    let mut reply = head.to_string();
    let mut offsets = Vec::new();
    for e in events {
        reply.push_str(&format!("{:x}\r\n{e}\r\n", e.len()));
        offsets.push(reply.len());
    }
    offsets.pop();
    let up = RawUpstream::replying(
        Script::split(&reply, &offsets, ms(20)).then(After::CloseLater(ms(30))),
    );
    let proxy = Proxy::start(&vllm_config(&up.url()));

    let resp = call(&proxy, 0).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), Some("text/event-stream"));
    let (got, failed) = read_until_end(resp).await;

    assert_sent_then_error_event(&got, failed, &events.concat());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_chunk_size_after_a_good_chunk_breaks_the_sse_stream() {
    let event = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    let good = format!("{head}{:x}\r\n{event}\r\n", event.len());
    let reply = format!("{good}zz\r\ndata: never\n\n\r\n0\r\n\r\n");
    let up = RawUpstream::replying(Script::split(&reply, &[good.len()], ms(20)));
    let proxy = Proxy::start(&vllm_config(&up.url()));

    let resp = call(&proxy, 0).await;
    assert_eq!(resp.status(), 200);
    let (got, failed) = read_until_end(resp).await;

    assert_sent_then_error_event(&got, failed, event);
}

// ---------------------------------------------------------------------------------------------
// Other framings.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_delimited_by_close_arrives_whole_and_the_next_call_connects_again() {
    let body = json_body(3000);
    let reply = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{body}");
    // Written in three pieces so the end of the body is known only from the close.
    let up = RawUpstream::replying(
        Script::split(&reply, &[reply.len() - 2000, reply.len() - 10], ms(20)).then(After::Close),
    );
    let proxy = Proxy::start(&vllm_config(&up.url()));

    for n in 0..2 {
        let (status, ct, got) = call_whole(&proxy, n).await;
        assert_eq!(status, 200, "request {n}");
        assert_eq!(ct.as_deref(), Some("application/json"));
        assert!(got == body.as_bytes(), "request {n}: the body differs");
    }

    assert_eq!(
        up.accepted(),
        2,
        "a close-delimited connection is not reused"
    );
    assert_eq!(up.per_conn(), [1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_content_204_reply_is_relayed_empty_and_the_connection_is_reused() {
    let up = RawUpstream::replying(Script::whole("HTTP/1.1 204 No Content\r\nx-up: 1\r\n\r\n"));
    let proxy = Proxy::start(&vllm_config(&up.url()));

    for n in 0..2 {
        let resp = call(&proxy, n).await;
        assert_eq!(resp.status(), 204, "request {n}");
        assert_eq!(header(&resp, "x-up"), Some("1"));
        let got = within(EXCHANGE, "the body", resp.bytes()).await.unwrap();
        assert!(got.is_empty(), "request {n}: {got:?}");
        wait_logged(&proxy, n as u64 + 1).await;
    }

    assert_eq!(up.accepted(), 1, "the second call reused the connection");
    assert_eq!(up.per_conn(), [2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_100_continue_in_the_same_write_is_followed_by_the_real_reply() {
    let body = "{\"ok\":\"after 100\"}";
    let reply = format!("HTTP/1.1 100 Continue\r\n\r\n{}", cl_reply(body));
    let up = RawUpstream::replying(Script::whole(reply));
    let proxy = Proxy::start(&vllm_config(&up.url()));

    let (status, ct, got) = call_whole(&proxy, 0).await;

    assert_eq!(status, 200);
    assert_eq!(ct.as_deref(), Some("application/json"));
    assert_eq!(got, body.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_100_continue_in_its_own_write_is_followed_by_the_real_reply() {
    let body = "{\"ok\":\"after 100\"}";
    let interim = "HTTP/1.1 100 Continue\r\n\r\n";
    let reply = format!("{interim}{}", cl_reply(body));
    let up = RawUpstream::replying(Script::split(&reply, &[interim.len()], ms(20)));
    let proxy = Proxy::start(&vllm_config(&up.url()));

    let (status, ct, got) = call_whole(&proxy, 0).await;

    assert_eq!(status, 200);
    assert_eq!(ct.as_deref(), Some("application/json"));
    assert_eq!(got, body.as_bytes());
}

// ---------------------------------------------------------------------------------------------
// Malformed replies.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_status_line_is_a_502() {
    let up = RawUpstream::replying(
        Script::whole("HTTP/1.1 OK twohundred\r\ncontent-length: 2\r\n\r\n{}").then(After::Close),
    );
    let proxy = Proxy::start(&vllm_config(&up.url()));

    let resp = call(&proxy, 0).await;

    assert_error(resp, 502, "upstream_unreachable").await;
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_numeric_content_length_is_a_502() {
    let up = RawUpstream::replying(
        Script::whole(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: abc\r\n\r\n{}",
        )
        .then(After::Close),
    );
    let proxy = Proxy::start(&vllm_config(&up.url()));

    let resp = call(&proxy, 0).await;

    let v = assert_error(resp, 502, "upstream_unreachable").await;
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("invalid response") && message.contains("invalid content-length"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_header_section_over_one_mib_is_a_502() {
    let mut reply = String::from("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n");
    for i in 0..200 {
        reply.push_str(&format!("x-filler-{i}: {}\r\n", letters(6000)));
    }
    reply.push_str("content-length: 2\r\n\r\n{}");
    assert!(reply.len() > 1 << 20);
    let up = RawUpstream::replying(Script::whole(reply).then(After::Close));
    let proxy = Proxy::start(&vllm_config(&up.url()));

    let resp = call(&proxy, 0).await;

    assert_error(resp, 502, "upstream_unreachable").await;
}
