//! Observation of responses on the side of the forwarding path.

pub mod access_log;
pub mod ledger;
pub mod metrics;
pub mod sse;
pub mod usage;

/// The `/metrics` body (being wired).
pub fn scrape(_rt: &crate::runtime::Runtime) -> bytes::Bytes {
    bytes::Bytes::new()
}
