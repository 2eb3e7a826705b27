//! Hot swap: watches the components directory and swaps a service's component when its file
//! changes, and the manifest, whose changes the embedder applies; nothing stops.
//!
//! A change is acted on once the file has been quiet for [`DEBOUNCE`]; the new file is then
//! compiled and checked like at start-up (exports, imports, handler for subscribers) before it
//! replaces the running version, so a half-written or wrong file is refused and the old
//! version keeps serving. Requests and messages already running finish on the version they
//! started with (`Service::loaded` hands out `Arc`s).

use crate::metrics;
use crate::runtime::{component, Runtime, Service};
use anyhow::{Context as _, Result};
use futures_util::future::BoxFuture;
use futures_util::FutureExt as _;
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use sha2::Digest as _;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// How long the manifest's content must stay the same before it is applied: a file written in
/// two steps is applied whole, not its first half.
pub const MANIFEST_SETTLE: Duration = Duration::from_secs(1);

/// What the watcher needs from the embedder to apply a changed manifest: re-reading it,
/// validating it, binding ports and starting consumers are the composition root's.
pub trait ManifestHooks: Send + Sync + 'static {
    /// Re-reads the manifest and applies it if it changed and is valid; records why not
    /// otherwise. A component file the running services do not use has appeared or changed
    /// too: it may be the one a refused manifest was missing.
    fn reload(&self) -> BoxFuture<'_, ()>;
}

/// What a quiet file stands for.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Change {
    Component(Arc<str>),
    Manifest,
    /// Something else in the manifest's directory changed: the manifest, if a symlink on the
    /// way to it was swapped; a no-op when its content is what was last applied.
    ManifestDir,
}

/// Starts watching `dir` for component files and `manifest` for the services. Dropping the
/// returned watcher stops it.
pub fn spawn(
    runtime: Arc<Runtime>,
    dir: &Path,
    manifest: &Path,
    hooks: Arc<dyn ManifestHooks>,
) -> Result<RecommendedWatcher> {
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
    // Canonical, so that the paths of events (the watched path joined with a file name)
    // compare with them as they are.
    let components = dir
        .canonicalize()
        .with_context(|| format!("watching {}", dir.display()))?;
    // Its directory, not the file: editors save by writing a new file and renaming it over.
    let manifest_dir = match manifest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let manifest_dir = manifest_dir
        .canonicalize()
        .with_context(|| format!("watching {}", manifest_dir.display()))?;
    let manifest_name = manifest.file_name().map(|n| n.to_os_string());
    // The manifest may be a symlink (a Kubernetes ConfigMap: `services.toml` -> `..data/…`,
    // updated by swapping `..data`): any change in its directory, or in its target's, may be
    // a new manifest. Reloading one that did not change is a no-op.
    let mut manifest_dirs = vec![manifest_dir.clone()];
    if let Some(target_dir) = manifest
        .canonicalize()
        .ok()
        .and_then(|t| t.parent().map(Path::to_path_buf))
    {
        if !manifest_dirs.contains(&target_dir) {
            manifest_dirs.push(target_dir);
        }
    }
    let mut dirs = vec![components.clone()];
    dirs.extend(manifest_dirs.iter().filter(|d| **d != components).cloned());
    for dir in &dirs {
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;
    }
    let manifest = manifest.to_path_buf();
    tokio::spawn(async move {
        let mut due: HashMap<Change, Instant> = HashMap::new();
        // The manifest's content when it was last looked at: applied once it is seen twice,
        // `MANIFEST_SETTLE` apart.
        let mut manifest_seen: Option<[u8; 32]> = None;
        // Its content when it was last reloaded.
        let mut manifest_reloaded: Option<[u8; 32]> = None;
        loop {
            let next = due.values().min().copied();
            tokio::select! {
                path = rx.recv() => {
                    let Some(path) = path else { return };
                    let parent = path.parent().unwrap_or(Path::new(""));
                    let named = path.file_name().map(|n| n.to_os_string()) == manifest_name;
                    let in_manifest_dir = manifest_dirs.iter().any(|d| d == parent);
                    let change = if in_manifest_dir && named {
                        Some(Change::Manifest)
                    } else if in_manifest_dir && parent != components {
                        // The data dir may hold the manifest: its busy files must not keep
                        // pushing a real change back.
                        due.entry(Change::ManifestDir).or_insert(Instant::now() + DEBOUNCE);
                        None
                    } else if parent != components {
                        None
                    } else if let Some(service) = service_for(&runtime, &path) {
                        Some(Change::Component(service.name.clone()))
                    } else {
                        Some(Change::Manifest)
                    };
                    if let Some(change) = change {
                        due.insert(change, Instant::now() + DEBOUNCE);
                    }
                }
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    let now = Instant::now();
                    let ready: Vec<Change> =
                        due.iter().filter(|(_, t)| **t <= now).map(|(c, _)| c.clone()).collect();
                    for change in ready {
                        due.remove(&change);
                        if matches!(change, Change::Manifest | Change::ManifestDir) {
                            let now_seen = tokio::fs::read(&manifest)
                                .await
                                .map(|text| sha2::Sha256::digest(text).into())
                                .unwrap_or([0; 32]);
                            if change == Change::ManifestDir && manifest_reloaded == Some(now_seen) {
                                continue;
                            }
                            if manifest_seen != Some(now_seen) {
                                // Changed since it was last looked at: wait for it to settle.
                                manifest_seen = Some(now_seen);
                                due.insert(Change::Manifest, Instant::now() + MANIFEST_SETTLE);
                                continue;
                            }
                            manifest_seen = None;
                            manifest_reloaded = Some(now_seen);
                        }
                        // One at a time, in this task: a swap never races a manifest change.
                        // A bug that panics in one must not end watching for good.
                        let applied = std::panic::AssertUnwindSafe(async {
                            match &change {
                                Change::Manifest | Change::ManifestDir => hooks.reload().await,
                                Change::Component(name) => {
                                    if let Some(service) = runtime.service(name) {
                                        swap_from_file(&runtime, &service).await;
                                    }
                                }
                            }
                        })
                        .catch_unwind()
                        .await;
                        if let Err(panic) = applied {
                            let what = match &change {
                                Change::Manifest | Change::ManifestDir => "the manifest".to_string(),
                                Change::Component(name) => format!("service {name}'s component"),
                            };
                            tracing::error!(
                                panic = panic_message(&panic),
                                "applying a change of {what} panicked; still watching"
                            );
                        }
                    }
                }
            }
        }
    });
    Ok(watcher)
}

/// The message of a caught panic.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

fn service_for(runtime: &Runtime, path: &Path) -> Option<Arc<Service>> {
    let name = path.file_name()?;
    runtime
        .services()
        .iter()
        .find(|s| s.spec.file.file_name() == Some(name))
        .cloned()
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
    let prepared = runtime.compile(service, bytes, sha256.clone()).await;
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
