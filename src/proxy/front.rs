//! The front door of the proxy listeners. On HTTP/1 it reads each request's head itself and
//! answers what llm-edge answers on its own (API calls, the model list, errors, small
//! pass-through requests) through [`EdgeProxy::handle`], without Pingora's per-request proxy
//! machinery: that is a 13.4 KB boxed future per request, copied in and held for the whole
//! of a stream (callgrind, massif). Everything else goes to Pingora's proxy exactly as it
//! arrived: HTTP/2, CONNECT, pass-through uploads the forwarder cannot take, and heads that
//! do not parse or do not end within [`HEAD_CAP`].

use super::{takes_pingora_path, EdgeProxy};
use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::{HttpProxy, ProxyHttp, Session};
use pingora::server::ShutdownWatch;
use pingora::{Error, ErrorType};
use std::cell::RefCell;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::Notify;

/// The most one read of a request head takes from the socket (the scratch buffer's size).
const READ_MAX: usize = 16 << 10;

thread_local! {
    /// Where request heads are read before they are copied into a buffer of their own size.
    /// The buffer becomes the parsed header's storage for the whole request, so a head read
    /// into Pingora's 4 KiB buffer held those 4 KiB through a stream (4 MB over 1,000 open
    /// streams, massif), and an idle keep-alive connection held one while it waited.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_MAX].into_boxed_slice());
}

/// Bytes read without finding the end of the head after which Pingora's parser takes over
/// (it keeps reading, and applies its own limit; ours follow in `handle`).
pub const HEAD_CAP: usize = 16 << 10;

/// How long a connection may wait for (each read of) the next request head: Pingora's
/// default keep-alive timeout, in seconds.
const KEEPALIVE_SECS: u64 = 60;

/// The proxy listeners' application: llm-edge's HTTP/1 front, in front of Pingora's proxy.
pub struct EdgeApp {
    edge: EdgeProxy,
    proxy: Arc<HttpProxy<EdgeProxy>>,
    /// Set when the service shuts down: idle connections close, answers end keep-alive.
    closing: AtomicBool,
    closed: Notify,
}

/// What reading a request head gave.
enum Head {
    /// The head's end is in the buffer (with whatever followed it).
    Whole(BytesMut),
    /// [`HEAD_CAP`] bytes and no end yet: Pingora's parser carries on.
    Long(BytesMut),
    /// The client closed or went quiet, or the service is shutting down.
    Gone,
}

/// Where the head in `buf` ends (one past its empty line), searching from `from`. As in
/// Pingora's parser (httparse), bare LF line ends count and empty lines before the request
/// line do not end a head: the parser must find the whole head in what is handed to it, or
/// it reads the socket, and bytes it reads would be missing if the request then went to
/// Pingora's proxy. Hot path: one `memchr` pass over the head.
pub fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let lead = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let mut at = from.max(lead);
    while let Some(i) = memchr::memchr(b'\n', &buf[at..]) {
        let nl = at + i;
        match &buf[nl + 1..] {
            [b'\n', ..] => return Some(nl + 2),
            [b'\r', b'\n', ..] => return Some(nl + 3),
            _ => at = nl + 1,
        }
    }
    None
}

/// Reads once from `stream` into the thread's scratch buffer and appends what came to `buf`,
/// which so grows only by the bytes that arrived.
async fn read_onto(stream: &mut Stream, buf: &mut BytesMut) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut got = ReadBuf::new(scratch);
            match Pin::new(&mut *stream).poll_read(cx, &mut got) {
                Poll::Ready(Ok(())) => {
                    buf.extend_from_slice(got.filled());
                    Poll::Ready(Ok(got.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    })
    .await
}

/// Readies a new HTTP/1 session to parse `read`, the bytes already read from its connection.
fn prime(session: &mut ServerSession, read: BytesMut, keepalive: Option<u64>) {
    if let ServerSession::H1(h1) = session {
        h1.set_pipelined_prefix(read);
    }
    session.set_keepalive(keepalive);
}

impl EdgeApp {
    /// The front for `edge`; `proxy` is Pingora's proxy over the same `EdgeProxy`.
    pub fn new(edge: EdgeProxy, proxy: HttpProxy<EdgeProxy>) -> Self {
        Self {
            edge,
            proxy: Arc::new(proxy),
            closing: AtomicBool::new(false),
            closed: Notify::new(),
        }
    }

    fn keepalive(&self, shutdown: &ShutdownWatch) -> Option<u64> {
        if *shutdown.borrow() || self.closing.load(Ordering::Acquire) {
            None
        } else {
            Some(KEEPALIVE_SECS)
        }
    }

    /// Reads until the end of a request head, onto what an earlier request left in `buf`.
    async fn read_head(&self, stream: &mut Stream, mut buf: BytesMut) -> Head {
        let closed = self.closed.notified();
        tokio::pin!(closed);
        if self.closing.load(Ordering::Acquire) {
            return Head::Gone;
        }
        let mut scanned = 0;
        loop {
            if head_end(&buf, scanned).is_some() {
                return Head::Whole(buf);
            }
            if buf.len() >= HEAD_CAP {
                return Head::Long(buf);
            }
            // A line end may straddle two reads.
            scanned = buf.len().saturating_sub(2);
            let wait = Duration::from_secs(KEEPALIVE_SECS);
            let read = tokio::select! {
                biased;
                r = pingora::time::timeout(wait, read_onto(stream, &mut buf)) => r,
                () = &mut closed => return Head::Gone,
            };
            match read {
                Ok(Ok(n)) if n > 0 => {}
                Ok(Ok(_)) => return Head::Gone,
                Ok(Err(e)) => {
                    tracing::debug!("reading a request head: {e}");
                    return Head::Gone;
                }
                Err(_) => return Head::Gone,
            }
        }
    }

    /// Gives the connection to Pingora's proxy with the bytes already read from it.
    async fn hand_over(
        self: &Arc<Self>,
        stream: Stream,
        read: BytesMut,
        shutdown: &ShutdownWatch,
    ) -> Option<(Stream, BytesMut)> {
        let mut session = ServerSession::new_http1(stream);
        prime(&mut session, read, self.keepalive(shutdown));
        let reused = self.proxy.process_new_http(session, shutdown).await?;
        // Pingora keeps pipelining off, so nothing read past the request comes back.
        let (stream, _settings) = reused.consume();
        Some((stream, BytesMut::new()))
    }

    /// Serves one request whose head is in `read`; the connection back for the next one,
    /// with anything read past this request.
    async fn serve(
        self: &Arc<Self>,
        stream: Stream,
        read: BytesMut,
        shutdown: &ShutdownWatch,
    ) -> Option<(Stream, BytesMut)> {
        // Kept until the route is known, in case Pingora's proxy takes the request.
        let copy = BytesMut::from(&read[..]);
        let mut session = Session::new_h1(stream);
        let down = session.as_downstream_mut();
        prime(down, read, self.keepalive(shutdown));
        // The head is all in the prefix: this parses without reading the socket.
        let parsed = matches!(down.read_request().await, Ok(true));
        let snap = self.edge.rt.state.load_full();
        if !parsed || takes_pingora_path(&snap, session.req_header()) {
            // Unparsable heads too: Pingora answers them as it always did.
            let ServerSession::H1(h1) = *session.downstream_session else {
                return None;
            };
            // Boxed, as the rare path: its session would size the connection's future.
            return Box::pin(self.hand_over(h1.into_inner(), copy, shutdown)).await;
        }
        drop(copy);
        if self.keepalive(shutdown).is_none() {
            session.set_keepalive(None);
        }
        let mut ctx = self.edge.new_ctx();
        let outcome = match self.edge.handle(&mut session, &mut ctx, snap, true).await {
            Ok(true) => None,
            // Only a pass-through request that does not fit the forwarder gives this, and
            // `takes_pingora_path` sent those to Pingora's proxy, on the same snapshot.
            Ok(false) => Some(Error::explain(
                ErrorType::InternalError,
                "a request for Pingora's proxy path reached the front",
            )),
            Err(e) => Some(e),
        };
        let reuse = match outcome {
            None => {
                self.edge.logging(&mut session, None, &mut ctx).await;
                true
            }
            Some(e) => self.failed(&mut session, &mut ctx, e).await,
        };
        if !reuse {
            return None;
        }
        // Boxed: this future (3.7 KB) would otherwise size the connection's future, which is
        // held for the whole of every stream; the box lives only while the response ends.
        let finish = Box::pin(session.downstream_session.finish());
        let reusable = finish.await.ok().flatten()?;
        let (stream, rest) = reusable.into_parts();
        Some((stream, rest.unwrap_or_default()))
    }

    /// A request that ended in an error (mid-stream, or the client went away): as Pingora's
    /// proxy ends one. Whether the connection may serve another request.
    async fn failed(
        &self,
        session: &mut Session,
        ctx: &mut <EdgeProxy as ProxyHttp>::CTX,
        e: Box<Error>,
    ) -> bool {
        let res = self.edge.fail_to_proxy(session, &e, ctx).await;
        if !self.edge.suppress_error_log(session, ctx, &e) {
            tracing::error!(
                request_id = %ctx.request_id,
                "request failed: {e}, status: {}",
                res.error_code
            );
        }
        self.edge.logging(session, Some(&e), ctx).await;
        session.downstream_session.on_proxy_failure(e);
        res.can_reuse_downstream
    }
}

#[async_trait]
impl ServerApp for EdgeApp {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        let mut carried = BytesMut::new();
        loop {
            let next = match self.read_head(&mut stream, carried).await {
                Head::Whole(read) => self.serve(stream, read, shutdown).await,
                Head::Long(read) => Box::pin(self.hand_over(stream, read, shutdown)).await,
                Head::Gone => return None,
            };
            (stream, carried) = next?;
        }
    }

    async fn cleanup(&self) {
        self.closing.store(true, Ordering::Release);
        self.closed.notify_waiters();
        ServerApp::cleanup(self.proxy.as_ref()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::head_end;

    #[test]
    fn finds_the_end_of_a_head() {
        let h = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
        assert_eq!(head_end(h, 0), Some(h.len() - 4));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\nrest", 0), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r", 0), None);
        assert_eq!(head_end(b"", 0), None);
    }

    #[test]
    fn empty_lines_before_the_request_line_are_not_a_head() {
        assert_eq!(head_end(b"\r\n\r\n", 0), None);
        assert_eq!(head_end(b"\n\n\r\n", 0), None);
        let h = b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(head_end(h, 0), Some(h.len()));
        assert_eq!(head_end(b"\r\nGET / HTTP/1.1\r\n", 0), None);
    }

    #[test]
    fn a_search_may_resume_where_it_stopped() {
        let h = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        // Resuming two bytes before the old end still sees a line end across the two reads.
        assert_eq!(head_end(h, 23), Some(h.len()));
        assert_eq!(head_end(h, h.len()), None);
    }
}
