//! Call traces: one record per API call, accumulated beside the forwarding path and handed to
//! a writer thread through a bounded queue (drop and count when full; never block a request).

pub mod accumulate;
pub mod build;
pub mod chunk;
pub mod collector;
pub mod json;
pub mod record;
pub mod sink;

use record::TraceRecord;
use sink::Sink;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Which calls are traced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceMode {
    /// Every API call.
    Always,
    /// Only calls whose path carries rLLM metadata or a session (default).
    WhenMetadata,
    /// None.
    Never,
}

/// Validated `tracing:` settings.
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// Which calls are traced.
    pub mode: TraceMode,
    /// SQLite store path.
    pub sqlite: Option<PathBuf>,
    /// JSON Lines path.
    pub jsonl: Option<PathBuf>,
    /// Rotate the JSONL file above this size.
    pub jsonl_max_size: u64,
    /// Rotated JSONL files kept.
    pub jsonl_keep: usize,
    /// Queue capacity (records).
    pub queue: usize,
    /// Collector URL batches are POSTed to.
    pub collector: Option<String>,
}

impl Default for TraceSettings {
    fn default() -> Self {
        Self {
            mode: TraceMode::Never,
            sqlite: None,
            jsonl: None,
            jsonl_max_size: 100 << 20,
            jsonl_keep: 5,
            queue: 4096,
            collector: None,
        }
    }
}

enum Msg {
    Record(Box<TraceRecord>),
    Flush(oneshot::Sender<()>),
}

/// The process-wide trace queue.
pub struct Tracer {
    mode: TraceMode,
    /// Sequence numbers of traced calls still running (their record not yet queued), so a
    /// flush can wait for calls that started before it.
    pending: Mutex<std::collections::BTreeSet<u64>>,
    next_seq: AtomicU64,
    tx: Option<mpsc::Sender<Msg>>,
    dropped: AtomicU64,
    written: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    sqlite: Option<PathBuf>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Tracer {
    /// A tracer that traces nothing.
    pub fn disabled() -> Self {
        Self {
            mode: TraceMode::Never,
            pending: Mutex::new(Default::default()),
            next_seq: AtomicU64::new(0),
            tx: None,
            dropped: AtomicU64::new(0),
            written: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(AtomicU64::new(0)),
            sqlite: None,
            writer: Mutex::new(None),
        }
    }

    /// Opens the sinks and starts the writer thread.
    pub fn start(settings: &TraceSettings) -> Result<Self, String> {
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        if let Some(p) = &settings.sqlite {
            sinks.push(Box::new(sink::SqliteSink::open(p)?));
        }
        if let Some(p) = &settings.jsonl {
            sinks.push(Box::new(sink::JsonlSink::open(
                p,
                settings.jsonl_max_size,
                settings.jsonl_keep,
            )?));
        }
        Ok(Self::with_sinks(
            settings.mode,
            sinks,
            settings.queue,
            settings.sqlite.clone(),
        ))
    }

    /// A tracer over the given sinks (tests use a blocking sink to prove requests never wait).
    pub fn with_sinks(
        mode: TraceMode,
        mut sinks: Vec<Box<dyn Sink>>,
        queue: usize,
        sqlite: Option<PathBuf>,
    ) -> Self {
        if mode == TraceMode::Never || sinks.is_empty() {
            return Self::disabled();
        }
        let (tx, mut rx) = mpsc::channel::<Msg>(queue.max(1));
        let written = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (w, f) = (written.clone(), failed.clone());
        let handle = std::thread::Builder::new()
            .name("llm-edge-trace-writer".into())
            .spawn(move || {
                let mut batch: Vec<TraceRecord> = Vec::with_capacity(256);
                let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
                while let Some(first) = rx.blocking_recv() {
                    let mut next = Some(first);
                    while let Some(msg) = next.take() {
                        match msg {
                            Msg::Record(r) => batch.push(*r),
                            Msg::Flush(done) => flushes.push(done),
                        }
                        if batch.len() < 256 {
                            next = rx.try_recv().ok();
                        }
                    }
                    let full = batch.len() >= 256;
                    if !batch.is_empty() {
                        for s in sinks.iter_mut() {
                            if let Err(e) = s.write(&batch) {
                                f.fetch_add(batch.len() as u64, Ordering::Relaxed);
                                tracing::error!(
                                    "writing {} trace records failed: {e}",
                                    batch.len()
                                );
                            }
                        }
                        w.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        batch.clear();
                    }
                    for done in flushes.drain(..) {
                        let _ = done.send(());
                    }
                    if !full {
                        // Let records gather: waking this thread for every call (a futex
                        // wake-up and a context switch on the proxy's core) cost more than
                        // writing the record (benches/e2e, tracing on every call).
                        std::thread::sleep(crate::observe::WRITER_PAUSE);
                    }
                }
            })
            .ok();
        Self {
            mode,
            pending: Mutex::new(Default::default()),
            next_seq: AtomicU64::new(0),
            tx: Some(tx),
            dropped: AtomicU64::new(0),
            written,
            failed,
            sqlite,
            writer: Mutex::new(handle),
        }
    }

    /// Whether a call with (or without) path metadata is traced.
    pub fn wants(&self, has_metadata: bool) -> bool {
        self.tx.is_some()
            && match self.mode {
                TraceMode::Always => true,
                TraceMode::WhenMetadata => has_metadata,
                TraceMode::Never => false,
            }
    }

    /// Marks a traced call as started; its record is expected before a later flush returns.
    /// Dropping the ticket (after `submit`, or on any exit) ends the wait.
    pub fn begin(&self) -> CallTicket<'_> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut p) = self.pending.lock() {
            p.insert(seq);
        }
        CallTicket { tracer: self, seq }
    }

    /// Queues a record; when the queue is full the record is dropped and counted.
    pub fn submit(&self, rec: TraceRecord) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(Msg::Record(Box::new(rec))).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Returns once every traced call that started before the flush has been written
    /// (waiting at most 30 s for calls still in progress).
    pub async fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let target = self.next_seq.load(Ordering::Relaxed);
        let give_up = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let oldest = self
                .pending
                .lock()
                .ok()
                .and_then(|p| p.iter().next().copied());
            match oldest {
                Some(seq) if seq < target && tokio::time::Instant::now() < give_up => {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
                _ => break,
            }
        }
        let (done, wait) = oneshot::channel();
        if tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Records handed to the sinks.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Records a sink failed to write.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Records waiting in the queue.
    pub fn depth(&self) -> usize {
        self.tx
            .as_ref()
            .map(|t| t.max_capacity() - t.capacity())
            .unwrap_or(0)
    }

    /// The SQLite store, for the admin read API.
    pub fn sqlite_path(&self) -> Option<&PathBuf> {
        self.sqlite.as_ref()
    }
}

/// A traced call in progress (see [`Tracer::begin`]).
pub struct CallTicket<'a> {
    tracer: &'a Tracer,
    seq: u64,
}

impl Drop for CallTicket<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.tracer.pending.lock() {
            p.remove(&self.seq);
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // Closing the queue lets the writer drain what is left and exit.
        self.tx = None;
        if let Ok(mut w) = self.writer.lock() {
            if let Some(h) = w.take() {
                let _ = h.join();
            }
        }
    }
}
