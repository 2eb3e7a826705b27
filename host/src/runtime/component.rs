//! Component files: reading, compiling (through the compile cache, for the engine that can
//! run them) and pre-instantiating them.

use super::cache::CompileCache;
use super::engine::engine;
use super::shared::SharedInstances;
use super::store::{linker, Instance, InstanceState};
use crate::capabilities::exports::{handler, http_handler, incoming_handler};
use crate::config::ServiceSpec;
use anyhow::{Context as _, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::Engine;
use wasmtime_wasi_http::p2::bindings::ProxyIndices;
use wasmtime_wasi_http::p3::bindings::ServiceIndices;

/// An engine and everything a store of it may import.
pub struct Flavor {
    pub engine: Engine,
    pub linker: Linker<InstanceState>,
}

/// WASI 0.2 components (and ours) run on an engine without wasmtime's concurrent component
/// model, whose task bookkeeping costs every store and host call (about a third of a trivial
/// request's throughput); components that use WASI 0.3 (async exports, streams, futures) run
/// on one with it.
pub struct Engines {
    pub wasi2: Flavor,
    pub wasi3: Flavor,
}

impl Engines {
    pub fn new(max_instances: u32, max_memory: u64) -> Result<Engines> {
        let flavor = |concurrent: bool| -> Result<Flavor> {
            let engine = engine(max_instances, max_memory, concurrent)?;
            let linker = linker(&engine, concurrent)?;
            Ok(Flavor { engine, linker })
        };
        Ok(Engines {
            wasi2: flavor(false)?,
            wasi3: flavor(true)?,
        })
    }

    /// `bytes` compiled (through `cache`) for the engine that can run it: the WASI 0.2 one
    /// unless the component uses the component model's async features, which only the WASI 0.3
    /// engine validates.
    pub fn compile(
        &self,
        cache: &CompileCache,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<(Component, &Flavor)> {
        match cache.compile(&self.wasi2.engine, bytes, sha256) {
            Ok(component) => Ok((component, &self.wasi2)),
            Err(wasi2) => match cache.compile(&self.wasi3.engine, bytes, sha256) {
                Ok(component) => Ok((component, &self.wasi3)),
                // Invalid for both: what the plainer engine says is the clearer error.
                Err(_) => Err(wasi2),
            },
        }
    }
}

/// The HTTP export a component is served through, chosen at load time: ours when it has it
/// (same request, far fewer host calls), else `wasi:http` 0.3, else 0.2; or none, for a
/// service that has no port and only handles messages.
#[derive(Clone)]
pub enum HttpExport {
    Handler(http_handler::GuestIndices),
    WasiHttp3(ServiceIndices),
    WasiHttp(ProxyIndices),
    Absent,
}

impl HttpExport {
    /// What `pre`'s component exports to answer HTTP with, if anything.
    fn of(pre: &InstancePre<InstanceState>) -> Option<HttpExport> {
        if let Ok(indices) = http_handler::GuestIndices::new(pre) {
            return Some(HttpExport::Handler(indices));
        }
        if let Ok(indices) = ServiceIndices::new(pre) {
            return Some(HttpExport::WasiHttp3(indices));
        }
        ProxyIndices::new(pre).ok().map(HttpExport::WasiHttp)
    }

    /// The interface's name, for `/components` and logs.
    pub fn interface(&self) -> Option<&'static str> {
        match self {
            HttpExport::Handler(_) => Some("microsvc:platform/http-handler"),
            HttpExport::WasiHttp3(_) => Some("wasi:http/handler@0.3"),
            HttpExport::WasiHttp(_) => Some("wasi:http/incoming-handler@0.2"),
            HttpExport::Absent => None,
        }
    }
}

/// The export a subscribing component is handed its messages through: ours when it has it,
/// else `wasi:messaging`'s.
#[derive(Clone)]
pub enum MessageExport {
    Handler(handler::GuestIndices),
    WasiMessaging(incoming_handler::GuestIndices),
}

impl MessageExport {
    fn of(pre: &InstancePre<InstanceState>) -> Option<MessageExport> {
        if let Ok(indices) = handler::GuestIndices::new(pre) {
            return Some(MessageExport::Handler(indices));
        }
        let indices = incoming_handler::GuestIndices::new(pre).ok()?;
        Some(MessageExport::WasiMessaging(indices))
    }
}

/// A component ready to be instantiated per request.
pub struct Loaded {
    pub pre: InstancePre<InstanceState>,
    pub http: HttpExport,
    /// Its message handler, for services that subscribe to topics.
    pub handler: Option<MessageExport>,
    pub path: PathBuf,
    pub sha256: String,
    pub loaded_at: SystemTime,
    /// Instances that served a request and may serve another (INSTANCE_REUSE > 1); they belong
    /// to this version, so a swap never hands a request to an old instance.
    pub idle: Mutex<Vec<Instance>>,
    /// Instances of a WASI 0.3 component that serve several requests at once.
    pub shared: Arc<SharedInstances>,
}

impl Loaded {
    /// The same version with no idle instances: theirs were set up for a service's previous
    /// settings (limits, calls).
    pub fn fresh(&self) -> Loaded {
        Loaded {
            pre: self.pre.clone(),
            http: self.http.clone(),
            handler: self.handler.clone(),
            path: self.path.clone(),
            sha256: self.sha256.clone(),
            loaded_at: self.loaded_at,
            idle: Mutex::default(),
            shared: Arc::default(),
        }
    }

    /// Drops its idle instances and hands no more requests to its shared ones: it is no longer
    /// the version that serves.
    pub fn retire(&self) {
        self.idle.lock().unwrap().clear();
        self.shared.retire();
    }
}

/// Reads, compiles (off the async workers) and pre-instantiates `spec`'s component, checking
/// that it exports what the service needs.
pub async fn load(
    engines: &Arc<Engines>,
    spec: &ServiceSpec,
    cache: &CompileCache,
) -> Result<Loaded> {
    let (bytes, sha256) = read(&spec.file).await?;
    prepare(engines, spec, bytes, sha256, cache).await
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
    engines: &Arc<Engines>,
    spec: &ServiceSpec,
    bytes: Vec<u8>,
    sha256: String,
    cache: &CompileCache,
) -> Result<Loaded> {
    let path = spec.file.clone();
    let (compiling, sha, cache) = (engines.clone(), sha256.clone(), cache.clone());
    let (component, wasi3) = tokio::task::spawn_blocking(move || {
        let (component, flavor) = compiling.compile(&cache, &bytes, &sha)?;
        anyhow::Ok((component, std::ptr::eq(flavor, &compiling.wasi3)))
    })
    .await?
    .with_context(|| format!("{} is not a valid component", path.display()))?;
    let linker = match wasi3 {
        true => &engines.wasi3.linker,
        false => &engines.wasi2.linker,
    };
    let pre = linker
        .instantiate_pre(&component)
        .map_err(anyhow::Error::from)
        .with_context(|| {
            format!(
                "{} imports something the host does not provide",
                path.display()
            )
        })?;
    let handler = if spec.subscribes.is_empty() {
        None
    } else {
        Some(MessageExport::of(&pre).with_context(|| {
            format!(
                "{} subscribes to {:?} but {} exports no message handler: neither \
                 microsvc:platform/handler nor wasi:messaging/incoming-handler@0.2.0-draft",
                spec.name,
                spec.subscribes,
                path.display()
            )
        })?)
    };
    // A service without a port that only handles messages needs no HTTP export.
    let http = match HttpExport::of(&pre) {
        Some(http) => http,
        None if handler.is_some() && !spec.serves_http => HttpExport::Absent,
        None => anyhow::bail!(
            "{} exports no HTTP handler: neither wasi:http/handler@0.3, \
             wasi:http/incoming-handler@0.2 nor microsvc:platform/http-handler (only a \
             service without a port that subscribes may have none)",
            path.display()
        ),
    };
    Ok(Loaded {
        pre,
        http,
        handler,
        path,
        sha256,
        loaded_at: SystemTime::now(),
        idle: Mutex::default(),
        shared: Arc::default(),
    })
}
