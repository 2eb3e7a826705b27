//! Loaded components: the engine, compiling and pre-instantiating each service's file.

use crate::bindings::{self, SubscriberPre};
use crate::config::ServiceSpec;
use crate::invocation::Ctx;
use anyhow::{Context as _, Result};
use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use wasmtime::component::{Component, ComponentExportIndex, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

/// How often the epoch advances: the granularity at which running guests yield.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// One engine for all services, with instance slots reserved up front (pooling allocator) so
/// that a fresh instance per request costs a few microseconds.
/// `max_memory` is the largest memory limit of any service: the per-store limiter enforces each
/// service's own.
pub fn engine(max_instances: u32, max_memory: u64) -> Result<Engine> {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(max_instances)
        // A Rust component is a handful of core modules; only the main one has a memory.
        .total_core_instances(max_instances * 8)
        .total_memories(max_instances)
        .total_tables(max_instances * 8)
        .total_stacks(max_instances)
        .max_memory_size(usize::try_from(max_memory)?)
        // Reset a returned slot's first pages with memset instead of giving them back to the
        // kernel: unmapping makes every instance page-fault its memory in again and costs TLB
        // shootdowns across cores (a fifth of all CPU time under load, measured with perf).
        .linear_memory_keep_resident(512 << 10)
        .table_keep_resident(64 << 10)
        .async_stack_keep_resident(256 << 10)
        // Reuse slots a component already used before touching new ones: the slots ever used
        // (and kept resident) are then as many as instances ever ran at once, not up to
        // `max_instances` (RSS after a load: 210 MB with the default of 100 warm slots).
        .max_unused_warm_slots(0)
        // Where the kernel has PAGEMAP_SCAN (Linux 6.7+), reset only the pages an instance
        // dirtied instead of memsetting (and copying the data image over) all of the resident
        // part: a third of a fresh instance's cost in perf.
        .pagemap_scan(wasmtime::Enabled::Auto);
    let mut config = Config::new();
    config
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .epoch_interruption(true)
        // Nothing here uses the component model's async ABI (wasip3); without it every store
        // and every host call skips wasmtime's task bookkeeping for concurrent guests.
        .concurrency_support(false);
    let engine = Engine::new(&config)?;
    // One ticker per engine, never per request.
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("epoch-ticker".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })?;
    Ok(engine)
}

/// Everything a service's store needs from the host, linked once.
pub fn linker(engine: &Engine) -> Result<Linker<Ctx>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    bindings::state::add_to_linker::<Ctx, crate::state::StateData>(&mut linker, Ctx::state)?;
    bindings::producer::add_to_linker::<Ctx, crate::messaging::ProducerData>(
        &mut linker,
        Ctx::producer,
    )?;
    bindings::services::add_to_linker::<Ctx, crate::services::ServicesData>(
        &mut linker,
        Ctx::services,
    )?;
    Ok(linker)
}

const HTTP_HANDLER: &str = "microsvc:platform/http-handler@0.1.0";

/// A component ready to be instantiated per request.
pub struct Loaded {
    pub proxy: ProxyPre<Ctx>,
    /// `microsvc:platform/http-handler#handle`, if the component exports it: HTTP requests then
    /// go through it instead of `wasi:http` (same request, far fewer host calls).
    pub handler: Option<ComponentExportIndex>,
    pub subscriber: Option<SubscriberPre<Ctx>>,
    pub path: PathBuf,
    pub sha256: String,
    pub loaded_at: SystemTime,
    /// Instances that served a request and may serve another (INSTANCE_REUSE > 1); they belong
    /// to this version, so a swap never hands a request to an old instance.
    pub idle: Mutex<Vec<crate::invocation::Warm>>,
}

pub struct Service {
    pub spec: ServiceSpec,
    /// Cheap to read on every request; replaced as a whole when the component changes.
    /// In-flight invocations keep the `Arc` they started with, so they finish on that version.
    pub loaded: ArcSwap<Loaded>,
    pub name: Arc<str>,
    /// One per request in flight; none left means 503.
    pub permits: Arc<tokio::sync::Semaphore>,
    /// Held by invocations re-running after a commit conflict: under contention (every
    /// `POST /users` increments one counter) re-runs take turns instead of conflicting again.
    pub rerun: Arc<tokio::sync::Mutex<()>>,
    /// This service's request latency histogram, looked up once instead of per request.
    pub latency: prometheus_client::metrics::histogram::Histogram,
    pub instances: prometheus_client::metrics::counter::Counter,
    swaps: Mutex<Swaps>,
}

/// A file that was offered as a new version and refused.
#[derive(Clone, Debug)]
pub struct Rejected {
    pub sha256: String,
    pub error: String,
    pub at: SystemTime,
}

#[derive(Default)]
struct Swaps {
    generation: u64,
    /// Versions replaced by swaps, oldest first, for rollback.
    previous: Vec<Arc<Loaded>>,
    rejected: Option<Rejected>,
}

/// How many replaced versions are kept for rollback.
const HISTORY: usize = 8;

impl Service {
    pub fn new(spec: ServiceSpec, loaded: Loaded) -> Service {
        Service {
            name: spec.name.into(),
            permits: Arc::new(tokio::sync::Semaphore::new(spec.limits.concurrency)),
            rerun: Arc::default(),
            latency: crate::metrics::get()
                .latency
                .get_or_create(&crate::metrics::labels([("service", spec.name)]))
                .clone(),
            instances: crate::metrics::get()
                .instances
                .get_or_create(&crate::metrics::labels([("service", spec.name)]))
                .clone(),
            spec,
            loaded: ArcSwap::from_pointee(loaded),
            swaps: Mutex::new(Swaps {
                generation: 1,
                ..Swaps::default()
            }),
        }
    }

    /// 1 for the version loaded at start-up, +1 per swap or rollback.
    pub fn generation(&self) -> u64 {
        self.swaps.lock().unwrap().generation
    }

    pub fn rejected(&self) -> Option<Rejected> {
        self.swaps.lock().unwrap().rejected.clone()
    }

    /// Makes `new` the version new invocations use.
    pub fn install(&self, new: Loaded) -> u64 {
        let mut swaps = self.swaps.lock().unwrap();
        let old = self.loaded.swap(Arc::new(new));
        // Kept for rollback, but its idle instances would only hold pool slots.
        old.idle.lock().unwrap().clear();
        swaps.previous.push(old);
        if swaps.previous.len() > HISTORY {
            swaps.previous.remove(0);
        }
        swaps.generation += 1;
        swaps.generation
    }

    pub fn reject(&self, sha256: String, error: String) {
        self.swaps.lock().unwrap().rejected = Some(Rejected {
            sha256,
            error,
            at: SystemTime::now(),
        });
    }

    /// Goes back to the version before the current one; `None` if there is none.
    pub fn rollback(&self) -> Option<(u64, Arc<Loaded>)> {
        let mut swaps = self.swaps.lock().unwrap();
        let prev = swaps.previous.pop()?;
        self.loaded.store(prev.clone());
        swaps.generation += 1;
        Some((swaps.generation, prev))
    }
}

/// Reads, compiles (off the async workers) and pre-instantiates `spec`'s component, checking
/// that it exports what the service needs.
pub async fn load(
    engine: &Engine,
    linker: &Linker<Ctx>,
    spec: &ServiceSpec,
    cache_dir: &Path,
) -> Result<Loaded> {
    let (bytes, sha256) = read(&spec.file).await?;
    prepare(engine, linker, spec, bytes, sha256, cache_dir).await
}

/// The file's bytes and their sha256 (hex).
pub async fn read(path: &Path) -> Result<(Vec<u8>, String)> {
    let bytes = tokio::fs::read(path)
        .await
        .with_context(|| format!("reading {}", path.display()))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    Ok((bytes, sha256))
}

pub async fn prepare(
    engine: &Engine,
    linker: &Linker<Ctx>,
    spec: &ServiceSpec,
    bytes: Vec<u8>,
    sha256: String,
    cache_dir: &Path,
) -> Result<Loaded> {
    let path = spec.file.clone();
    let (engine2, sha, cache) = (engine.clone(), sha256.clone(), cache_dir.to_path_buf());
    let component =
        tokio::task::spawn_blocking(move || compile_cached(&engine2, &bytes, &sha, &cache))
            .await?
            .with_context(|| format!("{} is not a valid component", path.display()))?;
    let pre = linker
        .instantiate_pre(&component)
        .map_err(anyhow::Error::from)
        .with_context(|| {
            format!(
                "{} imports something the host does not provide",
                path.display()
            )
        })?;
    let proxy = ProxyPre::new(pre.clone())
        .map_err(anyhow::Error::from)
        .with_context(|| {
            format!(
                "{} does not export wasi:http/incoming-handler",
                path.display()
            )
        })?;
    let subscriber = if spec.subscribes.is_empty() {
        None
    } else {
        Some(
            SubscriberPre::new(pre)
                .map_err(anyhow::Error::from)
                .with_context(|| {
                    format!(
                        "{} subscribes to {:?} but {} does not export microsvc:platform/handler",
                        spec.name,
                        spec.subscribes,
                        path.display()
                    )
                })?,
        )
    };
    let handler = component
        .get_export_index(None, HTTP_HANDLER)
        .and_then(|i| component.get_export_index(Some(&i), "handle"));
    Ok(Loaded {
        proxy,
        handler,
        subscriber,
        path,
        sha256,
        loaded_at: SystemTime::now(),
        idle: Mutex::default(),
    })
}

/// Compiles `bytes`, or loads the machine code compiled earlier for the same digest and the
/// same engine settings. The cache holds only files this host wrote.
fn compile_cached(engine: &Engine, bytes: &[u8], sha256: &str, dir: &Path) -> Result<Component> {
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let file = dir.join(format!("{sha256}-{:016x}.cwasm", h.finish()));
    if file.exists() {
        // SAFETY: the file was produced by `precompile_component` of a compatible engine
        // (its name carries the engine hash) and renamed into place only when complete.
        match unsafe { Component::deserialize_file(engine, &file) } {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "ignoring unusable cache entry")
            }
        }
    }
    let cwasm = engine
        .precompile_component(bytes)
        .map_err(anyhow::Error::from)?;
    if let Err(e) = write_atomically(dir, &file, &cwasm) {
        tracing::warn!(dir = %dir.display(), error = %format!("{e:#}"), "could not cache compiled component");
    }
    // SAFETY: produced just now by this engine.
    unsafe { Component::deserialize(engine, &cwasm) }.map_err(anyhow::Error::from)
}

fn write_atomically(dir: &Path, file: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        std::process::id(),
        file.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, file)?;
    Ok(())
}
