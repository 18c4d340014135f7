//! Egress policy (being written).
use std::net::{IpAddr, SocketAddr};

/// Placeholder until the policy lands.
pub fn literal_warning(_ip: IpAddr) -> Option<&'static str> {
    None
}
/// Placeholder.
#[derive(Default)]
pub struct EgressPolicy;
/// Placeholder.
pub struct Refusal;
impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused")
    }
}
impl EgressPolicy {
    /// Placeholder.
    pub fn new(_a: Vec<ipnet::IpNet>, _o: Vec<SocketAddr>) -> Self {
        Self
    }
    /// Placeholder.
    pub fn check_resolved(&self, _a: SocketAddr, _p: bool) -> Result<(), Refusal> {
        Ok(())
    }
}
