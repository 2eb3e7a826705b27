//! One invocation: an instance (fresh or reused), the guest call, then commit or roll back.
//!
//! Used for HTTP requests (from a listener or from another service in-process) and for
//! delivered messages. Each invocation has its own transaction, request id and CPU budget; an
//! instance is pooled again only when the call ended cleanly.

use super::service::Service;
use super::store::{Ctx, Entry, Warm};
use super::Runtime;
use crate::capabilities::exports::{handler, http_handler, Message, Request};
use crate::storage::{CommitError, Txn};
use crate::types::contract::SERVICE_SUFFIX;
use crate::types::http::{busy, header_list, response};
use crate::types::{json_error, Delivery, HttpRequest, Overrun, Resp, REQUEST_ID};
use anyhow::{anyhow, Result};
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use std::sync::Arc;
use wasmtime::component::ResourceTable;
use wasmtime::Store;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::bindings::Proxy;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::WasiHttpView;

/// An invocation that ran past the wall-clock limit (`REQUEST_TIMEOUT`): a guest can wait on a
/// clock or a call without computing, which the CPU deadline does not see.
#[derive(Debug)]
struct WallClock(std::time::Duration);

impl std::fmt::Display for WallClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "did not finish within {:?}", self.0)
    }
}

impl std::error::Error for WallClock {}

/// Re-runs after a commit conflict before the client is told to retry.
const MAX_CONFLICT_RETRIES: usize = 64;

/// Serves one HTTP request with `service`'s current component. Never fails: errors become
/// JSON error responses.
pub async fn http(
    runtime: &Runtime,
    service: &Arc<Service>,
    req: HttpRequest,
    request_id: &str,
) -> Resp {
    let Ok(_permit) = service.permits.try_acquire() else {
        tracing::warn!(service = %service.name, request_id, "concurrency limit reached");
        return busy(&format!(
            "{}{SERVICE_SUFFIX} is at its concurrency limit; retry",
            service.name
        ));
    };
    let mut rerunning = None;
    for _ in 0..MAX_CONFLICT_RETRIES {
        let loaded = service.loaded.load_full();
        let (outcome, txn) = match Warm::get(runtime, service, &loaded).await {
            Ok(mut warm) => {
                warm.store.data_mut().begin(request_id);
                let call = async {
                    match &warm.entry {
                        Entry::Handler(handler) => {
                            call_handler(&mut warm.store, handler, &req).await
                        }
                        Entry::WasiHttp(proxy) => {
                            let limit = runtime.settings.invocation_host_bytes;
                            call_wasi_http(&mut warm.store, proxy, &req, limit).await
                        }
                    }
                };
                let limit = runtime.settings.request_timeout;
                // Dropping the call stops the guest where it waits; the instance is discarded.
                let (clean, outcome) = tokio::time::timeout(limit, call)
                    .await
                    .unwrap_or_else(|_| (false, Err(WallClock(limit).into())));
                (outcome, warm.finish(clean, runtime, service, &loaded))
            }
            Err(e) => (Err(e), Txn::default()),
        };
        if let Some(overrun) = txn.budget.overrun() {
            tracing::error!(service = %service.name, request_id, error = %overrun, "component failed; its writes were rolled back");
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("{}{SERVICE_SUFFIX} failed: {overrun}", service.name),
            );
        }
        let resp = match outcome {
            Ok(resp) => resp,
            Err(e) if e.is::<WallClock>() => {
                tracing::error!(service = %service.name, request_id, error = %e, "component stopped; its writes were rolled back");
                return json_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("{}{SERVICE_SUFFIX} {e}", service.name),
                );
            }
            Err(e)
                if e.chain()
                    .any(|c| c.is::<wasmtime::PoolConcurrencyLimitError>()) =>
            {
                tracing::warn!(service = %service.name, request_id, "all instance slots busy");
                return busy("all instance slots are busy; retry");
            }
            Err(e)
                if e.chain()
                    .any(|c| c.downcast_ref() == Some(&wasmtime::Trap::Interrupt)) =>
            {
                tracing::error!(service = %service.name, request_id, deadline = ?service.spec.limits.cpu, "component computed past its CPU deadline; stopped");
                return json_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!(
                        "{}{SERVICE_SUFFIX} computed past its deadline",
                        service.name
                    ),
                );
            }
            Err(e) => {
                let cause = e.root_cause().to_string();
                tracing::error!(service = %service.name, request_id, error = %format!("{e:#}"), "component failed; its writes were rolled back");
                return json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("{}{SERVICE_SUFFIX} failed: {cause}", service.name),
                );
            }
        };
        if resp.status().is_server_error() {
            return resp; // the service reported a failure: nothing it wrote or sent is kept
        }
        match runtime.commit(txn, rerunning.take()).await {
            Ok(()) => return resp,
            Err(CommitError::Conflict) => {
                service.conflicts.inc();
                rerunning = Some(service.rerun.clone().lock_owned().await);
            }
            Err(CommitError::Full(m)) => {
                tracing::warn!(service = %service.name, request_id, "{m}");
                return busy(&m);
            }
            Err(CommitError::Storage(e)) => {
                tracing::error!(service = %service.name, request_id, error = %format!("{e:#}"), "commit failed");
                return json_error(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable");
            }
        }
    }
    busy("too many conflicting concurrent updates; retry")
}

type ResponseSender =
    tokio::sync::oneshot::Sender<Result<hyper::Response<HyperOutgoingBody>, ErrorCode>>;
type ResponseReceiver =
    tokio::sync::oneshot::Receiver<Result<hyper::Response<HyperOutgoingBody>, ErrorCode>>;

/// The guest's response, buffered (at most `limit` bytes): it is released only after the
/// caller decided to commit.
async fn collect_response(rx: ResponseReceiver, limit: usize) -> Result<Resp> {
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
async fn call_wasi_http(
    store: &mut Store<Ctx>,
    proxy: &Proxy,
    req: &HttpRequest,
    limit: usize,
) -> (bool, Result<Resp>) {
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
async fn call_handler(
    store: &mut Store<Ctx>,
    handler: &http_handler::Guest,
    req: &HttpRequest,
) -> (bool, Result<Resp>) {
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
    store: &mut Store<Ctx>,
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

/// How a delivered message ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Handled {
    Done,
    /// The handler failed (an error it returned, a trap, a deadline): an attempt spent.
    Retry(String),
    Reject(String),
    /// The host could not run or commit the handler (no free instance slot, the store failing
    /// or the outbox full): try again later without spending an attempt.
    Unavailable(String),
}

/// Hands one message to `service`'s `handler` export and commits its writes if it succeeded.
/// A commit conflict runs the handler again, as for requests, at most
/// [`MAX_CONFLICT_RETRIES`] times (re-runs of one service taking turns), then counts as a
/// failed attempt.
pub async fn message(
    runtime: &Runtime,
    service: &Arc<Service>,
    delivery: &Delivery,
    attempt: u32,
) -> Handled {
    let request_id = delivery
        .message
        .header(REQUEST_ID)
        .map(String::from)
        .unwrap_or_else(|| {
            format!(
                "{}-{}-{}",
                delivery.message.topic, delivery.partition, delivery.offset
            )
        });
    let arg = handler::Delivery {
        message: Message {
            topic: delivery.message.topic.clone(),
            key: delivery.message.key.clone(),
            payload: delivery.message.payload.clone(),
            headers: delivery.message.headers.clone(),
        },
        partition: delivery.partition,
        offset: delivery.offset,
        attempt,
    };
    let mut rerunning = None;
    for _ in 0..MAX_CONFLICT_RETRIES {
        let loaded = service.loaded.load_full();
        if loaded.handler.is_none() {
            return Handled::Reject(format!(
                "{} does not export a message handler",
                service.name
            ));
        }
        let (called, txn) = match Warm::get(runtime, service, &loaded).await {
            Ok(mut warm) => {
                warm.store.data_mut().begin(&request_id);
                warm.store.set_epoch_deadline(1);
                let handler = warm.handler.as_ref().expect("loaded with a handler");
                let limit = runtime.settings.request_timeout;
                let called =
                    match tokio::time::timeout(limit, handler.call_handle(&mut warm.store, &arg))
                        .await
                    {
                        Ok(called) => called.map_err(anyhow::Error::from),
                        Err(_) => Err(WallClock(limit).into()),
                    };
                let txn = warm.finish(called.is_ok(), runtime, service, &loaded);
                (called, txn)
            }
            Err(e)
                if e.chain()
                    .any(|c| c.is::<wasmtime::PoolConcurrencyLimitError>()) =>
            {
                return Handled::Unavailable("all instance slots are busy".into());
            }
            Err(e) => (Err(e), Txn::default()),
        };
        if let Some(overrun) = txn.budget.overrun() {
            return Handled::Retry(overrun.to_string());
        }
        if let Some(failure) = &txn.unavailable {
            // Whatever the handler made of the store's error, the failure was the host's.
            return Handled::Unavailable(format!("state unavailable: {failure}"));
        }
        match called {
            Err(e) if e.is::<WallClock>() => return Handled::Retry(format!("handler {e}")),
            Err(e) => return Handled::Retry(format!("trap: {}", e.root_cause())),
            Ok(Err(handler::HandleError::Retry(m))) => return Handled::Retry(m),
            Ok(Err(handler::HandleError::Reject(m))) => return Handled::Reject(m),
            Ok(Ok(())) => match runtime.commit_handled(txn, rerunning.take()).await {
                Ok(()) => return Handled::Done,
                Err(CommitError::Conflict) => {
                    service.conflicts.inc();
                    rerunning = Some(service.rerun.clone().lock_owned().await);
                }
                Err(CommitError::Full(m)) => return Handled::Unavailable(m),
                Err(CommitError::Storage(e)) => {
                    return Handled::Unavailable(format!("commit failed: {e:#}"))
                }
            },
        }
    }
    Handled::Retry(format!(
        "its commit conflicted {MAX_CONFLICT_RETRIES} times in a row with concurrent updates"
    ))
}
