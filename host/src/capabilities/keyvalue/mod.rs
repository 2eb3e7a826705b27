//! `wasi:keyvalue` `store`, `atomics` and `batch`, at `0.2.0-draft2` (Spin) and `0.2.0-draft`
//! (wasmCloud): buckets of the calling service's own transactional state.
//!
//! A bucket is the `microsvc:platform/state` bucket of the same name, read and written in the
//! invocation's transaction: what a component writes commits with its invocation or not at all,
//! and a value read stays what it was until the commit (a concurrent writer makes the commit
//! conflict, and the invocation runs again). A service opens only the buckets the manifest lists
//! (`key_value_stores`); any other is `access-denied`. Counters are stored as 8 bytes, a
//! little-endian `s64`, as `state.increment` and Spin's own store keep them.

mod versions;

pub use versions::add_to_linker;

use super::bindings::microsvc::platform::state::{Error as StateError, Host as _};
use super::state::{check_name, storage, StateView};
use crate::storage::{PageRead, MAX_PAGE};
use std::sync::Arc;
use wasmtime::component::{Resource, ResourceTable};

pub struct Bucket {
    pub(super) name: String,
}

/// A compare-and-swap handle: the value `key` had when it was made.
pub struct Cas {
    bucket: String,
    key: String,
    seen: Option<Vec<u8>>,
}

/// What an invocation wrote at a key itself, if it did (`Some(None)`: deleted).
type Staged = Option<Option<Vec<u8>>>;

/// What `wasi:keyvalue` works on: the invocation's state, the store's resources and the
/// buckets the manifest allows.
pub struct KeyValueView<'a> {
    pub state: StateView<'a>,
    pub table: &'a mut ResourceTable,
    pub stores: &'a [String],
}

#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    #[error("access denied")]
    AccessDenied,
    #[error("{0}")]
    Other(String),
}

impl From<StateError> for Failure {
    fn from(e: StateError) -> Failure {
        Failure::Other(match e {
            StateError::InvalidName(m) | StateError::NotACounter(m) | StateError::Storage(m) => m,
            StateError::ValueTooLarge(n) => format!("a value of {n} bytes is over 1 MiB"),
        })
    }
}

impl From<wasmtime::component::ResourceTableError> for Failure {
    fn from(e: wasmtime::component::ResourceTableError) -> Failure {
        Failure::Other(e.to_string())
    }
}

impl KeyValueView<'_> {
    pub(super) fn open(&mut self, name: String) -> Result<Resource<Bucket>, Failure> {
        if !self.stores.contains(&name) {
            tracing::warn!(bucket = %name, "wasi:keyvalue store not in the manifest's key_value_stores refused");
            return Err(Failure::AccessDenied);
        }
        Ok(self.table.push(Bucket { name })?)
    }

    fn name(&self, bucket: &Resource<Bucket>) -> Result<String, Failure> {
        Ok(self.table.get(bucket)?.name.clone())
    }

    /// The service whose state this is.
    pub(super) fn service(&self) -> Arc<str> {
        self.state.txn.service()
    }

    /// Stages a write of `key` (`None` deletes), as `state.set` does.
    pub(super) fn stage(
        &mut self,
        bucket: &Resource<Bucket>,
        key: String,
        value: Option<Vec<u8>>,
    ) -> Result<(), Failure> {
        let name = self.name(bucket)?;
        Ok(self.state.put(name, key, value)?)
    }

    /// The bucket's name, and what this invocation wrote at `key` itself, if it did: the first
    /// half of a read made without the store's data at hand (see [`KeyValueView::seen`]).
    pub(super) fn staged(
        &self,
        bucket: &Resource<Bucket>,
        key: &str,
    ) -> Result<(String, Staged), Failure> {
        let name = self.name(bucket)?;
        check_name("bucket", &name)?;
        check_name("key", key)?;
        let staged = self.state.txn.staged(&name, key);
        Ok((name, staged))
    }

    /// The second half: what the state store answered for `bucket/key`, recorded.
    pub(super) fn seen(
        &mut self,
        bucket: String,
        key: String,
        value: anyhow::Result<Option<Vec<u8>>>,
    ) -> Result<Option<Vec<u8>>, Failure> {
        let txn = &mut *self.state.txn;
        let seen = value.and_then(|value| txn.seen(&bucket, &key, value));
        seen.map_err(|e| storage(txn, e).into())
    }

    /// What to read for the page of the bucket's keys that start with `prefix`, after `after`.
    pub(super) fn page_read(
        &self,
        bucket: &Resource<Bucket>,
        prefix: &str,
        after: Option<String>,
    ) -> Result<PageRead, Failure> {
        let name = self.name(bucket)?;
        check_name("bucket", &name)?;
        let txn = &self.state.txn;
        Ok(txn.page_read(&name, prefix, after.as_deref(), MAX_PAGE))
    }

    /// The page, given what the store answered, and where the next starts (none after the
    /// last).
    pub(super) fn page_seen(
        &mut self,
        page: PageRead,
        committed: anyhow::Result<Vec<String>>,
    ) -> Result<(Vec<String>, Option<String>), Failure> {
        let txn = &mut *self.state.txn;
        let keys = committed.and_then(|committed| txn.page_seen(page, committed));
        let keys = keys.map_err(|e| Failure::from(storage(txn, e)))?;
        let next = (keys.len() == MAX_PAGE)
            .then(|| keys.last().cloned())
            .flatten();
        Ok((keys, next))
    }

    async fn get(
        &mut self,
        bucket: &Resource<Bucket>,
        key: String,
    ) -> Result<Option<Vec<u8>>, Failure> {
        let name = self.name(bucket)?;
        Ok(self.state.get(name, key).await?)
    }

    async fn set(
        &mut self,
        bucket: &Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), Failure> {
        let name = self.name(bucket)?;
        Ok(self.state.set(name, key, value).await?)
    }

    async fn delete(&mut self, bucket: &Resource<Bucket>, key: String) -> Result<(), Failure> {
        let name = self.name(bucket)?;
        Ok(self.state.delete(name, key).await?)
    }

    /// One page of the bucket's keys after `after`, in byte order, and the cursor of the next
    /// (none after the last page).
    async fn page(
        &mut self,
        bucket: &Resource<Bucket>,
        after: Option<String>,
    ) -> Result<(Vec<String>, Option<String>), Failure> {
        let name = self.name(bucket)?;
        let limit = MAX_PAGE as u32;
        let keys = self
            .state
            .list_keys_after(name, String::new(), after, limit)
            .await?;
        let next = (keys.len() == MAX_PAGE)
            .then(|| keys.last().cloned())
            .flatten();
        Ok((keys, next))
    }

    async fn increment(
        &mut self,
        bucket: &Resource<Bucket>,
        key: String,
        delta: i64,
    ) -> Result<i64, Failure> {
        let name = self.name(bucket)?;
        Ok(self.state.increment(name, key, delta).await?)
    }

    async fn get_many(
        &mut self,
        bucket: &Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<(String, Option<Vec<u8>>)>, Failure> {
        let mut found = Vec::with_capacity(keys.len().min(MAX_PAGE));
        for key in keys {
            let value = self.get(bucket, key.clone()).await?;
            found.push((key, value));
        }
        Ok(found)
    }

    async fn set_many(
        &mut self,
        bucket: &Resource<Bucket>,
        pairs: Vec<(String, Vec<u8>)>,
    ) -> Result<(), Failure> {
        for (key, value) in pairs {
            self.set(bucket, key, value).await?;
        }
        Ok(())
    }

    async fn delete_many(
        &mut self,
        bucket: &Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), Failure> {
        for key in keys {
            self.delete(bucket, key).await?;
        }
        Ok(())
    }
}
