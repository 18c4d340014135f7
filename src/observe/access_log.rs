//! Access log (being written).
