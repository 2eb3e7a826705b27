//! An instance's store: its data (`InstanceState`, what each capability works on), limits and linker.

use super::engine::EPOCH_TICK;
use super::Runtime;
use crate::capabilities::exports::{handler, http_handler};
use crate::capabilities::producer::ProducerView;
use crate::capabilities::services::{Outbound, ServicesView};
use crate::capabilities::state::StateView;
use crate::capabilities::stderr::GuestStderr;
use crate::capabilities::{outgoing_http, producer, services, state};
use crate::config::ServiceSpec;
use crate::storage::{StateStore, Txn};
use anyhow::Result;
use std::sync::Arc;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
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

impl InstanceState {
    pub(super) fn state(&mut self) -> StateView<'_> {
        StateView {
            store: &*self.state,
            txn: &mut self.txn,
        }
    }

    pub(super) fn services(&mut self) -> ServicesView<'_> {
        ServicesView {
            outbound: &self.outbound,
            budget: &mut self.txn.budget,
        }
    }

    pub(super) fn producer(&mut self) -> ProducerView<'_> {
        ProducerView {
            txn: &mut self.txn,
            allowed_topics: &self.outbound.caller.produces,
            request_id: &self.outbound.request_id,
        }
    }

    /// Ends the current invocation's side effects on the log.
    pub(super) fn end(&mut self) {
        self.stderr.end();
    }

    /// Starts a new invocation in this store: a new transaction, request id and CPU budget.
    pub(super) fn begin(&mut self, request_id: &str) {
        request_id.clone_into(&mut self.outbound.request_id);
        self.stderr.begin(request_id);
        self.txn = Txn::limited(self.name.clone(), self.host_bytes);
        self.ticks = 0;
    }
}

/// How a component answers HTTP: `http-handler` when it exports it, else `wasi:http` 0.3, else
/// 0.2.
pub(super) enum HttpEntry {
    Handler(http_handler::Guest),
    WasiHttp3(wasmtime_wasi_http::p3::bindings::Service),
    WasiHttp(Proxy),
}

/// An instantiated component with its store, ready for an invocation (see `pool`).
pub struct Instance {
    pub(super) store: Store<InstanceState>,
    pub(super) entry: HttpEntry,
    /// The message handler, for subscribing services.
    pub(super) handler: Option<handler::Guest>,
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
    }
    state::add_to_linker(&mut linker, InstanceState::state)?;
    producer::add_to_linker(&mut linker, InstanceState::producer)?;
    services::add_to_linker(&mut linker, InstanceState::services)?;
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
            peers: runtime.peers.clone(),
            request_id: String::new(), // set by `begin`
        },
        limits: StoreLimitsBuilder::new()
            .memory_size(usize::try_from(spec.limits.memory).unwrap_or(usize::MAX))
            .build(),
        ticks: 0,
        budget: spec.limits.cpu.as_millis() / EPOCH_TICK.as_millis().max(1),
        stderr,
        host_bytes: runtime.settings.invocation_host_bytes,
        txn: Txn::new(name.clone()),
    };
    let mut store = Store::new(engine, ctx);
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
