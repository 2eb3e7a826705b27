//! One invocation: an instance (fresh or reused), the guest call, then commit or roll back.
//!
//! Used for HTTP requests (from a listener or from another service in-process) and for
//! delivered messages. Each invocation has its own transaction, request id and CPU budget; an
//! instance is pooled again only when the call ended cleanly.

use super::admission::Caller;
use super::component::{HttpExport, Loaded};
use super::failure::{failed, refused, Failure};
use super::http_exports::{call_handler, call_wasi_http};
use super::pool::reuse;
use super::service::Service;
use super::shared::{Policy, Reply};
use super::store::{HttpEntry, Instance, InstanceState, MessageEntry};
use super::Runtime;
use crate::capabilities::exports::{handler, Message};
use crate::capabilities::wasi_messaging;
use crate::storage::{CommitError, Txn};
use crate::types::http::busy;
use crate::types::{json_error, trace, Delivery, HttpRequest, HttpResponse, REQUEST_ID};
use hyper::StatusCode;
use platform_contract::SERVICE_SUFFIX;
use std::sync::Arc;
use tracing::Instrument as _;
use wasmtime::Store;

/// What an invocation hands its component.
enum Call<'a> {
    Request(&'a HttpRequest),
    Message(&'a handler::Delivery),
}

/// What the component answered.
enum Answer {
    Response(HttpResponse),
    Handled(Result<(), handler::HandleError>),
}

/// Re-runs after a commit conflict before the client is told to retry.
const MAX_CONFLICT_RETRIES: usize = 64;

/// Runs `call` once on an instance of `loaded` (fresh or reused) within the wall-clock limit,
/// and ends the invocation: its transaction (to commit or drop), and what the component
/// answered or why it did not.
async fn run_once(
    runtime: &Runtime,
    service: &Arc<Service>,
    loaded: &Arc<Loaded>,
    request_id: &str,
    trace: &opentelemetry::Context,
    call: Call<'_>,
) -> (Result<Answer, Failure>, Txn) {
    let (answer, txn) = match (&call, shared_policy(runtime, service, loaded)) {
        (Call::Request(req), Some(policy)) => {
            run_shared(runtime, service, loaded, request_id, trace, req, policy).await
        }
        _ => run_alone(runtime, service, loaded, request_id, trace, call).await,
    };
    match txn.budget.overrun() {
        Some(overrun) => (Err(Failure::Overrun(overrun)), txn),
        None => (answer, txn),
    }
}

/// Runs `req` on an instance that may serve other requests at the same time.
async fn run_shared(
    runtime: &Runtime,
    service: &Arc<Service>,
    loaded: &Arc<Loaded>,
    request_id: &str,
    trace: &opentelemetry::Context,
    req: &HttpRequest,
    policy: Policy,
) -> (Result<Answer, Failure>, Txn) {
    let new_instance = Instance::new(runtime, service, loaded);
    let reply = (loaded.shared)
        .call(policy, req, request_id, trace, new_instance)
        .await;
    let failed = |failure| (Err(failure), Txn::default());
    match reply {
        Err(e) => failed(Failure::of(e)),
        Ok(Reply::Ran(ran)) => {
            let (answer, txn) = *ran;
            (answer.map(Answer::Response).map_err(Failure::of), txn)
        }
        Ok(Reply::TimedOut) => failed(Failure::WallClock(policy.timeout)),
        Ok(Reply::Trapped { deadline: true, .. }) => failed(Failure::Deadline),
        Ok(Reply::Trapped { error, .. }) => failed(Failure::Guest(anyhow::anyhow!(error))),
    }
}

/// Runs `call` on an instance of its own (fresh, or reused from the idle list).
async fn run_alone(
    runtime: &Runtime,
    service: &Arc<Service>,
    loaded: &Arc<Loaded>,
    request_id: &str,
    trace: &opentelemetry::Context,
    call: Call<'_>,
) -> (Result<Answer, Failure>, Txn) {
    let mut instance = match Instance::get(runtime, service, loaded).await {
        Ok(instance) => instance,
        Err(e) => return (Err(Failure::of(e)), Txn::default()),
    };
    instance.store.data_mut().begin(request_id, trace.clone());
    let limit = runtime.settings.request_timeout;
    let host_bytes = runtime.settings.invocation_host_bytes;
    let run = async {
        let Instance {
            store,
            entry,
            handler,
            ..
        } = &mut instance;
        match call {
            Call::Request(req) => {
                let (clean, resp) = match entry {
                    HttpEntry::Handler(handler) => call_handler(store, handler, req).await,
                    HttpEntry::WasiHttp3(_) => (
                        true,
                        Err(anyhow::anyhow!("WASI 0.3 requests run on shared instances")),
                    ),
                    HttpEntry::WasiHttp(proxy) => {
                        call_wasi_http(store, proxy, req, host_bytes).await
                    }
                    HttpEntry::Absent => (true, Err(anyhow::anyhow!("no HTTP export"))),
                };
                (clean, resp.map(Answer::Response))
            }
            Call::Message(delivery) => {
                let handler = handler.as_ref().expect("loaded with a handler");
                store.set_epoch_deadline(1);
                match hand_over(store, handler, delivery).await {
                    Ok(handled) => (true, Ok(Answer::Handled(handled))),
                    Err(e) => (false, Err(e)),
                }
            }
        }
    };
    // Dropping the call stops the guest where it waits; the instance is discarded.
    let (clean, answer) = match tokio::time::timeout(limit, run).await {
        Ok((clean, answer)) => (clean, answer.map_err(Failure::of)),
        Err(_) => (false, Err(Failure::WallClock(limit))),
    };
    (answer, instance.finish(clean, runtime, service, loaded))
}

/// Calls `handler` with `delivery`: what it answered, in `microsvc:platform/handler`'s words
/// (a `wasi:messaging` error is a failed attempt, to retry), or why it did not answer.
async fn hand_over(
    store: &mut Store<InstanceState>,
    handler: &MessageEntry,
    delivery: &handler::Delivery,
) -> anyhow::Result<Result<(), handler::HandleError>> {
    match handler {
        MessageEntry::Handler(handler) => Ok(handler.call_handle(&mut *store, delivery).await?),
        MessageEntry::WasiMessaging(handler) => {
            let message = wasi_messaging::incoming(&mut store.data_mut().table, delivery)?;
            let handled = handler.call_handle(&mut *store, message).await?;
            Ok(handled.map_err(|e| handler::HandleError::Retry(wasi_messaging::describe(&e))))
        }
    }
}

/// How `service`'s requests share instances, if they do: a WASI 0.3 component's always do (it
/// is async inside, and its responses stream from its instance's task), up to
/// `instances.concurrent` at once; `concurrent = 1` takes them one at a time and `reuse = 1`
/// makes an instance per request.
fn shared_policy(runtime: &Runtime, service: &Service, loaded: &Loaded) -> Option<Policy> {
    let instances = &service.spec.instances;
    matches!(loaded.http, HttpExport::WasiHttp3(_)).then(|| Policy {
        concurrent: instances.concurrent as usize,
        reuse: reuse(runtime, service) as usize,
        idle: instances.idle,
        timeout: runtime.settings.request_timeout,
    })
}

/// Serves one HTTP request with `service`'s current component. Never fails: errors become
/// JSON error responses. Its span is a child of `parent` (the client's `traceparent`, the
/// caller's call), and the component sees it as its `traceparent`.
pub async fn http(
    runtime: &Runtime,
    service: &Arc<Service>,
    mut req: HttpRequest,
    request_id: &str,
    caller: Caller,
    parent: &opentelemetry::Context,
) -> HttpResponse {
    let span = trace::server(&service.name, &req.method, req.uri.path(), parent);
    let context = trace::context_of(&span);
    trace::to_headers(&context, &mut req.headers);
    let resp = serve(runtime, service, req, request_id, caller, &context)
        .instrument(span.clone())
        .await;
    trace::answered(&span, resp.status().as_u16());
    resp
}

async fn serve(
    runtime: &Runtime,
    service: &Arc<Service>,
    req: HttpRequest,
    request_id: &str,
    caller: Caller,
    context: &opentelemetry::Context,
) -> HttpResponse {
    if matches!(service.loaded.load().http, HttpExport::Absent) {
        return json_error(
            StatusCode::NOT_FOUND,
            &format!(
                "{}{SERVICE_SUFFIX} serves no HTTP: its component only handles messages",
                service.name
            ),
        );
    }
    let _permit = match service.admission.admit(caller).await {
        Ok(permit) => permit,
        Err(refusal) => return refused(service, refusal),
    };
    let mut rerunning = None;
    for _ in 0..MAX_CONFLICT_RETRIES {
        let loaded = service.loaded.load_full();
        let resp = match run_once(
            runtime,
            service,
            &loaded,
            request_id,
            context,
            Call::Request(&req),
        )
        .await
        {
            (Ok(Answer::Response(resp)), txn) => (resp, txn),
            (Ok(Answer::Handled(_)), _) => unreachable!("a request is answered with a response"),
            (Err(failure), _) => return failed(service, request_id, failure),
        };
        let (resp, txn) = resp;
        if resp.status().is_server_error() {
            return resp; // the service reported a failure: nothing it wrote or sent is kept
        }
        // A read-only invocation commits nothing: no span for it.
        let span = match txn.is_empty() {
            true => tracing::Span::none(),
            false => trace::commit(&service.name, context),
        };
        match runtime.commit(txn, rerunning.take()).instrument(span).await {
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
    group: &str,
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
    let span = trace::process(
        &service.name,
        group,
        runtime.backend.system(),
        &delivery.message.topic,
        delivery.partition,
        delivery.offset,
        &delivery.message.headers,
    );
    let context = trace::context_of(&span);
    let mut headers = delivery.message.headers.clone();
    trace::to_record(&context, &mut headers);
    let arg = handler::Delivery {
        message: Message {
            topic: delivery.message.topic.clone(),
            key: delivery.message.key.clone(),
            payload: delivery.message.payload.clone(),
            headers,
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
        let (answer, txn) = run_once(
            runtime,
            service,
            &loaded,
            &request_id,
            &context,
            Call::Message(&arg),
        )
        .await;
        let handled = match answer {
            Err(Failure::NoSlot) => return Handled::Unavailable(Failure::NoSlot.to_string()),
            Err(Failure::Overrun(overrun)) => return Handled::Retry(overrun.to_string()),
            _ if txn.unavailable.is_some() => {
                // Whatever the handler made of the store's error, the failure was the host's.
                let failure = txn.unavailable.as_deref().unwrap_or_default();
                return Handled::Unavailable(format!("state unavailable: {failure}"));
            }
            Err(Failure::Guest(e)) => return Handled::Retry(format!("trap: {}", e.root_cause())),
            Err(failure) => return Handled::Retry(format!("handler {failure}")),
            Ok(Answer::Response(_)) => unreachable!("a message is answered with a result"),
            Ok(Answer::Handled(handled)) => handled,
        };
        match handled {
            Err(handler::HandleError::Retry(m)) => return Handled::Retry(m),
            Err(handler::HandleError::Reject(m)) => return Handled::Reject(m),
            Ok(()) => match runtime.commit_handled(txn, rerunning.take()).await {
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
