//! A scriptable mock upstream (hyper 1, HTTP/1.1) that records what it receives.
//!
//! It runs its own accept loop on its own Tokio runtime, so it counts TCP connections and keeps
//! working whatever runtime (if any) the test uses. Every request is recorded in full (method,
//! path and query, headers as received, body bytes) before the scripted reply is chosen; every
//! streamed reply keeps a [`StreamLog`] of when each chunk was handed to hyper and how the
//! stream ended (completed, aborted on purpose, or dropped because the peer went away).

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method, e.g. `POST`.
    pub method: String,
    /// Path and query exactly as on the request line, e.g. `/v1/models?x=1`.
    pub uri: String,
    /// Headers as received.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Index of the TCP connection it came on (0 for the first accepted connection).
    pub conn: usize,
    /// When the body had been read completely.
    pub at: Instant,
}

impl Recorded {
    /// The single value of a header as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ascii header"))
    }

    /// Every value of a header, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ascii header"))
            .collect()
    }

    /// The body as UTF-8 text.
    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).expect("utf-8 body")
    }
}

/// How a streamed reply ends after its chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// A terminating chunk: a clean end.
    Clean,
    /// Wait, then fail the body: hyper drops the connection without a terminating chunk.
    Abort {
        /// Pause between the last chunk and the abort (lets hyper flush the chunks first).
        after: Duration,
    },
}

/// The body of a scripted reply.
#[derive(Debug, Clone)]
pub enum ReplyBody {
    /// A fixed body; hyper sends it with `Content-Length`.
    Full(Bytes),
    /// A chunked body: each chunk is sent after its delay.
    Stream {
        /// `(delay before the chunk, chunk bytes)`.
        chunks: Vec<(Duration, Bytes)>,
        /// What happens after the last chunk.
        end: End,
    },
}

/// A scripted reply.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: ReplyBody,
}

impl Reply {
    /// An empty `status` reply with no headers.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: ReplyBody::Full(Bytes::new()),
        }
    }

    /// A `Content-Length` JSON reply.
    pub fn json(status: u16, body: impl Into<Bytes>) -> Self {
        Self::status(status)
            .header("content-type", "application/json")
            .body(body)
    }

    /// A 200 `text/event-stream` reply sending `chunks` (each after its delay), then ending cleanly.
    pub fn sse(chunks: Vec<(Duration, Bytes)>) -> Self {
        Self::status(200)
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .chunks(chunks)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Sets a fixed body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = ReplyBody::Full(body.into());
        self
    }

    /// Sets a chunked body that ends cleanly.
    pub fn chunks(mut self, chunks: Vec<(Duration, Bytes)>) -> Self {
        self.body = ReplyBody::Stream {
            chunks,
            end: End::Clean,
        };
        self
    }

    /// Makes a chunked body break off `after` its last chunk instead of ending cleanly.
    pub fn then_abort(mut self, after: Duration) -> Self {
        if let ReplyBody::Stream { end, .. } = &mut self.body {
            *end = End::Abort { after };
        } else {
            panic!("then_abort needs a chunked body");
        }
        self
    }
}

/// How a streamed reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Every chunk was sent and the body ended cleanly.
    Completed,
    /// The body failed on purpose ([`End::Abort`]).
    Aborted,
    /// hyper dropped the body before it ended: the peer closed the connection.
    Dropped,
}

/// What happened to one streamed reply.
#[derive(Debug)]
pub struct StreamLog {
    /// Path and query of the request it answers.
    pub uri: String,
    emitted: Mutex<Vec<Instant>>,
    end: Mutex<Option<(Instant, StreamEnd)>>,
}

impl StreamLog {
    /// When each chunk was handed to hyper, in order.
    pub fn emitted(&self) -> Vec<Instant> {
        self.emitted.lock().unwrap().clone()
    }

    /// When and how the stream ended, once it has.
    pub fn end(&self) -> Option<(Instant, StreamEnd)> {
        *self.end.lock().unwrap()
    }

    /// Waits (polling) until the stream has ended, up to `timeout`.
    pub async fn wait_end(&self, timeout: Duration) -> Option<(Instant, StreamEnd)> {
        let ended = super::wait_until(timeout, || self.end().is_some()).await;
        ended.then(|| self.end()).flatten()
    }

    fn finish(&self, how: StreamEnd) {
        let mut end = self.end.lock().unwrap();
        if end.is_none() {
            *end = Some((Instant::now(), how));
        }
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

struct State {
    accepted: AtomicUsize,
    requests: Mutex<Vec<Recorded>>,
    streams: Mutex<Vec<Arc<StreamLog>>>,
    handler: Handler,
}

/// A running mock upstream; stops (closing its listener and connections) when dropped.
pub struct Mock {
    addr: SocketAddr,
    state: Arc<State>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Mock {
    /// Starts a mock on `127.0.0.1:<free port>` answering every request with `handler`'s reply.
    pub fn start(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mock-upstream")
            .enable_all()
            .build()
            .expect("mock runtime");
        // Bound with std: `block_on` is not allowed when the test itself runs on a runtime.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind mock listener");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("mock address");
        let state = Arc::new(State {
            accepted: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            streams: Mutex::new(Vec::new()),
            handler: Arc::new(handler),
        });
        let accept_state = state.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            accept_loop(listener, accept_state).await
        });
        Self {
            addr,
            state,
            rt: Some(rt),
        }
    }

    /// Starts a mock answering every request with the same reply.
    pub fn replying(reply: Reply) -> Self {
        Self::start(move |_| reply.clone())
    }

    /// `http://127.0.0.1:<port>`, for an upstream's `endpoints`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The only request received; panics unless exactly one arrived.
    pub fn only_request(&self) -> Recorded {
        let all = self.requests();
        assert_eq!(
            all.len(),
            1,
            "expected exactly one upstream request: {all:#?}"
        );
        all.into_iter().next().unwrap()
    }

    /// Logs of the streamed replies so far, in the order they started.
    pub fn streams(&self) -> Vec<Arc<StreamLog>> {
        self.state.streams.lock().unwrap().clone()
    }

    /// Waits (polling) until `n` streamed replies have started, and returns the `n`-th.
    pub async fn wait_stream(&self, n: usize, timeout: Duration) -> Arc<StreamLog> {
        let started = super::wait_until(timeout, || self.streams().len() >= n).await;
        assert!(started, "stream #{n} did not start within {timeout:?}");
        self.streams()[n - 1].clone()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Safe inside an async test: does not block on the runtime's tasks.
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let conn = state.accepted.fetch_add(1, Ordering::SeqCst);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&state, conn, req).await) }
            });
            // Errors here are the point of some tests (aborted bodies, peers going away).
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type MockBody = BoxBody<Bytes, std::io::Error>;

async fn answer(
    state: &State,
    conn: usize,
    req: hyper::Request<Incoming>,
) -> hyper::Response<MockBody> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return hyper::Response::builder()
                .status(400)
                .body(full(Bytes::from(format!("mock: reading the body: {e}"))))
                .unwrap()
        }
    };
    let recorded = Recorded {
        method: parts.method.to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
        conn,
        at: Instant::now(),
    };
    let reply = (state.handler)(&recorded);
    let uri = recorded.uri.clone();
    state.requests.lock().unwrap().push(recorded);

    let mut builder = hyper::Response::builder().status(reply.status);
    for (k, v) in &reply.headers {
        builder = builder.header(k, v);
    }
    let body = match reply.body {
        ReplyBody::Full(b) => full(b),
        ReplyBody::Stream { chunks, end } => {
            let log = Arc::new(StreamLog {
                uri,
                emitted: Mutex::new(Vec::new()),
                end: Mutex::new(None),
            });
            state.streams.lock().unwrap().push(log.clone());
            stream_body(Emitter {
                log,
                chunks: chunks.into(),
                end,
                done: false,
            })
        }
    };
    builder.body(body).expect("scripted reply")
}

fn full(b: Bytes) -> MockBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// The state of a streamed reply; records `Dropped` if hyper drops it before it ended.
struct Emitter {
    log: Arc<StreamLog>,
    chunks: VecDeque<(Duration, Bytes)>,
    end: End,
    done: bool,
}

impl Drop for Emitter {
    fn drop(&mut self) {
        if !self.done {
            self.log.finish(StreamEnd::Dropped);
        }
    }
}

fn stream_body(emitter: Emitter) -> MockBody {
    let frames = futures::stream::unfold(emitter, |mut e| async move {
        if e.done {
            return None;
        }
        if let Some((delay, chunk)) = e.chunks.pop_front() {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            e.log.emitted.lock().unwrap().push(Instant::now());
            return Some((Ok(Frame::data(chunk)), e));
        }
        e.done = true;
        match e.end {
            End::Clean => {
                e.log.finish(StreamEnd::Completed);
                None
            }
            End::Abort { after } => {
                tokio::time::sleep(after).await;
                e.log.finish(StreamEnd::Aborted);
                let err = std::io::Error::other("mock: scripted abort");
                Some((Err(err), e))
            }
        }
    });
    BodyExt::boxed(StreamBody::new(frames))
}
