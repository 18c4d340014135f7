//! The usage ledger: requests, outcomes and tokens per (client, upstream, key id, model, hour),
//! kept in memory and persisted by a background thread (debounced; temp file + fsync + rename,
//! so a `kill -9` at any moment leaves a readable file). No file I/O on the request path.

use crate::trace::record::Tokens;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What a row is counted under.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LedgerKey {
    /// Client key id (`anonymous` in open mode).
    pub client: String,
    /// Upstream name.
    pub upstream: String,
    /// Upstream key id (`-` for keyless upstreams).
    pub key_id: String,
    /// Model the client asked for.
    pub model: String,
    /// Start of the hour (Unix seconds).
    pub hour: u64,
}

/// Counters of one row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Calls.
    pub requests: u64,
    /// Calls answered 2xx and completed.
    pub successes: u64,
    /// Failed calls by class (`upstream_4xx`, `upstream_5xx`, `upstream_rate_limited`, error codes).
    pub failures: BTreeMap<String, u64>,
    /// Streamed calls.
    pub streamed: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Total tokens.
    pub total_tokens: u64,
    /// Cached prompt tokens, where reported.
    pub cached_tokens: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.requests += o.requests;
        self.successes += o.successes;
        for (k, v) in &o.failures {
            *self.failures.entry(k.clone()).or_default() += v;
        }
        self.streamed += o.streamed;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.total_tokens += o.total_tokens;
        self.cached_tokens += o.cached_tokens;
    }
}

/// One finished call, as the ledger sees it.
#[derive(Debug, Clone)]
pub struct CallUsage {
    /// Row key (hour filled in by the ledger).
    pub client: String,
    /// Upstream name.
    pub upstream: String,
    /// Key id.
    pub key_id: Option<String>,
    /// Client model.
    pub model: String,
    /// Streamed?
    pub stream: bool,
    /// `None` for a success, else the failure class.
    pub failure: Option<String>,
    /// Tokens reported by the upstream.
    pub tokens: Option<Tokens>,
}

#[derive(Serialize, Deserialize)]
struct Row {
    #[serde(flatten)]
    key: LedgerKey,
    #[serde(flatten)]
    counters: Counters,
}

#[derive(Serialize, Deserialize)]
struct FileForm {
    version: u32,
    rows: Vec<Row>,
}

struct Inner {
    rows: Mutex<HashMap<LedgerKey, Counters>>,
    /// Serialises saves (the writer thread and the shutdown flush share the temp file).
    saving: Mutex<()>,
    dirty: AtomicBool,
    wake: Condvar,
    wake_lock: Mutex<bool>,
}

/// The process-wide ledger.
pub struct Ledger {
    inner: Arc<Inner>,
    path: Option<PathBuf>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Ledger {
    /// A ledger kept in memory only.
    pub fn in_memory() -> Self {
        Self {
            inner: Arc::new(Inner {
                rows: Mutex::new(HashMap::new()),
                saving: Mutex::new(()),
                dirty: AtomicBool::new(false),
                wake: Condvar::new(),
                wake_lock: Mutex::new(false),
            }),
            path: None,
            writer: Mutex::new(None),
        }
    }

    /// Loads `path` (if it exists) and starts the writer thread, saving at most every `debounce`.
    pub fn open(path: &Path, debounce: Duration) -> Result<Self, String> {
        let mut ledger = Self::in_memory();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        match fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<FileForm>(&bytes) {
                Ok(f) => {
                    if let Ok(mut rows) = ledger.inner.rows.lock() {
                        for r in f.rows {
                            rows.entry(r.key).or_default().add(&r.counters);
                        }
                    }
                }
                Err(e) => {
                    // Never lose the evidence: keep the unreadable file aside.
                    let aside = path.with_extension("unreadable");
                    let _ = fs::rename(path, &aside);
                    tracing::error!(
                        "usage ledger {} is unreadable ({e}); moved to {}",
                        path.display(),
                        aside.display()
                    );
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        }
        ledger.path = Some(path.to_path_buf());
        let inner = ledger.inner.clone();
        let p = path.to_path_buf();
        let handle = std::thread::Builder::new()
            .name("llm-edge-ledger".into())
            .spawn(move || loop {
                let stop = {
                    let Ok(guard) = inner.wake_lock.lock() else {
                        return;
                    };
                    let (guard, _) = inner
                        .wake
                        .wait_timeout(guard, debounce)
                        .unwrap_or_else(|e| e.into_inner());
                    *guard
                };
                if inner.dirty.swap(false, Ordering::AcqRel) {
                    if let Err(e) = save(&inner, &p) {
                        inner.dirty.store(true, Ordering::Release);
                        tracing::error!("saving the usage ledger failed: {e}");
                    }
                }
                if stop {
                    return;
                }
            })
            .map_err(|e| format!("starting the ledger writer: {e}"))?;
        ledger.writer = Mutex::new(Some(handle));
        Ok(ledger)
    }

    /// Counts a finished call. Hot path: one map update under a short lock.
    pub fn record(&self, call: CallUsage) {
        let hour = unix_now() / 3600 * 3600;
        let key = LedgerKey {
            client: call.client,
            upstream: call.upstream,
            key_id: call.key_id.unwrap_or_else(|| "-".into()),
            model: call.model,
            hour,
        };
        if let Ok(mut rows) = self.inner.rows.lock() {
            let c = rows.entry(key).or_default();
            c.requests += 1;
            match call.failure {
                None => c.successes += 1,
                Some(class) => *c.failures.entry(class).or_default() += 1,
            }
            if call.stream {
                c.streamed += 1;
            }
            if let Some(t) = call.tokens {
                c.prompt_tokens = c.prompt_tokens.saturating_add(t.prompt);
                c.completion_tokens = c.completion_tokens.saturating_add(t.completion);
                c.total_tokens = c.total_tokens.saturating_add(t.total);
                c.cached_tokens = c.cached_tokens.saturating_add(t.cached.unwrap_or(0));
            }
        }
        self.inner.dirty.store(true, Ordering::Release);
    }

    /// 1 while changes wait to be saved, else 0 (the `llm_edge_ledger_pending` gauge).
    pub fn pending(&self) -> u64 {
        u64::from(self.inner.dirty.load(Ordering::Acquire) && self.path.is_some())
    }

    /// Rows summed by `group_by` (`key`, `model`, `client`, `upstream`), from hours at or after
    /// `since` (Unix seconds).
    pub fn summary(&self, group_by: &str, since: Option<u64>) -> Vec<(String, Counters)> {
        let mut out: BTreeMap<String, Counters> = BTreeMap::new();
        if let Ok(rows) = self.inner.rows.lock() {
            for (k, c) in rows.iter() {
                if since.is_some_and(|s| k.hour + 3600 <= s) {
                    continue;
                }
                let g = match group_by {
                    "model" => k.model.clone(),
                    "client" => k.client.clone(),
                    "upstream" => k.upstream.clone(),
                    _ => format!("{}/{}", k.upstream, k.key_id),
                };
                out.entry(g).or_default().add(c);
            }
        }
        out.into_iter().collect()
    }

    /// Writes the ledger now (graceful shutdown).
    pub fn flush(&self) -> Result<(), String> {
        match &self.path {
            Some(p) => {
                self.inner.dirty.store(false, Ordering::Release);
                save(&self.inner, p)
            }
            None => Ok(()),
        }
    }
}

fn save(inner: &Inner, path: &Path) -> Result<(), String> {
    let _one_at_a_time = inner
        .saving
        .lock()
        .map_err(|_| "ledger save lock poisoned")?;
    let rows: Vec<Row> = match inner.rows.lock() {
        Ok(r) => r
            .iter()
            .map(|(k, c)| Row {
                key: k.clone(),
                counters: c.clone(),
            })
            .collect(),
        Err(_) => return Err("ledger lock poisoned".into()),
    };
    let body = serde_json::to_vec(&FileForm { version: 1, rows }).map_err(|e| e.to_string())?;
    // Per process, so an old and a new process (graceful upgrade) never share a temp file.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = fs::File::create(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    f.write_all(&body)
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    f.sync_all()
        .map_err(|e| format!("syncing {}: {e}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| format!("renaming to {}: {e}", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl Drop for Ledger {
    fn drop(&mut self) {
        if let Ok(mut stop) = self.inner.wake_lock.lock() {
            *stop = true;
        }
        self.inner.wake.notify_all();
        if let Ok(mut w) = self.writer.lock() {
            if let Some(h) = w.take() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(model: &str, key: &str, failure: Option<&str>, tokens: u64) -> CallUsage {
        CallUsage {
            client: "anonymous".into(),
            upstream: "u".into(),
            key_id: Some(key.into()),
            model: model.into(),
            stream: false,
            failure: failure.map(str::to_string),
            tokens: Some(Tokens {
                prompt: tokens,
                completion: 1,
                total: tokens + 1,
                cached: None,
            }),
        }
    }

    #[test]
    fn counts_and_groups() {
        let l = Ledger::in_memory();
        l.record(call("a", "k1", None, 10));
        l.record(call("a", "k2", Some("upstream_5xx"), 0));
        l.record(call("b", "k1", None, 5));
        let by_model = l.summary("model", None);
        assert_eq!(by_model.len(), 2);
        assert_eq!(by_model[0].1.requests, 2);
        assert_eq!(by_model[0].1.failures["upstream_5xx"], 1);
        let by_key = l.summary("key", None);
        assert_eq!(by_key[0].0, "u/k1");
        assert_eq!(by_key[0].1.prompt_tokens, 15);
        assert!(l.summary("model", Some(unix_now() + 7200)).is_empty());
    }

    #[test]
    fn survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("llm-edge-ledger-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("usage.json");
        {
            let l = Ledger::open(&path, Duration::from_millis(20)).unwrap();
            l.record(call("a", "k1", None, 10));
            l.flush().unwrap();
        }
        let l = Ledger::open(&path, Duration::from_millis(20)).unwrap();
        assert_eq!(l.summary("model", None)[0].1.prompt_tokens, 10);
        let _ = fs::remove_dir_all(dir);
    }
}
