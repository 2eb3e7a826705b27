//! Hot swap: watches the components directory and swaps a service's component when its file
//! changes, without stopping anything.
//!
//! A change is acted on once the file has been quiet for [`DEBOUNCE`]; the new file is then
//! compiled and checked like at start-up (exports, imports, handler for subscribers) before it
//! replaces the running version, so a half-written or wrong file is refused and the old
//! version keeps serving. Requests and messages already running finish on the version they
//! started with (`Service::loaded` hands out `Arc`s).

use crate::metrics;
use crate::runtime::{component, Runtime, Service};
use anyhow::{Context as _, Result};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Starts watching `dir`. Dropping the returned watcher stops it.
pub fn spawn(runtime: Arc<Runtime>, dir: &Path) -> Result<RecommendedWatcher> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res {
            if !event.kind.is_access() {
                for path in event.paths {
                    let _ = tx.send(path);
                }
            }
        }
    })?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    tokio::spawn(async move {
        let mut due: HashMap<Arc<str>, Instant> = HashMap::new();
        loop {
            let next = due.values().min().copied();
            tokio::select! {
                path = rx.recv() => {
                    let Some(path) = path else { return };
                    if let Some(service) = service_for(&runtime, &path) {
                        due.insert(service.name.clone(), Instant::now() + DEBOUNCE);
                    }
                }
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    let now = Instant::now();
                    let ready: Vec<Arc<str>> =
                        due.iter().filter(|(_, t)| **t <= now).map(|(n, _)| n.clone()).collect();
                    for name in ready {
                        due.remove(&name);
                        if let Some(service) = runtime.service(&name) {
                            swap_from_file(&runtime, service).await;
                        }
                    }
                }
            }
        }
    });
    Ok(watcher)
}

fn service_for<'a>(runtime: &'a Runtime, path: &Path) -> Option<&'a Arc<Service>> {
    let name = path.file_name()?;
    runtime
        .services()
        .iter()
        .find(|s| s.spec.file.file_name() == Some(name))
}

/// Loads the service's file if it differs from the running version; installs it if it is
/// valid, records why not otherwise.
pub async fn swap_from_file(runtime: &Runtime, service: &Service) {
    let (bytes, sha256) = match component::read(&service.spec.file).await {
        Ok(read) => read,
        Err(e) => {
            tracing::warn!(service = %service.name, error = %format!("{e:#}"), "component file unreadable; keeping the running version");
            return;
        }
    };
    if sha256 == service.loaded.load().sha256 {
        return;
    }
    let prepared = component::prepare(
        &runtime.engine,
        &runtime.linker,
        &service.spec,
        bytes,
        sha256.clone(),
        &runtime.settings.compile_cache,
    )
    .await;
    match prepared {
        Ok(loaded) => {
            let generation = service.install(loaded);
            metrics::get()
                .swaps
                .get_or_create(&metrics::labels([("service", &service.name)]))
                .inc();
            tracing::info!(service = %service.name, generation, sha256, "component swapped");
        }
        Err(e) => {
            let error = format!("{e:#}");
            tracing::warn!(service = %service.name, sha256, error, "new component rejected; the previous version keeps serving");
            service.reject(sha256, error);
            metrics::get()
                .swaps_rejected
                .get_or_create(&metrics::labels([("service", &service.name)]))
                .inc();
        }
    }
}
