//! What the host offers components, one module per WIT interface, each with its own linker entry.
//!
//! A capability never reaches into the runtime: what it needs from the embedder is a trait it
//! declares ([`services::ServiceCalls`]), as `wasi:http` declares `WasiHttpHooks`.

pub mod async_state;
mod bindings;
pub mod config;
pub mod keyvalue;
pub mod otel;
pub mod outbound;
pub mod outgoing_http;
pub mod producer;
pub mod services;
pub mod spin;
pub mod state;
pub mod stderr;
pub mod wasi_messaging;
pub mod wasmcloud;

/// The exports of a component that this host calls (`microsvc:platform/http-handler` and
/// `handler`, generated once here with the imports so that they share the WIT types, and
/// `wasi:messaging/incoming-handler`).
pub mod exports {
    pub use super::bindings::exports::microsvc::platform::{handler, http_handler};
    pub use super::bindings::microsvc::platform::producer::Message;
    pub use super::bindings::microsvc::platform::services::{Request, Response};
    pub use super::wasi_messaging::incoming_handler;
}
