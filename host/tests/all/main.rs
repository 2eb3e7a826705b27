//! Integration tests: the real host binary with the real built components, over real HTTP.
//! Build the components first (`just build`); `just test` does.

mod admin;
mod api;
#[path = "../support/broker.rs"]
mod broker;
mod compose;
mod console;
mod delivery;
mod docs;
mod flags;
mod flows;
mod fuzz;
mod harness;
mod kafka;
mod keyvalue;
mod languages;
mod limits;
mod live;
mod manifest;
mod outbound;
#[path = "../support/postgres.rs"]
mod postgres_server;
mod resilience;
mod reuse;
mod scale;
mod services;
mod shutdown;
mod spin;
mod swap;
mod traces;
mod wasi_http3;
mod wasi_messaging;
mod wasmcloud;
