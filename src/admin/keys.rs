//! `GET /admin/keys` and `POST /admin/keys/{upstream}/{id}/reset`. Only key ids and masked
//! forms are shown, never a secret.

use crate::error::EdgeError;
use crate::snapshot::Snapshot;
use bytes::Bytes;
use serde::Serialize;

#[derive(Serialize)]
struct KeyView<'a> {
    id: &'a str,
    masked: &'a str,
    state: &'static str,
    cooldown_remaining_ms: u64,
    in_flight: u32,
    weight: u32,
    max_concurrent: Option<u32>,
    last_error: Option<String>,
}

#[derive(Serialize)]
struct UpstreamView<'a> {
    upstream: &'a str,
    kind: &'static str,
    strategy: &'static str,
    keys: Vec<KeyView<'a>>,
}

/// `GET /admin/keys`: every upstream's keys with their state.
pub fn list(snap: &Snapshot) -> Result<Bytes, EdgeError> {
    let mut names: Vec<&String> = snap.upstreams.keys().collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let up = &snap.upstreams[name];
        let keys = up
            .keys
            .keys()
            .iter()
            .map(|k| {
                let cool = k.state.max_cooldown_left();
                let state = if k.state.is_dead() {
                    "dead"
                } else if !cool.is_zero() {
                    "cooling"
                } else {
                    "up"
                };
                KeyView {
                    id: &k.id,
                    masked: &k.masked,
                    state,
                    cooldown_remaining_ms: cool.as_millis() as u64,
                    in_flight: k.state.in_flight(),
                    weight: k.weight,
                    max_concurrent: k.max_concurrent,
                    last_error: k.state.last_error(),
                }
            })
            .collect();
        out.push(UpstreamView {
            upstream: name,
            kind: up.cfg.kind.as_str(),
            strategy: match up.cfg.key_strategy {
                crate::config::schema::KeyStrategy::RoundRobin => "round_robin",
                crate::config::schema::KeyStrategy::LeastBusy => "least_busy",
                crate::config::schema::KeyStrategy::Sequential => "sequential",
                crate::config::schema::KeyStrategy::Session => "session",
            },
            keys,
        });
    }
    serde_json::to_vec(&serde_json::json!({ "object": "list", "data": out }))
        .map(Bytes::from)
        .map_err(|e| EdgeError::Internal(e.to_string()))
}

/// `POST /admin/keys/{upstream}/{id}/reset`: the key is alive again with no cooldown.
pub fn reset(snap: &Snapshot, rest: &str) -> Result<Bytes, EdgeError> {
    let Some((upstream, tail)) = rest.split_once('/') else {
        return Err(EdgeError::UnknownPath(format!("/admin/keys/{rest}")));
    };
    let Some(id) = tail.strip_suffix("/reset") else {
        return Err(EdgeError::UnknownPath(format!("/admin/keys/{rest}")));
    };
    let Some(up) = snap.upstreams.get(upstream) else {
        return Err(EdgeError::UnknownPath(format!("upstream {upstream:?}")));
    };
    if !up.keys.reset(id) {
        return Err(EdgeError::UnknownPath(format!(
            "key {id:?} of upstream {upstream:?}"
        )));
    }
    Ok(Bytes::from(
        serde_json::json!({"reset": true, "upstream": upstream, "id": id}).to_string(),
    ))
}
