//! HTTP collector sink: POSTs each batch as a JSON array to a collector URL, with retries and
//! exponential backoff. Runs on the trace writer thread with its own small runtime, so the
//! blocking address lookup and the waits never touch the proxy's workers.

use super::record::TraceRecord;
use super::sink::Sink;
use crate::config::{parse_endpoint, Endpoint};
use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use std::net::ToSocketAddrs;
use std::time::Duration;

/// Attempts per batch.
const ATTEMPTS: u32 = 4;

/// POSTs batches to a collector.
pub struct CollectorSink {
    endpoint: Endpoint,
    path: String,
    rt: tokio::runtime::Runtime,
    connector: Connector,
    timeout: Duration,
}

impl CollectorSink {
    /// A sink posting to `url` (http or https; the path is kept).
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        let endpoint = parse_endpoint(url).map_err(|e| format!("collector url: {e}"))?;
        let path = if endpoint.base_path.is_empty() {
            "/".to_string()
        } else {
            endpoint.base_path.clone()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("collector runtime: {e}"))?;
        Ok(Self {
            endpoint,
            path,
            rt,
            connector: Connector::new(None),
            timeout,
        })
    }

    fn peer(&self) -> Result<HttpPeer, String> {
        let addr = match self.endpoint.literal_ip {
            Some(ip) => std::net::SocketAddr::new(ip, self.endpoint.port),
            None => (self.endpoint.host.as_str(), self.endpoint.port)
                .to_socket_addrs()
                .map_err(|e| format!("resolving {}: {e}", self.endpoint.host))?
                .next()
                .ok_or_else(|| format!("resolving {}: no address", self.endpoint.host))?,
        };
        let mut peer = HttpPeer::new(addr, self.endpoint.tls, self.endpoint.host.clone());
        peer.options.connection_timeout = Some(self.timeout);
        peer.options.read_timeout = Some(self.timeout);
        peer.options.write_timeout = Some(self.timeout);
        Ok(peer)
    }

    async fn post(&self, body: Bytes) -> Result<(), String> {
        let peer = self.peer()?;
        let (mut s, _) = self
            .connector
            .get_http_session(&peer)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let mut req = RequestHeader::build("POST", self.path.as_bytes(), Some(3))
            .map_err(|e| e.to_string())?;
        let headers = [
            ("host", self.endpoint.authority.clone()),
            ("content-type", "application/json".to_string()),
            ("content-length", body.len().to_string()),
        ];
        for (k, v) in headers {
            req.insert_header(k, v).map_err(|e| e.to_string())?;
        }
        s.write_request_header(Box::new(req))
            .await
            .map_err(|e| format!("sending: {e}"))?;
        s.write_request_body(body, true)
            .await
            .map_err(|e| format!("sending: {e}"))?;
        s.finish_request_body()
            .await
            .map_err(|e| format!("sending: {e}"))?;
        s.read_response_header()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        let status = s.response_header().map(|h| h.status.as_u16()).unwrap_or(0);
        while let Ok(Some(_)) = s.read_response_body().await {}
        self.connector.release_http_session(s, &peer, None).await;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("collector answered {status}"))
        }
    }
}

impl Sink for CollectorSink {
    fn write(&mut self, batch: &[TraceRecord]) -> Result<(), String> {
        let mut json = Vec::with_capacity(batch.len() * 1024 + 2);
        json.push(b'[');
        for (i, rec) in batch.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            super::json::write_record(&mut json, rec);
        }
        json.push(b']');
        let body = Bytes::from(json);
        let mut delay = Duration::from_millis(250);
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            match self.rt.block_on(self.post(body.clone())) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            if attempt + 1 < ATTEMPTS {
                std::thread::sleep(delay);
                delay *= 2;
            }
        }
        Err(format!(
            "posting {} traces to {} failed after {ATTEMPTS} attempts: {last}",
            batch.len(),
            self.endpoint.url
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A one-shot HTTP server answering `status`, returning what it received.
    fn serve_once(status: u16) -> (String, std::thread::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/ingest", l.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = s.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got);
                if let Some(i) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if got.len() >= i + 4 + len {
                        break;
                    }
                }
            }
            let resp =
                format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            s.write_all(resp.as_bytes()).unwrap();
            got
        });
        (url, h)
    }

    #[test]
    fn posts_batches_as_a_json_array() {
        let (url, h) = serve_once(200);
        let mut sink = CollectorSink::new(&url, Duration::from_secs(2)).unwrap();
        let rec = TraceRecord {
            trace_id: "t1".into(),
            ..Default::default()
        };
        sink.write(&[rec]).unwrap();
        let got = String::from_utf8(h.join().unwrap()).unwrap();
        assert!(got.starts_with("POST /ingest HTTP/1.1\r\n"), "{got}");
        let body = &got[got.find("\r\n\r\n").unwrap() + 4..];
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v[0]["trace_id"], "t1");
    }

    #[test]
    fn unreachable_collector_fails_after_retries() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut sink = CollectorSink::new(
            &format!("http://127.0.0.1:{port}/"),
            Duration::from_millis(200),
        )
        .unwrap();
        let e = sink.write(&[TraceRecord::default()]).unwrap_err();
        assert!(e.contains("after 4 attempts"), "{e}");
    }
}
