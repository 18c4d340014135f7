//! Observation of responses on the side of the forwarding path.

pub mod access_log;
pub mod ledger;
pub mod metrics;
pub mod sse;
pub mod usage;
