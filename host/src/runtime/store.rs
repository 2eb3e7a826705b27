//! An instance's store: its data (`InstanceState`, what each capability works on), limits and linker.

use super::engine::EPOCH_TICK;
use super::Runtime;
use crate::capabilities::async_state::{StateAccess, StateHost};
use crate::capabilities::config::ConfigView;
use crate::capabilities::exports::{handler, http_handler, incoming_handler};
use crate::capabilities::keyvalue::KeyValueView;
use crate::capabilities::otel::{self, OtelView};
use crate::capabilities::outgoing_http::NextHop;
use crate::capabilities::producer::ProducerView;
use crate::capabilities::services::{Outbound, ServicesView};
use crate::capabilities::state::StateView;
use crate::capabilities::stderr::GuestStderr;
use crate::capabilities::wasi_messaging::{self, MessagingView};
use crate::capabilities::{config, keyvalue, outgoing_http, producer, services, state};
use crate::capabilities::{spin, wasmcloud};
use crate::config::ServiceSpec;
use crate::storage::{StateStore, Txn};
use anyhow::Result;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use wasmtime::component::{GuestTaskId, Linker, ResourceTable};
use wasmtime::{
    CallHook, Engine, Store, StoreContextMut, StoreLimits, StoreLimitsBuilder, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::Proxy;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

pub struct InstanceState {
    pub(super) table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    state: Arc<dyn StateStore>,
    /// The service's name, which scopes its transactions.
    name: Arc<str>,
    /// The calling service, its allowlist and the request being served: what calls out need.
    outbound: Outbound,
    limits: StoreLimits,
    /// Epoch ticks the current invocation has computed for, against `budget`.
    ticks: u128,
    budget: u128,
    /// The guest's stderr, tagged with the request being served.
    stderr: GuestStderr,
    /// Host bytes each invocation may make the host hold.
    host_bytes: usize,
    pub(super) txn: Txn,
    /// In an instance that serves several requests at once: the invocations of the tasks not
    /// running now. The fields above always hold the invocation of the task that runs.
    tasks: Option<Box<Tasks>>,
}

/// The invocations of a shared instance, by the guest task that serves each.
#[derive(Default)]
struct Tasks {
    /// Whose invocation the store's fields hold, and whether it is open.
    current: Option<GuestTaskId>,
    current_open: bool,
    parked: HashMap<GuestTaskId, Invocation>,
}

/// What belongs to one invocation in a shared instance.
struct Invocation {
    txn: Txn,
    request_id: String,
    trace: opentelemetry::Context,
    ticks: u128,
    /// Still open: a task that runs on after its invocation ended (or that no invocation
    /// started) gets a transaction that refuses every write, and is not parked.
    open: bool,
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for InstanceState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

impl NextHop for InstanceState {
    fn next_hop(&self) -> Option<&str> {
        self.outbound.caller.next.as_deref()
    }
}

impl InstanceState {
    pub(super) fn state(&mut self) -> StateView<'_> {
        StateView {
            store: &*self.state,
            txn: &mut self.txn,
        }
    }

    pub(super) fn keyvalue(&mut self) -> KeyValueView<'_> {
        KeyValueView {
            state: StateView {
                store: &*self.state,
                txn: &mut self.txn,
            },
            table: &mut self.table,
            stores: &self.outbound.caller.key_value_stores,
        }
    }

    pub(super) fn config(&mut self) -> ConfigView<'_> {
        ConfigView {
            values: &self.outbound.caller.config.0,
        }
    }

    pub(super) fn otel(&mut self) -> OtelView<'_> {
        OtelView {
            service: &self.name,
            request_id: &self.outbound.request_id,
            trace: &self.outbound.trace,
        }
    }

    pub(super) fn services(&mut self) -> ServicesView<'_> {
        ServicesView {
            outbound: &self.outbound,
            budget: &mut self.txn.budget,
        }
    }

    pub(super) fn producer(&mut self) -> ProducerView<'_> {
        producer_view(&mut self.txn, &self.outbound)
    }

    pub(super) fn messaging(&mut self) -> MessagingView<'_> {
        MessagingView {
            producer: producer_view(&mut self.txn, &self.outbound),
            table: &mut self.table,
            clients: &self.outbound.caller.messaging_clients,
        }
    }

    /// Ends the current invocation's side effects on the log.
    pub(super) fn end(&mut self) {
        self.stderr.end();
    }

    /// Makes this store serve several invocations at once, one per guest task: host calls
    /// work on the invocation of the task that made them (see `switch_to`).
    pub(super) fn share(&mut self) {
        self.tasks = Some(Box::default());
        self.txn = Txn::limited(self.name.clone(), 0);
    }

    /// Starts an invocation for the guest task `task` of a shared store. (A task id is reused
    /// once its task ended: it may be the one whose ended invocation the fields still hold.)
    pub(super) fn open_task(
        &mut self,
        task: GuestTaskId,
        request_id: &str,
        trace: opentelemetry::Context,
    ) {
        let Some(tasks) = &mut self.tasks else { return };
        let invocation = Invocation {
            txn: Txn::limited(self.name.clone(), self.host_bytes),
            request_id: request_id.to_string(),
            trace,
            ticks: 0,
            open: true,
        };
        if tasks.current == Some(task) {
            tasks.current_open = true;
            self.txn = invocation.txn;
            self.outbound.request_id = invocation.request_id;
            self.outbound.trace = invocation.trace;
            self.ticks = 0;
            self.stderr.begin(request_id);
        } else {
            tasks.parked.insert(task, invocation);
        }
    }

    /// Ends `task`'s invocation: its transaction. What the task does after this is refused.
    pub(super) fn close_task(&mut self, task: GuestTaskId) -> Option<Txn> {
        let tasks = self.tasks.as_mut()?;
        if tasks.current == Some(task) {
            tasks.current_open = false;
            self.stderr.end();
            let closed = Txn::limited(self.name.clone(), 0);
            Some(std::mem::replace(&mut self.txn, closed))
        } else {
            tasks.parked.remove(&task).map(|i| i.txn)
        }
    }

    /// Puts the invocation of `task` (the root of the guest's current call stack) into the
    /// store's fields, parking the one there. Called on every host call and epoch tick of a
    /// shared store, so that state, events, peer calls, logs and CPU time go to the invocation
    /// whose task made them.
    fn switch_to(&mut self, task: GuestTaskId) {
        let Some(tasks) = &mut self.tasks else { return };
        if tasks.current == Some(task) {
            return;
        }
        let incoming = tasks.parked.remove(&task).unwrap_or_else(|| Invocation {
            txn: Txn::limited(self.name.clone(), 0),
            request_id: String::new(),
            trace: opentelemetry::Context::new(),
            ticks: 0,
            open: false,
        });
        let open = std::mem::replace(&mut tasks.current_open, incoming.open);
        let outgoing = Invocation {
            txn: std::mem::replace(&mut self.txn, incoming.txn),
            request_id: std::mem::replace(&mut self.outbound.request_id, incoming.request_id),
            trace: std::mem::replace(&mut self.outbound.trace, incoming.trace),
            ticks: std::mem::replace(&mut self.ticks, incoming.ticks),
            open,
        };
        if let Some(current) = tasks.current.replace(task) {
            if outgoing.open {
                tasks.parked.insert(current, outgoing);
            }
        }
        self.stderr.begin(&self.outbound.request_id);
    }

    /// Starts a new invocation in this store: a new transaction, request id, trace context and
    /// CPU budget.
    pub(super) fn begin(&mut self, request_id: &str, trace: opentelemetry::Context) {
        request_id.clone_into(&mut self.outbound.request_id);
        self.outbound.trace = trace;
        self.stderr.begin(request_id);
        self.txn = Txn::limited(self.name.clone(), self.host_bytes);
        self.ticks = 0;
    }
}

/// What `send` works on, in either producer interface.
fn producer_view<'a>(txn: &'a mut Txn, outbound: &'a Outbound) -> ProducerView<'a> {
    ProducerView {
        txn,
        allowed_topics: &outbound.caller.produces,
        request_id: &outbound.request_id,
        trace: &outbound.trace,
    }
}

impl StateHost for InstanceState {
    /// The guest task whose invocation is the store's, in an instance shared by several.
    type Invocation = Option<GuestTaskId>;

    fn invocation(&self) -> Option<GuestTaskId> {
        self.tasks.as_ref().and_then(|tasks| tasks.current)
    }

    fn resume(&mut self, invocation: Option<GuestTaskId>) {
        if let Some(task) = invocation {
            self.switch_to(task);
        }
    }

    fn keyvalue(&mut self) -> KeyValueView<'_> {
        InstanceState::keyvalue(self)
    }

    fn state_store(&self) -> Arc<dyn StateStore> {
        self.state.clone()
    }

    fn config_values(&self) -> &BTreeMap<String, String> {
        &self.outbound.caller.config.0
    }
}

/// How a component answers HTTP: `http-handler` when it exports it, else `wasi:http` 0.3, else
/// 0.2.
pub(super) enum HttpEntry {
    Handler(http_handler::Guest),
    WasiHttp3(wasmtime_wasi_http::p3::bindings::Service),
    WasiHttp(Proxy),
    /// A message handler alone.
    Absent,
}

/// How a subscribing component is handed messages: `handler` when it exports it, else
/// `wasi:messaging`'s `incoming-handler`.
pub(super) enum MessageEntry {
    Handler(handler::Guest),
    WasiMessaging(incoming_handler::Guest),
}

/// An instantiated component with its store, ready for an invocation (see `pool`).
pub struct Instance {
    pub(super) store: Store<InstanceState>,
    pub(super) entry: HttpEntry,
    /// The message handler, for subscribing services.
    pub(super) handler: Option<MessageEntry>,
    /// Invocations it has served.
    pub(super) served: u32,
}

/// Everything a service's store needs from the host, linked once per engine; with `wasi3`,
/// WASI 0.3 beside 0.2 (a component built for wasm32-wasip2 that exports
/// `wasi:http/handler@0.3.0` still imports std's 0.2 `wasi:cli` and `wasi:io`).
pub fn linker(engine: &Engine, wasi3: bool) -> Result<Linker<InstanceState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    outgoing_http::add_to_linker(&mut linker)?;
    if wasi3 {
        wasmtime_wasi::p3::add_to_linker(&mut linker)?;
        outgoing_http::add_wasi3_to_linker(&mut linker)?;
        outgoing_http::add_wasi3_handler_to_linker(&mut linker)?;
        spin::add_to_linker::<InstanceState, InstanceState>(&mut linker, |state| {
            StateAccess(state)
        })?;
        wasmcloud::add_to_linker::<InstanceState, InstanceState>(&mut linker, |state| {
            StateAccess(state)
        })?;
    }
    state::add_to_linker(&mut linker, InstanceState::state)?;
    keyvalue::add_to_linker(&mut linker, InstanceState::keyvalue)?;
    config::add_to_linker(&mut linker, InstanceState::config)?;
    producer::add_to_linker(&mut linker, InstanceState::producer)?;
    wasi_messaging::add_to_linker(&mut linker, InstanceState::messaging)?;
    services::add_to_linker(&mut linker, InstanceState::services)?;
    otel::add_to_linker(&mut linker, InstanceState::otel)?;
    Ok(linker)
}

/// A store for a new instance of the service `spec` describes.
pub(super) fn new_store(
    runtime: &Runtime,
    engine: &Engine,
    spec: &Arc<ServiceSpec>,
    name: &Arc<str>,
) -> Store<InstanceState> {
    let stderr = GuestStderr::new(name.clone());
    let ctx = InstanceState {
        table: ResourceTable::new(),
        // No preopens, no environment, no sockets: a component reaches the world only
        // through wasi:http (to the services it may call) and the platform interfaces.
        // (wasmtime-wasi denies socket creation by default; said here so that a change of
        // that default cannot open them.)
        wasi: WasiCtx::builder()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build(),
        http: WasiHttpCtx::new(),
        state: runtime.state.clone(),
        name: name.clone(),
        outbound: Outbound {
            caller: spec.clone(),
            timeout: runtime.settings.outbound_timeout,
            response_bytes: runtime.settings.invocation_host_bytes,
            peers: runtime.peers.clone(),
            outside: runtime.outside.clone(),
            request_id: String::new(), // set by `begin`
            trace: opentelemetry::Context::new(),
        },
        limits: StoreLimitsBuilder::new()
            .memory_size(usize::try_from(spec.limits.memory).unwrap_or(usize::MAX))
            .build(),
        ticks: 0,
        budget: spec.limits.cpu.as_millis() / EPOCH_TICK.as_millis().max(1),
        stderr,
        host_bytes: runtime.settings.invocation_host_bytes,
        txn: Txn::new(name.clone()),
        tasks: None,
    };
    let mut store = Store::new(engine, ctx);
    store.limiter(|ctx| &mut ctx.limits);
    // The callback runs once per epoch tick the guest spends computing (waiting in host calls
    // does not tick it), so counting calls measures guest compute time. Each tick also yields
    // to the executor, so a busy guest cannot hog a worker thread.
    store.epoch_deadline_callback(|mut ctx| {
        switch_task(&mut ctx);
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

/// In a shared store, makes the invocation of the guest task now running the store's own.
fn switch_task(ctx: &mut StoreContextMut<'_, InstanceState>) {
    if ctx.data().tasks.is_none() {
        return;
    }
    let root = ctx.async_call_stack().ok().and_then(|stack| stack.last());
    if let Some(task) = root {
        ctx.data_mut().switch_to(task);
    }
}

/// Makes `store` serve several invocations at once (see [`InstanceState::share`]).
pub(super) fn share(store: &mut Store<InstanceState>) {
    store.data_mut().share();
    store.call_hook(|mut ctx, hook| {
        if matches!(hook, CallHook::CallingHost) {
            switch_task(&mut ctx);
        }
        Ok(())
    });
}
