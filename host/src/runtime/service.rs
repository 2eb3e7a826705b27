//! A running service: its settings, current component version (hot-swappable), admission, history.

use super::admission::{Admission, QueueSettings};
use super::component::Loaded;
use crate::config::ServiceSpec;
use crate::metrics;
use arc_swap::ArcSwap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

pub struct Service {
    pub spec: Arc<ServiceSpec>,
    /// Cheap to read on every request; replaced as a whole when the component changes.
    /// In-flight invocations keep the `Arc` they started with, so they finish on that version.
    pub loaded: ArcSwap<Loaded>,
    pub name: Arc<str>,
    /// A permit per request in flight, and the queue of those waiting for one.
    pub admission: Admission,
    /// Held by invocations re-running after a commit conflict: under contention (every
    /// `POST /users` increments one counter) re-runs take turns instead of conflicting again.
    pub rerun: Arc<tokio::sync::Mutex<()>>,
    /// This service's request latency histogram (also its request count), looked up once
    /// instead of per request.
    pub latency: metrics::Latency,
    pub instances: prometheus_client::metrics::counter::Counter,
    /// Commits of its invocations refused as conflicts (each then runs again).
    pub conflicts: prometheus_client::metrics::counter::Counter,
    /// Route labels its request metrics have used (the listener keeps them bounded).
    pub routes: Arc<Mutex<std::collections::HashSet<String>>>,
    swaps: Mutex<Swaps>,
    /// Set when a manifest change gave this service a new component: the running version
    /// goes into its history when it is installed.
    swapped_in: bool,
}

/// A file that was offered as a new version and refused.
#[derive(Clone, Debug)]
pub struct RejectedFile {
    pub sha256: String,
    pub error: String,
    pub at: SystemTime,
}

#[derive(Default, Clone)]
struct Swaps {
    generation: u64,
    /// Versions replaced by swaps, oldest first, for rollback.
    previous: Vec<Arc<Loaded>>,
    /// Versions left by rollbacks, most recent last, for rolling forward again.
    undone: Vec<Arc<Loaded>>,
    rejected: Option<RejectedFile>,
}

impl Swaps {
    /// Keeps `old`, just replaced by a new version, for rollback; the new generation.
    fn push(&mut self, old: Arc<Loaded>) -> u64 {
        // Kept for rollback, but its idle instances would only hold pool slots.
        old.retire();
        self.previous.push(old);
        if self.previous.len() > HISTORY {
            self.previous.remove(0);
        }
        // A new version starts a new line of history, as a new commit after an undo does.
        self.undone.clear();
        self.generation += 1;
        self.generation
    }
}

/// How many replaced versions are kept for rollback.
const HISTORY: usize = 8;

impl Service {
    pub fn new(spec: ServiceSpec, loaded: Loaded, queue: QueueSettings) -> Service {
        Service {
            name: spec.name.clone(),
            admission: Admission::new(&spec.name, spec.limits.concurrency, queue),
            rerun: Arc::default(),
            latency: metrics::get()
                .latency
                .get_or_create(&metrics::labels([("service", &spec.name)]))
                .clone(),
            instances: metrics::get()
                .instances
                .get_or_create(&metrics::labels([("service", &spec.name)]))
                .clone(),
            conflicts: metrics::get()
                .conflicts
                .get_or_create(&metrics::labels([("service", &spec.name)]))
                .clone(),
            routes: metrics::routes(&spec.name),
            spec: Arc::new(spec),
            loaded: ArcSwap::from_pointee(loaded),
            swaps: Mutex::new(Swaps {
                generation: 1,
                ..Swaps::default()
            }),
            swapped_in: false,
        }
    }

    /// This service with the settings of `spec` (a manifest change) running `loaded`, with the
    /// version history so far; `swapped`: `loaded` is a new version (its component changed),
    /// counted and undoable like a swap. Invocations in flight finish on `self`.
    pub fn reconfigured(&self, spec: ServiceSpec, loaded: Loaded, swapped: bool) -> Service {
        let mut service = Service::new(spec, loaded, self.admission.queue());
        service.rerun = self.rerun.clone();
        service.swapped_in = swapped;
        service.take_history_from(self);
        service
    }

    /// Takes `old`'s version history as it is now (and, unless a new component replaces it,
    /// its current version): `old` is the running service this one replaces.
    pub fn take_history_from(&self, old: &Service) {
        let mut swaps = old.swaps.lock().unwrap().clone();
        let current = old.loaded.load_full();
        if self.swapped_in {
            swaps.push(current);
        } else if current.sha256 != self.loaded.load().sha256 {
            self.loaded.store(Arc::new(current.fresh()));
        }
        *self.swaps.lock().unwrap() = swaps;
    }

    /// 1 for the version loaded at start-up, +1 per swap or rollback.
    pub fn generation(&self) -> u64 {
        self.swaps.lock().unwrap().generation
    }

    /// The versions a rollback goes back to (oldest first) and those a roll-forward returns
    /// to (the next one last).
    pub fn history(&self) -> (Vec<Arc<Loaded>>, Vec<Arc<Loaded>>) {
        let swaps = self.swaps.lock().unwrap();
        (swaps.previous.clone(), swaps.undone.clone())
    }

    pub fn rejected(&self) -> Option<RejectedFile> {
        self.swaps.lock().unwrap().rejected.clone()
    }

    /// Makes `new` the version new invocations use.
    pub fn install(&self, new: Loaded) -> u64 {
        let mut swaps = self.swaps.lock().unwrap();
        let old = self.loaded.swap(Arc::new(new));
        swaps.push(old)
    }

    pub fn reject(&self, sha256: String, error: String) {
        self.swaps.lock().unwrap().rejected = Some(RejectedFile {
            sha256,
            error,
            at: SystemTime::now(),
        });
    }

    /// Goes back to the version before the current one, keeping the current one for
    /// [`Service::rollforward`]; `None` if there is none.
    pub fn rollback(&self) -> Option<(u64, Arc<Loaded>)> {
        self.step(false)
    }

    /// Undoes the last rollback; `None` if there is none to undo.
    pub fn rollforward(&self) -> Option<(u64, Arc<Loaded>)> {
        self.step(true)
    }

    /// Installs the last version of one history and keeps the current one in the other.
    fn step(&self, forward: bool) -> Option<(u64, Arc<Loaded>)> {
        let mut guard = self.swaps.lock().unwrap();
        let swaps = &mut *guard;
        let (from, to) = if forward {
            (&mut swaps.undone, &mut swaps.previous)
        } else {
            (&mut swaps.previous, &mut swaps.undone)
        };
        let target = from.pop()?;
        // Instances an older `Service` (before a manifest change) may have left there.
        target.retire();
        let left = self.loaded.swap(target.clone());
        left.retire();
        to.push(left);
        swaps.generation += 1;
        Some((swaps.generation, target))
    }
}
