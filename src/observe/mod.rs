//! Observation of responses on the side of the forwarding path.

pub mod sse;
