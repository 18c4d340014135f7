//! Trace sinks, run on a dedicated writer thread fed by a bounded queue: a JSON Lines file with
//! size-based rotation, and an SQLite store using rLLM's tables.

use super::record::TraceRecord;
use rusqlite::{params, Connection};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// A sink the writer thread writes batches to.
pub trait Sink: Send {
    /// Writes a batch; errors are logged by the caller and the batch is counted as lost.
    fn write(&mut self, batch: &[TraceRecord]) -> Result<(), String>;
}

/// JSON Lines file, rotated when it would exceed `max_size` (`file.1` … `file.<keep>`).
pub struct JsonlSink {
    path: PathBuf,
    max_size: u64,
    keep: usize,
    out: BufWriter<File>,
    size: u64,
    /// One record's line, reused so a batch costs no allocation per record.
    line: Vec<u8>,
}

impl JsonlSink {
    /// Opens (appends to) `path`, creating its directory.
    pub fn open(path: &Path, max_size: u64, keep: usize) -> Result<Self, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            path: path.to_path_buf(),
            max_size,
            keep: keep.max(1),
            out: BufWriter::new(file),
            size,
            line: Vec::new(),
        })
    }

    fn rotate(&mut self) -> Result<(), String> {
        self.out.flush().map_err(|e| e.to_string())?;
        let name = |i: usize| PathBuf::from(format!("{}.{i}", self.path.display()));
        let _ = fs::remove_file(name(self.keep));
        for i in (1..self.keep).rev() {
            let _ = fs::rename(name(i), name(i + 1));
        }
        fs::rename(&self.path, name(1))
            .map_err(|e| format!("rotating {}: {e}", self.path.display()))?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| format!("reopening {}: {e}", self.path.display()))?;
        self.out = BufWriter::new(file);
        self.size = 0;
        Ok(())
    }
}

impl Sink for JsonlSink {
    fn write(&mut self, batch: &[TraceRecord]) -> Result<(), String> {
        for rec in batch {
            let mut line = std::mem::take(&mut self.line);
            line.clear();
            super::json::write_record(&mut line, rec);
            line.push(b'\n');
            if self.size > 0 && self.size + line.len() as u64 > self.max_size {
                self.rotate()?;
            }
            self.out.write_all(&line).map_err(|e| e.to_string())?;
            self.size += line.len() as u64;
            // Keep the buffer unless one huge record grew it.
            if line.capacity() <= 1 << 20 {
                self.line = line;
            }
        }
        self.out.flush().map_err(|e| e.to_string())
    }
}

/// SQLite store with rLLM's tables:
/// `traces(id, context_type, namespace, data, metadata, created_at, updated_at)` and
/// `trace_sessions(trace_id, session_uid, created_at)`.
pub struct SqliteSink {
    conn: Connection,
}

/// `context_type` of llm-edge's rows.
pub const CONTEXT_TYPE: &str = "llm_trace";

/// Creates the tables when missing.
pub fn init_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "PRAGMA journal_mode=WAL;
         PRAGMA synchronous=NORMAL;
         CREATE TABLE IF NOT EXISTS traces (
             id TEXT PRIMARY KEY,
             context_type TEXT NOT NULL,
             namespace TEXT NOT NULL,
             data TEXT NOT NULL,
             metadata TEXT NOT NULL,
             created_at REAL NOT NULL,
             updated_at REAL NOT NULL
         );
         CREATE INDEX IF NOT EXISTS idx_traces_created_at ON traces(created_at);
         CREATE TABLE IF NOT EXISTS trace_sessions (
             trace_id TEXT NOT NULL,
             session_uid TEXT NOT NULL,
             created_at REAL NOT NULL,
             PRIMARY KEY (trace_id, session_uid)
         );
         CREATE INDEX IF NOT EXISTS idx_trace_sessions_uid ON trace_sessions(session_uid, created_at);",
    )
}

impl SqliteSink {
    /// Opens or creates the database at `path`, creating its directory.
    pub fn open(path: &Path) -> Result<Self, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        let conn =
            Connection::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        init_schema(&conn).map_err(|e| format!("creating tables in {}: {e}", path.display()))?;
        Ok(Self { conn })
    }
}

/// A record as JSON text.
fn record_json(rec: &TraceRecord) -> Result<String, String> {
    let mut out = Vec::with_capacity(1024);
    super::json::write_record(&mut out, rec);
    String::from_utf8(out).map_err(|e| format!("trace record is not UTF-8: {e}"))
}

/// Session uids a record is filed under: the slug's `session_uids`, else its session name.
pub fn session_uids(rec: &TraceRecord) -> Vec<String> {
    if !rec.session_uids.is_empty() {
        return rec.session_uids.clone();
    }
    rec.session_name.iter().cloned().collect()
}

impl Sink for SqliteSink {
    fn write(&mut self, batch: &[TraceRecord]) -> Result<(), String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let tx = self.conn.transaction().map_err(|e| e.to_string())?;
        {
            let mut put = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO traces (id, context_type, namespace, data, metadata, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(|e| e.to_string())?;
            let mut link = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO trace_sessions (trace_id, session_uid, created_at) VALUES (?1, ?2, ?3)",
                )
                .map_err(|e| e.to_string())?;
            for rec in batch {
                let namespace = rec.session_name.clone().unwrap_or_else(|| "default".into());
                let meta = serde_json::to_string(&rec.metadata).map_err(|e| e.to_string())?;
                let mut data = record_json(rec)?;
                let mut id = rec.trace_id.clone();
                let mut insert = |id: &str, data: &str| {
                    put.execute(params![
                        id,
                        CONTEXT_TYPE,
                        namespace,
                        data,
                        meta,
                        rec.timestamp,
                        now
                    ])
                    .map_err(|e| e.to_string())
                };
                let mut n = insert(&id, &data)?;
                if n == 0 {
                    // Upstream response ids are not always unique (mocks, some servers): keep
                    // both calls by qualifying the id with the request id.
                    let mut unique = rec.clone();
                    unique.trace_id = format!("{}:{}", rec.trace_id, rec.request_id);
                    id = unique.trace_id.clone();
                    data = record_json(&unique)?;
                    n = insert(&id, &data)?;
                }
                if n == 0 {
                    return Err(format!("trace id {id} already stored"));
                }
                for uid in session_uids(rec) {
                    link.execute(params![id, uid, rec.timestamp])
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        tx.commit().map_err(|e| e.to_string())
    }
}

/// Reads traces back for the admin API: by session uid, newer than `since`, at most `limit`.
pub fn query(
    conn: &Connection,
    session_uid: Option<&str>,
    since: Option<f64>,
    limit: usize,
) -> rusqlite::Result<Vec<String>> {
    let since = since.unwrap_or(f64::MIN);
    let limit = limit as i64;
    let mut out = Vec::new();
    match session_uid {
        Some(uid) => {
            let mut st = conn.prepare_cached(
                "SELECT t.data FROM traces t JOIN trace_sessions s ON s.trace_id = t.id
                 WHERE s.session_uid = ?1 AND t.created_at >= ?2 ORDER BY t.created_at LIMIT ?3",
            )?;
            let rows = st.query_map(params![uid, since, limit], |r| r.get::<_, String>(0))?;
            for r in rows {
                out.push(r?);
            }
        }
        None => {
            let mut st = conn.prepare_cached(
                "SELECT data FROM traces WHERE created_at >= ?1 ORDER BY created_at LIMIT ?2",
            )?;
            let rows = st.query_map(params![since, limit], |r| r.get::<_, String>(0))?;
            for r in rows {
                out.push(r?);
            }
        }
    }
    Ok(out)
}

/// One trace by id.
pub fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<String>> {
    let mut st = conn.prepare_cached("SELECT data FROM traces WHERE id = ?1")?;
    let mut rows = st.query(params![id])?;
    match rows.next()? {
        Some(r) => Ok(Some(r.get(0)?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, session: &str) -> TraceRecord {
        TraceRecord {
            trace_id: id.into(),
            session_name: Some(session.into()),
            timestamp: 1.0,
            ..Default::default()
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("llm-edge-sink-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn jsonl_rotates_by_size() {
        let dir = tmp("jsonl");
        let path = dir.join("t.jsonl");
        let mut s = JsonlSink::open(&path, 400, 2).unwrap();
        for i in 0..10 {
            s.write(&[rec(&format!("t{i}"), "s")]).unwrap();
        }
        assert!(path.exists());
        assert!(PathBuf::from(format!("{}.1", path.display())).exists());
        assert!(PathBuf::from(format!("{}.2", path.display())).exists());
        assert!(!PathBuf::from(format!("{}.3", path.display())).exists());
        for f in [path.clone(), PathBuf::from(format!("{}.1", path.display()))] {
            let text = fs::read_to_string(f).unwrap();
            for line in text.lines() {
                serde_json::from_str::<TraceRecord>(line).unwrap();
            }
        }
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn sqlite_is_queryable_by_session_uid() {
        let dir = tmp("sqlite");
        let path = dir.join("traces.db");
        let mut s = SqliteSink::open(&path).unwrap();
        let mut r = rec("a", "s1");
        r.session_uids = vec!["u1".into(), "u2".into()];
        s.write(&[r, rec("b", "s2")]).unwrap();
        // The same upstream id again is kept under a qualified id, not overwritten.
        let mut dup = rec("b", "s3");
        dup.request_id = "req_2".into();
        s.write(&[dup]).unwrap();
        let conn = Connection::open(&path).unwrap();
        let by_uid = query(&conn, Some("u2"), None, 10).unwrap();
        assert_eq!(by_uid.len(), 1);
        assert!(by_uid[0].contains("\"trace_id\":\"a\""));
        assert_eq!(query(&conn, Some("s2"), None, 10).unwrap().len(), 1);
        assert!(get(&conn, "b").unwrap().is_some());
        let again = get(&conn, "b:req_2").unwrap().unwrap();
        assert!(again.contains("\"session_name\":\"s3\""));
        assert_eq!(query(&conn, Some("s3"), None, 10).unwrap().len(), 1);
        let ns: String = conn
            .query_row("SELECT namespace FROM traces WHERE id='a'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(ns, "s1");
        let _ = fs::remove_dir_all(dir);
    }
}
