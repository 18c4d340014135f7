//! End-to-end tests of the TLS listener: llm-edge runs in-process with a plain listener and a
//! TLS one (a self-signed certificate for `localhost` / `127.0.0.1` made in the test) side by
//! side, in front of a recording mock upstream.

mod common;

use bytes::Bytes;
use common::harness::{free_port, StopWatch, TempDir};
use common::mock::{Mock, Recorded, Reply};
use common::within;
use llm_edge::server::{EdgeServer, RunOptions};
use pingora::server::RunArgs;
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const CHAT: &str = "/v1/chat/completions";
const CHAT_BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM_BODY: &str = r#"{"model":"m","stream":true,"messages":[]}"#;
const COMPLETION: &str = r#"{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A self-signed certificate for `localhost` and `127.0.0.1`, written as PEM files.
struct SelfSigned {
    cert_pem: String,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl SelfSigned {
    fn write_to(dir: &TempDir) -> Self {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .expect("generate a self-signed certificate");
        let cert_pem = ck.cert.pem();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, &cert_pem).expect("write cert.pem");
        std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key.pem");
        Self {
            cert_pem,
            cert,
            key,
        }
    }
}

/// An in-process llm-edge with a plain listener and a TLS listener. The shared harness always
/// writes its own single plain `listen:`, so this follows its pattern with both listeners.
struct TlsProxy {
    plain: SocketAddr,
    tls: SocketAddr,
    admin: SocketAddr,
    cert_pem: String,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl TlsProxy {
    fn start(dir: &TempDir, yaml: &str) -> Self {
        let certs = SelfSigned::write_to(dir);
        let (plain_port, tls_port, admin_port) = distinct_ports();
        let text = format!(
            "listen:\n  - \"127.0.0.1:{plain_port}\"\n  - {{addr: \"127.0.0.1:{tls_port}\", tls: {{cert: {:?}, key: {:?}}}}}\n\
             admin: {{listen: \"127.0.0.1:{admin_port}\"}}\nauth: {{mode: open}}\nshutdown: {{grace_period: 0s}}\n\
             server: {{threads: 2, pid_file: {:?}, upgrade_sock: {:?}}}\n{yaml}",
            certs.cert.display().to_string(),
            certs.key.display().to_string(),
            dir.join("pid").display().to_string(),
            dir.join("upgrade.sock").display().to_string(),
        );
        let cfg = llm_edge::config::from_yaml_str(&text, &|_| None)
            .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{text}"));
        // Written out too, so `POST /admin/reload` has a file to re-read.
        let file = dir.join("llm-edge.yaml");
        std::fs::write(&file, &text).expect("write the config file");
        let (stop, rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name(format!("llm-edge-tls-{tls_port}"))
            .spawn(move || {
                let opts = RunOptions {
                    config_path: Some(file),
                    ..RunOptions::default()
                };
                EdgeServer::build(cfg, opts).run(RunArgs {
                    shutdown_signal: Box::new(StopWatch(rx)),
                });
            })
            .expect("spawn the proxy thread");
        let me = Self {
            plain: SocketAddr::from(([127, 0, 0, 1], plain_port)),
            tls: SocketAddr::from(([127, 0, 0, 1], tls_port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            cert_pem: certs.cert_pem,
            stop,
            thread: Some(thread),
        };
        me.wait_accepting(&[
            me.plain,
            me.tls,
            SocketAddr::from(([127, 0, 0, 1], admin_port)),
        ]);
        me
    }

    fn wait_accepting(&self, addrs: &[SocketAddr]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !addrs
            .iter()
            .all(|a| TcpStream::connect_timeout(a, ms(200)).is_ok())
        {
            let finished = self.thread.as_ref().is_some_and(|t| t.is_finished());
            assert!(!finished, "the proxy thread exited during start-up");
            assert!(
                Instant::now() < deadline,
                "llm-edge did not accept connections on {addrs:?} within 5 s"
            );
            std::thread::sleep(ms(10));
        }
    }

    /// `https://localhost:<tls port><path>` (the client resolves `localhost` to 127.0.0.1).
    fn https_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.tls.port())
    }

    /// `http://127.0.0.1:<plain port><path>`.
    fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.plain)
    }

    /// A client trusting only the test certificate, with `localhost` pinned to the TLS
    /// listener; HTTP/2 or HTTP/1.1 by ALPN unless `h1_only`.
    fn https_client(&self, h1_only: bool) -> reqwest::Client {
        self.https_client_trusting(&self.cert_pem, h1_only)
    }

    /// Like [`TlsProxy::https_client`], trusting `cert_pem` only.
    fn https_client_trusting(&self, cert_pem: &str, h1_only: bool) -> reqwest::Client {
        let root = reqwest::Certificate::from_pem(cert_pem.as_bytes()).expect("test cert");
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .tls_built_in_root_certs(false)
            .add_root_certificate(root)
            .resolve("localhost", self.tls);
        if h1_only {
            b = b.http1_only();
        }
        b.build().expect("https client")
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Three different free ports.
fn distinct_ports() -> (u16, u16, u16) {
    let a = free_port();
    let mut b = free_port();
    while b == a {
        b = free_port();
    }
    let mut c = free_port();
    while c == a || c == b {
        c = free_port();
    }
    (a, b, c)
}

/// One vLLM upstream at `url` serving model `m`.
fn config(url: &str) -> String {
    format!(
        r#"
upstreams:
  u:
    kind: vllm
    endpoints: ["{url}"]
    timeouts: {{connect: 1s, first_byte: 10s, idle: 10s, total: 30s}}
models:
  - {{name: m, upstream: u}}
routes:
  - {{prefix: /raw/, upstream: u, strip_prefix: true}}
"#
    )
}

/// `n` SSE chunks `spacing` apart, the last one `data: [DONE]`.
fn sse_chunks(n: usize, spacing: Duration) -> Vec<(Duration, Bytes)> {
    (0..n)
        .map(|i| {
            let delay = if i == 0 { Duration::ZERO } else { spacing };
            let data = if i + 1 == n {
                "data: [DONE]\n\n".to_string()
            } else {
                format!("data: {{\"id\":\"s1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n")
            };
            (delay, Bytes::from(data))
        })
        .collect()
}

/// Replies with an SSE stream to `"stream":true` bodies and a completion otherwise.
fn upstream(chunks: Vec<(Duration, Bytes)>) -> impl Fn(&Recorded) -> Reply + Send + Sync {
    move |r| {
        if r.body_str().contains("\"stream\":true") {
            Reply::sse(chunks.clone())
        } else {
            Reply::json(200, COMPLETION)
        }
    }
}

async fn post_chat(client: &reqwest::Client, url: String, body: &'static str) -> reqwest::Response {
    within(
        Duration::from_secs(10),
        "a chat call",
        client
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send(),
    )
    .await
    .expect("chat call")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listener_serves_http1_and_http2() {
    let dir = TempDir::new("tls-h1-h2");
    let mock = Mock::start(upstream(Vec::new()));
    let proxy = TlsProxy::start(&dir, &config(&mock.url()));

    let h1 = post_chat(&proxy.https_client(true), proxy.https_url(CHAT), CHAT_BODY).await;
    assert_eq!(h1.status(), 200, "h1 over TLS");
    assert_eq!(h1.version(), reqwest::Version::HTTP_11);
    assert_eq!(h1.text().await.unwrap(), COMPLETION);

    let h2 = post_chat(&proxy.https_client(false), proxy.https_url(CHAT), CHAT_BODY).await;
    assert_eq!(h2.status(), 200, "h2 over TLS");
    assert_eq!(
        h2.version(),
        reqwest::Version::HTTP_2,
        "ALPN negotiates h2 on the TLS listener"
    );
    assert_eq!(h2.text().await.unwrap(), COMPLETION);

    let plain = post_chat(&common::client(), proxy.http_url(CHAT), CHAT_BODY).await;
    assert_eq!(plain.status(), 200, "the plain listener still serves http");
    assert_eq!(plain.version(), reqwest::Version::HTTP_11);
    assert_eq!(plain.text().await.unwrap(), COMPLETION);

    let got = mock.requests();
    assert_eq!(got.len(), 3, "one upstream request per call: {got:#?}");
    for r in &got {
        assert_eq!(r.uri, CHAT);
        assert_eq!(r.body_str(), CHAT_BODY);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_replies_around_the_write_buffer_size_arrive_whole() {
    // Under TLS the connection's write buffer gathers encrypted records; replies that fit in
    // it with their head, overflow it, and need many of it must all arrive intact.
    let mock = Mock::start(move |r: &Recorded| {
        let size: usize = r
            .body_str()
            .trim_start_matches("size=")
            .parse()
            .unwrap_or(0);
        Reply::json(200, common::letters(size))
    });
    let dir = TempDir::new("tls-sizes");
    let proxy = TlsProxy::start(&dir, &config(&mock.url()));
    for h1_only in [true, false] {
        let client = proxy.https_client(h1_only);
        for size in [1usize, 3_000, (8 << 10) - 300, (8 << 10) + 1, 70_000] {
            let resp = within(
                Duration::from_secs(10),
                "a call",
                client
                    .post(proxy.https_url("/raw/v1/files"))
                    .body(format!("size={size}"))
                    .send(),
            )
            .await
            .expect("call");
            assert_eq!(resp.status(), 200, "h1 only: {h1_only}, {size} bytes");
            let got = resp.bytes().await.unwrap();
            assert!(
                got == common::letters(size).as_bytes(),
                "h1 only: {h1_only}: {size} bytes sent, {} received",
                got.len()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_streaming_works_over_h2() {
    let dir = TempDir::new("tls-h2-stream");
    let chunks = sse_chunks(10, ms(200));
    let mock = Mock::start(upstream(chunks.clone()));
    let proxy = TlsProxy::start(&dir, &config(&mock.url()));

    let mut resp = post_chat(
        &proxy.https_client(false),
        proxy.https_url(CHAT),
        STREAM_BODY,
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap()),
        Some("text/event-stream")
    );
    let mut pieces: Vec<(Instant, Bytes)> = Vec::new();
    while let Some(c) = within(Duration::from_secs(10), "a stream chunk", resp.chunk())
        .await
        .expect("stream chunk")
    {
        pieces.push((Instant::now(), c));
    }

    let expected: Vec<u8> = chunks.iter().flat_map(|(_, c)| c.to_vec()).collect();
    let got: Vec<u8> = pieces.iter().flat_map(|(_, c)| c.to_vec()).collect();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&expected),
        "the stream arrives byte-identical"
    );
    assert!(got.ends_with(b"data: [DONE]\n\n"));

    // Chunk by chunk: each chunk reached the client within 150 ms of the mock sending it
    // (chunks are 200 ms apart), so nothing is buffered until the end.
    let log = mock.wait_stream(1, Duration::from_secs(1)).await;
    let emitted = log.emitted();
    assert_eq!(emitted.len(), chunks.len(), "the mock sent every chunk");
    let mut end_of_chunk = 0;
    for (i, (_, chunk)) in chunks.iter().enumerate() {
        end_of_chunk += chunk.len();
        let arrived = arrival_of_byte(&pieces, end_of_chunk);
        let lag = arrived.saturating_duration_since(emitted[i]);
        assert!(
            lag < ms(150),
            "chunk {i} reached the client {lag:?} after the mock sent it"
        );
    }
}

/// The instant the received byte count first reached `len`.
fn arrival_of_byte(pieces: &[(Instant, Bytes)], len: usize) -> Instant {
    let mut total = 0;
    for (at, chunk) in pieces {
        total += chunk.len();
        if total >= len {
            return *at;
        }
    }
    panic!("only {total} bytes arrived, wanted {len}");
}

/// Over h2 a request need not declare its body length: one that does (a small POST) takes the
/// forwarder, one that does not (a GET) Pingora's proxy path; both arrive exactly, and a
/// pass-through stream comes back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_over_h2_with_and_without_a_declared_length() {
    let dir = TempDir::new("tls-h2-pass");
    let chunks = sse_chunks(5, Duration::from_millis(5));
    let expected_stream: Vec<u8> = chunks.iter().flat_map(|(_, c)| c.to_vec()).collect();
    let mock = Mock::start(move |r| match r.uri.as_str() {
        "/events" => Reply::sse(chunks.clone()),
        _ => Reply::json(200, format!("{{\"got\":{}}}", r.body.len())),
    });
    let proxy = TlsProxy::start(&dir, &config(&mock.url()));
    let h2 = proxy.https_client(false);
    let body: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();

    let post = within(
        Duration::from_secs(10),
        "an h2 POST",
        h2.post(proxy.https_url("/raw/upload"))
            .body(body.clone())
            .send(),
    )
    .await
    .expect("h2 POST");
    assert_eq!(post.version(), reqwest::Version::HTTP_2);
    assert_eq!(post.status(), 200);
    assert_eq!(post.text().await.unwrap(), "{\"got\":5000}");

    let get = within(
        Duration::from_secs(10),
        "an h2 GET",
        h2.get(proxy.https_url("/raw/v1/models")).send(),
    )
    .await
    .expect("h2 GET");
    assert_eq!(get.status(), 200);
    assert_eq!(get.text().await.unwrap(), "{\"got\":0}");

    let stream = within(
        Duration::from_secs(10),
        "an h2 pass-through stream",
        h2.post(proxy.https_url("/raw/events")).body("{}").send(),
    )
    .await
    .expect("h2 stream");
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.bytes().await.unwrap(), expected_stream);

    let got = mock.requests();
    assert_eq!(got.len(), 3, "{got:#?}");
    assert_eq!(
        (got[0].method.as_str(), got[0].uri.as_str()),
        ("POST", "/upload")
    );
    assert!(got[0].body == body, "the h2 upload arrived byte-identical");
    assert_eq!(got[0].header("content-length"), Some("5000"));
    assert_eq!(
        (got[1].method.as_str(), got[1].uri.as_str()),
        ("GET", "/v1/models")
    );
    assert!(got[1].body.is_empty());
    assert_eq!(got[2].body_str(), "{}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sees_forwarded_proto_https() {
    let dir = TempDir::new("tls-xfp");
    let mock = Mock::start(upstream(Vec::new()));
    let proxy = TlsProxy::start(&dir, &config(&mock.url()));

    let resp = post_chat(&proxy.https_client(false), proxy.https_url(CHAT), CHAT_BODY).await;
    assert_eq!(resp.status(), 200);
    let resp = post_chat(&proxy.https_client(true), proxy.https_url(CHAT), CHAT_BODY).await;
    assert_eq!(resp.status(), 200);
    let resp = post_chat(&common::client(), proxy.http_url(CHAT), CHAT_BODY).await;
    assert_eq!(resp.status(), 200);

    let got = mock.requests();
    assert_eq!(got.len(), 3, "{got:#?}");
    let proto: Vec<Vec<&str>> = got
        .iter()
        .map(|r| r.header_all("x-forwarded-proto"))
        .collect();
    assert_eq!(
        proto,
        [vec!["https"], vec!["https"], vec!["http"]],
        "x-forwarded-proto for h2 over TLS, h1 over TLS, then plain http"
    );
}

/// A renewed certificate written over the same files is served after a reload, without a
/// restart; connections made before keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_serves_a_renewed_certificate() {
    let mock = Mock::start(upstream(Vec::new()));
    let dir = TempDir::new("tls-reload");
    let proxy = TlsProxy::start(&dir, &config(&mock.url()));
    let old_client = proxy.https_client(false);
    let resp = post_chat(&old_client, proxy.https_url(CHAT), CHAT_BODY).await;
    assert_eq!(resp.status(), 200);

    let renewed = SelfSigned::write_to(&dir);
    let resp = reqwest::Client::new()
        .post(format!("http://{}/admin/reload", proxy.admin))
        .send()
        .await
        .expect("reload");
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );

    // A new connection trusting only the renewed certificate succeeds…
    let new_client = proxy.https_client_trusting(&renewed.cert_pem, false);
    let resp = post_chat(&new_client, proxy.https_url(CHAT), CHAT_BODY).await;
    assert_eq!(resp.status(), 200);
    // …and one trusting only the old certificate is refused in the handshake.
    let stale = proxy.https_client_trusting(&proxy.cert_pem, false);
    let err = stale
        .post(proxy.https_url(CHAT))
        .header("content-type", "application/json")
        .body(CHAT_BODY)
        .send()
        .await;
    assert!(err.is_err(), "the old certificate is no longer served");
}
