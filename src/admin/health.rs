//! `/health/ready`: the config is loaded and every upstream has at least one usable replica.

use crate::snapshot::Snapshot;
use bytes::Bytes;
use serde::Serialize;

#[derive(Serialize)]
struct UpstreamHealth<'a> {
    upstream: &'a str,
    replicas: usize,
    healthy: usize,
}

/// Whether the instance is ready, and the JSON detail.
pub fn ready(snap: &Snapshot) -> (bool, Bytes) {
    let mut ups: Vec<UpstreamHealth<'_>> = snap
        .upstreams
        .values()
        .map(|u| {
            let (replicas, healthy) = u.health_counts();
            UpstreamHealth {
                upstream: &u.cfg.name,
                replicas,
                healthy,
            }
        })
        .collect();
    ups.sort_by_key(|u| u.upstream);
    let ready = ups.iter().all(|u| u.healthy > 0);
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "upstreams": ups,
    });
    (ready, Bytes::from(body.to_string()))
}
