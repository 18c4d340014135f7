//! One API call's upstream connection, before and after its request is sent. HTTP/1 is ours
//! end to end (the forwarder writes the request head and body, `H1Response` reads the answer);
//! HTTP/2 goes through Pingora's client session.

use super::h1_response::H1Response;
use bytes::Bytes;
use futures::FutureExt;
use pingora::http::ResponseHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::Stream;
use std::time::Duration;

/// A connection ready to carry a request.
pub enum Conn {
    /// An HTTP/1 connection (TCP or TLS).
    H1(Stream),
    /// A Pingora client session (HTTP/2); boxed, as it is many times a stream's size.
    Session(Box<HttpSession>),
}

/// A connection whose request was sent, carrying the response.
pub enum Exchange {
    /// HTTP/1, read by our own reader.
    H1(H1Response<Stream>),
    /// A Pingora client session (HTTP/2).
    Session(HttpSession),
}

impl Exchange {
    /// Each read from here on waits at most this long (`None`: no limit).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        match self {
            Exchange::H1(r) => r.set_read_timeout(timeout),
            Exchange::Session(s) => s.set_read_timeout(timeout),
        }
    }

    /// Reads the (final) response header.
    pub async fn read_header(&mut self) -> pingora::Result<()> {
        match self {
            Exchange::H1(r) => r.read_header().await,
            Exchange::Session(s) => s.read_response_header().await,
        }
    }

    /// The response header, once read.
    pub fn header(&self) -> Option<&ResponseHeader> {
        match self {
            Exchange::H1(r) => r.header(),
            Exchange::Session(s) => s.response_header(),
        }
    }

    /// The response header, taken (HTTP/1) or copied (HTTP/2) for the downstream response.
    pub fn take_header(&mut self) -> Option<ResponseHeader> {
        match self {
            Exchange::H1(r) => r.take_header(),
            Exchange::Session(s) => s.response_header().cloned(),
        }
    }

    /// Hot path: the next piece of the response body if it is there without waiting.
    pub fn read_ready(&mut self) -> Option<pingora::Result<Option<Bytes>>> {
        match self {
            Exchange::H1(r) => r.read_ready(),
            Exchange::Session(s) => s.read_response_body().now_or_never(),
        }
    }

    /// Hot path: the next piece of the response body (`None` at its end).
    pub async fn read_body(&mut self) -> pingora::Result<Option<Bytes>> {
        match self {
            Exchange::H1(r) => r.read_body().await,
            Exchange::Session(s) => s.read_response_body().await,
        }
    }
}
