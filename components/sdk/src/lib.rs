//! What every service component shares.
//!
//! - [`state`], [`producer`] and [`services`]: bindings to the host's `microsvc:platform`
//!   imports (world `service`).
//! - [`contract`]: the limits and names the guest shares with the host.
//! - [`Request`] / [`Response`]: plain HTTP values that handlers work with; [`serve`] moves them
//!   in and out of `wasi:http`, and [`http_service!`] exports a `fn(Request) -> Response`.
//! - [`handler`]: what [`message_handler!`] hands to a component that consumes messages.
//! - [`fetch`] / [`fetch_all`]: outbound calls to other services (through [`services`] when
//!   the URL names one, else `wasi:http`).
//! - [`router`]: a request to one function by method and path pattern, 404/405 derived.
//! - [`producer::send_json`]: a JSON event, sent with the invocation's commit.
//! - [`input`]: path and JSON-body parsing that turns bad client input into 400s.
//! - [`store`]: JSON records in host state.
//! - [`trace`]: spans of the component's own (`wasi:otel`), under its invocation's span.
//!
//! Everything except [`http`], [`store`] and [`trace`] is plain Rust, so it can be unit-tested natively.
//!
#![doc = include_str!("../../../docs/writing-a-service.md")]

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

/// Generated bindings of world `subscriber`; public for [`message_handler!`] only. Its imports
/// are the ones above, so that `Delivery` carries a [`producer::Message`] and not a copy of it.
#[doc(hidden)]
#[allow(clippy::all)]
pub mod subscriber_bindings {
    wit_bindgen::generate!({
        world: "subscriber",
        path: "../../wit",
        with: {
            "microsvc:platform/state@0.1.0": crate::state,
            "microsvc:platform/producer@0.1.0": crate::producer,
            "microsvc:platform/services@0.1.0": crate::services,
        },
        pub_export_macro: true,
        export_macro_name: "export_message_handler",
        default_bindings_module: "$crate::subscriber_bindings",
    });
}

pub use bindings::microsvc::platform::{services, state};
pub use platform_contract as contract;
pub use wasi;

pub mod handler;
pub mod http;
pub mod input;
pub mod page;
pub mod producer;
pub mod request;
pub mod router;
pub mod store;
pub mod trace;

pub use http::{
    fetch, fetch_all, fetch_via_wasi_http, serve, serve_values, OutboundError, OutboundErrorKind,
    OutboundRequest,
};
pub use request::{Request, Response};

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

/// Exports `handle` (a `fn(Delivery) -> Result<(), HandleError>`, see [`handler`]) as the
/// component's `microsvc:platform/handler`, which the host calls with each message of the topics
/// the service is subscribed to. Only on wasm32, like [`http_service!`].
#[macro_export]
macro_rules! message_handler {
    ($handle:path) => {
        #[cfg(target_arch = "wasm32")]
        mod __message_handler {
            struct MessageHandler;

            impl $crate::subscriber_bindings::exports::microsvc::platform::handler::Guest
                for MessageHandler
            {
                fn handle(
                    delivery: $crate::handler::Delivery,
                ) -> ::core::result::Result<(), $crate::handler::HandleError> {
                    $handle(delivery)
                }
            }

            $crate::subscriber_bindings::export_message_handler!(MessageHandler);
        }
    };
}
