//! Host-side bindings for the `microsvc:platform` WIT package (`wit/platform.wit`).

wasmtime::component::bindgen!({
    world: "runtime",
    path: "../wit",
    imports: { "microsvc:platform/services.call": async },
    exports: { default: async },
});
