//! End-to-end tests of the proxy listeners' front door (`src/proxy/front.rs`), over raw client
//! sockets: on HTTP/1 llm-edge reads each request head itself (up to the empty line, CRLF or
//! bare LF, giving up after 16 KiB without one), answers what it can through its own request
//! handling, and hands the connection, with the bytes already read, to Pingora's proxy for the
//! rest (CONNECT, heads that do not parse, heads over 16 KiB, pass-through uploads the forwarder
//! cannot take). These tests send heads byte by byte, with bare LF line ends, over 16 KiB and
//! over `limits.max_header_bytes`, garbage, half heads and CONNECT; mix both paths on one
//! keep-alive connection; and check that a graceful shutdown closes idle connections. Each test
//! asserts the statuses and bodies the client got and exactly what the upstream (a recording
//! mock) received.

mod common;

use common::harness::Proxy;
use common::mock::{Mock, Recorded, Reply};
use common::raw::{read_response, RawResponse};
use common::{assert_error, assert_error_shape, client, wait_logged, within};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHAT: &str = "/v1/chat/completions";

/// How long any one exchange with the proxy may take before the test fails.
const EXCHANGE: Duration = Duration::from_secs(5);

/// One vLLM upstream `u` at `endpoint`, serving model `m1`, with `/raw/` a pass-through route to
/// it (prefix stripped), as in `tests/pass_through.rs`. `extra` adds top-level sections.
fn config(endpoint: &str, extra: &str) -> String {
    format!(
        r#"
upstreams:
  u:
    kind: vllm
    endpoints: ["{endpoint}"]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
models:
  - {{name: m1, upstream: u}}
routes:
  - {{prefix: /raw/, upstream: u, strip_prefix: true}}
{extra}"#
    )
}

/// A chat request body for `m1`, told apart from others by `tag`.
fn chat_body(tag: &str) -> String {
    format!(r#"{{"model":"m1","messages":[{{"role":"user","content":"{tag}"}}]}}"#)
}

/// What the mock answers an API call whose body is `len` bytes long.
fn completion(len: usize) -> String {
    format!(
        r#"{{"id":"chatcmpl-{len}","object":"chat.completion","created":1700000000,"model":"m1","choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}}}"#
    )
}

/// What the mock answers any other request.
fn echo(r: &Recorded) -> String {
    format!(
        r#"{{"method":"{}","uri":"{}","len":{}}}"#,
        r.method,
        r.uri,
        r.body.len()
    )
}

/// The mock of every test: API calls get [`completion`] (their body's length in the id),
/// everything else [`echo`].
fn upstream() -> Mock {
    Mock::start(|r| {
        if r.uri == CHAT {
            Reply::json(200, completion(r.body.len()))
        } else {
            Reply::json(200, echo(r))
        }
    })
}

/// `n` bytes covering every byte value, in an order a truncation or shift would show.
fn binary(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// The head (CRLF line ends) and body of a chat POST with `Content-Length`.
fn chat_request(body: &str) -> String {
    format!(
        "POST {CHAT} HTTP/1.1\r\nHost: edge.test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

async fn connect(proxy: &Proxy) -> TcpStream {
    let conn = within(EXCHANGE, "connecting", TcpStream::connect(proxy.addr()))
        .await
        .expect("connect to the proxy");
    // Every write goes out as written (the byte-by-byte test relies on it).
    conn.set_nodelay(true).unwrap();
    conn
}

// ---------------------------------------------------------------------------------------------
// Reading responses off a raw connection.
// ---------------------------------------------------------------------------------------------

/// Reads one response that must leave the connection open for the next request: nothing
/// follows it, and it does not say `Connection: close`.
async fn read_kept_response(conn: &mut TcpStream, buf: &mut Vec<u8>, what: &str) -> RawResponse {
    let resp = read_response(conn, buf, false).await;
    assert!(
        buf.is_empty(),
        "{what}: bytes after the response: {:?}",
        String::from_utf8_lossy(buf)
    );
    assert_ne!(
        resp.header("connection").map(str::to_ascii_lowercase),
        Some("close".to_string()),
        "{what}: the connection is kept: {resp:?}"
    );
    resp
}

/// Everything the proxy sends until it closes the connection; panics if it is still open after
/// `wait`.
async fn read_until_close(conn: &mut TcpStream, wait: Duration, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let closed = tokio::time::timeout(wait, async {
        let mut chunk = [0u8; 4096];
        loop {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "{what}: the proxy kept the connection open for {wait:?}; it sent {:?}",
        String::from_utf8_lossy(&got)
    );
    got
}

/// Checks that the proxy neither sends anything nor closes the connection for a while.
async fn assert_still_open(conn: &mut TcpStream, what: &str) {
    let mut extra = [0u8; 256];
    match tokio::time::timeout(Duration::from_millis(300), conn.read(&mut extra)).await {
        Err(_) => {}
        Ok(Ok(0)) => panic!("{what}: the proxy closed the connection"),
        Ok(Ok(n)) => panic!(
            "{what}: unexpected bytes: {:?}",
            String::from_utf8_lossy(&extra[..n])
        ),
        Ok(Err(e)) => panic!("{what}: the connection failed: {e}"),
    }
}

/// Reads what the proxy sends on `conn` until it closes it, and checks that it was one
/// Pingora-made refusal: a head saying `Connection: close`, and no body. Returns the status and
/// the head (lower-cased).
async fn read_refusal(conn: &mut TcpStream, what: &str) -> (u16, String) {
    let raw = read_until_close(conn, EXCHANGE, what).await;
    let (status, head, body) = parse_closing_response(&raw);
    assert!(head.contains("\r\nconnection: close"), "{what}: {head}");
    assert!(
        body.is_empty(),
        "{what}: {:?}",
        String::from_utf8_lossy(&raw)
    );
    (status, head)
}

/// Splits a response the proxy sent before closing into its status, head (lower-cased) and body.
fn parse_closing_response(raw: &[u8]) -> (u16, String, Vec<u8>) {
    let at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8(raw[..at].to_vec()).expect("ascii head");
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {head:?}"));
    (status, head.to_ascii_lowercase(), raw[at + 4..].to_vec())
}

/// Sends one chat POST on a fresh connection and checks its 200 answer; the request the mock
/// then holds last must be it.
async fn assert_chat_served(proxy: &Proxy, mock: &Mock, tag: &str) {
    let body = chat_body(tag);
    let mut conn = connect(proxy).await;
    conn.write_all(chat_request(&body).as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let resp = read_kept_response(&mut conn, &mut buf, tag).await;
    assert_eq!(resp.status, 200, "{tag}: {resp:?}");
    assert_eq!(resp.text(), completion(body.len()), "{tag}");
    let last = mock.requests().pop().expect("the mock got the request");
    assert_eq!(
        (last.method.as_str(), last.uri.as_str()),
        ("POST", CHAT),
        "{tag}"
    );
    assert_eq!(last.body_str(), body, "{tag}");
}

// ---------------------------------------------------------------------------------------------
// Heads as they arrive.
// ---------------------------------------------------------------------------------------------

/// A head that arrives one byte per read (every CRLF of it split across two reads, and the
/// final empty line too) is still recognised as whole: the end search resumes where it left
/// off without missing a line end that straddles two reads. Had it missed one, the proxy
/// would wait for more bytes and the exchange would time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_written_one_byte_at_a_time_is_answered() {
    let mock = upstream();
    let proxy = Proxy::start(&config(&mock.url(), ""));
    let body = chat_body("byte by byte");
    let request = chat_request(&body);
    let head_len = request.len() - body.len();

    let mut conn = connect(&proxy).await;
    for b in request[..head_len].bytes() {
        conn.write_all(&[b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    conn.write_all(body.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let resp = read_kept_response(&mut conn, &mut buf, "the trickled request").await;

    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.text(), completion(body.len()));
    let r = mock.only_request();
    assert_eq!((r.method.as_str(), r.uri.as_str()), ("POST", CHAT));
    assert_eq!(r.body_str(), body, "the body arrived exactly");
    assert_eq!(mock.accepted(), 1);
}

/// Bare LF line ends (no CR anywhere in the head), which Pingora's parser (httparse) accepts,
/// end a head for the front too: the model list, a pass-through GET and an API POST whose body
/// follows a bare-LF head are all answered, one after another on one connection. A front that
/// only looked for CRLF CRLF would wait forever on the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_heads_are_answered() {
    let mock = upstream();
    let proxy = Proxy::start(&config(&mock.url(), ""));
    let mut conn = connect(&proxy).await;
    let mut buf = Vec::new();

    conn.write_all(b"GET /v1/models HTTP/1.1\nHost: edge.test\nAccept: */*\n\n")
        .await
        .unwrap();
    let models = read_kept_response(&mut conn, &mut buf, "GET /v1/models").await;
    assert_eq!(models.status, 200, "{models:?}");
    let v = models.json();
    assert_eq!(v["object"], "list", "{v}");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap_or_else(|| panic!("a data array: {v}"))
        .iter()
        .map(|m| m["id"].as_str().expect("model id"))
        .collect();
    assert_eq!(ids, ["m1"], "{v}");
    assert_eq!(mock.accepted(), 0, "the model list is llm-edge's own");

    conn.write_all(b"GET /raw/x HTTP/1.1\nHost: edge.test\n\n")
        .await
        .unwrap();
    let raw = read_kept_response(&mut conn, &mut buf, "GET /raw/x").await;
    assert_eq!(raw.status, 200, "{raw:?}");
    assert_eq!(raw.text(), r#"{"method":"GET","uri":"/x","len":0}"#);

    let body = chat_body("bare lf");
    let post = format!(
        "POST {CHAT} HTTP/1.1\nHost: edge.test\nContent-Type: application/json\nContent-Length: {}\n\n{body}",
        body.len()
    );
    conn.write_all(post.as_bytes()).await.unwrap();
    let chat = read_kept_response(&mut conn, &mut buf, "POST chat").await;
    assert_eq!(chat.status, 200, "{chat:?}");
    assert_eq!(chat.text(), completion(body.len()));
    assert_still_open(&mut conn, "after the bare-LF requests").await;

    let got: Vec<(String, String, Vec<u8>)> = mock
        .requests()
        .into_iter()
        .map(|r| (r.method, r.uri, r.body.to_vec()))
        .collect();
    assert_eq!(
        got,
        [
            ("GET".to_string(), "/x".to_string(), Vec::new()),
            ("POST".to_string(), CHAT.to_string(), body.into_bytes()),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Both paths on one keep-alive connection.
// ---------------------------------------------------------------------------------------------

/// One keep-alive connection carries requests the front answers and requests it hands to
/// Pingora's proxy, in turn: an API POST, a pass-through GET, a 100 KB pass-through upload
/// (over the forwarder's 64 KiB, so Pingora's path, which gets the bytes the front already
/// read), a chunked API POST and a last API POST. All five are answered on that one
/// connection (it is never closed: every read would fail on a close), none says
/// `Connection: close`, and the upstream gets every body exactly, the upload byte for byte.
/// A hand-over that lost or repeated the bytes already read, or a connection that did not
/// come back to the front after Pingora's path, fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keep_alive_connection_mixes_the_front_and_pingoras_path() {
    let mock = upstream();
    let proxy = Proxy::start(&config(&mock.url(), ""));
    let mut conn = connect(&proxy).await;
    let mut buf = Vec::new();

    // 1. An API POST (the front).
    let first = chat_body("first");
    conn.write_all(chat_request(&first).as_bytes())
        .await
        .unwrap();
    let resp = read_kept_response(&mut conn, &mut buf, "1: API POST").await;
    assert_eq!(resp.status, 200, "1: {resp:?}");
    assert_eq!(resp.text(), completion(first.len()), "1");

    // 2. A pass-through GET (the front's forwarder).
    conn.write_all(b"GET /raw/listing?page=2 HTTP/1.1\r\nHost: edge.test\r\n\r\n")
        .await
        .unwrap();
    let resp = read_kept_response(&mut conn, &mut buf, "2: pass-through GET").await;
    assert_eq!(resp.status, 200, "2: {resp:?}");
    assert_eq!(
        resp.text(),
        r#"{"method":"GET","uri":"/listing?page=2","len":0}"#,
        "2"
    );

    // 3. A 100 KB pass-through upload (Pingora's path), head and body in one write.
    let upload = binary(100_000);
    let mut req = format!(
        "POST /raw/upload HTTP/1.1\r\nHost: edge.test\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        upload.len()
    )
    .into_bytes();
    req.extend_from_slice(&upload);
    conn.write_all(&req).await.unwrap();
    let resp = read_kept_response(&mut conn, &mut buf, "3: 100 KB upload").await;
    assert_eq!(resp.status, 200, "3: {resp:?}");
    assert_eq!(
        resp.text(),
        r#"{"method":"POST","uri":"/upload","len":100000}"#,
        "3"
    );

    // 4. A chunked API POST (the front reads the chunked body).
    let chunked = chat_body("chunked");
    let (a, b) = chunked.split_at(20);
    let req = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: edge.test\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let resp = read_kept_response(&mut conn, &mut buf, "4: chunked API POST").await;
    assert_eq!(resp.status, 200, "4: {resp:?}");
    assert_eq!(resp.text(), completion(chunked.len()), "4");

    // 5. A last API POST.
    let last = chat_body("last");
    conn.write_all(chat_request(&last).as_bytes())
        .await
        .unwrap();
    let resp = read_kept_response(&mut conn, &mut buf, "5: last API POST").await;
    assert_eq!(resp.status, 200, "5: {resp:?}");
    assert_eq!(resp.text(), completion(last.len()), "5");

    // Still the same, open connection.
    assert_still_open(&mut conn, "after the five requests").await;

    let got = mock.requests();
    let seen: Vec<(&str, &str)> = got
        .iter()
        .map(|r| (r.method.as_str(), r.uri.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("POST", CHAT),
            ("GET", "/listing?page=2"),
            ("POST", "/upload"),
            ("POST", CHAT),
            ("POST", CHAT),
        ]
    );
    assert_eq!(got[0].body_str(), first);
    assert!(got[1].body.is_empty());
    assert_eq!(got[2].body.len(), upload.len());
    assert!(got[2].body == upload, "the upload arrived byte-identical");
    assert_eq!(got[2].header_all("content-length"), ["100000"]);
    assert_eq!(got[3].body_str(), chunked, "the chunked body, decoded");
    assert_eq!(got[4].body_str(), last);
}

// ---------------------------------------------------------------------------------------------
// Large heads.
// ---------------------------------------------------------------------------------------------

/// Writes a chat POST whose `x-pad` header is `pad` bytes long, in two writes: everything up to
/// the end of the `x-pad` value, then, 200 ms later, the rest of the head and the body. With a
/// pad over 16 KiB, the front has read 16 KiB without an end by the time the second part comes,
/// so it hands the connection to Pingora's proxy with what it read (had the bytes come in one
/// piece, it might have found the end in its buffer and answered the request itself).
async fn send_padded_chat(conn: &mut TcpStream, pad: usize, body: &str) {
    let first = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: edge.test\r\nx-pad: {}",
        "p".repeat(pad)
    );
    let rest = format!(
        "\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(first.as_bytes()).await.unwrap();
    // Only lets the proxy read the first part before the rest; nothing is timed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.write_all(rest.as_bytes()).await.unwrap();
}

/// A head over the front's 16 KiB (a 20 KiB `x-pad` header) but under `limits.max_header_bytes`
/// (64 KiB by default) goes to Pingora's proxy with the 16 KiB already read, and is answered
/// 200 with its body and its whole `x-pad` intact upstream; the connection then comes back to
/// the front for a normal request. A lost or repeated piece of the head would show as a 400,
/// a wrong `x-pad` or a wrong body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_16_kib_goes_to_pingoras_path_and_is_answered() {
    let mock = upstream();
    let proxy = Proxy::start(&config(&mock.url(), ""));
    let mut conn = connect(&proxy).await;
    let mut buf = Vec::new();

    let body = chat_body("padded");
    send_padded_chat(&mut conn, 20 * 1024, &body).await;
    let resp = read_kept_response(&mut conn, &mut buf, "the 20 KiB head").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), completion(body.len()));

    let next = chat_body("after the large head");
    conn.write_all(chat_request(&next).as_bytes())
        .await
        .unwrap();
    let resp = read_kept_response(&mut conn, &mut buf, "the next request").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), completion(next.len()));

    let got = mock.requests();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(got[0].body_str(), body);
    let pad = got[0].header("x-pad").expect("x-pad forwarded");
    assert_eq!(pad.len(), 20 * 1024, "the whole x-pad value");
    assert!(pad.bytes().all(|b| b == b'p'));
    assert_eq!(got[1].body_str(), next);
    assert_eq!(got[1].header("x-pad"), None);
}

/// Over `limits.max_header_bytes` (8 KiB here), a head is refused 431 `headers_too_large` with
/// llm-edge's JSON error, whether the front read it whole (10 KiB of headers) or handed it to
/// Pingora's proxy past 16 KiB (20 KiB): our limits apply on both paths, and the upstream sees
/// neither request. A normal request still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_max_header_bytes_is_431_on_both_paths() {
    let mock = upstream();
    let proxy = Proxy::start(&config(&mock.url(), "limits: {max_header_bytes: 8KiB}\n"));

    // 10 KiB of headers: under 16 KiB, so the front reads it whole.
    let resp = client()
        .post(proxy.url(CHAT))
        .header("content-type", "application/json")
        .header("x-pad", "p".repeat(10 * 1024))
        .body(chat_body("10 KiB"))
        .send()
        .await
        .expect("request through the proxy");
    let v = assert_error(resp, 431, "headers_too_large").await;
    assert!(
        v["error"]["message"].as_str().unwrap().contains("8192"),
        "the message names the limit: {v}"
    );

    // 20 KiB: past 16 KiB, Pingora's path.
    let mut conn = connect(&proxy).await;
    send_padded_chat(&mut conn, 20 * 1024, &chat_body("20 KiB")).await;
    let mut buf = Vec::new();
    let resp = read_response(&mut conn, &mut buf, false).await;
    assert_eq!(resp.status, 431, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_error_shape(&resp.json(), "headers_too_large");

    assert_eq!(mock.accepted(), 0, "the upstream saw nothing");
    assert!(mock.requests().is_empty());

    assert_chat_served(&proxy, &mock, "normal").await;
    assert_eq!(mock.requests().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Heads that are not requests.
// ---------------------------------------------------------------------------------------------

/// Bytes that end like a head but are not HTTP get Pingora's 400 (the front hands heads that do
/// not parse to Pingora's proxy) and the connection is closed; the upstream sees nothing and the
/// proxy goes on serving new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_a_400_and_a_close() {
    let mock = upstream();
    let proxy = Proxy::start(&config(&mock.url(), ""));

    let mut conn = connect(&proxy).await;
    conn.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let (status, head) = read_refusal(&mut conn, "garbage").await;
    assert_eq!(status, 400, "{head}");
    assert!(head.contains("\r\ncontent-length: 0"), "{head}");
    assert_eq!(mock.accepted(), 0);

    assert_chat_served(&proxy, &mock, "after the garbage").await;
    assert_eq!(mock.requests().len(), 1);
}

/// A client that sends half a head and closes, and one that connects, sends nothing and closes,
/// get nothing back and are closed in turn (neither hangs the proxy nor counts as a request);
/// the next client is served, and it is the only request the upstream and the request metrics
/// ever saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_heads_and_silent_clients_leave_the_proxy_serving() {
    let mock = upstream();
    let proxy = Proxy::start(&config(&mock.url(), ""));

    let mut half = connect(&proxy).await;
    half.write_all(format!("POST {CHAT} HTTP/1.1\r\nHost: edge.test\r\nContent-Le").as_bytes())
        .await
        .unwrap();
    half.shutdown().await.unwrap();
    let got = read_until_close(&mut half, EXCHANGE, "half a head").await;
    assert!(
        got.is_empty(),
        "nothing is answered to half a head: {:?}",
        String::from_utf8_lossy(&got)
    );

    let mut silent = connect(&proxy).await;
    silent.shutdown().await.unwrap();
    let got = read_until_close(&mut silent, EXCHANGE, "a silent client").await;
    assert!(
        got.is_empty(),
        "nothing is answered to a silent client: {:?}",
        String::from_utf8_lossy(&got)
    );

    assert_chat_served(&proxy, &mock, "after the half heads").await;
    assert_eq!(mock.requests().len(), 1);
    assert_eq!(mock.accepted(), 1);
    wait_logged(&proxy, 1).await;
}

/// CONNECT goes to Pingora's proxy, which refuses it with 405 and closes the connection; no
/// tunnel is opened and the upstream sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_405() {
    let mock = upstream();
    let proxy = Proxy::start(&config(&mock.url(), ""));

    let mut conn = connect(&proxy).await;
    conn.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .await
        .unwrap();
    let (status, head) = read_refusal(&mut conn, "CONNECT").await;
    assert_eq!(status, 405, "{head}");
    assert_eq!(mock.accepted(), 0);
    assert!(mock.requests().is_empty());
}

/// Empty lines before a request line, which a server should ignore (RFC 9112 section 2.2) and
/// Pingora's parser does, arriving before the rest of the head. They are no head of their own:
/// were the front to take them for one, its parse would read the real head from the socket,
/// and a request then handed to Pingora's proxy would lose those bytes. A 100 KB pass-through
/// upload behind them must reach the upstream byte for byte (and get its 200), and garbage
/// behind them must still get Pingora's 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_lines_before_a_request_line_are_skipped_on_both_paths() {
    let mock = upstream();
    let proxy = Proxy::start(&config(&mock.url(), ""));

    let mut conn = connect(&proxy).await;
    conn.write_all(b"\r\n\r\n").await.unwrap();
    // Only lets the proxy read the empty lines on their own; nothing is timed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let upload = binary(100_000);
    let mut req = format!(
        "POST /raw/upload HTTP/1.1\r\nHost: edge.test\r\nContent-Length: {}\r\n\r\n",
        upload.len()
    )
    .into_bytes();
    req.extend_from_slice(&upload);
    conn.write_all(&req).await.unwrap();
    let mut buf = Vec::new();
    let resp = read_response(&mut conn, &mut buf, false).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.text(),
        r#"{"method":"POST","uri":"/upload","len":100000}"#
    );
    let r = mock.only_request();
    assert!(r.body == upload, "the upload arrived byte-identical");

    let mut conn = connect(&proxy).await;
    conn.write_all(b"\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let raw = read_until_close(&mut conn, EXCHANGE, "garbage after empty lines").await;
    let (status, _, _) = parse_closing_response(&raw);
    assert_eq!(status, 400, "{:?}", String::from_utf8_lossy(&raw));
    assert_eq!(mock.requests().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown.
// ---------------------------------------------------------------------------------------------

/// On a graceful shutdown, idle keep-alive connections are closed at once, well within the
/// grace period (6 s here), with nothing sent on them: one that has served a request from the
/// front, one that came back from Pingora's path (a 100 KB upload), and one that never sent a
/// byte. Left waiting for their next head, they would stay open until Pingora stops its
/// runtimes after the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_idle_keep_alive_connections() {
    let mock = upstream();
    let edge = Proxy::start(&config(&mock.url(), "shutdown: {grace_period: 6s}\n"));
    let open = || async {
        let c = within(EXCHANGE, "connecting", TcpStream::connect(edge.addr()))
            .await
            .expect("connect to the proxy");
        c.set_nodelay(true).unwrap();
        c
    };

    let mut served = open().await;
    let body = chat_body("before shutdown");
    served
        .write_all(chat_request(&body).as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let resp = read_kept_response(&mut served, &mut buf, "the front's request").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), completion(body.len()));

    let mut handed = open().await;
    let upload = binary(100_000);
    let mut req = format!(
        "POST /raw/upload HTTP/1.1\r\nHost: edge.test\r\nContent-Length: {}\r\n\r\n",
        upload.len()
    )
    .into_bytes();
    req.extend_from_slice(&upload);
    handed.write_all(&req).await.unwrap();
    let resp = read_kept_response(&mut handed, &mut buf, "Pingora's path's request").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.text(),
        r#"{"method":"POST","uri":"/upload","len":100000}"#
    );

    let mut silent = open().await;
    for (conn, what) in [
        (&mut served, "served by the front"),
        (&mut handed, "back from Pingora's path"),
        (&mut silent, "never used"),
    ] {
        assert_still_open(conn, what).await;
    }

    edge.begin_graceful_shutdown();
    let started = Instant::now();
    for (conn, what) in [
        (&mut served, "served by the front"),
        (&mut handed, "back from Pingora's path"),
        (&mut silent, "never used"),
    ] {
        let got = read_until_close(conn, Duration::from_secs(3), what).await;
        assert!(
            got.is_empty(),
            "{what}: nothing is sent on an idle connection at shutdown: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the idle connections closed {took:?} after shutdown began"
    );
    assert_eq!(mock.requests().len(), 2);
}
