//! `wasi:http` plumbing: answering the incoming request and calling other services.

mod inbound;
mod outbound;
mod wasi_io;

pub use inbound::{serve, serve_values, MAX_REQUEST_BODY_BYTES};
pub use outbound::{
    fetch, fetch_all, fetch_via_wasi_http, OutboundError, OutboundErrorKind, OutboundRequest,
};
