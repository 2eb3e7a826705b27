//! `wasi:config/store` at `0.2.0-draft-2024-09-27` (Spin) and `0.2.0-rc.1` (wasmCloud): the
//! values the manifest's `config` table gives the service.
//!
//! A value given as `{ env = "NAME" }` was read from the host's environment with the manifest;
//! a manifest change applies to the invocations that start after it.

use std::collections::BTreeMap;
use wasmtime::component::{HasData, Linker};

mod spin {
    wasmtime::component::bindgen!({
        path: "../wit/deps/wasi-config-0.2.0-draft-2024-09-27",
        world: "wasi:config/imports",
    });
}

mod wasmcloud {
    wasmtime::component::bindgen!({
        path: "../wit/deps/wasi-config-0.2.0-rc.1",
        world: "wasi:config/imports",
    });
}

/// The calling service's configuration.
pub struct ConfigView<'a> {
    pub values: &'a BTreeMap<String, String>,
}

struct HasConfig;
impl HasData for HasConfig {
    type Data<'a> = ConfigView<'a>;
}

/// Links both versions' `store`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    f: fn(&mut T) -> ConfigView<'_>,
) -> wasmtime::Result<()> {
    spin::wasi::config::store::add_to_linker::<T, HasConfig>(linker, f)?;
    wasmcloud::wasi::config::store::add_to_linker::<T, HasConfig>(linker, f)?;
    Ok(())
}

macro_rules! store {
    ($version:ident) => {
        impl $version::wasi::config::store::Host for ConfigView<'_> {
            fn get(
                &mut self,
                key: String,
            ) -> Result<Option<String>, $version::wasi::config::store::Error> {
                Ok(self.values.get(&key).cloned())
            }

            fn get_all(
                &mut self,
            ) -> Result<Vec<(String, String)>, $version::wasi::config::store::Error> {
                Ok(self.values.clone().into_iter().collect())
            }
        }
    };
}
store!(spin);
store!(wasmcloud);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_versions_answer_the_services_values() {
        let values = BTreeMap::from([("greeting".to_string(), "hej".to_string())]);
        let mut view = ConfigView { values: &values };
        let spin = spin::wasi::config::store::Host::get(&mut view, "greeting".into());
        assert_eq!(spin.ok().flatten().as_deref(), Some("hej"));
        let missing = wasmcloud::wasi::config::store::Host::get(&mut view, "nope".into());
        assert!(matches!(missing, Ok(None)));
        let all = wasmcloud::wasi::config::store::Host::get_all(&mut view);
        assert_eq!(all.ok(), Some(vec![("greeting".into(), "hej".into())]));
    }
}
