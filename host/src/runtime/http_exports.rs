//! Calling a component's HTTP export, `microsvc:platform/http-handler`,
//! `wasi:http/handler@0.3` or `wasi:http/incoming-handler@0.2`, with a request the host holds
//! whole, and buffering its answer.

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
use wasmtime_wasi_http::{p3, WasiHttpView};

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
    buffer(resp, limit).await
}

/// `resp` with its body read whole, if it is at most `limit` bytes.
pub(super) async fn buffer<B>(resp: hyper::Response<B>, limit: usize) -> Result<HttpResponse>
where
    B: hyper::body::Body<Data = bytes::Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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

/// Runs the guest's `wasi:http/handler@0.3` on `req`: whether the instance may serve again, and
/// the response. The guest's tasks run until its body is read and every one of them ended, so
/// nothing of this request is left running in the instance.
pub(super) async fn call_wasi_http3(
    store: &mut Store<InstanceState>,
    service: &p3::bindings::Service,
    req: &HttpRequest,
    limit: usize,
) -> (bool, Result<HttpResponse>) {
    let request = match p3_request(store.data_mut(), req) {
        Ok(request) => request,
        Err(e) => return (true, Err(e)),
    };
    store.set_epoch_deadline(1);
    let called = store
        .run_concurrent(async |tasks| {
            let response = match service.handle(tasks, request).await {
                Ok(Ok(response)) => response,
                Ok(Err(code)) => return Err(anyhow!("component answered with error {code:?}")),
                Err(trap) => return Err(anyhow::Error::from(trap)),
            };
            let response = tasks
                .with(|store| response.into_http(store, async { Ok(()) }))
                .map_err(anyhow::Error::from)?;
            let buffered = buffer(response, limit).await?;
            std::future::poll_fn(|cx| tasks.poll_no_interesting_tasks(cx)).await;
            Ok(buffered)
        })
        .await;
    match called {
        Ok(Ok(resp)) => (store.data().table.is_empty(), Ok(resp)),
        Ok(Err(e)) => {
            store.data_mut().table = ResourceTable::new();
            (false, Err(e))
        }
        Err(trap) => (false, Err(anyhow::Error::from(trap))),
    }
}

/// `req` as a `wasi:http@0.3` request of the store `state` belongs to.
pub(super) fn p3_request(state: &mut InstanceState, req: &HttpRequest) -> Result<p3::Request> {
    let mut builder = hyper::Request::builder()
        .method(req.method.clone())
        .uri(req.uri.clone());
    *builder.headers_mut().unwrap() = req.headers.clone();
    let body = Full::new(req.body.clone())
        .map_err(|never| -> wasmtime_wasi_http::Error { match never {} });
    let (request, _body_sent) = p3::Request::from_http(state.http().hooks, builder.body(body)?);
    Ok(request)
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
