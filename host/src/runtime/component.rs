//! Component files: reading, compiling (with a cache by digest) and pre-instantiating them.

use super::store::{Ctx, Warm};
use crate::capabilities::exports::{handler, http_handler};
use crate::config::ServiceSpec;
use anyhow::{Context as _, Result};
use sha2::{Digest, Sha256};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;
use wasmtime::component::{Component, Linker};
use wasmtime::Engine;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

/// A component ready to be instantiated per request.
pub struct Loaded {
    pub proxy: ProxyPre<Ctx>,
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
    pub idle: Mutex<Vec<Warm>>,
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
