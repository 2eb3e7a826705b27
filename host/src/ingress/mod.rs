//! Where work comes in: HTTP listeners (one port per service) and message consumers.

pub mod consumer;
pub mod http;
pub mod ports;
