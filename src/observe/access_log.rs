//! Access log: one line per request, nginx `combined` or JSON, to stderr or a file.
//!
//! Request hooks hand an [`AccessRecord`] to [`AccessLog::log`], which only tries to put it
//! on a bounded queue (full → the line is dropped and counted, never waited for). A
//! background thread formats the lines, batches whatever is queued into one write, and writes
//! as soon as the queue is momentarily empty, so a line reaches the file promptly without a
//! syscall per line under load. [`AccessLog::reopen`] serves logrotate (SIGUSR1, as nginx).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bytes of formatted lines gathered before a write even while the queue still has more.
const WRITE_AT: usize = 64 << 10;
/// Longest [`AccessLog::flush`] waits for the writer.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// One finished request, as the access log sees it. Built by the caller at the end of the
/// request; formatting happens on the writer thread.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    /// When the request finished (nginx's `$time_local` is the time the line is logged).
    pub time: SystemTime,
    /// llm-edge's request id.
    pub request_id: String,
    /// Client address (the peer, or the one a trusted proxy header gave).
    pub client_addr: Option<IpAddr>,
    /// Client key id (never the secret); the `$remote_user` of the combined format.
    pub client_key: Option<String>,
    /// Request method.
    pub method: String,
    /// Request path without the rLLM slug or session prefix; may include the query.
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub protocol: &'static str,
    /// Status sent to the client.
    pub status: u16,
    /// Request body bytes received from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client (nginx's `$body_bytes_sent`).
    pub bytes_out: u64,
    /// `Referer` header.
    pub referer: Option<String>,
    /// `User-Agent` header.
    pub user_agent: Option<String>,
    /// Route kind: `api`, `passthrough`, `models` or `local`.
    pub route: &'static str,
    /// Configured model the request was routed by.
    pub model: Option<String>,
    /// Upstream name.
    pub upstream: Option<String>,
    /// Replica that answered (address or name).
    pub replica: Option<String>,
    /// Upstream key id (never the secret).
    pub key_id: Option<String>,
    /// `session_name` from the rLLM slug or the `/sessions/<id>` prefix.
    pub session_name: Option<String>,
    /// Whole request time, milliseconds.
    pub total_ms: f64,
    /// Upstream exchange time (request sent → last byte), milliseconds.
    pub upstream_ms: Option<f64>,
    /// Upstream time to first byte (request sent → response header), milliseconds.
    pub ttfb_ms: Option<f64>,
    /// Prompt tokens reported by the upstream.
    pub tokens_in: Option<u64>,
    /// Completion tokens reported by the upstream.
    pub tokens_out: Option<u64>,
    /// Attempts beyond the first (retries and failovers).
    pub retries: u32,
    /// Error class code when the request failed on llm-edge's side.
    pub error: Option<&'static str>,
}

impl Default for AccessRecord {
    /// An empty record stamped now: `GET`, `HTTP/1.1`, route `local`, status 200.
    fn default() -> Self {
        Self {
            time: SystemTime::now(),
            request_id: String::new(),
            client_addr: None,
            client_key: None,
            method: "GET".into(),
            path: String::new(),
            protocol: "HTTP/1.1",
            status: 200,
            bytes_in: 0,
            bytes_out: 0,
            referer: None,
            user_agent: None,
            route: "local",
            model: None,
            upstream: None,
            replica: None,
            key_id: None,
            session_name: None,
            total_ms: 0.0,
            upstream_ms: None,
            ttfb_ms: None,
            tokens_in: None,
            tokens_out: None,
            retries: 0,
            error: None,
        }
    }
}

/// Line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// nginx's `combined` format, for tools that already parse nginx logs.
    #[default]
    Combined,
    /// One JSON object per line, with the LLM fields.
    Json,
}

/// Where lines go.
pub enum Target {
    /// Nowhere: no thread, [`AccessLog::log`] does nothing.
    Off,
    /// Standard error.
    Stderr,
    /// A file, opened in append mode and created if missing.
    File(PathBuf),
    /// Any writer (tests, embedding). Written from the writer thread, flushed after each batch.
    Writer(Box<dyn Write + Send>),
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("Off"),
            Self::Stderr => f.write_str("Stderr"),
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
            Self::Writer(_) => f.write_str("Writer(..)"),
        }
    }
}

enum Msg {
    /// Boxed: queue slots are allocated up front for the whole capacity, and a pointer per
    /// slot costs far less idle memory than a 440-byte record per slot.
    Record(Box<AccessRecord>),
    /// Lets an idle writer act on a reopen request now rather than at the next line.
    Wake,
}

/// State shared by the handles and the writer thread.
struct Shared {
    /// Lines lost: queue full, writer gone, or a failed write.
    dropped: AtomicU64,
    /// Records accepted onto the queue.
    queued: AtomicU64,
    /// Records the writer has finished with (written or lost); guarded for `flush` to wait on.
    done: Mutex<u64>,
    done_changed: Condvar,
    reopen: AtomicBool,
}

impl Shared {
    fn mark_done(&self, n: u64) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        *done += n;
        self.done_changed.notify_all();
    }
}

/// Handle to the access log. Cheap to clone; every clone feeds the same writer thread, which
/// writes what is left and exits once the last clone is dropped.
#[derive(Clone)]
pub struct AccessLog {
    /// `None` for [`Target::Off`].
    tx: Option<SyncSender<Msg>>,
    shared: Arc<Shared>,
}

impl fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLog")
            .field("enabled", &self.tx.is_some())
            .field("dropped", &self.dropped())
            .finish()
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl AccessLog {
    /// Opens the target (a file in append mode, created if missing) and starts the writer
    /// thread behind a queue of `capacity` records (at least 1). Errors: the file cannot be
    /// opened, or the thread cannot be started.
    pub fn start(target: Target, format: Format, capacity: usize) -> io::Result<AccessLog> {
        let shared = Arc::new(Shared {
            dropped: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            done: Mutex::new(0),
            done_changed: Condvar::new(),
            reopen: AtomicBool::new(false),
        });
        let sink = match target {
            Target::Off => return Ok(AccessLog { tx: None, shared }),
            Target::Stderr => Sink::Stderr,
            Target::File(path) => {
                let file = open_append(&path).map_err(|e| {
                    io::Error::new(e.kind(), format!("opening {}: {e}", path.display()))
                })?;
                Sink::File { path, file }
            }
            Target::Writer(w) => Sink::Writer(w),
        };
        let (tx, rx) = sync_channel(capacity.max(1));
        let writer = Writer {
            sink,
            format,
            shared: shared.clone(),
            buf: Vec::with_capacity(WRITE_AT + 4096),
            in_buf: 0,
            failing: false,
        };
        std::thread::Builder::new()
            .name("llm-edge-access-log".into())
            .spawn(move || writer.run(rx))?;
        Ok(AccessLog {
            tx: Some(tx),
            shared,
        })
    }

    /// False for [`Target::Off`]: callers can skip building records.
    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a line. Hot path: never blocks; when the queue is full the line is dropped and
    /// counted in [`AccessLog::dropped`].
    pub fn log(&self, record: AccessRecord) {
        let Some(tx) = &self.tx else {
            return;
        };
        match tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {
                self.shared.queued.fetch_add(1, Ordering::AcqRel);
            }
            Err(_) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Asks the writer to reopen the file before its next write (logrotate: rename, then
    /// signal). A failed reopen is logged and the old file kept. No-op for other targets.
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
        if let Some(tx) = &self.tx {
            // A full queue means the writer is busy and will see the flag anyway.
            let _ = tx.try_send(Msg::Wake);
        }
    }

    /// Lines lost so far (queue full, or a write that failed). A running total for
    /// [`crate::observe::metrics::Metrics::sync_access_log_dropped`].
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Blocks until every line queued before the call is written (shutdown, tests), at most
    /// 5 s. True when everything was written in time. Not for request hooks.
    pub fn flush(&self) -> bool {
        if self.tx.is_none() {
            return true;
        }
        let target = self.shared.queued.load(Ordering::Acquire);
        let deadline = Instant::now() + FLUSH_WAIT;
        let mut done = self.shared.done.lock().unwrap_or_else(|e| e.into_inner());
        while *done < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    "access log: {} lines still unwritten after {FLUSH_WAIT:?}",
                    target - *done
                );
                return false;
            }
            done = self
                .shared
                .done_changed
                .wait_timeout(done, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

enum Sink {
    Stderr,
    File { path: PathBuf, file: File },
    Writer(Box<dyn Write + Send>),
}

impl Sink {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            // Holding the lock for the whole batch keeps our lines whole between other
            // stderr writers in the process (tracing).
            Sink::Stderr => {
                let mut e = io::stderr().lock();
                e.write_all(bytes)?;
                e.flush()
            }
            // Unbuffered: the batch is the buffer.
            Sink::File { file, .. } => file.write_all(bytes),
            Sink::Writer(w) => {
                w.write_all(bytes)?;
                w.flush()
            }
        }
    }

    fn reopen(&mut self) {
        if let Sink::File { path, file } = self {
            match open_append(path) {
                Ok(f) => {
                    *file = f;
                    tracing::info!("access log: reopened {}", path.display());
                }
                Err(e) => tracing::error!(
                    "access log: reopening {} failed, still writing to the old file: {e}",
                    path.display()
                ),
            }
        }
    }
}

struct Writer {
    sink: Sink,
    format: Format,
    shared: Arc<Shared>,
    /// Formatted lines not yet written.
    buf: Vec<u8>,
    /// Records in `buf`.
    in_buf: u64,
    /// In a run of failed writes (logged once per run, not per batch).
    failing: bool,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        while let Ok(msg) = rx.recv() {
            self.take(msg);
            while let Ok(msg) = rx.try_recv() {
                self.take(msg);
                if self.buf.len() >= WRITE_AT {
                    self.write_out();
                }
            }
            self.write_out();
            // Let lines gather rather than waking this thread for every request.
            std::thread::sleep(super::WRITER_PAUSE);
        }
        // Every handle is gone: the queue is drained and written.
    }

    fn take(&mut self, msg: Msg) {
        if self.shared.reopen.swap(false, Ordering::AcqRel) {
            // Lines formatted before the request belong to the old file.
            self.write_out();
            self.sink.reopen();
        }
        if let Msg::Record(r) = msg {
            match self.format {
                Format::Combined => write_combined(&r, &mut self.buf),
                Format::Json => write_json(&r, &mut self.buf),
            }
            self.in_buf += 1;
        }
    }

    fn write_out(&mut self) {
        if !self.buf.is_empty() {
            match self.sink.write_all(&self.buf) {
                Ok(()) if self.failing => {
                    self.failing = false;
                    tracing::info!("access log: writing again");
                }
                Ok(()) => {}
                Err(e) => {
                    self.shared
                        .dropped
                        .fetch_add(self.in_buf, Ordering::Relaxed);
                    if !self.failing {
                        self.failing = true;
                        tracing::error!("access log: write failed, lines are being lost: {e}");
                    }
                }
            }
            self.buf.clear();
        }
        if self.in_buf > 0 {
            self.shared.mark_done(self.in_buf);
            self.in_buf = 0;
        }
    }
}

/// A UTC civil time, to the millisecond.
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    millis: u32,
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

impl Civil {
    /// Clocks before 1970 are shown as the epoch.
    fn from_system_time(t: SystemTime) -> Civil {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let days = (secs / 86_400) as i64;
        let rem = (secs % 86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        Civil {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
            millis: since.subsec_millis(),
        }
    }
}

/// Proleptic Gregorian (year, month 1..=12, day 1..=31) of a count of days since 1970-01-01.
/// Counts in 400-year eras starting on 1 March, so the leap day is the last day of a year
/// and the month lengths follow a fixed 153-day pattern.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days from 0000-03-01
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // 0 = March
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `10/Oct/2000:13:55:36 +0000`
fn write_time_local(t: SystemTime, out: &mut Vec<u8>) {
    let c = Civil::from_system_time(t);
    let month = MONTHS[(c.month as usize).saturating_sub(1).min(11)];
    let _ = write!(
        out,
        "{:02}/{month}/{:04}:{:02}:{:02}:{:02} +0000",
        c.day, c.year, c.hour, c.minute, c.second
    );
}

/// RFC 3339 UTC with milliseconds, for JSON lines: `2000-10-10T13:55:36.123Z`.
struct Rfc3339(SystemTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = Civil::from_system_time(self.0);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            c.year, c.month, c.day, c.hour, c.minute, c.second, c.millis
        )
    }
}

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// nginx's default log escaping: `"`, `\`, bytes below 0x20 and above 0x7e become `\xHH`.
/// `bare` also escapes the space, for the unquoted `$remote_user` field, so a line always
/// splits into the same fields (nginx itself would let a space through there).
fn push_escaped(out: &mut Vec<u8>, s: &str, bare: bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if b == b'"' || b == b'\\' || !(0x20..=0x7e).contains(&b) || (bare && b == b' ') {
            out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            out.push(b);
        }
    }
}

/// A quoted header field: `-` when absent, as nginx prints an unset variable.
fn push_quoted_field(out: &mut Vec<u8>, v: Option<&str>) {
    out.push(b'"');
    match v {
        Some(v) => push_escaped(out, v, false),
        None => out.push(b'-'),
    }
    out.push(b'"');
}

/// Appends the record as one nginx `combined` line:
/// `$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent
/// "$http_referer" "$http_user_agent"` and a newline. Time in UTC; IPv4-mapped IPv6
/// addresses are shown as IPv4.
pub fn write_combined(r: &AccessRecord, out: &mut Vec<u8>) {
    match r.client_addr {
        Some(ip) => {
            let _ = write!(out, "{}", ip.to_canonical());
        }
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" - ");
    match r.client_key.as_deref().filter(|k| !k.is_empty()) {
        Some(k) => push_escaped(out, k, true),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" [");
    write_time_local(r.time, out);
    out.extend_from_slice(b"] \"");
    push_escaped(out, &r.method, false);
    out.push(b' ');
    push_escaped(out, &r.path, false);
    out.push(b' ');
    push_escaped(out, r.protocol, false);
    let _ = write!(out, "\" {:03} {} ", r.status.min(999), r.bytes_out);
    push_quoted_field(out, r.referer.as_deref());
    out.push(b' ');
    push_quoted_field(out, r.user_agent.as_deref());
    out.push(b'\n');
}

/// Milliseconds rounded to the microsecond: the noise beyond only lengthens lines.
fn round_ms(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

/// The JSON line's shape; every key is always present, absent values are `null`.
#[derive(Serialize)]
struct JsonLine<'a> {
    time: Rfc3339,
    request_id: &'a str,
    client_addr: Option<IpAddr>,
    client_key: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    protocol: &'a str,
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    route: &'a str,
    model: Option<&'a str>,
    upstream: Option<&'a str>,
    replica: Option<&'a str>,
    key_id: Option<&'a str>,
    session_name: Option<&'a str>,
    total_ms: f64,
    upstream_ms: Option<f64>,
    ttfb_ms: Option<f64>,
    tokens_in: Option<u64>,
    tokens_out: Option<u64>,
    retries: u32,
    error: Option<&'a str>,
    user_agent: Option<&'a str>,
    referer: Option<&'a str>,
}

/// Appends the record as one JSON object and a newline. Every key is always present (absent
/// values are `null`); durations are flat `total_ms`, `upstream_ms`, `ttfb_ms`; `time` is
/// RFC 3339 UTC with milliseconds.
pub fn write_json(r: &AccessRecord, out: &mut Vec<u8>) {
    let line = JsonLine {
        time: Rfc3339(r.time),
        request_id: &r.request_id,
        client_addr: r.client_addr.map(|ip| ip.to_canonical()),
        client_key: r.client_key.as_deref(),
        method: &r.method,
        path: &r.path,
        protocol: r.protocol,
        status: r.status,
        bytes_in: r.bytes_in,
        bytes_out: r.bytes_out,
        route: r.route,
        model: r.model.as_deref(),
        upstream: r.upstream.as_deref(),
        replica: r.replica.as_deref(),
        key_id: r.key_id.as_deref(),
        session_name: r.session_name.as_deref(),
        total_ms: round_ms(r.total_ms),
        upstream_ms: r.upstream_ms.map(round_ms),
        ttfb_ms: r.ttfb_ms.map(round_ms),
        tokens_in: r.tokens_in,
        tokens_out: r.tokens_out,
        retries: r.retries,
        error: r.error,
        user_agent: r.user_agent.as_deref(),
        referer: r.referer.as_deref(),
    };
    let start = out.len();
    // Only a failing writer could make this fail, and a Vec does not; a half line is cut.
    if let Err(e) = serde_json::to_writer(&mut *out, &line) {
        out.truncate(start);
        tracing::warn!("access log: formatting a JSON line failed: {e}");
        return;
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;
    use std::net::Ipv4Addr;

    const NGINX_COMBINED: &str =
        r#"^(\S+) - (\S+) \[([^\]]+)\] "([^"]*)" (\d{3}) (\d+) "([^"]*)" "([^"]*)"$"#;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn sample() -> AccessRecord {
        AccessRecord {
            time: at(971_186_136) + Duration::from_millis(250),
            request_id: "req-1".into(),
            client_addr: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))),
            client_key: Some("team-a".into()),
            method: "POST".into(),
            path: "/v1/chat/completions?x=1".into(),
            protocol: "HTTP/1.1",
            status: 200,
            bytes_in: 512,
            bytes_out: 2048,
            referer: None,
            user_agent: Some(r#"curl/8.0 "quoted" \back"#.into()),
            route: "api",
            model: Some("gpt-4o".into()),
            upstream: Some("openai".into()),
            replica: Some("10.0.0.5:443".into()),
            key_id: Some("key-a".into()),
            session_name: Some("sess_123".into()),
            total_ms: 431.123_456,
            upstream_ms: Some(420.5),
            ttfb_ms: Some(120.25),
            tokens_in: Some(1200),
            tokens_out: Some(345),
            retries: 1,
            error: None,
        }
    }

    fn combined(r: &AccessRecord) -> String {
        let mut out = Vec::new();
        write_combined(r, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn combined_line_matches_the_nginx_regex() {
        let re = Regex::new(NGINX_COMBINED).unwrap();
        let line = combined(&sample());
        assert!(line.ends_with('\n'));
        let line = line.trim_end_matches('\n');
        let c = re
            .captures(line)
            .unwrap_or_else(|| panic!("no match: {line}"));
        assert_eq!(&c[1], "192.0.2.7");
        assert_eq!(&c[2], "team-a");
        assert_eq!(&c[3], "10/Oct/2000:13:55:36 +0000");
        assert_eq!(&c[4], "POST /v1/chat/completions?x=1 HTTP/1.1");
        assert_eq!(&c[5], "200");
        assert_eq!(&c[6], "2048");
        assert_eq!(&c[7], "-");
        assert_eq!(&c[8], r#"curl/8.0 \x22quoted\x22 \x5Cback"#);
    }

    #[test]
    fn combined_line_with_nothing_known_and_hostile_values() {
        let re = Regex::new(NGINX_COMBINED).unwrap();
        let r = AccessRecord {
            time: at(0),
            path: "/a\"b\\c\u{1}é".into(),
            client_key: Some("has space".into()),
            status: 0,
            referer: Some(String::new()),
            user_agent: Some("tab\there\nnewline".into()),
            ..AccessRecord::default()
        };
        let line = combined(&r);
        assert_eq!(line.matches('\n').count(), 1);
        let line = line.trim_end_matches('\n');
        let c = re
            .captures(line)
            .unwrap_or_else(|| panic!("no match: {line}"));
        assert_eq!(&c[1], "-");
        assert_eq!(&c[2], r"has\x20space");
        assert_eq!(&c[3], "01/Jan/1970:00:00:00 +0000");
        assert_eq!(&c[4], r"GET /a\x22b\x5Cc\x01\xC3\xA9 HTTP/1.1");
        assert_eq!(&c[5], "000");
        assert_eq!(&c[7], "");
        assert_eq!(&c[8], r"tab\x09here\x0Anewline");

        let mapped: IpAddr = "::ffff:198.51.100.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let line = combined(&AccessRecord {
            client_addr: Some(mapped),
            ..AccessRecord::default()
        });
        assert!(line.starts_with("198.51.100.1 - - ["), "{line}");
        let line = combined(&AccessRecord {
            client_addr: Some(v6),
            ..AccessRecord::default()
        });
        assert!(line.starts_with("2001:db8::1 - - ["), "{line}");
    }

    #[test]
    fn civil_dates_agree_with_httpdate() {
        let mut secs: Vec<u64> = vec![
            0,
            951_782_400,     // 2000-02-29
            951_868_800,     // 2000-03-01
            4_107_542_400,   // 2100-03-01
            253_402_300_799, // 9999-12-31T23:59:59
        ];
        // Every ~3.7 days across 1970..2100, hitting every month and leap year.
        secs.extend((0..13_000u64).map(|i| i * 317_123 + 4_567));
        for s in secs {
            let http = httpdate::fmt_http_date(at(s)); // "Tue, 10 Oct 2000 13:55:36 GMT"
            let parts: Vec<&str> = http.split(' ').collect();
            let mut out = Vec::new();
            write_time_local(at(s), &mut out);
            let expected = format!("{}/{}/{}:{} +0000", parts[1], parts[2], parts[3], parts[4]);
            assert_eq!(String::from_utf8(out).unwrap(), expected, "at {s}");
        }
        assert_eq!(
            Rfc3339(at(971_186_136) + Duration::from_millis(7)).to_string(),
            "2000-10-10T13:55:36.007Z"
        );
    }

    #[test]
    fn json_line_parses_and_carries_the_fields() {
        let mut out = Vec::new();
        write_json(&sample(), &mut out);
        write_json(&AccessRecord::default(), &mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["time"], "2000-10-10T13:55:36.250Z");
        assert_eq!(v["request_id"], "req-1");
        assert_eq!(v["client_addr"], "192.0.2.7");
        assert_eq!(v["client_key"], "team-a");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/v1/chat/completions?x=1");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes_in"], 512);
        assert_eq!(v["bytes_out"], 2048);
        assert_eq!(v["route"], "api");
        assert_eq!(v["model"], "gpt-4o");
        assert_eq!(v["upstream"], "openai");
        assert_eq!(v["replica"], "10.0.0.5:443");
        assert_eq!(v["key_id"], "key-a");
        assert_eq!(v["session_name"], "sess_123");
        assert_eq!(v["total_ms"], 431.123);
        assert_eq!(v["upstream_ms"], 420.5);
        assert_eq!(v["ttfb_ms"], 120.25);
        assert_eq!(v["tokens_in"], 1200);
        assert_eq!(v["tokens_out"], 345);
        assert_eq!(v["retries"], 1);
        assert_eq!(v["error"], serde_json::Value::Null);
        assert_eq!(v["user_agent"], r#"curl/8.0 "quoted" \back"#);
        assert_eq!(v["referer"], serde_json::Value::Null);

        // Absent values are null, and the key set never changes.
        let empty: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&v), keys(&empty));
        assert_eq!(empty["model"], serde_json::Value::Null);
        assert_eq!(empty["upstream_ms"], serde_json::Value::Null);
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("llm-edge-access-log-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn line_for(id: &str) -> AccessRecord {
        AccessRecord {
            request_id: id.into(),
            path: format!("/{id}"),
            ..AccessRecord::default()
        }
    }

    #[test]
    fn file_target_follows_logrotate_rename_and_reopen() {
        let dir = temp_dir("rotate");
        let path = dir.join("access.log");
        let log = AccessLog::start(Target::File(path.clone()), Format::Json, 64).unwrap();
        log.log(line_for("one"));
        log.log(line_for("two"));
        assert!(log.flush());
        let rotated = dir.join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        // Before the reopen, lines still follow the renamed file (the open handle).
        log.log(line_for("three"));
        assert!(log.flush());
        log.reopen();
        log.log(line_for("four"));
        assert!(log.flush());

        let old = std::fs::read_to_string(&rotated).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        let ids = |text: &str| -> Vec<String> {
            text.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .map(|v| v["request_id"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(ids(&old), ["one", "two", "three"]);
        assert_eq!(ids(&new), ["four"]);
        assert_eq!(log.dropped(), 0);

        // A reopen with nothing to write still creates the new file (logrotate `nocreate`).
        std::fs::rename(&path, dir.join("access.log.2")).unwrap();
        log.reopen();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(path.exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A writer that blocks until released and keeps what it was given.
    struct Gate {
        state: Arc<(Mutex<(bool, bool)>, Condvar)>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.state;
            let mut s = lock.lock().unwrap();
            s.0 = true; // entered
            cv.notify_all();
            while !s.1 {
                s = cv.wait(s).unwrap();
            }
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let state = Arc::new((Mutex::new((false, false)), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let gate = Gate {
            state: state.clone(),
            got: got.clone(),
        };
        let capacity = 4;
        let log =
            AccessLog::start(Target::Writer(Box::new(gate)), Format::Combined, capacity).unwrap();
        // The writer takes the first line and blocks in the write.
        log.log(line_for("first"));
        {
            let (lock, cv) = &*state;
            let mut s = lock.lock().unwrap();
            while !s.0 {
                s = cv.wait(s).unwrap();
            }
        }
        let started = Instant::now();
        for i in 0..capacity + 10 {
            log.log(line_for(&format!("n{i}")));
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(log.dropped(), 10);

        {
            let (lock, cv) = &*state;
            lock.lock().unwrap().1 = true;
            cv.notify_all();
        }
        assert!(log.flush());
        let text = String::from_utf8(got.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1 + capacity, "{text}");
        assert!(text.contains("\"GET /n3 HTTP/1.1\""));
        assert!(!text.contains("/n4 "));
    }

    #[test]
    fn off_target_takes_nothing_and_handles_are_send_sync() {
        fn send_sync<T: Send + Sync + Clone>() {}
        send_sync::<AccessLog>();
        let log = AccessLog::start(Target::Off, Format::Json, 16).unwrap();
        assert!(!log.is_enabled());
        log.log(line_for("x"));
        log.reopen();
        assert!(log.flush());
        assert_eq!(log.dropped(), 0);
        assert_eq!(
            serde_json::from_str::<Format>("\"json\"").unwrap(),
            Format::Json
        );
        assert_eq!(
            serde_json::from_str::<Format>("\"combined\"").unwrap(),
            Format::Combined
        );
    }
}
