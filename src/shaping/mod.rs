//! Request body shaping: top-level JSON edits.

pub mod body;
pub mod sampling;
pub mod strip;
