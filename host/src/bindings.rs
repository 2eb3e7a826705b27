//! Host-side bindings for the `microsvc:platform` WIT package (`wit/platform.wit`).

wasmtime::component::bindgen!({
    world: "subscriber",
    path: "../wit",
    imports: { "microsvc:platform/services.call": async },
    exports: { default: async },
});

pub use exports::microsvc::platform::handler::{Delivery, HandleError};
pub use microsvc::platform::{producer, services, state};
pub use Subscriber as SubscriberInstance;
