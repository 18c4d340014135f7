//! `bench-sse`: an SSE load client for the end-to-end benchmark.
//!
//! Runs `--concurrency` workers, each over its own HTTP/1.1 keep-alive connection, posting
//! `--body-file` to `--url` and reading the SSE reply, until `--streams` streams were started
//! (in all) or `--duration` seconds passed. Prints one JSON object on stdout:
//!
//! - `ttfb_ms`: request sent → first complete SSE event received;
//! - `total_ms`: request sent → end of the response body;
//! - `gap_ms`: time between consecutive reads that completed at least one event (events that
//!   arrive in the same read count once);
//! - `done`: streams whose last event was `data: [DONE]` and whose body ended cleanly;
//! - `connections`: TCP connections opened (equal to `--concurrency` when every connection is
//!   kept alive between streams);
//! - `close_delimited`: responses framed by connection close (neither `Content-Length` nor
//!   `Transfer-Encoding`);
//! - `failures` with a count per kind (`connect`, `send`, `status_NNN`, `body`, `timeout`,
//!   `no_done`, `error_event`, `model_mismatch`).
//!
//! With `--expect-model M`, a stream whose first event does not contain `"model":"M"` counts as
//! a `model_mismatch` failure (checks that a proxy did, or did not, rename the model).
//!
//! Usage: `bench-sse --url http://127.0.0.1:PORT/v1/chat/completions?chunks=20 --body-file F
//!   --concurrency 16 (--streams 2000 | --duration 10) [--header 'k: v']... [--timeout 60]
//!   [--expect-model M]`

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{
    HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST, TRANSFER_ENCODING,
};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use llm_edge_e2e_tools::{summary_ms, Flags, HttpUrl};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

struct Settings {
    url: HttpUrl,
    body: Bytes,
    headers: Vec<(HeaderName, HeaderValue)>,
    concurrency: usize,
    streams: Option<u64>,
    duration: Option<Duration>,
    timeout: Duration,
    expect_model: Option<Vec<u8>>,
}

fn settings() -> Result<Settings, String> {
    let f = Flags::from_env(&[])?;
    let url: HttpUrl = f.required("url")?.parse()?;
    let body_file = f.required("body-file")?;
    let body = std::fs::read(body_file).map_err(|e| format!("reading {body_file}: {e}"))?;
    let mut headers = Vec::new();
    for h in f.all("header") {
        let (n, v) = h
            .split_once(':')
            .ok_or_else(|| format!("--header {h:?}: expected 'name: value'"))?;
        let n = HeaderName::from_bytes(n.trim().as_bytes()).map_err(|e| format!("{h:?}: {e}"))?;
        let v = HeaderValue::from_str(v.trim()).map_err(|e| format!("{h:?}: {e}"))?;
        headers.push((n, v));
    }
    let streams = f
        .get("streams")
        .map(|_| f.parsed("streams", 0u64))
        .transpose()?;
    let duration = f
        .get("duration")
        .map(|_| f.parsed("duration", 0f64))
        .transpose()?
        .map(Duration::from_secs_f64);
    if streams.is_none() && duration.is_none() {
        return Err("give --streams N or --duration SECS".into());
    }
    Ok(Settings {
        url,
        body: Bytes::from(body),
        headers,
        concurrency: f.parsed("concurrency", 1usize)?.max(1),
        streams,
        duration,
        timeout: Duration::from_secs_f64(f.parsed("timeout", 60f64)?),
        expect_model: f
            .get("expect-model")
            .map(|m| format!("\"model\":\"{m}\"").into_bytes()),
    })
}

fn main() {
    let s = match settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench-sse: {e}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-sse: building the runtime: {e}");
            std::process::exit(2);
        }
    };
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(&rt, run(Rc::new(s)));
    println!("{report}");
}

/// What one worker measured.
#[derive(Default)]
struct Stats {
    started: u64,
    done: u64,
    events: u64,
    bytes: u64,
    connections: u64,
    close_delimited: u64,
    ttfb_us: Vec<u64>,
    total_us: Vec<u64>,
    gap_us: Vec<u64>,
    failures: BTreeMap<String, u64>,
}

impl Stats {
    fn fail(&mut self, kind: impl Into<String>) {
        *self.failures.entry(kind.into()).or_default() += 1;
    }

    fn merge(&mut self, o: Stats) {
        self.started += o.started;
        self.done += o.done;
        self.events += o.events;
        self.bytes += o.bytes;
        self.connections += o.connections;
        self.close_delimited += o.close_delimited;
        self.ttfb_us.extend(o.ttfb_us);
        self.total_us.extend(o.total_us);
        self.gap_us.extend(o.gap_us);
        for (k, v) in o.failures {
            *self.failures.entry(k).or_default() += v;
        }
    }
}

async fn run(s: Rc<Settings>) -> serde_json::Value {
    let issued = Rc::new(Cell::new(0u64));
    let t0 = Instant::now();
    let deadline = s.duration.map(|d| t0 + d);
    let workers: Vec<_> = (0..s.concurrency)
        .map(|_| tokio::task::spawn_local(worker(s.clone(), issued.clone(), deadline)))
        .collect();
    let mut all = Stats::default();
    for w in workers {
        match w.await {
            Ok(st) => all.merge(st),
            Err(_) => all.fail("worker_panic"),
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let failures: u64 = all.failures.values().sum();
    serde_json::json!({
        "streams": all.started,
        "done": all.done,
        "failures": failures,
        "failure_kinds": all.failures,
        "events": all.events,
        "bytes": all.bytes,
        "connections": all.connections,
        "close_delimited": all.close_delimited,
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "streams_per_s": if elapsed > 0.0 { (all.started as f64 / elapsed * 10.0).round() / 10.0 } else { 0.0 },
        "ttfb_ms": summary_ms(&mut all.ttfb_us),
        "total_ms": summary_ms(&mut all.total_us),
        "gap_ms": summary_ms(&mut all.gap_us),
    })
}

fn take_ticket(s: &Settings, issued: &Cell<u64>, deadline: Option<Instant>) -> bool {
    if s.streams.is_some_and(|n| issued.get() >= n) {
        return false;
    }
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return false;
    }
    issued.set(issued.get() + 1);
    true
}

async fn connect(s: &Settings, st: &mut Stats) -> Option<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(s.url.authority.as_str()).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    st.connections += 1;
    Some(sender)
}

/// How one stream ended.
enum Outcome {
    /// Completed; the connection may be reused.
    Ok,
    /// Failed with this kind; `reuse` says whether the connection is still usable.
    Failed { kind: String, reuse: bool },
}

async fn worker(s: Rc<Settings>, issued: Rc<Cell<u64>>, deadline: Option<Instant>) -> Stats {
    let mut st = Stats::default();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    while take_ticket(&s, &issued, deadline) {
        st.started += 1;
        if sender.as_ref().is_none_or(|c| c.is_closed()) {
            sender = connect(&s, &mut st).await;
        }
        let Some(conn) = sender.as_mut() else {
            st.fail("connect");
            // Do not spin on a refused port.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let outcome = match tokio::time::timeout(s.timeout, one_stream(&s, conn, &mut st)).await {
            Ok(o) => o,
            Err(_) => Outcome::Failed {
                kind: "timeout".into(),
                reuse: false,
            },
        };
        if let Outcome::Failed { kind, reuse } = outcome {
            st.fail(kind);
            if !reuse {
                sender = None;
            }
        }
    }
    st
}

fn request(s: &Settings) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(s.body.clone()));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = s
        .url
        .path_and_query
        .parse()
        .unwrap_or_else(|_| hyper::Uri::from_static("/"));
    let h = req.headers_mut();
    if let Ok(host) = HeaderValue::from_str(&s.url.authority) {
        h.insert(HOST, host);
    }
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (n, v) in &s.headers {
        h.insert(n.clone(), v.clone());
    }
    req
}

/// Finds the end (exclusive) of the first `\n\n` event terminator in `buf[from..]`.
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    buf[from..]
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| from + p + 2)
}

async fn one_stream(s: &Settings, conn: &mut SendRequest<Full<Bytes>>, st: &mut Stats) -> Outcome {
    if conn.ready().await.is_err() {
        return Outcome::Failed {
            kind: "send".into(),
            reuse: false,
        };
    }
    let t0 = Instant::now();
    let resp = match conn.send_request(request(s)).await {
        Ok(r) => r,
        Err(_) => {
            return Outcome::Failed {
                kind: "send".into(),
                reuse: false,
            }
        }
    };
    let status = resp.status();
    // HTTP/1.1 without Content-Length or chunked framing: the body ends when the server closes
    // the connection, so a truncated stream cannot be told from a complete one by framing.
    if !resp.headers().contains_key(CONTENT_LENGTH)
        && !resp.headers().contains_key(TRANSFER_ENCODING)
    {
        st.close_delimited += 1;
    }
    let mut body = resp.into_body();
    if status != hyper::StatusCode::OK {
        // Drain so the connection stays usable.
        let reuse = body.collect().await.is_ok();
        return Outcome::Failed {
            kind: format!("status_{}", status.as_u16()),
            reuse,
        };
    }
    let mut pending: Vec<u8> = Vec::with_capacity(1024);
    let mut scanned = 0;
    let mut first_event: Option<Instant> = None;
    let mut last_read_with_event: Option<Instant> = None;
    let mut last_was_done = false;
    let mut error_event = false;
    let mut model_ok = s.expect_model.is_none();
    let mut gaps: Vec<u64> = Vec::with_capacity(32);
    loop {
        let frame = match body.frame().await {
            None => break,
            Some(Ok(f)) => f,
            Some(Err(_)) => {
                return Outcome::Failed {
                    kind: if error_event { "error_event" } else { "body" }.into(),
                    reuse: false,
                }
            }
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        st.bytes += data.len() as u64;
        pending.extend_from_slice(data);
        let mut events_here = 0;
        let mut start = 0;
        while let Some(end) = event_end(&pending, scanned.max(start)) {
            let ev = &pending[start..end];
            if first_event.is_none() && events_here == 0 {
                if let Some(m) = &s.expect_model {
                    model_ok = ev.windows(m.len()).any(|w| w == m.as_slice());
                }
            }
            last_was_done = ev.starts_with(b"data: [DONE]");
            error_event |= ev.starts_with(b"data: {\"error\"");
            events_here += 1;
            start = end;
            scanned = end;
        }
        pending.drain(..start);
        scanned = pending.len().saturating_sub(1);
        if events_here > 0 {
            st.events += events_here;
            if first_event.is_none() {
                first_event = Some(now);
            }
            if let Some(prev) = last_read_with_event {
                gaps.push((now - prev).as_micros() as u64);
            }
            last_read_with_event = Some(now);
        }
    }
    let end = Instant::now();
    if error_event {
        return Outcome::Failed {
            kind: "error_event".into(),
            reuse: true,
        };
    }
    if !last_was_done || !pending.iter().all(u8::is_ascii_whitespace) {
        return Outcome::Failed {
            kind: "no_done".into(),
            reuse: true,
        };
    }
    if !model_ok {
        return Outcome::Failed {
            kind: "model_mismatch".into(),
            reuse: true,
        };
    }
    st.done += 1;
    if let Some(f) = first_event {
        st.ttfb_us.push((f - t0).as_micros() as u64);
    }
    st.total_us.push((end - t0).as_micros() as u64);
    st.gap_us.extend_from_slice(&gaps);
    Outcome::Ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ends_are_found_across_offsets() {
        let b = b"data: a\n\ndata: b\n\n";
        assert_eq!(event_end(b, 0), Some(9));
        assert_eq!(event_end(b, 9), Some(18));
        assert_eq!(event_end(b"data: a\n", 0), None);
    }
}
