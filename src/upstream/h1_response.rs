//! Hot path: reads an upstream's HTTP/1 response for the API forwarder. The header is parsed
//! once (httparse) into the header the forwarder works from, and body bytes are handed out as
//! slices of the one read buffer (no copy per chunk), which starts again at its front once
//! emptied.
//!
//! Pingora's client session did the same work with a second header map for name case, a fresh
//! 64 KiB body buffer and a copy of every chunk, and took each 1xx interim response for the
//! answer; this reader cost a fraction of it per call (callgrind figures in benches/README.md).
//!
//! Framing follows RFC 9112 §6.3: no body after HEAD, 1xx, 204 and 304; chunked when it is the
//! final transfer coding (a length beside it is ignored); otherwise `Content-Length`; otherwise
//! the body runs to the connection's close. Only a body read to its exact end, with nothing
//! after it, on a connection the response keeps alive, lets the connection be reused.

use bytes::{Buf, Bytes, BytesMut};
use futures::FutureExt;
use pingora::http::ResponseHeader;
use pingora::{Error, ErrorType, Result};
use std::mem::MaybeUninit;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Most header fields in one response.
const MAX_HEADERS: usize = 128;
/// Largest response header section (status line and fields).
const MAX_HEAD: usize = 256 << 10;
/// Largest trailer section of a chunked body, and longest chunk-size line.
const MAX_TRAILERS: usize = 64 << 10;
/// First read size; doubled while reads fill the buffer, up to `MAX_READ`. One page: a JSON
/// reply or a stream's header fits, and each open stream holds one buffer (8 KiB cost about
/// 3 KB more per stream in S5, 4 KiB one more read per S3 burst over 4 KiB).
const FIRST_READ: usize = 4 << 10;
const MAX_READ: usize = 64 << 10;

/// Where the body stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    /// Before the header was read.
    Head,
    /// This many body bytes still to come.
    Length(u64),
    /// Chunked: at a chunk-size line.
    ChunkSize,
    /// Chunked: this many bytes left of the current chunk's data.
    ChunkData(u64),
    /// Chunked: at the CRLF after a chunk's data.
    ChunkEnd,
    /// Chunked: after the last chunk, at the trailer section.
    Trailers,
    /// Until the upstream closes the connection.
    Close,
    /// The body has been read to its end.
    Done,
}

/// What the buffered bytes yield next.
enum Next {
    Data(Bytes),
    Done,
    More,
}

/// What the response header says about framing and reuse, read from its raw fields.
#[derive(Default)]
struct Fields {
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked_last: bool,
    close: bool,
    keep_alive: bool,
}

/// An HTTP/1 response being read from `io`, after the request was written on it.
pub struct H1Response<S> {
    io: S,
    buf: BytesMut,
    header: Option<ResponseHeader>,
    framing: Framing,
    /// The response lets the connection carry another request once the body is read.
    keep_alive: bool,
    /// Bytes arrived after the body's end (the connection is not in a known state).
    overread: bool,
    /// The request was HEAD: whatever the header says, no body follows.
    head_request: bool,
    read_size: usize,
    read_timeout: Option<Duration>,
    /// The last read took less than it had room for: the socket had nothing more then.
    drained: bool,
}

fn invalid(what: &'static str, detail: impl std::fmt::Display) -> Box<Error> {
    Error::explain(
        ErrorType::InvalidHTTPHeader,
        format!("upstream response: {what}: {detail}"),
    )
}

fn closed(while_: &'static str) -> Box<Error> {
    Error::explain(
        ErrorType::ConnectionClosed,
        format!("the upstream closed the connection {while_}"),
    )
}

/// `Content-Length`'s value: digits, or a list of identical digit runs (RFC 9110 §8.6).
fn parse_content_length(v: &[u8]) -> Option<u64> {
    let mut found: Option<u64> = None;
    for part in v.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
fn lists(v: &[u8], token: &[u8]) -> bool {
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

impl Fields {
    fn read(&mut self, name: &[u8], value: &[u8]) -> Result<()> {
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(value)
                .ok_or_else(|| invalid("invalid content-length", value.escape_ascii()))?;
            if self.content_length.is_some_and(|m| m != n) {
                return Err(invalid("conflicting content-length values", n));
            }
            self.content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encoding = true;
            // The last coding of the last field decides (RFC 9112 §6.3, 4).
            if let Some(last) = value.rsplit(|&b| b == b',').next() {
                self.chunked_last = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            self.close |= lists(value, b"close");
            self.keep_alive |= lists(value, b"keep-alive");
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> H1Response<S> {
    /// A reader for the response to a request just written on `io`; `head_request` when that
    /// request was HEAD (no body follows whatever the header says).
    pub fn new(io: S, head_request: bool) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            header: None,
            framing: Framing::Head,
            keep_alive: false,
            overread: false,
            head_request,
            read_size: FIRST_READ,
            read_timeout: None,
            drained: false,
        }
    }

    /// Each read from here on waits at most this long (`None`: no limit).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.read_timeout = timeout;
    }

    /// The final response header, once read.
    pub fn header(&self) -> Option<&ResponseHeader> {
        self.header.as_ref()
    }

    /// The final response header, taken out (the reader needs it no more).
    pub fn take_header(&mut self) -> Option<ResponseHeader> {
        self.header.take()
    }

    /// Whether the connection can carry another request: the body was read to its exact end
    /// and the response keeps the connection alive.
    pub fn reusable(&self) -> bool {
        self.framing == Framing::Done && self.keep_alive && !self.overread
    }

    /// The connection, for the pool.
    pub fn into_io(self) -> S {
        self.io
    }

    /// Reads more bytes into the buffer; `Ok(0)` at the end of the stream.
    async fn fill(&mut self) -> Result<usize> {
        let spare = self.buf.capacity() - self.buf.len();
        // An emptied buffer starts again at the front of its allocation (`reserve` reclaims
        // it once the pieces handed out are dropped): walking on through it touched every
        // page of it over a long stream (S5 peak memory).
        if spare < self.read_size / 2 || (self.buf.is_empty() && spare < self.read_size) {
            self.buf.reserve(self.read_size);
        }
        let spare = self.buf.capacity() - self.buf.len();
        let read = self.io.read_buf(&mut self.buf);
        let n = match self.read_timeout {
            // Pingora's timer wheel: a tokio timer per read cost a timer-driver turn each.
            Some(t) => match pingora::time::fast_timeout::fast_timeout(t, read).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(Error::explain(
                        ErrorType::ReadTimedout,
                        format!("no data from the upstream for {t:?}"),
                    ))
                }
            },
            None => read.await,
        }
        .map_err(|e| Error::because(ErrorType::ReadError, "reading from the upstream", e))?;
        self.drained = n < spare;
        if n == spare && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        Ok(n)
    }

    /// Reads the response header, skipping interim (1xx) responses.
    pub async fn read_header(&mut self) -> Result<()> {
        loop {
            if self.parse_head()? {
                return Ok(());
            }
            if self.buf.len() > MAX_HEAD {
                return Err(invalid("header section too large", self.buf.len()));
            }
            if self.fill().await? == 0 {
                return Err(closed(if self.buf.is_empty() {
                    "before sending a response"
                } else {
                    "in the middle of the response header"
                }));
            }
        }
    }

    /// Parses a complete header from the buffer: `Ok(true)` once the final one is read.
    fn parse_head(&mut self) -> Result<bool> {
        loop {
            if self.buf.is_empty() {
                return Ok(false);
            }
            let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut []);
            let mut config = httparse::ParserConfig::default();
            config.allow_spaces_after_header_name_in_responses(true);
            config.allow_obsolete_multiline_headers_in_responses(true);
            let len =
                match config.parse_response_with_uninit_headers(&mut resp, &self.buf, &mut slots) {
                    Ok(httparse::Status::Complete(len)) => len,
                    Ok(httparse::Status::Partial) => return Ok(false),
                    Err(e) => return Err(invalid("malformed header", e)),
                };
            let code = resp.code.unwrap_or(0);
            if (100..200).contains(&code) {
                if code == 101 {
                    return Err(invalid("unexpected status", code));
                }
                // An interim response (100 Continue, 103 Early Hints): the final one follows.
                self.buf.advance(len);
                continue;
            }
            // Names now; values as offsets, taken as slices of the frozen head once the
            // parse's borrow of the buffer ends.
            let base = self.buf.as_ptr() as usize;
            let mut fields = Fields::default();
            let mut named = Vec::with_capacity(resp.headers.len());
            for h in resp.headers.iter() {
                fields.read(h.name.as_bytes(), h.value)?;
                let name = http::HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| invalid("invalid header name", h.name.escape_default()))?;
                let at = h.value.as_ptr() as usize - base;
                named.push((name, at, at + h.value.len()));
            }
            let version = resp.version;
            // A copy of its own: header values sharing the read buffer would pin it for as
            // long as the response header lives (the whole stream, downstream), so every
            // buffer refill would need a new allocation (S5 peak memory).
            let head = Bytes::copy_from_slice(&self.buf[..len]);
            self.buf.advance(len);
            self.header = Some(build_header(code, version, &head, named, &fields)?);
            self.keep_alive = match version {
                Some(1) => !fields.close,
                // HTTP/1.0 keeps a connection only when asked, and never with a transfer coding.
                _ => fields.keep_alive && !fields.close && !fields.transfer_encoding,
            };
            self.framing = if self.head_request || code == 204 || code == 304 {
                Framing::Length(0)
            } else if fields.transfer_encoding {
                if fields.chunked_last {
                    Framing::ChunkSize
                } else {
                    Framing::Close
                }
            } else if let Some(n) = fields.content_length {
                Framing::Length(n)
            } else {
                Framing::Close
            };
            if self.framing == Framing::Close {
                self.keep_alive = false;
            }
            return Ok(true);
        }
    }

    /// Hot path: the next piece of body the buffer holds, without reading.
    fn next_buffered(&mut self) -> Result<Next> {
        loop {
            match self.framing {
                Framing::Head => return Err(invalid("body read before the header", "")),
                Framing::Done => return Ok(Next::Done),
                Framing::Length(0) => {
                    self.framing = Framing::Done;
                    self.overread |= !self.buf.is_empty();
                    return Ok(Next::Done);
                }
                Framing::Length(left) | Framing::ChunkData(left) => {
                    if self.buf.is_empty() {
                        return Ok(Next::More);
                    }
                    let n = left.min(self.buf.len() as u64);
                    let data = self.buf.split_to(n as usize).freeze();
                    self.framing = match self.framing {
                        Framing::Length(_) => Framing::Length(left - n),
                        _ if left == n => Framing::ChunkEnd,
                        _ => Framing::ChunkData(left - n),
                    };
                    return Ok(Next::Data(data));
                }
                Framing::ChunkSize => match chunk_size(&self.buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        self.buf.advance(used);
                        self.framing = if size == 0 {
                            Framing::Trailers
                        } else {
                            Framing::ChunkData(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() > MAX_TRAILERS => {
                        return Err(invalid("chunk-size line too long", self.buf.len()))
                    }
                    Ok(httparse::Status::Partial) => return Ok(Next::More),
                    Err(_) => {
                        let line = &self.buf[..self.buf.len().min(32)];
                        return Err(invalid("invalid chunk size", line.escape_ascii()));
                    }
                },
                Framing::ChunkEnd => match (self.buf.first(), self.buf.get(1)) {
                    (Some(b'\r'), Some(b'\n')) => {
                        self.buf.advance(2);
                        self.framing = Framing::ChunkSize;
                    }
                    (None, _) | (Some(b'\r'), None) => return Ok(Next::More),
                    _ => {
                        let got = &self.buf[..self.buf.len().min(2)];
                        return Err(invalid(
                            "chunk data not followed by CRLF",
                            got.escape_ascii(),
                        ));
                    }
                },
                Framing::Trailers => {
                    // Trailer fields are read past and dropped; the section ends at an empty line.
                    let end = if self.buf.starts_with(b"\r\n") {
                        Some(2)
                    } else {
                        memchr::memmem::find(&self.buf, b"\r\n\r\n").map(|p| p + 4)
                    };
                    match end {
                        Some(end) => {
                            self.buf.advance(end);
                            self.framing = Framing::Length(0);
                        }
                        None if self.buf.len() > MAX_TRAILERS => {
                            return Err(invalid("trailer section too large", self.buf.len()))
                        }
                        None => return Ok(Next::More),
                    }
                }
                Framing::Close => {
                    if self.buf.is_empty() {
                        return Ok(Next::More);
                    }
                    return Ok(Next::Data(self.buf.split().freeze()));
                }
            }
        }
    }

    /// Hot path: what [`Self::read_body`] gives without waiting (`None`: nothing yet). After a
    /// read that drained the socket the buffer alone is looked at: tokio clears a socket's
    /// readiness after a short read, so reading again before the next poll only comes back
    /// empty, through several layers (about 300 instructions per chunk, callgrind S5).
    pub fn read_ready(&mut self) -> Option<Result<Option<Bytes>>> {
        match self.next_buffered() {
            Ok(Next::Data(d)) => Some(Ok(Some(d))),
            Ok(Next::Done) => Some(Ok(None)),
            Err(e) => Some(Err(e)),
            Ok(Next::More) if self.drained => None,
            Ok(Next::More) => self.read_body().now_or_never(),
        }
    }

    /// Hot path: the next piece of the body (`None` at its end). Cancel-safe: bytes are only
    /// taken from the buffer once they are returned.
    pub async fn read_body(&mut self) -> Result<Option<Bytes>> {
        loop {
            match self.next_buffered()? {
                Next::Data(d) => return Ok(Some(d)),
                Next::Done => return Ok(None),
                Next::More => {}
            }
            if self.fill().await? == 0 {
                if self.framing == Framing::Close {
                    self.framing = Framing::Done;
                    return Ok(None);
                }
                return Err(closed("before the end of the response body"));
            }
        }
    }
}

/// Hot path: a chunk-size line, read directly in its usual form (hex digits, CRLF); lines with
/// extensions or whitespace go to httparse. A line without digits is invalid.
fn chunk_size(
    buf: &[u8],
) -> std::result::Result<httparse::Status<(usize, u64)>, httparse::InvalidChunkSize> {
    let mut size = 0u64;
    let mut digits = 0;
    // At most 16 digits (a u64); a 17th goes to httparse, which refuses it.
    for &b in buf.iter().take(16) {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => break,
        };
        size = size << 4 | u64::from(d);
        digits += 1;
    }
    match (buf.get(digits), buf.get(digits + 1)) {
        (Some(b'\r'), Some(b'\n')) if digits > 0 => {
            Ok(httparse::Status::Complete((digits + 2, size)))
        }
        (Some(_), _) if digits == 0 => Err(httparse::InvalidChunkSize),
        _ => httparse::parse_chunk_size(buf),
    }
}

/// The response header as the forwarder uses it: one header map (no second map for name
/// case), values sharing the head's bytes. A length beside chunked coding is left out: the
/// chunked coding frames the body.
fn build_header(
    code: u16,
    version: Option<u8>,
    head: &Bytes,
    named: Vec<(http::HeaderName, usize, usize)>,
    fields: &Fields,
) -> Result<ResponseHeader> {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = http::StatusCode::from_u16(code).map_err(|e| invalid("invalid status", e))?;
    parts.version = match version {
        Some(1) => http::Version::HTTP_11,
        _ => http::Version::HTTP_10,
    };
    let h = &mut parts.headers;
    // Room for the fields llm-edge adds downstream (request id, framing, CORS), so the map is
    // not grown again there.
    h.reserve(named.len() + 6);
    for (name, from, to) in named {
        if fields.transfer_encoding && name == http::header::CONTENT_LENGTH {
            continue;
        }
        let value = http::HeaderValue::from_maybe_shared(head.slice(from..to))
            .map_err(|_| invalid("invalid header value", &name))?;
        h.append(name, value);
    }
    Ok(ResponseHeader::from(parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader over `wire`, delivered in pieces of `step` bytes (one read each).
    fn reader(wire: &[u8], step: usize) -> H1Response<tokio_test_io::Pieces> {
        H1Response::new(tokio_test_io::Pieces::new(wire, step), false)
    }

    /// Reads a whole response: status, body, and whether the connection is reusable.
    async fn read_all(r: &mut H1Response<tokio_test_io::Pieces>) -> Result<(u16, Vec<u8>)> {
        r.read_header().await?;
        let status = r.header().map(|h| h.status.as_u16()).unwrap_or(0);
        let mut body = Vec::new();
        while let Some(d) = r.read_body().await? {
            assert!(!d.is_empty(), "an empty piece of body was returned");
            body.extend_from_slice(&d);
        }
        Ok((status, body))
    }

    /// Every way of cutting `wire` into reads gives the same result.
    async fn check(wire: &[u8], status: u16, body: &[u8], reusable: bool) {
        for step in [1, 2, 3, 5, 7, 16, wire.len()] {
            let mut r = reader(wire, step);
            let got = read_all(&mut r).await;
            let (s, b) = got.unwrap_or_else(|e| panic!("step {step}: {e}"));
            assert_eq!(s, status, "step {step}");
            assert_eq!(b, body, "step {step}: {:?}", String::from_utf8_lossy(&b));
            assert_eq!(r.reusable(), reusable, "step {step}");
        }
    }

    async fn check_err(wire: &[u8], contains: &str) {
        for step in [1, 3, wire.len()] {
            let mut r = reader(wire, step);
            let e = read_all(&mut r).await.expect_err("should fail");
            let s = e.to_string();
            assert!(s.contains(contains), "step {step}: {s}");
        }
    }

    #[tokio::test]
    async fn content_length_body() {
        check(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}",
            200,
            b"{\"ok\":true}",
            true,
        )
        .await;
    }

    #[tokio::test]
    async fn zero_length_and_no_body_statuses() {
        check(
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            200,
            b"",
            true,
        )
        .await;
        check(b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", true).await;
        check(
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
            304,
            b"",
            true,
        )
        .await;
    }

    #[tokio::test]
    async fn head_request_has_no_body() {
        let wire = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
        let mut r = H1Response::new(tokio_test_io::Pieces::new(wire, 4), true);
        let (s, b) = read_all(&mut r).await.unwrap();
        assert_eq!((s, b.len()), (200, 0));
        assert!(r.reusable());
    }

    #[tokio::test]
    async fn chunked_body_with_extensions_and_trailers() {
        check(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\nA\r\n, world!!!\r\n0\r\nX-Trailer: a\r\nX-Other: b\r\n\r\n",
            200,
            b"hello, world!!!",
            true,
        )
        .await;
        check(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            200,
            b"abc",
            true,
        )
        .await;
    }

    #[tokio::test]
    async fn chunked_wins_over_content_length_which_is_dropped() {
        let wire = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
        check(wire, 200, b"{}", true).await;
        let mut r = reader(wire, wire.len());
        r.read_header().await.unwrap();
        let h = r.header().unwrap();
        assert!(h.headers.get("content-length").is_none());
        assert_eq!(h.headers.get("transfer-encoding").unwrap(), "chunked");
    }

    #[tokio::test]
    async fn close_delimited_bodies_are_read_to_the_end_and_not_reused() {
        check(
            b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
            200,
            b"until the end",
            false,
        )
        .await;
        // A transfer coding other than chunked last: the body runs to the close.
        check(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nraw",
            200,
            b"raw",
            false,
        )
        .await;
    }

    #[tokio::test]
    async fn keep_alive_rules() {
        let body = b"{}";
        check(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 2\r\n\r\n{}",
            200,
            body,
            false,
        )
        .await;
        check(
            b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\ncontent-length: 2\r\n\r\n{}",
            200,
            body,
            false,
        )
        .await;
        check(
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n{}",
            200,
            body,
            false,
        )
        .await;
        check(
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\n{}",
            200,
            body,
            true,
        )
        .await;
        check(
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            200,
            body,
            false,
        )
        .await;
    }

    #[tokio::test]
    async fn bytes_after_the_body_forbid_reuse() {
        // Bytes that arrive only after the body was read are the idle pool's to catch (its
        // reuse check reads from the connection); bytes read with the body are caught here.
        for wire in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}GARBAGE"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\nX",
        ] {
            let mut r = reader(wire, wire.len());
            let (_, body) = read_all(&mut r).await.unwrap();
            assert_eq!(body, b"{}");
            assert!(!r.reusable());
        }
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        check(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}",
            201,
            b"{}",
            true,
        )
        .await;
    }

    #[tokio::test]
    async fn header_fields_are_kept_in_order_with_repeats() {
        let wire = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nSet-Cookie: a=1\r\nX-Odd : v\r\nSet-Cookie: b=2\r\ncontent-length: 0\r\n\r\n";
        let mut r = reader(wire, wire.len());
        r.read_header().await.unwrap();
        let h = r.header().unwrap();
        assert_eq!(h.status, 429);
        assert_eq!(h.headers.get("retry-after").unwrap(), "3");
        assert_eq!(h.headers.get("x-odd").unwrap(), "v");
        let cookies: Vec<_> = h.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
    }

    #[tokio::test]
    async fn malformed_responses_are_errors() {
        check_err(b"HTTQ/1.1 200 OK\r\n\r\n", "malformed header").await;
        check_err(
            b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n",
            "invalid content-length",
        )
        .await;
        check_err(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\n{}",
            "invalid content-length",
        )
        .await;
        check_err(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
            "conflicting content-length",
        )
        .await;
        check_err(
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "unexpected status",
        )
        .await;
        check_err(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\nzz\r\n",
            "invalid chunk size",
        )
        .await;
        check_err(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",
            "not followed by CRLF",
        )
        .await;
    }

    #[tokio::test]
    async fn cut_responses_are_errors() {
        check_err(b"", "before sending a response").await;
        check_err(
            b"HTTP/1.1 200 OK\r\ncontent-le",
            "middle of the response header",
        )
        .await;
        check_err(
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}",
            "before the end of the response body",
        )
        .await;
        check_err(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n",
            "before the end of the response body",
        )
        .await;
        check_err(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n",
            "before the end of the response body",
        )
        .await;
    }

    #[tokio::test]
    async fn oversized_heads_are_refused() {
        let mut wire = b"HTTP/1.1 200 OK\r\n".to_vec();
        while wire.len() <= MAX_HEAD + 100 {
            wire.extend_from_slice(b"x-filler: 0123456789012345678901234567890123456789\r\n");
        }
        let mut r = reader(&wire, 4096);
        let e = read_all(&mut r).await.expect_err("should fail");
        assert!(
            e.to_string().contains("too large") || e.to_string().contains("malformed"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn large_bodies_come_in_slices_of_the_read_buffer() {
        let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        wire.extend_from_slice(&body);
        let mut r = reader(&wire, 100_000);
        let (_, got) = read_all(&mut r).await.unwrap();
        assert!(got == body);
        assert!(r.reusable());
        let mut chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for piece in body.chunks(65_536) {
            chunked.extend_from_slice(format!("{:X}\r\n", piece.len()).as_bytes());
            chunked.extend_from_slice(piece);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let mut r = reader(&chunked, 70_000);
        let (_, got) = read_all(&mut r).await.unwrap();
        assert!(got == body);
        assert!(r.reusable());
    }

    #[test]
    fn chunk_size_lines() {
        use httparse::Status::{Complete, Partial};
        let ok = |line: &[u8], used: usize, size: u64| {
            assert_eq!(chunk_size(line), Ok(Complete((used, size))), "{line:?}");
            for cut in 0..used {
                let got = chunk_size(&line[..cut]);
                assert!(got == Ok(Partial), "{:?}: {got:?}", &line[..cut]);
            }
        };
        ok(b"0\r\n", 3, 0);
        ok(b"1a\r\nxx", 4, 26);
        ok(b"FFff\r\n", 6, 0xffff);
        ok(b"ffffffffffffffff\r\n", 18, u64::MAX);
        ok(b"5;ext=1\r\n", 9, 5);
        ok(b"5 ;a\r\n", 6, 5);
        for bad in [
            &b"\r\n"[..],
            b"zz\r\n",
            b";x\r\n",
            b"5\n",
            b"5x\r\n",
            b"11111111111111111\r\n",
        ] {
            assert!(chunk_size(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn ready_reads_stop_at_a_drained_socket_and_miss_nothing() {
        let first =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n";
        let mut wire = first.to_vec();
        wire.extend_from_slice(b"2\r\ngh\r\n0\r\n\r\n");
        let mut r = reader(&wire, first.len());
        r.read_header().await.unwrap();
        // Both chunks of the first read come from the buffer; then the short read means the
        // socket is not read again.
        assert_eq!(r.read_ready().unwrap().unwrap().unwrap(), "abc");
        assert_eq!(r.read_ready().unwrap().unwrap().unwrap(), "def");
        let polls = r.io.polls;
        assert!(r.read_ready().is_none());
        assert_eq!(
            r.io.polls, polls,
            "the socket was polled after a short read"
        );
        assert_eq!(r.read_body().await.unwrap().unwrap(), "gh");
        assert_eq!(r.read_ready().unwrap().unwrap(), None);
        assert!(r.reusable());
        // A read that filled the buffer may have left more behind: the socket is tried.
        let big = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: 20000\r\n\r\n{}",
            "x".repeat(20000)
        );
        let mut r = reader(big.as_bytes(), big.len());
        r.read_header().await.unwrap();
        let mut got = 0;
        while let Some(Ok(Some(d))) = r.read_ready() {
            got += d.len();
        }
        assert_eq!(got, 20000);
    }

    #[tokio::test]
    async fn a_cancelled_read_loses_nothing() {
        use futures::FutureExt;
        let wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n";
        let mut r = H1Response::new(tokio_test_io::Pieces::new(wire, 5).pending_every(2), false);
        r.read_header().await.unwrap();
        let mut body = Vec::new();
        loop {
            // Poll once and drop the future when it is not ready, as `select!` does.
            match r.read_body().now_or_never() {
                Some(Ok(Some(d))) => body.extend_from_slice(&d),
                Some(Ok(None)) => break,
                Some(Err(e)) => panic!("{e}"),
                None => {}
            }
        }
        assert_eq!(body, b"abcdef");
        assert!(r.reusable());
    }

    /// In-memory connections for the reader's tests.
    mod tokio_test_io {
        use std::pin::Pin;
        use std::task::{Context, Poll};

        /// Yields `wire` at most `step` bytes per read, then end of stream; with
        /// `pending_every`, every n-th poll is not ready (and wakes itself).
        pub struct Pieces {
            wire: Vec<u8>,
            at: usize,
            step: usize,
            pending_every: usize,
            pub polls: usize,
        }

        impl Pieces {
            pub fn new(wire: &[u8], step: usize) -> Self {
                Self {
                    wire: wire.to_vec(),
                    at: 0,
                    step: step.max(1),
                    pending_every: 0,
                    polls: 0,
                }
            }

            pub fn pending_every(mut self, n: usize) -> Self {
                self.pending_every = n;
                self
            }
        }

        impl tokio::io::AsyncRead for Pieces {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                self.polls += 1;
                if self.pending_every > 0 && self.polls.is_multiple_of(self.pending_every) {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                let n = self
                    .step
                    .min(self.wire.len() - self.at)
                    .min(buf.remaining());
                let at = self.at;
                buf.put_slice(&self.wire[at..at + n]);
                self.at += n;
                Poll::Ready(Ok(()))
            }
        }
    }
}
