//! Calling a component's HTTP export, `microsvc:platform/http-handler` or
//! `wasi:http/incoming-handler`, with a request the host holds whole, and buffering its answer.

use super::store::InstanceState;
use crate::capabilities::exports::{http_handler, Request};
use crate::types::http::{header_list, response};
use crate::types::{HttpRequest, HttpResponse, Overrun};
use anyhow::{anyhow, Result};
use http_body_util::{BodyExt, Full};
use wasmtime::component::ResourceTable;
use wasmtime::Store;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::bindings::Proxy;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::WasiHttpView;

type ResponseSender =
    tokio::sync::oneshot::Sender<Result<hyper::Response<HyperOutgoingBody>, ErrorCode>>;
type ResponseReceiver =
    tokio::sync::oneshot::Receiver<Result<hyper::Response<HyperOutgoingBody>, ErrorCode>>;

/// The guest's response, buffered (at most `limit` bytes): it is released only after the
/// caller decided to commit.
async fn collect_response(rx: ResponseReceiver, limit: usize) -> Result<HttpResponse> {
    let resp = match rx.await {
        Ok(Ok(resp)) => resp,
        Ok(Err(code)) => return Err(anyhow!("component answered with error {code:?}")),
        Err(_) => return Err(anyhow!("component did not send a response")),
    };
    let (parts, body) = resp.into_parts();
    let body = http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| match e.downcast::<http_body_util::LengthLimitError>() {
            Ok(_) => anyhow!(Overrun { limit }),
            Err(e) => anyhow!("component's response body failed: {e:?}"),
        })?
        .to_bytes();
    Ok(hyper::Response::from_parts(parts, Full::new(body)))
}

/// Runs the guest's `wasi:http` handler on `req`: whether the instance may serve again, and the
/// response.
pub(super) async fn call_wasi_http(
    store: &mut Store<InstanceState>,
    proxy: &Proxy,
    req: &HttpRequest,
    limit: usize,
) -> (bool, Result<HttpResponse>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let collect = collect_response(rx, limit);
    tokio::pin!(collect);
    let mut collected = None;
    let called = {
        // The guest may block writing a body larger than the pipe until the response is read,
        // so the two run side by side.
        let call = call_http(store, proxy, req, tx);
        tokio::pin!(call);
        loop {
            tokio::select! {
                biased;
                r = &mut call => break r,
                r = &mut collect, if collected.is_none() => collected = Some(r),
            }
        }
    };
    let clean = called.is_ok() && store.data().table.is_empty();
    // Closes anything the guest left open, so that the collector cannot wait forever on a body
    // nobody writes.
    store.data_mut().table = ResourceTable::new();
    let outcome = match (called, collected) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(resp)) => resp,
        (Ok(()), None) => collect.await,
    };
    (clean, outcome)
}

/// Runs the guest's `http-handler` on `req`: whether the instance may serve again, and the
/// response.
pub(super) async fn call_handler(
    store: &mut Store<InstanceState>,
    handler: &http_handler::Guest,
    req: &HttpRequest,
) -> (bool, Result<HttpResponse>) {
    let request = Request {
        method: req.method.as_str().to_string(),
        path_with_query: req
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        headers: header_list(&req.headers),
        body: req.body.to_vec(),
    };
    store.set_epoch_deadline(1);
    match handler.call_handle(&mut *store, &request).await {
        Ok(resp) => (
            true,
            response(resp.status, resp.headers, resp.body)
                .map_err(|e| anyhow!("component answered with {e}")),
        ),
        Err(e) => (false, Err(e.into())),
    }
}

/// Runs the guest's `handle` on `req`; the response goes to `tx`.
async fn call_http(
    store: &mut Store<InstanceState>,
    proxy: &Proxy,
    req: &HttpRequest,
    tx: ResponseSender,
) -> Result<()> {
    let mut builder = hyper::Request::builder()
        .method(req.method.clone())
        .uri(req.uri.clone());
    *builder.headers_mut().unwrap() = req.headers.clone();
    let request = builder.body(Full::new(req.body.clone()))?;
    let incoming = store
        .data_mut()
        .http()
        .new_incoming_request(Scheme::Http, request)?;
    let out = store.data_mut().http().new_response_outparam(tx)?;
    store.set_epoch_deadline(1);
    proxy
        .wasi_http_incoming_handler()
        .call_handle(&mut *store, incoming, out)
        .await?;
    Ok(())
}
