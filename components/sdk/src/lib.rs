//! What every service component shares.
//!
//! - [`state`] and [`producer`]: bindings to the host's `microsvc:platform` imports (world
//!   `service`). Components that also export `handler` generate their own bindings for world
//!   `subscriber` and point its `with` at these modules, so there is one copy of each type.
//! - [`Request`] / [`Response`]: plain HTTP values that handlers work with; [`serve`] moves them
//!   in and out of `wasi:http`.
//! - [`fetch`] / [`fetch_all`]: outbound calls to other services (through [`services`] when
//!   the URL names one, else `wasi:http`).
//! - [`input`]: path and JSON-body parsing that turns bad client input into 400s.
//! - [`store`]: JSON records in host state.
//!
//! Everything except [`http`] and [`store`] is plain Rust, so it can be unit-tested natively.

/// Generated bindings of world `http-service`; public for [`http_service!`] only.
#[doc(hidden)]
#[allow(clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "http-service",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_http_handler",
        default_bindings_module: "$crate::bindings",
    });
}

pub use bindings::microsvc::platform::{producer, services, state};
pub use wasi;

pub mod http;
pub mod input;
pub mod message;
pub mod store;

pub use http::{
    fetch, fetch_all, fetch_via_wasi_http, serve, serve_values, OutboundError, OutboundErrorKind,
    OutboundRequest,
};
pub use message::{Request, Response};

/// Exports `route` (a `fn(Request) -> Response`) as the component's
/// `wasi:http/incoming-handler`, for any host, and as `microsvc:platform/http-handler`, which this
/// host calls instead because it is cheaper. Only on wasm32, so that components' unit tests link
/// natively.
#[macro_export]
macro_rules! http_service {
    ($route:path) => {
        #[cfg(target_arch = "wasm32")]
        mod __http_service {
            struct HttpService;

            impl $crate::wasi::exports::http::incoming_handler::Guest for HttpService {
                fn handle(
                    request: $crate::wasi::http::types::IncomingRequest,
                    response_out: $crate::wasi::http::types::ResponseOutparam,
                ) {
                    $crate::serve(request, response_out, $route);
                }
            }

            $crate::wasi::http::proxy::export!(HttpService);

            impl $crate::bindings::exports::microsvc::platform::http_handler::Guest for HttpService {
                fn handle(request: $crate::services::Request) -> $crate::services::Response {
                    $crate::serve_values(request, $route)
                }
            }

            $crate::bindings::export_http_handler!(HttpService);
        }
    };
}
