//! Who may call, how much, from which browser origin, and from which address.

pub mod auth;
pub mod client_addr;
pub mod cors;
pub mod rate;
