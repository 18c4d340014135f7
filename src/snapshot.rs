//! Everything a request reads from config, built once per load and swapped atomically.

use crate::config::Config;
use crate::route::table::RouteTable;
use crate::upstream::dns::Dns;
use crate::upstream::Upstream;
use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// One immutable view of the configuration. A request loads it once and keeps it to the end.
pub struct Snapshot {
    /// The validated config.
    pub cfg: Arc<Config>,
    /// Models and routes.
    pub routes: RouteTable,
    /// Upstreams by name.
    pub upstreams: HashMap<String, Arc<Upstream>>,
    /// Pre-rendered `GET /v1/models` body.
    pub models_body: Bytes,
}

/// The shared, swappable current snapshot.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelEntry<'a>>,
}

#[derive(Serialize)]
struct ModelEntry<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

impl Snapshot {
    /// Builds upstreams (replicas, peers, keys) and lookup tables from a validated config.
    pub fn build(cfg: Config, dns: &Arc<Dns>) -> Self {
        let upstreams = cfg
            .upstreams
            .values()
            .map(|u| {
                (
                    u.name.clone(),
                    Arc::new(Upstream::new(u.clone(), dns.clone())),
                )
            })
            .collect();
        let routes = RouteTable::new(&cfg);
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let list = ModelList {
            object: "list",
            data: cfg
                .models
                .iter()
                .map(|m| ModelEntry {
                    id: &m.name,
                    object: "model",
                    created,
                    owned_by: &m.upstream,
                })
                .collect(),
        };
        let models_body = Bytes::from(serde_json::to_vec(&list).unwrap_or_default());
        Self {
            cfg: Arc::new(cfg),
            routes,
            upstreams,
            models_body,
        }
    }
}
