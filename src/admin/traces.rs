//! `GET /admin/traces`, `GET /admin/traces/{trace_id}`, `POST /admin/traces/flush`.

use super::query_pairs;
use crate::error::EdgeError;
use crate::trace::{sink, Tracer};
use bytes::Bytes;
use rusqlite::{Connection, OpenFlags};
use std::path::PathBuf;

fn store(tracer: &Tracer) -> Result<PathBuf, EdgeError> {
    tracer
        .sqlite_path()
        .cloned()
        .ok_or_else(|| EdgeError::BadRequest("tracing.sqlite is not configured".into()))
}

async fn with_store<T: Send + 'static>(
    path: PathBuf,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, EdgeError> {
    // SQLite reads are blocking file I/O: keep them off the proxy's worker threads.
    tokio::task::spawn_blocking(move || {
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| EdgeError::Internal(format!("opening the trace store: {e}")))?;
        f(&conn).map_err(|e| EdgeError::Internal(format!("reading the trace store: {e}")))
    })
    .await
    .map_err(|e| EdgeError::Internal(format!("trace store reader: {e}")))?
}

/// `POST /admin/traces/flush`: returns once every trace queued before the call is written.
pub async fn flush(tracer: &Tracer) -> Result<Bytes, EdgeError> {
    tracer.flush().await;
    let body = serde_json::json!({
        "flushed": true,
        "written": tracer.written(),
        "dropped": tracer.dropped(),
        "failed": tracer.failed(),
        "queued": tracer.depth(),
    });
    Ok(Bytes::from(body.to_string()))
}

/// `GET /admin/traces?session_uid=&since=&limit=` (limit default 100, at most 10,000).
pub async fn list(tracer: &Tracer, query: &str) -> Result<Bytes, EdgeError> {
    let path = store(tracer)?;
    let mut session_uid = None;
    let mut since = None;
    let mut limit = 100usize;
    for (k, v) in query_pairs(query) {
        match k.as_str() {
            "session_uid" | "session_name" => session_uid = Some(v),
            "since" => {
                since = Some(v.parse::<f64>().map_err(|_| {
                    EdgeError::BadRequest("since must be a Unix timestamp in seconds".into())
                })?)
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .map_err(|_| EdgeError::BadRequest("limit must be a number".into()))?
                    .min(10_000)
            }
            other => {
                return Err(EdgeError::BadRequest(format!(
                    "unknown query parameter {other:?}"
                )))
            }
        }
    }
    let rows = with_store(path, move |c| {
        sink::query(c, session_uid.as_deref(), since, limit)
    })
    .await?;
    let mut out = Vec::with_capacity(rows.iter().map(|r| r.len() + 1).sum::<usize>() + 32);
    out.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Rows are JSON written by the sink: spliced as they are.
        out.extend_from_slice(r.as_bytes());
    }
    out.extend_from_slice(b"]}");
    Ok(Bytes::from(out))
}

/// `GET /admin/traces/{trace_id}`.
pub async fn one(tracer: &Tracer, id: &str) -> Result<Bytes, EdgeError> {
    let path = store(tracer)?;
    let id = percent_encoding::percent_decode_str(id)
        .decode_utf8_lossy()
        .into_owned();
    let wanted = id.clone();
    match with_store(path, move |c| sink::get(c, &wanted)).await? {
        Some(row) => Ok(Bytes::from(row)),
        None => Err(EdgeError::UnknownPath(format!("/admin/traces/{id}"))),
    }
}
