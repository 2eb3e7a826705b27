//! Numbers and names `wit/platform.wit` promises to components: the host enforces them and the
//! sdk checks them first, so both depend on this one crate.
#![no_std]

/// Largest request or response body, state value and message payload: 1 MiB. The host refuses
/// larger ones; the sdk refuses them first and keeps guest memory bounded.
pub const MAX_BODY: usize = 1 << 20;

/// Longest bucket or key name, in bytes, that `state` accepts.
pub const MAX_NAME: usize = 256;

/// Services address each other as `<name>-service`: `http://user-service/users` goes to
/// `user-service` in process.
pub const SERVICE_SUFFIX: &str = "-service";
