//! Host-side bindings for the `microsvc:platform` WIT package (`wit/platform.wit`).

wasmtime::component::bindgen!({
    world: "subscriber",
    path: "../wit",
    exports: { default: async },
});

pub use exports::microsvc::platform::handler::{Delivery, HandleError};
pub use microsvc::platform::{producer, state};
