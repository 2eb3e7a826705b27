//! JSON records in host state (`microsvc:platform/state`).
//!
//! Failures here are never the client's fault, so they convert into 5xx responses (503 when
//! the host's store is unavailable: worth a retry); the host then rolls back whatever the
//! invocation already wrote.

use std::fmt;

use serde::{de::DeserializeOwned, Serialize};

use crate::{state, Response};

/// Bucket holding the id counters.
pub const META_BUCKET: &str = "meta";

/// The host rejects longer bucket and key names.
pub const MAX_KEY_BYTES: usize = crate::contract::MAX_NAME;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

/// A [`StoreError`] the host's store caused (unreachable, failing): the request may succeed
/// if retried, so it answers 503.
const UNAVAILABLE: &str = "state store unavailable: ";

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

impl From<StoreError> for Response {
    fn from(e: StoreError) -> Self {
        if e.0.starts_with(UNAVAILABLE) {
            Response::error(503, e.0)
        } else {
            Response::internal(e.0)
        }
    }
}

/// The error of state operation `op` on `what` (`bucket/key`, or a bucket).
pub(crate) fn failed(op: &str, what: &str, e: state::Error) -> StoreError {
    match e {
        state::Error::Storage(why) => StoreError(format!("{UNAVAILABLE}{op} {what}: {why}")),
        e => StoreError(format!("state {op} {what} failed: {e:?}")),
    }
}

/// Key for record `id`: zero-padded to the width of `u64::MAX` so that `list-keys` (byte order)
/// returns records in id order.
pub fn record_key(id: u64) -> String {
    format!("{id:020}")
}

/// `prefix` + `value` as a key, kept within [`MAX_KEY_BYTES`]. Values that would not fit are
/// cut at a character boundary and suffixed with `#` and a 64-bit FNV-1a hash of the whole
/// value, so that valid-but-long input (e.g. a 254-character email) never turns into a host
/// `invalid-name` error.
pub fn bounded_key(prefix: &str, value: &str) -> String {
    let key = format!("{prefix}{value}");
    if key.len() <= MAX_KEY_BYTES {
        return key;
    }
    let suffix = format!("#{:016x}", fnv1a64(value.as_bytes()));
    let mut cut = MAX_KEY_BYTES - suffix.len();
    while !key.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &key[..cut])
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub fn get_raw(bucket: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    state::get(bucket, key).map_err(|e| failed("get", &format!("{bucket}/{key}"), e))
}

pub fn set_raw(bucket: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
    state::set(bucket, key, value).map_err(|e| failed("set", &format!("{bucket}/{key}"), e))
}

pub fn get_json<T: DeserializeOwned>(bucket: &str, key: &str) -> Result<Option<T>, StoreError> {
    match get_raw(bucket, key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError(format!("stored record {bucket}/{key} is corrupt: {e}"))),
    }
}

pub fn put_json<T: Serialize + ?Sized>(
    bucket: &str,
    key: &str,
    value: &T,
) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| StoreError(format!("could not serialize {bucket}/{key}: {e}")))?;
    set_raw(bucket, key, &bytes)
}

/// Next id (1, 2, ...) of the sequence `key` in [`META_BUCKET`]. Concurrent requests get
/// distinct ids without conflicting; a request that fails after taking one leaves a gap, so
/// call it only once the request is known to succeed.
pub fn next_id(key: &str) -> Result<u64, StoreError> {
    state::next_id(META_BUCKET, key)
        .map_err(|e| failed("next-id", &format!("{META_BUCKET}/{key}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_sort_numerically() {
        let mut keys = [10, 9, 100, 1].map(record_key);
        keys.sort();
        assert_eq!(keys, [1, 9, 10, 100].map(record_key));
        assert_eq!(record_key(u64::MAX).len(), 20);
    }

    #[test]
    fn bounded_keys_fit_and_stay_distinct() {
        assert_eq!(bounded_key("email:", "a@b.co"), "email:a@b.co");
        let fits = "a".repeat(MAX_KEY_BYTES - 6);
        assert_eq!(bounded_key("email:", &fits), format!("email:{fits}"));

        let long_a = format!("{}@example.com", "a".repeat(242));
        let long_b = format!("{}@example.org", "a".repeat(242));
        let (ka, kb) = (
            bounded_key("email:", &long_a),
            bounded_key("email:", &long_b),
        );
        assert!(ka.len() <= MAX_KEY_BYTES && kb.len() <= MAX_KEY_BYTES);
        assert!(ka.starts_with("email:aaaa"));
        assert_ne!(ka, kb);
        assert_eq!(ka, bounded_key("email:", &long_a));

        let multibyte = "é".repeat(254);
        let k = bounded_key("email:", &multibyte);
        assert!(k.len() <= MAX_KEY_BYTES);
    }
}
