//! llm-edge: an edge reverse proxy for LLM traffic, built on Pingora.
//!
//! The binary is a thin CLI over this library; tests and benches use the same code paths.

pub mod admin;
pub mod config;
pub mod demo;
pub mod error;
pub mod ids;
pub mod listeners;
pub mod observe;
pub mod proxy;
pub mod route;
pub mod runtime;
pub mod security;
pub mod server;
pub mod shaping;
pub mod snapshot;
pub mod trace;
pub mod upstream;
