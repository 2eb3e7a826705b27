//! The runtime: one engine, the loaded services, and invocations of their components.

pub mod admission;
pub mod cache;
mod commit;
pub mod component;
pub mod engine;
mod failure;
mod http_exports;
pub mod invoke;
mod pool;
pub mod service;
mod settings;
mod shared;
mod store;
mod versions;

use crate::capabilities::outbound::OutboundClient;
use crate::capabilities::services::ServiceCalls;
use crate::config::{Args, ServiceSpec};
use crate::messaging::{Backend, Drainer};
use crate::storage::StateStore;
use crate::types::{HttpRequest, HttpResponse};
use admission::Caller;
use anyhow::Result;
use arc_swap::ArcSwap;
use component::HttpExport;
use futures_util::future::BoxFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

pub use service::{RejectedFile, Service};
pub use settings::Settings;
pub use store::InstanceState;
pub use versions::{ManifestStatus, VersionMoveError};

pub struct Runtime {
    engines: Arc<component::Engines>,
    state: Arc<dyn StateStore>,
    drainer: Drainer,
    backend: Arc<dyn Backend>,
    /// The services of the applied manifest; empty until they are loaded (the admin listener
    /// runs before that). Replaced as a whole by a manifest change: invocations in flight keep
    /// the `Arc<Service>` they started with.
    services: ArcSwap<Vec<Arc<Service>>>,
    /// The manifest the services come from, and what became of its last change.
    manifest: Mutex<ManifestStatus>,
    /// Held while the version history of services changes hands (a manifest change installing
    /// its services) and while a rollback or roll-forward moves it: neither undoes the other.
    versions: Mutex<()>,
    /// The largest memory limit an instance can have: the engine reserved slots this large at
    /// start-up.
    max_memory: u64,
    ready: AtomicBool,
    /// Last result of the messaging backend's health check.
    backend_up: Arc<AtomicBool>,
    settings: Settings,
    /// What the `services` capability of every store calls back into.
    peers: Arc<dyn ServiceCalls>,
    /// Where requests to origins outside the host go.
    outside: OutboundClient,
}

/// The host as readiness and metrics report it.
pub struct Health {
    pub ready: bool,
    /// The messaging backend, described.
    pub messaging: String,
    /// Whether the backend answered its last health check.
    pub messaging_reachable: bool,
    pub outbox_depth: Option<u64>,
    pub outbox_parked: Option<u64>,
    pub outbox_bytes: u64,
    /// Bytes of the embedded message log (`None` with a broker).
    pub log_bytes: Option<u64>,
}

/// A service whose component could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{}: service.{}.component: {error:#}", spec.at, spec.name)]
pub struct LoadError {
    pub spec: ServiceSpec,
    pub error: anyhow::Error,
}

impl Runtime {
    /// The engine and linker over `state` and `backend`; no component loaded yet.
    pub fn new(
        args: &Args,
        specs: &[ServiceSpec],
        state: Arc<dyn StateStore>,
        backend: Arc<dyn Backend>,
    ) -> Result<Arc<Runtime>> {
        let max_memory = specs
            .iter()
            .map(|s| s.limits.memory)
            .max()
            .unwrap_or(64 << 20);
        let engines = Arc::new(component::Engines::new(args.max_instances, max_memory)?);
        let outside = OutboundClient::new(args.outbound_ca_file.as_deref(), args.outbound_timeout)?;
        Ok(Arc::new_cyclic(|me| Runtime {
            engines,
            drainer: Drainer::new(state.clone()),
            state,
            backend,
            services: ArcSwap::default(),
            versions: Mutex::new(()),
            manifest: Mutex::new(ManifestStatus {
                path: args.manifest.clone(),
                sha256: String::new(),
                generation: 0,
                applied_at: SystemTime::now(),
                rejected: None,
            }),
            max_memory,
            ready: AtomicBool::new(false),
            backend_up: Arc::new(AtomicBool::new(true)),
            settings: Settings::new(args, specs.len()),
            // Weak: idle instances' stores hold it, and the runtime holds them.
            peers: Arc::new(RuntimeServices(me.clone())),
            outside,
        }))
    }

    /// The services `specs` describe, ready to be installed: each new or changed component
    /// compiled (or taken from the cache) and pre-instantiated and checked; a service whose
    /// spec is unchanged is the running one, and one whose settings changed keeps its component
    /// and version history. Nothing changes for running services until [`Runtime::install`].
    pub async fn prepare(&self, specs: Vec<ServiceSpec>) -> Result<Vec<Arc<Service>>, LoadError> {
        let running = self.services();
        let mut services = Vec::new();
        for spec in specs {
            let old = running.iter().find(|s| s.name == spec.name);
            if let Some(old) = old.filter(|old| *old.spec == spec) {
                services.push(old.clone());
                continue;
            }
            if spec.limits.memory > self.max_memory {
                let error = anyhow::anyhow!(
                    "limits.memory {} bytes is above the largest instance the host reserved at \
                     start-up ({} bytes, the largest limit then); restart the host to raise it",
                    spec.limits.memory,
                    self.max_memory
                );
                return Err(LoadError { spec, error });
            }
            // Same file, and it exports what the service now needs (a message handler if it
            // subscribes, an HTTP handler if it has a port): no reload.
            let reusable = old.map(|o| o.loaded.load_full()).filter(|l| {
                l.path == spec.file
                    && (spec.subscribes.is_empty() || l.handler.is_some())
                    && (!spec.serves_http || !matches!(l.http, HttpExport::Absent))
            });
            let service = match (old, reusable) {
                (Some(old), Some(loaded)) => old.reconfigured(spec, loaded.fresh(), false),
                (old, _) => {
                    let loaded =
                        match component::load(&self.engines, &spec, &self.settings.compile_cache)
                            .await
                        {
                            Ok(loaded) => loaded,
                            Err(error) => return Err(LoadError { spec, error }),
                        };
                    tracing::info!(
                        service = %spec.name,
                        port = spec.port,
                        path = %loaded.path.display(),
                        sha256 = %loaded.sha256,
                        "component loaded"
                    );
                    match old {
                        Some(old) => old.reconfigured(spec, loaded, true),
                        None => Service::new(spec, loaded, self.settings.queue),
                    }
                }
            };
            services.push(Arc::new(service));
        }
        Ok(services)
    }

    /// Makes `services` the ones requests, calls and consumers find from now on. A service that
    /// replaces a running one takes over its version history as it is now: a rollback made
    /// while the change was being prepared (compiling, say) is kept, not undone.
    pub fn install(&self, services: Vec<Arc<Service>>) {
        let _versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        let running = self.services();
        for new in &services {
            let old = running.iter().find(|o| o.name == new.name);
            if let Some(old) = old.filter(|old| !Arc::ptr_eq(old, new)) {
                new.take_history_from(old);
            }
        }
        let services = Arc::new(services);
        self.services.store(services.clone());
        // Instances of a replaced or removed service were made for its old settings: they
        // finish what they serve and take nothing more.
        for old in running.iter() {
            if !services.iter().any(|new| Arc::ptr_eq(new, old)) {
                old.loaded.load().retire();
            }
        }
    }

    pub fn services(&self) -> Arc<Vec<Arc<Service>>> {
        self.services.load_full()
    }

    pub fn service(&self, name: &str) -> Option<Arc<Service>> {
        self.services
            .load()
            .iter()
            .find(|s| &*s.name == name)
            .cloned()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Whether `/readyz` says the host takes traffic: from start-up until shutdown begins.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// A runtime with no services on an in-memory store and the embedded log, for tests.
    #[cfg(test)]
    pub(crate) fn in_memory(args: &Args) -> Arc<Runtime> {
        let db = crate::storage::RedbStore::in_memory().unwrap();
        let log = crate::messaging::embedded::Embedded::new(db.clone());
        Runtime::new(args, &[], Arc::new(db), Arc::new(log)).unwrap()
    }

    /// Messages waiting in the outbox (0 if the store cannot say).
    pub fn outbox_depth(&self) -> u64 {
        self.state.outbox().depth().unwrap_or(0)
    }

    /// What readiness and metrics report, as of now.
    pub fn health(&self) -> Health {
        let outbox = self.state.outbox();
        Health {
            ready: self.is_ready(),
            messaging: self.backend.describe(),
            messaging_reachable: self.backend_up.load(Ordering::Acquire),
            outbox_depth: outbox.depth().ok(),
            outbox_parked: outbox.parked().ok(),
            outbox_bytes: outbox.bytes(),
            log_bytes: self.backend.stored_bytes(),
        }
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Compiles `bytes` (with digest `sha256`) as a new version of `service`, checked as at
    /// start-up, through the compile cache; nothing changes until it is installed.
    pub async fn compile(
        &self,
        service: &Service,
        bytes: Vec<u8>,
        sha256: String,
    ) -> Result<component::Loaded> {
        let cache = &self.settings.compile_cache;
        component::prepare(&self.engines, &service.spec, bytes, sha256, cache).await
    }

    /// Publishes the outbox, forever (see [`Drainer::drain`]).
    pub fn drain_outbox(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.drainer.clone().drain(self.backend.clone())
    }

    /// Checks the messaging backend's health every second, forever, for [`Runtime::health`].
    pub fn watch_backend(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let depth = self.drainer.clone();
        crate::messaging::watch_health(self.backend.clone(), self.backend_up.clone(), move || {
            depth.depth().unwrap_or(0)
        })
    }

    /// Returns once the writes of the message handlers that ran so far are durable: before
    /// their records' offsets are committed. With a backend that keeps its offsets in the
    /// state store, they are written in order after the handlers' writes, and a crash loses
    /// both together, so there is nothing to wait for.
    pub async fn handled_writes_durable(&self) -> Result<()> {
        if self.backend.in_state_store() {
            return Ok(());
        }
        self.state.durable().await
    }
}

/// The services of a runtime, as the `services` capability calls them.
struct RuntimeServices(Weak<Runtime>);

impl ServiceCalls for RuntimeServices {
    fn exists(&self, name: &str) -> bool {
        self.0
            .upgrade()
            .is_some_and(|rt| rt.service(name).is_some())
    }

    fn call<'a>(
        &'a self,
        name: &'a str,
        req: HttpRequest,
        request_id: &'a str,
        trace: opentelemetry::Context,
    ) -> BoxFuture<'a, Option<HttpResponse>> {
        Box::pin(async move {
            let runtime = self.0.upgrade()?;
            let target = runtime.service(name)?;
            if let Some(delay) = target.spec.latency {
                tokio::time::sleep(delay).await;
            }
            // The callee runs as a task of its own: the caller's call is polled inside its
            // store's event loop, where no other store may run. Dropping the call (the
            // caller's timeout) still stops the callee.
            let request_id = request_id.to_string();
            let callee = tokio::spawn(async move {
                let caller = Caller::Service;
                invoke::http(&runtime, &target, req, &request_id, caller, &trace).await
            });
            tokio_util::task::AbortOnDropHandle::new(callee).await.ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../build/fixtures")
            .join(name);
        assert!(
            file.exists(),
            "no {}: run `just build-fixtures`",
            file.display()
        );
        file
    }

    /// A manifest change prepared while the service was rolled back installs the rolled-back
    /// version, not the one it saw when it began.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_rollback_while_a_manifest_change_is_prepared_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let args = Args::parse_from([
            "host",
            "--max-instances",
            "4",
            "--compile-cache",
            cache.to_str().unwrap(),
        ]);
        let runtime = Runtime::in_memory(&args);
        let file = dir.path().join("user.wasm");
        let mut spec = ServiceSpec::named("user");
        spec.file = file.clone();
        std::fs::copy(fixture("user-a.wasm"), &file).unwrap();
        runtime.install(runtime.prepare(vec![spec.clone()]).await.unwrap());
        let a = runtime
            .service("user")
            .unwrap()
            .loaded
            .load()
            .sha256
            .clone();
        // Swapped to b, as the watcher does when the file changes.
        std::fs::copy(fixture("user-b.wasm"), &file).unwrap();
        let b = component::load(&runtime.engines, &spec, &runtime.settings.compile_cache)
            .await
            .unwrap();
        runtime.service("user").unwrap().install(b);
        // A manifest change of its limits is prepared (while b runs), then the operator rolls
        // back to a before it is installed.
        spec.limits.concurrency = 8;
        let prepared = runtime.prepare(vec![spec]).await.unwrap();
        let (generation, rolled) = runtime.service("user").unwrap().rollback().unwrap();
        assert_eq!((generation, &rolled.sha256), (3, &a));
        runtime.install(prepared);
        let user = runtime.service("user").unwrap();
        assert_eq!(user.loaded.load().sha256, a, "the rollback was undone");
        assert_eq!(user.generation(), 3);
        assert_eq!(user.spec.limits.concurrency, 8);
        // And what the rollback left can be rolled forward to.
        assert_ne!(user.rollforward().unwrap().1.sha256, a);
    }
}
