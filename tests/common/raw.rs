//! Reading HTTP/1.1 responses off a raw client connection, for tests that need to see the
//! exact framing (keep-alive, chunked encoding, bodiless answers).

use super::within;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// How long one read may wait before the test fails.
const EXCHANGE: Duration = Duration::from_secs(5);

/// A response read off a raw client connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("utf-8 body")
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {self:?}"))
    }
}

/// Reads more bytes from `conn` into `buf`; panics if the proxy closed the connection.
pub async fn fill(conn: &mut TcpStream, buf: &mut Vec<u8>, what: &str) {
    let mut chunk = [0u8; 16384];
    let n = within(EXCHANGE, what, conn.read(&mut chunk))
        .await
        .expect("reading from the proxy");
    assert!(
        n > 0,
        "the proxy closed the connection while {what}: {buf:?}"
    );
    buf.extend_from_slice(&chunk[..n]);
}

/// Takes the next CRLF-terminated line out of `buf`, reading more as needed.
pub async fn take_line(conn: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    loop {
        if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8(buf[..at].to_vec()).expect("ascii line");
            buf.drain(..at + 2);
            return line;
        }
        fill(conn, buf, "reading a chunk line").await;
    }
}

/// Reads one response: the head, then the body framed by `Content-Length` or chunked
/// encoding. `bodiless` for the answer to a HEAD request; 1xx, 204 and 304 never have one.
/// Bytes beyond the response stay in `buf`.
pub async fn read_response(conn: &mut TcpStream, buf: &mut Vec<u8>, bodiless: bool) -> RawResponse {
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        fill(conn, buf, "reading a response head").await;
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("ascii head");
    buf.drain(..head_end);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header line");
            (n.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let mut resp = RawResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if bodiless || status < 200 || status == 204 || status == 304 {
        return resp;
    }
    if resp.header("transfer-encoding") == Some("chunked") {
        loop {
            let size_line = take_line(conn, buf).await;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {size_line:?}"));
            if size == 0 {
                // Trailers, up to the empty line.
                while !take_line(conn, buf).await.is_empty() {}
                return resp;
            }
            while buf.len() < size + 2 {
                fill(conn, buf, "reading a chunk").await;
            }
            resp.body.extend_from_slice(&buf[..size]);
            assert_eq!(&buf[size..size + 2], b"\r\n", "chunk data ends with CRLF");
            buf.drain(..size + 2);
        }
    }
    let len: usize = resp
        .header("content-length")
        .unwrap_or_else(|| panic!("a keep-alive response needs a framing: {resp:?}"))
        .parse()
        .expect("numeric content-length");
    while buf.len() < len {
        fill(conn, buf, "reading a body").await;
    }
    resp.body = buf.drain(..len).collect();
    resp
}
