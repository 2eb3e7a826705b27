//! Limits and names shared with the host: these must match wit/platform.wit and the host.

/// Largest body a request, response, stored value or message may have (1 MiB). The host refuses
/// larger ones, so the sdk refuses them first and keeps guest memory bounded.
pub const MAX_BODY: usize = 1 << 20;

/// Longest bucket or key name, in bytes, that the host's `state` accepts.
pub const MAX_NAME: usize = 256;

/// Host names ending with this are other services of the same host: `http://user-service/users`
/// goes to `user-service` through the `services` interface.
pub const SERVICE_SUFFIX: &str = "-service";
