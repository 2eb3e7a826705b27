//! `wasi:http/outgoing-handler@0.2`, `wasi:http/client@0.3` and an imported
//! `wasi:http/handler@0.3` (a middleware's next hop): requests to `http://<name>-service/` run
//! that service in process.
//!
//! Only the services the caller may call are reachable so (`services` is the cheaper way to
//! the same place); other origins only when its `allowed_outbound_hosts` lists them (see
//! `outbound`), and anything else is `HTTP-request-denied`.

use super::outbound::request_body;
use super::services::{CallRefused, Outbound};
use crate::config::origin_allowed;
use crate::types::HttpRequest;
use anyhow::Result;
use http_body_util::BodyExt;
use hyper::http::uri::Scheme;
use platform_contract::SERVICE_SUFFIX;
use std::future::Future;
use wasmtime::component::{Accessor, Linker, Resource};
use wasmtime_wasi::WasiView;
use wasmtime_wasi_http::p3::bindings::http::{client, types::Host as _};
use wasmtime_wasi_http::{
    p3, Error as HttpError, RequestOptions, WasiBody, WasiHttp, WasiHttpHooks, WasiHttpView,
};

/// Links `wasi:http` 0.2 (types and outgoing-handler), whose hooks the store data provides.
pub fn add_to_linker<T: WasiView + WasiHttpView + 'static>(
    linker: &mut Linker<T>,
) -> wasmtime::Result<()> {
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(linker)
}

/// Links `wasi:http` 0.3 (types and client), for an engine with the concurrent component
/// model.
pub fn add_wasi3_to_linker<T: WasiHttpView + 'static>(
    linker: &mut Linker<T>,
) -> wasmtime::Result<()> {
    wasmtime_wasi_http::p3::add_to_linker(linker)
}

/// Where a middleware's imported `wasi:http/handler@0.3` hands its requests.
pub trait NextHop {
    /// The service name (without `-service`), or `None` to go where a request's authority says.
    fn next_hop(&self) -> Option<&str>;
}

/// Links `wasi:http/handler@0.3` as an import: `handle` sends its request, as
/// `wasi:http/client.send` does, to the store's [`NextHop`] when it has one.
pub fn add_wasi3_handler_to_linker<T: WasiHttpView + NextHop + Send + 'static>(
    linker: &mut Linker<T>,
) -> wasmtime::Result<()> {
    linker
        .instance("wasi:http/handler@0.3.0")?
        .func_wrap_concurrent(
            "handle",
            |accessor: &Accessor<T>, (request,): (Resource<p3::Request>,)| {
                Box::pin(async move {
                    accessor.with(|mut store| -> wasmtime::Result<()> {
                        let state = store.get();
                        let Some(next) = state.next_hop().map(|n| format!("{n}{SERVICE_SUFFIX}"))
                        else {
                            return Ok(());
                        };
                        let request = state.http().table.get_mut(&request)?;
                        request.authority = Some(next.parse()?);
                        request.scheme.get_or_insert(Scheme::HTTP);
                        Ok(())
                    })?;
                    let http = accessor.with_getter::<WasiHttp>(T::http);
                    let sent = <WasiHttp as client::HostWithStore<T>>::send(&http, request).await;
                    let answer = match sent {
                        Ok(response) => Ok(response),
                        Err(e) => Err(accessor.with(|mut s| s.get().http().convert_error_code(e))?),
                    };
                    Ok((answer,))
                })
            },
        )
}

type Sent = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        mut request: hyper::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Sent,
    ) -> Box<dyn Future<Output = Result<(hyper::Response<WasiBody>, Sent), HttpError>> + Send> {
        let host = request.uri().host().unwrap_or_default();
        let outside = (!host.ends_with(SERVICE_SUFFIX))
            .then(|| origin_allowed(&self.caller.allowed_outbound_hosts, request.uri()))
            .flatten();
        if let Some(origin) = outside {
            crate::types::trace::to_headers(&self.trace, request.headers_mut());
            // Counted by the allowlist entry, so that a wildcard cannot grow the series.
            let destination = origin.host().to_string();
            let (outside, service) = (self.outside.clone(), self.caller.name.clone());
            return Box::new(async move {
                let resp = outside
                    .send(&service, &destination, request, options)
                    .await?;
                Ok((resp, Box::new(async { Ok(()) }) as Sent))
            });
        }
        let target = self.resolve(host).map(str::to_string).map_err(|r| match r {
            CallRefused::NotFound(_) if !host.ends_with(SERVICE_SUFFIX) => {
                HttpError::HttpRequestDenied
            }
            CallRefused::NotFound(_) => HttpError::DestinationNotFound,
            CallRefused::Denied(_) => HttpError::HttpRequestDenied,
        });
        let outbound = self.clone();
        Box::new(async move {
            let target = target?;
            let (parts, body) = request.into_parts();
            let body = request_body(body).await?;
            let req = HttpRequest {
                method: parts.method,
                uri: parts.uri,
                headers: parts.headers,
                body,
            };
            let resp = outbound
                .call(&target, req)
                .await
                .ok_or(HttpError::ConnectionReadTimeout)?;
            // A streamed body that ends early was cut off by the callee's host side.
            let resp = resp.map(|b| {
                b.map_err(|e| HttpError::InternalError(Some(e.to_string())))
                    .boxed_unsync()
            });
            Ok((resp, Box::new(async { Ok(()) }) as Sent))
        })
    }
}
