//! `spin:key-value/key-value@3.0.0` and `spin:variables/variables@3.0.0`, the async interfaces
//! spin-sdk 7 components import: the service's own state buckets (as `wasi:keyvalue`) and its
//! manifest `config` (as `wasi:config`).
//!
//! Their functions are WASI 0.3 `async` ones, which the host runs beside the guest's other
//! tasks: each call notes the invocation it works for when it starts and works on that one
//! again after it waited (for PostgreSQL), since another request of a shared instance may have
//! run in between.

use super::keyvalue::{Bucket, KeyValueView};
use crate::storage::StateStore;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;
use wasmtime::component::{Accessor, FutureReader, HasData, Linker, Resource, StreamReader};

mod bindings {
    wasmtime::component::bindgen!({
        inline: "
            package microsvc:spin-imports;
            world imports {
                import spin:key-value/key-value@3.0.0;
                import spin:variables/variables@3.0.0;
            }
        ",
        path: [
            "../wit/deps/spin-key-value-3.0.0",
            "../wit/deps/spin-variables-3.0.0",
        ],
        imports: { default: trappable },
        with: { "spin:key-value/key-value.store": crate::capabilities::keyvalue::Bucket },
    });
}

use bindings::spin::key_value::key_value::{self as kv, Error as KvError};
use bindings::spin::variables::variables::{self, Error as VarError};

/// What these interfaces need from the store's data.
pub trait SpinHost: Send + 'static {
    /// Names the invocation a host call works for.
    type Invocation: Copy + Send + Sync + 'static;
    /// The invocation of the guest task calling now.
    fn invocation(&self) -> Self::Invocation;
    /// Makes `invocation` the one [`SpinHost::keyvalue`] works on.
    fn resume(&mut self, invocation: Self::Invocation);
    fn keyvalue(&mut self) -> KeyValueView<'_>;
    /// The store the state lives in, to read from while the store's data is not borrowed.
    fn state_store(&self) -> Arc<dyn StateStore>;
    fn config_values(&self) -> &BTreeMap<String, String>;
}

/// The store's data as these interfaces see it.
pub struct SpinView<'a, H>(pub &'a mut H);

struct HasSpin<H>(PhantomData<H>);
impl<H: SpinHost> HasData for HasSpin<H> {
    type Data<'a> = SpinView<'a, H>;
}

/// Links both interfaces for a store whose data `f` makes a [`SpinHost`] of.
pub fn add_to_linker<T: Send + 'static, H: SpinHost>(
    linker: &mut Linker<T>,
    f: fn(&mut T) -> SpinView<'_, H>,
) -> wasmtime::Result<()> {
    kv::add_to_linker::<T, HasSpin<H>>(linker, f)?;
    variables::add_to_linker::<T, HasSpin<H>>(linker, f)?;
    Ok(())
}

fn other(e: impl std::fmt::Display) -> KvError {
    KvError::Other(e.to_string())
}

impl<H: SpinHost> kv::Host for SpinView<'_, H> {}

impl<H: SpinHost> kv::HostStore for SpinView<'_, H> {
    fn drop(&mut self, store: Resource<Bucket>) -> wasmtime::Result<()> {
        self.0.keyvalue().table.delete(store)?;
        Ok(())
    }
}

impl<U: 'static, H: SpinHost> kv::HostStoreWithStore<U> for HasSpin<H> {
    async fn open(
        accessor: &Accessor<U, Self>,
        label: String,
    ) -> wasmtime::Result<Result<Resource<Bucket>, KvError>> {
        Ok(accessor.with(|mut access| {
            let mut view = access.get().0.keyvalue();
            view.open(label).map_err(|f| match f.denied() {
                true => KvError::AccessDenied,
                false => other(f),
            })
        }))
    }

    async fn get(
        accessor: &Accessor<U, Self>,
        store: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, KvError>> {
        Ok(read(accessor, &store, key).await)
    }

    async fn set(
        accessor: &Accessor<U, Self>,
        store: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), KvError>> {
        Ok(accessor.with(|mut access| {
            let mut view = access.get().0.keyvalue();
            view.stage(&store, key, Some(value)).map_err(other)
        }))
    }

    async fn delete(
        accessor: &Accessor<U, Self>,
        store: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<(), KvError>> {
        Ok(accessor.with(|mut access| {
            let mut view = access.get().0.keyvalue();
            view.stage(&store, key, None).map_err(other)
        }))
    }

    async fn exists(
        accessor: &Accessor<U, Self>,
        store: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<bool, KvError>> {
        Ok(read(accessor, &store, key).await.map(|v| v.is_some()))
    }

    async fn get_keys(
        accessor: &Accessor<U, Self>,
        store: Resource<Bucket>,
    ) -> wasmtime::Result<(StreamReader<String>, FutureReader<Result<(), KvError>>)> {
        let keys = all_keys(accessor, &store).await;
        accessor.with(|mut access| {
            let (keys, outcome) = match keys {
                Ok(keys) => (keys, Ok(())),
                Err(e) => (Vec::new(), Err(e)),
            };
            let stream = StreamReader::new(&mut access, keys)?;
            let future =
                FutureReader::new(
                    &mut access,
                    async move { Ok::<_, wasmtime::Error>(outcome) },
                )?;
            Ok((stream, future))
        })
    }
}

/// The value at `key` of `store` as the calling invocation sees it, read from the state store
/// (recorded in its transaction) unless it wrote the key itself.
async fn read<U: 'static, H: SpinHost>(
    accessor: &Accessor<U, HasSpin<H>>,
    store: &Resource<Bucket>,
    key: String,
) -> Result<Option<Vec<u8>>, KvError> {
    let begun = accessor.with(|mut access| {
        let host = access.get().0;
        let (invocation, state) = (host.invocation(), host.state_store());
        let view = host.keyvalue();
        let (bucket, staged) = view.staged(store, &key).map_err(other)?;
        Ok::<_, KvError>((invocation, state, view.service(), bucket, staged))
    })?;
    let (invocation, state, service, bucket, staged) = begun;
    if let Some(value) = staged {
        return Ok(value);
    }
    let value = state.read_value(&service, &bucket, &key).await;
    accessor.with(|mut access| {
        let host = access.get().0;
        host.resume(invocation);
        host.keyvalue().seen(bucket, key, value).map_err(other)
    })
}

/// Every key of `store` as the calling invocation sees them, page by page.
async fn all_keys<U: 'static, H: SpinHost>(
    accessor: &Accessor<U, HasSpin<H>>,
    store: &Resource<Bucket>,
) -> Result<Vec<String>, KvError> {
    let (mut keys, mut after) = (Vec::new(), None);
    loop {
        let begun = accessor.with(|mut access| {
            let host = access.get().0;
            let (invocation, state) = (host.invocation(), host.state_store());
            let view = host.keyvalue();
            let page = view.page_read(store, after.clone()).map_err(other)?;
            Ok::<_, KvError>((invocation, state, view.service(), page))
        })?;
        let (invocation, state, service, page) = begun;
        let committed = page.read(&*state, &service).await;
        let (found, next) = accessor.with(|mut access| {
            let host = access.get().0;
            host.resume(invocation);
            host.keyvalue().page_seen(page, committed).map_err(other)
        })?;
        keys.extend(found);
        match next {
            Some(next) => after = Some(next),
            None => return Ok(keys),
        }
    }
}

impl<H: SpinHost> variables::Host for SpinView<'_, H> {}

impl<U: 'static, H: SpinHost> variables::HostWithStore<U> for HasSpin<H> {
    async fn get(
        accessor: &Accessor<U, Self>,
        name: String,
    ) -> wasmtime::Result<Result<String, VarError>> {
        // Spin's rule for variable names.
        let valid = !name.is_empty()
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Ok(Err(VarError::InvalidName(format!(
                "{name:?}: use a-z, 0-9 and _, starting with a letter"
            ))));
        }
        Ok(accessor.with(|mut access| {
            let values = access.get().0.config_values();
            values
                .get(&name)
                .cloned()
                .ok_or_else(|| VarError::Undefined(format!("no config value {name:?}")))
        }))
    }
}
