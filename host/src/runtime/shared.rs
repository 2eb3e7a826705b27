//! Instances of WASI 0.3 components (`wasi:http/handler@0.3`) that serve several requests at
//! once: each runs as a task of its own, takes up to `instances.concurrent` requests at a time
//! and `instances.reuse` in all, and ends after `instances.idle` without one.
//!
//! Every request stays an invocation of its own (transaction, request id, CPU time, wall-clock
//! limit): the store switches between them by guest task (`store::share`).

use super::http_exports::{p3_request, pass_on};
use super::store::{share, HttpEntry, Instance, InstanceState};
use crate::storage::Txn;
use crate::types::{HttpRequest, HttpResponse};
use anyhow::{anyhow, Result};
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use wasmtime::component::Accessor;
use wasmtime::{AsContextMut, Store};
use wasmtime_wasi_http::p3;

/// The shared instances of one component version that may still take requests.
#[derive(Default)]
pub struct SharedInstances(Mutex<Vec<Handle>>);

/// A running shared instance, as requests find it.
struct Handle {
    counts: Arc<Counts>,
    jobs: mpsc::UnboundedSender<Box<Job>>,
}

/// Changed by requests under the list's lock, and by the instance's task.
#[derive(Default)]
struct Counts {
    /// Requests handed to it and not answered yet.
    load: AtomicUsize,
    /// Requests handed to it in all.
    accepted: AtomicUsize,
}

struct Job {
    req: HttpRequest,
    request_id: String,
    trace: opentelemetry::Context,
    reply: oneshot::Sender<Reply>,
}

/// Where [`SharedInstances::hand`] put a request.
enum Handed {
    ToRunning,
    /// To a new instance, listed but still to be made and started.
    ToNew(Arc<Counts>, mpsc::UnboundedReceiver<Box<Job>>),
    /// Nowhere: no instance had room, and making one was not allowed.
    Not,
}

/// How a request handed to a shared instance ended.
pub(super) enum Reply {
    /// Its invocation ran: what it answered, and its transaction.
    Ran(Box<(Result<HttpResponse>, Txn)>),
    /// It did not finish within the wall-clock limit.
    TimedOut,
    /// The instance trapped, in this request or in another it was serving; `deadline`: it
    /// computed past a CPU deadline.
    Trapped { deadline: bool, error: String },
}

/// How often a request is handed to another instance when the one it was handed to ended
/// before starting it.
const HANDS: usize = 3;

/// What a shared instance's task needs to know of its service.
#[derive(Clone, Copy)]
pub(super) struct Policy {
    pub concurrent: usize,
    pub reuse: usize,
    pub idle: Duration,
    /// The wall-clock limit of one request.
    pub timeout: Duration,
}

impl SharedInstances {
    /// Runs `req` on an instance with room for it, or on the one `new_instance` makes (at
    /// most once).
    pub(super) async fn call(
        self: &Arc<Self>,
        policy: Policy,
        req: &HttpRequest,
        request_id: &str,
        trace: &opentelemetry::Context,
        new_instance: impl Future<Output = Result<Instance>>,
    ) -> Result<Reply> {
        let mut new_instance = Some(new_instance);
        for _ in 0..HANDS {
            let (reply, answer) = oneshot::channel();
            let job = Box::new(Job {
                req: req.clone(),
                request_id: request_id.to_string(),
                trace: trace.clone(),
                reply,
            });
            match self.hand(job, &policy, new_instance.is_some()) {
                Handed::ToRunning => {}
                Handed::ToNew(counts, queue) => {
                    let new_instance = new_instance.take().expect("may open one");
                    match new_instance.await {
                        Ok(instance) => self.start(instance, counts, queue, policy)?,
                        Err(e) => {
                            self.remove(&counts);
                            return Err(e);
                        }
                    }
                }
                Handed::Not => break,
            }
            // The instance answers within the wall-clock limit unless one of its tasks holds
            // the store in a host call; this bounds that too.
            let waited = tokio::time::timeout(policy.timeout + Duration::from_secs(1), answer);
            match waited.await {
                Ok(Ok(reply)) => return Ok(reply),
                // The instance ended with the request still queued: hand it to another.
                Ok(Err(_)) => continue,
                Err(_) => return Ok(Reply::TimedOut),
            }
        }
        Ok(Reply::Trapped {
            deadline: false,
            error: "the instances it was handed to ended before they started it".into(),
        })
    }

    /// Hands `job` to a running instance with room for it; if none has and `may_open`, lists a
    /// new one with `job` queued for it (to be started by the caller). One lock for both: the
    /// requests arriving while the new one is made queue for it instead of each making their
    /// own.
    fn hand(&self, mut job: Box<Job>, policy: &Policy, may_open: bool) -> Handed {
        let mut handles = self.0.lock().unwrap();
        for handle in handles.iter() {
            let counts = &handle.counts;
            if counts.load.load(Ordering::Relaxed) >= policy.concurrent
                || counts.accepted.load(Ordering::Relaxed) >= policy.reuse
            {
                continue;
            }
            counts.load.fetch_add(1, Ordering::Relaxed);
            counts.accepted.fetch_add(1, Ordering::Relaxed);
            match handle.jobs.send(job) {
                Ok(()) => return Handed::ToRunning,
                Err(mpsc::error::SendError(back)) => {
                    counts.load.fetch_sub(1, Ordering::Relaxed);
                    counts.accepted.fetch_sub(1, Ordering::Relaxed);
                    job = back;
                }
            }
        }
        if !may_open {
            return Handed::Not;
        }
        let counts = Arc::new(Counts {
            load: AtomicUsize::new(1),
            accepted: AtomicUsize::new(1),
        });
        let (jobs, queue) = mpsc::unbounded_channel();
        let _ = jobs.send(job); // `queue` is here
        handles.push(Handle {
            counts: counts.clone(),
            jobs,
        });
        Handed::ToNew(counts, queue)
    }

    /// Takes the instance counted by `counts` off the list: it gets no more requests.
    fn remove(&self, counts: &Arc<Counts>) {
        (self.0.lock().unwrap()).retain(|h| !Arc::ptr_eq(&h.counts, counts));
    }

    /// Serves the requests of `queue` on `instance`, in a task of its own.
    fn start(
        self: &Arc<Self>,
        mut instance: Instance,
        counts: Arc<Counts>,
        queue: mpsc::UnboundedReceiver<Box<Job>>,
        policy: Policy,
    ) -> Result<()> {
        let HttpEntry::WasiHttp3(http) = instance.entry else {
            self.remove(&counts);
            return Err(anyhow!("only WASI 0.3 instances serve requests at once"));
        };
        share(&mut instance.store);
        tokio::spawn(
            self.clone()
                .serve(instance.store, http, counts, queue, policy),
        );
        Ok(())
    }

    /// Stops handing requests to the instance counted by `counts` if it has none: whether it
    /// was idle.
    fn retire_if_idle(&self, counts: &Arc<Counts>) -> bool {
        let mut handles = self.0.lock().unwrap();
        // Requests are handed under this lock: none can arrive between the check and the
        // removal.
        if counts.load.load(Ordering::Relaxed) > 0 {
            return false;
        }
        handles.retain(|h| !Arc::ptr_eq(&h.counts, counts));
        true
    }

    /// Hands no more requests to any instance: they end once they answered theirs.
    pub fn retire(&self) {
        self.0.lock().unwrap().clear();
    }

    /// The instance's task: takes requests from `queue` and runs each in a guest task of its
    /// own until the instance is used up, idle or retired, or traps.
    async fn serve(
        self: Arc<Self>,
        mut store: Store<InstanceState>,
        http: p3::bindings::Service,
        counts: Arc<Counts>,
        mut queue: mpsc::UnboundedReceiver<Box<Job>>,
        policy: Policy,
    ) {
        store.set_epoch_deadline(1);
        let waiting: Mutex<HashMap<u64, oneshot::Sender<Reply>>> = Mutex::default();
        let (waiting, counts_ref, http) = (&waiting, &counts, &http);
        let this = &self;
        let jobs = &mut queue;
        let result = store
            .run_concurrent(async move |accessor| {
                let mut running = FuturesUnordered::new();
                let (mut open, mut accepted, mut expired) = (true, 0, false);
                while open || !running.is_empty() {
                    tokio::select! {
                        job = jobs.recv(), if open => {
                            let Some(job) = job else {
                                open = false; // retired
                                continue;
                            };
                            accepted += 1;
                            open = accepted < policy.reuse;
                            waiting.lock().unwrap().insert(accepted as u64, job.reply);
                            running.push(run(accessor, http, accepted as u64, job.req, job.request_id, job.trace, policy, waiting, counts_ref));
                        }
                        Some(timed_out) = running.next(), if !running.is_empty() => {
                            if timed_out {
                                // Its task may still run: take no more requests, and end
                                // with the ones this instance has.
                                open = false;
                                expired = true;
                            }
                        }
                        () = tokio::time::sleep(policy.idle), if open && running.is_empty() => {
                            open = !this.retire_if_idle(counts_ref);
                        }
                    }
                }
                if !expired {
                    // What the guest's tasks still do after their responses (bounded).
                    let settled = std::future::poll_fn(|cx| accessor.poll_no_interesting_tasks(cx));
                    let _ = tokio::time::timeout(policy.timeout, settled).await;
                }
            })
            .await;
        self.remove(&counts);
        tracing::debug!(
            accepted = counts.accepted.load(Ordering::Relaxed),
            trapped = result.is_err(),
            "shared instance ended"
        );
        queue.close();
        // Requests handed to it that it never started go back to their callers, which hand
        // them to another instance (a dropped reply).
        while queue.try_recv().is_ok() {}
        if let Err(trap) = result {
            let trap = anyhow::Error::from(trap);
            let deadline = trap
                .chain()
                .any(|c| c.downcast_ref() == Some(&wasmtime::Trap::Interrupt));
            let error = format!("{trap:#}");
            for (_, reply) in waiting.lock().unwrap().drain() {
                let _ = reply.send(Reply::Trapped {
                    deadline,
                    error: error.clone(),
                });
            }
        }
    }
}

/// Runs one request in a guest task of its own: whether it ran past the wall-clock limit. Its
/// invocation ends when the guest returns its response (later writes are refused); a body
/// longer than [`READ_AHEAD`](super::http_exports::READ_AHEAD) is streamed after the commit,
/// and counts as running on this instance until it was sent, within the same limit.
#[allow(clippy::too_many_arguments)]
async fn run(
    accessor: &Accessor<InstanceState>,
    http: &p3::bindings::Service,
    id: u64,
    req: HttpRequest,
    request_id: String,
    trace: opentelemetry::Context,
    policy: Policy,
    waiting: &Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    counts: &Counts,
) -> bool {
    let deadline = tokio::time::Instant::now() + policy.timeout;
    let handle = || http.wasi_http_handler().func_handle();
    let invocation = async {
        let (call, task) = accessor.with(|mut store| -> Result<_> {
            let request = p3_request(store.get(), &req)?;
            let request = store.get().table.push(request)?;
            let call = handle().start_call_concurrent(store.as_context_mut(), (request,))?;
            let task = call.task();
            store.get().open_task(task, &request_id, trace);
            Ok((call, task))
        })?;
        let response = async {
            let (response,) = handle().finish_call_concurrent(accessor, call).await?;
            let response =
                response.map_err(|code| anyhow!("component answered with error {code:?}"))?;
            accessor.with(|mut store| -> Result<_> {
                let response = store.get().table.delete(response)?;
                Ok(response.into_http(&mut store, async { Ok(()) })?)
            })
        }
        .await;
        let txn = accessor.with(|mut store| store.get().close_task(task));
        let passed = match response {
            Ok(response) => pass_on(response).await,
            Err(e) => Err(e),
        };
        anyhow::Ok((passed, txn.unwrap_or_default()))
    };
    let (reply, sent) = match tokio::time::timeout_at(deadline, invocation).await {
        Ok(Ok((Ok((response, sent)), txn))) => (Reply::Ran(Box::new((Ok(response), txn))), sent),
        Ok(Ok((Err(e), txn))) => (Reply::Ran(Box::new((Err(e), txn))), None),
        Ok(Err(e)) => (Reply::Ran(Box::new((Err(e), Txn::default()))), None),
        Err(_) => (Reply::TimedOut, None),
    };
    let mut timed_out = matches!(reply, Reply::TimedOut);
    if let Some(to) = waiting.lock().unwrap().remove(&id) {
        let _ = to.send(reply);
    }
    if let Some(sent) = sent {
        // Past the limit the instance ends, which cuts the body off.
        timed_out = tokio::time::timeout_at(deadline, sent).await.is_err();
    }
    counts.load.fetch_sub(1, Ordering::Relaxed);
    timed_out
}
