//! `spin:key-value/key-value@3.0.0` and `spin:variables/variables@3.0.0`, the async interfaces
//! spin-sdk 7 components import: the service's own state buckets (as `wasi:keyvalue`) and its
//! manifest `config` (as `wasi:config`).
//!
//! Their functions are WASI 0.3 `async` ones: see `async_state` for how each keeps to its own
//! invocation.

use super::async_state::{self, HasStateAccess, StateAccess, StateHost};
use super::keyvalue::{Bucket, Failure};
use wasmtime::component::{Accessor, FutureReader, Linker, Resource, StreamReader};

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

/// Links both interfaces for a store whose data `f` makes a [`StateHost`] of.
pub fn add_to_linker<T: Send + 'static, H: StateHost>(
    linker: &mut Linker<T>,
    f: fn(&mut T) -> StateAccess<'_, H>,
) -> wasmtime::Result<()> {
    kv::add_to_linker::<T, HasStateAccess<H>>(linker, f)?;
    variables::add_to_linker::<T, HasStateAccess<H>>(linker, f)?;
    Ok(())
}

impl From<Failure> for KvError {
    fn from(f: Failure) -> KvError {
        match f {
            Failure::AccessDenied => KvError::AccessDenied,
            Failure::Other(m) => KvError::Other(m),
        }
    }
}

/// Every key of `store` as the calling invocation sees them, page by page.
async fn all_keys<U: 'static, H: StateHost>(
    accessor: &Accessor<U, HasStateAccess<H>>,
    store: &Resource<Bucket>,
) -> Result<Vec<String>, Failure> {
    let (mut keys, mut after) = (Vec::new(), None);
    loop {
        let (found, next) = async_state::page(accessor, store, "", after).await?;
        keys.extend(found);
        match next {
            Some(next) => after = Some(next),
            None => return Ok(keys),
        }
    }
}

impl<H: StateHost> kv::Host for StateAccess<'_, H> {}

impl<H: StateHost> kv::HostStore for StateAccess<'_, H> {
    fn drop(&mut self, store: Resource<Bucket>) -> wasmtime::Result<()> {
        self.0.keyvalue().table.delete(store)?;
        Ok(())
    }
}

impl<U: 'static, H: StateHost> kv::HostStoreWithStore<U> for HasStateAccess<H> {
    async fn open(
        accessor: &Accessor<U, Self>,
        label: String,
    ) -> wasmtime::Result<Result<Resource<Bucket>, KvError>> {
        Ok(accessor.with(|mut access| {
            let mut view = access.get().0.keyvalue();
            view.open(label).map_err(KvError::from)
        }))
    }

    async fn get(
        accessor: &Accessor<U, Self>,
        store: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, KvError>> {
        Ok(async_state::read(accessor, &store, key)
            .await
            .map_err(KvError::from))
    }

    async fn set(
        accessor: &Accessor<U, Self>,
        store: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), KvError>> {
        Ok(async_state::stage(accessor, &store, key, Some(value)).map_err(KvError::from))
    }

    async fn delete(
        accessor: &Accessor<U, Self>,
        store: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<(), KvError>> {
        Ok(async_state::stage(accessor, &store, key, None).map_err(KvError::from))
    }

    async fn exists(
        accessor: &Accessor<U, Self>,
        store: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<bool, KvError>> {
        let read = async_state::read(accessor, &store, key).await;
        Ok(read.map(|v| v.is_some()).map_err(KvError::from))
    }

    async fn get_keys(
        accessor: &Accessor<U, Self>,
        store: Resource<Bucket>,
    ) -> wasmtime::Result<(StreamReader<String>, FutureReader<Result<(), KvError>>)> {
        let keys = all_keys(accessor, &store).await.map_err(KvError::from);
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

impl<H: StateHost> variables::Host for StateAccess<'_, H> {}

impl<U: 'static, H: StateHost> variables::HostWithStore<U> for HasStateAccess<H> {
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
