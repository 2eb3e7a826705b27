//! Host-side bindings for the `microsvc:platform` WIT package (`wit/platform.wit`).

wasmtime::component::bindgen!({
    world: "runtime",
    path: "../wit",
    // State reads may go to PostgreSQL (`STATE_URL`): they wait without blocking a thread.
    imports: {
        "microsvc:platform/services.call": async,
        "microsvc:platform/state": async,
    },
    exports: { default: async },
});
