//! Egress policy (being written).
