//! What the WASI 0.3 `async` key-value interfaces (`spin:key-value`, `wasmcloud:keyvalue`) share:
//! the store's data as they see it, and reads that wait for the state store.
//!
//! Such a function runs beside the guest's other tasks. It notes the invocation it works for
//! when it starts (its first poll runs inside the guest's call, when that invocation is the
//! store's) and works on that one again after it waited, since another request of a shared
//! instance may have run in between.

use super::keyvalue::{Bucket, Failure, KeyValueView};
use crate::storage::StateStore;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;
use wasmtime::component::{Accessor, HasData, Resource};

/// What these interfaces need from the store's data.
pub trait StateHost: Send + 'static {
    /// Names the invocation a host call works for.
    type Invocation: Copy + Send + Sync + 'static;
    /// The invocation of the guest task calling now.
    fn invocation(&self) -> Self::Invocation;
    /// Makes `invocation` the one [`StateHost::keyvalue`] works on.
    fn resume(&mut self, invocation: Self::Invocation);
    fn keyvalue(&mut self) -> KeyValueView<'_>;
    /// The store the state lives in, to read from while the store's data is not borrowed.
    fn state_store(&self) -> Arc<dyn StateStore>;
    fn config_values(&self) -> &BTreeMap<String, String>;
}

/// The store's data as these interfaces see it.
pub struct StateAccess<'a, H>(pub &'a mut H);

/// The `HasData` marker of every interface here.
pub(super) struct HasStateAccess<H>(PhantomData<H>);
impl<H: StateHost> HasData for HasStateAccess<H> {
    type Data<'a> = StateAccess<'a, H>;
}

/// The value at `key` of `bucket` as the calling invocation sees it: read from the state store
/// (and recorded in its transaction) unless it wrote the key itself.
pub(super) async fn read<U: 'static, H: StateHost>(
    accessor: &Accessor<U, HasStateAccess<H>>,
    bucket: &Resource<Bucket>,
    key: String,
) -> Result<Option<Vec<u8>>, Failure> {
    let begun = accessor.with(|mut access| {
        let host = access.get().0;
        let (invocation, state) = (host.invocation(), host.state_store());
        let view = host.keyvalue();
        let (name, staged) = view.staged(bucket, &key)?;
        Ok::<_, Failure>((invocation, state, view.service(), name, staged))
    })?;
    let (invocation, state, service, name, staged) = begun;
    if let Some(value) = staged {
        return Ok(value);
    }
    let value = state.read_value(&service, &name, &key).await;
    accessor.with(|mut access| {
        let host = access.get().0;
        host.resume(invocation);
        host.keyvalue().seen(name, key, value)
    })
}

/// One page of the keys of `bucket` that start with `prefix`, after `after`, as the calling
/// invocation sees them, and where the next page starts (none after the last).
pub(super) async fn page<U: 'static, H: StateHost>(
    accessor: &Accessor<U, HasStateAccess<H>>,
    bucket: &Resource<Bucket>,
    prefix: &str,
    after: Option<String>,
) -> Result<(Vec<String>, Option<String>), Failure> {
    let begun = accessor.with(|mut access| {
        let host = access.get().0;
        let (invocation, state) = (host.invocation(), host.state_store());
        let view = host.keyvalue();
        let page = view.page_read(bucket, prefix, after)?;
        Ok::<_, Failure>((invocation, state, view.service(), page))
    })?;
    let (invocation, state, service, page) = begun;
    let committed = page.read(&*state, &service).await;
    accessor.with(|mut access| {
        let host = access.get().0;
        host.resume(invocation);
        host.keyvalue().page_seen(page, committed)
    })
}

/// Stages a write (`None` deletes) in the calling invocation: nothing to wait for.
pub(super) fn stage<U: 'static, H: StateHost>(
    accessor: &Accessor<U, HasStateAccess<H>>,
    bucket: &Resource<Bucket>,
    key: String,
    value: Option<Vec<u8>>,
) -> Result<(), Failure> {
    accessor.with(|mut access| access.get().0.keyvalue().stage(bucket, key, value))
}
