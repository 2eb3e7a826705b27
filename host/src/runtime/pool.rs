//! Instances ready for an invocation: a fresh one, or one reused from its version's idle list.

use super::component::{HttpExport, Loaded, MessageExport};
use super::service::Service;
use super::store::{new_store, HttpEntry, Instance, MessageEntry};
use super::Runtime;
use crate::storage::Txn;
use anyhow::Result;
use std::sync::Arc;

impl Instance {
    /// An idle instance of `loaded` if instances are reused and one is free, else a new one.
    pub(super) async fn get(
        runtime: &Runtime,
        service: &Service,
        loaded: &Loaded,
    ) -> Result<Instance> {
        if reuse(runtime, service) > 1 {
            if let Some(idle) = loaded.idle.lock().unwrap().pop() {
                return Ok(idle);
            }
        }
        Instance::new(runtime, service, loaded).await
    }

    /// A new instance of `loaded`.
    pub(super) async fn new(
        runtime: &Runtime,
        service: &Service,
        loaded: &Loaded,
    ) -> Result<Instance> {
        let engine = loaded.pre.component().engine();
        let mut store = new_store(runtime, engine, &service.spec, &service.name);
        service.instances.inc();
        let instance = loaded.pre.instantiate_async(&mut store).await?;
        let entry = match &loaded.http {
            HttpExport::Handler(indices) => {
                HttpEntry::Handler(indices.load(&mut store, &instance)?)
            }
            HttpExport::WasiHttp3(indices) => {
                HttpEntry::WasiHttp3(indices.load(&mut store, &instance)?)
            }
            HttpExport::WasiHttp(indices) => {
                HttpEntry::WasiHttp(indices.load(&mut store, &instance)?)
            }
            HttpExport::Absent => HttpEntry::Absent,
        };
        let handler = match &loaded.handler {
            Some(MessageExport::Handler(indices)) => {
                Some(MessageEntry::Handler(indices.load(&mut store, &instance)?))
            }
            Some(MessageExport::WasiMessaging(indices)) => Some(MessageEntry::WasiMessaging(
                indices.load(&mut store, &instance)?,
            )),
            None => None,
        };
        Ok(Instance {
            store,
            entry,
            handler,
            served: 0,
        })
    }

    /// Ends an invocation: returns its transaction, and keeps the instance for another request
    /// if the call ended cleanly (`clean`: no trap, and no resource left behind), reuse is on,
    /// it has requests left and its version is still the current one. Otherwise dropping it
    /// frees its slot and everything the guest left in it; a trapped instance may not be
    /// entered again.
    pub(super) fn finish(
        mut self,
        clean: bool,
        runtime: &Runtime,
        service: &Service,
        loaded: &Arc<Loaded>,
    ) -> Txn {
        let txn = std::mem::take(&mut self.store.data_mut().txn);
        self.store.data_mut().end();
        self.served += 1;
        if !clean
            || !self.store.data().table.is_empty()
            || self.served >= reuse(runtime, service)
            || !Arc::ptr_eq(&service.loaded.load(), loaded)
        {
            return txn;
        }
        let mut idle = loaded.idle.lock().unwrap();
        if idle.len() < runtime.settings.idle_max {
            idle.push(self);
        }
        txn
    }
}

/// Requests one instance of `service` serves: its manifest's `instances.reuse`, else the host's
/// `--instance-reuse`.
pub(super) fn reuse(runtime: &Runtime, service: &Service) -> u32 {
    (service.spec.instances.reuse).unwrap_or(runtime.settings.instance_reuse)
}
