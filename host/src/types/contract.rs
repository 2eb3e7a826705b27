//! Numbers `wit/platform.wit` promises to components; the sdk names the same in `sdk::contract`.

/// Largest request or response body, state value and message payload: 1 MiB.
pub const MAX_BODY: usize = 1 << 20;

/// Longest bucket or key name, in bytes.
pub const MAX_NAME: usize = 256;

/// Services address each other as `<name>-service` (in URLs: `http://user-service/users`).
pub const SERVICE_SUFFIX: &str = "-service";
