//! The `wasi:keyvalue` interfaces of both versions over [`KeyValueView`]: their bindings, and
//! the trait implementations, which differ only in the shapes of cursors, counters and `get-many`.

use super::{Bucket, Cas, Failure, KeyValueView};
use crate::capabilities::bindings::microsvc::platform::state::Host as _;
use wasmtime::component::{HasData, Linker, Resource};

mod draft2 {
    wasmtime::component::bindgen!({
        path: "../wit/deps/wasi-keyvalue-0.2.0-draft2",
        world: "wasi:keyvalue/imports",
        imports: { default: async },
        with: {
            "wasi:keyvalue/store.bucket": super::super::Bucket,
            "wasi:keyvalue/atomics.cas": super::super::Cas,
        },
    });
}

mod draft {
    wasmtime::component::bindgen!({
        path: "../wit/deps/wasi-keyvalue-0.2.0-draft",
        world: "wasi:keyvalue/imports",
        imports: { default: async },
        with: { "wasi:keyvalue/store.bucket": super::super::Bucket },
    });
}

/// An open bucket: the name of a state bucket the service may use.
struct HasKeyValue;
impl HasData for HasKeyValue {
    type Data<'a> = KeyValueView<'a>;
}

/// Links both versions' `store`, `atomics` and `batch`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    f: fn(&mut T) -> KeyValueView<'_>,
) -> wasmtime::Result<()> {
    draft2::wasi::keyvalue::store::add_to_linker::<T, HasKeyValue>(linker, f)?;
    draft2::wasi::keyvalue::atomics::add_to_linker::<T, HasKeyValue>(linker, f)?;
    draft2::wasi::keyvalue::batch::add_to_linker::<T, HasKeyValue>(linker, f)?;
    draft::wasi::keyvalue::store::add_to_linker::<T, HasKeyValue>(linker, f)?;
    draft::wasi::keyvalue::atomics::add_to_linker::<T, HasKeyValue>(linker, f)?;
    draft::wasi::keyvalue::batch::add_to_linker::<T, HasKeyValue>(linker, f)?;
    Ok(())
}

/// Why an operation failed, in the words every key-value interface shares.
macro_rules! error_of {
    ($version:ident) => {
        impl From<Failure> for $version::wasi::keyvalue::store::Error {
            fn from(f: Failure) -> Self {
                match f {
                    Failure::AccessDenied => Self::AccessDenied,
                    Failure::Other(m) => Self::Other(m),
                }
            }
        }
    };
}
error_of!(draft2);
error_of!(draft);

/// The trait implementations of one version's `store` and `batch`, which differ only in the
/// shapes of a listing and of `get-many`.
macro_rules! store_and_batch {
    ($version:ident, $cursor:ty, $list:path, $many:ty, $found:expr) => {
        impl $version::wasi::keyvalue::store::Host for KeyValueView<'_> {
            async fn open(
                &mut self,
                identifier: String,
            ) -> Result<Resource<Bucket>, $version::wasi::keyvalue::store::Error> {
                Ok(KeyValueView::open(self, identifier)?)
            }
        }

        impl $version::wasi::keyvalue::store::HostBucket for KeyValueView<'_> {
            async fn get(
                &mut self,
                bucket: Resource<Bucket>,
                key: String,
            ) -> Result<Option<Vec<u8>>, $version::wasi::keyvalue::store::Error> {
                Ok(KeyValueView::get(self, &bucket, key).await?)
            }

            async fn set(
                &mut self,
                bucket: Resource<Bucket>,
                key: String,
                value: Vec<u8>,
            ) -> Result<(), $version::wasi::keyvalue::store::Error> {
                Ok(KeyValueView::set(self, &bucket, key, value).await?)
            }

            async fn delete(
                &mut self,
                bucket: Resource<Bucket>,
                key: String,
            ) -> Result<(), $version::wasi::keyvalue::store::Error> {
                Ok(KeyValueView::delete(self, &bucket, key).await?)
            }

            async fn exists(
                &mut self,
                bucket: Resource<Bucket>,
                key: String,
            ) -> Result<bool, $version::wasi::keyvalue::store::Error> {
                Ok(KeyValueView::get(self, &bucket, key).await?.is_some())
            }

            async fn list_keys(
                &mut self,
                bucket: Resource<Bucket>,
                cursor: Option<$cursor>,
            ) -> Result<
                $version::wasi::keyvalue::store::KeyResponse,
                $version::wasi::keyvalue::store::Error,
            > {
                let (keys, cursor) = $list(self, &bucket, cursor).await?;
                Ok($version::wasi::keyvalue::store::KeyResponse { keys, cursor })
            }

            async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
                self.table.delete(bucket)?;
                Ok(())
            }
        }

        impl $version::wasi::keyvalue::batch::Host for KeyValueView<'_> {
            async fn get_many(
                &mut self,
                bucket: Resource<Bucket>,
                keys: Vec<String>,
            ) -> Result<Vec<$many>, $version::wasi::keyvalue::store::Error> {
                let found = KeyValueView::get_many(self, &bucket, keys).await?;
                Ok(found.into_iter().map($found).collect())
            }

            async fn set_many(
                &mut self,
                bucket: Resource<Bucket>,
                key_values: Vec<(String, Vec<u8>)>,
            ) -> Result<(), $version::wasi::keyvalue::store::Error> {
                Ok(KeyValueView::set_many(self, &bucket, key_values).await?)
            }

            async fn delete_many(
                &mut self,
                bucket: Resource<Bucket>,
                keys: Vec<String>,
            ) -> Result<(), $version::wasi::keyvalue::store::Error> {
                Ok(KeyValueView::delete_many(self, &bucket, keys).await?)
            }
        }
    };
}

mod draft2_impl {
    use super::*;

    /// draft2 (Spin): the cursor is the last key listed.
    async fn after_key(
        view: &mut KeyValueView<'_>,
        bucket: &Resource<Bucket>,
        cursor: Option<String>,
    ) -> Result<(Vec<String>, Option<String>), Failure> {
        view.page(bucket, cursor).await
    }

    // Spin's `get-many` answers every key asked, found or not.
    store_and_batch!(
        draft2,
        String,
        after_key,
        (String, Option<Vec<u8>>),
        |found| found
    );
}

mod draft_impl {
    use super::*;

    /// draft (wasmCloud): the cursor is a number, the count of keys listed before; the page
    /// after it is found by listing past them again, so a long listing costs more per page.
    async fn at_offset(
        view: &mut KeyValueView<'_>,
        bucket: &Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), Failure> {
        let offset = cursor.unwrap_or(0);
        // Keys on the pages passed over, and where the next page starts.
        let (mut before, mut after) = (0u64, None);
        loop {
            let (keys, next) = view.page(bucket, after).await?;
            let n = keys.len() as u64;
            if before + n > offset || next.is_none() {
                let start = usize::try_from(offset.saturating_sub(before)).unwrap_or(usize::MAX);
                let start = start.min(keys.len());
                let cursor = next.is_some().then_some(before + n);
                return Ok((keys[start..].to_vec(), cursor));
            }
            before += n;
            after = next;
        }
    }

    // draft's `get-many` answers `none` for a key not found.
    store_and_batch!(
        draft,
        u64,
        at_offset,
        Option<(String, Vec<u8>)>,
        |(key, value): (String, Option<Vec<u8>>)| value.map(|v| (key, v))
    );
}

impl draft2::wasi::keyvalue::atomics::Host for KeyValueView<'_> {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: i64,
    ) -> Result<i64, draft2::wasi::keyvalue::store::Error> {
        Ok(KeyValueView::increment(self, &bucket, key, delta).await?)
    }

    async fn swap(
        &mut self,
        cas: Resource<Cas>,
        value: Vec<u8>,
    ) -> Result<(), draft2::wasi::keyvalue::atomics::CasError> {
        use draft2::wasi::keyvalue::atomics::CasError;
        let store_error = |f: Failure| CasError::StoreError(f.into());
        let Cas { bucket, key, seen } =
            self.table.delete(cas).map_err(|e| store_error(e.into()))?;
        let now = (self.state.get(bucket.clone(), key.clone()).await)
            .map_err(|e| store_error(e.into()))?;
        if now != seen {
            let cas = Cas { bucket, key, seen };
            let cas = self.table.push(cas).map_err(|e| store_error(e.into()))?;
            return Err(CasError::CasFailed(cas));
        }
        (self.state.set(bucket, key, value).await).map_err(|e| store_error(e.into()))
    }
}

impl draft2::wasi::keyvalue::atomics::HostCas for KeyValueView<'_> {
    async fn new(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Result<Resource<Cas>, draft2::wasi::keyvalue::store::Error> {
        let seen = KeyValueView::get(self, &bucket, key.clone()).await?;
        let bucket = self.name(&bucket)?;
        let cas = self
            .table
            .push(Cas { bucket, key, seen })
            .map_err(Failure::from)?;
        Ok(cas)
    }

    async fn current(
        &mut self,
        cas: Resource<Cas>,
    ) -> Result<Option<Vec<u8>>, draft2::wasi::keyvalue::store::Error> {
        Ok(self.table.get(&cas).map_err(Failure::from)?.seen.clone())
    }

    async fn drop(&mut self, cas: Resource<Cas>) -> wasmtime::Result<()> {
        self.table.delete(cas)?;
        Ok(())
    }
}

impl draft::wasi::keyvalue::atomics::Host for KeyValueView<'_> {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<u64, draft::wasi::keyvalue::store::Error> {
        let delta = i64::try_from(delta).map_err(|_| {
            Failure::Other(format!(
                "an increment of {delta} is over the s64 a counter holds"
            ))
        })?;
        let n = KeyValueView::increment(self, &bucket, key, delta).await?;
        Ok(u64::try_from(n).map_err(|_| Failure::Other(format!("the counter is {n}, below 0")))?)
    }
}
