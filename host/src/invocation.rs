//! One invocation of a component: an instance (fresh, or reused from the service's idle pool),
//! the guest call, then commit or roll back.
//!
//! Used for HTTP requests (from a listener or from another service in-process) and for
//! delivered messages. Each invocation has its own transaction, request id and CPU budget; an
//! instance is pooled again only when the call ended cleanly.

use crate::bindings::{self, services, HandleError};
use crate::http::{json_error, Resp};
use crate::messaging::{Delivery, ProducerView};
use crate::platform::Platform;
use crate::registry::EPOCH_TICK;
use crate::registry::{Loaded, Service};
use crate::services::{Caller, ServicesView};
use crate::state::{CommitError, StateView, Txn};
use anyhow::{anyhow, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use std::sync::Arc;
use wasmtime::component::{ResourceTable, TypedFunc};
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::bindings::Proxy;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// Re-runs after a commit conflict before the client is told to retry.
const MAX_CONFLICT_RETRIES: usize = 64;

/// The data of one invocation's store.
pub struct Ctx {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    /// The platform, this service and the request being served: what calls out need.
    caller: Caller,
    limits: StoreLimits,
    /// Epoch ticks the current invocation has computed for, against `budget`.
    ticks: u128,
    budget: u128,
    pub txn: Txn,
}

impl WasiView for Ctx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Ctx {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.caller,
        }
    }
}

impl Ctx {
    pub fn state(&mut self) -> StateView<'_> {
        StateView {
            db: &self.caller.platform.db,
            txn: &mut self.txn,
        }
    }

    pub fn services(&mut self) -> ServicesView<'_> {
        ServicesView {
            caller: &self.caller,
        }
    }

    pub fn producer(&mut self) -> ProducerView<'_> {
        ProducerView {
            txn: &mut self.txn,
            allowed_topics: &self.caller.service.spec.produces,
            request_id: &self.caller.request_id,
        }
    }

    /// Starts a new invocation in this store: a new transaction, request id and CPU budget.
    fn begin(&mut self, request_id: &str) {
        request_id.clone_into(&mut self.caller.request_id);
        self.txn = Txn::new(self.caller.service.name.clone());
        self.ticks = 0;
    }
}

fn new_store(platform: &Arc<Platform>, service: &Arc<Service>) -> Store<Ctx> {
    let ctx = Ctx {
        table: ResourceTable::new(),
        // No preopens, no environment, no sockets: a component reaches the world only
        // through wasi:http (to the services it may call) and the platform interfaces.
        wasi: WasiCtx::builder().inherit_stderr().build(),
        http: WasiHttpCtx::new(),
        caller: Caller {
            platform: platform.clone(),
            service: service.clone(),
            request_id: String::new(), // set by `begin`
        },
        limits: StoreLimitsBuilder::new()
            .memory_size(usize::try_from(service.spec.limits.memory).unwrap_or(usize::MAX))
            .build(),
        ticks: 0,
        budget: service.spec.limits.cpu.as_millis() / EPOCH_TICK.as_millis().max(1),
        txn: Txn::new(service.name.clone()),
    };
    service.instances.inc();
    let mut store = Store::new(&platform.engine, ctx);
    store.limiter(|ctx| &mut ctx.limits);
    // The callback runs once per epoch tick the guest spends computing (waiting in host calls
    // does not tick it), so counting calls measures guest compute time. Each tick also yields
    // to the executor, so a busy guest cannot hog a worker thread.
    store.epoch_deadline_callback(|mut ctx| {
        let ctx = ctx.data_mut();
        ctx.ticks += 1;
        if ctx.ticks > ctx.budget {
            Err(wasmtime::Trap::Interrupt.into())
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });
    store
}

/// `microsvc:platform/http-handler#handle`.
type Handle = TypedFunc<(services::Request,), (services::Response,)>;

/// How a component answers HTTP: `http-handler` when it exports it, else `wasi:http`.
enum Entry {
    Handler(Handle),
    WasiHttp(Proxy),
}

/// An instantiated component with its store, ready for a request.
pub struct Warm {
    store: Store<Ctx>,
    entry: Entry,
    /// The message handler, for subscribing services.
    subscriber: Option<bindings::SubscriberInstance>,
    served: u32,
}

impl Warm {
    /// An idle instance of `loaded` if instances are reused and one is free, else a new one.
    async fn get(
        platform: &Arc<Platform>,
        service: &Arc<Service>,
        loaded: &Loaded,
    ) -> Result<Warm> {
        if platform.instance_reuse > 1 {
            if let Some(warm) = loaded.idle.lock().unwrap().pop() {
                return Ok(warm);
            }
        }
        let mut store = new_store(platform, service);
        let instance = loaded
            .proxy
            .instance_pre()
            .instantiate_async(&mut store)
            .await?;
        // An export of another shape than ours is simply not used: wasi:http still works.
        let handle = loaded
            .handler
            .and_then(|i| instance.get_typed_func(&mut store, i).ok());
        let entry = match handle {
            Some(handle) => Entry::Handler(handle),
            None => Entry::WasiHttp(Proxy::new(&mut store, &instance)?),
        };
        let subscriber = match loaded.subscriber {
            // Loading checked that the component exports the handler.
            Some(_) => Some(bindings::SubscriberInstance::new(&mut store, &instance)?),
            None => None,
        };
        Ok(Warm {
            store,
            entry,
            subscriber,
            served: 0,
        })
    }

    /// Ends an invocation: returns its transaction, and keeps the instance for another request
    /// if the call ended cleanly (`clean`: no trap, and no resource left behind), reuse is on,
    /// it has requests left and its version is still the current one. Otherwise dropping it
    /// frees its slot and everything the guest left in it; a trapped instance may not be
    /// entered again.
    fn finish(
        mut self,
        clean: bool,
        platform: &Platform,
        service: &Service,
        loaded: &Arc<Loaded>,
    ) -> Txn {
        let txn = std::mem::take(&mut self.store.data_mut().txn);
        self.served += 1;
        if !clean
            || !self.store.data().table.is_empty()
            || self.served >= platform.instance_reuse
            || !Arc::ptr_eq(&service.loaded.load(), loaded)
        {
            return txn;
        }
        let mut idle = loaded.idle.lock().unwrap();
        if idle.len() < platform.idle_max {
            idle.push(self);
        }
        txn
    }
}

/// A buffered HTTP request: buffering lets a conflicting invocation run again.
#[derive(Clone, Debug)]
pub struct HttpRequest {
    pub method: hyper::Method,
    pub uri: hyper::Uri,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// Serves one HTTP request with `service`'s current component. Never fails: errors become
/// JSON error responses.
pub async fn http(
    platform: &Arc<Platform>,
    service: &Arc<Service>,
    req: HttpRequest,
    request_id: &str,
) -> Resp {
    let Ok(_permit) = service.permits.try_acquire() else {
        tracing::warn!(service = %service.name, request_id, "concurrency limit reached");
        return busy(&format!(
            "{}-service is at its concurrency limit; retry",
            service.name
        ));
    };
    let mut rerunning = None;
    for _ in 0..MAX_CONFLICT_RETRIES {
        let loaded = service.loaded.load_full();
        let (outcome, txn) = match Warm::get(platform, service, &loaded).await {
            Ok(mut warm) => {
                warm.store.data_mut().begin(request_id);
                let (clean, outcome) = match &warm.entry {
                    Entry::Handler(handle) => call_handler(&mut warm.store, *handle, &req).await,
                    Entry::WasiHttp(proxy) => call_wasi_http(&mut warm.store, proxy, &req).await,
                };
                (outcome, warm.finish(clean, platform, service, &loaded))
            }
            Err(e) => (Err(e), Txn::default()),
        };
        let resp = match outcome {
            Ok(resp) => resp,
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
                    &format!("{}-service computed past its deadline", service.name),
                );
            }
            Err(e) => {
                let cause = e.root_cause().to_string();
                tracing::error!(service = %service.name, request_id, error = %format!("{e:#}"), "component failed; its writes were rolled back");
                return json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("{}-service failed: {cause}", service.name),
                );
            }
        };
        if resp.status().is_server_error() {
            return resp; // the service reported a failure: nothing it wrote or sent is kept
        }
        match platform.commit(txn, rerunning.take()).await {
            Ok(()) => return resp,
            Err(CommitError::Conflict) => {
                rerunning = Some(service.rerun.clone().lock_owned().await);
            }
            Err(CommitError::Storage(e)) => {
                tracing::error!(service = %service.name, request_id, error = %format!("{e:#}"), "commit failed");
                return json_error(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable");
            }
        }
    }
    busy("too many conflicting concurrent updates; retry")
}

fn busy(why: &str) -> Resp {
    let mut resp = json_error(StatusCode::SERVICE_UNAVAILABLE, why);
    resp.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        hyper::header::HeaderValue::from_static("1"),
    );
    resp
}

type ResponseSender =
    tokio::sync::oneshot::Sender<Result<hyper::Response<HyperOutgoingBody>, ErrorCode>>;
type ResponseReceiver =
    tokio::sync::oneshot::Receiver<Result<hyper::Response<HyperOutgoingBody>, ErrorCode>>;

/// The guest's response, buffered: it is released only after the caller decided to commit.
async fn collect_response(rx: ResponseReceiver) -> Result<Resp> {
    let resp = match rx.await {
        Ok(Ok(resp)) => resp,
        Ok(Err(code)) => return Err(anyhow!("component answered with error {code:?}")),
        Err(_) => return Err(anyhow!("component did not send a response")),
    };
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| anyhow!("component's response body failed: {e:?}"))?
        .to_bytes();
    Ok(hyper::Response::from_parts(parts, Full::new(body)))
}

/// Runs the guest's `wasi:http` handler on `req`: whether the instance may serve again, and the
/// response.
async fn call_wasi_http(
    store: &mut Store<Ctx>,
    proxy: &Proxy,
    req: &HttpRequest,
) -> (bool, Result<Resp>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let collect = collect_response(rx);
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
    handle: Handle,
    req: &HttpRequest,
) -> (bool, Result<Resp>) {
    let request = services::Request {
        method: req.method.as_str().to_string(),
        path_with_query: req
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        headers: crate::services::header_list(&req.headers),
        body: req.body.to_vec(),
    };
    store.set_epoch_deadline(1);
    match handle.call_async(&mut *store, (request,)).await {
        Ok((resp,)) => (
            true,
            crate::services::to_response(resp).map_err(|e| anyhow!("component answered with {e}")),
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
    Retry(String),
    Reject(String),
}

/// Hands one message to `service`'s `handler` export and commits its writes if it succeeded.
pub async fn message(
    platform: &Arc<Platform>,
    service: &Arc<Service>,
    delivery: &Delivery,
    attempt: u32,
) -> Handled {
    let request_id = delivery
        .message
        .header("x-request-id")
        .map(String::from)
        .unwrap_or_else(|| {
            format!(
                "{}-{}-{}",
                delivery.message.topic, delivery.partition, delivery.offset
            )
        });
    let arg = bindings::Delivery {
        message: bindings::producer::Message {
            topic: delivery.message.topic.clone(),
            key: delivery.message.key.clone(),
            payload: delivery.message.payload.clone(),
            headers: delivery.message.headers.clone(),
        },
        partition: delivery.partition,
        offset: delivery.offset,
        attempt,
    };
    loop {
        let loaded = service.loaded.load_full();
        if loaded.subscriber.is_none() {
            return Handled::Reject(format!(
                "{} does not export a message handler",
                service.name
            ));
        }
        let (called, txn) = match Warm::get(platform, service, &loaded).await {
            Ok(mut warm) => {
                warm.store.data_mut().begin(&request_id);
                warm.store.set_epoch_deadline(1);
                let subscriber = warm.subscriber.as_ref().expect("loaded with a handler");
                let called = subscriber
                    .microsvc_platform_handler()
                    .call_handle(&mut warm.store, &arg)
                    .await;
                let txn = warm.finish(called.is_ok(), platform, service, &loaded);
                (called.map_err(anyhow::Error::from), txn)
            }
            Err(e) => (Err(e), Txn::default()),
        };
        match called {
            Err(e) => return Handled::Retry(format!("trap: {}", e.root_cause())),
            Ok(Err(HandleError::Retry(m))) => return Handled::Retry(m),
            Ok(Err(HandleError::Reject(m))) => return Handled::Reject(m),
            Ok(Ok(())) => match platform.commit_handled(txn).await {
                Ok(()) => return Handled::Done,
                Err(CommitError::Conflict) => continue,
                Err(CommitError::Storage(e)) => {
                    return Handled::Retry(format!("commit failed: {e:#}"))
                }
            },
        }
    }
}
