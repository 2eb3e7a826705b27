//! `wasi:http/outgoing-handler@0.2` and `wasi:http/client@0.3`: requests to
//! `http://<name>-service/` run that service in process.
//!
//! Nothing else is reachable, and only the services the caller may call. (`services` is the
//! cheaper way to the same place.)

use super::services::{CallRefused, Outbound};
use crate::types::HttpRequest;
use anyhow::Result;
use http_body_util::{BodyExt, Limited};
use platform_contract::MAX_BODY;
use std::future::Future;
use wasmtime::component::Linker;
use wasmtime_wasi::WasiView;
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks, WasiHttpView,
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

type Sent = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: hyper::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Sent,
    ) -> Box<dyn Future<Output = Result<(hyper::Response<WasiBody>, Sent), HttpError>> + Send> {
        let target = self
            .resolve(request.uri().host().unwrap_or_default())
            .map(str::to_string)
            .map_err(|r| match r {
                CallRefused::NotFound(_) => HttpError::DestinationNotFound,
                CallRefused::Denied(_) => HttpError::HttpRequestDenied,
            });
        let outbound = self.clone();
        Box::new(async move {
            let target = target?;
            let (parts, body) = request.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|_| HttpError::HttpRequestBodySize(None))?
                .to_bytes();
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
            let resp = resp.map(|b| b.map_err(HttpError::from).boxed_unsync());
            Ok((resp, Box::new(async { Ok(()) }) as Sent))
        })
    }
}
