//! `wasmcloud:keyvalue@0.2.0` (`types`, `store`, `atomics`, `cas`, `batch`), the async
//! key-value interfaces wasmCloud 2's WASI 0.3 components import: the service's own state
//! buckets, as `wasi:keyvalue` reaches them.
//!
//! `set` with `if-not-exists` is refused (`precondition-failed`) when the key holds a value;
//! `ttl-ms` is refused (`invalid-argument`): values here do not expire. A CAS version is the
//! hex SHA-256 of the value.

use super::async_state::{self, HasStateAccess, StateAccess, StateHost};
use super::keyvalue::{Bucket, Failure};
use sha2::{Digest, Sha256};
use wasmtime::component::{Accessor, Linker, Resource};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/deps/wasmcloud-keyvalue-0.2.0",
        world: "wasmcloud:keyvalue/imports",
        imports: { default: trappable },
        with: { "wasmcloud:keyvalue/types.bucket": crate::capabilities::keyvalue::Bucket },
    });
}

use bindings::wasmcloud::keyvalue::{atomics, batch, cas, store, types};
use types::{Error, KeyResponse, SetOptions};

/// Links the five interfaces for a store whose data `f` makes a [`StateHost`] of.
pub fn add_to_linker<T: Send + 'static, H: StateHost>(
    linker: &mut Linker<T>,
    f: fn(&mut T) -> StateAccess<'_, H>,
) -> wasmtime::Result<()> {
    types::add_to_linker::<T, HasStateAccess<H>>(linker, f)?;
    store::add_to_linker::<T, HasStateAccess<H>>(linker, f)?;
    atomics::add_to_linker::<T, HasStateAccess<H>>(linker, f)?;
    cas::add_to_linker::<T, HasStateAccess<H>>(linker, f)?;
    batch::add_to_linker::<T, HasStateAccess<H>>(linker, f)?;
    Ok(())
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        match f {
            Failure::AccessDenied => Error::AccessDenied,
            Failure::Other(m) => Error::Other(m),
        }
    }
}

type Outcome<T> = wasmtime::Result<Result<T, Error>>;

/// [`async_state::read`] in this interface's error.
async fn read<U: 'static, H: StateHost>(
    accessor: &Accessor<U, HasStateAccess<H>>,
    bucket: &Resource<Bucket>,
    key: String,
) -> Result<Option<Vec<u8>>, Error> {
    Ok(async_state::read(accessor, bucket, key).await?)
}

impl<H: StateHost> types::Host for StateAccess<'_, H> {}

impl<H: StateHost> types::HostBucket for StateAccess<'_, H> {
    fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.0.keyvalue().table.delete(bucket)?;
        Ok(())
    }
}

impl<U: 'static, H: StateHost> types::HostBucketWithStore<U> for HasStateAccess<H> {
    async fn get(
        accessor: &Accessor<U, Self>,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Outcome<Option<Vec<u8>>> {
        Ok(async_state::read(accessor, &bucket, key)
            .await
            .map_err(Error::from))
    }

    async fn set(
        accessor: &Accessor<U, Self>,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
        options: Option<SetOptions>,
    ) -> Outcome<()> {
        let options = options.unwrap_or(SetOptions {
            ttl_ms: None,
            if_not_exists: false,
        });
        if options.ttl_ms.is_some() {
            return Ok(Err(Error::InvalidArgument));
        }
        if options.if_not_exists {
            match async_state::read(accessor, &bucket, key.clone()).await {
                Ok(Some(_)) => return Ok(Err(Error::PreconditionFailed)),
                Ok(None) => {}
                Err(e) => return Ok(Err(e.into())),
            }
        }
        Ok(async_state::stage(accessor, &bucket, key, Some(value)).map_err(Error::from))
    }

    async fn delete(
        accessor: &Accessor<U, Self>,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Outcome<()> {
        Ok(async_state::stage(accessor, &bucket, key, None).map_err(Error::from))
    }

    async fn exists(
        accessor: &Accessor<U, Self>,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Outcome<bool> {
        let read = async_state::read(accessor, &bucket, key).await;
        Ok(read.map(|v| v.is_some()).map_err(Error::from))
    }

    async fn list_keys(
        accessor: &Accessor<U, Self>,
        bucket: Resource<Bucket>,
        prefix: Option<String>,
        cursor: Option<String>,
    ) -> Outcome<KeyResponse> {
        let prefix = prefix.unwrap_or_default();
        let page = async_state::page(accessor, &bucket, &prefix, cursor).await;
        Ok(page
            .map(|(keys, cursor)| KeyResponse { keys, cursor })
            .map_err(Error::from))
    }
}

impl<H: StateHost> store::Host for StateAccess<'_, H> {}

impl<U: 'static, H: StateHost> store::HostWithStore<U> for HasStateAccess<H> {
    async fn open(accessor: &Accessor<U, Self>, identifier: String) -> Outcome<Resource<Bucket>> {
        Ok(accessor.with(|mut access| {
            let mut view = access.get().0.keyvalue();
            view.open(identifier).map_err(Error::from)
        }))
    }
}

impl<H: StateHost> atomics::Host for StateAccess<'_, H> {}

impl<U: 'static, H: StateHost> atomics::HostWithStore<U> for HasStateAccess<H> {
    async fn increment(
        accessor: &Accessor<U, Self>,
        bucket: Resource<Bucket>,
        key: String,
        delta: i64,
    ) -> Outcome<i64> {
        Ok(async {
            let current = read(accessor, &bucket, key.clone()).await?;
            let current = match current.map(|v| <[u8; 8]>::try_from(v.as_slice())) {
                None => 0,
                Some(Ok(bytes)) => i64::from_le_bytes(bytes),
                Some(Err(_)) => return Err(Error::Other(format!("{key} is not a counter"))),
            };
            let next = (current.checked_add(delta))
                .ok_or_else(|| Error::Other(format!("{key} would overflow")))?;
            async_state::stage(accessor, &bucket, key, Some(next.to_le_bytes().to_vec()))?;
            Ok(next)
        }
        .await)
    }
}

/// The CAS version of `value`.
fn version(value: &[u8]) -> String {
    hex::encode(Sha256::digest(value))
}

fn entry(value: Option<Vec<u8>>) -> Option<cas::Entry> {
    value.map(|value| cas::Entry {
        version: version(&value),
        value,
    })
}

impl<H: StateHost> cas::Host for StateAccess<'_, H> {}

impl<U: 'static, H: StateHost> cas::HostWithStore<U> for HasStateAccess<H> {
    async fn current(
        accessor: &Accessor<U, Self>,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Outcome<Option<cas::Entry>> {
        let read = async_state::read(accessor, &bucket, key).await;
        Ok(read.map(entry).map_err(Error::from))
    }

    async fn swap(
        accessor: &Accessor<U, Self>,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
        options: cas::CasOptions,
    ) -> Outcome<cas::CasResult> {
        Ok(async {
            let current = read(accessor, &bucket, key.clone()).await?;
            let version_holds = (options.require_version)
                .is_none_or(|v| current.as_deref().map(version) == Some(v));
            let value_holds = (options.require_value).is_none_or(|v| current.as_ref() == Some(&v));
            if !(version_holds && value_holds) {
                return Ok(cas::CasResult::Stale(entry(current)));
            }
            async_state::stage(accessor, &bucket, key, Some(value))?;
            Ok(cas::CasResult::Swapped)
        }
        .await)
    }
}

impl<H: StateHost> batch::Host for StateAccess<'_, H> {}

impl<U: 'static, H: StateHost> batch::HostWithStore<U> for HasStateAccess<H> {
    async fn get_many(
        accessor: &Accessor<U, Self>,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Outcome<Vec<Option<(String, Vec<u8>)>>> {
        let mut found = Vec::with_capacity(keys.len());
        for key in keys {
            match async_state::read(accessor, &bucket, key.clone()).await {
                Ok(value) => found.push(value.map(|v| (key, v))),
                Err(e) => return Ok(Err(e.into())),
            }
        }
        Ok(Ok(found))
    }

    async fn set_many(
        accessor: &Accessor<U, Self>,
        bucket: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> Outcome<()> {
        for (key, value) in key_values {
            if let Err(e) = async_state::stage(accessor, &bucket, key, Some(value)) {
                return Ok(Err(e.into()));
            }
        }
        Ok(Ok(()))
    }

    async fn delete_many(
        accessor: &Accessor<U, Self>,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Outcome<()> {
        for key in keys {
            if let Err(e) = async_state::stage(accessor, &bucket, key, None) {
                return Ok(Err(e.into()));
            }
        }
        Ok(Ok(()))
    }
}
