//! Request routing: API path classification, model lookup, pass-through routes.

pub mod api;
pub mod slug;
pub mod table;
