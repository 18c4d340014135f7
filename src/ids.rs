//! Unique ids for requests and traces (not secrets, just unique and unguessable enough).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

static COUNTER: AtomicU64 = AtomicU64::new(0);
static SEED: OnceLock<RandomState> = OnceLock::new();

/// `prefix` followed by 24 hex digits, unique within and across processes.
pub fn new_id(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut h = SEED.get_or_init(RandomState::new).build_hasher();
    h.write_u64(n);
    h.write_u64(nanos);
    let a = h.finish();
    h.write_u64(a);
    let b = h.finish() as u32;
    format!("{prefix}{a:016x}{b:08x}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_unique() {
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| super::new_id("r-")).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|i| i.len() == 26));
    }
}
