//! Observation of responses on the side of the forwarding path.

pub mod ledger;
pub mod sse;
pub mod usage;
