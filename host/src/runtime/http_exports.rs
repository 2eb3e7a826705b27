//! Calling a component's HTTP export, `microsvc:platform/http-handler`,
//! `wasi:http/handler@0.3` or `wasi:http/incoming-handler@0.2`, with a request the host holds
//! whole, and taking its answer: buffered, or (WASI 0.3) streamed once it is longer than
//! [`READ_AHEAD`].

use super::store::InstanceState;
use crate::capabilities::exports::{http_handler, Request};
use crate::types::http::{full, header_list, response, BodyError};
use crate::types::{HttpRequest, HttpResponse, Overrun};
use anyhow::{anyhow, Result};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::oneshot;
use wasmtime::component::ResourceTable;
use wasmtime::Store;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::bindings::Proxy;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{p3, WasiHttpView};

type ResponseSender = oneshot::Sender<Result<hyper::Response<HyperOutgoingBody>, ErrorCode>>;
type ResponseReceiver = oneshot::Receiver<Result<hyper::Response<HyperOutgoingBody>, ErrorCode>>;

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
    Ok(hyper::Response::from_parts(parts, full(body)))
}

/// Bytes of a streamed response read before its invocation commits: a body that ends within
/// them is sent whole (with its length), one that fails within them is a failed invocation.
pub(super) const READ_AHEAD: usize = 64 << 10;

/// A WASI 0.3 guest's response, to be passed on as the guest writes its body, and what tells
/// when the body was sent or dropped (`None`: the body was read whole).
pub(super) async fn pass_on<B>(
    resp: hyper::Response<B>,
) -> Result<(HttpResponse, Option<oneshot::Receiver<()>>)>
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BodyError>,
{
    let (parts, mut body) = resp.into_parts();
    let mut ahead = BytesMut::new();
    while ahead.len() < READ_AHEAD {
        match body.frame().await {
            None => return Ok((hyper::Response::from_parts(parts, full(ahead)), None)),
            Some(Err(e)) => {
                let e: BodyError = e.into();
                return Err(anyhow!("component's response body failed: {e}"));
            }
            // Trailers end the body; the host passes on no trailers.
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => ahead.extend_from_slice(&data),
                Err(_) => return Ok((hyper::Response::from_parts(parts, full(ahead)), None)),
            },
        }
    }
    let (sent, done) = oneshot::channel();
    let body = Streamed {
        ahead: Some(ahead.freeze()),
        rest: body,
        _sent: sent,
    };
    let body = body.map_err(Into::into).boxed_unsync();
    Ok((hyper::Response::from_parts(parts, body), Some(done)))
}

/// A body passed on as it comes: the bytes read ahead, then the rest. Dropped (sent whole or
/// abandoned by the client), it closes `_sent`.
struct Streamed<B> {
    ahead: Option<Bytes>,
    rest: B,
    _sent: oneshot::Sender<()>,
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for Streamed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.ahead.take() {
            Some(ahead) => Poll::Ready(Some(Ok(Frame::data(ahead)))),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_none() && self.rest.is_end_stream()
    }
}

/// Runs the guest's `wasi:http` handler on `req`: whether the instance may serve again, and the
/// response.
pub(super) async fn call_wasi_http(
    store: &mut Store<InstanceState>,
    proxy: &Proxy,
    req: &HttpRequest,
    limit: usize,
) -> (bool, Result<HttpResponse>) {
    let (tx, rx) = oneshot::channel();
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
