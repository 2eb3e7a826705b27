//! Component files: reading, compiling (through the compile cache) and pre-instantiating them.

use super::cache::CompileCache;
use super::store::{Instance, InstanceState};
use crate::capabilities::exports::{handler, http_handler};
use crate::config::ServiceSpec;
use anyhow::{Context as _, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;
use wasmtime::component::Linker;
use wasmtime::Engine;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

/// A component ready to be instantiated per request.
pub struct Loaded {
    pub proxy: ProxyPre<InstanceState>,
    /// `microsvc:platform/http-handler#handle`, if the component exports it: HTTP requests then
    /// go through it instead of `wasi:http` (same request, far fewer host calls).
    pub http_handler: Option<http_handler::GuestIndices>,
    /// `microsvc:platform/handler`, for services that subscribe to topics.
    pub handler: Option<handler::GuestIndices>,
    pub path: PathBuf,
    pub sha256: String,
    pub loaded_at: SystemTime,
    /// Instances that served a request and may serve another (INSTANCE_REUSE > 1); they belong
    /// to this version, so a swap never hands a request to an old instance.
    pub idle: Mutex<Vec<Instance>>,
}

impl Loaded {
    /// The same version with no idle instances: theirs were set up for a service's previous
    /// settings (limits, calls).
    pub fn fresh(&self) -> Loaded {
        Loaded {
            proxy: self.proxy.clone(),
            http_handler: self.http_handler.clone(),
            handler: self.handler.clone(),
            path: self.path.clone(),
            sha256: self.sha256.clone(),
            loaded_at: self.loaded_at,
            idle: Mutex::default(),
        }
    }
}

/// Reads, compiles (off the async workers) and pre-instantiates `spec`'s component, checking
/// that it exports what the service needs.
pub async fn load(
    engine: &Engine,
    linker: &Linker<InstanceState>,
    spec: &ServiceSpec,
    cache: &CompileCache,
) -> Result<Loaded> {
    let (bytes, sha256) = read(&spec.file).await?;
    prepare(engine, linker, spec, bytes, sha256, cache).await
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
    linker: &Linker<InstanceState>,
    spec: &ServiceSpec,
    bytes: Vec<u8>,
    sha256: String,
    cache: &CompileCache,
) -> Result<Loaded> {
    let path = spec.file.clone();
    let (engine2, sha, cache) = (engine.clone(), sha256.clone(), cache.clone());
    let component = tokio::task::spawn_blocking(move || cache.compile(&engine2, &bytes, &sha))
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
    let handler = if spec.subscribes.is_empty() {
        None
    } else {
        let indices = handler::GuestIndices::new(&pre).map_err(anyhow::Error::from);
        Some(indices.with_context(|| {
            format!(
                "{} subscribes to {:?} but {} does not export microsvc:platform/handler",
                spec.name,
                spec.subscribes,
                path.display()
            )
        })?)
    };
    // A component without it is served through wasi:http.
    let http_handler = http_handler::GuestIndices::new(&pre).ok();
    Ok(Loaded {
        proxy,
        http_handler,
        handler,
        path,
        sha256,
        loaded_at: SystemTime::now(),
        idle: Mutex::default(),
    })
}
