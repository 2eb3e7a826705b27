//! The host: runs the four services as WebAssembly components in one process.

pub mod admin;
mod bindings;
pub mod config;
pub mod http;
pub mod invocation;
pub mod messaging;
pub mod metrics;
pub mod platform;
pub mod registry;
pub mod services;
pub mod state;
pub mod testing;
pub mod watch;
